package forward

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edgegate/edgegate/internal/eventually"
	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// checkValidate runs Validate on sinks and checks that it succeeds (want empty) or that its report holds each
// of want, and nothing else when strict.
func checkValidate(t *testing.T, sinks []SinkConfig, want ...string) {
	t.Helper()
	err := Config{Sinks: sinks}.Validate()
	if len(want) == 0 {
		if err != nil {
			t.Fatalf("err = %v, want valid", err)
		}
		return
	}
	if err == nil {
		t.Fatalf("valid, want an error with %q", want)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("err = %v\nwant it to hold %q", err, w)
		}
	}
	if n, m := strings.Count(err.Error(), "\n")+1, len(want); n != 1 {
		t.Errorf("%d errors, want one (each of %d fragments in it): %v", n, m, err)
	}
}

// mqttConf is an MQTT sink towards url with commands on (the default) for validation tests.
func mqttConf(name, url string, adjust ...func(*SinkConfig)) SinkConfig {
	s := SinkConfig{Name: name, Type: TypeMQTT, MQTT: &MQTTConfig{URL: url}}
	for _, a := range adjust {
		a(&s)
	}
	return s
}

func noCommands(s *SinkConfig)             { s.MQTT.DisableCommands = true }
func clientID(id string) func(*SinkConfig) { return func(s *SinkConfig) { s.MQTT.ClientID = id } }
func lanes(p ...int) func(*SinkConfig)     { return func(s *SinkConfig) { s.PriorityLanes = p } }
func cmdTopic(ct string) func(*SinkConfig) {
	return func(s *SinkConfig) { s.MQTT.CommandTopic = ct }
}

// TestValidateClientIDsPerBroker: two connections to one broker with the same client id would take the session
// over from each other forever (lanes included: a lane's id is its sink's with "-p<n>" appended), so such a
// configuration is refused, naming both sinks; the same id on different brokers is fine.
func TestValidateClientIDsPerBroker(t *testing.T) {
	const b1, b2 = "tcp://broker.example:1883", "tcp://other.example:1883"
	tests := []struct {
		name  string
		sinks []SinkConfig
		want  []string // fragments of the one error; none: valid
	}{
		{"derived ids differ", []SinkConfig{mqttConf("a", b1, noCommands), mqttConf("b", b1, noCommands)}, nil},
		{"a lane's id is another sink's",
			[]SinkConfig{mqttConf("cloud", b1, lanes(5)), mqttConf("cloud-p5", b1, noCommands)},
			[]string{`forward.sinks[1].name: the connection of sink "cloud-p5" has the client id "edgegate-<gateway>-cloud-p5"`,
				`as has that of sink "cloud"'s priority lane cloud@p5 (forward.sinks[0])`, "on the same broker broker.example:1883",
				"set a different mqtt.client_id or name"}},
		{"the same client_id twice",
			[]SinkConfig{mqttConf("a", b1, clientID("gw"), noCommands), mqttConf("b", b1, clientID("gw"), noCommands)},
			[]string{`forward.sinks[1].mqtt.client_id: the connection of sink "b" has the client id "gw", as has that of sink "a" (forward.sinks[0])`}},
		{"a client_id that is another's lane",
			[]SinkConfig{mqttConf("a", b1, clientID("gw"), lanes(9)), mqttConf("b", b1, clientID("gw-p9"), noCommands)},
			[]string{`forward.sinks[1].mqtt.client_id: the connection of sink "b" has the client id "gw-p9"`}},
		{"the same client_id on different brokers",
			[]SinkConfig{mqttConf("a", b1, clientID("gw")), mqttConf("b", b2, clientID("gw"))}, nil},
		{"a port given and the default port are one broker",
			[]SinkConfig{mqttConf("a", "tcp://Broker.example", clientID("gw"), noCommands),
				mqttConf("b", "mqtt://broker.example:1883", clientID("gw"), noCommands)},
			[]string{`the client id "gw"`, "broker.example:1883"}},
		{"different ports are different brokers",
			[]SinkConfig{mqttConf("a", "tcp://broker.example", clientID("gw")), mqttConf("b", "ssl://broker.example", clientID("gw"))}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { checkValidate(t, tc.sinks, tc.want...) })
	}

	// Only with the gateway's id (ValidateFor, and New) is a client_id that equals another sink's derived id caught.
	sinks := []SinkConfig{mqttConf("a", b1, noCommands), mqttConf("b", b1, clientID("edgegate-gw1-a"), noCommands)}
	if err := (Config{Sinks: sinks}).Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	const want = `forward.sinks[1].mqtt.client_id: the connection of sink "b" has the client id "edgegate-gw1-a", as has that of sink "a"`
	if err := (Config{Sinks: sinks}).ValidateFor("gw1"); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("ValidateFor: err = %v, want %q", err, want)
	}
	_, err := New(Config{Sinks: sinks}, "gw1", newMemLog(t), nil, &deadLetters{}, testLogger(t), prometheus.NewRegistry())
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("New: err = %v, want %q", err, want)
	}
}

