package buffer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

func TestAppendReadOrder(t *testing.T) {
	l := openTest(t, Config{}, 64)
	run(t, l.Log)
	const writers, per = 8, 150
	var wg sync.WaitGroup
	got := make([][]uint64, writers)
	for w := range writers {
		wg.Go(func() {
			for i := range per {
				seq, err := l.Append(context.Background(), ev(w*per+i))
				if err != nil {
					t.Error(err)
					return
				}
				got[w] = append(got[w], seq)
			}
		})
	}
	wg.Wait()
	seen := map[uint64]bool{}
	for w := range writers {
		for i, seq := range got[w] {
			if seen[seq] {
				t.Fatalf("seq %d twice", seq)
			}
			seen[seq] = true
			if i > 0 && seq <= got[w][i-1] {
				t.Fatalf("writer %d: seq %d after %d", w, seq, got[w][i-1])
			}
		}
	}
	if l.LastSeq() != writers*per || l.FirstSeq() != 1 {
		t.Fatalf("first %d last %d, want 1 and %d", l.FirstSeq(), l.LastSeq(), writers*per)
	}
	recs := readAll(t, l.Log)
	if len(recs) != writers*per {
		t.Fatalf("read %d records, want %d", len(recs), writers*per)
	}
	for i, r := range recs {
		if r.Seq != uint64(i+1) {
			t.Fatalf("record %d has seq %d", i, r.Seq)
		}
		if r.Type != "t.v" || r.Subject != "d1" || !bytes.HasPrefix(r.Data, []byte(`{"specversion"`)) || r.Time.IsZero() {
			t.Fatalf("record %d: %+v", i, r)
		}
	}
	checkDB(t, l.Log)
}

func TestReadArgs(t *testing.T) {
	l := openTest(t, Config{}, 0)
	run(t, l.Log)
	appendN(t, l.Log, 10, ev)
	tests := []struct {
		name      string
		after     uint64
		max       int
		wantFirst uint64
		wantN     int
		wantErr   bool
	}{
		{"from start", 0, 100, 1, 10, false},
		{"limited", 0, 3, 1, 3, false},
		{"middle", 4, 100, 5, 6, false},
		{"at end", 10, 100, 0, 0, false},
		{"past end", 50, 100, 0, 0, false},
		{"max zero", 0, 0, 0, 0, true},
		{"max negative", 0, -1, 0, 0, true},
		{"after max uint", ^uint64(0), 5, 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			recs, err := l.Read(tt.after, tt.max)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if len(recs) != tt.wantN {
				t.Fatalf("%d records, want %d", len(recs), tt.wantN)
			}
			if tt.wantN > 0 && recs[0].Seq != tt.wantFirst {
				t.Fatalf("first seq %d, want %d", recs[0].Seq, tt.wantFirst)
			}
		})
	}
}

// TestReadHeaders: ReadHeaders returns what Read does, in the same order and with the same limits, without the data.
func TestReadHeaders(t *testing.T) {
	l := openTest(t, Config{}, 4)
	run(t, l.Log)
	for i := range 10 {
		e := ev(i)
		e.Subject, e.Type, e.Priority = fmt.Sprintf("d%d", i%3), fmt.Sprintf("t.%d", i%2), uint8(i%4)
		if _, err := l.Append(context.Background(), e); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		after uint64
		max   int
	}{{0, 100}, {0, 3}, {4, 100}, {10, 5}} {
		full, err := l.Read(tc.after, tc.max)
		if err != nil {
			t.Fatal(err)
		}
		heads, err := l.ReadHeaders(tc.after, tc.max)
		if err != nil {
			t.Fatal(err)
		}
		if len(heads) != len(full) {
			t.Fatalf("after %d max %d: %d headers, %d records", tc.after, tc.max, len(heads), len(full))
		}
		for i, h := range heads {
			r := full[i]
			if h.Data != nil {
				t.Errorf("seq %d: header carries %d bytes of data", h.Seq, len(h.Data))
			}
			r.Data = nil
			if h.Seq != r.Seq || h.Type != r.Type || h.Subject != r.Subject || h.Priority != r.Priority || !h.Time.Equal(r.Time) {
				t.Errorf("after %d: header %+v, record %+v", tc.after, h, r)
			}
		}
	}
	if _, err := l.ReadHeaders(0, 0); err == nil {
		t.Error("ReadHeaders with max 0: no error")
	}
}

