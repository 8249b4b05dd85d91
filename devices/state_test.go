package devices

import (
	"fmt"
	"maps"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func newEvent(t testing.TB, subject, typ string, at time.Time, ct string, data string) *event.Event {
	t.Helper()
	ev := event.New()
	ev.SetID(fmt.Sprintf("%s-%s-%d", subject, typ, at.UnixNano()))
	ev.SetSource("edgegate/test")
	ev.SetType(typ)
	ev.SetSubject(subject)
	if !at.IsZero() {
		ev.SetTime(at)
	}
	if data != "" {
		if err := ev.SetData(ct, []byte(data)); err != nil {
			t.Fatal(err)
		}
	}
	return &ev
}

func TestStateApply(t *testing.T) {
	type step struct {
		typ  string
		at   time.Time
		ct   string
		data string
	}
	tests := []struct {
		name  string
		steps []step
		want  map[string]any
	}{
		{
			name:  "json object merged into reported",
			steps: []step{{"room.entered", t0, "application/json", `{"room":"hall","n":1,"nested":{"a":[1,2]}}`}},
			want: map[string]any{"last_seen": t0, "last_event": "room.entered",
				"reported": map[string]any{"room": "hall", "n": 1.0, "nested": map[string]any{"a": []any{1.0, 2.0}}}},
		},
		{
			name: "later fields replace, null removes, others stay",
			steps: []step{
				{"t", t0, "application/json", `{"a":1,"b":2,"c":3}`},
				{"t", t0.Add(time.Second), "application/json; charset=utf-8", `{"a":10,"b":null}`},
			},
			want: map[string]any{"last_seen": t0.Add(time.Second), "last_event": "t",
				"reported": map[string]any{"a": 10.0, "c": 3.0}},
		},
		{
			name: "presence",
			steps: []step{
				{PresenceConnected, t0, "application/json", `{"reason":"x"}`},
				{"x", t0.Add(time.Second), "", ""},
				{PresenceDisconnected, t0.Add(2 * time.Second), "", ""},
			},
			want: map[string]any{"last_seen": t0.Add(2 * time.Second), "last_event": PresenceDisconnected,
				"online": false},
		},
		{
			name:  "prefixed presence type",
			steps: []step{{"home." + PresenceConnected, t0, "", ""}},
			want:  map[string]any{"last_seen": t0, "last_event": "home.device.connected", "online": true},
		},
		{
			name:  "not presence",
			steps: []step{{"mydevice.connected", t0, "", ""}},
			want:  map[string]any{"last_seen": t0, "last_event": "mydevice.connected"},
		},
		{
			name: "older event does not move last_seen back",
			steps: []step{
				{"a", t0, "", ""},
				{"b", t0.Add(-time.Minute), "", ""},
			},
			want: map[string]any{"last_seen": t0, "last_event": "b"},
		},
		{
			name: "non-object and non-JSON data are not merged",
			steps: []step{
				{"a", t0, "application/json", `[1,2]`},
				{"b", t0, "text/plain", `{"a":1}`},
				{"c", t0, "application/octet-stream", `{"a":1}`},
				{"d", t0, "application/json", `{"a":`},
				{"e", t0, "application/json", `42`},
			},
			want: map[string]any{"last_seen": t0, "last_event": "e"},
		},
		{
			name:  "+json content type and no content type are JSON",
			steps: []step{{"a", t0, "application/cloudevents+json", `{"x":1}`}, {"b", t0, "", `{"y":2}`}},
			want:  map[string]any{"last_seen": t0, "last_event": "b", "reported": map[string]any{"x": 1.0, "y": 2.0}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewStateView()
			for _, st := range tt.steps {
				s.Apply(newEvent(t, "dev", st.typ, st.at, st.ct, st.data))
			}
			got, ok := s.Get("dev")
			if !ok {
				t.Fatal("Get: no state")
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("state = %#v\nwant    %#v", got, tt.want)
			}
		})
	}
}

func TestStateIgnores(t *testing.T) {
	s := NewStateView()
	s.Apply(nil)
	s.Apply(newEvent(t, "", "x", t0, "", `{"a":1}`))
	s.Set("", "k", 1)
	s.Set("dev", "", 1)
	if st := s.Stats(); st.Devices != 0 {
		t.Fatalf("%d devices tracked, want 0", st.Devices)
	}
	if _, ok := s.Get("dev"); ok {
		t.Fatal("Get(dev) found state")
	}
}

func TestStateNoTime(t *testing.T) {
	s := NewStateView()
	before := time.Now()
	s.Apply(newEvent(t, "dev", "x", time.Time{}, "", ""))
	st, _ := s.Get("dev")
	if seen, ok := st[KeyLastSeen].(time.Time); !ok || seen.Before(before) {
		t.Fatalf("last_seen = %v, want the receipt time", st[KeyLastSeen])
	}
}

func TestStateSetAndCopies(t *testing.T) {
	s := NewStateView()
	s.Apply(newEvent(t, "dev", "x", t0, "application/json", `{"list":[1],"obj":{"k":"v"}}`))
	s.Set("dev", "occupied", true)
	s.Set("other", "count", 3)
	got, _ := s.Get("dev")
	if got["occupied"] != true {
		t.Fatalf("occupied = %v", got["occupied"])
	}
	// Changing what Get returned must not change the view.
	rep := got[KeyReported].(map[string]any)
	rep["list"].([]any)[0] = "changed"
	rep["obj"].(map[string]any)["k"] = "changed"
	rep["new"] = 1
	got["occupied"] = false
	again, _ := s.Get("dev")
	want := map[string]any{"last_seen": t0, "last_event": "x", "occupied": true,
		"reported": map[string]any{"list": []any{1.0}, "obj": map[string]any{"k": "v"}}}
	if !reflect.DeepEqual(again, want) {
		t.Fatalf("state changed through a returned copy:\n%#v\nwant\n%#v", again, want)
	}
	snap := s.Snapshot()
	if len(snap) != 2 || snap["other"]["count"] != 3 || !reflect.DeepEqual(snap["dev"], want) {
		t.Fatalf("Snapshot = %#v", snap)
	}
	snap["dev"][KeyReported].(map[string]any)["obj"].(map[string]any)["k"] = "changed"
	if again, _ := s.Get("dev"); !reflect.DeepEqual(again, want) {
		t.Fatal("state changed through a snapshot")
	}
}

func TestStateSetCopiesValue(t *testing.T) {
	s := NewStateView()
	v := map[string]any{"a": []any{1.0}}
	s.Set("dev", "k", v)
	v["a"].([]any)[0] = "changed"
	v["b"] = 2
	got, _ := s.Get("dev")
	if want := map[string]any{"a": []any{1.0}}; !reflect.DeepEqual(got["k"], want) {
		t.Fatalf("k = %#v, want %#v: the caller's later change leaked in", got["k"], want)
	}
}

func TestStateSetReported(t *testing.T) {
	s := NewStateView()
	s.Set("dev", KeyReported, map[string]any{"a": 1.0})
	s.Apply(newEvent(t, "dev", "x", t0, "application/json", `{"b":2}`))
	got, _ := s.Get("dev")
	if want := map[string]any{"a": 1.0, "b": 2.0}; !reflect.DeepEqual(got[KeyReported], want) {
		t.Fatalf("reported = %#v, want %#v", got[KeyReported], want)
	}
	s.Set("dev", KeyReported, "cleared")
	s.Apply(newEvent(t, "dev", "x", t0, "application/json", `{"c":3}`))
	got, _ = s.Get("dev")
	if want := map[string]any{"c": 3.0}; !reflect.DeepEqual(got[KeyReported], want) {
		t.Fatalf("reported = %#v, want %#v", got[KeyReported], want)
	}
}

func TestStateKeyBound(t *testing.T) {
	s := NewStateView()
	var b strings.Builder
	b.WriteString("{")
	for i := range MaxStateKeys + 10 {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, `"k%03d":%d`, i, i)
	}
	b.WriteString("}")
	s.Apply(newEvent(t, "dev", "x", t0, "application/json", b.String()))
	got, _ := s.Get("dev")
	rep := got[KeyReported].(map[string]any)
	if keys := len(got) + len(rep); keys != MaxStateKeys {
		t.Fatalf("%d keys kept, want %d", keys, MaxStateKeys)
	}
	// last_seen, last_event and reported take 3 keys; the first fields (sorted) are the ones kept.
	if _, ok := rep["k000"]; !ok {
		t.Error("k000 dropped; want the first fields kept")
	}
	if st := s.Stats(); st.DroppedKeys != 13 {
		t.Errorf("DroppedKeys = %d, want 13", st.DroppedKeys)
	}
	// Existing keys still update at the bound; new Set keys are dropped.
	s.Apply(newEvent(t, "dev", "y", t0, "application/json", `{"k000":"updated"}`))
	s.Set("dev", "new", 1)
	got, _ = s.Get("dev")
	if got[KeyReported].(map[string]any)["k000"] != "updated" || got[KeyLastEvent] != "y" {
		t.Error("existing keys did not update at the bound")
	}
	if _, ok := got["new"]; ok {
		t.Error("a new key was added beyond the bound")
	}
}

