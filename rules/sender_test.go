package rules

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// sendingCommander is a CommandSender: SendCommand records the send; its wait fails when waitErr is set.
type sendingCommander struct {
	*fakeCommander
	mu      sync.Mutex
	sends   int
	waits   int
	waitErr error
}

func (c *sendingCommander) SendCommand(device, command string, payload []byte) (func(context.Context) error, error) {
	c.mu.Lock()
	c.sends++
	c.mu.Unlock()
	return func(context.Context) error {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.waits++
		return c.waitErr
	}, nil
}

func (c *sendingCommander) counts() (sends, waits int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sends, c.waits
}

func newSendingEngine(t *testing.T, waitErr error) (*engineFixture, *sendingCommander) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"hall.yaml": hallLightRule})
	cfg.CommandRetries = 2
	cfg.CommandBackoff = time.Millisecond
	f := newEngine(t, cfg, homeDevices)
	sc := &sendingCommander{fakeCommander: f.cmd, waitErr: waitErr}
	f.e.deps.Commander = sc
	return f, sc
}

// The evaluation sends the first attempt itself; a worker only waits for the acknowledgement.
func TestEngineSendsFirstAttemptAtOnce(t *testing.T) {
	f, sc := newSendingEngine(t, nil)
	startEngine(t, f.e)
	f.e.Submit(newEvent("button.pressed", "b1", t0, nil))
	waitFor(t, 5*time.Second, "the command acknowledged", func() bool {
		return testutil.ToFloat64(f.e.met.actions.WithLabelValues("hall", "command", "ok")) == 1
	})
	if sends, waits := sc.counts(); sends != 1 || waits != 1 {
		t.Fatalf("SendCommand %d, wait %d times; want 1 and 1", sends, waits)
	}
	if n := f.cmd.count("hall-light"); n != 0 {
		t.Fatalf("Command called %d times for a command already sent", n)
	}
}

// When the device does not acknowledge the first attempt, the retries go through Command as before.
func TestEngineRetriesAfterSentAttemptFails(t *testing.T) {
	f, sc := newSendingEngine(t, errors.New("not acknowledged"))
	f.cmd.fail = map[string]bool{"hall-light": true}
	startEngine(t, f.e)
	f.e.Submit(newEvent("button.pressed", "b1", t0, nil))
	waitFor(t, 5*time.Second, "a dead letter", func() bool { return len(f.dl.all()) == 1 })
	if sends, waits := sc.counts(); sends != 1 || waits != 1 {
		t.Fatalf("SendCommand %d, wait %d times; want 1 and 1", sends, waits)
	}
	if n := f.cmd.count("hall-light"); n != 2 {
		t.Fatalf("%d retries through Command, want 2", n)
	}
	if d := f.dl.all()[0]; !strings.Contains(d.detail, "3 attempt(s)") {
		t.Fatalf("dead letter detail %q", d.detail)
	}
}

// blockingSender is a CommandSender whose first command's wait blocks until its context ends (never
// acknowledged); every later command counts as acknowledged by its device.
type blockingSender struct {
	*fakeCommander
	mu    sync.Mutex
	sends int
}

func (c *blockingSender) SendCommand(device, command string, payload []byte) (func(context.Context) error, error) {
	c.mu.Lock()
	c.sends++
	first := c.sends == 1
	c.mu.Unlock()
	return func(ctx context.Context) error {
		if first {
			<-ctx.Done()
			return ctx.Err()
		}
		return nil
	}, nil
}

// lightRule commands the light the event names (data.light).
const lightRule = `
rules:
  - name: light
    on: button.pressed
    actions:
      - command: {device: '{{ data.light }}', command: lights.on, payload: '{"i":{{ data.i }}}'}
`

// TestEngineStopKeepsAcknowledgedCommands: at stop, the commands evaluations sent that wait behind a busy worker
// and that their device acknowledged are delivered, not dead letters "not delivered".
func TestEngineStopKeepsAcknowledgedCommands(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"light.yaml": lightRule})
	cfg.CommandWorkers = 1
	f := newEngine(t, cfg, homeDevices)
	sc := &blockingSender{fakeCommander: f.cmd}
	f.e.deps.Commander = sc
	stop := startEngine(t, f.e)
	for i, light := range []string{"hall-light", "kitchen-light-1", "kitchen-light-2"} {
		f.e.Submit(newEvent("button.pressed", "b1", t0, map[string]any{"i": i, "light": light}))
	}
	f.waitEvaluated(t, "light", 3)
	stop()
	if ok, failed := testutil.ToFloat64(f.e.met.actions.WithLabelValues("light", "command", "ok")),
		testutil.ToFloat64(f.e.met.actions.WithLabelValues("light", "command", "failed")); ok != 2 || failed != 1 {
		t.Errorf("commands ok %v, failed %v; want 2 and 1 (the one never acknowledged)", ok, failed)
	}
	if dl := f.dl.all(); len(dl) != 1 {
		t.Errorf("%d dead letters, want 1: %v", len(dl), dl)
	}
}

// offlineCommander is a Commander whose device is not connected for its first offline calls.
type offlineCommander struct {
	mu             sync.Mutex
	calls, offline int
}