func TestWait(t *testing.T) {
	l := openTest(t, Config{}, 0)
	stop := run(t, l.Log)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := l.Wait(ctx, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait on an empty log = %v, want deadline exceeded", err)
	}

	woke := make(chan error, 1)
	go func() { woke <- l.Wait(context.Background(), 0) }()
	if _, err := l.Append(context.Background(), ev(1)); err != nil {
		t.Fatal(err)
	}
	if err := <-woke; err != nil {
		t.Fatalf("Wait after an append = %v", err)
	}
	if err := l.Wait(context.Background(), 0); err != nil {
		t.Fatalf("Wait for an existing record = %v", err)
	}

	closed := make(chan error, 1)
	go func() { closed <- l.Wait(context.Background(), 1) }()
	stop()
	if err := <-closed; !errors.Is(err, ErrClosed) {
		t.Fatalf("Wait after stop = %v, want ErrClosed", err)
	}
	if _, err := l.Append(context.Background(), ev(2)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Append after stop = %v, want ErrClosed", err)
	}
	if err := l.Enqueue(ev(2)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Enqueue after stop = %v, want ErrClosed", err)
	}
	if _, err := l.Read(0, 1); !errors.Is(err, ErrClosed) {
		t.Fatalf("Read after stop = %v, want ErrClosed", err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close after Run = %v", err)
	}
}

// TestWaitSkipsRemovedRecords: records committed after `after` and removed since (delivered) do not end a Wait;
// a reader that has read everything stored sleeps until something new is stored.
func TestWaitSkipsRemovedRecords(t *testing.T) {
	l := openTest(t, Config{Cursors: []string{"sink"}}, 8)
	run(t, l.Log)
	appendN(t, l.Log, 20, ev)
	if err := l.Ack("sink", 20); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the delivered records removed", func() bool { return l.Stats().Events == 0 })

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := l.Wait(ctx, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait with every record removed = %v, want deadline exceeded", err)
	}
	woke := make(chan error, 1)
	go func() { woke <- l.Wait(context.Background(), 0) }()
	if _, err := l.Append(context.Background(), ev(21)); err != nil {
		t.Fatal(err)
	}
	if err := <-woke; err != nil {
		t.Fatalf("Wait after an append = %v", err)
	}
	if recs, err := l.Read(0, 10); err != nil || len(recs) != 1 || recs[0].Seq != 21 {
		t.Fatalf("Read = %v, %v; want seq 21", recs, err)
	}
}

func TestAppendInvalid(t *testing.T) {
	l := openTest(t, Config{}, 0)
	run(t, l.Log)
	e := ev(1)
	e.Priority = 10
	if _, err := l.Append(context.Background(), e); err == nil {
		t.Fatal("priority 10 accepted")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Append(ctx, ev(1)); !errors.Is(err, context.Canceled) {
		t.Fatalf("Append with a cancelled context = %v", err)
	}
}

func TestEnqueue(t *testing.T) {
	l := openTest(t, Config{QueueSize: 5}, 0)
	for i := range 5 {
		if err := l.Enqueue(ev(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Enqueue(ev(5)); !errors.Is(err, ErrFull) {
		t.Fatalf("Enqueue into a full queue = %v, want ErrFull", err)
	}
	// Append waits for room in the queue until its context ends.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := l.Append(ctx, ev(6)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Append into a full queue = %v, want deadline exceeded", err)
	}
	run(t, l.Log)
	if err := l.Wait(context.Background(), 4); err != nil {
		t.Fatal(err)
	}
	if got := len(readAll(t, l.Log)); got != 5 {
		t.Fatalf("%d records, want 5", got)
	}
	if got := testutilCounter(t, l, "edgegate_buffer_rejected_total"); got != 1 {
		t.Fatalf("rejected_total = %v, want 1", got)
	}
}

// TestCloseCommitsQueued: a tool that never runs Run still gets its queued events committed by Close.
func TestCloseCommitsQueued(t *testing.T) {
	l := openTest(t, Config{}, 0)
	for i := range 3 {
		if err := l.Enqueue(ev(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Ack("reader", 0); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l2 := openTest(t, Config{Path: l.path}, 0)
	if got := l2.LastSeq(); got != 3 {
		t.Fatalf("last seq after reopen = %d, want 3", got)
	}
}

func TestDurabilityInterval(t *testing.T) {
	cfg := Config{Durability: DurabilityInterval, FsyncInterval: 20 * time.Millisecond}
	l := openTest(t, cfg, 0)
	stop := run(t, l.Log)
	appendN(t, l.Log, 50, ev)
	waitFor(t, 5*time.Second, "the interval fsync", func() bool {
		return testutilHistogramCount(t, l, "edgegate_buffer_fsync_duration_seconds") > 0
	})
	stop()
	cfg.Path = l.path
	l2 := openTest(t, cfg, 0)
	if got := len(readAll(t, l2.Log)); got != 50 {
		t.Fatalf("%d records after reopen, want 50", got)
	}
}

// TestDurabilitySyncsCommits: in fsync mode every commit is fsync'd by bbolt (NoSync off), which a kill -9 test
// cannot show (the page cache survives it); interval mode leaves the fsync to the writer.
func TestDurabilitySyncsCommits(t *testing.T) {
	for mode, noSync := range map[string]bool{DurabilityFsync: false, DurabilityInterval: true} {
		l := openTest(t, Config{Durability: mode}, 0)
		if l.db.NoSync != noSync || l.db.NoGrowSync {
			t.Errorf("durability %s: NoSync %v, NoGrowSync %v; want NoSync %v, NoGrowSync false", mode, l.db.NoSync,
				l.db.NoGrowSync, noSync)
		}
	}
}

// TestIntervalFsyncOnTime: in interval mode a write is fsync'd FsyncInterval after the previous fsync, even when
// that fsync happened at a commit, off the housekeeping ticks (which would otherwise leave it unsynced for up
// to two intervals).
func TestIntervalFsyncOnTime(t *testing.T) {
	const interval = 500 * time.Millisecond
	l := openTest(t, Config{Durability: DurabilityInterval, FsyncInterval: interval}, 0)
	l.tickEvery = time.Hour // the ticks then come every FsyncInterval, from the start of Run
	start := time.Now()
	run(t, l.Log)
	syncs := func() uint64 { return testutilHistogramCount(t, l, "edgegate_buffer_fsync_duration_seconds") }
	// Idle past the first interval: the next commit fsyncs at once, between two ticks. The interval counts from
	// when Run began, which is after start (well after it on a loaded machine), hence the margin.
	time.Sleep(time.Until(start.Add(interval * 21 / 10)))
	appendN(t, l.Log, 1, ev)
	after := time.Now()
	n := syncs()
	if n != 1 {
		t.Fatalf("%d fsyncs after the first commit past the interval, want 1 (at the commit)", n)
	}
	took := histogramSum(t, l, "edgegate_buffer_fsync_duration_seconds")
	appendN(t, l.Log, 1, ev) // not fsync'd: the last fsync was just now
	waitFor(t, 5*time.Second, "the fsync of the second write", func() bool { return syncs() > n })
	// When that fsync began: the fsync itself may take a while on a busy disk.
	took = histogramSum(t, l, "edgegate_buffer_fsync_duration_seconds") - took
	if d := time.Since(after) - time.Duration(took*float64(time.Second)); d > interval*14/10 {
		t.Errorf("the second write was fsync'd %s after the previous fsync, want about %s", d.Round(time.Millisecond), interval)
	}
}

// TestClosedLoopAppendersShareCommits: appenders that each append their next event as soon as the last one is
// durable share commits: the writer waits for the appenders a commit woke instead of committing whoever came
// first, so the commits hold most of the appenders, not one or two (or two alternating halves).
func TestClosedLoopAppendersShareCommits(t *testing.T) {
	l := openTest(t, Config{}, 0)
	run(t, l.Log)
	const appenders, per = 32, 40
	var wg sync.WaitGroup
	for w := range appenders {
		wg.Go(func() {
			var last uint64
			for i := range per {
				seq, err := l.Append(context.Background(), ev(w*per+i))
				if err != nil {
					t.Error(err)
					return
				}
				if seq <= last {
					t.Errorf("appender %d: seq %d after %d", w, seq, last)
				}
				last = seq
			}
		})
	}
	wg.Wait()
	commits := testutilHistogramCount(t, l, "edgegate_buffer_commit_batch_size")
	perCommit := float64(appenders*per) / float64(commits)
	t.Logf("%d commits, %.1f events per commit", commits, perCommit)
	if perCommit < appenders*0.6 {
		t.Errorf("%.1f events per commit, want at least %d of the %d appenders in each", perCommit, appenders*6/10,
			appenders)
	}
	if got := l.LastSeq(); got != appenders*per {
		t.Fatalf("last seq %d, want %d", got, appenders*per)
	}
	checkDB(t, l.Log)
}

// TestUnwaitedPendingDoesNotStall: a Pending that is never waited for holds no later commit back for long.
func TestUnwaitedPendingDoesNotStall(t *testing.T) {
	l := openTest(t, Config{}, 0)
	run(t, l.Log)
	for i := range 3 {
		if _, err := l.AppendAsync(context.Background(), ev(i)); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		appendN(t, l.Log, 20, ev)
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("20 appends after an unwaited Pending took %v", d)
		}
	}
	if got := l.LastSeq(); got != 63 {
		t.Fatalf("last seq %d, want 63", got)
	}
}

// TestPayloadsIntact: concurrent appends of small and large events (encoded into shared, reused buffers or
// into their own) read back byte for byte, across many commits.
func TestPayloadsIntact(t *testing.T) {
	l := openTest(t, Config{MaxBytes: 1 << 30}, 0)
	run(t, l.Log)
	const appenders, per = 8, 60
	payload := func(w, i int) []byte {
		n := []int{1, 100, 3000, 20_000, 70_000}[(w+i)%5]
		b := make([]byte, n)
		for k := range b {
			b[k] = byte(w*31 + i*7 + k)
		}
		return b
	}
	want := map[uint64][]byte{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range appenders {
		wg.Go(func() {
			for i := range per {
				data := payload(w, i)
				e := Entry{Data: data, Type: "t.v", Subject: fmt.Sprint("d", w), Priority: uint8(i % 10)}
				var seq uint64
				var err error
				if i%3 == 0 {
					err = l.Enqueue(e)
				} else {
					seq, err = l.Append(context.Background(), e)
				}
				if err != nil {
					t.Error(err)
					return
				}
				clear(data) // the caller may reuse Data once Append or Enqueue returned
				if seq != 0 {
					mu.Lock()
					want[seq] = payload(w, i)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if err := l.Wait(context.Background(), appenders*per-1); err != nil {
		t.Fatal(err)
	}
	recs := readAll(t, l.Log)
	if len(recs) != appenders*per {
		t.Fatalf("read %d records, want %d", len(recs), appenders*per)
	}
	for _, r := range recs {
		if w, ok := want[r.Seq]; ok && !bytes.Equal(r.Data, w) {
			t.Fatalf("seq %d: %d bytes read back differ from the %d appended", r.Seq, len(r.Data), len(w))
		}
	}
	checkDB(t, l.Log)
}
