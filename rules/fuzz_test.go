package rules

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/goccy/go-yaml/parser"
)

// FuzzLoadRules feeds raw bytes to the rule loader: it must never panic (a panic is contained as a problem of the
// file, so that a running gateway keeps its rules; only one of the YAML parser itself is not a failure here), and whatever it accepts must evaluate (a few events, the events
// they derive, and timers) without any rule's evaluation panicking either. Seeds: testdata/fuzz/FuzzLoadRules, the
// shipped rules and the dry-run rules.
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
			var le *LoadError
			if !errors.As(err, &le) {
				t.Fatalf("error %v is not a *LoadError", err)
			}
			for _, p := range le.Problems {
				if strings.HasPrefix(p.Message, errLoaderPanic.Error()) {
					t.Fatalf("the loader panicked: %s", p)
				}
				if strings.HasPrefix(p.Message, errYAMLPanic.Error()) && !yamlParserPanics(data) {
					t.Fatalf("problem %q, but the YAML parser does not panic on this input: a panic of the loader was hidden", p)
				}
			}
			return
		}
		met, err := newMetrics(nil)
		if err != nil {
			t.Fatal(err)
		}
		r := &rec{}
		m := &machine{dir: homeDevices, store: r, sink: r, tr: r, met: met, source: DefaultSource, maxDepth: 3,
			newID: func() string { return "id" },
			onError: func(ru *rule, ev *event.Event, err error) {
				if errors.Is(err, ErrEvalPanic) {
					t.Errorf("rule %s, event %s: %v", ru.name, ev.Type(), err)
				}
			}}
		set := newRuleSet(rules)
		m.install(set)
		_ = set.infos()
		at := t0
		for i, ev := range fuzzEvents(at) {
			now := at.Add(time.Duration(i) * 7 * time.Second)
			m.advance(now)
			// derived events come back like the gateway's log brings them back (a bounded number of them)
			queue := []*event.Event{ev}
			for n := 0; len(queue) > 0 && n < 50; n++ {
				m.handle(queue[0], now)
				queue = append(queue[1:], r.emits...)
				r.emits = nil
			}
			r.emits = nil
		}
		m.advance(at.Add(set.maxSpan + time.Hour))
		if _, err := m.snapshot(at); err != nil {
			t.Fatal(err)
		}
	})
}

// yamlParserPanics reports whether the YAML parser panics on data.
func yamlParserPanics(data []byte) (panicked bool) {
	defer func() {
		if recover() != nil {
			panicked = true
		}
	}()
	_, _ = parser.ParseBytes(data, 0)
	return false
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
