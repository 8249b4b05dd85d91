package forward

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// BenchmarkMQTTSinkFromLog is BenchmarkMQTTSinkThroughput on the real durable log (fsync mode) instead of the
// in-memory one: "backlog" drains b.N stored events with nothing appended meanwhile (every cursor save is a
// commit of its own), "live" drains while 16 appenders add the b.N events (cursor saves ride along with the
// appends' commits). It reports the sink's events/s; "live" also reports the appenders' events/s. The
// "batched" runs are "backlog" with the sink in batch mode (JSON arrays of up to batch_size, 128, events per
// message), beside "backlog" at the same window.
//
//	go test -run '^$' -bench MQTTSinkFromLog -benchtime 5000x ./forward/
func BenchmarkMQTTSinkFromLog(b *testing.B) {
	for _, live := range []bool{false, true} {
		for _, window := range []int{1, 64, DefaultWindow} {
			name := "backlog"
			if live {
				name = "live"
			}
			b.Run(fmt.Sprintf("%s/window=%d", name, window), func(b *testing.B) {
				benchSinkFromLog(b, window, live)
			})
		}
	}
	b.Run(fmt.Sprintf("batched/window=%d", DefaultWindow), func(b *testing.B) {
		benchSinkFromLog(b, DefaultWindow, false, func(sc *SinkConfig) { sc.MQTT.Mode = ModeBatch })
	})
}

func benchSinkFromLog(b *testing.B, window int, live bool, opts ...func(*SinkConfig)) {
	broker := mosquittotest.Start(b)
	log := openBufferLog(b, "sink:bench")
	appendAll := func() time.Duration {
		start := time.Now()
		var next atomic.Int64
		var wg sync.WaitGroup
		for range 16 {
			wg.Go(func() {
				for i := int(next.Add(1)); i <= b.N; i = int(next.Add(1)) {
					log.add(b, fmt.Sprintf("ev-%06d", i), "sensor.reading", fmt.Sprintf("device-%02d", i%50), i)
				}
			})
		}
		wg.Wait()
		return time.Since(start)
	}
	if !live {
		appendAll()
	}
	f := benchForwarder(b, broker.URL(), window, log, opts...)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	b.ResetTimer()
	start := time.Now()
	go func() { done <- f.Run(ctx) }()
	var appendTook time.Duration
	if live {
		appendTook = appendAll()
	}
	for log.Cursor("sink:bench") < uint64(b.N) {
		time.Sleep(time.Millisecond)
	}
	elapsed := time.Since(start)
	b.StopTimer()
	cancel()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "events/s")
	if live {
		b.ReportMetric(float64(b.N)/appendTook.Seconds(), "appends/s")
	}
}
