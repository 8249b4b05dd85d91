package buffer

import (
	"bytes"
	"context"
	"errors"
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
