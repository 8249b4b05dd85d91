package rules

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// startEngine runs e until the test ends.
func startEngine(t *testing.T, e *Engine) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

type engineFixture struct {
	e     *Engine
	clock *SimClock
	cmd   *fakeCommander
	dl    *fakeDeadLetters
	store *memStore
	emit  *loopEmitter
	reg   *prometheus.Registry
}

func newEngine(t *testing.T, cfg Config, dir Directory) *engineFixture {
	t.Helper()
	f := &engineFixture{clock: NewSimClock(t0), cmd: &fakeCommander{}, dl: &fakeDeadLetters{}, store: &memStore{},
		emit: &loopEmitter{}, reg: prometheus.NewRegistry()}
	if cfg.Watch == nil {
		no := false
		cfg.Watch = &no
	}
	e, err := New(cfg, Deps{Directory: dir, Commander: f.cmd, Emitter: f.emit, State: f.store, DeadLetters: f.dl,
		Clock: f.clock}, slog.New(slog.DiscardHandler), f.reg)
	if err != nil {
		t.Fatal(err)
	}
	f.emit.mu.Lock()
	f.emit.e = e
	f.emit.mu.Unlock()
	f.e = e
	return f
}

// evaluated is how many events the rule has evaluated.
func (f *engineFixture) evaluated(rule string) int {
	return int(testutil.ToFloat64(f.e.met.evaluated.WithLabelValues(rule)))
}

// observations is how many evaluations of the rule its duration histogram holds.
func (f *engineFixture) observations(t *testing.T, rule string) int {
	t.Helper()
	return observations(t, f.reg, rule)
}

func observations(t *testing.T, g prometheus.Gatherer, rule string) int {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "edgegate_rules_evaluation_duration_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "rule" && l.GetValue() == rule {
					return int(m.GetHistogram().GetSampleCount())
				}
			}
		}
	}
	return 0
}

func (f *engineFixture) waitEvaluated(t *testing.T, rule string, n int) {
	t.Helper()
	waitFor(t, 5*time.Second, fmt.Sprintf("%d evaluations by %s", n, rule), func() bool { return f.evaluated(rule) >= n })
}

func TestEngineReferenceScenario(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = "../configs/rules.d"
	f := newEngine(t, cfg, shippedDevices(t))
	startEngine(t, f.e)

	e1 := newEvent("room.entered", "kitchen-motion", t0, map[string]any{"room": "kitchen"})
	if !f.e.Submit(e1) {
		t.Fatal("Submit refused")
	}
	waitFor(t, 5*time.Second, "lights.on to both kitchen lights", func() bool { return len(f.cmd.list()) == 2 })
	want := []string{
		`kitchen-light-1 lights.on {"cause":"` + e1.ID() + `","on":true}`,
		`kitchen-light-2 lights.on {"cause":"` + e1.ID() + `","on":true}`,
	}
	assertSet(t, f.cmd.list(), want)

	// A repeat inside the debounce window sends nothing new.
	f.clock.Set(t0.Add(20 * time.Second))
	f.e.Submit(newEvent("room.entered", "kitchen-motion", t0.Add(20*time.Second), map[string]any{"room": "kitchen"}))
	f.waitEvaluated(t, "lights-on-motion", 2)
	f.waitEvaluated(t, "lights-off-when-empty", 2)
	if n := len(f.cmd.list()); n != 2 {
		t.Fatalf("%d commands after a debounced repeat, want 2", n)
	}

	// Five minutes without motion in the kitchen: lights.off to the same lights.
	f.clock.Set(t0.Add(5*time.Minute + 19*time.Second))
	f.clock.Set(t0.Add(5*time.Minute + 20*time.Second))
	waitFor(t, 5*time.Second, "lights.off", func() bool { return len(f.cmd.list()) == 4 })
	off := f.cmd.list()[2:]
	for _, c := range off {
		if !strings.Contains(c, "lights.off") {
			t.Fatalf("commands %q", f.cmd.list())
		}
	}

	if got := testutil.ToFloat64(f.e.met.matched.WithLabelValues("lights-on-motion")); got != 2 {
		t.Errorf("matched{lights-on-motion} = %v, want 2", got)
	}
	waitFor(t, 5*time.Second, "actions counted", func() bool {
		return testutil.ToFloat64(f.e.met.actions.WithLabelValues("lights-off-when-empty", "command", "ok")) == 2
	})
	if got := testutil.ToFloat64(f.e.met.actions.WithLabelValues("lights-on-motion", "command", "ok")); got != 2 {
		t.Errorf("actions{lights-on-motion,command,ok} = %v, want 2", got)
	}
	// one duration series per rule, one observation per evaluation
	if n := testutil.CollectAndCount(f.reg, "edgegate_rules_evaluation_duration_seconds"); n != 2 {
		t.Errorf("duration histogram series = %d, want 2 (one per rule)", n)
	}
	for _, r := range []string{"lights-on-motion", "lights-off-when-empty"} {
		// observed right after the evaluation, which may still be finishing on the engine's goroutine
		waitFor(t, 5*time.Second, "an observation per evaluation of "+r, func() bool { return f.observations(t, r) == 2 })
		if got := f.evaluated(r); got != 2 {
			t.Errorf("evaluated{rule=%s} = %d, want 2", r, got)
		}
	}
	if len(f.dl.all()) != 0 {
		t.Errorf("dead letters: %v", f.dl.all())
	}
}

