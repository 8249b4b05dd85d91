package devices

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// Seed corpora live in testdata/fuzz/<FuzzName>; run e.g. go test -fuzz FuzzTopicMatch ./devices/ to explore more.

func FuzzParseRegistry(f *testing.F) {
	f.Add([]byte("devices:\n  - id: a\n    cert_cn: \"\"\n"))
	f.Add([]byte("devices:\n  - id: a\n    password_hash: \"$2a$04$" + strings.Repeat("A", 53) + "\"\n    publish: [\"x/#\"]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseRegistry("fuzz.yaml", data)
		if err != nil {
			if !errors.Is(err, ErrInvalidRegistry) {
				t.Fatalf("error does not wrap ErrInvalidRegistry: %v", err)
			}
			return
		}
		all := r.All()
		if len(all) != r.Len() {
			t.Fatalf("All has %d devices, Len %d", len(all), r.Len())
		}
		// Whatever parsed must pass NewRegistry's checks again.
		if _, err := NewRegistry(all); err != nil {
			t.Fatalf("parsed registry fails NewRegistry: %v", err)
		}
		for _, d := range all {
			if got, ok := r.Get(d.ID); !ok || got.ID != d.ID {
				t.Fatalf("Get(%q) = %v", d.ID, ok)
			}
			if !r.CanPublish(d.ID, "devices/"+d.ID+"/x") || !r.CanSubscribe(d.ID, "devices/"+d.ID+"/commands/#") {
				t.Fatalf("device %q may not use its own topics", d.ID)
			}
		}
	})
}

func FuzzTopicMatch(f *testing.F) {
	f.Add("devices/a/#", "devices/a")
	f.Add("+/#", "$SYS/x")
	f.Add("a/+/c", "a//c")
	f.Fuzz(func(t *testing.T, filter, topic string) {
		got := TopicMatch(filter, topic)
		if want := refMatch(filter, topic); got != want {
			t.Fatalf("TopicMatch(%q, %q) = %v, reference says %v", filter, topic, got, want)
		}
		if got && (ValidFilter(filter) != nil || ValidTopic(topic) != nil) {
			t.Fatalf("TopicMatch(%q, %q) matched invalid input", filter, topic)
		}
		if ValidTopic(topic) == nil {
			if !TopicMatch(topic, topic) {
				t.Fatalf("topic %q does not match itself", topic)
			}
			if TopicMatch("#", topic) == strings.HasPrefix(topic, "$") {
				t.Fatalf(`TopicMatch("#", %q) wrong about $`, topic)
			}
		}
		if (ValidFilter(filter) == nil) != FilterCovers(filter, filter) {
			t.Fatalf("FilterCovers(%q, itself) disagrees with ValidFilter", filter)
		}
	})
}

// instances returns topics the filter matches: wildcards replaced by a few level choices.
func instances(filter string) []string {
	if ValidFilter(filter) != nil {
		return nil
	}
	out := []string{""}
	levels := strings.Split(filter, "/")
	for i, l := range levels {
		var choices []string
		switch l {
		case "+":
			choices = []string{"/x", "/", "/$x"}
		case "#":
			choices = []string{"", "/x", "/x/y", "/"}
		default:
			choices = []string{"/" + l}
		}
		var next []string
		for _, prefix := range out {
			for _, c := range choices {
				next = append(next, prefix+c)
			}
		}
		out = next
		if len(out) > 256 || i > 16 {
			break
		}
	}
	var topics []string
	for _, tp := range out {
		if tp == "" {
			continue
		}
		tp = tp[1:] // drop the leading separator added above
		if ValidTopic(tp) == nil && TopicMatch(filter, tp) {
			topics = append(topics, tp)
		}
	}
	return topics
}

func FuzzFilterCovers(f *testing.F) {
	f.Add("devices/a/commands/#", "devices/+/commands/#")
	f.Add("+/#", "#")
	f.Add("$SYS/#", "$SYS/broker/+")
	f.Add("/+/#", "/#")
	f.Fuzz(func(t *testing.T, grant, filter string) {
		if !FilterCovers(grant, filter) {
			return
		}
		if ValidFilter(grant) != nil || ValidFilter(filter) != nil {
			t.Fatalf("FilterCovers(%q, %q) with an invalid filter", grant, filter)
		}
		for _, tp := range instances(filter) {
			if !TopicMatch(grant, tp) {
				t.Fatalf("FilterCovers(%q, %q) but %q matches the filter and not the grant", grant, filter, tp)
			}
		}
		if !FilterCovers("#", filter) && !strings.HasPrefix(filter, "$") {
			t.Fatalf(`FilterCovers("#", %q) = false`, filter)
		}
	})
}

// FuzzStateLoad: any file either loads or is refused with an error naming it, never a panic; what loads saves and
// loads again to the same state.
func FuzzStateLoad(f *testing.F) {
	f.Add([]byte(`{"version":1,"devices":{"a":{"last_seen":"2026-03-01T12:00:00Z","online":true,"reported":{"x":1}}}}`))
	f.Add([]byte(`{"version":1,"devices":{"b":{"mode":"away","reported":null}}}`))
	f.Add([]byte(`{"version":1,"devices":{}}`))
	f.Add([]byte(`{"version":1,"devices":{"m":{"n":9007199254740993,"reported":{"ts":[1733500000123456789,1e400]}}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		path := filepath.Join(dir, "state.json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		s := NewStateView()
		if _, err := s.Load(path); err != nil {
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		again := filepath.Join(dir, "again.json")
		if err := s.Save(again); err != nil {
			t.Fatal(err)
		}
		r := NewStateView()
		if _, err := r.Load(again); err != nil {
			t.Fatalf("a saved state does not load: %v", err)
		}
		if a, b := s.Snapshot(), r.Snapshot(); !reflect.DeepEqual(a, b) {
			t.Fatalf("state changed through Save and Load:\n%#v\n%#v", a, b)
		}
	})
}

// FuzzDecodeJSON: the state view's decoder accepts exactly what json.Unmarshal accepts and decodes the same
// values, except that integers beyond ±2^53 that fit an int64 come out as that int64, whose float64 is what
// json.Unmarshal gives.
func FuzzDecodeJSON(f *testing.F) {
	for _, s := range []string{`{"a":1}`, `[9007199254740993,-9223372036854775808,1e2,"x"]`, `12345678901234567890`,
		`{"a":{"b":[1733500000123456789]}}`, `1e400`, `{"a":1} x`, `9007199254740992.5`, `-0`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var want any
		wantErr := json.Unmarshal(data, &want)
		var got any
		long, err := decodeJSON(data, &got)
		if err == nil && long {
			got, err = exactNumber(got)
		}
		if (err == nil) != (wantErr == nil) {
			t.Fatalf("decodeJSON(%q): error %v, json.Unmarshal: %v", data, err, wantErr)
		}
		if err != nil {
			return
		}
		if !reflect.DeepEqual(asFloats(got), want) {
			t.Fatalf("decodeJSON(%q) = %#v, json.Unmarshal: %#v", data, got, want)
		}
	})
}

// asFloats replaces the int64s in v by their float64s (in copies).
func asFloats(v any) any {
	switch x := v.(type) {
	case int64:
		if x <= maxExactInt && x >= -maxExactInt {
			panic(fmt.Sprintf("int64 %d within ±2^53", x))
		}
		return float64(x)
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[k] = asFloats(e)
		}
		return m
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = asFloats(e)
		}
		return out
	}
	return v
}