// TestValidateCommandSubscriptionsPerBroker: two sinks on one broker whose command subscriptions could match the
// same topic would each deliver every such command: refused, unless all but one set disable_commands or their
// command topics cannot meet.
func TestValidateCommandSubscriptionsPerBroker(t *testing.T) {
	const b1 = "tcp://broker.example:1883"
	tests := []struct {
		name  string
		sinks []SinkConfig
		want  []string
	}{
		{"both with the default command topic", []SinkConfig{mqttConf("alarms", b1), mqttConf("telemetry", b1)},
			[]string{`forward.sinks[1].mqtt.command_topic: "edgegate/{gateway}/commands/{device}/{command}" (edgegate/{gateway}/commands/+/+) ` +
				`can match the same commands as forward.sinks[0].mqtt.command_topic`, "on the same broker broker.example:1883",
				`delivered twice, once by sink "alarms" and once by sink "telemetry"`, "set disable_commands on all but one"}},
		{"all but one without commands", []SinkConfig{mqttConf("alarms", b1, noCommands), mqttConf("telemetry", b1)}, nil},
		{"different brokers", []SinkConfig{mqttConf("a", b1), mqttConf("b", "tcp://broker.example:1884")}, nil},
		{"command topics with {sink}", []SinkConfig{
			mqttConf("a", b1, cmdTopic("edgegate/{gateway}/cmd/{sink}/{device}/{command}")),
			mqttConf("b", b1, cmdTopic("edgegate/{gateway}/cmd/{sink}/{device}/{command}"))}, nil},
		{"{sink} in one, a literal matching it in the other", []SinkConfig{
			mqttConf("a", b1, cmdTopic("edgegate/{gateway}/cmd/{sink}/{device}/{command}")),
			mqttConf("b", b1, cmdTopic("edgegate/{gateway}/cmd/a/{device}/{command}"))},
			[]string{"forward.sinks[1].mqtt.command_topic:", "forward.sinks[0].mqtt.command_topic"}},
		{"+ of one over a literal of the other", []SinkConfig{
			mqttConf("a", b1, cmdTopic("site/{device}/{command}")),
			mqttConf("b", b1, cmdTopic("site/lamp/{device}/{command}"), noCommands),
			mqttConf("c", b1, cmdTopic("site/{command}/{device}"))},
			[]string{"forward.sinks[2].mqtt.command_topic:", "forward.sinks[0].mqtt.command_topic"}},
		{"different depths", []SinkConfig{
			mqttConf("a", b1, cmdTopic("site/{device}/{command}")),
			mqttConf("b", b1, cmdTopic("site/x/{device}/{command}"))}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { checkValidate(t, tc.sinks, tc.want...) })
	}
}

