package gateway_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/crypto/bcrypt"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/internal/eventually"
)

// shippedRegistry is the demo device registry the project ships (passwords: "{id}-pw").
var shippedRegistry = filepath.Join("..", "configs", "devices.yaml")

// hashLine is a password hash of the shipped registry with the password documented in its comment.
var hashLine = regexp.MustCompile(`password_hash: "([^"]+)" # (\S+)`)

// fastRegistry writes the shipped registry with every documented password re-hashed at bcrypt's lowest cost, so
// that logins stay cheap under -race (a cost-10 check takes more than a second there). Everything else — ids,
// metadata, grants — is the shipped file's. The hashes of the devices named in keep stay as shipped.
func fastRegistry(t testing.TB, keep ...string) string {
	t.Helper()
	data, err := os.ReadFile(shippedRegistry)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	var hashErr error
	out := hashLine.ReplaceAllFunc(data, func(line []byte) []byte {
		m := hashLine.FindSubmatch(line)
		if slices.Contains(keep, strings.TrimSuffix(string(m[2]), "-pw")) {
			return line
		}
		h, err := bcrypt.GenerateFromPassword(m[2], bcrypt.MinCost)
		if err != nil {
			hashErr = err
		}
		n++
		return fmt.Appendf(nil, "password_hash: %q # %s", h, m[2])
	})
	if hashErr != nil || n == 0 {
		t.Fatalf("re-hash %s: %d hashes, %v", shippedRegistry, n, hashErr)
	}
	path := filepath.Join(t.TempDir(), "devices.yaml")
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// testGateway is one in-process gateway started by startGateway.
type testGateway struct {
	*gateway.Gateway
	Cfg  gateway.Config
	Reg  *prometheus.Registry
	stop func() // idempotent: cancels Run and checks it returns nil within the shutdown timeout
}

// testConfig returns the defaults with everything a test must not share: its own data dir, free loopback ports,
// the shipped registry (with cheap hashes, see fastRegistry) and an empty rules directory.
func testConfig(t testing.TB) gateway.Config {
	t.Helper()
	cfg := gateway.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.ShutdownTimeout = 5 * time.Second
	cfg.MQTT.Listen = "127.0.0.1:0"
	cfg.HTTP.Listen = "127.0.0.1:0"
	cfg.Devices.Registry = fastRegistry(t)
	cfg.Rules.Dir = t.TempDir()
	cfg.Log.Level = "debug"
	return cfg
}

// startGateway starts a gateway on testConfig, changed by mutate, and stops it when the test ends.
func startGateway(t testing.TB, mutate func(*gateway.Config)) *testGateway {
	t.Helper()
	cfg := testConfig(t)
	if mutate != nil {
		mutate(&cfg)
	}
	return runGateway(t, cfg)
}

// runGateway runs a gateway on cfg as it is (used again on the same data dir to test restarts). It returns once
// the gateway is ready. The logs are shown when the test fails.
func runGateway(t testing.TB, cfg gateway.Config) *testGateway {
	t.Helper()
	tg := newGateway(t, cfg)
	tg.start(t)
	return tg
}

// newGateway makes a gateway with gateway.New and does not run it.
func newGateway(t testing.TB, cfg gateway.Config) *testGateway {
	t.Helper()
	reg := prometheus.NewRegistry()
	gw, err := gateway.New(cfg, testLogger(t, cfg.Log.Level), reg)
	if err != nil {
		t.Fatalf("gateway.New: %v", err)
	}
	return &testGateway{Gateway: gw, Cfg: cfg, Reg: reg}
}

// start runs the gateway until the test ends (or stop) and waits until it is ready.
func (tg *testGateway) start(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tg.Run(ctx) }()
	var once sync.Once
	tg.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("gateway Run returned %v, want nil", err)
				}
			case <-time.After(tg.Cfg.ShutdownTimeout + 5*time.Second):
				t.Errorf("gateway Run did not return within shutdown_timeout %s", tg.Cfg.ShutdownTimeout)
			}
		})
	}
	t.Cleanup(tg.stop)
	waitFor(t, 10*time.Second, "gateway ready", func() bool {
		select {
		case err := <-done:
			done <- err // for stop
			t.Fatalf("gateway Run returned early: %v", err)
		default:
		}
		return tg.Ready()
	})
}

// testLogger returns a logger at level (as in the config) that keeps everything in memory and prints it if the
// test fails.
func testLogger(t testing.TB, level string) *slog.Logger {
	t.Helper()
	lb := &lockedBuffer{}
	t.Cleanup(func() {
		lb.mu.Lock()
		defer lb.mu.Unlock()
		lb.closed = true
		if t.Failed() {
			t.Logf("gateway log:\n%s", lb.buf.String())
		}
	})
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		t.Fatalf("log level %q: %v", level, err)
	}
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: l}))
}

type lockedBuffer struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	closed bool
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.closed && b.buf.Len() < 8<<20 {
		b.buf.Write(p)
	}
	return len(p), nil
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	eventually.True(t, timeout, what, cond)
}