func (c *offlineCommander) Command(ctx context.Context, device, command string, payload []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	if c.calls <= c.offline {
		return fmt.Errorf("%w: %s", ErrDeviceOffline, device)
	}
	return nil
}

// TestEngineWaitsForOfflineDevice: a command for a device that is not connected yet (it comes back a moment
// after the gateway starts) is tried again without spending its retries, and delivered once the device is there.
func TestEngineWaitsForOfflineDevice(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"hall.yaml": hallLightRule})
	cfg.CommandRetries = 1
	cfg.CommandBackoff = time.Millisecond
	f := newEngine(t, cfg, homeDevices)
	oc := &offlineCommander{offline: 5}
	f.e.deps.Commander = oc
	startEngine(t, f.e)
	f.e.Submit(newEvent("button.pressed", "b1", t0, nil))
	waitFor(t, 10*time.Second, "the command delivered", func() bool {
		return testutil.ToFloat64(f.e.met.actions.WithLabelValues("hall", "command", "ok")) == 1
	})
	if dl := f.dl.all(); len(dl) != 0 {
		t.Fatalf("dead letters %v, want none", dl)
	}
}

// flakySender is a CommandSender whose sends are never acknowledged (the device is not there yet); Command, the
// retries, works.
type flakySender struct {
	*fakeCommander
	mu    sync.Mutex
	sends []string
}

func (c *flakySender) SendCommand(device, command string, payload []byte) (func(context.Context) error, error) {
	c.mu.Lock()
	c.sends = append(c.sends, string(payload))
	c.mu.Unlock()
	return func(context.Context) error { return fmt.Errorf("%w: %s", ErrDeviceOffline, device) }, nil
}

// TestEngineCommandsToOneDeviceInOrder: a command to a device waits for the earlier ones to it, retries
// included: its first attempt is not sent while one of them is still to be delivered. Otherwise "on" retried
// after a later "off" went through would leave the light on. Another device's commands do not wait.
func TestEngineCommandsToOneDeviceInOrder(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"light.yaml": lightRule})
	cfg.CommandBackoff = 250 * time.Millisecond // far longer than the four evaluations take
	f := newEngine(t, cfg, homeDevices)
	sc := &flakySender{fakeCommander: f.cmd}
	f.e.deps.Commander = sc
	startEngine(t, f.e)
	for i, light := range []string{"hall-light", "hall-light", "kitchen-light-1", "hall-light"} {
		f.e.Submit(newEvent("button.pressed", "b1", t0, map[string]any{"i": i, "light": light}))
	}
	waitFor(t, 10*time.Second, "every command delivered", func() bool {
		return testutil.ToFloat64(f.e.met.actions.WithLabelValues("light", "command", "ok")) == 4
	})
	var hall []string
	for _, c := range f.cmd.list() {
		if strings.HasPrefix(c, "hall-light ") {
			hall = append(hall, c)
		}
	}
	want := []string{`hall-light lights.on {"i":0}`, `hall-light lights.on {"i":1}`, `hall-light lights.on {"i":3}`}
	if strings.Join(hall, "|") != strings.Join(want, "|") {
		t.Errorf("hall-light got %q, want %q", hall, want)
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if got := strings.Join(sc.sends, " "); got != `{"i":0} {"i":2}` {
		t.Errorf("first attempts sent by the evaluations: %s; want those of the first command to each device", got)
	}
}

// TestEngineDeviceThatTakesNothingDoesNotFillTheQueue: the commands to a device that takes none wait in its lane up
// to a bound; beyond it they are dead letters at once, and the other devices' commands still go out.
func TestEngineDeviceThatTakesNothingDoesNotFillTheQueue(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"light.yaml": lightRule})
	cfg.CommandQueueSize = maxLaneWaiting + 8
	f := newEngine(t, cfg, homeDevices)
	f.cmd.block = make(chan struct{}) // no command completes until the test ends
	defer close(f.cmd.block)
	startEngine(t, f.e)
	const n = maxLaneWaiting + 10
	for i := range n {
		f.e.Submit(newEvent("button.pressed", "b1", t0, map[string]any{"i": i, "light": "hall-light"}))
		if i == 0 {
			waitFor(t, 5*time.Second, "the first command in delivery", func() bool { return f.cmd.waiting.Load() == 1 })
		}
	}
	f.waitEvaluated(t, "light", n)
	// One in delivery, maxLaneWaiting waiting, the rest dead letters.
	waitFor(t, 5*time.Second, "the overflow dead-lettered", func() bool { return len(f.dl.all()) == n-1-maxLaneWaiting })
	for _, d := range f.dl.all() {
		if !strings.Contains(d.detail, "earlier commands to the device wait for it") {
			t.Fatalf("dead letter %+v", d)
		}
	}
	// The queue has room for another device, whose command is delivered (its attempt waits on the same blocked
	// commander, so it is seen waiting).
	f.e.Submit(newEvent("button.pressed", "b1", t0, map[string]any{"i": n, "light": "kitchen-light-1"}))
	waitFor(t, 5*time.Second, "the other device's command tried", func() bool { return f.cmd.waiting.Load() == 2 })
}
