package gateway_test

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// logWatch passes log records on to the test's logger and keeps their messages, so that a test can wait for a
// step that shows nowhere else.
type logWatch struct {
	slog.Handler
	seen *seenLog
}

type seenLog struct {
	mu   sync.Mutex
	msgs []string
}

func (l logWatch) Handle(ctx context.Context, r slog.Record) error {
	l.seen.mu.Lock()
	l.seen.msgs = append(l.seen.msgs, r.Message)
	l.seen.mu.Unlock()
	return l.Handler.Handle(ctx, r)
}

func (l logWatch) WithAttrs(a []slog.Attr) slog.Handler {
	return logWatch{l.Handler.WithAttrs(a), l.seen}
}
func (l logWatch) WithGroup(n string) slog.Handler { return logWatch{l.Handler.WithGroup(n), l.seen} }

// has reports whether a message containing s was logged.
func (s *seenLog) has(sub string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.ContainsFunc(s.msgs, func(m string) bool { return strings.Contains(m, sub) })
}

// runWatchedGateway is runGateway with the log's messages kept for the test.
func runWatchedGateway(t *testing.T, cfg gateway.Config) (*testGateway, *seenLog) {
	t.Helper()
	seen := &seenLog{}
	reg := prometheus.NewRegistry()
	gw, err := gateway.New(cfg, slog.New(logWatch{testLogger(t, cfg.Log.Level).Handler(), seen}), reg)
	if err != nil {
		t.Fatalf("gateway.New: %v", err)
	}
	tg := &testGateway{Gateway: gw, Cfg: cfg, Reg: reg}
	tg.start(t)
	return tg, seen
}

// cloudSinkConfig is testConfig with the gateway id and one MQTT sink to the upstream broker at url, with commands
// disabled when disable is set. Each call makes a configuration of its own (the sink's MQTT block is a pointer).
func cloudSinkConfig(cfg gateway.Config, id, url string, disable bool) gateway.Config {
	cfg.ID = id
	cfg.Forward.Sinks = []forward.SinkConfig{{
		Name: "cloud", Type: forward.TypeMQTT,
		BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
		MQTT: &forward.MQTTConfig{URL: url, ConnectTimeout: time.Second, DisableCommands: disable},
	}}
	return cfg
}

func waitSinkConnected(t *testing.T, gw *testGateway) {
	t.Helper()
	waitFor(t, 10*time.Second, "the cloud sink connected", func() bool {
		return metricSum(t, gw.Reg, "edgegate_forward_connected", map[string]string{"sink": "cloud"}) == 1
	})
}

// allDeadLetters returns every dead letter of gw.
func allDeadLetters(t *testing.T, gw *testGateway) []string {
	t.Helper()
	recs, err := gw.DeadLetters().List(0, 1000)
	if err != nil {
		t.Fatalf("list dead letters: %v", err)
	}
	var out []string
	for _, r := range recs {
		out = append(out, r.Reason+" "+r.Topic+" "+r.Detail)
	}
	return out
}

// TestCloudCommandWaitsForDeviceAfterRestart: a command published upstream while the gateway is stopped waits in
// the sink's persistent session; when the gateway starts, the sink receives it before the device has reconnected
// (the sinks start before the local broker). It is held, not dead-lettered, and reaches the device once it
// connects and subscribes. It is acknowledged upstream then: the next start of the gateway does not bring it
// again.
func TestCloudCommandWaitsForDeviceAfterRestart(t *testing.T) {
	t.Parallel()
	const gwID = "gw-hold"
	cloud := mosquittotest.Start(t)
	cfg := cloudSinkConfig(testConfig(t), gwID, cloud.URL(), false)
	cfg.MQTT.CommandTimeout = 2 * time.Second

	gw := runGateway(t, cfg) // makes the sink's session and its command subscription
	waitSinkConnected(t, gw)
	gw.stop()

	app := connectClient(t, cloud.Addr(), "cloud-app", "", "")
	const cmdTopic, payload = "edgegate/" + gwID + "/commands/kitchen-light-1/lights.on", `{"on":true,"while":"away"}`
	publish(t, app, cmdTopic, 1, payload)

	gw, seen := runWatchedGateway(t, cfg)
	waitFor(t, 10*time.Second, "the command taken from the session (held or dead-lettered)", func() bool {
		return seen.has("command held until its device connects") || len(allDeadLetters(t, gw)) > 0
	})
	if dl := allDeadLetters(t, gw); len(dl) != 0 {
		t.Fatalf("the command for the device not yet connected was dead-lettered: %q", dl)
	}

	light := subscribe(t, connectDevice(t, gw.MQTTAddr("tcp"), "kitchen-light-1"), "devices/kitchen-light-1/commands/#")
	got := light.waitLen(t, 1, 15*time.Second)
	if want := "devices/kitchen-light-1/commands/lights.on"; got[0].Topic != want || string(got[0].Payload) != payload {
		t.Errorf("the light received %s %s, want %s %s", got[0].Topic, got[0].Payload, want, payload)
	}
	if dl := allDeadLetters(t, gw); len(dl) != 0 {
		t.Errorf("dead letters: %q", dl)
	}
	// The sink acknowledges the command upstream as the device's PUBACK comes in, then logs its delivery.
	waitFor(t, 10*time.Second, "the delivery logged", func() bool { return seen.has("command delivered") })
	gw.stop()

	// Acknowledged upstream once delivered: a further start brings only what is published afterwards.
	gw = runGateway(t, cfg)
	light = subscribe(t, connectDevice(t, gw.MQTTAddr("tcp"), "kitchen-light-1"), "devices/kitchen-light-1/commands/#")
	waitSinkConnected(t, gw)
	publish(t, app, "edgegate/"+gwID+"/commands/kitchen-light-1/lights.off", 1, `{"on":false}`)
	got = light.waitLen(t, 1, 15*time.Second)
	if len(got) != 1 || got[0].Topic != "devices/kitchen-light-1/commands/lights.off" {
		var have []string
		for _, m := range got {
			have = append(have, m.Topic+" "+string(m.Payload))
		}
		t.Errorf("after a further start the light received %q, want only lights.off", have)
	}
}

