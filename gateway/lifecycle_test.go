package gateway_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/deadletter"
	"github.com/edgegate/edgegate/gateway"
)

// partNames are the parts Run runs, as it names them.
var partNames = []string{"buffer", "forward", "rules", "ingest"}

// running is one call of Run made by runWrapped.
type running struct {
	cancel context.CancelFunc
	done   chan struct{} // closed when Run has returned, with err
	err    error
}

// wait waits up to timeout for Run to return and reports whether it did.
func (r *running) wait(timeout time.Duration) bool {
	select {
	case <-r.done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// runWrapped makes a gateway on cfg whose parts run through wrap (see gateway.WrapParts), runs it and waits until
// it is ready. Run is cancelled, and waited for, when the test ends.
func runWrapped(t *testing.T, cfg gateway.Config, wrap func(string, func(context.Context) error) func(context.Context) error) (*testGateway, *running) {
	t.Helper()
	tg := newGateway(t, cfg)
	gateway.WrapParts(tg.Gateway, wrap)
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		r.err = tg.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		if !r.wait(cfg.ShutdownTimeout + 10*time.Second) {
			t.Errorf("gateway Run did not return at the end of the test")
		}
	})
	waitFor(t, 10*time.Second, "gateway ready", func() bool {
		select {
		case <-r.done:
			t.Fatalf("gateway Run returned early: %v", r.err)
		default:
		}
		return tg.Ready()
	})
	return tg, r
}

// checkStopped checks what a stopped gateway must have let go: the MQTT listener, the log and the dead-letter store.
func checkStopped(t *testing.T, tg *testGateway, mqttAddr string) {
	t.Helper()
	if c, err := net.DialTimeout("tcp", mqttAddr, time.Second); err == nil {
		c.Close()
		t.Errorf("after Run returned the MQTT listener %s still accepts connections", mqttAddr)
	}
	if err := tg.Log().Enqueue(buffer.Entry{Data: []byte(`{}`), Type: "x", Subject: "x", Time: time.Now()}); !errors.Is(err, buffer.ErrClosed) {
		t.Errorf("after Run returned the log takes an event (%v), want buffer.ErrClosed", err)
	}
	if _, err := tg.DeadLetters().List(0, 1); !errors.Is(err, deadletter.ErrClosed) {
		t.Errorf("after Run returned the dead-letter store is open (List: %v), want deadletter.ErrClosed", err)
	}
}

// checkLogClean opens the log of cfg's data dir and checks that the gateway closed it cleanly, with the event of
// type typ in it.
func checkLogClean(t *testing.T, cfg gateway.Config, typ string) {
	t.Helper()
	var out bytes.Buffer
	var mu sync.Mutex
	logger := slog.New(slog.NewTextHandler(&lockedWriter{mu: &mu, w: &out}, nil))
	l, err := buffer.OpenTool(buffer.Config{Path: filepath.Join(cfg.DataDir, "events.db")}, logger)
	if err != nil {
		t.Fatalf("open the log after the gateway stopped: %v", err)
	}
	defer l.Close()
	mu.Lock()
	opened := out.String()
	mu.Unlock()
	if !strings.Contains(opened, "clean=true") {
		t.Errorf("the gateway did not close its log cleanly:\n%s", opened)
	}
	if n := len(eventsOfType(logEvents(t, l), typ)); n != 1 {
		t.Errorf("the log holds %d %s events, want the acknowledged one", n, typ)
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.w.Write(p)
}

// TestRunOnce checks that a gateway runs once: a second Run, while the first runs or after it returned, is refused
// at once, and leaves the running gateway as it was.
func TestRunOnce(t *testing.T) {
	t.Parallel()
	gw := startGateway(t, nil)

	runAgain := func(what string) error {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- gw.Run(ctx) }()
		select {
		case err := <-done:
			if err == nil {
				t.Errorf("Run %s returned nil, want an error", what)
			}
			return err
		case <-time.After(5 * time.Second):
			t.Fatalf("Run %s did not return at once", what)
			return nil
		}
	}

	err := runAgain("while the gateway runs")
	mustContain(t, "the error", err.Error(), "gateway: run")
	// The running gateway is untouched: a device still gets its events in, dead letters are still kept.
	if !gw.Ready() {
		t.Error("a refused second Run made the running gateway not ready")
	}
	sensor := connectDevice(t, gw.MQTTAddr("tcp"), "hall-motion")
	publish(t, sensor, "devices/hall-motion/events/room.entered", 1, `{"room":"hall"}`)
	if n := len(eventsOfType(logEvents(t, gw.Log()), "room.entered")); n != 1 {
		t.Errorf("after a refused second Run the log holds %d room.entered events, want 1", n)
	}
	if _, err := gw.DeadLetters().List(0, 1); err != nil {
		t.Errorf("after a refused second Run the dead-letter store fails: %v", err)
	}
	sensor.Disconnect(100)
	gw.stop()

	err = runAgain("after the gateway stopped")
	mustContain(t, "the error", err.Error(), "gateway: run")
}

