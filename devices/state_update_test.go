package devices

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
)

// applyFuncs are the two ways to apply an event; the data of every event given to them is valid JSON.
var applyFuncs = []struct {
	name  string
	apply func(*StateView, *event.Event)
}{{"Apply", (*StateView).Apply}, {"ApplyChecked", (*StateView).ApplyChecked}}

// checkReported checks the bookkeeping of the device's reported fields: the byte count is the sum of the field
// sizes, a raw field's size is its name plus its value, a raw buffer is not much larger than its value, and the
// bounds hold.
func checkReported(t *testing.T, s *StateView, device string) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	el, ok := s.devices[device]
	if !ok {
		t.Fatalf("device %q not tracked", device)
	}
	d := el.Value.(*deviceState)
	sum := 0
	for k, f := range d.reported {
		sum += f.size
		if f.raw == nil {
			continue
		}
		if f.size != len(k)+len(f.raw) {
			t.Errorf("field %q: size %d, want %d", k, f.size, len(k)+len(f.raw))
		}
		if cap(f.raw) > 2*len(f.raw)+64 {
			t.Errorf("field %q: a %d-byte value holds a %d-byte buffer", k, len(f.raw), cap(f.raw))
		}
	}
	if sum != d.repBytes {
		t.Errorf("repBytes = %d, fields add up to %d", d.repBytes, sum)
	}
	if d.repBytes > MaxReportedBytes || d.keys() > MaxStateKeys {
		t.Errorf("%d reported bytes and %d keys: beyond the bounds", d.repBytes, d.keys())
	}
}

// The same fields updated over and over: Get returns the latest values, and what an earlier Get returned does
// not change.
func TestStateRepeatedUpdates(t *testing.T) {
	for _, af := range applyFuncs {
		t.Run(af.name, func(t *testing.T) {
			s := NewStateView()
			want := map[string]any{}
			var prev, prevWant map[string]any
			for i := range 300 {
				str := strings.Repeat(string(rune('a'+i%26)), i*37%500)
				if i%50 == 0 {
					str = strings.Repeat("L", 6000) // then it shrinks: the large buffer must not stay
				}
				opt := fmt.Sprint(i)
				if i%3 == 0 {
					opt = "null"
				}
				payload := fmt.Sprintf(`{"n":%d,"s":%q,"obj":{"i":%d,"l":[%d,"x"]},"same":"constant","opt":%s}`,
					i, str, i, i, opt)
				at := t0.Add(time.Duration(i) * time.Second)
				af.apply(s, newEvent(t, "dev", fmt.Sprintf("t%d", i%4), at, "application/json", payload))

				var fields map[string]any
				if err := json.Unmarshal([]byte(payload), &fields); err != nil {
					t.Fatal(err)
				}
				for k, v := range fields {
					if v == nil {
						delete(want, k)
					} else {
						want[k] = v
					}
				}
				got, ok := s.Get("dev")
				if !ok {
					t.Fatal("Get: no state")
				}
				if !reflect.DeepEqual(got[KeyReported], want) {
					t.Fatalf("step %d: reported = %#v\nwant %#v", i, got[KeyReported], want)
				}
				if got[KeyLastSeen] != at || got[KeyLastEvent] != fmt.Sprintf("t%d", i%4) {
					t.Fatalf("step %d: last_seen %v, last_event %v", i, got[KeyLastSeen], got[KeyLastEvent])
				}
				if prev != nil && !reflect.DeepEqual(prev, prevWant) {
					t.Fatalf("step %d: a value read before the update changed:\n%#v\nwant %#v", i, prev, prevWant)
				}
				prev, prevWant = got[KeyReported].(map[string]any), deepCopy(want).(map[string]any)
				checkReported(t, s, "dev")
			}
		})
	}
}

