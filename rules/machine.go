package rules

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/cloudevents/sdk-go/v2/types"
)

// CloudEvents extensions set on derived events.
const (
	ExtCausationID   = "causationid"   // the id of the event that caused this one
	ExtCorrelationID = "correlationid" // the id of the first event of the chain
	ExtChainDepth    = "chaindepth"    // how many derivations lead to this event (loop guard)
	ExtRule          = "rule"          // the rule that derived the event
)

// maxKeysPerRule bounds the keys (debounce, sequence, absence, window groups) one rule tracks.
const maxKeysPerRule = 10000

var errTooManyKeys = fmt.Errorf("more than %d keys tracked", maxKeysPerRule)

// actionSink carries out (or, in a dry run, describes) what rules decide.
type actionSink interface {
	command(r *rule, cause *event.Event, device, command string, payload []byte)
	emit(r *rule, ev *event.Event)
	state(r *rule, device, key string, value any)
}

// tracer is told every decision (dry runs); nil in the engine.
type tracer interface {
	noMatch(r *rule, why string)
	note(r *rule, msg string)
	failed(r *rule, err error)
}

// machine evaluates a rule set and keeps its state: gates, pending sequences and absences, windows and their
// timers. It is not safe for concurrent use; the engine holds a lock around it.
type machine struct {
	set      *ruleSet
	states   map[string]*ruleState
	timers   timers
	dir      Directory
	store    StateStore
	sink     actionSink
	tr       tracer
	met      *metrics
	onError  func(r *rule, ev *event.Event, err error)
	source   string
	maxDepth int
	newID    func() string
	dirty    bool
	scratch  []*rule
	all      bool // evaluate every rule, not just the index's candidates (dry runs explain every rule)
}

type ruleState struct {
	rule    *rule
	gate    map[string]time.Time    // debounce/throttle: key → suppressed until
	pending map[string]*pendingItem // sequence/absence: key → first event
	groups  map[string]*windowGroup // window: group key → buckets
	closeAt *timerItem              // window (emit close): the next close
}

type pendingItem struct {
	at    time.Time    // when the first event was seen
	ev    *event.Event // the first event
	timer *timerItem   // due (absence) or expiry (sequence)
}

type windowGroup struct {
	buckets []bucket // by start, ascending
	above   bool     // crossing: the threshold held at the last sample
	last    *event.Event
}

type bucket struct {
	Start time.Time `json:"start"`
	Count int64     `json:"count"`
	Sum   float64   `json:"sum"`
	Min   float64   `json:"min"`
	Max   float64   `json:"max"`
}

func newRuleState(r *rule) *ruleState {
	st := &ruleState{rule: r, gate: map[string]time.Time{}}
	switch r.kind {
	case kindSequence, kindAbsence:
		st.pending = map[string]*pendingItem{}
	case kindWindow:
		st.groups = map[string]*windowGroup{}
	}
	return st
}

// install replaces the rule set, keeping the state of every rule whose name and fingerprint stay the same.
func (m *machine) install(set *ruleSet) {
	old := m.states
	m.set = set
	m.states = make(map[string]*ruleState, len(set.rules))
	m.timers.reset()
	for _, r := range set.rules {
		st, ok := old[r.name]
		if !ok || st.rule.fingerprint != r.fingerprint {
			st = newRuleState(r)
		}
		st.rule = r
		m.states[r.name] = st
		for _, p := range st.pending {
			p.timer.idx = -1
			m.timers.set(p.timer, p.timer.at)
		}
		if st.closeAt != nil {
			st.closeAt.idx = -1
			m.timers.set(st.closeAt, st.closeAt.at)
		}
	}
	m.dirty = true
}

// evalCtx is one event as the rules see it; the parts of env are filled in when a rule first needs them.
type evalCtx struct {
	m         *machine
	ev        *event.Event
	now       time.Time
	env       env
	have      needs
	base      bool
	dev       Device
	devOK     bool
	devLooked bool
	depth     int
}