func TestStateBytesBound(t *testing.T) {
	s := NewStateView()
	big := strings.Repeat("x", MaxReportedBytes/2)
	s.Apply(newEvent(t, "dev", "x", t0, "application/json", fmt.Sprintf(`{"a":%q,"b":%q,"c":1}`, big, big)))
	got, _ := s.Get("dev")
	rep := got[KeyReported].(map[string]any)
	if _, ok := rep["a"]; !ok {
		t.Error("a dropped")
	}
	if _, ok := rep["b"]; ok {
		t.Error("b kept although it exceeds MaxReportedBytes")
	}
	if rep["c"] != 1.0 {
		t.Error("c dropped although it fits")
	}
	// Removing a frees its bytes.
	s.Apply(newEvent(t, "dev", "x", t0, "application/json", fmt.Sprintf(`{"a":null,"b":%q}`, big)))
	got, _ = s.Get("dev")
	if rep := got[KeyReported].(map[string]any); rep["b"] != big || rep["a"] != nil {
		t.Errorf("after removing a, reported has keys %v", slicesKeys(rep))
	}
	if st := s.Stats(); st.DroppedKeys != 1 {
		t.Errorf("DroppedKeys = %d, want 1", st.DroppedKeys)
	}
}

func slicesKeys(m map[string]any) []string {
	var out []string
	for k := range maps.Keys(m) {
		out = append(out, k)
	}
	return out
}