// TestCloudCommandsDisabledStayAtBroker: with disable_commands the gateway takes no commands from its persistent
// session. One queued there from before is left at the broker (not dead-lettered, not delivered) and reaches the
// device once commands are enabled again; the session's command subscription is removed, so a command published
// while commands are disabled is not queued for the gateway.
func TestCloudCommandsDisabledStayAtBroker(t *testing.T) {
	t.Parallel()
	const gwID = "gw-off"
	cloud := mosquittotest.Start(t)
	base := testConfig(t)
	enabled := cloudSinkConfig(base, gwID, cloud.URL(), false)
	disabled := cloudSinkConfig(base, gwID, cloud.URL(), true)
	cmdTopic := func(command string) string { return "edgegate/" + gwID + "/commands/kitchen-light-1/" + command }
	app := connectClient(t, cloud.Addr(), "cloud-app", "", "")

	gw := runGateway(t, enabled)
	waitSinkConnected(t, gw)
	gw.stop()
	publish(t, app, cmdTopic("queued"), 1, `{"n":1}`) // waits in the session

	gw, seen := runWatchedGateway(t, disabled)
	light := subscribe(t, connectDevice(t, gw.MQTTAddr("tcp"), "kitchen-light-1"), "devices/kitchen-light-1/commands/#")
	waitSinkConnected(t, gw)
	waitFor(t, 10*time.Second, "the queued command taken from the session (left or dead-lettered)", func() bool {
		return seen.has("commands are disabled") || len(allDeadLetters(t, gw)) > 0
	})
	publish(t, app, cmdTopic("meanwhile"), 1, `{"n":2}`) // the sink is connected: its subscription is gone
	if dl := allDeadLetters(t, gw); len(dl) != 0 {
		t.Fatalf("commands were dead-lettered while disabled: %q", dl)
	}
	gw.stop()
	if got := light.all(); len(got) != 0 {
		t.Fatalf("the light received %d commands while commands were disabled", len(got))
	}

	gw = runGateway(t, enabled)
	light = subscribe(t, connectDevice(t, gw.MQTTAddr("tcp"), "kitchen-light-1"), "devices/kitchen-light-1/commands/#")
	waitSinkConnected(t, gw)
	publish(t, app, cmdTopic("marker"), 1, `{"n":3}`)
	waitFor(t, 15*time.Second, "the marker command", func() bool {
		return slices.ContainsFunc(light.all(), func(m message) bool { return strings.HasSuffix(m.Topic, "/marker") })
	})
	var have []string
	for _, m := range light.all() {
		have = append(have, m.Topic+" "+string(m.Payload))
	}
	want := []string{
		"devices/kitchen-light-1/commands/queued " + `{"n":1}`,
		"devices/kitchen-light-1/commands/marker " + `{"n":3}`,
	}
	if !slices.Equal(have, want) {
		t.Errorf("the light received %q, want %q", have, want)
	}
	if dl := allDeadLetters(t, gw); len(dl) != 0 {
		t.Errorf("dead letters: %q", dl)
	}
}