func assertSet(t *testing.T, got, want []string) {
	t.Helper()
	g := map[string]int{}
	for _, x := range got {
		g[x]++
	}
	for _, w := range want {
		if g[w] == 0 {
			t.Fatalf("missing %q in %q", w, got)
		}
		g[w]--
	}
}

const hallLightRule = `
rules:
  - name: hall
    on: button.pressed
    actions:
      - command: {device: hall-light, command: lights.on, payload: '{"on":true}'}
      - state: {key: '{{ event.id }}', value: 1}
`

func TestEngineCommandRetriesThenDeadLetter(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"hall.yaml": hallLightRule})
	cfg.CommandRetries = 2
	cfg.CommandBackoff = time.Millisecond
	f := newEngine(t, cfg, homeDevices)
	f.cmd.fail = map[string]bool{"hall-light": true}
	startEngine(t, f.e)

	ev := newEvent("button.pressed", "b1", t0, nil)
	f.e.Submit(ev)
	waitFor(t, 5*time.Second, "a dead letter", func() bool { return len(f.dl.all()) == 1 })
	if n := f.cmd.count("hall-light"); n != 3 {
		t.Errorf("%d attempts, want 3 (1 + 2 retries)", n)
	}
	d := f.dl.all()[0]
	if d.reason != "command_undelivered" || d.device != "hall-light" || d.topic != "devices/hall-light/commands/lights.on" ||
		d.payload != `{"on":true}` || !strings.Contains(d.detail, "3 attempt(s)") || !strings.Contains(d.detail, ev.ID()) {
		t.Errorf("dead letter %+v", d)
	}
	if got := testutil.ToFloat64(f.e.met.actions.WithLabelValues("hall", "command", "failed")); got != 1 {
		t.Errorf("actions{failed} = %v", got)
	}
}

func TestEngineSlowDeviceDoesNotBlockEvaluation(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"hall.yaml": hallLightRule})
	cfg.CommandWorkers = 1
	cfg.CommandQueueSize = 2
	f := newEngine(t, cfg, homeDevices)
	f.cmd.block = make(chan struct{}) // the device never answers
	stop := startEngine(t, f.e)

	const n = 10
	f.e.Submit(newEvent("button.pressed", "b1", t0, map[string]any{"i": 0}))
	waitFor(t, 5*time.Second, "the worker to be stuck", func() bool { return f.cmd.waiting.Load() == 1 })
	for i := 1; i < n; i++ {
		f.e.Submit(newEvent("button.pressed", "b1", t0, map[string]any{"i": i}))
	}
	// Every event is evaluated (its state action runs) although no command completes.
	waitFor(t, 5*time.Second, "every event evaluated", func() bool { return f.store.sets() == n })
	// 1 in the worker, 2 queued, the rest are dead letters at once.
	waitFor(t, 5*time.Second, "overflow dead letters", func() bool { return len(f.dl.all()) == n-3 })
	for _, d := range f.dl.all() {
		if d.reason != "command_undelivered" || !strings.Contains(d.detail, "queue full") {
			t.Fatalf("dead letter %+v", d)
		}
	}
	// Stopping turns what is in flight and queued into dead letters too: nothing is lost silently.
	stop()
	if got := len(f.dl.all()); got != n {
		t.Fatalf("%d dead letters after stop, want %d", got, n)
	}
	if got := testutil.ToFloat64(f.e.met.actions.WithLabelValues("hall", "command", "dropped")); got != n-3 {
		t.Errorf("actions{dropped} = %v", got)
	}
}

func TestEngineSubmitQueueFull(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"hall.yaml": hallLightRule})
	cfg.QueueSize = 2
	f := newEngine(t, cfg, homeDevices) // not running: nothing drains the queue
	for i, want := range []bool{true, true, false, false} {
		if got := f.e.Submit(newEvent("button.pressed", "b1", t0, nil)); got != want {
			t.Fatalf("Submit %d = %v, want %v", i, got, want)
		}
	}
	if got := testutil.ToFloat64(f.e.met.dropped); got != 2 {
		t.Fatalf("queue_dropped_total = %v, want 2", got)
	}
}

func TestEngineNoRulesAcceptsEverything(t *testing.T) {
	cfg := DefaultConfig()
	cfg.QueueSize = 1
	f := newEngine(t, cfg, nil)
	for range 5 {
		if !f.e.Submit(newEvent("x", "d", t0, nil)) {
			t.Fatal("Submit refused with no rules")
		}
	}
	if len(f.e.Rules()) != 0 {
		t.Fatal("rules loaded from no directory")
	}
}