// TestValidateCommandEchoAcrossSinks: a sink whose events (or batches) could be published where another sink on
// the same broker subscribes to commands would turn every event into a command to its device: refused, naming
// both keys, even when the publishing sink itself takes no commands.
func TestValidateCommandEchoAcrossSinks(t *testing.T) {
	const b1 = "tcp://broker.example:1883"
	under := func(s *SinkConfig) { s.MQTT.Topic = "edgegate/{gateway}/commands/{subject}/{type}" }
	tests := []struct {
		name  string
		sinks []SinkConfig
		want  []string
	}{
		{"events under another sink's command topic", []SinkConfig{mqttConf("a", b1, noCommands, under), mqttConf("b", b1)},
			[]string{`forward.sinks[0].mqtt.topic: "edgegate/{gateway}/commands/{subject}/{type}" can match the subscription of ` +
				`forward.sinks[1].mqtt.command_topic "edgegate/{gateway}/commands/{device}/{command}" (edgegate/{gateway}/commands/+/+) ` +
				`on the same broker broker.example:1883: every event sink "a" sends would come back through sink "b" as a command`,
				"set disable_commands on forward.sinks[1]"}},
		{"on another broker", []SinkConfig{mqttConf("a", b1, noCommands, under), mqttConf("b", "tcp://broker.example:1884")}, nil},
		{"the other takes no commands either", []SinkConfig{mqttConf("a", b1, noCommands, under), mqttConf("b", b1, noCommands)}, nil},
		{"batches under another sink's command topic", []SinkConfig{
			mqttConf("a", b1, noCommands, func(s *SinkConfig) {
				s.MQTT.Mode, s.MQTT.BatchTopic = ModeBatch, "edgegate/{gateway}/commands/{sink}/all"
			}), mqttConf("b", b1)},
			[]string{`forward.sinks[0].mqtt.batch_topic: "edgegate/{gateway}/commands/{sink}/all" can match the subscription of forward.sinks[1].mqtt.command_topic`}},
		{"{sink} of the publisher against a literal of the subscriber", []SinkConfig{
			mqttConf("a", b1, noCommands, func(s *SinkConfig) { s.MQTT.Topic = "cmd/{sink}/{subject}/{type}" }),
			mqttConf("b", b1, cmdTopic("cmd/b/{device}/{command}"))}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { checkValidate(t, tc.sinks, tc.want...) })
	}
}

// TestValidateTLSNeedsTLSScheme: a tls block on a URL that connects in plaintext would be ignored, and the
// credentials sent in clear: refused for MQTT and HTTP. A NATS client uses TLS whenever the block is set.
func TestValidateTLSNeedsTLSScheme(t *testing.T) {
	tc := TLSConfig{CAFile: "/etc/ca.pem"}
	tests := []struct {
		sink SinkConfig
		want string // "" for valid
	}{
		{SinkConfig{Name: "s", Type: TypeMQTT, MQTT: &MQTTConfig{URL: "tcp://u:p@h:1883", TLS: tc}},
			`forward.sinks[0].mqtt.tls: set, but forward.sinks[0].mqtt.url "tcp://u:xxxxx@h:1883" connects without TLS (scheme "tcp")`},
		{SinkConfig{Name: "s", Type: TypeMQTT, MQTT: &MQTTConfig{URL: "mqtt://h:1883", TLS: TLSConfig{InsecureSkipVerify: true}}},
			`forward.sinks[0].mqtt.tls: set, but forward.sinks[0].mqtt.url "mqtt://h:1883" connects without TLS`},
		{SinkConfig{Name: "s", Type: TypeMQTT, MQTT: &MQTTConfig{URL: "ws://h/mqtt", TLS: tc}},
			`use ssl:// or tls:// or mqtts:// or wss:// or remove the tls block`},
		{SinkConfig{Name: "s", Type: TypeHTTP, HTTP: &HTTPConfig{URL: "http://h/events", TLS: tc}},
			`forward.sinks[0].http.tls: set, but forward.sinks[0].http.url "http://h/events" connects without TLS (scheme "http")`},
		{SinkConfig{Name: "s", Type: TypeMQTT, MQTT: &MQTTConfig{URL: "tcp://h:1883"}}, ""},
		{SinkConfig{Name: "s", Type: TypeHTTP, HTTP: &HTTPConfig{URL: "http://h/events"}}, ""},
		{SinkConfig{Name: "s", Type: TypeNATS, NATS: &NATSConfig{URL: "nats://h:4222", TLS: tc}}, ""},
		{SinkConfig{Name: "s", Type: TypeNATS, NATS: &NATSConfig{URL: "ws://h:8080", TLS: tc}}, ""},
		{SinkConfig{Name: "s", Type: TypeHTTP, HTTP: &HTTPConfig{URL: "https://h/events", TLS: tc}}, ""},
	}
	for _, scheme := range []string{"ssl", "tls", "mqtts", "wss"} {
		tests = append(tests, struct {
			sink SinkConfig
			want string
		}{SinkConfig{Name: "s", Type: TypeMQTT, MQTT: &MQTTConfig{URL: scheme + "://h:8883", TLS: tc}}, ""})
	}
	for _, tc := range tests {
		var url string
		switch {
		case tc.sink.MQTT != nil:
			url = tc.sink.MQTT.URL
		case tc.sink.NATS != nil:
			url = tc.sink.NATS.URL
		default:
			url = tc.sink.HTTP.URL
		}
		t.Run(tc.sink.Type+" "+url, func(t *testing.T) {
			if tc.want == "" {
				checkValidate(t, []SinkConfig{tc.sink})
			} else {
				checkValidate(t, []SinkConfig{tc.sink}, tc.want)
			}
		})
	}
}