func TestStateDeviceBound(t *testing.T) {
	s := NewStateView()
	for i := range MaxStateDevices + 5 {
		s.Set(fmt.Sprintf("dev-%d", i), "k", i)
		if i == MaxStateDevices-1 {
			s.Set("dev-0", "k", "touched") // dev-0 is now the most recently updated
		}
	}
	st := s.Stats()
	if st.Devices != MaxStateDevices || st.EvictedDevices != 5 {
		t.Fatalf("Stats = %+v, want %d devices and 5 evicted", st, MaxStateDevices)
	}
	if _, ok := s.Get("dev-0"); !ok {
		t.Error("dev-0 (recently updated) was evicted")
	}
	for _, gone := range []string{"dev-1", "dev-2", "dev-3", "dev-4", "dev-5"} {
		if _, ok := s.Get(gone); ok {
			t.Errorf("%s (least recently updated) is still tracked", gone)
		}
	}
}

func TestStateConcurrent(t *testing.T) {
	s := NewStateView()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				dev := fmt.Sprintf("dev-%d", i%7)
				switch (g + i) % 4 {
				case 0:
					s.Apply(newEvent(t, dev, "x", t0.Add(time.Duration(i)), "application/json", `{"a":{"b":[1]}}`))
				case 1:
					s.Set(dev, "k", map[string]any{"i": i})
				case 2:
					if st, ok := s.Get(dev); ok {
						if rep, ok := st[KeyReported].(map[string]any); ok {
							rep["a"] = nil // a copy: must not race
						}
					}
				case 3:
					s.Snapshot()
					s.Stats()
				}
			}
		})
	}
	wg.Wait()
}
