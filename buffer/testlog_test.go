package buffer

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/edgegate/edgegate/internal/eventually"
)

// testLog is a log under test with its registry.
type testLog struct {
	*Log
	reg *prometheus.Registry
}

// openTest opens a log in a temporary directory (cfg.Path when set); segSize 0 means the default.
func openTest(t testing.TB, cfg Config, segSize uint64) testLog {
	t.Helper()
	if cfg.Path == "" {
		cfg.Path = filepath.Join(t.TempDir(), "events.db")
	}
	reg := prometheus.NewRegistry()
	l, err := open(cfg, testLogger(t), reg, openOptions{segSize: segSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return testLog{Log: l, reg: reg}
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// run starts l.Run and stops it at cleanup (or when the returned func is called), checking its result.
func run(t testing.TB, l *Log) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	var stopped bool
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	t.Cleanup(stop)
	return stop
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	eventually.True(t, timeout, what, cond)
}

func ev(i int) Entry {
	return Entry{
		Data:    fmt.Appendf(nil, `{"specversion":"1.0","id":"%06d","source":"test","type":"t.v","subject":"d1"}`, i),
		Type:    "t.v",
		Subject: "d1",
	}
}

// appendConcurrently appends ev(first)..ev(first+n-1) from n goroutines at once (so that they share
// commits) and returns each one's seq and error.
func appendConcurrently(l *Log, n, first int) ([]uint64, []error) {
	seqs, errs := make([]uint64, n), make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { seqs[i], errs[i] = l.Append(context.Background(), ev(first+i)) })
	}
	wg.Wait()
	return seqs, errs
}

// appendN appends n entries made by mk and returns their seqs.
func appendN(t testing.TB, l *Log, n int, mk func(i int) Entry) []uint64 {
	t.Helper()
	seqs := make([]uint64, n)
	for i := range n {
		seq, err := l.Append(context.Background(), mk(i))
		if err != nil {
			t.Fatalf("append %d: %v", i, err)
		}
		seqs[i] = seq
	}
	return seqs
}

// readAll reads every stored record.
func readAll(t testing.TB, l *Log) []Record {
	t.Helper()
	var out []Record
	var after uint64
	for {
		recs, err := l.Read(after, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if len(recs) == 0 {
			return out
		}
		out = append(out, recs...)
		after = recs[len(recs)-1].Seq
	}
}

// checkDB runs bbolt's consistency check and compares the per-segment metadata with a full scan.
func checkDB(t testing.TB, l *Log) {
	t.Helper()
	l.dbMu.RLock()
	defer l.dbMu.RUnlock()
	st := l.state.Load()
	err := l.db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			t.Errorf("bbolt check: %v", err)
		}
		disk, err := l.loadState(tx)
		if err != nil {
			return err
		}
		if disk.prioBytes != st.prioBytes {
			t.Errorf("bytes per priority on disk %v != in memory %v", disk.prioBytes, st.prioBytes)
		}
		if disk.lastSeq != st.lastSeq || disk.events != st.events || disk.bytes != st.bytes || len(disk.segs) != len(st.segs) {
			t.Errorf("state on disk (last %d, %d events, %d bytes, %d segs) != in memory (last %d, %d events, %d bytes, %d segs)",
				disk.lastSeq, disk.events, disk.bytes, len(disk.segs), st.lastSeq, st.events, st.bytes, len(st.segs))
		}
		segs := map[uint64]*segMeta{}
		for _, s := range disk.segs {
			segs[s.Base] = s
		}
		scanned := map[uint64]*segMeta{}
		var prev uint64
		err = l.scan(tx, 0, func(seq uint64, v []byte) (bool, error) {
			if seq <= prev {
				t.Errorf("seq %d after %d", seq, prev)
			}
			prev = seq
			h, _, err := decodeRecord(v)
			if err != nil {
				return false, err
			}
			base := segBase(seq, l.segSize)
			s := scanned[base]
			if s == nil {
				s = &segMeta{Base: base, MinSeq: seq, MinTime: h.Time, MaxTime: h.Time}
				scanned[base] = s
			}
			s.Count++
			s.Bytes += int64(len(v) + keySize)
			s.MaxSeq = seq
			s.Prio[h.Priority]++
			s.PrioBytes[h.Priority] += int64(len(v) + keySize)
			s.MinTime, s.MaxTime = min(s.MinTime, h.Time), max(s.MaxTime, h.Time)
			return true, nil
		})
		if err != nil {
			return err
		}
		if len(scanned) != len(segs) {
			t.Errorf("%d segments hold events, metadata for %d", len(scanned), len(segs))
		}
		for base, got := range scanned {
			m := segs[base]
			if m == nil {
				t.Errorf("segment %d has no metadata", base)
				continue
			}
			if m.Count != got.Count || m.Bytes != got.Bytes || m.MinSeq != got.MinSeq || m.MaxSeq != got.MaxSeq || m.Prio != got.Prio || m.PrioBytes != got.PrioBytes {
				t.Errorf("segment %d: metadata %+v, scanned %+v", base, *m, *got)
			}
			if m.MinTime > got.MinTime || m.MaxTime < got.MaxTime {
				t.Errorf("segment %d: time bounds %d..%d do not hold %d..%d", base, m.MinTime, m.MaxTime, got.MinTime, got.MaxTime)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
