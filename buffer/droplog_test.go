package buffer

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// lines returns the JSON log records written so far whose msg starts with prefix.
func (s *syncBuffer) lines(t *testing.T, prefix string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(s.String()), "\n") {
		if l == "" {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		if msg, _ := rec["msg"].(string); strings.HasPrefix(msg, prefix) {
			out = append(out, rec)
		}
	}
	return out
}

// TestDropLogRateLimited: drops, rejections and failed commits are logged with their counts, at most once per
// second; what happens in between is added up into the next line, not lost.
func TestDropLogRateLimited(t *testing.T) {
	var out syncBuffer
	logger := slog.New(slog.NewJSONHandler(&out, nil))
	var d dropLog
	t0 := time.Unix(1_000_000, 0)
	d.drops[reasonMaxBytes] = 3
	d.rejected = 2
	d.failed(errors.New("disk on fire"), 5)
	d.flush(t0, logger)
	d.drops[reasonMaxBytes] += 4
	d.flush(t0.Add(500*time.Millisecond), logger) // within the second: nothing
	d.drops[reasonMaxAge] = 1
	d.flush(t0.Add(1100*time.Millisecond), logger)
	d.flush(t0.Add(5*time.Second), logger) // nothing new: nothing logged

	drops := out.lines(t, "events dropped")
	if len(drops) != 2 || drops[0][reasonNames[reasonMaxBytes]] != 3.0 || drops[1][reasonNames[reasonMaxBytes]] != 4.0 ||
		drops[1][reasonNames[reasonMaxAge]] != 1.0 {
		t.Errorf("drop lines = %v, want 3 then 4 (+1 by age)", drops)
	}
	if rej := out.lines(t, "events rejected"); len(rej) != 1 || rej[0]["count"] != 2.0 {
		t.Errorf("rejection lines = %v, want one with count 2", rej)
	}
	if fail := out.lines(t, "commit failed"); len(fail) != 1 || fail[0]["events"] != 5.0 || fail[0]["error"] != "disk on fire" {
		t.Errorf("failure lines = %v, want one with 5 events and the error", fail)
	}
}

// TestDropsLogged: a log that drops events to stay within max_bytes says so in its log, with the same count as
// edgegate_buffer_dropped_total, in a line or a few (one per second at most), not one per event.
func TestDropsLogged(t *testing.T) {
	var out syncBuffer
	logger := slog.New(slog.NewJSONHandler(&out, nil))
	size := recSize(ev(0))
	l, err := open(Config{Path: filepath.Join(t.TempDir(), "events.db"), MaxBytes: 10 * size,
		WhenFull: WhenFullDropOldest, Cursors: []string{"sink"}}, logger, prometheus.NewRegistry(), openOptions{segSize: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	run(t, l)
	const n = 200
	for i := range n {
		if _, err := l.Append(context.Background(), ev(i)); err != nil {
			t.Fatal(err)
		}
	}
	var logged float64
	waitFor(t, 10*time.Second, "every drop logged", func() bool {
		logged = 0
		for _, rec := range out.lines(t, "events dropped") {
			v, _ := rec[reasonNames[reasonMaxBytes]].(float64)
			logged += v
		}
		return logged == n-10
	})
	if lines := len(out.lines(t, "events dropped")); lines > 3 {
		t.Errorf("%d log lines for %d drops within a few seconds: not rate-limited", lines, n-10)
	}
}
