//go:build unix

package bridgebench

import (
	"bytes"
	"encoding/json"
	"testing"
)

// FuzzSplitArray: for any JSON array, splitArray returns its elements as encoding/json finds them.
func FuzzSplitArray(f *testing.F) {
	for _, s := range []string{`[]`, `[1]`, `[{"a":"x,]}"},{"b":[1,2]}]`, ` [ "\"]" , {"c":{"d":[]}} ] `,
		`[{"specversion":"1.0","id":"a","data":{"bd":1,"bs":2,"bt":3}},{"id":"b"}]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var want []json.RawMessage
		if json.Unmarshal(b, &want) != nil || want == nil {
			return
		}
		trimmed := bytes.TrimSpace(b)
		got := splitArray(trimmed)
		if len(got) != len(want) {
			t.Fatalf("splitArray(%q): %d elements, want %d", b, len(got), len(want))
		}
		for i := range got {
			if !bytes.Equal(got[i], bytes.TrimSpace(want[i])) {
				t.Fatalf("splitArray(%q)[%d] = %q, want %q", b, i, got[i], want[i])
			}
		}
	})
}
