package rules

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
)

// Device is the metadata of a device as the rules see it.
type Device struct {
	ID, Name, Room, Kind string
	Labels               map[string]string
}

// Directory looks devices up: by id, and by a selector whose keys are id, name, room, kind or "labels.X" and whose
// values must all be equal.
type Directory interface {
	Device(id string) (Device, bool)
	Select(sel map[string]string) []Device
}

// Commander sends a command to a device and returns once the device acknowledged it (or with an error on timeout
// or when the device is not connected: wrapping ErrDeviceOffline).
type Commander interface {
	Command(ctx context.Context, device, command string, payload []byte) error
}

// ErrDeviceOffline is what a Commander wraps when the device is not connected, or is but has not subscribed to
// its commands yet. The engine then tries the command again within a second (sooner while the backoff is shorter)
// rather than after the full backoff; until offlineHold after the engine started, those tries do not count against
// command_retries: after a start the devices come back one by one, while absences that fell due meanwhile fire at
// once. Later they count as any other.
var ErrDeviceOffline = errors.New("rules: device not connected")

// offlineHold is how long after a start commands wait for their devices to connect (see ErrDeviceOffline).
const offlineHold = 30 * time.Second

// CommandSender is a Commander that can also send a command at once and wait for its acknowledgement apart. With
// one, the engine sends a command's first attempt as the rule fires, and a command worker only waits for the
// acknowledgement (and retries): the command does not wait for a free worker.
type CommandSender interface {
	// SendCommand publishes the command; wait returns once the device acknowledged it, or why not. wait is
	// called exactly once.
	SendCommand(device, command string, payload []byte) (wait func(context.Context) error, err error)
}

// Emitter appends a derived event to the durable log; the event comes back to Submit like any other.
type Emitter interface {
	Emit(ctx context.Context, ev *event.Event) error
}

// StateStore is the gateway's per-device state view.
type StateStore interface {
	Set(device, key string, value any)
	Get(device string) (map[string]any, bool)
}

// EventState is a StateStore that the events themselves update before the rules see them, as the gateway's
// device state view does (reported fields, last_event, last_seen, online).
type EventState interface {
	StateStore
	Apply(ev *event.Event)
}

// DeadLetterer keeps what could not be delivered.
type DeadLetterer interface {
	DeadLetter(reason, detail, device, topic string, payload []byte)
}

// Stopper cancels a timer; Stop reports whether it stopped the timer before it fired.
type Stopper interface {
	Stop() bool
}

// Clock tells the time and runs functions later. SystemClock is the real one; SimClock is driven by hand.
type Clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) Stopper
}

// Deps are the parts the engine works with. Every field may be nil: without a Directory metadata matches fail and
// selectors pick no device, without a Commander, Emitter or StateStore those actions fail (counted), without
// DeadLetters undelivered commands are only counted and logged, and without a Clock the system clock is used.
type Deps struct {
	Directory   Directory
	Commander   Commander
	Emitter     Emitter
	State       StateStore
	DeadLetters DeadLetterer
	Clock       Clock
}

// SystemClock is the Clock of the machine (time.Now and time.AfterFunc).
type SystemClock struct{}

// Now returns time.Now().
func (SystemClock) Now() time.Time { return time.Now() }

// AfterFunc runs f in its own goroutine after d (time.AfterFunc).
func (SystemClock) AfterFunc(d time.Duration, f func()) Stopper { return time.AfterFunc(d, f) }

// SimClock is a Clock that moves only when Advance or Set is called; the functions that fall due run on the
// caller's goroutine, in time order. It is safe for concurrent use.
type SimClock struct {
	mu     sync.Mutex
	now    time.Time
	seq    uint64
	timers []*simTimer
}

type simTimer struct {
	c       *SimClock
	at      time.Time
	seq     uint64
	f       func()
	stopped bool
}

// NewSimClock returns a simulated clock showing t.
func NewSimClock(t time.Time) *SimClock { return &SimClock{now: t} }

// Now returns the simulated time.
func (c *SimClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// AfterFunc runs f when the clock has been advanced by at least d; with d <= 0 it runs f at once in its own
// goroutine, like time.AfterFunc.
func (c *SimClock) AfterFunc(d time.Duration, f func()) Stopper {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	t := &simTimer{c: c, at: c.now.Add(d), seq: c.seq, f: f}
	if d <= 0 {
		t.stopped = true
		go f()
		return t
	}
	c.timers = append(c.timers, t)
	return t
}

// Stop cancels the timer.
func (t *simTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	if t.stopped {
		return false
	}
	t.stopped = true
	for i, o := range t.c.timers {
		if o == t {
			t.c.timers = append(t.c.timers[:i], t.c.timers[i+1:]...)
			break
		}
	}
	return true
}

// Advance moves the clock forward by d, running every function that falls due.
func (c *SimClock) Advance(d time.Duration) { c.Set(c.Now().Add(d)) }

// Set moves the clock to t (never backwards), running every function that falls due, each with the clock showing
// its own due time.
func (c *SimClock) Set(t time.Time) {
	for {
		c.mu.Lock()
		var next *simTimer
		idx := -1
		for i, tm := range c.timers {
			if !tm.at.After(t) && (next == nil || tm.at.Before(next.at) || (tm.at.Equal(next.at) && tm.seq < next.seq)) {
				next, idx = tm, i
			}
		}
		if next == nil {
			if t.After(c.now) {
				c.now = t
			}
			c.mu.Unlock()
			return
		}
		c.timers = append(c.timers[:idx], c.timers[idx+1:]...)
		next.stopped = true
		if next.at.After(c.now) {
			c.now = next.at
		}
		c.mu.Unlock()
		next.f()
	}
}
