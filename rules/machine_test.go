package rules

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
)

func TestPattern(t *testing.T) {
	tests := []struct {
		pat, s string
		want   bool
	}{
		{"room.entered", "room.entered", true},
		{"room.entered", "room.entered2", false},
		{"room.*", "room.entered", true},
		{"room.*", "room.", true},
		{"room.*", "room", false},
		{"room.*", "hall.entered", false},
		{"*", "", true},
		{"*", "anything", true},
		{"*.entered", "room.entered", true},
		{"*.entered", "room.left", false},
		{"a*b*c", "abc", true},
		{"a*b*c", "axxbyyc", true},
		{"a*b*c", "acb", false},
		{"a*a", "a", false},
		{"/gateways/*/devices/kitchen-*", "/gateways/gw/devices/kitchen-motion", true},
	}
	for _, tt := range tests {
		if got := newPattern(tt.pat).match(tt.s); got != tt.want {
			t.Errorf("%q.match(%q) = %v, want %v", tt.pat, tt.s, got, tt.want)
		}
	}
}

func TestMatchAndWhen(t *testing.T) {
	const src = `
rules:
  - name: by-type
    on: {type: door.opened}
    actions: [{emit: {type: a.by-type}}]
  - name: by-wildcard
    on: {type: "sensor.*"}
    actions: [{emit: {type: a.by-wildcard}}]
  - name: by-source
    on: {type: door.opened, source: "/gateways/*/devices/door-1"}
    actions: [{emit: {type: a.by-source}}]
  - name: by-subject
    on: {subject: "thermo-*"}
    actions: [{emit: {type: a.by-subject}}]
  - name: by-device
    on: {type: "*", device: {kind: motion-sensor, room: kitchen, labels.floor: "0"}}
    actions: [{emit: {type: a.by-device}}]
  - name: hot
    on: sensor.temperature
    when: data.temp > 30
    actions: [{emit: {type: a.hot, data: {temp: '{{ data.temp }}', room: '{{ device.room }}'}}}]
  - name: stateful
    on: sensor.temperature
    when: state.mode == "away"
    actions: [{emit: {type: a.stateful}}]
`
	tests := []struct {
		name string
		ev   func() (string, string, any)
		want []string
		why  []string // expected explanations (substrings of notes)
	}{
		{"type", func() (string, string, any) { return "door.opened", "door-1", nil },
			[]string{"by-type: emit a.by-type ", "by-source: emit a.by-source "},
			[]string{"by-wildcard: no match: type door.opened ≠ sensor.*", `by-subject: no match: subject "door-1" ≠ thermo-*`}},
		{"wildcard, subject, when true", func() (string, string, any) { return "sensor.temperature", "thermo-1", map[string]any{"temp": 31.5} },
			[]string{"by-wildcard: emit a.by-wildcard ", "by-subject: emit a.by-subject ",
				`hot: emit a.hot {"room":"living-room","temp":31.5}`},
			[]string{`by-device: no match: device.kind "thermometer" ≠ motion-sensor`, "stateful: no match: when: state.mode == \"away\" was false"}},
		{"when false", func() (string, string, any) { return "sensor.temperature", "thermo-1", map[string]any{"temp": 20} },
			[]string{"by-wildcard: emit a.by-wildcard ", "by-subject: emit a.by-subject "},
			[]string{"hot: no match: when: data.temp > 30 was false"}},
		{"device metadata", func() (string, string, any) { return "room.entered", "kitchen-motion", nil },
			[]string{"by-device: emit a.by-device "}, nil},
		{"unknown device", func() (string, string, any) { return "room.entered", "ghost", nil },
			nil, []string{`by-device: no match: device: subject "ghost" is not in the directory`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, r := newMachine(t, src, homeDevices)
			m.all = true
			typ, subj, data := tt.ev()
			m.handle(newEvent(typ, subj, t0, data), t0)
			got := r.take()
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("actions\n got %q\nwant %q\nnotes %q\nerrs %q", got, tt.want, r.notes, r.errs)
			}
			for _, w := range tt.why {
				if !containsLine(r.notes, w) {
					t.Errorf("no note %q in %q", w, r.notes)
				}
			}
		})
	}
}

func containsLine(lines []string, sub string) bool {
	for _, l := range lines {
		if strings.Contains(l, sub) {
			return true
		}
	}
	return false
}