// TestPartFailureStopsGateway checks that when one part fails, by returning an error or by panicking, Run stops
// the others cleanly and returns an error that names it: the acknowledged events are in the log, which is closed
// cleanly, and the listener and the stores are released.
func TestPartFailureStopsGateway(t *testing.T) {
	t.Parallel()
	errBoom := errors.New("part broke")
	for _, name := range partNames {
		for _, how := range []string{"error", "panic"} {
			t.Run(name+" "+how, func(t *testing.T) {
				t.Parallel()
				cfg := testConfig(t)
				trigger := make(chan struct{})
				gw, r := runWrapped(t, cfg, func(part string, run func(context.Context) error) func(context.Context) error {
					if part != name {
						return run
					}
					return func(ctx context.Context) error {
						inner, cancel := context.WithCancel(ctx)
						defer cancel()
						res := make(chan error, 1)
						go func() { res <- run(inner) }()
						select {
						case <-trigger:
						case <-ctx.Done():
							return <-res
						}
						cancel()
						if err := <-res; err != nil {
							return err
						}
						if how == "panic" {
							panic("part broke")
						}
						return errBoom
					}
				})
				addr := gw.MQTTAddr("tcp")
				sensor := connectDevice(t, addr, "hall-motion")
				publish(t, sensor, "devices/hall-motion/events/room.entered", 1, `{"room":"hall"}`)

				close(trigger)
				if !r.wait(cfg.ShutdownTimeout + 3*time.Second) {
					t.Fatalf("Run did not return within shutdown_timeout %s after %s failed", cfg.ShutdownTimeout, name)
				}
				switch {
				case r.err == nil:
					t.Fatalf("Run returned nil after %s failed", name)
				case how == "error" && !errors.Is(r.err, errBoom):
					t.Errorf("Run returned %v, want the part's error", r.err)
				case how == "panic":
					mustContain(t, "Run's error", r.err.Error(), name, "panic", "part broke")
				}
				checkStopped(t, gw, addr)
				checkLogClean(t, cfg, "room.entered")
			})
		}
	}
}

// TestStopIsBoundedByShutdownTimeout checks a part that does not stop when told: Run still returns within about
// shutdown_timeout, with an error that names the part, after stopping the others (the log commits and closes);
// and what the part may still use, the dead-letter store, is not closed under it, but once it has returned.
func TestStopIsBoundedByShutdownTimeout(t *testing.T) {
	t.Parallel()
	for _, name := range partNames {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			cfg := testConfig(t)
			cfg.ShutdownTimeout = time.Second
			release := make(chan struct{})
			var releaseOnce sync.Once
			t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
			late := make(chan error, 1) // the stuck part's dead letter, written once it is released
			var tg *testGateway
			tg, r := runWrapped(t, cfg, func(part string, run func(context.Context) error) func(context.Context) error {
				if part != name {
					return run
				}
				return func(ctx context.Context) error {
					err := run(ctx)
					<-release // stuck in its stop
					if part != "buffer" {
						late <- tg.DeadLetters().Add(deadletter.Record{Reason: "late_write", Detail: "written by a part at its stop",
							DeviceID: "hall-motion", Topic: "devices/hall-motion/events/x", Payload: []byte("x")})
					}
					return err
				}
			})
			addr := tg.MQTTAddr("tcp")
			sensor := connectDevice(t, addr, "hall-motion")
			publish(t, sensor, "devices/hall-motion/events/room.entered", 1, `{"room":"hall"}`)
			sensor.Disconnect(100)

			start := time.Now()
			r.cancel()
			if !r.wait(cfg.ShutdownTimeout + 3*time.Second) {
				t.Fatalf("Run did not return within shutdown_timeout %s while %s did not stop", cfg.ShutdownTimeout, name)
			}
			t.Logf("Run returned after %s: %v", time.Since(start).Round(time.Millisecond), r.err)
			if r.err == nil {
				t.Fatalf("Run returned nil while %s had not stopped", name)
			}
			mustContain(t, "Run's error", r.err.Error(), name, "shutdown_timeout")
			if err := tg.Log().Enqueue(buffer.Entry{Data: []byte(`{}`), Type: "x", Subject: "x", Time: time.Now()}); !errors.Is(err, buffer.ErrClosed) {
				t.Errorf("after Run returned the log takes an event (%v), want buffer.ErrClosed", err)
			}

			releaseOnce.Do(func() { close(release) })
			if name != "buffer" {
				select {
				case err := <-late:
					if err != nil {
						t.Errorf("the dead-letter store was closed while %s still ran: its dead letter was lost: %v", name, err)
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("%s did not return once released", name)
				}
			}
			// Once the part has returned, the store is closed: nothing is left open.
			waitFor(t, 5*time.Second, "the dead-letter store closed", func() bool {
				_, err := tg.DeadLetters().List(0, 1)
				return errors.Is(err, deadletter.ErrClosed)
			})
			checkStopped(t, tg, addr)
			checkLogClean(t, cfg, "room.entered")
		})
	}
}