func (m *machine) newCtx(ev *event.Event, now time.Time) *evalCtx {
	return &evalCtx{m: m, ev: ev, now: now, depth: chainDepth(ev)}
}

// prepare fills in what n needs and returns the environment.
func (c *evalCtx) prepare(n needs) *env {
	if !c.base {
		c.base = true
		c.env.Event = eventEnv{ID: c.ev.ID(), Type: c.ev.Type(), Source: c.ev.Source(), Subject: c.ev.Subject(),
			Time: c.ev.Time(), Extensions: c.ev.Extensions()}
		c.env.Now = c.now
	}
	missing := n &^ c.have
	if missing == 0 {
		return &c.env
	}
	if missing&needData != 0 {
		c.env.Data = decodeData(c.ev)
		c.env.Event.Data = c.env.Data
	}
	if missing&needDevice != 0 {
		c.device()
	}
	if missing&needState != 0 && c.m.store != nil {
		if s, ok := c.m.store.Get(c.ev.Subject()); ok {
			c.env.State = s
		}
	}
	c.have |= n
	return &c.env
}

func (c *evalCtx) device() (Device, bool) {
	if !c.devLooked {
		c.devLooked = true
		if c.m.dir != nil && c.ev.Subject() != "" {
			c.dev, c.devOK = c.m.dir.Device(c.ev.Subject())
		}
		if !c.devOK {
			c.dev = Device{}
		}
		c.env.Device = deviceEnv{ID: c.dev.ID, Name: c.dev.Name, Room: c.dev.Room, Kind: c.dev.Kind, Labels: c.dev.Labels, Known: c.devOK}
	}
	return c.dev, c.devOK
}

// decodeData returns the event's data as JSON values, or as text when it is not JSON.
func decodeData(ev *event.Event) any {
	b := ev.Data()
	if len(b) == 0 {
		return nil
	}
	ct := ev.DataContentType()
	jsonish := ct == "" || strings.HasPrefix(ct, "application/json") || strings.HasPrefix(ct, "text/json") ||
		strings.Contains(ct, "+json")
	if jsonish {
		if v, err := decodeJSON(b); err == nil {
			return v
		}
	}
	return string(b)
}

// chainDepth reads the loop-guard extension (0 when absent or malformed).
func chainDepth(ev *event.Event) int {
	v, ok := ev.Extensions()[ExtChainDepth]
	if !ok {
		return 0
	}
	n, err := types.ToInteger(v)
	if err != nil || n < 0 {
		return 0
	}
	return int(n)
}

// handle evaluates one event at now (timers due before now must have been fired by the caller).
func (m *machine) handle(ev *event.Event, now time.Time) {
	c := m.newCtx(ev, now)
	rules := m.set.rules
	if !m.all {
		m.scratch = m.set.candidates(m.scratch[:0], ev.Type())
		rules = m.scratch
	}
	if m.met == nil {
		for _, r := range rules {
			m.evalRule(r, c)
		}
		return
	}
	for _, r := range rules {
		start := time.Now()
		m.evalRule(r, c)
		m.met.rule(r).duration.Observe(time.Since(start).Seconds())
	}
}

// contain turns a panic while r handles ev (a fault in an action's dependency, or a bug) into an evaluation
// error of r: the event goes on to the other rules, and the engine's lock is released as usual. It is deferred.
func (m *machine) contain(r *rule, ev *event.Event) {
	if p := recover(); p != nil {
		if ev == nil {
			e := event.New()
			ev = &e
		}
		m.fail(r, ev, fmt.Errorf("%w: %v", ErrEvalPanic, p))
	}
}

func (m *machine) fail(r *rule, ev *event.Event, err error) {
	if m.met != nil {
		m.met.rule(r).errors.Inc()
	}
	if m.tr != nil {
		m.tr.failed(r, err)
	}
	if m.onError != nil {
		m.onError(r, ev, err)
	}
}

func (m *machine) noMatch(r *rule, format string, args ...any) {
	if m.tr != nil {
		m.tr.noMatch(r, fmt.Sprintf(format, args...))
	}
}