// countingStore counts Sets per key.
type countingStore struct {
	mu     sync.Mutex
	counts map[string]int
	rules  map[string]int
}

func (s *countingStore) Set(device, key string, value any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.counts[key]++
	s.rules[fmt.Sprint(value)]++
}
func (s *countingStore) Get(string) (map[string]any, bool) { return nil, false }
func (s *countingStore) size() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.counts)
}

func TestEngineReloadAtomicity(t *testing.T) {
	version := func(v string) string {
		return fmt.Sprintf(`
rules:
  - name: count-%s
    on: tick
    actions: [{state: {device: counter, key: '{{ event.id }}', value: %s}}]
`, v, v)
	}
	dir := writeRules(t, map[string]string{"count.yaml": version("a")})
	cfg := DefaultConfig()
	cfg.Dir = dir
	cfg.QueueSize = 100000
	no := false
	cfg.Watch = &no
	store := &countingStore{counts: map[string]int{}, rules: map[string]int{}}
	e, err := New(cfg, Deps{State: store, Clock: NewSimClock(t0)}, nil, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	startEngine(t, e)

	const events = 20000
	submitted := make(chan struct{})
	go func() {
		defer close(submitted)
		for i := range events {
			ev := newEventN("tick", i)
			for !e.Submit(ev) {
				time.Sleep(time.Millisecond)
			}
		}
	}()
	for i := range 50 {
		v := []string{"a", "b"}[(i+1)%2]
		if err := os.WriteFile(filepath.Join(dir, "count.yaml"), []byte(version(v)), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := e.Reload(); err != nil {
			t.Fatal(err)
		}
	}
	<-submitted
	waitFor(t, 10*time.Second, "every event evaluated", func() bool { return store.size() == events })
	store.mu.Lock()
	defer store.mu.Unlock()
	for k, n := range store.counts {
		if n != 1 {
			t.Fatalf("event %s evaluated %d times", k, n)
		}
	}
	if store.rules["a"]+store.rules["b"] != events {
		t.Fatalf("per rule %v, want %d in all", store.rules, events)
	}
	t.Logf("evaluated by version: %v", store.rules)
}

func newEventN(typ string, i int) *event.Event {
	ev := event.New()
	ev.SetID(fmt.Sprintf("n-%d", i))
	ev.SetSource("/test")
	ev.SetType(typ)
	ev.SetSubject("d")
	ev.SetTime(t0)
	return &ev
}

func TestEngineReloadKeepsOldRulesOnError(t *testing.T) {
	dir := writeRules(t, map[string]string{"hall.yaml": hallLightRule})
	cfg := DefaultConfig()
	cfg.Dir = dir
	f := newEngine(t, cfg, homeDevices)
	if err := os.WriteFile(filepath.Join(dir, "bad.yaml"), []byte("rules:\n  - name: broken\n    on: {typo: x}\n    actions: [{emit: {type: y}}]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := f.e.Reload()
	if !errors.Is(err, ErrInvalidRules) {
		t.Fatalf("Reload = %v, want ErrInvalidRules", err)
	}
	if want := filepath.Join(dir, "bad.yaml") + ":3: rules[0].on.typo: unknown key"; !strings.Contains(err.Error(), want) {
		t.Fatalf("Reload error %q does not contain %q", err, want)
	}
	if r := f.e.Rules(); len(r) != 1 || r[0].Name != "hall" {
		t.Fatalf("Rules() = %+v after a bad reload", r)
	}
	if got := testutil.ToFloat64(f.e.met.reloads.WithLabelValues("error")); got != 1 {
		t.Fatalf("reloads{error} = %v", got)
	}
	os.Remove(filepath.Join(dir, "bad.yaml"))
	if err := f.e.Reload(); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(f.e.met.reloads.WithLabelValues("ok")); got != 1 {
		t.Fatalf("reloads{ok} = %v", got)
	}
}

func TestEngineWatchReloads(t *testing.T) {
	dir := writeRules(t, map[string]string{"hall.yaml": hallLightRule})
	cfg := DefaultConfig()
	cfg.Dir = dir
	yes := true
	cfg.Watch = &yes
	f := newEngine(t, cfg, homeDevices)
	startEngine(t, f.e)
	body := "rules:\n  - name: added\n    on: x\n    actions: [{emit: {type: y}}]\n"
	if err := os.WriteFile(filepath.Join(dir, "added.yaml"), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the new file loaded", func() bool { return len(f.e.Rules()) == 2 })
	if err := os.Remove(filepath.Join(dir, "added.yaml")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the removed file unloaded", func() bool { return len(f.e.Rules()) == 1 })
}

func TestEngineLoopGuard(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"echo.yaml": "rules:\n  - name: echo\n    on: ping\n    actions: [{emit: {type: ping, data: {n: '{{ event.extensions.chaindepth ?? 0 }}'}}}]\n"})
	cfg.MaxChainDepth = 3
	f := newEngine(t, cfg, nil)
	startEngine(t, f.e)
	f.e.Submit(newEvent("ping", "d", t0, nil))
	waitFor(t, 5*time.Second, "the loop guard", func() bool {
		return testutil.ToFloat64(f.e.met.actions.WithLabelValues("echo", "emit", "loop")) == 1
	})
	evs := f.emit.all()
	if len(evs) != 3 {
		t.Fatalf("%d events emitted, want 3", len(evs))
	}
	if got := testutil.ToFloat64(f.e.met.errors.WithLabelValues("echo")); got != 1 {
		t.Fatalf("errors{echo} = %v", got)
	}
	// The refused emit has one outcome: loop, not error as well.
	if ok, errs := testutil.ToFloat64(f.e.met.actions.WithLabelValues("echo", "emit", "ok")),
		testutil.ToFloat64(f.e.met.actions.WithLabelValues("echo", "emit", "error")); ok != 3 || errs != 0 {
		t.Fatalf("actions{emit} ok %v, error %v; want 3, 0", ok, errs)
	}
	last := evs[2]
	if last.Source() != DefaultSource || chainDepth(last) != 3 || last.Extensions()[ExtRule] != "echo" {
		t.Fatalf("derived event %s", last)
	}
}

// TestEnginePersistsWindowsWhileEventsCome: the window state written to the state file is a copy, not the
// buckets that events evaluated meanwhile (inline, in Submit) go on changing (the race detector sees it).
func TestEnginePersistsWindowsWhileEventsCome(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"w.yaml": `rules:
  - name: w
    on: sensor.temperature
    window: {size: 1h, slide: 1m, agg: max, value: data.temp, emit: crossing, threshold: window.value > 1000}
    actions: [{emit: {type: hot}}]
`})
	cfg.StateFile = filepath.Join(t.TempDir(), "rules-state.json")
	cfg.PersistInterval = time.Millisecond
	f := newEngine(t, cfg, nil)
	startEngine(t, f.e)
	const n = 300
	for i := range n {
		f.clock.Set(t0.Add(time.Duration(i) * time.Second)) // a new bucket every minute: the slice grows
		f.e.Submit(newEvent("sensor.temperature", "t1", t0.Add(time.Duration(i)*time.Second), map[string]any{"temp": i}))
		f.waitEvaluated(t, "w", i+1)
	}
	waitFor(t, 5*time.Second, "the state file written", func() bool {
		_, err := os.Stat(cfg.StateFile)
		return err == nil
	})
}

// TestEngineStateWriteDoesNotHoldEvaluation: writing the state file (slow on an SD card) does not hold up the
// evaluation goroutine: an absence falls due and fires while a write is still in progress, and the state is
// written again at stop, after that write.
func TestEngineStateWriteDoesNotHoldEvaluation(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"a.yaml": `rules:
  - name: left-open
    absence: {after: door.opened, missing: door.closed, within: 1m}
    actions: [{emit: {type: door.left_open}}]
`})
	cfg.StateFile = filepath.Join(t.TempDir(), "rules-state.json")
	cfg.PersistInterval = time.Millisecond
	f := newEngine(t, cfg, nil)
	writing, release := make(chan struct{}, 16), make(chan struct{})
	var writes atomic.Int32
	f.e.writeState = func(path string, sf *stateFile) error {
		writes.Add(1)
		select {
		case writing <- struct{}{}:
		default:
		}
		<-release
		return writeStateFile(path, sf)
	}
	stop := startEngine(t, f.e)
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock) // before the stop (cleanups run last first)
	f.e.Submit(newEvent("door.opened", "door-1", t0, nil))
	f.waitEvaluated(t, "left-open", 1)
	select {
	case <-writing:
	case <-time.After(10 * time.Second):
		t.Fatal("the state was not written")
	}
	f.clock.Set(t0.Add(2 * time.Minute))
	waitFor(t, 5*time.Second, "the absence fired while the state file is written", func() bool {
		return len(f.emit.all()) == 1
	})
	unblock()
	stop()
	if n := writes.Load(); n < 2 {
		t.Errorf("%d state writes, want the one held and the one at stop", n)
	}
	if _, err := os.Stat(cfg.StateFile); err != nil {
		t.Errorf("no state file after stop: %v", err)
	}
}

