package buffer

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// recSize is the stored size of ev(i) for i < 10.
func recSize(e Entry) int64 { return int64(encodedSize(&e) + keySize) }

// waitSaved waits until the named cursor's position is on disk (and with it the deletions it allows).
func waitSaved(t *testing.T, l *Log, name string, pos uint64) {
	t.Helper()
	waitFor(t, 5*time.Second, fmt.Sprintf("cursor %s saved at %d", name, pos), func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		c := l.cursors[name]
		return c != nil && c.saved >= pos
	})
}

func seqsOf(recs []Record) []uint64 {
	out := make([]uint64, len(recs))
	for i, r := range recs {
		out[i] = r.Seq
	}
	return out
}

func seqRange(from, to uint64) []uint64 {
	var out []uint64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

func TestCursors(t *testing.T) {
	cfg := Config{Cursors: []string{"a", "b"}}
	l := openTest(t, cfg, 16)
	stop := run(t, l.Log)
	appendN(t, l.Log, 20, ev)
	steps := []struct {
		name    string
		cursor  string
		upTo    uint64
		want    uint64
		wantErr bool
	}{
		{"advance", "a", 5, 5, false},
		{"never backwards", "a", 3, 5, false},
		{"same", "a", 5, 5, false},
		{"past the last seq", "a", 21, 5, true},
		{"other cursor", "b", 20, 20, false},
		{"reader cursor", "replay", 7, 7, false},
		{"empty name", "", 1, 0, true},
		{"name too long", strings.Repeat("x", MaxCursorName+1), 1, 0, true}, // it could never be saved
	}
	for _, s := range steps {
		err := l.Ack(s.cursor, s.upTo)
		if (err != nil) != s.wantErr {
			t.Fatalf("%s: Ack(%q, %d) = %v, want error %v", s.name, s.cursor, s.upTo, err, s.wantErr)
		}
		if got := l.Cursor(s.cursor); got != s.want {
			t.Fatalf("%s: Cursor(%q) = %d, want %d", s.name, s.cursor, got, s.want)
		}
	}
	// Saved within about 100 ms without any append.
	waitSaved(t, l.Log, "a", 5)
	stop()

	l2 := openTest(t, Config{Path: l.path, Cursors: []string{"a", "b"}}, 0)
	for name, want := range map[string]uint64{"a": 5, "b": 20, "replay": 0, "new": 0} {
		if got := l2.Cursor(name); got != want {
			t.Errorf("after reopen Cursor(%q) = %d, want %d", name, got, want)
		}
	}
	st := l2.Stats()
	if len(st.Cursors) != 2 || st.Cursors[0].Name != "a" || st.Cursors[0].Backlog != 15 || st.Cursors[1].Backlog != 0 {
		t.Fatalf("stats cursors = %+v", st.Cursors)
	}
	if !st.Cursors[0].Required || st.Cursors[0].OldestUnacked.IsZero() {
		t.Fatalf("cursor a stats = %+v", st.Cursors[0])
	}
}

func TestDeleteOnlyWhenAllCursorsPassed(t *testing.T) {
	l := openTest(t, Config{Cursors: []string{"a", "b"}}, 16)
	run(t, l.Log)
	appendN(t, l.Log, 64, ev) // segments 1, 17, 33, 49

	if err := l.Ack("a", 64); err != nil {
		t.Fatal(err)
	}
	waitSaved(t, l.Log, "a", 64)
	if l.FirstSeq() != 1 || l.Stats().Events != 64 {
		t.Fatalf("deleted before b passed: first %d, %d events", l.FirstSeq(), l.Stats().Events)
	}

	if err := l.Ack("b", 40); err != nil {
		t.Fatal(err)
	}
	waitSaved(t, l.Log, "b", 40)
	waitFor(t, 5*time.Second, "segments 1 and 17 deleted", func() bool { return l.FirstSeq() == 33 })
	if got := seqsOf(readAll(t, l.Log)); !slices.Equal(got, seqRange(33, 64)) {
		t.Fatalf("stored %v, want 33..64", got)
	}
	checkDB(t, l.Log)

	if err := l.Ack("b", 64); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the log drained", func() bool { return l.Stats().Events == 0 })
	if l.FirstSeq() != 0 || l.LastSeq() != 64 {
		t.Fatalf("drained: first %d last %d, want 0 and 64", l.FirstSeq(), l.LastSeq())
	}
	if seq, err := l.Append(context.Background(), ev(0)); err != nil || seq != 65 {
		t.Fatalf("append after draining = %d, %v; want 65", seq, err)
	}
	if got := testutilCounter(t, l, "edgegate_buffer_delivered_deleted_total"); got != 64 {
		t.Errorf("delivered_deleted_total = %v, want 64", got)
	}
	for _, r := range reasonNames {
		if got := testutilCounter(t, l, "edgegate_buffer_dropped_total", "reason", r); got != 0 {
			t.Errorf("dropped_total{%s} = %v, want 0", r, got)
		}
	}
	checkDB(t, l.Log)
}

func TestCursorRemovedFromConfig(t *testing.T) {
	l := openTest(t, Config{Cursors: []string{"a", "b"}}, 16)
	stop := run(t, l.Log)
	appendN(t, l.Log, 40, ev)
	if err := l.Ack("a", 40); err != nil {
		t.Fatal(err)
	}
	if err := l.Ack("b", 3); err != nil {
		t.Fatal(err)
	}
	stop()

	// A tool keeps every persisted cursor.
	tool, err := OpenTool(Config{Path: l.path}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if tool.Cursor("b") != 3 || len(tool.Stats().Cursors) != 2 {
		t.Fatalf("tool sees cursors %+v", tool.Stats().Cursors)
	}
	if err := tool.Close(); err != nil {
		t.Fatal(err)
	}

	// The gateway no longer lists b: b is removed and no longer holds events.
	l2 := openTest(t, Config{Path: l.path, Cursors: []string{"a"}}, 0)
	if l2.Cursor("b") != 0 {
		t.Fatalf("cursor b kept: %d", l2.Cursor("b"))
	}
	run(t, l2.Log)
	waitFor(t, 5*time.Second, "events held only by b deleted", func() bool { return l2.Stats().Events == 0 })
	if st := l2.Stats(); len(st.Cursors) != 1 || st.Cursors[0].Name != "a" {
		t.Fatalf("cursors = %+v", st.Cursors)
	}
}

// TestToolHoldsForConfiguredCursors: a tool's commit removes only what every configured cursor passed, also
// when one of them never saved a position (its sink never acknowledged anything).
func TestToolHoldsForConfiguredCursors(t *testing.T) {
	l := openTest(t, Config{Cursors: []string{"a", "b"}}, 16)
	stop := run(t, l.Log)
	appendN(t, l.Log, 40, ev)
	if err := l.Ack("a", 40); err != nil { // b never acknowledges: it saves no position
		t.Fatal(err)
	}
	stop()

	tool, err := OpenTool(Config{Path: l.path, Cursors: []string{"a", "b"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A purge of nothing (no event is that old) still commits, and removes what the cursors passed.
	if n, err := tool.Purge(time.Unix(0, 0)); err != nil || n != 0 {
		t.Fatalf("purge = %d, %v; want 0, nil", n, err)
	}
	st := tool.Stats()
	if st.Events != 40 {
		t.Errorf("after a tool's commit %d events, want the 40 that cursor b has not passed", st.Events)
	}
	if len(st.Cursors) != 2 {
		t.Errorf("cursors %+v, want a and b", st.Cursors)
	}
	if err := tool.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestMaxAge(t *testing.T) {
	now := time.Date(2026, 1, 2, 15, 0, 0, 0, time.UTC)
	old, fresh := now.Add(-2*time.Hour), now.Add(-time.Minute)
	var clock atomic.Int64
	clock.Store(old.UnixNano()) // nothing has expired yet
	cfg := Config{MaxAge: time.Hour, Cursors: []string{"sink"}}
	l := openTest(t, cfg, 8)
	l.now = func() time.Time { return time.Unix(0, clock.Load()) }
	run(t, l.Log)
	var wantKept []uint64
	// Segment 1..8 is all old (deleted at once); 9..16 and 17..24 mix old and fresh events.
	appendN(t, l.Log, 24, func(i int) Entry {
		e := ev(i)
		e.Time = old
		if i >= 8 && i%3 == 0 {
			e.Time = fresh
			wantKept = append(wantKept, uint64(i+1))
		}
		return e
	})
	if err := l.Ack("sink", 2); err != nil { // two old events were delivered: not counted as drops
		t.Fatal(err)
	}
	waitSaved(t, l.Log, "sink", 2)
	clock.Store(now.UnixNano())
	waitFor(t, 5*time.Second, "old events expired", func() bool { return l.Stats().Events == int64(len(wantKept)) })
	if got := seqsOf(readAll(t, l.Log)); !slices.Equal(got, wantKept) {
		t.Fatalf("kept %v, want %v", got, wantKept)
	}
	if got := testutilCounter(t, l, "edgegate_buffer_dropped_total", "reason", "max_age"); got != float64(24-len(wantKept)-2) {
		t.Errorf("dropped_total{max_age} = %v, want %d", got, 24-len(wantKept)-2)
	}
	checkDB(t, l.Log)
}

// TestEventTimesOutOfRange: an event time beyond what Unix nanoseconds hold (a device clock far off) is stored as
// the nearest time that fits, not one wrapped around to another century, so max_age does not take a future event
// for an old one.
func TestEventTimesOutOfRange(t *testing.T) {
	l := openTest(t, Config{MaxAge: 24 * time.Hour, Cursors: []string{"sink"}}, 8)
	run(t, l.Log)
	times := []time.Time{
		time.Date(2300, 1, 1, 0, 0, 0, 0, time.UTC),   // kept: far in the future
		time.Now().Add(-48 * time.Hour),               // expired: the sign that max_age has run
		time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC), // kept
		time.Date(2, 1, 1, 0, 0, 0, 0, time.UTC),      // expired: older than any age (year 1 is the zero time: now)
		time.Date(1600, 1, 1, 0, 0, 0, 0, time.UTC),   // expired
		time.Now(), // kept
	}
	appendN(t, l.Log, len(times), func(i int) Entry { e := ev(i); e.Time = times[i]; return e })
	waitFor(t, 5*time.Second, "the old events expired", func() bool { return l.Stats().Events == 3 })
	recs := readAll(t, l.Log)
	if got := seqsOf(recs); !slices.Equal(got, []uint64{1, 3, 6}) {
		t.Fatalf("kept %v, want [1 3 6]", got)
	}
	for _, r := range recs[:2] {
		if !r.Time.Equal(maxRecordTime) {
			t.Errorf("seq %d: stored time %s, want %s (the latest that fits)", r.Seq, r.Time.UTC(), maxRecordTime.UTC())
		}
	}
	if n, err := l.Purge(time.Date(2, 1, 1, 0, 0, 0, 0, time.UTC)); err != nil || n != 0 {
		t.Errorf("purge before year 2 = %d, %v; want 0, nil", n, err)
	}
	if n, err := l.Purge(time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)); err != nil || n != 1 {
		t.Errorf("purge before year 9999 = %d, %v; want 1 (the event of now), nil", n, err)
	}
}

func TestPurge(t *testing.T) {
	base := time.Date(2026, 1, 2, 15, 0, 0, 0, time.UTC)
	l := openTest(t, Config{}, 8)
	run(t, l.Log)
	appendN(t, l.Log, 30, func(i int) Entry {
		e := ev(i)
		e.Time = base.Add(time.Duration(i%10) * time.Minute) // 0..9 minutes, three times
		return e
	})
	n, err := l.Purge(base.Add(4 * time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if n != 12 {
		t.Fatalf("purged %d, want 12", n)
	}
	for _, r := range readAll(t, l.Log) {
		if r.Time.Before(base.Add(4 * time.Minute)) {
			t.Fatalf("record %d at %s survived", r.Seq, r.Time)
		}
	}
	if got := testutilCounter(t, l, "edgegate_buffer_dropped_total", "reason", "purge"); got != 12 {
		t.Errorf("dropped_total{purge} = %v, want 12", got)
	}
	checkDB(t, l.Log)
}

// TestPurgeCountsDeliveredAsDeleted: a purge removes delivered and undelivered events alike; only those the
// required cursors had not passed are losses (dropped_total{purge}), the others count as delivered and deleted.
func TestPurgeCountsDeliveredAsDeleted(t *testing.T) {
	base := time.Date(2026, 1, 2, 15, 0, 0, 0, time.UTC)
	l := openTest(t, Config{Cursors: []string{"sink"}}, 8)
	run(t, l.Log)
	appendN(t, l.Log, 30, func(i int) Entry {
		e := ev(i)
		e.Time = base.Add(time.Duration(i) * time.Minute) // seq i+1 at minute i
		return e
	})
	if err := l.Ack("sink", 10); err != nil {
		t.Fatal(err)
	}
	waitPersisted(t, l.Log, "sink", 10)
	// Segment 1..8 is wholly delivered and goes in the background; the purge
	// then finds 9 and 10 delivered and 11..20 not.
	waitFor(t, 5*time.Second, "segment 1..8 deleted and counted", func() bool {
		return l.FirstSeq() == 9 && testutilCounter(t, l, "edgegate_buffer_delivered_deleted_total") == 8
	})
	n, err := l.Purge(base.Add(20 * time.Minute)) // seqs up to 20
	if err != nil {
		t.Fatal(err)
	}
	if n != 12 { // 9..20 go, 21..30 stay
		t.Fatalf("purged %d, want 12", n)
	}
	if got := testutilCounter(t, l, "edgegate_buffer_dropped_total", "reason", "purge"); got != 10 {
		t.Errorf("dropped_total{purge} = %v, want 10 (seqs 11..20)", got)
	}
	if got := testutilCounter(t, l, "edgegate_buffer_delivered_deleted_total"); got != 10 {
		t.Errorf("delivered_deleted_total = %v, want 10 (8 in the background, then 9 and 10 by the purge)", got)
	}
	if recs := readAll(t, l.Log); len(recs) != 10 || recs[0].Seq != 21 {
		t.Errorf("%d records left, from seq %d; want 21..30", len(recs), recs[0].Seq)
	}
	checkDB(t, l.Log)
}

// TestPurgeWithoutRun: tools purge with the gateway stopped.
func TestPurgeWithoutRun(t *testing.T) {
	l := openTest(t, Config{}, 0)
	run(t, l.Log)
	appendN(t, l.Log, 5, ev)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	tool, err := OpenTool(Config{Path: l.path}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tool.Close()
	n, err := tool.Purge(time.Now().Add(time.Hour))
	if err != nil || n != 5 {
		t.Fatalf("Purge = %d, %v; want 5", n, err)
	}
	if st := tool.Stats(); st.Events != 0 || st.LastSeq != 5 {
		t.Fatalf("after purge: %+v", st)
	}
}

func TestWhenFull(t *testing.T) {
	size := recSize(ev(0))
	tests := []struct {
		name        string
		whenFull    string
		cursors     []string
		ack         uint64 // acknowledged by every cursor before the overflow
		wantOK      int
		wantStored  []uint64
		wantDropped float64
		wantDeleted float64
	}{
		{"reject", WhenFullReject, []string{"sink"}, 0, 10, seqRange(1, 10), 0, 0},
		{"reject reclaims delivered events", WhenFullReject, []string{"sink"}, 3, 13, seqRange(4, 13), 0, 3},
		{"drop-oldest", WhenFullDropOldest, []string{"sink"}, 0, 15, seqRange(6, 15), 5, 0},
		{"drop-oldest delivered first", WhenFullDropOldest, []string{"sink"}, 3, 15, seqRange(6, 15), 2, 3},
		{"no cursor: bounded history", WhenFullReject, nil, 0, 15, seqRange(6, 15), 5, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := openTest(t, Config{MaxBytes: 10 * size, WhenFull: tt.whenFull, Cursors: tt.cursors}, 4)
			run(t, l.Log)
			appendN(t, l.Log, 10, ev)
			for _, c := range tt.cursors {
				if err := l.Ack(c, tt.ack); err != nil {
					t.Fatal(err)
				}
			}
			ok := 10
			for i := 10; i < 15; i++ {
				_, err := l.Append(context.Background(), ev(i))
				switch {
				case err == nil:
					ok++
				case !errors.Is(err, ErrFull):
					t.Fatalf("append %d: %v, want nil or ErrFull", i, err)
				}
			}
			if ok != tt.wantOK {
				t.Fatalf("%d appends succeeded, want %d", ok, tt.wantOK)
			}
			if got := seqsOf(readAll(t, l.Log)); !slices.Equal(got, tt.wantStored) {
				t.Fatalf("stored %v, want %v", got, tt.wantStored)
			}
			if got := testutilCounter(t, l, "edgegate_buffer_rejected_total"); got != float64(15-tt.wantOK) {
				t.Errorf("rejected_total = %v, want %d", got, 15-tt.wantOK)
			}
			if got := testutilCounter(t, l, "edgegate_buffer_dropped_total", "reason", "max_bytes"); got != tt.wantDropped {
				t.Errorf("dropped_total{max_bytes} = %v, want %v", got, tt.wantDropped)
			}
			if got := testutilCounter(t, l, "edgegate_buffer_delivered_deleted_total"); got != tt.wantDeleted {
				t.Errorf("delivered_deleted_total = %v, want %v", got, tt.wantDeleted)
			}
			if l.Stats().Bytes > 10*size {
				t.Errorf("stored %d bytes, max %d", l.Stats().Bytes, 10*size)
			}
			checkDB(t, l.Log)
		})
	}
}

// TestRejectRecovers: a full log under reject refuses quickly (Enqueue too) and accepts again once the sink
// acknowledges.
func TestRejectRecovers(t *testing.T) {
	size := recSize(ev(0))
	l := openTest(t, Config{MaxBytes: 20 * size, Cursors: []string{"sink"}}, 4)
	run(t, l.Log)
	appendN(t, l.Log, 20, ev)
	if _, err := l.Append(context.Background(), ev(20)); !errors.Is(err, ErrFull) {
		t.Fatalf("append to a full log = %v, want ErrFull", err)
	}
	if !l.Stats().Full {
		t.Fatal("Stats().Full = false after a rejection")
	}
	if err := l.Enqueue(ev(21)); !errors.Is(err, ErrFull) {
		t.Fatalf("Enqueue to a full log = %v, want ErrFull", err)
	}
	if err := l.Ack("sink", 20); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "room again", func() bool { return !l.Stats().Full })
	if _, err := l.Append(context.Background(), ev(22)); err != nil {
		t.Fatalf("append after the sink caught up: %v", err)
	}
	e := Entry{Data: make([]byte, 21*size)}
	if _, err := l.Append(context.Background(), e); !errors.Is(err, ErrFull) {
		t.Fatalf("append larger than max_bytes = %v, want ErrFull", err)
	}
	if l.Stats().Full {
		t.Fatal("an oversized event marked the log full")
	}
}

// TestRejectWithoutCursorsByPriority: with no cursor to carry events, a refusal of a low-priority event (the log
// is full of higher ones) does not refuse the next higher-priority event, which makes its room from the stored
// lower ones, however soon it comes.
func TestRejectWithoutCursorsByPriority(t *testing.T) {
	size := recSize(ev(0))
	l := openTest(t, Config{MaxBytes: 10 * size}, 4)
	l.tickEvery = time.Hour // no housekeeping between the appends
	run(t, l.Log)
	prio := func(p uint8) func(int) Entry { return func(i int) Entry { e := ev(i); e.Priority = p; return e } }
	appendN(t, l.Log, 10, prio(5))
	if _, err := l.Append(context.Background(), prio(0)(10)); !errors.Is(err, ErrFull) {
		t.Fatalf("priority 0 into a log full of priority 5 = %v, want ErrFull", err)
	}
	if _, err := l.Append(context.Background(), prio(9)(11)); err != nil {
		t.Fatalf("priority 9 right after = %v, want it stored in place of a priority 5", err)
	}
}

// TestDropPriorityOrder compares drop-oldest with a model: lowest priority, oldest first, never above the
// new event's priority, nothing dropped when the room cannot be made.
func TestDropPriorityOrder(t *testing.T) {
	type rec struct {
		seq  uint64
		prio uint8
		size int64
	}
	rng := rand.New(rand.NewPCG(1, 2))
	mk := func() Entry {
		e := ev(0)
		e.Data = make([]byte, 50+rng.IntN(100))
		e.Priority = uint8(rng.IntN(4)) * 3 // 0, 3, 6, 9
		return e
	}
	const maxBytes = 3000
	l := openTest(t, Config{MaxBytes: maxBytes, WhenFull: WhenFullDropOldest, Cursors: []string{"sink"}}, 4)
	run(t, l.Log)
	var model []rec
	var last uint64
	var drops, rejects int
	for i := range 400 {
		e := mk()
		size := recSize(e)
		var total int64
		for _, r := range model {
			total += r.size
		}
		short := total + size - maxBytes
		var droppable int64
		for _, r := range model {
			if r.prio <= e.Priority {
				droppable += r.size
			}
		}
		wantOK := short <= 0 || droppable >= short
		if short > 0 && wantOK {
			for short > 0 {
				best := -1
				for j, r := range model {
					if r.prio <= e.Priority && (best < 0 || r.prio < model[best].prio) {
						best = j
					}
				}
				short -= model[best].size
				model = slices.Delete(model, best, best+1)
				drops++
			}
		}
		seq, err := l.Append(context.Background(), e)
		if wantOK != (err == nil) {
			t.Fatalf("append %d (prio %d, %d bytes): err %v, want ok %v", i, e.Priority, size, err, wantOK)
		}
		if err != nil {
			if !errors.Is(err, ErrFull) {
				t.Fatal(err)
			}
			rejects++
			continue
		}
		last++
		if seq != last {
			t.Fatalf("seq %d, want %d", seq, last)
		}
		model = append(model, rec{seq: seq, prio: e.Priority, size: size})
		if i%50 == 0 {
			want := make([]uint64, len(model))
			for j, r := range model {
				want[j] = r.seq
			}
			if got := seqsOf(readAll(t, l.Log)); !slices.Equal(got, want) {
				t.Fatalf("after append %d stored %v, want %v", i, got, want)
			}
			checkDB(t, l.Log)
		}
	}
	if drops == 0 || rejects == 0 {
		t.Fatalf("the sequence did not exercise drops (%d) and rejections (%d)", drops, rejects)
	}
	if got := testutilCounter(t, l, "edgegate_buffer_dropped_total", "reason", "max_bytes"); got != float64(drops) {
		t.Errorf("dropped_total{max_bytes} = %v, want %d", got, drops)
	}
	if got := testutilCounter(t, l, "edgegate_buffer_rejected_total"); got != float64(rejects) {
		t.Errorf("rejected_total = %v, want %d", got, rejects)
	}
	checkDB(t, l.Log)
}

// TestMinFree: below min_free_bytes the log is full: reject refuses, drop-oldest drops (reason min_free).
func TestMinFree(t *testing.T) {
	for _, whenFull := range []string{WhenFullReject, WhenFullDropOldest} {
		t.Run(whenFull, func(t *testing.T) {
			const guard = 1 << 30
			l := openTest(t, Config{MinFreeBytes: guard, WhenFull: whenFull, Cursors: []string{"sink"}}, 4)
			var filled atomic.Bool
			var bytesAtFill atomic.Int64
			l.statfs = func(string) (int64, error) {
				if !filled.Load() {
					return guard + 1<<20, nil
				}
				// The filesystem had room for 300 bytes beyond the guard (free pages inside the file
				// included); it fills as the stored events grow, with some page overhead.
				grown := (l.state.Load().bytes - bytesAtFill.Load()) * 5 / 4
				return guard + 300 - grown - int64(l.db.Stats().FreePageN*l.db.Info().PageSize), nil
			}
			run(t, l.Log)
			appendN(t, l.Log, 20, ev)
			bytesAtFill.Store(l.Stats().Bytes)
			filled.Store(true)
			var ok, full int
			for i := range 10 {
				_, err := l.Append(context.Background(), ev(20+i))
				switch {
				case err == nil:
					ok++
				case errors.Is(err, ErrFull):
					full++
				default:
					t.Fatal(err)
				}
			}
			dropped := testutilCounter(t, l, "edgegate_buffer_dropped_total", "reason", "min_free")
			switch whenFull {
			case WhenFullReject:
				if full == 0 || dropped != 0 {
					t.Fatalf("below min_free: %d appends refused, %v dropped; want some refused, none dropped", full, dropped)
				}
			case WhenFullDropOldest:
				if full != 0 || dropped == 0 {
					t.Fatalf("below min_free: %d appends refused, %v dropped; want none refused, some dropped", full, dropped)
				}
			}
			checkDB(t, l.Log)
		})
	}
}

// TestQueuedCallback: AppendAsyncFunc and EnqueueFunc call queued once for an event the log queues, before it is
// durable, and never for one the log refuses (full under the reject policy).
func TestQueuedCallback(t *testing.T) {
	size := recSize(ev(0))
	l := openTest(t, Config{MaxBytes: 5 * size, Cursors: []string{"sink"}}, 4)
	run(t, l.Log)
	calls := 0
	p, err := l.AppendAsyncFunc(context.Background(), ev(0), func() { calls++ })
	if err != nil || calls != 1 {
		t.Fatalf("AppendAsyncFunc: %v, queued called %d times, want 1", err, calls)
	}
	if _, err := p.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := l.EnqueueFunc(ev(1), func() { calls++ }); err != nil || calls != 2 {
		t.Fatalf("EnqueueFunc: %v, queued called %d times, want 2", err, calls)
	}
	appendN(t, l.Log, 3, ev)
	if _, err := l.Append(context.Background(), ev(5)); !errors.Is(err, ErrFull) {
		t.Fatalf("append to a full log = %v, want ErrFull", err)
	}
	if _, err := l.AppendAsyncFunc(context.Background(), ev(6), func() { calls++ }); !errors.Is(err, ErrFull) {
		t.Fatalf("AppendAsyncFunc on a full log = %v, want ErrFull", err)
	}
	if err := l.EnqueueFunc(ev(7), func() { calls++ }); !errors.Is(err, ErrFull) {
		t.Fatalf("EnqueueFunc on a full log = %v, want ErrFull", err)
	}
	if calls != 2 {
		t.Errorf("queued called %d times, want 2: it ran for a refused event", calls)
	}
}
