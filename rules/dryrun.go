package rules

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"strings"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
)

// DryRunOptions tune DryRun. The zero value explains every rule for every event and, after the last event, fires
// the timers that would fall due within the longest window or timeout of the rule set.
type DryRunOptions struct {
	// NoFlush stops at the last event: pending absences, sequences and windows are left pending.
	NoFlush bool
	// OnlyMatched leaves out the rules that did not match (and why).
	OnlyMatched bool
	// State is the device state the conditions see. Each event, recorded or derived, is applied to it before the
	// rules see it, as the gateway applies events to its state view. nil: a state that only state actions set.
	State EventState
}

// maxEventLine bounds one line of the events input.
const maxEventLine = 4 << 20

// DryRun evaluates the rules of cfg.Dir over recorded CloudEvents (JSON, one per line) on event time and writes,
// per event, which rules matched, which did not and why, and the actions that would be taken. Nothing is sent:
// derived events are evaluated like recorded ones (after the event that caused them), state actions change the
// state that later conditions see (opts.State, which each event updates first, or a simulated one). The clock
// is simulated: it moves to each event's time (never backwards), and timers due before an event fire first. dir may be nil (no device metadata). Lines that are not
// CloudEvents are reported in the output and in the returned error; evaluation goes on.
func DryRun(cfg Config, dir Directory, events io.Reader, out io.Writer, opts DryRunOptions) error {
	cfg = cfg.withDefaults()
	rules, warnings, err := loadDir(cfg.Dir, dir)
	if err != nil {
		return err
	}
	return runDry(cfg, rules, warnings, dir, events, out, opts)
}

// runDry is DryRun over compiled rules.
func runDry(cfg Config, rules []*rule, warnings []string, dir Directory, events io.Reader, out io.Writer, opts DryRunOptions) error {
	w := bufio.NewWriter(out)
	d := &dryRun{w: w, opts: opts}
	if dir == nil {
		fmt.Fprintln(w, "warning: no device directory: device matches fail and selectors pick no device")
	}
	for _, wn := range warnings {
		fmt.Fprintln(w, "warning:", wn)
	}
	set := newRuleSet(rules)
	var store StateStore = newMemState()
	if opts.State != nil {
		store = opts.State
	}
	d.m = &machine{
		dir:      dir,
		store:    store,
		sink:     d,
		tr:       d,
		source:   cfg.Source,
		maxDepth: cfg.MaxChainDepth,
		newID:    d.nextID,
		all:      true,
	}
	d.m.install(set)
	fmt.Fprintf(w, "rules: %d loaded from %s\n", len(rules), cfg.Dir)

	sc := bufio.NewScanner(events)
	sc.Buffer(make([]byte, 64<<10), maxEventLine)
	var (
		line, bad, total int
		now              time.Time
		started          bool
	)
	for sc.Scan() {
		line++
		raw := strings.TrimSpace(sc.Text())
		if raw == "" || strings.HasPrefix(raw, "#") {
			continue
		}
		total++
		ev := event.New()
		if err := json.Unmarshal([]byte(raw), &ev); err != nil {
			bad++
			fmt.Fprintf(w, "\nline %d: not a CloudEvent: %v\n", line, err)
			continue
		}
		if err := ev.Validate(); err != nil {
			bad++
			fmt.Fprintf(w, "\nline %d: invalid CloudEvent: %s\n", line, strings.ReplaceAll(err.Error(), "\n", "; "))
			continue
		}
		t := ev.Time()
		switch {
		case !started && t.IsZero():
			now = time.Unix(0, 0).UTC()
		case !started:
			now = t
		case t.After(now):
			now = t
		}
		started = true
		d.fireTimers(now)
		d.header(fmt.Sprintf("event (line %d)", line), &ev, now)
		d.see(&ev)
		d.m.handle(&ev, now)
		d.drain(now)
	}
	if err := sc.Err(); err != nil {
		w.Flush()
		return fmt.Errorf("rules: dry run: read events: %w", err)
	}
	if started && !opts.NoFlush && set.maxSpan > 0 {
		end := now.Add(set.maxSpan)
		fmt.Fprintf(w, "\nflush: the clock moves to %s (last event + %s)\n", fmtTime(end), set.maxSpan)
		d.fireTimers(end)
	}
	fmt.Fprintf(w, "\nsummary: %d event(s), %d derived, %d action(s)", total-bad, d.derived, d.actions)
	if bad > 0 {
		fmt.Fprintf(w, ", %d line(s) not CloudEvents", bad)
	}
	fmt.Fprintln(w)
	if err := w.Flush(); err != nil {
		return fmt.Errorf("rules: dry run: write: %w", err)
	}
	if bad > 0 {
		return fmt.Errorf("rules: dry run: %d of %d line(s) are not valid CloudEvents", bad, total)
	}
	return nil
}