func TestEngineRestartPersistence(t *testing.T) {
	stateFile := filepath.Join(t.TempDir(), "rules-state.json")
	cfg := DefaultConfig()
	cfg.Dir = "../configs/rules.d"
	cfg.StateFile = stateFile
	devs := shippedDevices(t)

	// First life: motion in the kitchen, lights on, then the gateway stops.
	f1 := newEngine(t, cfg, devs)
	stop := startEngine(t, f1.e)
	e1 := newEvent("room.entered", "kitchen-motion", t0, map[string]any{"room": "kitchen"})
	f1.e.Submit(e1)
	waitFor(t, 5*time.Second, "lights.on", func() bool { return len(f1.cmd.list()) == 2 })
	stop()
	if _, err := os.Stat(stateFile); err != nil {
		t.Fatalf("no state file after stop: %v", err)
	}

	saved, err := os.ReadFile(stateFile)
	if err != nil {
		t.Fatal(err)
	}
	restoreFile := func(t *testing.T) Config {
		c := cfg
		c.StateFile = filepath.Join(t.TempDir(), "rules-state.json")
		if err := os.WriteFile(c.StateFile, saved, 0o644); err != nil {
			t.Fatal(err)
		}
		return c
	}
	t.Run("debounce and absence survive", func(t *testing.T) {
		cfg := restoreFile(t)
		f := newEngine(t, cfg, devs)
		f.clock.Set(t0.Add(10 * time.Second))
		startEngine(t, f.e)
		f.e.Submit(newEvent("room.entered", "kitchen-motion", t0.Add(10*time.Second), map[string]any{"room": "kitchen"}))
		f.waitEvaluated(t, "lights-off-when-empty", 1)
		if c := f.cmd.list(); len(c) != 0 {
			t.Fatalf("commands %q: the debounce was forgotten", c)
		}
		f.clock.Set(t0.Add(5*time.Minute + 10*time.Second))
		waitFor(t, 5*time.Second, "lights.off", func() bool { return len(f.cmd.list()) == 2 })
	})
	t.Run("absence due while down fires once on start", func(t *testing.T) {
		cfg := restoreFile(t)
		f := newEngine(t, cfg, devs)
		f.clock.Set(t0.Add(time.Hour))
		stop := startEngine(t, f.e)
		waitFor(t, 5*time.Second, "lights.off", func() bool { return len(f.cmd.list()) == 2 })
		want := []string{
			`kitchen-light-1 lights.off {"cause":"` + e1.ID() + `","on":false}`,
			`kitchen-light-2 lights.off {"cause":"` + e1.ID() + `","on":false}`,
		}
		assertSet(t, f.cmd.list(), want)
		stop()
		// and only once: the next start has nothing pending
		f2 := newEngine(t, cfg, devs)
		f2.clock.Set(t0.Add(2 * time.Hour))
		stop2 := startEngine(t, f2.e)
		f2.e.Submit(newEvent("other", "x", t0.Add(2*time.Hour), nil))
		stop2()
		if c := f2.cmd.list(); len(c) != 0 {
			t.Fatalf("commands on the third start: %q", c)
		}
	})
}