// keepAliveCase is a keep_alive to validate and whether it is valid.
type keepAliveCase struct {
	ka    time.Duration
	valid bool
}

// checkKeepAlives validates the sink mk makes with each keep-alive: a valid one passes, another is refused with
// refused followed by the value.
func checkKeepAlives(t *testing.T, refused string, mk func(time.Duration) SinkConfig, cases []keepAliveCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.ka.String(), func(t *testing.T) {
			if tc.valid {
				checkValidate(t, []SinkConfig{mk(tc.ka)})
			} else {
				checkValidate(t, []SinkConfig{mk(tc.ka)}, refused+tc.ka.String())
			}
		})
	}
}

// TestValidateKeepAlive: MQTT carries the keep-alive in whole seconds in 16 bits, so less than a second (sent as
// 0: keep-alive off) and more than 65535 s (cut to its low bits) are refused; 0 takes the default.
func TestValidateKeepAlive(t *testing.T) {
	checkKeepAlives(t, "forward.sinks[0].mqtt.keep_alive: must be from 1s to 65535s (18h12m15s), or 0 for the default 30s; got ",
		func(ka time.Duration) SinkConfig {
			return SinkConfig{Name: "s", Type: TypeMQTT, MQTT: &MQTTConfig{URL: "tcp://h:1883", KeepAlive: ka}}
		}, []keepAliveCase{
			{0, true}, {time.Second, true}, {30 * time.Second, true}, {1500 * time.Millisecond, true}, {MaxKeepAlive, true},
			{500 * time.Millisecond, false}, {time.Nanosecond, false}, {MaxKeepAlive + time.Second, false},
			{20 * time.Hour, false}, {-time.Second, false},
		})
}

// TestValidateNATSKeepAlive: a NATS keep-alive below a second (the client would ping several times a second) is
// refused; 0 takes the default, which the transport's pings use.
func TestValidateNATSKeepAlive(t *testing.T) {
	mk := func(ka time.Duration) SinkConfig {
		return SinkConfig{Name: "s", Type: TypeNATS, NATS: &NATSConfig{URL: "nats://h:4222", KeepAlive: ka}}
	}
	checkKeepAlives(t, "forward.sinks[0].nats.keep_alive: must be at least 1s, or 0 for the default 30s; got ", mk,
		[]keepAliveCase{{0, true}, {time.Second, true}, {20 * time.Hour, true}, {999 * time.Millisecond, false}, {-time.Second, false}})
	if c := mk(0).withDefaults(); c.NATS.KeepAlive != DefaultKeepAlive {
		t.Errorf("default keep_alive = %s, want %s", c.NATS.KeepAlive, DefaultKeepAlive)
	}
}