func (m *machine) note(r *rule, format string, args ...any) {
	if m.tr != nil {
		m.tr.note(r, fmt.Sprintf(format, args...))
	}
}

// check runs a matcher (attributes, device, step condition) and reports why it fails ("" = match, err = the
// condition could not be evaluated).
func (c *evalCtx) check(mt *matcher) (string, error) {
	if why := mt.matchAttrs(c.ev); why != "" {
		return why, nil
	}
	if why := mt.matchDevice(c); why != "" {
		return why, nil
	}
	if mt.when != nil {
		ok, err := mt.when.bool(c.prepare(mt.when.needs))
		if err != nil {
			return "", fmt.Errorf("when: %s: %w", mt.when.src, err)
		}
		if !ok {
			return fmt.Sprintf("when: %s was false", mt.when.src), nil
		}
	}
	return "", nil
}

func (m *machine) evalRule(r *rule, c *evalCtx) {
	defer m.contain(r, c.ev)
	if m.met != nil {
		m.met.rule(r).evaluated.Inc()
	}
	why, err := c.check(r.on)
	if p := r.pair; err == nil && why == "" && p != nil {
		// A pair rule's condition is evaluated only for an event that can be one of its steps, as the index lets
		// only those through: a dry run, which shows every rule every event, then tells what the engine does.
		if whyA, whyB := p.a.matchAttrs(c.ev), p.b.matchAttrs(c.ev); whyA != "" && whyB != "" {
			why = fmt.Sprintf("%s: %s; %s: %s", p.aName, whyA, p.bName, whyB)
		}
	}
	if err == nil && why == "" && r.when != nil {
		var ok bool
		ok, err = r.when.bool(c.prepare(r.when.needs))
		if err != nil {
			err = fmt.Errorf("when: %s: %w", r.when.src, err)
		} else if !ok {
			why = fmt.Sprintf("when: %s was false", r.when.src)
		}
	}
	if err != nil {
		m.fail(r, c.ev, err)
		return
	}
	if why != "" {
		m.noMatch(r, "%s", why)
		return
	}
	st := m.states[r.name]
	switch r.kind {
	case kindSimple:
		m.matched(r)
		m.note(r, "matched")
		m.fire(st, c, "")
	case kindWindow:
		m.windowAdd(st, c)
	case kindSequence, kindAbsence:
		m.pairEvent(st, c)
	}
}

func (m *machine) matched(r *rule) {
	if m.met != nil {
		m.met.rule(r).matched.Inc()
	}
}

// gateKey is the key of debounce/throttle: the rule's key, else the pattern's key, else the subject.
func (m *machine) gateKey(r *rule, c *evalCtx, fallback string) (string, error) {
	if r.key != nil {
		k, err := r.key.key(c.prepare(r.key.needs))
		if err != nil {
			return "", fmt.Errorf("key: %w", err)
		}
		return k, nil
	}
	if fallback != "" {
		return fallback, nil
	}
	return c.ev.Subject(), nil
}

// fire passes the debounce/throttle gate and runs the actions.
func (m *machine) fire(st *ruleState, c *evalCtx, fallbackKey string) {
	r := st.rule
	if r.debounce > 0 || r.throttle > 0 {
		key, err := m.gateKey(r, c, fallbackKey)
		if err != nil {
			m.fail(r, c.ev, err)
			return
		}
		if until, seen := st.gate[key]; seen && c.now.Before(until) {
			if r.debounce > 0 { // each repeat extends the quiet period
				until = c.now.Add(r.debounce)
				st.gate[key] = until
				m.dirty = true
				m.note(r, "debounced until %s (key %q)", fmtTime(until), key)
			} else {
				m.note(r, "throttled until %s (key %q)", fmtTime(until), key)
			}
			return
		}
		if _, seen := st.gate[key]; !seen && len(st.gate) >= maxKeysPerRule {
			m.sweepGates(st, c.now)
		}
		if _, seen := st.gate[key]; seen || len(st.gate) < maxKeysPerRule {
			st.gate[key] = c.now.Add(r.debounce + r.throttle) // one of them is zero
			m.dirty = true
		} else {
			// too many keys to remember: act ungated rather than drop the action, and say so
			m.fail(r, c.ev, fmt.Errorf("debounce/throttle: %w", errTooManyKeys))
		}
	}
	m.runActions(r, c)
}

