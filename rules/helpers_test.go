package rules

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/goccy/go-yaml"

	"github.com/edgegate/edgegate/internal/eventually"
)

// t0 is the start of simulated time in tests.
var t0 = time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC)

// testDirectory is a Directory over a fixed list (the same selection rules as the device registry).
type testDirectory struct{ devs []Device }

func (d testDirectory) Device(id string) (Device, bool) {
	for _, dev := range d.devs {
		if dev.ID == id {
			return dev, true
		}
	}
	return Device{}, false
}

func (d testDirectory) Select(sel map[string]string) []Device {
	var out []Device
	for _, dev := range d.devs {
		ok := true
		for k, want := range sel {
			var got string
			var has bool
			switch k {
			case "id":
				got, has = dev.ID, true
			case "name":
				got, has = dev.Name, true
			case "room":
				got, has = dev.Room, true
			case "kind":
				got, has = dev.Kind, true
			default:
				got, has = dev.Labels[strings.TrimPrefix(k, "labels.")]
			}
			if !has || got != want {
				ok = false
				break
			}
		}
		if ok {
			out = append(out, dev)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// shippedDevices reads configs/devices.yaml (metadata only) so tests see the devices the project ships.
func shippedDevices(t testing.TB) testDirectory {
	t.Helper()
	b, err := os.ReadFile("../configs/devices.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Devices []struct {
			ID     string            `yaml:"id"`
			Name   string            `yaml:"name"`
			Room   string            `yaml:"room"`
			Kind   string            `yaml:"kind"`
			Labels map[string]string `yaml:"labels"`
		} `yaml:"devices"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	var d testDirectory
	for _, x := range f.Devices {
		d.devs = append(d.devs, Device{ID: x.ID, Name: x.Name, Room: x.Room, Kind: x.Kind, Labels: x.Labels})
	}
	return d
}

// homeDevices is a small fixed directory for table tests.
var homeDevices = testDirectory{devs: []Device{
	{ID: "kitchen-motion", Room: "kitchen", Kind: "motion-sensor", Labels: map[string]string{"floor": "0"}},
	{ID: "kitchen-light-1", Room: "kitchen", Kind: "light", Labels: map[string]string{"floor": "0"}},
	{ID: "kitchen-light-2", Room: "kitchen", Kind: "light", Labels: map[string]string{"floor": "0"}},
	{ID: "hall-motion", Room: "hall", Kind: "motion-sensor", Labels: map[string]string{"floor": "0"}},
	{ID: "hall-light", Room: "hall", Kind: "light", Labels: map[string]string{"floor": "0"}},
	{ID: "thermo-1", Room: "living-room", Kind: "thermometer", Labels: map[string]string{"floor": "1"}},
	{ID: "door-1", Room: "hall", Kind: "door"},
}}

var evSeq atomic.Int64

// newEvent builds a device event; data is JSON-encoded unless it is []byte or nil.
func newEvent(typ, subject string, at time.Time, data any) *event.Event {
	ev := event.New()
	ev.SetID(fmt.Sprintf("ev-%d", evSeq.Add(1)))
	ev.SetSource("/gateways/gw-1/devices/" + subject)
	ev.SetType(typ)
	ev.SetSubject(subject)
	ev.SetTime(at)
	switch d := data.(type) {
	case nil:
	case []byte:
		_ = ev.SetData("text/plain", d)
	default:
		_ = ev.SetData(event.ApplicationJSON, d)
	}
	return &ev
}

// writeRules writes files into a fresh directory and returns it.
func writeRules(t testing.TB, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// rec records what a machine decides (sink) and why (tracer).
type rec struct {
	mu     sync.Mutex
	acts   []string
	emits  []*event.Event
	notes  []string
	errs   []string
	states map[string]map[string]any
}

func (r *rec) command(ru *rule, _ *event.Event, device, command string, payload []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.acts = append(r.acts, fmt.Sprintf("%s: command %s %s %s", ru.name, device, command, payload))
}

func (r *rec) emit(ru *rule, ev *event.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.acts = append(r.acts, fmt.Sprintf("%s: emit %s %s", ru.name, ev.Type(), ev.Data()))
	r.emits = append(r.emits, ev)
}

func (r *rec) state(ru *rule, device, key string, value any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	b, _ := json.Marshal(value)
	r.acts = append(r.acts, fmt.Sprintf("%s: state %s %s=%s", ru.name, device, key, b))
	if r.states == nil {
		r.states = map[string]map[string]any{}
	}
	if r.states[device] == nil {
		r.states[device] = map[string]any{}
	}
	r.states[device][key] = value
}

func (r *rec) Set(device, key string, value any) {}
func (r *rec) Get(device string) (map[string]any, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.states[device]
	return s, ok
}

func (r *rec) noMatch(ru *rule, why string) { r.notes = append(r.notes, ru.name+": no match: "+why) }
func (r *rec) note(ru *rule, msg string)    { r.notes = append(r.notes, ru.name+": "+msg) }
func (r *rec) failed(ru *rule, err error)   { r.errs = append(r.errs, ru.name+": "+err.Error()) }

func (r *rec) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	a := r.acts
	r.acts = nil
	return a
}

// newMachine compiles one rule file and returns a machine that records into a rec.
func newMachine(t testing.TB, src string, dir Directory) (*machine, *rec) {
	t.Helper()
	rules, _, err := parseRules("test.yaml", []byte(src), dir)
	if err != nil {
		t.Fatal(err)
	}
	r := &rec{}
	n := 0
	m := &machine{dir: dir, store: r, sink: r, tr: r, source: DefaultSource, maxDepth: DefaultMaxChainDepth,
		newID: func() string { n++; return fmt.Sprintf("derived-%d", n) }}
	m.install(newRuleSet(rules))
	return m, r
}

// step is one input of a simulated run: an event at an offset from t0, or (ev nil) just a clock move.
type step struct {
	at   time.Duration
	ev   *event.Event
	want []string // actions expected right after this step (nil = none)
}

// runSteps feeds steps through m on simulated time and checks the actions after each step.
func runSteps(t *testing.T, m *machine, r *rec, steps []step) {
	t.Helper()
	for i, s := range steps {
		now := t0.Add(s.at)
		m.advance(now)
		if s.ev != nil {
			m.handle(s.ev, now)
		}
		got := r.take()
		if strings.Join(got, "\n") != strings.Join(s.want, "\n") {
			t.Fatalf("step %d (+%s): actions\n got: %q\nwant: %q\nnotes: %q\nerrors: %q", i, s.at, got, s.want, r.notes, r.errs)
		}
	}
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	eventually.True(t, timeout, what, cond)
}

// fakeCommander records commands; fail makes a device's commands fail.
type fakeCommander struct {
	mu      sync.Mutex
	sent    []string
	calls   map[string]int
	fail    map[string]bool
	block   chan struct{} // when set, every Command waits for it (or ctx)
	waiting atomic.Int32  // Commands waiting for block
}

func (c *fakeCommander) Command(ctx context.Context, device, command string, payload []byte) error {
	if c.block != nil {
		c.waiting.Add(1)
		defer c.waiting.Add(-1)
		select {
		case <-c.block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.calls == nil {
		c.calls = map[string]int{}
	}
	c.calls[device]++
	if c.fail[device] {
		return fmt.Errorf("device %s not connected", device)
	}
	c.sent = append(c.sent, fmt.Sprintf("%s %s %s", device, command, payload))
	return nil
}

func (c *fakeCommander) list() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.sent...)
}

func (c *fakeCommander) count(device string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls[device]
}

type deadLetter struct{ reason, detail, device, topic, payload string }

type fakeDeadLetters struct {
	mu   sync.Mutex
	list []deadLetter
}

func (d *fakeDeadLetters) DeadLetter(reason, detail, device, topic string, payload []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.list = append(d.list, deadLetter{reason, detail, device, topic, string(payload)})
}

func (d *fakeDeadLetters) all() []deadLetter {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]deadLetter(nil), d.list...)
}

// memStore is a concurrent StateStore.
type memStore struct {
	mu    sync.Mutex
	m     map[string]map[string]any
	n     int
	block chan struct{} // when set, Set waits until it is closed
}

func (s *memStore) Set(device, key string, value any) {
	s.mu.Lock()
	block := s.block
	s.mu.Unlock()
	if block != nil {
		<-block
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]map[string]any{}
	}
	if s.m[device] == nil {
		s.m[device] = map[string]any{}
	}
	s.m[device][key] = value
	s.n++
}

func (s *memStore) Get(device string) (map[string]any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.m[device]
	if !ok {
		return nil, false
	}
	out := make(map[string]any, len(v))
	for k, x := range v {
		out[k] = x
	}
	return out, true
}

func (s *memStore) sets() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// loopEmitter submits derived events back into the engine, like the gateway's log does.
type loopEmitter struct {
	mu     sync.Mutex
	e      *Engine
	events []*event.Event
	err    error
}

func (l *loopEmitter) Emit(_ context.Context, ev *event.Event) error {
	l.mu.Lock()
	if l.err != nil {
		l.mu.Unlock()
		return l.err
	}
	l.events = append(l.events, ev)
	e := l.e
	l.mu.Unlock()
	if e != nil {
		e.Submit(ev)
	}
	return nil
}

func (l *loopEmitter) all() []*event.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*event.Event(nil), l.events...)
}