func TestNewErrors(t *testing.T) {
	bad := DefaultConfig()
	bad.Dir = writeRules(t, map[string]string{"a.yaml": "rules:\n  - name: a\n    on: x\n    when: 'data.x >'\n    actions: [{emit: {type: y}}]\n"})
	_, err := New(bad, Deps{}, nil, nil)
	if !errors.Is(err, ErrInvalidRules) || !strings.Contains(err.Error(), "a.yaml:4: rules[0].when: expression") {
		t.Fatalf("New = %v", err)
	}
	cfg := DefaultConfig()
	cfg.QueueSize = -1
	cfg.Dir = filepath.Join(t.TempDir(), "missing")
	_, err = New(cfg, Deps{}, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "rules.queue_size: must be >= 0") || !strings.Contains(err.Error(), "rules.dir:") {
		t.Fatalf("New = %v", err)
	}
	// registering twice on one registry is an error, not a panic
	reg := prometheus.NewRegistry()
	if _, err := New(DefaultConfig(), Deps{}, nil, reg); err != nil {
		t.Fatal(err)
	}
	if _, err := New(DefaultConfig(), Deps{}, nil, reg); err == nil {
		t.Fatal("second registration accepted")
	}
}

func TestEngineRunTwice(t *testing.T) {
	f := newEngine(t, DefaultConfig(), nil)
	startEngine(t, f.e)
	waitFor(t, 5*time.Second, "running", f.e.running.Load)
	if err := f.e.Run(context.Background()); !errors.Is(err, ErrRunning) {
		t.Fatalf("second Run = %v", err)
	}
}

// orderStore records, per device, the values set in order. When hold is set, every 64th Set calls it (outside
// mu), while the engine is evaluating: the test keeps the engine busy there until submitters queue behind it.
type orderStore struct {
	mu   sync.Mutex
	n    int
	seen map[string][]int
	hold func()
}

func (s *orderStore) Set(device, key string, value any) {
	s.mu.Lock()
	s.n++
	hold := s.hold != nil && s.n%64 == 0
	v, _ := value.(float64)
	s.seen[device] = append(s.seen[device], int(v))
	s.mu.Unlock()
	if hold {
		s.hold()
	}
}
func (s *orderStore) Get(string) (map[string]any, bool) { return nil, false }
func (s *orderStore) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// startRecorder runs an engine with one rule, record, that sets state key i of each tick's subject to its
// data.i in store.
func startRecorder(t *testing.T, store StateStore) *Engine {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"record.yaml": `
rules:
  - name: record
    on: tick
    actions: [{state: {device: '{{ event.subject }}', key: i, value: '{{ data.i }}'}}]
`})
	cfg.QueueSize = 100000
	no := false
	cfg.Watch = &no
	e, err := New(cfg, Deps{State: store, Clock: NewSimClock(t0)}, nil, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	startEngine(t, e)
	return e
}