func (m *machine) sweepGates(st *ruleState, now time.Time) {
	for k, until := range st.gate {
		if !now.Before(until) {
			delete(st.gate, k)
		}
	}
}

// errLoopGuard refuses an emit whose cause is max_chain_depth derivations deep.
var errLoopGuard = errors.New("loop guard")

// runActions evaluates every action's templates and hands the results to the sink.
func (m *machine) runActions(r *rule, c *evalCtx) {
	var n needs
	for _, a := range r.actions {
		n |= a.needs()
	}
	e := c.prepare(n)
	for _, a := range r.actions {
		if err := m.runAction(r, a, c, e); err != nil {
			if !errors.Is(err, errLoopGuard) { // counted as the loop outcome
				m.met.action(r, a.kind, "error")
			}
			m.fail(r, c.ev, fmt.Errorf("%s (line %d): %w", a.describe(), a.line, err))
		}
	}
}

func (m *machine) runAction(r *rule, a *action, c *evalCtx, e *env) error {
	switch a.kind {
	case actCommand:
		body, _, err := a.payload.render(e)
		if err != nil {
			return fmt.Errorf("payload: %w", err)
		}
		targets, err := m.targets(a, e)
		if err != nil {
			return err
		}
		if len(targets) == 0 {
			m.met.action(r, a.kind, "no_target")
			if m.dir == nil {
				m.note(r, "command %s: no device selected (no device directory)", a.command)
			} else {
				m.note(r, "command %s: no device selected", a.command)
			}
			return nil
		}
		for _, id := range targets {
			m.sink.command(r, c.ev, id, a.command, body)
		}
	case actEmit:
		if c.depth+1 > m.maxDepth {
			m.met.action(r, a.kind, "loop")
			return fmt.Errorf("%w: the cause is %d derivations deep (max_chain_depth %d)", errLoopGuard, c.depth, m.maxDepth)
		}
		ev, err := m.derive(r, a, c, e)
		if err != nil {
			return err
		}
		m.sink.emit(r, ev)
	case actState:
		device := c.ev.Subject()
		if a.device != nil {
			d, err := a.device.render(e)
			if err != nil {
				return fmt.Errorf("device: %w", err)
			}
			device = d
		}
		if device == "" {
			return errors.New("device: empty")
		}
		key, err := a.stateKey.render(e)
		if err != nil {
			return fmt.Errorf("key: %w", err)
		}
		if key == "" {
			return fmt.Errorf("key: %s is empty", a.stateKey.raw)
		}
		v, err := a.value.eval(e)
		if err != nil {
			return fmt.Errorf("value: %w", err)
		}
		if _, err := json.Marshal(v); err != nil { // NaN, ±Inf: the state view could not be saved
			return fmt.Errorf("value: %v cannot be stored: %w", v, err)
		}
		m.sink.state(r, device, key, v)
	}
	return nil
}

// targets resolves a command's device or selector.
func (m *machine) targets(a *action, e *env) ([]string, error) {
	if a.device != nil {
		id, err := a.device.render(e)
		if err != nil {
			return nil, fmt.Errorf("device: %w", err)
		}
		if id == "" {
			return nil, errors.New("device: empty")
		}
		// A literal device was checked at load; one rendered from the event is checked here, so that an unknown
		// id is this rule's error rather than a command sent to no device.
		if _, lit := a.device.literal(); !lit && m.dir != nil {
			if _, ok := m.dir.Device(id); !ok {
				return nil, fmt.Errorf("device: unknown device %q (not in the device registry)", id)
			}
		}
		return []string{id}, nil
	}
	sel := make(map[string]string, len(a.to))
	for _, s := range a.to {
		v, err := s.val.render(e)
		if err != nil {
			return nil, fmt.Errorf("to.%s: %w", s.key, err)
		}
		if v == "" {
			return nil, fmt.Errorf("to.%s: %s is empty", s.key, s.val.raw)
		}
		sel[s.key] = v
	}
	if m.dir == nil {
		return nil, nil
	}
	devs := m.dir.Select(sel)
	ids := make([]string, len(devs))
	for i, d := range devs {
		ids[i] = d.ID
	}
	return ids, nil
}

