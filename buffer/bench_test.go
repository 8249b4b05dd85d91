package buffer

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// BenchmarkAppendDurable measures durable (fsync) appends of 200-byte events from concurrent appenders:
// events/s and the p99 append-to-durable latency in milliseconds. It measures the raw ceiling of the same disk
// too (rawRate: raw bbolt, one transaction per 1000 events, as many events, once before and once after the
// appenders, averaged) and reports events/s over it (of-ceiling), and over raw bbolt committing one transaction
// per `appenders` events (of-bound, over at most 2000 transactions): no commit of closed-loop appenders, each
// waiting for its event before the next, can hold more events than there are appenders. textbook-of-ceiling is
// the textbook group commit on raw bbolt with the same appenders (see textbookRate), of-textbook the log over it.
func BenchmarkAppendDurable(b *testing.B) {
	for _, appenders := range []int{1, 16, 256} {
		b.Run(fmt.Sprintf("appenders=%d", appenders), func(b *testing.B) {
			b.StopTimer()
			before := rawRate(b, b.N, 1000)
			bound := rawRate(b, min(b.N, 2000*appenders), appenders) // 2000 fsyncs at most
			l := openTest(b, Config{MaxBytes: 4 << 30}, 0)
			run(b, l.Log)
			e := benchEntry()
			lat := make([]time.Duration, b.N)
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			b.StartTimer()
			start := time.Now()
			for range appenders {
				wg.Go(func() {
					for {
						i := next.Add(1) - 1
						if i >= int64(b.N) {
							return
						}
						t0 := time.Now()
						if _, err := l.Append(context.Background(), e); err != nil {
							b.Error(err)
							return
						}
						lat[i] = time.Since(t0)
					}
				})
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			ceiling := (before + rawRate(b, b.N, 1000)) / 2
			textbook := textbookRate(b, min(b.N, 2000*appenders), appenders)
			slices.Sort(lat)
			rate := float64(b.N) / elapsed.Seconds()
			b.ReportMetric(rate, "events/s")
			b.ReportMetric(ceiling, "ceiling-events/s")
			b.ReportMetric(rate/ceiling, "of-ceiling")
			b.ReportMetric(rate/bound, "of-bound")
			b.ReportMetric(textbook/ceiling, "textbook-of-ceiling")
			b.ReportMetric(rate/textbook, "of-textbook")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
			commits := float64(testutilHistogramCount(b, l, "edgegate_buffer_commit_batch_size"))
			b.ReportMetric(float64(b.N)/commits, "events/commit")
			b.ReportMetric(histogramSum(b, l, "edgegate_buffer_commit_duration_seconds")/commits*1e3, "commit-ms")
		})
	}
}

// BenchmarkAppendDurableWithAcks is BenchmarkAppendDurable with a reader that acknowledges every commit as
// soon as it sees it (a sink with an instant upstream): its cursor saves must not cost the appenders their
// throughput. Compare events/s with BenchmarkAppendDurable from the same run.
func BenchmarkAppendDurableWithAcks(b *testing.B) {
	for _, appenders := range []int{1, 16, 256} {
		b.Run(fmt.Sprintf("appenders=%d", appenders), func(b *testing.B) {
			l := openTest(b, Config{MaxBytes: 4 << 30, Cursors: []string{"sink"}}, 0)
			run(b, l.Log)
			ctx, cancel := context.WithCancel(context.Background())
			var rg sync.WaitGroup
			rg.Go(func() {
				var pos uint64
				for l.Wait(ctx, pos) == nil {
					pos = l.LastSeq()
					if err := l.Ack("sink", pos); err != nil {
						b.Error(err)
						return
					}
				}
			})
			e := benchEntry()
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			start := time.Now()
			for range appenders {
				wg.Go(func() {
					for next.Add(1) <= int64(b.N) {
						if _, err := l.Append(context.Background(), e); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			cancel()
			rg.Wait()
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "events/s")
		})
	}
}

// BenchmarkRawCeiling is the ceiling for BenchmarkAppendDurable: raw bbolt with the same options, one
// transaction (one fsync) per 1000 200-byte events under sequential keys. The sub-benchmark with 256 events per
// transaction is the most a group commit of 256 closed-loop appenders (each waiting for its event before the
// next) could reach: no batch can hold more than one event per appender.
func BenchmarkRawCeiling(b *testing.B) {
	for _, perTx := range []int{1000, 256} {
		b.Run(fmt.Sprintf("events-per-tx=%d", perTx), func(b *testing.B) { rawCeiling(b, perTx) })
	}
}

func rawCeiling(b *testing.B, perTx int) {
	b.ReportMetric(rawRate(b, b.N, perTx), "events/s")
}

// openRaw opens a new bbolt file with the log's options.
func openRaw(b *testing.B) *bolt.DB {
	b.Helper()
	db, err := bolt.Open(filepath.Join(b.TempDir(), "raw.db"), 0o600, &bolt.Options{
		NoFreelistSync: true, FreelistType: bolt.FreelistMapType})
	if err != nil {
		b.Fatal(err)
	}
	return db
}

// rawRate writes n 200-byte events under sequential keys into a new bbolt file with the log's options, perTx
// events per transaction (one fsync each), and returns the events per second.
func rawRate(b *testing.B, n, perTx int) float64 {
	b.Helper()
	db := openRaw(b)
	defer db.Close()
	val := benchEntry().Data
	var seq uint64
	start := time.Now()
	for done := 0; done < n; {
		k := min(perTx, n-done)
		err := db.Update(func(tx *bolt.Tx) error {
			bk, err := tx.CreateBucketIfNotExists([]byte("events"))
			if err != nil {
				return err
			}
			bk.FillPercent = 1.0
			for range k {
				seq++
				if err := bk.Put(seqKey(seq), val); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		done += k
	}
	return float64(n) / time.Since(start).Seconds()
}

// BenchmarkOpenWithBacklog measures Open on a log holding a backlog of EDGEGATE_BENCH_BACKLOG events
// (default 1,000,000 of 200 bytes).
func BenchmarkOpenWithBacklog(b *testing.B) {
	n := 1_000_000
	if s := os.Getenv("EDGEGATE_BENCH_BACKLOG"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil {
			b.Fatal(err)
		}
	}
	cfg := Config{Durability: DurabilityInterval, MaxBytes: 4 << 30, Cursors: []string{"sink"}}
	l := openTest(b, cfg, 0)
	stop := run(b, l.Log)
	fill(b, l.Log, n)
	stop()
	cfg.Path = l.path
	for b.Loop() {
		l, err := Open(cfg, nil, nil)
		if err != nil {
			b.Fatal(err)
		}
		if l.Stats().Events != int64(n) {
			b.Fatalf("%d events", l.Stats().Events)
		}
		b.StopTimer()
		_ = l.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(fileSize(cfg.Path))/(1<<20), "file-MiB")
}

// textbookRate runs the textbook group commit on raw bbolt with the log's options: appenders goroutines, each
// queuing a 200-byte event under a mutex and waiting for its commit before the next; one writer that takes
// whatever is queued, puts it in one transaction (one commit, two fsyncs) and wakes the batch. It has none of
// the log's work (segments, retention, cursors, metrics) and none of its care for closed-loop appenders: it is
// what any group commit on this disk and these processors starts from. It returns the events per second over n
// events.
func textbookRate(b *testing.B, n, appenders int) float64 {
	b.Helper()
	db := openRaw(b)
	defer db.Close()
	type batch struct {
		vals [][]byte
		err  error
		done chan struct{}
	}
	var (
		mu      sync.Mutex
		queued  = sync.NewCond(&mu)
		cur     = &batch{done: make(chan struct{})}
		stopped bool
	)
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		var seq uint64
		for {
			mu.Lock()
			for len(cur.vals) == 0 && !stopped {
				queued.Wait()
			}
			if len(cur.vals) == 0 {
				mu.Unlock()
				return
			}
			bt := cur
			cur = &batch{done: make(chan struct{})}
			mu.Unlock()
			bt.err = db.Update(func(tx *bolt.Tx) error {
				bk, err := tx.CreateBucketIfNotExists([]byte("events"))
				if err != nil {
					return err
				}
				bk.FillPercent = 1.0
				for _, v := range bt.vals {
					seq++
					if err := bk.Put(seqKey(seq), v); err != nil {
						return err
					}
				}
				return nil
			})
			close(bt.done)
		}
	}()
	val := benchEntry().Data
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range appenders {
		wg.Go(func() {
			for next.Add(1) <= int64(n) {
				v := append([]byte(nil), val...)
				mu.Lock()
				bt := cur
				bt.vals = append(bt.vals, v)
				if len(bt.vals) == 1 {
					queued.Signal()
				}
				mu.Unlock()
				<-bt.done
				if bt.err != nil {
					b.Error(bt.err)
					return
				}
			}
		})
	}
	wg.Wait()
	rate := float64(n) / time.Since(start).Seconds()
	mu.Lock()
	stopped = true
	queued.Signal()
	mu.Unlock()
	<-writerDone
	return rate
}
