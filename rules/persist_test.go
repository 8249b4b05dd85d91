package rules

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/prometheus/client_golang/prometheus"
)

const persistRules = `
rules:
  - name: win-close
    on: sensor.temperature
    window: {size: 2m, slide: 1m, agg: avg, value: data.temp}
    actions: [{emit: {type: avg, data: '{{ window.key }} {{ window.value }} {{ window.count }} {{ event.id }}'}}]
  - name: win-cross
    on: sensor.temperature
    window: {size: 5m, agg: sum, value: data.temp, emit: crossing, threshold: window.value > 50}
    actions: [{emit: {type: crossed, data: '{{ window.value }}'}}]
  - name: seq
    sequence: {first: door.opened, then: room.entered, within: 3m, key: '"k"'}
    actions: [{emit: {type: seq, data: '{{ first.id }} {{ event.id }}'}}]
  - name: abs
    absence: {after: door.opened, missing: door.closed, within: 4m}
    debounce: 10m
    actions: [{emit: {type: abs, data: '{{ event.id }}'}}]
`

// TestSnapshotRestore checks that stopping (snapshot), restarting (restore) and going on gives the same actions as
// never stopping, at every possible stop.
func TestSnapshotRestore(t *testing.T) {
	type in struct {
		at time.Duration
		ev *event.Event
	}
	temp := func(at time.Duration, v float64) in {
		return in{at, newEvent("sensor.temperature", "thermo-1", t0.Add(at), map[string]any{"temp": v})}
	}
	door := func(at time.Duration, typ string) in { return in{at, newEvent(typ, "door-1", t0.Add(at), nil)} }
	inputs := []in{
		temp(10*time.Second, 20), door(20*time.Second, "door.opened"), temp(50*time.Second, 30),
		temp(70*time.Second, 10), {at: 2 * time.Minute}, door(150*time.Second, "door.opened"),
		{at: 3 * time.Minute}, temp(200*time.Second, 40), {at: 4 * time.Minute},
		in{250 * time.Second, newEvent("room.entered", "hall-motion", t0.Add(250*time.Second), nil)},
		{at: 7 * time.Minute}, door(8*time.Minute, "door.opened"), door(9*time.Minute, "door.closed"), {at: 20 * time.Minute},
	}
	run := func(m *machine, r *rec, from, to int) []string {
		var out []string
		for _, x := range inputs[from:to] {
			now := t0.Add(x.at)
			m.advance(now)
			if x.ev != nil {
				m.handle(x.ev, now)
			}
			out = append(out, r.take()...)
		}
		return out
	}
	full, fr := newMachine(t, persistRules, homeDevices)
	want := run(full, fr, 0, len(inputs))
	t.Logf("actions: %q", want)
	if len(want) < 5 {
		t.Fatalf("too few actions to compare: %q", want)
	}
	for stop := 1; stop < len(inputs); stop++ {
		m1, r1 := newMachine(t, persistRules, homeDevices)
		got := run(m1, r1, 0, stop)
		sf, err := m1.snapshot(t0.Add(inputs[stop-1].at))
		if err != nil {
			t.Fatal(err)
		}
		b, err := json.Marshal(sf)
		if err != nil {
			t.Fatal(err)
		}
		var back stateFile
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		m2, r2 := newMachine(t, persistRules, homeDevices)
		if _, errs := m2.restore(&back); len(errs) > 0 {
			t.Fatal(errs)
		}
		got = append(got, run(m2, r2, stop, len(inputs))...)
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Fatalf("stop after input %d:\n got %q\nwant %q", stop, got, want)
		}
	}
}

func TestRestoreSkipsChangedRules(t *testing.T) {
	m1, _ := newMachine(t, persistRules, homeDevices)
	m1.handle(newEvent("door.opened", "door-1", t0, nil), t0)
	sf, err := m1.snapshot(t0)
	if err != nil {
		t.Fatal(err)
	}
	changed := strings.Replace(persistRules, "within: 4m", "within: 5m", 1)
	m2, _ := newMachine(t, changed, homeDevices)
	n, errs := m2.restore(sf)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	if _, ok := sf.Rules["abs"]; !ok || m2.states["abs"].pending["door-1"] != nil {
		t.Fatal("state of a changed absence was restored")
	}
	if n != 1 || m2.states["seq"].pending["k"] == nil { // seq did not change
		t.Fatalf("restored %d rules", n)
	}
}