// derive builds the event of an emit action.
func (m *machine) derive(r *rule, a *action, c *evalCtx, e *env) (*event.Event, error) {
	ev := event.New()
	ev.SetID(m.newID())
	ev.SetSource(m.source)
	ev.SetType(a.evType)
	ev.SetTime(c.now)
	subject := c.ev.Subject()
	if a.subject != nil {
		s, err := a.subject.render(e)
		if err != nil {
			return nil, fmt.Errorf("subject: %w", err)
		}
		subject = s
	}
	if subject != "" {
		ev.SetSubject(subject)
	}
	if a.payload != nil {
		body, isJSON, err := a.payload.render(e)
		if err != nil {
			return nil, fmt.Errorf("data: %w", err)
		}
		ct := "text/plain"
		if isJSON {
			ct = event.ApplicationJSON
		}
		ev.SetDataContentType(ct)
		ev.DataEncoded = body
	}
	corr := c.ev.ID()
	if v, ok := c.ev.Extensions()[ExtCorrelationID]; ok {
		if s, err := types.ToString(v); err == nil && s != "" {
			corr = s
		}
	}
	ev.SetExtension(ExtCausationID, c.ev.ID())
	ev.SetExtension(ExtCorrelationID, corr)
	ev.SetExtension(ExtChainDepth, int32(c.depth+1))
	ev.SetExtension(ExtRule, r.name)
	if err := ev.Validate(); err != nil {
		return nil, fmt.Errorf("derived event: %w", err)
	}
	return &ev, nil
}

// pairEvent plays one event through a sequence or absence rule: it may complete (sequence) or cancel (absence)
// what is pending for its key, and it may start something new.
func (m *machine) pairEvent(st *ruleState, c *evalCtx) {
	r := st.rule
	p := r.pair
	whyB, err := c.check(p.b)
	if err != nil {
		m.fail(r, c.ev, fmt.Errorf("%s.%s: %w", r.kind, p.bName, err))
		return
	}
	whyA, err := c.check(p.a)
	if err != nil {
		m.fail(r, c.ev, fmt.Errorf("%s.%s: %w", r.kind, p.aName, err))
		return
	}
	if whyA != "" && whyB != "" {
		m.noMatch(r, "%s: %s; %s: %s", p.aName, whyA, p.bName, whyB)
		return
	}
	m.matched(r)
	key, err := m.pairKey(r, c)
	if err != nil {
		m.fail(r, c.ev, err)
		return
	}
	if whyB == "" {
		if pend, ok := st.pending[key]; ok {
			m.timers.remove(pend.timer)
			delete(st.pending, key)
			m.dirty = true
			if r.kind == kindAbsence {
				m.note(r, "absence cancelled for key %q: %s arrived %s after %s", key, c.ev.Type(), c.now.Sub(pend.at), pend.ev.Type())
			} else {
				m.note(r, "sequence completed for key %q: %s %s after %s", key, c.ev.Type(), c.now.Sub(pend.at), pend.ev.Type())
				c.env.First = firstEnv(pend.ev)
				m.fire(st, c, key)
				c.env.First = eventEnv{}
			}
		} else if whyA != "" {
			m.note(r, "%s for key %q with nothing pending", p.bName, key)
		}
	}
	if whyA == "" {
		pend, ok := st.pending[key]
		if !ok {
			if len(st.pending) >= maxKeysPerRule {
				m.fail(r, c.ev, fmt.Errorf("%s: %w", r.kind, errTooManyKeys))
				return
			}
			pend = &pendingItem{}
			kind := timerSequence
			if r.kind == kindAbsence {
				kind = timerAbsence
			}
			pend.timer = &timerItem{kind: kind, st: st, key: key, idx: -1}
			st.pending[key] = pend
		}
		pend.at, pend.ev = c.now, c.ev
		due := c.now.Add(p.within)
		m.timers.set(pend.timer, due)
		m.dirty = true
		if r.kind == kindAbsence {
			m.note(r, "absence armed for key %q: fires at %s unless %s arrives", key, fmtTime(due), p.b.typeDesc())
		} else {
			m.note(r, "sequence started for key %q: waiting for %s until %s", key, p.b.typeDesc(), fmtTime(due))
		}
	}
}