// Updating existing fields in place keeps the bounds: an update that would exceed MaxReportedBytes is dropped and
// leaves the old value, and fields at MaxStateKeys still update.
func TestStateUpdateBounds(t *testing.T) {
	for _, af := range applyFuncs {
		t.Run(af.name, func(t *testing.T) {
			s := NewStateView()
			half := MaxReportedBytes / 2
			apply := func(payload string) { af.apply(s, newEvent(t, "dev", "x", t0, "application/json", payload)) }
			reported := func() map[string]any {
				got, _ := s.Get("dev")
				rep, _ := got[KeyReported].(map[string]any)
				return rep
			}
			for i := range 20 {
				apply(fmt.Sprintf(`{"a":%q}`, strings.Repeat(string(rune('a'+i)), half)))
				if got, want := reported()["a"], strings.Repeat(string(rune('a'+i)), half); got != want {
					t.Fatalf("update %d of a not applied", i)
				}
			}
			if st := s.Stats(); st.DroppedKeys != 0 {
				t.Fatalf("DroppedKeys = %d after same-size updates, want 0", st.DroppedKeys)
			}
			apply(fmt.Sprintf(`{"b":%q}`, strings.Repeat("b", half)))
			apply(fmt.Sprintf(`{"a":%q}`, strings.Repeat("z", MaxReportedBytes)))
			rep := reported()
			if _, ok := rep["b"]; ok {
				t.Error("b kept although it exceeds MaxReportedBytes")
			}
			if rep["a"] != strings.Repeat("t", half) {
				t.Error("a changed by an update that exceeds MaxReportedBytes; want the old value kept")
			}
			if st := s.Stats(); st.DroppedKeys != 2 {
				t.Errorf("DroppedKeys = %d, want 2", st.DroppedKeys)
			}
			checkReported(t, s, "dev")

			// At MaxStateKeys (3 top-level keys and the rest reported), existing fields keep updating.
			s = NewStateView()
			n := MaxStateKeys - 3
			for round := range 5 {
				var b strings.Builder
				b.WriteString(`{"new":1`)
				for i := range n {
					fmt.Fprintf(&b, `,"k%03d":%d`, i, round*1000+i)
				}
				b.WriteString("}")
				apply(b.String())
				rep := reported()
				if len(rep) != n || rep["k000"] != float64(round*1000) || rep[fmt.Sprintf("k%03d", n-1)] != float64(round*1000+n-1) {
					t.Fatalf("round %d: %d fields, k000 = %v", round, len(rep), rep["k000"])
				}
				if st := s.Stats(); st.DroppedKeys != uint64(round+1) {
					t.Fatalf("round %d: DroppedKeys = %d, want %d (new, once per event)", round, st.DroppedKeys, round+1)
				}
				checkReported(t, s, "dev")
			}
		})
	}
}

// Applying an event whose fields all exist already allocates nothing in the view, except when the event is newer:
// last_seen is a time.Time in a map[string]any, boxed anew for each newer time (1 allocation).
func TestStateApplySteadyAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector changes allocation counts")
	}
	const runs = 100
	for _, af := range applyFuncs {
		for _, newer := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/newer=%v", af.name, newer), func(t *testing.T) {
				evs := make([]*event.Event, runs+2)
				for i := range evs {
					at := t0
					if newer {
						at = t0.Add(time.Duration(i) * time.Second)
					}
					v := i % 2 // every event changes every field
					evs[i] = newEvent(t, "thermo-1", "telemetry", at, "application/json",
						fmt.Sprintf(`{"temperature":2%d.5,"humidity":4%d,"battery":9%d,"rssi":-6%d}`, v, v, v, v))
				}
				s := NewStateView()
				af.apply(s, evs[0]) // the device and its fields exist from here on
				i := 1
				allocs := testing.AllocsPerRun(runs, func() {
					af.apply(s, evs[i])
					i++
				})
				limit := 0.0
				if newer {
					limit = 1
				}
				if allocs > limit {
					t.Errorf("%v allocations per event, want at most %v", allocs, limit)
				}
				got, _ := s.Get("thermo-1")
				v := (i - 1) % 2
				want := map[string]any{"temperature": 20.5 + float64(v), "humidity": 40.0 + float64(v),
					"battery": 90.0 + float64(v), "rssi": -60.0 - float64(v)}
				if !reflect.DeepEqual(got[KeyReported], want) {
					t.Errorf("reported = %#v, want %#v", got[KeyReported], want)
				}
			})
		}
	}
}