// writeRules writes a rule file into dir atomically (write, then rename), as an editor or deployment would.
func writeRules(t testing.TB, dir, name, content string) {
	t.Helper()
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

// readTestdata returns a file of testdata/.
func readTestdata(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// connectDevice connects a paho client as the demo device id (client id = username = id, password "{id}-pw").
func connectDevice(t testing.TB, addr, id string) paho.Client {
	t.Helper()
	return connectClient(t, addr, id, id, id+"-pw")
}

func connectClient(t testing.TB, addr, clientID, user, password string) paho.Client {
	t.Helper()
	return connectClientWith(t, addr, clientID, user, password, nil)
}

// connectClientWith connects as connectClient does, with the client options changed by mutate (if not nil).
func connectClientWith(t testing.TB, addr, clientID, user, password string, mutate func(*paho.ClientOptions)) paho.Client {
	t.Helper()
	opts := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(clientID).
		SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(10 * time.Second).SetWriteTimeout(5 * time.Second).SetKeepAlive(30 * time.Second)
	if user != "" {
		opts.SetUsername(user).SetPassword(password)
	}
	if mutate != nil {
		mutate(opts)
	}
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(20*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s to %s: %v", clientID, addr, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c
}

// publish sends a message and waits for its acknowledgement (QoS 1) or its write (QoS 0).
func publish(t testing.TB, c paho.Client, topic string, qos byte, payload string) {
	t.Helper()
	tok := c.Publish(topic, qos, false, payload)
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish %s: timed out or failed: %v", topic, tok.Error())
	}
}

// message is one message a test client received.
type message struct {
	Topic     string
	Payload   []byte
	At        time.Time
	QoS       byte
	Duplicate bool   // the DUP flag
	MessageID uint16 // the packet id (QoS > 0)
}

// inbox collects what a client receives on its subscriptions.
type inbox struct {
	mu   sync.Mutex
	msgs []message
}

func (in *inbox) handler(_ paho.Client, m paho.Message) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.msgs = append(in.msgs, message{Topic: m.Topic(), Payload: append([]byte(nil), m.Payload()...), At: time.Now(),
		QoS: m.Qos(), Duplicate: m.Duplicate(), MessageID: m.MessageID()})
}

func (in *inbox) all() []message {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]message(nil), in.msgs...)
}

// waitLen waits until the inbox holds at least n messages and returns them.
func (in *inbox) waitLen(t testing.TB, n int, timeout time.Duration) []message {
	t.Helper()
	waitFor(t, timeout, fmt.Sprintf("%d message(s)", n), func() bool { return len(in.all()) >= n })
	return in.all()
}

// subscribe subscribes c to filter (QoS 1) and returns the inbox collecting its messages.
func subscribe(t testing.TB, c paho.Client, filter string) *inbox {
	t.Helper()
	in := &inbox{}
	tok := c.Subscribe(filter, 1, in.handler)
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %s: %v", filter, tok.Error())
	}
	if st, ok := tok.(*paho.SubscribeToken); ok {
		for f, code := range st.Result() {
			if code >= 0x80 {
				t.Fatalf("subscribe %s: refused (code %#x)", f, code)
			}
		}
	}
	return in
}

// storedEvent is a CloudEvent as the log keeps it (structured JSON).
type storedEvent struct {
	Seq             uint64          `json:"-"`
	SpecVersion     string          `json:"specversion"`
	ID              string          `json:"id"`
	Source          string          `json:"source"`
	Type            string          `json:"type"`
	Subject         string          `json:"subject"`
	Time            time.Time       `json:"time"`
	DataContentType string          `json:"datacontenttype"`
	Data            json.RawMessage `json:"data"`
	Rule            string          `json:"rule"`
	CausationID     string          `json:"causationid"`
}

// logEvents reads every event in the log, in order.
func logEvents(t testing.TB, l *buffer.Log) []storedEvent {
	t.Helper()
	var out []storedEvent
	var after uint64
	for {
		recs, err := l.Read(after, 1000)
		if err != nil {
			t.Fatalf("read log: %v", err)
		}
		if len(recs) == 0 {
			return out
		}
		for _, r := range recs {
			var ev storedEvent
			if err := json.Unmarshal(r.Data, &ev); err != nil {
				t.Fatalf("log record %d is not CloudEvent JSON: %v: %s", r.Seq, err, r.Data)
			}
			ev.Seq = r.Seq
			out = append(out, ev)
			after = r.Seq
		}
	}
}

// eventsOfType filters events by type.
func eventsOfType(evs []storedEvent, typ string) []storedEvent {
	var out []storedEvent
	for _, e := range evs {
		if e.Type == typ {
			out = append(out, e)
		}
	}
	return out
}

// metricSum returns the sum of every series of a metric family in reg whose labels include want (0 if absent).
func metricSum(t testing.TB, reg prometheus.Gatherer, name string, want map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			for k, v := range want {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == k && lp.GetValue() == v {
						found = true
					}
				}
				if !found {
					continue series
				}
			}
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			case m.Untyped != nil:
				sum += m.Untyped.GetValue()
			}
		}
	}
	return sum
}

// httpGet fetches http://addr/path and returns the status and body.
func httpGet(t testing.TB, addr, path string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return resp.StatusCode, string(body)
}

// httpJSON fetches path and decodes its JSON body into v; it fails the test unless the status is want.
func httpJSON(t testing.TB, addr, path string, want int, v any) {
	t.Helper()
	code, body := httpGet(t, addr, path)
	if code != want {
		t.Fatalf("GET %s: status %d, want %d: %s", path, code, want, body)
	}
	if err := json.Unmarshal([]byte(body), v); err != nil {
		t.Fatalf("GET %s: body is not the expected JSON: %v\n%s", path, err, body)
	}
}

// mustContain fails the test unless s contains every one of subs.
func mustContain(t testing.TB, what, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Errorf("%s does not mention %q:\n%s", what, sub, s)
		}
	}
}
