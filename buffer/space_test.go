package buffer

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fill enqueues n events of about 200 bytes as fast as the queue takes them and waits until they are
// committed.
func fill(t testing.TB, l *Log, n int) {
	t.Helper()
	start := l.LastSeq()
	e := benchEntry()
	for i := 0; i < n; {
		if err := l.Enqueue(e); err != nil {
			if err := l.Wait(context.Background(), l.LastSeq()); err != nil {
				t.Fatal(err)
			}
			continue
		}
		i++
	}
	deadline := time.Now().Add(time.Minute)
	for l.LastSeq() < start+uint64(n) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d events committed", l.LastSeq()-start, n)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = l.Wait(ctx, l.LastSeq())
		cancel()
	}
}

// benchEntry is a 200-byte CloudEvent.
func benchEntry() Entry {
	data := []byte(`{"specversion":"1.0","id":"0000000000000000000000","source":"edgegate/hall-motion","type":"room.entered","subject":"hall-motion","time":"2026-01-02T15:04:05Z","datacontenttype":"application/json","data":{"r":1}}`)
	return Entry{Data: data[:200], Type: "room.entered", Subject: "hall-motion"}
}

// TestCompaction: appending and draining many events leaves the file near its starting size, because
// drained segments are deleted whole and the mostly free file is compacted. 100k events; 1M with
// EDGEGATE_LONG=1.
func TestCompaction(t *testing.T) {
	n := 100_000
	if longTests() {
		n = 1_000_000
	}
	l := openTest(t, Config{Durability: DurabilityInterval, Cursors: []string{"sink"}, MaxBytes: 1 << 30}, 0)
	l.compactMinFile = 4 << 20 // the default, 32 MiB, is larger than 100k events
	l.compactEvery = 50 * time.Millisecond
	run(t, l.Log)
	appendN(t, l.Log, 100, func(int) Entry { return benchEntry() })
	if err := l.Ack("sink", 100); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the first events drained", func() bool { return l.Stats().Events == 0 })
	baseline := fileSize(l.path)

	fill(t, l.Log, n)
	full := fileSize(l.path)

	// A reader keeps reading through the compaction.
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		for ctx.Err() == nil {
			if _, err := l.Read(0, 100); err != nil {
				t.Error(err)
				return
			}
		}
	})
	if err := l.Ack("sink", l.LastSeq()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the backlog drained", func() bool { return l.Stats().Events == 0 })
	waitFor(t, 30*time.Second, "a compaction", func() bool {
		return testutilCounter(t, l, "edgegate_buffer_compactions_total") >= 1
	})
	cancel()
	wg.Wait()
	after := fileSize(l.path)
	t.Logf("file: %d bytes at baseline, %d with %d events, %d after draining", baseline, full, n, after)
	if after >= 2*baseline+4<<20 {
		t.Fatalf("file is %d bytes after draining, baseline %d", after, baseline)
	}
	seq, err := l.Append(context.Background(), benchEntry())
	if err != nil || seq != uint64(n)+101 {
		t.Fatalf("append after compaction = %d, %v", seq, err)
	}
	if recs, err := l.Read(0, 10); err != nil || len(recs) != 1 || recs[0].Seq != seq {
		t.Fatalf("read after compaction = %v, %v", recs, err)
	}
	checkDB(t, l.Log)
	if got := testutilCounter(t, l, "edgegate_buffer_file_size_bytes"); got != float64(fileSize(l.path)) {
		t.Errorf("file_size_bytes = %v, want %d", got, fileSize(l.path))
	}
}

// TestToolDuringCompactionSwap: between renaming its copy over the log and opening it, compaction holds no lock
// on the file at the path; a tool that opens the log then is refused all the same (ErrLocked), and the gateway's
// log opens the new file and goes on.
func TestToolDuringCompactionSwap(t *testing.T) {
	l := openTest(t, Config{Durability: DurabilityInterval, Cursors: []string{"sink"}, MaxBytes: 1 << 30}, 0)
	l.compactMinFile = 1 << 20
	l.compactEvery = 20 * time.Millisecond
	var once sync.Once
	toolErr := make(chan error, 1)
	l.afterSwap = func() {
		once.Do(func() {
			tool, err := OpenTool(Config{Path: l.path}, nil)
			if err == nil {
				_ = tool.Close()
			}
			toolErr <- err
		})
	}
	run(t, l.Log)
	fill(t, l.Log, 60_000) // about 15 MiB: compaction needs more than twice the used size plus 4 MiB
	if err := l.Ack("sink", l.LastSeq()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "a compaction", func() bool {
		return testutilCounter(t, l, "edgegate_buffer_compactions_total") >= 1
	})
	if err := <-toolErr; !errors.Is(err, ErrLocked) {
		t.Fatalf("a tool opening the log during the swap got %v, want ErrLocked", err)
	}
	if got := testutilCounter(t, l, "edgegate_buffer_compaction_errors_total"); got != 0 {
		t.Fatalf("compaction_errors_total = %v, want 0", got)
	}
	seq, err := l.Append(context.Background(), benchEntry())
	if err != nil || seq != 60_001 {
		t.Fatalf("append after compaction = %d, %v; want 60001", seq, err)
	}
	checkDB(t, l.Log)
}

