package buffer

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestStatsBacklog(t *testing.T) {
	base := time.Date(2026, 1, 2, 15, 0, 0, 0, time.UTC)
	l := openTest(t, Config{Cursors: []string{"sink", "slow"}}, 8)
	l.now = func() time.Time { return base.Add(time.Hour) }
	run(t, l.Log)
	// Events 1..20; the odd ones are older and purged, leaving gaps inside the segments.
	appendN(t, l.Log, 20, func(i int) Entry {
		e := ev(i)
		e.Time = base.Add(time.Duration(i) * time.Minute)
		if i%2 == 0 {
			e.Time = base.Add(-time.Hour)
		}
		return e
	})
	if _, err := l.Purge(base); err != nil {
		t.Fatal(err)
	}
	if err := l.Ack("sink", 11); err != nil {
		t.Fatal(err)
	}
	size := recSize(ev(0))
	st := l.Stats()
	tests := []struct {
		cursor      string
		wantBacklog int64
		wantOldest  time.Time
	}{
		{"sink", 5, base.Add(11 * time.Minute)}, // 12, 14, 16, 18, 20
		{"slow", 10, base.Add(1 * time.Minute)}, // 2, 4, ..., 20
	}
	for i, tt := range tests {
		c := st.Cursors[i]
		if c.Name != tt.cursor || c.Backlog != tt.wantBacklog || c.BacklogBytes != tt.wantBacklog*size ||
			!c.OldestUnacked.Equal(tt.wantOldest) || c.OldestUnackedAge != time.Hour.Seconds()-tt.wantOldest.Sub(base).Seconds() {
			t.Errorf("cursor %s: %+v; want backlog %d (%d bytes), oldest %s", tt.cursor, c, tt.wantBacklog,
				tt.wantBacklog*size, tt.wantOldest)
		}
	}
	if st.Events != 10 || st.Bytes != 10*size || st.FirstSeq != 2 || st.LastSeq != 20 || !st.Oldest.Equal(base.Add(time.Minute)) {
		t.Errorf("stats = %+v", st)
	}
	if _, err := json.Marshal(st); err != nil {
		t.Fatal(err)
	}
}

func TestDiskFree(t *testing.T) {
	n, err := diskFree(t.TempDir() + "/events.db")
	if err != nil || n <= 0 {
		t.Fatalf("diskFree = %d, %v", n, err)
	}
}

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// TestStatsJSON pins the JSON shape of Stats (shown by the status API and `edgegate backlog stats`).
func TestStatsJSON(t *testing.T) {
	base := time.Date(2026, 1, 2, 15, 0, 0, 0, time.UTC)
	l := openTest(t, Config{Cursors: []string{"cloud", "archive"}}, 8)
	l.now = func() time.Time { return base.Add(time.Hour) }
	run(t, l.Log)
	appendN(t, l.Log, 12, func(i int) Entry {
		e := ev(i)
		e.Time = base.Add(time.Duration(i) * time.Minute)
		return e
	})
	if err := l.Ack("cloud", 10); err != nil {
		t.Fatal(err)
	}
	if err := l.Ack("archive", 2); err != nil {
		t.Fatal(err)
	}
	st := l.Stats()
	st.FileBytes = 0 // depends on the filesystem
	got, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "stats.golden.json")
	if *update {
		if err := os.WriteFile(golden, append(got, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if string(append(got, '\n')) != string(want) {
		t.Fatalf("Stats JSON differs from %s (run with -update to accept):\n%s", golden, got)
	}
}
