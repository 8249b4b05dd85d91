package devices

import (
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestStateSaveLoad: what Save wrote comes back through Load as it was, except online, which is false after a
// restart; the device seen last is the most recent; Changes counts events and Sets.
func TestStateSaveLoad(t *testing.T) {
	s := NewStateView()
	s.Apply(newEvent(t, "door-1", PresenceConnected, t0, "", ""))
	s.Apply(newEvent(t, "door-1", "door.opened", t0.Add(time.Second), "application/json", `{"open":true,"battery":81,"tags":["a","b"]}`))
	s.Apply(newEvent(t, "thermo-1", "telemetry", t0.Add(2*time.Second), "application/json", `{"celsius":21.5}`))
	s.Set("kitchen", "occupied", true)
	s.Set("kitchen", "since", map[string]any{"n": 3.0, "by": "motion"})
	if got := s.Changes(); got != 5 {
		t.Fatalf("Changes = %d after 3 events and 2 Sets, want 5", got)
	}
	path := filepath.Join(t.TempDir(), "device-state.json")
	if err := s.Save(path); err != nil {
		t.Fatal(err)
	}

	r := NewStateView()
	n, err := r.Load(path)
	if err != nil || n != 3 {
		t.Fatalf("Load = %d, %v; want 3 devices", n, err)
	}
	for _, id := range []string{"door-1", "thermo-1", "kitchen"} {
		want, _ := s.Get(id)
		if _, ok := want[KeyOnline]; ok {
			want[KeyOnline] = false
		}
		got, ok := r.Get(id)
		if !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("%s after Load:\n got %#v\nwant %#v", id, got, want)
		}
	}
	if seen, ok := mustGet(t, r, "door-1")[KeyLastSeen].(time.Time); !ok || !seen.Equal(t0.Add(time.Second)) {
		t.Errorf("door-1 last_seen after Load = %#v, want the time %s", mustGet(t, r, "door-1")[KeyLastSeen], t0.Add(time.Second))
	}
	// The next event applies over the loaded state as over the live one.
	r.Apply(newEvent(t, "door-1", "door.closed", t0.Add(3*time.Second), "application/json", `{"open":false}`))
	if rep := mustGet(t, r, "door-1")[KeyReported].(map[string]any); rep["open"] != false || rep["battery"] != 81.0 {
		t.Errorf("door-1 reported after a new event: %v", rep)
	}
}

func mustGet(t *testing.T, s *StateView, id string) map[string]any {
	t.Helper()
	st, ok := s.Get(id)
	if !ok {
		t.Fatalf("no state for %s", id)
	}
	return st
}

// TestStateLoadBadFiles: no file is an empty start; a file that is not a saved state is an error naming it and
// leaves the view as it was.
func TestStateLoadBadFiles(t *testing.T) {
	dir := t.TempDir()
	s := NewStateView()
	if n, err := s.Load(filepath.Join(dir, "missing.json")); n != 0 || err != nil {
		t.Fatalf("Load of a missing file = %d, %v; want 0, nil", n, err)
	}
	for name, body := range map[string]string{
		"truncated.json": `{"version":1,"devices":{"a":{"last_seen":"2026-`,
		"version.json":   `{"version":7,"devices":{}}`,
		"null.json":      `{"version":1,"devices":{"a":null}}`,
	} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Load(path); err == nil || !strings.Contains(err.Error(), path) {
			t.Errorf("Load of %s: %v, want an error naming the file", name, err)
		}
	}
	if st := s.Stats(); st.Devices != 0 {
		t.Errorf("%d devices after failed loads, want 0", st.Devices)
	}
}

// TestStateSavedWhateverRulesSet: what a rule sets never keeps the view from being saved or loaded: a value JSON
// cannot encode is stored as null, and a last_seen that is not a time is left out at load, with the rest of the
// state kept (the file used to be refused whole, and moved aside with every device's state).
func TestStateSavedWhateverRulesSet(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	s := NewStateView()
	s.Set("a", "ratio", math.Inf(1))
	s.Set("a", "nan", map[string]any{"x": math.NaN()})
	s.Set("b", KeyLastSeen, "never")
	s.Set("b", "mode", "eco")
	if err := s.Save(path); err != nil {
		t.Fatalf("Save: %v", err)
	}
	l := NewStateView()
	if n, err := l.Load(path); n != 2 || err != nil {
		t.Fatalf("Load = %d, %v; want 2, nil", n, err)
	}
	if a := mustGet(t, l, "a"); a["ratio"] != nil || a["nan"] != nil {
		t.Errorf("a = %v, want ratio and nan null", a)
	}
	b := mustGet(t, l, "b")
	if _, ok := b[KeyLastSeen]; ok || b["mode"] != "eco" {
		t.Errorf("b = %v, want mode eco and no last_seen", b)
	}
}