// dryRun prints what the machine decides; it is the machine's sink and tracer.
type dryRun struct {
	w       *bufio.Writer
	opts    DryRunOptions
	m       *machine
	ids     int
	derived int
	actions int
	queue   []*event.Event // derived events waiting for evaluation
}

func (d *dryRun) nextID() string {
	d.ids++
	return fmt.Sprintf("dryrun-%d", d.ids)
}

func (d *dryRun) header(what string, ev *event.Event, now time.Time) {
	fmt.Fprintf(d.w, "\n%s %s: %s subject=%q id=%s", what, fmtTime(now), ev.Type(), ev.Subject(), ev.ID())
	if b := ev.Data(); len(b) > 0 {
		fmt.Fprintf(d.w, " data=%s", clip(string(b), 200))
	}
	fmt.Fprintln(d.w)
}

// fireTimers fires, in order, every timer due at or before now, each under its own heading.
func (d *dryRun) fireTimers(now time.Time) {
	for {
		at, ok := d.m.nextTimer()
		if !ok || at.After(now) {
			return
		}
		fmt.Fprintf(d.w, "\ntimer %s\n", fmtTime(at))
		d.m.fireNext(at)
		d.drain(at)
	}
}

// drain evaluates derived events, in the order they were emitted.
func (d *dryRun) drain(now time.Time) {
	for len(d.queue) > 0 {
		ev := d.queue[0]
		d.queue = d.queue[1:]
		d.header("derived", ev, now)
		d.see(ev)
		d.m.handle(ev, now)
	}
}

// see applies an event to the state given in the options, before the rules see it.
func (d *dryRun) see(ev *event.Event) {
	if d.opts.State != nil {
		d.opts.State.Apply(ev)
	}
}

func (d *dryRun) noMatch(r *rule, why string) {
	if !d.opts.OnlyMatched {
		fmt.Fprintf(d.w, "  %s: no match: %s\n", r.name, why)
	}
}

func (d *dryRun) note(r *rule, msg string)    { fmt.Fprintf(d.w, "  %s: %s\n", r.name, msg) }
func (d *dryRun) failed(r *rule, err error)   { fmt.Fprintf(d.w, "  %s: error: %v\n", r.name, err) }
func (d *dryRun) action(r *rule, desc string) { d.actions++; fmt.Fprintf(d.w, "    -> %s\n", desc) }
func (d *dryRun) state(r *rule, device, key string, value any) {
	d.m.store.Set(device, key, value)
	b, _ := json.Marshal(value)
	d.action(r, fmt.Sprintf("state %s %s = %s", device, key, b))
}

func (d *dryRun) command(r *rule, _ *event.Event, device, command string, payload []byte) {
	d.action(r, fmt.Sprintf("command %s %s %s", device, command, clip(string(payload), 200)))
}

func (d *dryRun) emit(r *rule, ev *event.Event) {
	d.derived++
	d.action(r, fmt.Sprintf("emit %s subject=%q id=%s data=%s (depth %d)", ev.Type(), ev.Subject(), ev.ID(),
		clip(string(ev.Data()), 200), chainDepth(ev)))
	d.queue = append(d.queue, ev)
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// memState is the simulated state view of a dry run.
type memState struct{ m map[string]map[string]any }

func newMemState() *memState { return &memState{m: map[string]map[string]any{}} }

func (s *memState) Set(device, key string, value any) {
	if s.m[device] == nil {
		s.m[device] = map[string]any{}
	}
	s.m[device][key] = value
}

func (s *memState) Get(device string) (map[string]any, bool) {
	v, ok := s.m[device]
	return maps.Clone(v), ok
}
