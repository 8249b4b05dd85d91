package rules

import (
	"context"
	"errors"
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