func TestStateFileRobustness(t *testing.T) {
	dir := t.TempDir()
	rulesDir := writeRules(t, map[string]string{"p.yaml": persistRules})
	path := filepath.Join(dir, "rules-state.json")
	for name, body := range map[string]string{
		"corrupt":     "{not json",
		"old version": `{"version": 99, "rules": {}}`,
		"bad entry":   `{"version": 1, "rules": {"abs": {"fingerprint": "x"}, "seq": {"fingerprint": "y", "pending": {"k": {"event": "bad"}}}}}`,
	} {
		t.Run(name, func(t *testing.T) {
			if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
			cfg := DefaultConfig()
			cfg.Dir = rulesDir
			cfg.StateFile = path
			e, err := New(cfg, Deps{}, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
			if err != nil {
				t.Fatalf("a bad state file must not stop the gateway: %v", err)
			}
			if len(e.Rules()) != 4 {
				t.Fatal("rules not loaded")
			}
		})
	}
	// the write is atomic: no temporary files are left behind
	m, _ := newMachine(t, persistRules, homeDevices)
	m.handle(newEvent("door.opened", "door-1", t0, nil), t0)
	sf, _ := m.snapshot(t0)
	if err := writeStateFile(path, sf); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("files in the state dir: %v", entries)
	}
	back, err := readStateFile(path)
	if err != nil || back.Rules["abs"] == nil || len(back.Rules["abs"].Pending) != 1 {
		t.Fatalf("read back %+v, %v", back, err)
	}
	if err := writeStateFile(filepath.Join(dir, "missing", "x.json"), sf); err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
}

// TestInstallKeepsState: a reload keeps the state of unchanged rules and drops that of changed or removed ones.
func TestInstallKeepsState(t *testing.T) {
	m, r := newMachine(t, persistRules, homeDevices)
	m.handle(newEvent("door.opened", "door-1", t0, nil), t0)
	m.handle(newEvent("sensor.temperature", "thermo-1", t0, map[string]any{"temp": 1}), t0)
	if m.timers.len() != 3 { // abs, seq, win-close
		t.Fatalf("%d timers", m.timers.len())
	}
	changed := strings.Replace(persistRules, "within: 3m", "within: 1m", 1) // seq changes
	rules, _, err := parseRules("test.yaml", []byte(changed), homeDevices)
	if err != nil {
		t.Fatal(err)
	}
	m.install(newRuleSet(rules[1:])) // win-close removed
	if m.timers.len() != 1 || len(m.states["seq"].pending) != 0 || len(m.states["abs"].pending) != 1 {
		t.Fatalf("after reload: %d timers, seq %d pending, abs %d pending", m.timers.len(),
			len(m.states["seq"].pending), len(m.states["abs"].pending))
	}
	if len(m.states["win-cross"].groups) != 1 {
		t.Fatal("window of an unchanged rule lost")
	}
	m.advance(t0.Add(time.Hour))
	if got := r.take(); len(got) != 1 || !strings.HasPrefix(got[0], "abs: emit abs") {
		t.Fatalf("actions %q", got)
	}
}

func TestCheck(t *testing.T) {
	infos, err := Check("../configs/rules.d", shippedDevices(t))
	if err != nil || len(infos) < 2 {
		t.Fatalf("Check = %v, %v", infos, err)
	}
	if infos[0].Name != "lights-on-motion" || infos[0].Kind != "simple" || infos[0].Actions[0] != "command lights.on" {
		t.Fatalf("info %+v", infos[0])
	}
	if _, err := Check("../configs/rules.d", testDirectory{}); err != nil {
		t.Fatalf("selectors need no device at load: %v", err)
	}
}