func TestEvalErrorsGoOn(t *testing.T) {
	const src = `
rules:
  - name: typed
    on: sensor.temperature
    when: data.temp > 30
    actions: [{emit: {type: a.hot}}]
  - name: after
    on: sensor.temperature
    actions: [{emit: {type: a.after}}]
`
	m, r := newMachine(t, src, homeDevices)
	m.handle(newEvent("sensor.temperature", "thermo-1", t0, map[string]any{"temp": "hot"}), t0)
	if got := r.take(); len(got) != 1 || got[0] != "after: emit a.after " {
		t.Fatalf("actions = %q", got)
	}
	if len(r.errs) != 1 || !strings.Contains(r.errs[0], "typed: when: data.temp > 30") {
		t.Fatalf("errors = %q", r.errs)
	}
}

func TestDebounceThrottle(t *testing.T) {
	const src = `
rules:
  - name: deb
    on: button.pressed
    debounce: 30s
    actions: [{state: {key: pressed, value: '{{ event.id }}'}}]
  - name: thr
    on: button.pressed
    throttle: 30s
    key: data.room
    actions: [{emit: {type: pressed.throttled}}]
`
	m, r := newMachine(t, src, homeDevices)
	steps := []struct {
		at         time.Duration
		subj, room string
		want       []string
	}{
		{0, "b1", "kitchen", []string{`deb: state b1 pressed="ID"`, "thr: emit pressed.throttled "}},
		{10 * time.Second, "b1", "kitchen", nil},                                      // deb extended to 40s; thr closed until 30s
		{20 * time.Second, "b2", "kitchen", []string{`deb: state b2 pressed="ID"`}},   // deb is per subject; thr per room
		{35 * time.Second, "b1", "kitchen", []string{"thr: emit pressed.throttled "}}, // deb still closed (until 40s, now 65s)
		{36 * time.Second, "b1", "hall", []string{"thr: emit pressed.throttled "}},
		{96 * time.Second, "b1", "kitchen", []string{`deb: state b1 pressed="ID"`, "thr: emit pressed.throttled "}},
	}
	for i, s := range steps {
		now := t0.Add(s.at)
		e := newEvent("button.pressed", s.subj, now, map[string]any{"room": s.room})
		m.advance(now)
		m.handle(e, now)
		got := r.take()
		want := make([]string, len(s.want))
		for j, w := range s.want {
			want[j] = strings.ReplaceAll(w, "ID", e.ID())
		}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Fatalf("step %d: got %q want %q\nnotes %q", i, got, want, r.notes)
		}
	}
	if !containsLine(r.notes, "deb: debounced until 2024-05-01T10:01:05Z") || !containsLine(r.notes, "thr: throttled until 2024-05-01T10:00:30Z") {
		t.Fatalf("notes %q", r.notes)
	}
}

// crossingRule emits when the one-minute maximum of data.temp goes above 30.
const crossingRule = `
rules:
  - name: w
    on: sensor.temperature
    window: {size: 1m, agg: max, value: data.temp, emit: crossing, threshold: window.value > 30}
    actions: [{emit: {type: crossed, data: '{{ window.value }}'}}]`

