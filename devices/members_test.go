package devices

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"

	"github.com/cloudevents/sdk-go/v2/event"
)

// objectMembers agrees with encoding/json on every valid JSON object: the same names and values, a repeated
// name keeping its last value.
func FuzzObjectMembers(f *testing.F) {
	for _, seed := range []string{
		`{}`, ` { } `, `{"a":1}`, `{"a":1,"b":"x","c":null,"d":true,"e":false}`,
		`{"n":{"a":[1,{"b":"}"}],"c":"]"},"m":[[],{}]}`, `{"esc\"aped":"q\"uo\\te","\u00e9":"\u2028"}`,
		"{\n\t\"a\" :\r 1.5e3 ,\"b\"\t: -0 }", `{"a":1,"a":2}`, `{"a":"{\"not\":\"an object\"}"}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		b = bytes.TrimSpace(b)
		if len(b) == 0 || b[0] != '{' || !json.Valid(b) {
			return
		}
		var want map[string]any
		if err := json.Unmarshal(b, &want); err != nil {
			t.Fatalf("valid JSON object did not decode: %v", err)
		}
		got := map[string]any{}
		for _, m := range objectMembers(b, nil) {
			var v any
			if err := json.Unmarshal(m.raw, &v); err != nil {
				t.Fatalf("member %q: raw value %q: %v", m.key, m.raw, err)
			}
			got[string(m.key)] = v
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("members of %q:\n got %#v\nwant %#v", b, got, want)
		}
	})
}

// objectMembers does not panic on input that is not JSON, and neither does a StateView given such data through
// ApplyChecked (whose caller promises valid JSON): a broken promise gives odd fields, not a crash.
func FuzzObjectMembersAnyInput(f *testing.F) {
	for _, seed := range []string{
		`{"`, `{"a"`, `{"a":`, `{"a" `, `{"a\`, `{1}`, `{"a":1,`, `{"a":[`, `{"a":"`, `{"a":{"b":}`, `{,}`, `{"a"}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		b = append([]byte{'{'}, b...)
		b = b[:len(b):len(b)] // no spare capacity to hide an index past the end
		for _, m := range objectMembers(b, nil) {
			m.isNull()
		}
		s := NewStateView()
		ev := event.New()
		ev.SetID("1")
		ev.SetSource("fuzz")
		ev.SetType("x")
		ev.SetSubject("dev")
		ev.SetTime(t0)
		ev.DataEncoded = b
		s.ApplyChecked(&ev)
		s.ApplyChecked(&ev)
		if _, ok := s.Get("dev"); !ok {
			t.Fatal("device not tracked")
		}
	})
}