// Events are evaluated at once on the submitter's goroutine when the engine is idle and queued when it is
// busy; either way each submitter's events are evaluated exactly once and in the order it submitted them.
func TestEngineSubmitKeepsOrderInlineAndQueued(t *testing.T) {
	store := &orderStore{seen: map[string][]int{}}
	e := startRecorder(t, store)
	const submitters, events = 4, 3000
	var submitting, queuedBehind atomic.Int32
	submitting.Store(submitters)
	store.hold = func() {
		// Busy evaluating: wait until another submitter has queued an event (or all are done), within 5s.
		deadline := time.Now().Add(5 * time.Second)
		for e.queued.Load() == 0 && submitting.Load() > 0 {
			if time.Now().After(deadline) {
				t.Error("no event was queued while the engine was busy for 5s")
				return
			}
			runtime.Gosched()
		}
		if e.queued.Load() > 0 {
			queuedBehind.Add(1)
		}
	}
	var wg sync.WaitGroup
	for s := range submitters {
		wg.Go(func() {
			defer submitting.Add(-1)
			for i := range events {
				ev := newEvent("tick", fmt.Sprintf("d%d", s), t0, map[string]any{"i": i})
				if !e.Submit(ev) {
					t.Errorf("submitter %d: event %d refused", s, i)
					return
				}
			}
		})
	}
	wg.Wait()
	waitFor(t, 10*time.Second, "every event evaluated", func() bool { return store.total() == submitters*events })
	store.mu.Lock()
	defer store.mu.Unlock()
	for dev, got := range store.seen {
		if len(got) != events {
			t.Fatalf("%s: %d events evaluated, want %d", dev, len(got), events)
		}
		for i, v := range got {
			if v != i {
				t.Fatalf("%s: evaluation %d was event %d (out of order)", dev, i, v)
			}
		}
	}
	if got := testutil.ToFloat64(e.met.dropped); got != 0 {
		t.Fatalf("queue_dropped_total = %v", got)
	}
	if queuedBehind.Load() == 0 {
		t.Fatal("no event was ever queued behind a busy engine: only the inline path was exercised")
	}
}

// panicStore panics on Set for the device "boom".
type panicStore struct{ orderStore }

func (s *panicStore) Set(device, key string, value any) {
	if device == "boom" {
		panic("state store fault")
	}
	s.orderStore.Set(device, key, value)
}

// A panic while a rule handles an event (here in its state action, evaluated inline on the submitter's
// goroutine) is that rule's evaluation error: the engine keeps evaluating the next events.
func TestEngineContainsPanics(t *testing.T) {
	store := &panicStore{orderStore{seen: map[string][]int{}}}
	e := startRecorder(t, store)
	for i, dev := range []string{"ok", "boom", "ok", "boom", "ok"} {
		done := make(chan bool, 1)
		go func() { done <- e.Submit(newEvent("tick", dev, t0, map[string]any{"i": i})) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("Submit %d did not return: the engine is stuck", i)
		}
	}
	waitFor(t, 5*time.Second, "the good events evaluated", func() bool { return store.total() == 3 })
	if got := testutil.ToFloat64(e.met.errors.WithLabelValues("record")); got != 2 {
		t.Fatalf("errors_total{record} = %v, want 2", got)
	}
}

// seqStore records every Set as "key=value", in order.
type seqStore struct {
	mu  sync.Mutex
	log []string
}

func (s *seqStore) Set(_, key string, value any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.log = append(s.log, fmt.Sprintf("%s=%v", key, value))
}
func (s *seqStore) Get(string) (map[string]any, bool) { return nil, false }
func (s *seqStore) take(n int) ([]string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.log) < n {
		return nil, false
	}
	out := s.log
	s.log = nil
	return out, true
}