// TestStateKeepsLongIntegers: an integer beyond 2^53 (a nanosecond timestamp, a 64-bit counter), which a float64
// cannot hold exactly, keeps every digit in the state view, as an int64, through Save and Load too; other
// numbers are float64s, as encoding/json decodes them; an integer too long for an int64 is a float64.
func TestStateKeepsLongIntegers(t *testing.T) {
	const data = `{"ts":1733500000123456789,"neg":-9007199254740993,"small":42,"exact":9007199254740992,` +
		`"huge":123456789012345678901234,"nested":{"id":9223372036854775807,"list":[18014398509481985,1.5]}}`
	want := map[string]any{
		"ts": int64(1733500000123456789), "neg": int64(-9007199254740993), "small": 42.0, "exact": 9007199254740992.0,
		"huge":   123456789012345678901234.0,
		"nested": map[string]any{"id": int64(9223372036854775807), "list": []any{int64(18014398509481985), 1.5}},
	}
	s := NewStateView()
	s.Apply(newEvent(t, "meter-1", "telemetry", t0, "application/json", data))
	if got := mustGet(t, s, "meter-1")[KeyReported]; !reflect.DeepEqual(got, want) {
		t.Errorf("reported:\n got %#v\nwant %#v", got, want)
	}
	s.Set("meter-1", "last", int64(1733500000123456789))
	path := filepath.Join(t.TempDir(), "device-state.json")
	if err := s.Save(path); err != nil {
		t.Fatal(err)
	}
	r := NewStateView()
	if _, err := r.Load(path); err != nil {
		t.Fatal(err)
	}
	got := mustGet(t, r, "meter-1")
	if !reflect.DeepEqual(got[KeyReported], want) {
		t.Errorf("reported after Load:\n got %#v\nwant %#v", got[KeyReported], want)
	}
	if got["last"] != int64(1733500000123456789) {
		t.Errorf("last after Load = %#v, want int64 1733500000123456789", got["last"])
	}
}

// TestStateReplayAfterLoad: SaveAt's log position comes back from LoadAt (0 from a file without one); events
// replayed onto the loaded view merge as applied ones do, except that a replayed connection does not make the
// device online.
func TestStateReplayAfterLoad(t *testing.T) {
	s := NewStateView()
	s.Apply(newEvent(t, "door-1", "door.opened", t0, "application/json", `{"open":true,"battery":81}`))
	path := filepath.Join(t.TempDir(), "device-state.json")
	if err := s.SaveAt(path, 42); err != nil {
		t.Fatal(err)
	}
	r := NewStateView()
	if n, pos, err := r.LoadAt(path); err != nil || n != 1 || pos != 42 {
		t.Fatalf("LoadAt = %d devices, position %d, %v; want 1, 42", n, pos, err)
	}
	r.Replay(newEvent(t, "door-1", PresenceConnected, t0.Add(time.Second), "", ""))
	r.Replay(newEvent(t, "door-1", "door.closed", t0.Add(2*time.Second), "application/json", `{"open":false}`))
	st := mustGet(t, r, "door-1")
	if online, _ := st[KeyOnline].(bool); online {
		t.Errorf("online after a replayed connection: %v", st)
	}
	if rep := st[KeyReported].(map[string]any); rep["open"] != false || rep["battery"] != 81.0 {
		t.Errorf("reported after replay = %v", rep)
	}
	if st[KeyLastEvent] != "door.closed" || !st[KeyLastSeen].(time.Time).Equal(t0.Add(2*time.Second)) {
		t.Errorf("last event/seen after replay = %v", st)
	}
	r.Apply(newEvent(t, "door-1", PresenceConnected, t0.Add(3*time.Second), "", ""))
	if online, _ := mustGet(t, r, "door-1")[KeyOnline].(bool); !online {
		t.Error("an applied connection did not make the device online")
	}

	if err := os.WriteFile(path, []byte(`{"version":1,"devices":{"a":{"x":1}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if n, pos, err := NewStateView().LoadAt(path); err != nil || n != 1 || pos != 0 {
		t.Errorf("LoadAt of a file without a position = %d, %d, %v; want 1, 0", n, pos, err)
	}
}