// TestCompactionNeedsRoom: compaction writes a copy of the used part of the file; with less free space than
// that above min_free_bytes it waits instead of filling the filesystem, and runs once there is room.
func TestCompactionNeedsRoom(t *testing.T) {
	const minFree = 64 << 20
	l := openTest(t, Config{Durability: DurabilityInterval, Cursors: []string{"sink"}, MaxBytes: 1 << 30, MinFreeBytes: minFree}, 0)
	var avail atomic.Int64
	avail.Store(1 << 40)
	l.statfs = func(string) (int64, error) { return avail.Load(), nil }
	l.compactMinFile = 1 << 20
	l.compactEvery = 20 * time.Millisecond
	run(t, l.Log)
	fill(t, l.Log, 60_000)
	// The file is mostly free once the events are drained: room is kept scarce meanwhile.
	l.writeMu.Lock()
	size := fileSize(l.path)
	l.writeMu.Unlock()
	avail.Store(minFree + compactSlack) // less than a copy of anything above the guard
	if err := l.Ack("sink", l.LastSeq()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the drained events deleted", func() bool { return l.Stats().Events == 0 })
	waitFor(t, 10*time.Second, "compaction waiting for room", func() bool {
		return testutilCounter(t, l, "edgegate_buffer_compaction_waiting_for_room") == 1
	})
	if n := testutilCounter(t, l, "edgegate_buffer_compactions_total"); n != 0 {
		t.Fatalf("compacted %v times with %d bytes free", n, avail.Load())
	}
	if got := fileSize(l.path); got < size {
		t.Fatalf("file size %d, was %d: compacted without room", got, size)
	}
	avail.Store(1 << 40)
	waitFor(t, 10*time.Second, "a compaction once there is room", func() bool {
		return testutilCounter(t, l, "edgegate_buffer_compactions_total") == 1
	})
	if got := testutilCounter(t, l, "edgegate_buffer_compaction_waiting_for_room"); got != 0 {
		t.Errorf("waiting_for_room = %v after the compaction", got)
	}
	if got := fileSize(l.path); got >= size/2 {
		t.Errorf("file size %d after compaction, was %d", got, size)
	}
	seq := appendN(t, l.Log, 1, func(int) Entry { return benchEntry() })[0]
	if recs, err := l.Read(0, 10); err != nil || len(recs) != 1 || recs[0].Seq != seq {
		t.Errorf("read after compaction = %v, %v", recs, err)
	}
}

// TestOpenWithBacklog: Open reads only segment metadata; the state it builds matches a full scan. 50k events;
// 1M with EDGEGATE_LONG=1 (the time to open is logged; BenchmarkOpenWithBacklog measures it).
func TestOpenWithBacklog(t *testing.T) {
	n := 50_000
	if longTests() {
		n = 1_000_000
	}
	cfg := Config{Durability: DurabilityInterval, Cursors: []string{"sink"}, MaxBytes: 1 << 30}
	l := openTest(t, cfg, 0)
	stop := run(t, l.Log)
	fill(t, l.Log, n)
	if err := l.Ack("sink", 1000); err != nil {
		t.Fatal(err)
	}
	stop()
	cfg.Path = l.path
	start := time.Now()
	l2, err := Open(cfg, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("opened a log of %d events (%d bytes file) in %s", n, fileSize(l.path), time.Since(start))
	defer l2.Close()
	st := l2.Stats()
	if st.Events != int64(n) || st.LastSeq != uint64(n) || st.FirstSeq != 1 || st.Cursors[0].Backlog != int64(n-1000) {
		t.Fatalf("stats after reopen: %+v", st)
	}
	checkDB(t, l2)
}