func (mt *matcher) typeDesc() string {
	if mt.typ.isSet() {
		return mt.typ.raw
	}
	return "a matching event"
}

// pairKey is the correlation key of a sequence/absence: its own key, else the rule's key, else the subject.
func (m *machine) pairKey(r *rule, c *evalCtx) (string, error) {
	k := r.pair.key
	if k == nil {
		k = r.key
	}
	if k == nil {
		if s := c.ev.Subject(); s != "" {
			return s, nil
		}
		return "", errors.New("key: the event has no subject")
	}
	s, err := k.key(c.prepare(k.needs))
	if err != nil {
		return "", fmt.Errorf("key: %w", err)
	}
	return s, nil
}

func firstEnv(ev *event.Event) eventEnv {
	return eventEnv{ID: ev.ID(), Type: ev.Type(), Source: ev.Source(), Subject: ev.Subject(), Time: ev.Time(),
		Extensions: ev.Extensions(), Data: decodeData(ev)}
}

// nextTimer returns the earliest deadline.
func (m *machine) nextTimer() (time.Time, bool) { return m.timers.next() }

// advance fires every timer due at or before now, each at its own deadline. It returns how many fired.
func (m *machine) advance(now time.Time) int {
	n := 0
	for m.fireNext(now) {
		n++
	}
	return n
}

// fireNext fires the earliest timer if it is due at or before now.
func (m *machine) fireNext(now time.Time) bool {
	it := m.timers.popDue(now)
	if it == nil {
		return false
	}
	m.dirty = true
	m.fireTimer(it)
	return true
}

func (m *machine) fireTimer(it *timerItem) {
	st := it.st
	r := st.rule
	switch it.kind {
	case timerAbsence, timerSequence:
		pend, ok := st.pending[it.key]
		if !ok || pend.timer != it {
			return
		}
		defer m.contain(r, pend.ev)
		delete(st.pending, it.key)
		if it.kind == timerSequence {
			m.note(r, "sequence expired for key %q: no %s within %s of %s", it.key, r.pair.b.typeDesc(), r.pair.within, pend.ev.Type())
			return
		}
		m.note(r, "absence fired for key %q: no %s within %s after %s %s", it.key, r.pair.b.typeDesc(), r.pair.within, pend.ev.Type(), pend.ev.ID())
		m.fire(st, m.newCtx(pend.ev, it.at), it.key)
	case timerWindowClose:
		defer m.contain(r, nil)
		m.closeWindows(st, it.at)
	}
}

// bucketStart aligns t to the rule's slide: windows start at whole multiples of slide counted from the zero time
// (for slides that divide a day, at the same instants every day), so they are reproducible.
func (w *windowSpec) bucketStart(t time.Time) time.Time {
	return t.UTC().Truncate(w.slide)
}

