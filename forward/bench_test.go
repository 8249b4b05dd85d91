package forward

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// BenchmarkMQTTSinkThroughput drains b.N stored events (about 300 bytes each) into a private mosquitto over
// loopback and reports events/s, with a window of 1 (one publish at a time: every event waits for its PUBACK),
// 64 and DefaultWindow.
//
//	go test -run '^$' -bench MQTTSinkThroughput -benchtime 20000x ./forward/
func BenchmarkMQTTSinkThroughput(b *testing.B) {
	for _, window := range []int{1, 64, DefaultWindow} {
		b.Run(fmt.Sprintf("window=%d", window), func(b *testing.B) {
			broker := mosquittotest.Start(b)
			log := newMemLog(b)
			for i := range b.N {
				log.add("sensor.reading", fmt.Sprintf("device-%02d", i%50), i+1)
			}
			f := benchForwarder(b, broker.URL(), window, log)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			b.ResetTimer()
			start := time.Now()
			go func() { done <- f.Run(ctx) }()
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
		})
	}
}

// benchForwarder is a forwarder with one MQTT sink named bench to url, reading src.
func benchForwarder(b *testing.B, url string, window int, src Source, opts ...func(*SinkConfig)) *Forwarder {
	b.Helper()
	sc := mqttSink("bench", url)
	sc.Window = window
	for _, o := range opts {
		o(&sc)
	}
	sc.AckTimeout = 30 * time.Second
	f, err := New(Config{Sinks: []SinkConfig{sc}}, "gw1", src, nil, &deadLetters{},
		slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	return f
}