// The engine evaluates an event only with the rules its type can match (exact types, wildcard patterns, "*", the
// steps of sequences and absences), each once, in rule order; the other rules are not evaluated at all.
func TestEngineTypeIndex(t *testing.T) {
	act := func(name string) string {
		return fmt.Sprintf("    actions: [{state: {device: log, key: %s, value: '{{ event.type }}'}}]\n", name)
	}
	var src strings.Builder
	src.WriteString("rules:\n")
	for _, r := range []struct{ name, body string }{
		{"any", `    on: "*"` + "\n"},
		{"temp", "    on: sensor.temperature\n"},
		{"sensors", `    on: {type: "sensor.*"}` + "\n"},
		{"door", "    on: door.opened\n"},
		{"door-then-room", `    sequence: {first: door.opened, then: "room.*", within: 2m}` + "\n"},
		{"door-open-long", `    absence: {after: door.opened, missing: "door.*", within: 10m}` + "\n"},
		{"opened", `    on: "*.opened"` + "\n"},
		{"temp-late", "    on: sensor.temperature\n"},
		{"other", `    on: "other.*"` + "\n"},
		{"humidity", "    on: sensor.humidity\n"},
		{"no-on", "    description: without on, every event\n"},
	} {
		fmt.Fprintf(&src, "  - name: %s\n%s%s", r.name, r.body, act(r.name))
	}
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"index.yaml": src.String()})
	no := false
	cfg.Watch = &no
	store := &seqStore{}
	reg := prometheus.NewRegistry()
	e, err := New(cfg, Deps{Directory: homeDevices, State: store, Clock: NewSimClock(t0)}, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	stop := startEngine(t, e)

	steps := []struct {
		typ, subject string
		fired        []string // rules whose action ran, in order
	}{
		{"sensor.temperature", "thermo-1", []string{"any", "temp", "sensors", "temp-late", "no-on"}},
		{"door.opened", "door-1", []string{"any", "door", "opened", "no-on"}}, // starts the sequence, arms the absence
		{"sensor.humidity", "thermo-1", []string{"any", "sensors", "humidity", "no-on"}},
		{"window.opened", "hall-motion", []string{"any", "opened", "no-on"}},
		{"room.entered", "door-1", []string{"any", "door-then-room", "no-on"}}, // completes the sequence
		{"unknown.kind", "door-1", []string{"any", "no-on"}},
	}
	for i, s := range steps {
		if !e.Submit(newEvent(s.typ, s.subject, t0, nil)) {
			t.Fatalf("step %d: Submit refused", i)
		}
		var got []string
		waitFor(t, 5*time.Second, fmt.Sprintf("step %d: %d actions", i, len(s.fired)), func() bool {
			var ok bool
			got, ok = store.take(len(s.fired))
			return ok
		})
		want := make([]string, len(s.fired))
		for j, r := range s.fired {
			want[j] = r + "=" + s.typ
		}
		if strings.Join(got, " ") != strings.Join(want, " ") {
			t.Fatalf("step %d (%s): rules fired\n got %q\nwant %q", i, s.typ, got, want)
		}
	}
	stop() // every evaluation has ended: the counts below are final
	if got, _ := store.take(0); len(got) != 0 {
		t.Fatalf("late actions %q", got)
	}
	wantEvaluated := map[string]int{"any": 6, "temp": 1, "sensors": 2, "door": 1, "door-then-room": 2,
		"door-open-long": 1, "opened": 2, "temp-late": 1, "other": 0, "humidity": 1, "no-on": 6}
	for r, want := range wantEvaluated {
		if got := int(testutil.ToFloat64(e.met.evaluated.WithLabelValues(r))); got != want {
			t.Errorf("evaluated{rule=%s} = %d, want %d", r, got, want)
		}
		if got := observations(t, reg, r); got != want {
			t.Errorf("duration{rule=%s} has %d observations, want %d", r, got, want)
		}
	}
}

// A condition over the subject's state sees what a state action of another rule set: it is false until the state
// holds the value, and true from then on, for that device only.
func TestEngineWhenReadsState(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"away.yaml": `
rules:
  - name: set-mode
    on: mode.set
    actions: [{state: {key: mode, value: '{{ data.mode }}'}}]
  - name: away-alarm
    on: motion.detected
    when: state.mode == "away"
    actions: [{command: {device: hall-light, command: lights.blink, payload: '{{ event.subject }}'}}]
`})
	f := newEngine(t, cfg, homeDevices)
	startEngine(t, f.e)
	matched := func() int { return int(testutil.ToFloat64(f.e.met.matched.WithLabelValues("away-alarm"))) }
	n := 0
	motion := func(subject string) {
		t.Helper()
		n++
		f.e.Submit(newEvent("motion.detected", subject, t0, nil))
		// observed once the evaluation is over (it may run on the engine's goroutine)
		waitFor(t, 5*time.Second, fmt.Sprintf("%d evaluations by away-alarm", n), func() bool {
			return f.observations(t, "away-alarm") == n
		})
	}
	setMode := func(mode string) {
		t.Helper()
		f.e.Submit(newEvent("mode.set", "hall-motion", t0, map[string]any{"mode": mode}))
		waitFor(t, 5*time.Second, "mode "+mode, func() bool {
			s, _ := f.store.Get("hall-motion")
			return s["mode"] == mode
		})
	}

	motion("hall-motion") // no state yet
	setMode("home")
	motion("hall-motion") // state.mode is "home"
	if got := matched(); got != 0 {
		t.Fatalf("away-alarm matched %d times before the mode was away", got)
	}
	setMode("away")
	motion("kitchen-motion") // another device: its state has no mode
	if got := matched(); got != 0 {
		t.Fatalf("away-alarm matched %d times for a device whose mode is not away", got)
	}
	motion("hall-motion")
	if got := matched(); got != 1 {
		t.Fatalf("away-alarm matched %d times once the mode was away, want 1", got)
	}
	waitFor(t, 5*time.Second, "the command", func() bool { return len(f.cmd.list()) == 1 })
	if c := f.cmd.list(); c[0] != "hall-light lights.blink hall-motion" {
		t.Fatalf("commands %q", c)
	}
	if got := testutil.ToFloat64(f.e.met.errors.WithLabelValues("away-alarm")); got != 0 {
		t.Fatalf("errors{away-alarm} = %v", got)
	}
}