func (m *machine) windowAdd(st *ruleState, c *evalCtx) {
	r := st.rule
	w := r.window
	var gk *cexpr
	switch {
	case w.groupBy != nil:
		gk = w.groupBy
	case r.key != nil:
		gk = r.key
	}
	group := c.ev.Subject()
	if gk != nil {
		k, err := gk.key(c.prepare(gk.needs))
		if err != nil {
			m.fail(r, c.ev, fmt.Errorf("window.group_by: %w", err))
			return
		}
		group = k
	}
	v := 1.0
	if w.value != nil {
		f, err := w.value.number(c.prepare(w.value.needs))
		if err != nil {
			m.fail(r, c.ev, fmt.Errorf("window.value: %s: %w", w.value.src, err))
			return
		}
		if math.IsNaN(f) || math.IsInf(f, 0) {
			m.fail(r, c.ev, fmt.Errorf("window.value: %s is %v", w.value.src, f))
			return
		}
		v = f
	}
	g, ok := st.groups[group]
	if !ok {
		if len(st.groups) >= maxKeysPerRule {
			m.fail(r, c.ev, fmt.Errorf("window: %w", errTooManyKeys))
			return
		}
		g = &windowGroup{}
		st.groups[group] = g
	}
	m.matched(r)
	start := w.bucketStart(c.now)
	end := start.Add(w.slide)
	if w.emit != "close" {
		// First what housekeeping forgets by now: a group whose window emptied since its last event is no longer
		// past the threshold, whether or not a sweep ran in between (a dry run never sweeps).
		if g.buckets = pruneBuckets(g.buckets, end.Add(-w.size)); len(g.buckets) == 0 {
			g.above = false
		}
	}
	n := len(g.buckets)
	if n > 0 && g.buckets[n-1].Start.Equal(start) {
		b := &g.buckets[n-1]
		b.Count++
		b.Sum += v
		b.Min = math.Min(b.Min, v)
		b.Max = math.Max(b.Max, v)
	} else {
		g.buckets = append(g.buckets, bucket{Start: start, Count: 1, Sum: v, Min: v, Max: v})
		if n > 0 && start.Before(g.buckets[n-1].Start) {
			g.buckets = sortBuckets(g.buckets)
		}
	}
	g.last = c.ev
	m.dirty = true
	if w.emit == "close" {
		// prune buckets that can no longer be part of a window that closes from now on
		g.buckets = pruneBuckets(g.buckets, end.Add(-w.size))
		if st.closeAt == nil {
			st.closeAt = &timerItem{kind: timerWindowClose, st: st, idx: -1}
		}
		if st.closeAt.idx < 0 || end.Before(st.closeAt.at) {
			m.timers.set(st.closeAt, end)
		}
		m.note(r, "window: %s added to group %q (window closes at %s)", formatValue(v), group, fmtTime(st.closeAt.at))
		return
	}
	agg := aggregate(g.buckets, end.Add(-w.size), end)
	we := windowValue(w, group, agg, end)
	c.env.Window = we
	defer func() { c.env.Window = windowEnv{} }()
	ok, err := w.threshold.bool(c.prepare(w.threshold.needs))
	if err != nil {
		m.fail(r, c.ev, fmt.Errorf("window.threshold: %s: %w", w.threshold.src, err))
		return
	}
	was := g.above
	g.above = ok
	switch {
	case ok && !was:
		m.note(r, "window: group %q crossed %s (%s %s over %d events)", group, w.threshold.src, w.agg, formatValue(we.Value), agg.Count)
		m.fire(st, c, group)
	case ok:
		m.note(r, "window: group %q still past %s (%s %s)", group, w.threshold.src, w.agg, formatValue(we.Value))
	default:
		m.note(r, "window: group %q: %s is false (%s %s)", group, w.threshold.src, w.agg, formatValue(we.Value))
	}
}

// sortBuckets sorts b by start in place, merges buckets of the same start and returns the shorter slice.
func sortBuckets(b []bucket) []bucket {
	for i := 1; i < len(b); i++ {
		for j := i; j > 0 && b[j].Start.Before(b[j-1].Start); j-- {
			b[j], b[j-1] = b[j-1], b[j]
		}
	}
	// merge equal starts
	out := b[:0]
	for _, x := range b {
		if n := len(out); n > 0 && out[n-1].Start.Equal(x.Start) {
			y := &out[n-1]
			y.Count += x.Count
			y.Sum += x.Sum
			y.Min = math.Min(y.Min, x.Min)
			y.Max = math.Max(y.Max, x.Max)
			continue
		}
		out = append(out, x)
	}
	return out
}