// TestMQTTHostPort: an MQTT URL without a port connects to its scheme's default port; the checks of sinks sharing
// a broker see the same host and port.
func TestMQTTHostPort(t *testing.T) {
	for _, tc := range []struct{ url, hostPort, broker string }{
		{"tcp://127.0.0.1", "127.0.0.1:1883", "127.0.0.1:1883"},
		{"mqtt://Broker.example", "Broker.example:1883", "broker.example:1883"},
		{"tcp://h:1884", "h:1884", "h:1884"},
		{"ssl://localhost", "localhost:8883", "localhost:8883"},
		{"tls://h", "h:8883", "h:8883"},
		{"mqtts://h", "h:8883", "h:8883"},
		{"ws://h/mqtt", "h:80", "h:80/mqtt"},
		{"wss://h", "h:443", "h:443/"},
		{"tcp://[::1]", "[::1]:1883", "[::1]:1883"},
		{"tcp://u:p@h", "h:1883", "h:1883"},
	} {
		u, err := url.Parse(tc.url)
		if err != nil {
			t.Fatal(err)
		}
		if got := mqttHostPort(u); got != tc.hostPort {
			t.Errorf("mqttHostPort(%s) = %s, want %s", tc.url, got, tc.hostPort)
		}
		if got, ok := mqttBroker(tc.url); !ok || got != tc.broker {
			t.Errorf("mqttBroker(%s) = %s, %t; want %s", tc.url, got, ok, tc.broker)
		}
	}
}

// TestMQTTURLWithoutPort: a sink whose URL names no port connects to the scheme's default port (1883 for tcp://
// and mqtt://, 8883 for ssl://, tls:// and mqtts://) and delivers. The brokers listen on a loopback address of
// their own (127.83.x.y), so the default ports are free there.
func TestMQTTURLWithoutPort(t *testing.T) {
	pki := newTestPKI(t)
	for _, tc := range []struct {
		scheme string
		port   int
		tls    TLSConfig
	}{
		{"tcp", 1883, TLSConfig{}},
		{"mqtt", 1883, TLSConfig{}},
		{"ssl", 8883, TLSConfig{CAFile: pki.caFile, ServerName: "localhost"}},
		{"tls", 8883, TLSConfig{CAFile: pki.caFile, ServerName: "localhost"}},
		{"mqtts", 8883, TLSConfig{CAFile: pki.caFile, ServerName: "localhost"}},
	} {
		t.Run(tc.scheme, func(t *testing.T) {
			b, host := startBrokerOnLoopback(t, tc.port, func(host string) []string {
				if tc.tls == (TLSConfig{}) {
					return []string{fmt.Sprintf("listener %d %s", tc.port, host)}
				}
				lines := pki.tlsListener(tc.port, false)
				lines[0] = fmt.Sprintf("listener %d %s", tc.port, host)
				return lines
			})
			sc := tlsMQTTSink(tc.scheme+"://"+host, tc.tls)
			checkMQTTDelivers(t, b.URL(), sc)
		})
	}
}

// startBrokerOnLoopback starts a mosquitto with a second listener on port of a random 127.83.x.y address, which
// lines (given the address) configure, and waits until it accepts connections. An address whose port is taken
// is retried with another.
func startBrokerOnLoopback(t *testing.T, port int, lines func(host string) []string) (*mosquittotest.Broker, string) {
	t.Helper()
	var last error
	for range 5 {
		host := fmt.Sprintf("127.83.%d.%d", rand.IntN(256), 1+rand.IntN(254))
		addr := net.JoinHostPort(host, fmt.Sprint(port))
		if ln, err := net.Listen("tcp", addr); err != nil {
			last = err
			continue
		} else {
			_ = ln.Close()
		}
		b, err := mosquittotest.TryStart(t, lines(host)...)
		if err != nil {
			last = err
			continue
		}
		accepting := eventually.Within(10*time.Second, func() bool {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				_ = c.Close()
				return true
			}
			return !b.Running()
		}) && b.Running()
		if accepting {
			return b, host
		}
		last = fmt.Errorf("the listener on %s does not accept connections\n%s", addr, b.Log())
	}
	t.Fatalf("mosquitto on a loopback address's port %d: %v", port, last)
	return nil, ""
}