// A command whose device is rendered from the event is checked against the device directory: an unknown id is an
// error of the rule (counted, logged), no command goes out, and the rule's other actions and the other rules go on.
func TestEngineCommandToUnknownTemplatedDevice(t *testing.T) {
	const src = `
rules:
  - name: forward
    on: button.pressed
    actions:
      - command: {device: '{{ data.target }}', command: lights.on}
      - state: {key: pressed, value: '{{ data.target }}'}
  - name: after
    on: button.pressed
    actions: [{state: {key: after, value: '{{ data.target }}'}}]
`
	t.Run("engine", func(t *testing.T) {
		cfg := DefaultConfig()
		cfg.Dir = writeRules(t, map[string]string{"fwd.yaml": src})
		f := newEngine(t, cfg, homeDevices)
		stop := startEngine(t, f.e)

		f.e.Submit(newEvent("button.pressed", "b1", t0, map[string]any{"target": "ghost"}))
		waitFor(t, 5*time.Second, "both rules evaluated", func() bool {
			s, _ := f.store.Get("b1")
			return s["pressed"] == "ghost" && s["after"] == "ghost"
		})
		if got := testutil.ToFloat64(f.e.met.errors.WithLabelValues("forward")); got != 1 {
			t.Fatalf("errors{forward} = %v, want 1", got)
		}
		if got := testutil.ToFloat64(f.e.met.actions.WithLabelValues("forward", "command", "error")); got != 1 {
			t.Fatalf("actions{forward,command,error} = %v, want 1", got)
		}

		// a known device still gets its command
		f.e.Submit(newEvent("button.pressed", "b1", t0, map[string]any{"target": "hall-light"}))
		waitFor(t, 5*time.Second, "the command to hall-light", func() bool { return len(f.cmd.list()) == 1 })
		stop()
		if c := f.cmd.list(); len(c) != 1 || c[0] != "hall-light lights.on " || f.cmd.count("ghost") != 0 {
			t.Fatalf("commands %q, %d to ghost", c, f.cmd.count("ghost"))
		}
		if dl := f.dl.all(); len(dl) != 0 {
			t.Fatalf("dead letters %+v", dl)
		}
		for _, o := range []string{"failed", "dropped", "no_target"} {
			if got := testutil.ToFloat64(f.e.met.actions.WithLabelValues("forward", "command", o)); got != 0 {
				t.Errorf("actions{forward,command,%s} = %v, want 0", o, got)
			}
		}
		if got := testutil.ToFloat64(f.e.met.errors.WithLabelValues("forward")); got != 1 {
			t.Fatalf("errors{forward} = %v after a known device, want 1", got)
		}
	})
	t.Run("error", func(t *testing.T) {
		m, r := newMachine(t, src, homeDevices)
		m.handle(newEvent("button.pressed", "b1", t0, map[string]any{"target": "ghost"}), t0)
		if got := r.take(); strings.Join(got, "\n") != `forward: state b1 pressed="ghost"`+"\n"+`after: state b1 after="ghost"` {
			t.Fatalf("actions %q", got)
		}
		want := `forward: command lights.on (line 6): device: unknown device "ghost" (not in the device registry)`
		if len(r.errs) != 1 || r.errs[0] != want {
			t.Fatalf("errors %q, want %q", r.errs, want)
		}
	})
}

// TestEngineBusy: an evaluation that does not end (here a state action that blocks) shows in Busy for as long as
// it lasts; an idle engine shows 0.
func TestEngineBusy(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"hall.yaml": hallLightRule})
	f := newEngine(t, cfg, homeDevices)
	startEngine(t, f.e)
	f.e.Submit(newEvent("button.pressed", "b1", t0, nil))
	waitFor(t, 5*time.Second, "the first event's state action", func() bool { return f.store.sets() == 1 })
	if d := f.e.Busy(); d != 0 {
		t.Fatalf("Busy of an idle engine = %s, want 0", d)
	}

	release := make(chan struct{})
	f.store.mu.Lock()
	f.store.block = release
	f.store.mu.Unlock()
	go f.e.Submit(newEvent("button.pressed", "b1", t0, nil))
	waitFor(t, 5*time.Second, "the blocked evaluation to show in Busy", func() bool { return f.e.Busy() > 0 })
	first := f.e.Busy()
	waitFor(t, 5*time.Second, "Busy to grow with the blocked evaluation", func() bool { return f.e.Busy() >= first+20*time.Millisecond })

	f.store.mu.Lock()
	f.store.block = nil
	f.store.mu.Unlock()
	close(release)
	waitFor(t, 5*time.Second, "the second event's state action", func() bool { return f.store.sets() == 2 })
	waitFor(t, 5*time.Second, "Busy to return to 0", func() bool { return f.e.Busy() == 0 })
}