// pruneBuckets drops buckets that start before from.
func pruneBuckets(b []bucket, from time.Time) []bucket {
	i := 0
	for i < len(b) && b[i].Start.Before(from) {
		i++
	}
	if i == 0 {
		return b
	}
	return append(b[:0], b[i:]...)
}

// aggregate merges the buckets in [from, to).
func aggregate(bs []bucket, from, to time.Time) bucket {
	var out bucket
	for _, b := range bs {
		if b.Start.Before(from) || !b.Start.Before(to) {
			continue
		}
		if out.Count == 0 {
			out.Min, out.Max = b.Min, b.Max
		} else {
			out.Min = math.Min(out.Min, b.Min)
			out.Max = math.Max(out.Max, b.Max)
		}
		out.Count += b.Count
		out.Sum += b.Sum
	}
	return out
}

func windowValue(w *windowSpec, group string, b bucket, end time.Time) windowEnv {
	we := windowEnv{Key: group, Count: b.Count, Sum: b.Sum, Min: b.Min, Max: b.Max, Start: end.Add(-w.size), End: end}
	if b.Count > 0 {
		we.Avg = b.Sum / float64(b.Count)
	}
	switch w.agg {
	case "count":
		we.Value = float64(b.Count)
	case "sum":
		we.Value = we.Sum
	case "avg":
		we.Value = we.Avg
	case "min":
		we.Value = we.Min
	case "max":
		we.Value = we.Max
	}
	return we
}

// closeWindows closes the windows ending at end for every group, then schedules the next close.
func (m *machine) closeWindows(st *ruleState, end time.Time) {
	r := st.rule
	w := r.window
	from := end.Add(-w.size)
	for _, group := range sortedKeys(st.groups) {
		g := st.groups[group]
		agg := aggregate(g.buckets, from, end)
		if agg.Count > 0 && g.last != nil {
			m.closeGroup(st, group, g, agg, end)
		}
		g.buckets = pruneBuckets(g.buckets, end.Add(w.slide-w.size))
		if len(g.buckets) == 0 {
			delete(st.groups, group)
		}
	}
	// the next close is the first one after end that has data
	next := time.Time{}
	for _, g := range st.groups {
		if len(g.buckets) > 0 {
			t := g.buckets[0].Start.Add(w.slide)
			if !t.After(end) {
				t = end.Add(w.slide)
			}
			if next.IsZero() || t.Before(next) {
				next = t
			}
		}
	}
	if !next.IsZero() {
		m.timers.set(st.closeAt, next)
	}
}

func (m *machine) closeGroup(st *ruleState, group string, g *windowGroup, agg bucket, end time.Time) {
	r := st.rule
	w := r.window
	c := m.newCtx(g.last, end)
	we := windowValue(w, group, agg, end)
	c.env.Window = we
	if w.threshold != nil {
		ok, err := w.threshold.bool(c.prepare(w.threshold.needs))
		if err != nil {
			m.fail(r, g.last, fmt.Errorf("window.threshold: %s: %w", w.threshold.src, err))
			return
		}
		if !ok {
			m.note(r, "window closed for group %q: %s was false (%s %s over %d events)", group, w.threshold.src, w.agg, formatValue(we.Value), agg.Count)
			return
		}
	}
	m.matched(r)
	m.note(r, "window closed for group %q: %s %s over %d events [%s, %s)", group, w.agg, formatValue(we.Value), agg.Count, fmtTime(we.Start), fmtTime(end))
	m.fire(st, c, group)
}

// sweep forgets expired gates and window groups without recent data (housekeeping, bounded memory).
func (m *machine) sweep(now time.Time) {
	for _, st := range m.states {
		m.sweepGates(st, now)
		if w := st.rule.window; w != nil && w.emit == "crossing" {
			cut := w.bucketStart(now).Add(w.slide - w.size)
			for k, g := range st.groups {
				g.buckets = pruneBuckets(g.buckets, cut)
				if len(g.buckets) == 0 {
					delete(st.groups, k)
				}
			}
		}
	}
}

func fmtTime(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }
