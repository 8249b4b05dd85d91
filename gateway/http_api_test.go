package gateway_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/deadletter"
	"github.com/edgegate/edgegate/gateway"
)

// TestAdminAPIEmptyListsAreArrays: with no devices and nothing wrong, every list in the admin API's JSON is an
// empty array, never null, so that clients can iterate over it without a check.
func TestAdminAPIEmptyListsAreArrays(t *testing.T) {
	t.Parallel()
	empty := filepath.Join(t.TempDir(), "devices.yaml")
	if err := os.WriteFile(empty, []byte("devices: []\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	gw := startGateway(t, func(c *gateway.Config) { c.Devices.Registry = empty })
	addr := gw.HTTPAddr()

	tests := []struct {
		path  string
		field string // "" for the whole body
	}{
		{"/api/devices", ""},
		{"/api/deadletters", ""},
		{"/readyz", "problems"},
		{"/readyz", "sinks"},
		{"/api/status", "sinks"},
		{"/api/status", "rules"},
	}
	for _, tt := range tests {
		code, body := httpGet(t, addr, tt.path)
		if code != http.StatusOK {
			t.Errorf("GET %s: status %d, want 200: %s", tt.path, code, body)
			continue
		}
		raw := json.RawMessage(body)
		if tt.field != "" {
			var obj map[string]json.RawMessage
			if err := json.Unmarshal(raw, &obj); err != nil {
				t.Errorf("GET %s: not a JSON object: %v: %s", tt.path, err, body)
				continue
			}
			raw = obj[tt.field]
		}
		if got := strings.TrimSpace(string(raw)); got != "[]" {
			t.Errorf("GET %s: %s = %s, want []", tt.path, fieldName(tt.field), orMissing(got))
		}
	}
}

func fieldName(f string) string {
	if f == "" {
		return "the body"
	}
	return f
}

func orMissing(s string) string {
	if s == "" {
		return "(missing)"
	}
	return s
}

// TestDeadLettersQuery: /api/deadletters pages with after and limit as the store does (a limit beyond the store's
// maximum is capped at it, not replaced by the default; 0 or less is the default), refuses parameters that are not
// numbers with 400 rather than silently listing from the start, and says 503 once the gateway has stopped.
func TestDeadLettersQuery(t *testing.T) {
	t.Parallel()
	gw := startGateway(t, nil)
	const n = deadletter.DefaultListLimit + 50
	for i := range n {
		if err := gw.DeadLetters().Add(deadletter.Record{Reason: "test", Detail: fmt.Sprint(i), Payload: []byte("x")}); err != nil {
			t.Fatal(err)
		}
	}
	addr := gw.HTTPAddr()

	list := func(query string) []deadletter.Record {
		t.Helper()
		var recs []deadletter.Record
		httpJSON(t, addr, "/api/deadletters"+query, http.StatusOK, &recs)
		return recs
	}
	for _, tt := range []struct {
		query string
		want  int
	}{
		{"", deadletter.DefaultListLimit},
		{"?limit=7", 7},
		{fmt.Sprintf("?limit=%d", deadletter.MaxListLimit), n},
		{fmt.Sprintf("?limit=%d", deadletter.MaxListLimit+1), n},
		{"?limit=1000000", n},
		{"?limit=99999999999999999999", n},
		{"?limit=0", deadletter.DefaultListLimit},
		{"?limit=-5", deadletter.DefaultListLimit},
	} {
		if got := len(list(tt.query)); got != tt.want {
			t.Errorf("GET /api/deadletters%s: %d records, want %d", tt.query, got, tt.want)
		}
	}
	first := list("?limit=10")
	next := list(fmt.Sprintf("?after=%d&limit=10", first[len(first)-1].ID))
	if len(next) != 10 || next[0].ID <= first[len(first)-1].ID {
		t.Errorf("the page after id %d starts at id %d (%d records), want a later id and 10 records",
			first[len(first)-1].ID, next[0].ID, len(next))
	}

	for _, q := range []string{"?after=abc", "?after=-1", "?limit=abc", "?limit=1.5", "?after=1&limit=1x"} {
		code, body := httpGet(t, addr, "/api/deadletters"+q)
		var e struct{ Error string }
		if code != http.StatusBadRequest || json.Unmarshal([]byte(body), &e) != nil || e.Error == "" {
			t.Errorf("GET /api/deadletters%s: %d %.200s, want 400 with a JSON error", q, code, body)
		}
	}

	gw.stop()
	rec := httptest.NewRecorder()
	gw.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/api/deadletters", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Errorf("/api/deadletters after stop: %d %s, want 503", rec.Code, rec.Body)
	}
}
