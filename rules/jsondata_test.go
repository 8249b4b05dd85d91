package rules

import (
	"encoding/json"
	"math"
	"reflect"
	"testing"
)

func TestDecodeJSONKeepsLongIntegers(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want any
	}{
		{`{"ts":1733490000000000001}`, map[string]any{"ts": int64(1733490000000000001)}},
		{`[-9007199254740993, 9007199254740992, 9007199254740993]`, []any{int64(-9007199254740993), float64(9007199254740992), int64(9007199254740993)}},
		{`{"a":{"b":[1, 2.5, 12345678901234567]}}`, map[string]any{"a": map[string]any{"b": []any{1.0, 2.5, int64(12345678901234567)}}}},
		{` 123456789012345678901234 `, 1.2345678901234568e23}, // beyond int64: the float64, as Unmarshal gives
		{`{"s":"12345678901234567890"}`, map[string]any{"s": "12345678901234567890"}},
		{`{"t":30}`, map[string]any{"t": 30.0}},
	} {
		got, err := decodeJSON([]byte(tt.in))
		if err != nil {
			t.Fatalf("decodeJSON(%s): %v", tt.in, err)
		}
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("decodeJSON(%s) = %#v, want %#v", tt.in, got, tt.want)
		}
	}
}

func TestDecodeJSONRefusesWhatUnmarshalRefuses(t *testing.T) {
	for _, in := range []string{
		`{"a":1}x`, `1 2`, `{"a":12345678901234567}}`, `[12345678901234567`, `1e400`, `[1234567890123456e400]`, ``,
	} {
		if v, err := decodeJSON([]byte(in)); err == nil {
			t.Errorf("decodeJSON(%q) = %#v, want an error", in, v)
		}
	}
}

// FuzzDecodeJSON: decodeJSON agrees with json.Unmarshal on every input, but for the integers it keeps maxExactInt.
func FuzzDecodeJSON(f *testing.F) {
	for _, s := range []string{`{"ts":1733490000000000001}`, `[1,2.5,"x",null,true]`, `12345678901234567 `, `1e400`,
		`{"a":{"b":[-9223372036854775808, 9223372036854775808]}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeJSON(b)
		var want any
		werr := json.Unmarshal(b, &want)
		if (err == nil) != (werr == nil) {
			t.Fatalf("decodeJSON(%q) error %v, json.Unmarshal error %v", b, err, werr)
		}
		if err == nil && !agreeJSON(got, want) {
			t.Fatalf("decodeJSON(%q) = %#v, json.Unmarshal = %#v", b, got, want)
		}
	})
}

// agree reports whether got equals want, an int64 in got standing for the float64 nearest to it.
func agreeJSON(got, want any) bool {
	switch g := got.(type) {
	case map[string]any:
		w, ok := want.(map[string]any)
		if !ok || len(w) != len(g) {
			return false
		}
		for k, v := range g {
			if !agreeJSON(v, w[k]) {
				return false
			}
		}
		return true
	case []any:
		w, ok := want.([]any)
		if !ok || len(w) != len(g) {
			return false
		}
		for i := range g {
			if !agreeJSON(g[i], w[i]) {
				return false
			}
		}
		return true
	case int64:
		w, ok := want.(float64)
		return ok && float64(g) == w && (g > maxExactInt || g < -maxExactInt)
	case float64:
		w, ok := want.(float64)
		return ok && (w == g || math.IsNaN(w) && math.IsNaN(g))
	}
	return reflect.DeepEqual(got, want)
}
