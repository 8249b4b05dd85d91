package rules

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
)

// FuzzLoadRules feeds raw bytes to the rule loader: it must never panic, and whatever it accepts must evaluate
// (on a few events, with timers) without panicking either. Seeds: testdata/fuzz/FuzzLoadRules, the shipped
// rules and the dry-run rules.
func FuzzLoadRules(f *testing.F) {
	for _, glob := range []string{"../configs/rules.d/*.yaml", "testdata/dryrun/features/*.yaml"} {
		files, _ := filepath.Glob(glob)
		for _, p := range files {
			if b, err := os.ReadFile(p); err == nil {
				f.Add(b)
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		rules, _, err := parseRules("fuzz.yaml", data, homeDevices)
		if err != nil {
			if len(err.Error()) == 0 {
				t.Fatal("empty error")
			}
			return
		}
		r := &rec{}
		m := &machine{dir: homeDevices, store: r, sink: r, tr: r, source: DefaultSource, maxDepth: 3,
			newID: func() string { return "id" }}
		set := newRuleSet(rules)
		m.install(set)
		_ = set.infos()
		at := t0
		for i, ev := range fuzzEvents(at) {
			now := at.Add(time.Duration(i) * 7 * time.Second)
			m.advance(now)
			m.handle(ev, now)
		}
		m.advance(at.Add(set.maxSpan + time.Hour))
		if _, err := m.snapshot(at); err != nil {
			t.Fatal(err)
		}
	})
}

func fuzzEvents(at time.Time) []*event.Event {
	return []*event.Event{
		newEvent("room.entered", "kitchen-motion", at, map[string]any{"room": "kitchen"}),
		newEvent("sensor.temperature", "thermo-1", at, map[string]any{"temp": 31.5}),
		newEvent("x", "hall-light", at, []byte("plain text")),
		newEvent("y", "unknown", at, nil),
		newEvent("room.entered", "hall-motion", at, map[string]any{"room": 3}),
	}
}

// FuzzDryRunEvents feeds raw bytes as the recorded events of a dry run of the shipped rules: lines that are not
// CloudEvents are reported, nothing panics. Seeds: testdata/fuzz/FuzzDryRunEvents and testdata/dryrun/*.jsonl.
func FuzzDryRunEvents(f *testing.F) {
	files, _ := filepath.Glob("testdata/dryrun/*.jsonl")
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	cfg := DefaultConfig().withDefaults()
	cfg.Dir = "testdata/dryrun/features"
	dir := withDoor(homeDevices)
	rules, _, err := loadDir(cfg.Dir, dir) // compiled once: rules are immutable, every run gets fresh state
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		_ = runDry(cfg, rules, nil, dir, bytes.NewReader(data), io.Discard, DryRunOptions{})
	})
}

// FuzzTemplate compiles and renders arbitrary templates.
func FuzzTemplate(f *testing.F) {
	for _, s := range []string{"", "plain", "{{ data.room }}", "a {{ event.id }} b {{ 1 + 2 }}", "{{", "}}", "{{ }}",
		"{{ data }}{{ device }}", `{{ coalesce(data?.x, "y") }}`} {
		f.Add(s)
	}
	ev := newEvent("room.entered", "kitchen-motion", t0, map[string]any{"room": "kitchen", "n": 2})
	f.Fuzz(func(t *testing.T, s string) {
		tm, err := compileTemplate(s)
		if err != nil {
			return
		}
		m := &machine{dir: homeDevices}
		c := m.newCtx(ev, t0)
		e := c.prepare(needData | needDevice | needState)
		_, _ = tm.render(e)
		_, _ = tm.valueOf(e)
	})
}
