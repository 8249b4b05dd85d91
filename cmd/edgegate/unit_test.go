package main

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/internal/eventually"
)

// TestSystemdUnit checks the shipped unit: readiness by sd_notify, restart on failure, a state directory, a
// dedicated user and the usual hardening; and, where systemd-analyze exists, that systemd accepts it.
func TestSystemdUnit(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(repo, "systemd/edgegate.service"))
	if err != nil {
		t.Fatal(err)
	}
	unit := string(raw)
	for _, want := range []string{"Type=notify", "WatchdogSec=30s", "Restart=on-failure", "StateDirectory=edgegate", "User=edgegate",
		"NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
		"ExecStart=/usr/local/bin/edgegate run --config /etc/edgegate/edgegate.yaml", "ExecReload=/bin/kill -HUP $MAINPID"} {
		if !strings.Contains(unit, "\n"+want+"\n") {
			t.Errorf("unit lacks %q", want)
		}
	}
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze not installed (scripts/test.sh installs systemd): %v", err)
	}
	// Verify a copy whose ExecStart names the binary built here (verify checks that it is executable).
	path := filepath.Join(t.TempDir(), "edgegate.service")
	unit = strings.Replace(unit, "/usr/local/bin/edgegate", binary(t), 1)
	if err := os.WriteFile(path, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, analyze, "verify", path).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	// verify exits 0 on directives it ignores; it names the file in every complaint about it.
	if strings.Contains(string(out), path) {
		t.Fatalf("systemd-analyze verify complains:\n%s", out)
	}
}

// TestPrintStatus checks the status table for each sink state, a sink the log has no cursor for, a line break in
// an error and a cursor no sink uses.
func TestPrintStatus(t *testing.T) {
	now := time.Date(2026, 1, 2, 12, 0, 0, 0, time.UTC)
	ago := func(d time.Duration) time.Time { return now.Add(-d) }
	st := gateway.Status{
		ID: "gw", Ready: true, Uptime: "1h0m0s", Clients: 3, Devices: 9,
		Problems: []string{"sink b unhealthy: stalled"},
		Backlog: buffer.Stats{Events: 42, Bytes: 3 << 20, MaxBytes: 1 << 30, Oldest: ago(2 * time.Hour), Full: true,
			Cursors: []buffer.CursorStats{
				{Name: "sink:a", Required: true, Backlog: 0},
				{Name: "sink:b", Required: true, Backlog: 40, OldestUnacked: ago(90 * time.Minute)},
				{Name: "sink:c", Required: true, Backlog: 2, OldestUnacked: ago(5 * time.Second)},
				{Name: "sink:old", Backlog: 42},
			}},
		Sinks: []forward.SinkHealth{
			{Name: "a", Type: "http", Target: "https://x/in", Connected: true, Healthy: true, LastAck: ago(time.Second)},
			{Name: "b", Type: "mqtt", Target: "tcp://y:1883", Connected: true, Stalled: true, InFlight: 256,
				LastError: "no ack\nwithin 10s", LastErrorTime: ago(3 * time.Minute)},
			{Name: "c", Type: "nats", Target: "nats://z:4222", Stalled: true, LastError: "eof"},
			{Name: "d", Type: "nats", Target: "nats://z:4222"},
		},
	}
	var b strings.Builder
	if err := printStatus(&b, st, now); err != nil {
		t.Fatal(err)
	}
	want := `gateway gw  ready=true healthy=false uptime=1h0m0s clients=3 devices=9
  problem: sink b unhealthy: stalled
log: 42 events, 3.0 MiB of 1.0 GiB, oldest 2026-01-02T10:00:00Z (2h0m0s ago), FULL: new events are refused
SINK  TYPE  TARGET         STATE                              BACKLOG  OLDEST WAITING  IN FLIGHT  LAST ACK  LAST ERROR
a     http  https://x/in   healthy                            0        -               0          1s ago    -
b     mqtt  tcp://y:1883   unhealthy (stalled)                40       1h30m0s ago     256        never     3m0s ago: no ack within 10s
c     nats  nats://z:4222  unhealthy (stalled, disconnected)  2        5s ago          0          never     eof
d     nats  nats://z:4222  unhealthy (disconnected)           ?        -               0          never     -
cursor sink:old (no sink; holds no events): backlog 42
`
	if b.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", b.String(), want)
	}

	b.Reset()
	if err := printStatus(&b, gateway.Status{ID: "gw", Healthy: true}, now); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "log: 0 events, 0 B\nsinks: none configured\n") {
		t.Errorf("without sinks:\n%s", b.String())
	}
}

// TestFeedWatchdog: the watchdog is notified every interval while no part stalls, not at all while one does (the
// stall is logged once), and again once the stall is over.
func TestFeedWatchdog(t *testing.T) {
	var stalled atomic.Bool
	var fed, checks atomic.Int64
	var logs messages
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		feedWatchdog(ctx, 5*time.Millisecond, func() []string {
			checks.Add(1)
			if stalled.Load() {
				return []string{"buffer: a commit of the log has been running for 2m0s"}
			}
			return nil
		}, func() error { fed.Add(1); return nil }, slog.New(&logs))
	}()
	defer func() { cancel(); <-done }()

	if !eventually.Within(10*time.Second, func() bool { return fed.Load() >= 3 }) {
		t.Fatalf("%d notifications, want one every 5ms", fed.Load())
	}
	stalled.Store(true)
	if !eventually.Within(10*time.Second, func() bool { return strings.Contains(logs.String(), "stalled") }) {
		t.Fatalf("no stall logged:\n%s", logs.String())
	}
	n, c := fed.Load(), checks.Load()
	if !eventually.Within(10*time.Second, func() bool { return checks.Load() >= c+10 }) {
		t.Fatalf("the feeder stopped checking for stalls")
	}
	if got := fed.Load(); got != n {
		t.Fatalf("%d notifications over ten checks while stalled", got-n)
	}
	if c := strings.Count(logs.String(), "ERROR "); c != 1 {
		t.Fatalf("the stall was logged %d times, want once:\n%s", c, logs.String())
	}
	stalled.Store(false)
	if !eventually.Within(10*time.Second, func() bool { return fed.Load() >= n+3 }) {
		t.Fatalf("%d notifications after the stall ended, want one every 5ms", fed.Load()-n)
	}
	if !strings.Contains(logs.String(), "no longer stalled") {
		t.Fatalf("the end of the stall is not logged:\n%s", logs.String())
	}
}

// messages is a slog handler that keeps each record as "LEVEL message".
type messages struct {
	mu   sync.Mutex
	list []string
}

func (m *messages) Enabled(context.Context, slog.Level) bool { return true }
func (m *messages) WithAttrs([]slog.Attr) slog.Handler       { return m }
func (m *messages) WithGroup(string) slog.Handler            { return m }
func (m *messages) Handle(_ context.Context, r slog.Record) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.list = append(m.list, r.Level.String()+" "+r.Message)
	return nil
}

func (m *messages) String() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return strings.Join(m.list, "\n")
}