func TestWindows(t *testing.T) {
	temp := func(at time.Duration, subj string, v float64) *step {
		return &step{at: at, ev: newEvent("sensor.temperature", subj, t0.Add(at), map[string]any{"temp": v})}
	}
	tests := []struct {
		name  string
		rule  string
		steps []step
	}{
		{
			name: "tumbling count on close",
			rule: `
rules:
  - name: w
    on: sensor.temperature
    window: {size: 1m}
    actions: [{emit: {type: count, data: '{{ window.key }} {{ window.count }} {{ window.start }}'}}]`,
			steps: []step{
				*temp(0, "t1", 1), *temp(10*time.Second, "t1", 2), *temp(20*time.Second, "t2", 3),
				{at: 59 * time.Second},
				{at: 60 * time.Second, want: []string{"w: emit count t1 2 2024-05-01T10:00:00Z", "w: emit count t2 1 2024-05-01T10:00:00Z"}},
				*temp(90*time.Second, "t1", 4),
				{at: 10 * time.Minute, want: []string{"w: emit count t1 1 2024-05-01T10:01:00Z"}},
				{at: 20 * time.Minute},
			},
		},
		{
			name: "tumbling avg with threshold, grouped by room",
			rule: `
rules:
  - name: w
    on: sensor.temperature
    window: {size: 1m, agg: avg, value: data.temp, group_by: device.room, threshold: window.value > 20}
    actions: [{emit: {type: hot, data: '{{ window.key }} {{ window.value }} {{ window.min }} {{ window.max }} {{ window.sum }}'}}]`,
			steps: []step{
				*temp(0, "thermo-1", 10), *temp(10*time.Second, "thermo-1", 40),
				{at: 60 * time.Second, want: []string{"w: emit hot living-room 25 10 40 50"}},
				*temp(70*time.Second, "thermo-1", 10),
				{at: 120 * time.Second},
			},
		},
		{
			name: "sliding sum",
			rule: `
rules:
  - name: w
    on: sensor.temperature
    window: {size: 3m, slide: 1m, agg: sum, value: data.temp}
    actions: [{emit: {type: sum, data: '{{ window.value }} {{ window.end }}'}}]`,
			steps: []step{
				*temp(30*time.Second, "t1", 1),
				{at: 60 * time.Second, want: []string{"w: emit sum 1 2024-05-01T10:01:00Z"}},
				*temp(90*time.Second, "t1", 10),
				{at: 120 * time.Second, want: []string{"w: emit sum 11 2024-05-01T10:02:00Z"}},
				{at: 180 * time.Second, want: []string{"w: emit sum 11 2024-05-01T10:03:00Z"}},
				{at: 240 * time.Second, want: []string{"w: emit sum 10 2024-05-01T10:04:00Z"}},
				{at: 300 * time.Second},
			},
		},
		{
			name: "crossing fires once per crossing",
			rule: crossingRule,
			steps: []step{
				*temp(0, "t1", 20),
				{at: 10 * time.Second, ev: newEvent("sensor.temperature", "t1", t0.Add(10*time.Second), map[string]any{"temp": 35}), want: []string{"w: emit crossed 35"}},
				*temp(20*time.Second, "t1", 36),
				*temp(65*time.Second, "t1", 20), // new window: max 20, below again
				{at: 70 * time.Second, ev: newEvent("sensor.temperature", "t1", t0.Add(70*time.Second), map[string]any{"temp": 31}), want: []string{"w: emit crossed 31"}},
			},
		},
		{
			// No housekeeping sweep runs here (as in a dry run): the window's emptying alone ends the crossing.
			name: "crossing again after the window emptied",
			rule: crossingRule,
			steps: []step{
				{at: 0, ev: newEvent("sensor.temperature", "t1", t0, map[string]any{"temp": 35}), want: []string{"w: emit crossed 35"}},
				{at: 5 * time.Minute, ev: newEvent("sensor.temperature", "t1", t0.Add(5*time.Minute), map[string]any{"temp": 36}), want: []string{"w: emit crossed 36"}},
			},
		},
		{
			// The wall clock steps back (an NTP correction): the event lands in an earlier bucket, counted once.
			name: "clock stepping back counts each event once",
			rule: `
rules:
  - name: w
    on: sensor.temperature
    window: {size: 10m, slide: 1m, emit: crossing, threshold: window.count >= 6}
    actions: [{emit: {type: many, data: '{{ window.count }}'}}]`,
			steps: []step{
				*temp(0, "t1", 1), *temp(60*time.Second, "t1", 1), *temp(120*time.Second, "t1", 1),
				*temp(30*time.Second, "t1", 1), *temp(125*time.Second, "t1", 1), // five events: below 6
				{at: 130 * time.Second, ev: newEvent("sensor.temperature", "t1", t0.Add(130*time.Second), map[string]any{"temp": 1}), want: []string{"w: emit many 6"}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, r := newMachine(t, tt.rule, homeDevices)
			runSteps(t, m, r, tt.steps)
			if len(r.errs) > 0 {
				t.Fatalf("errors: %q", r.errs)
			}
		})
	}
}

func TestSequence(t *testing.T) {
	const src = `
rules:
  - name: intruder
    sequence:
      first: {type: door.opened, when: 'data.open == true'}
      then: motion.detected
      within: 2m
      key: device.room
    actions: [{emit: {type: intrusion, data: '{{ first.id }}>{{ event.id }} {{ first.data.open }}'}}]
`
	m, r := newMachine(t, src, homeDevices)
	open := newEvent("door.opened", "door-1", t0, map[string]any{"open": true})
	motion1 := newEvent("motion.detected", "hall-motion", t0.Add(time.Minute), nil)
	motion2 := newEvent("motion.detected", "hall-motion", t0.Add(90*time.Second), nil)
	open2 := newEvent("door.opened", "door-1", t0.Add(10*time.Minute), map[string]any{"open": true})
	late := newEvent("motion.detected", "hall-motion", t0.Add(13*time.Minute), nil)
	closed := newEvent("door.opened", "door-1", t0.Add(20*time.Minute), map[string]any{"open": false})
	kitchen := newEvent("motion.detected", "kitchen-motion", t0.Add(20*time.Minute+time.Second), nil)
	runSteps(t, m, r, []step{
		{at: 0, ev: open},
		{at: time.Minute, ev: motion1, want: []string{"intruder: emit intrusion " + open.ID() + ">" + motion1.ID() + " true"}},
		{at: 90 * time.Second, ev: motion2}, // consumed: nothing pending
		{at: 10 * time.Minute, ev: open2},
		{at: 13 * time.Minute, ev: late}, // expired at 12m
		{at: 20 * time.Minute, ev: closed},
		{at: 20*time.Minute + time.Second, ev: kitchen}, // other key
	})
	for _, w := range []string{`sequence expired for key "hall"`, `then for key "hall" with nothing pending`,
		"first: when: data.open == true was false"} {
		if !containsLine(r.notes, w) {
			t.Errorf("no note %q in\n%s", w, strings.Join(r.notes, "\n"))
		}
	}
}

func TestAbsence(t *testing.T) {
	const src = `
rules:
  - name: door-left-open
    absence: {after: door.opened, missing: door.closed, within: 5m}
    actions: [{emit: {type: door.left-open, data: '{{ event.id }} {{ now }}'}}]
`
	m, r := newMachine(t, src, homeDevices)
	o1 := newEvent("door.opened", "door-1", t0, nil)
	c1 := newEvent("door.closed", "door-1", t0.Add(time.Minute), nil)
	o2 := newEvent("door.opened", "door-1", t0.Add(2*time.Minute), nil)
	o3 := newEvent("door.opened", "door-1", t0.Add(3*time.Minute), nil) // re-arms
	runSteps(t, m, r, []step{
		{at: 0, ev: o1},
		{at: time.Minute, ev: c1},
		{at: 2 * time.Minute, ev: o2},
		{at: 3 * time.Minute, ev: o3},
		{at: 7*time.Minute + 59*time.Second},
		{at: 9 * time.Minute, want: []string{"door-left-open: emit door.left-open " + o3.ID() + " 2024-05-01T10:08:00Z"}},
		{at: time.Hour},
	})
	if m.timers.len() != 0 {
		t.Fatalf("%d timers left", m.timers.len())
	}
}

func TestReferenceScenario(t *testing.T) {
	rules, _, err := loadDir("../configs/rules.d", shippedDevices(t))
	if err != nil {
		t.Fatal(err)
	}
	r := &rec{}
	m := &machine{dir: shippedDevices(t), store: r, sink: r, tr: r, source: DefaultSource, maxDepth: 8, newID: func() string { return "x" }}
	m.install(newRuleSet(rules))
	kitchen := func(at time.Duration, data any) *event.Event {
		return newEvent("room.entered", "kitchen-motion", t0.Add(at), data)
	}
	e1 := kitchen(0, map[string]any{"room": "kitchen"})
	e2 := kitchen(20*time.Second, map[string]any{"room": "kitchen"})
	e3 := kitchen(45*time.Second, map[string]any{}) // no room in data: the sensor's room
	hall := newEvent("room.entered", "hall-motion", t0.Add(time.Minute), nil)
	e4 := kitchen(10*time.Minute, map[string]any{"room": "kitchen"})
	on := func(ev *event.Event, light string) string {
		return `lights-on-motion: command ` + light + ` lights.on {"cause":"` + ev.ID() + `","on":true}`
	}
	off := func(ev *event.Event, light string) string {
		return `lights-off-when-empty: command ` + light + ` lights.off {"cause":"` + ev.ID() + `","on":false}`
	}
	runSteps(t, m, r, []step{
		{at: 0, ev: e1, want: []string{on(e1, "kitchen-light-1"), on(e1, "kitchen-light-2")}},
		{at: 20 * time.Second, ev: e2}, // debounced
		{at: 45 * time.Second, ev: e3}, // debounced (30s since e2), room from metadata
		{at: time.Minute, ev: hall, want: []string{on(hall, "hall-light")}},
		{at: 5*time.Minute + 44*time.Second},
		{at: 5*time.Minute + 45*time.Second, want: []string{off(e3, "kitchen-light-1"), off(e3, "kitchen-light-2")}},
		{at: 6 * time.Minute, want: []string{off(hall, "hall-light")}},
		{at: 10 * time.Minute, ev: e4, want: []string{on(e4, "kitchen-light-1"), on(e4, "kitchen-light-2")}},
	})
	if len(r.errs) > 0 {
		t.Fatalf("errors: %q", r.errs)
	}
}

// TestStateValueNotJSON: a state value JSON cannot encode (a division by zero's +Inf) is an evaluation error of
// the rule, not a value that would keep the device state view from being saved.
func TestStateValueNotJSON(t *testing.T) {
	m, r := newMachine(t, `
rules:
  - name: ratio
    on: sensor.reading
    actions: [{state: {key: ratio, value: '{{ data.a / data.b }}'}}]
`, nil)
	m.handle(newEvent("sensor.reading", "s1", t0, map[string]any{"a": 1, "b": 0}), t0)
	if len(r.acts) != 0 || len(r.errs) != 1 || !strings.Contains(r.errs[0], "cannot be stored") {
		t.Fatalf("actions %q, errors %q; want none and one error", r.acts, r.errs)
	}
	m.handle(newEvent("sensor.reading", "s1", t0, map[string]any{"a": 1, "b": 4}), t0)
	if got, want := r.take(), []string{"ratio: state s1 ratio=0.25"}; !slices.Equal(got, want) {
		t.Fatalf("actions %q, want %q", got, want)
	}
}

func TestLoopGuard(t *testing.T) {
	const src = `
rules:
  - name: echo
    on: ping
    actions: [{emit: {type: ping}}]
`
	m, r := newMachine(t, src, nil)
	ev := newEvent("ping", "d", t0, nil)
	for depth := 1; ; depth++ {
		m.handle(ev, t0)
		if len(r.emits) < depth {
			break
		}
		ev = r.emits[depth-1]
		if got := chainDepth(ev); got != depth {
			t.Fatalf("depth = %d, want %d", got, depth)
		}
		if depth > 100 {
			t.Fatal("loop not stopped")
		}
	}
	if len(r.emits) != DefaultMaxChainDepth {
		t.Fatalf("%d events derived, want %d", len(r.emits), DefaultMaxChainDepth)
	}
	first, last := r.emits[0], r.emits[len(r.emits)-1]
	if last.Extensions()[ExtCorrelationID] != first.Extensions()[ExtCausationID] {
		t.Fatalf("correlation id %v, want the first cause %v", last.Extensions()[ExtCorrelationID], first.Extensions()[ExtCausationID])
	}
	if len(r.errs) != 1 || !strings.Contains(r.errs[0], "loop guard") {
		t.Fatalf("errors %q", r.errs)
	}
}

// TestLongIntegersStayExact: an integer beyond 2^53 in the event's data (a nanosecond timestamp, a 64-bit
// counter) keeps every digit in templates and compares exactly in conditions.
func TestLongIntegersStayExact(t *testing.T) {
	const src = `
rules:
  - name: echo
    on: room.entered
    when: data.ts == 1733490000000000001 && data.ts > 1733490000000000000
    actions:
      - command: {device: kitchen-light-1, command: lights.on, payload: {ts: '{{ data.ts }}', next: '{{ data.ts + 1 }}'}}
`
	m, r := newMachine(t, src, homeDevices)
	m.handle(newEvent("room.entered", "kitchen-motion", t0, json.RawMessage(`{"ts":1733490000000000001}`)), t0)
	want := `echo: command kitchen-light-1 lights.on {"next":1733490000000000002,"ts":1733490000000000001}`
	if got := r.take(); len(got) != 1 || got[0] != want {
		t.Fatalf("actions = %q, want %q (errors %q)", got, want, r.errs)
	}
}
