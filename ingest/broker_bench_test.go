//go:build unix

package ingest_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/ingest"
)

const (
	benchPublishers = 10 // paho clients publishing at once
	benchWindow     = 64 // QoS 1 publishes each client keeps in flight
)

// BenchmarkIngestVsBareMochi measures device messages per second through the gateway's broker (authentication,
// ACL, rate limiter, normalization to a CloudEvent, an in-memory consumer) against a bare mochi broker with an
// allow-all auth hook, in the same run: 10 paho clients publish 100-byte JSON payloads with QoS 1.
//
// "bare-mochi" and "gateway" measure each broker alone; "gateway" also reports its rate over the last bare-mochi
// measurement ("x-bare"; with -count N, go runs bare-mochi N times before gateway, so it is the last of those). "paired" runs both brokers side by side and alternates between them in short rounds, so
// that load from outside the benchmark hits both alike; its "ratio" metric (gateway msgs/s / bare msgs/s) is the
// figure to read on a busy machine, and "cpu-ratio" (bare CPU time per message / gateway CPU time per message,
// the process's own CPU time, clients included) the one least moved by other processes.
//
//	go test -run '^$' -bench IngestVsBareMochi -benchtime 3s ./ingest/
func BenchmarkIngestVsBareMochi(b *testing.B) {
	var bare float64
	b.Run("bare-mochi", func(b *testing.B) {
		bare = benchPublish(b, benchClients(b, startBareMochi(b)))
	})
	b.Run("gateway", func(b *testing.B) {
		gw := startBenchGateway(b)
		rate := benchPublish(b, benchClients(b, gw.addr))
		gw.check(b)
		if bare > 0 {
			b.ReportMetric(rate/bare, "x-bare")
		}
	})
	b.Run("paired", func(b *testing.B) {
		const rounds = 10
		gw := startBenchGateway(b)
		sides := []struct {
			clients []paho.Client
			n       int
			elapsed time.Duration
			cpu     time.Duration
		}{{clients: benchClients(b, startBareMochi(b))}, {clients: benchClients(b, gw.addr)}}
		b.ResetTimer()
		for r := range rounds {
			n := b.N / rounds
			if r < b.N%rounds {
				n++
			}
			for i := range sides {
				start, cpu := time.Now(), cpuTime()
				publishAll(b, sides[i].clients, n)
				sides[i].elapsed += time.Since(start)
				sides[i].cpu += cpuTime() - cpu
				sides[i].n += n
			}
		}
		b.StopTimer()
		gw.check(b)
		bareRate := float64(sides[0].n) / sides[0].elapsed.Seconds()
		gwRate := float64(sides[1].n) / sides[1].elapsed.Seconds()
		b.ReportMetric(bareRate, "bare-msgs/s")
		b.ReportMetric(gwRate, "gateway-msgs/s")
		b.ReportMetric(gwRate/bareRate, "ratio")
		bareCPU := float64(sides[0].cpu.Microseconds()) / float64(sides[0].n)
		gwCPU := float64(sides[1].cpu.Microseconds()) / float64(sides[1].n)
		b.ReportMetric(bareCPU/gwCPU, "cpu-ratio")
	})
}

type benchGateway struct {
	*testBroker
	consumed *atomic.Int64
}

// startBenchGateway runs the gateway's broker for devices bench-0 ... with a consumer that only counts.
func startBenchGateway(b *testing.B) benchGateway {
	b.Helper()
	consumed := new(atomic.Int64)
	devs := make([]dev, benchPublishers)
	for i := range devs {
		devs[i] = dev{id: fmt.Sprintf("bench-%d", i)}
	}
	tb := startBroker(b, brokerOpts{
		devices: devs,
		cfg: func(c *ingest.BrokerConfig) {
			c.PublishRate, c.PublishBurst = 1e9, 1<<20 // the limiter runs, without limiting
		},
		consumer: func(*consumer) ingest.Consumer { return countingConsumer{consumed} },
	})
	return benchGateway{testBroker: tb, consumed: consumed}
}

// check fails the benchmark unless every accepted message became a consumed event.
func (g benchGateway) check(b *testing.B) {
	b.Helper()
	in := g.metric(b, "edgegate_ingest_messages_total", "qos", "1")
	if n := g.consumed.Load(); float64(n) != in || n == 0 {
		b.Fatalf("%d events consumed, %v messages accepted", n, in)
	}
}

// countingConsumer counts events and keeps nothing.
type countingConsumer struct{ n *atomic.Int64 }

func (c countingConsumer) Consume(_ context.Context, r ingest.Result, _ bool) error {
	if !strings.HasPrefix(r.Event.Type(), "device.") {
		c.n.Add(1)
	}
	return nil
}

// allowAll lets every client connect, publish and subscribe (as mochi's auth.AllowHook, whose package needs a
// module this one does not require).
type allowAll struct{ mochi.HookBase }

func (allowAll) ID() string { return "allow-all" }
func (allowAll) Provides(b byte) bool {
	return b == mochi.OnConnectAuthenticate || b == mochi.OnACLCheck
}
func (allowAll) OnConnectAuthenticate(*mochi.Client, packets.Packet) bool { return true }
func (allowAll) OnACLCheck(*mochi.Client, string, bool) bool              { return true }

// startBareMochi runs a mochi broker with only an allow-all auth hook on a loopback port.
func startBareMochi(b *testing.B) string {
	b.Helper()
	srv := mochi.New(&mochi.Options{Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(new(allowAll), nil); err != nil {
		b.Fatal(err)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "bench", Address: "127.0.0.1:0"})
	if err := srv.AddListener(tcp); err != nil {
		b.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = srv.Close() })
	return tcp.Address()
}

// benchPayload returns a JSON object of exactly 100 bytes.
func benchPayload() []byte {
	p := `{"temp":21.5,"humidity":40,"battery":97,"pad":"`
	p += strings.Repeat("x", 100-len(p)-2) + `"}`
	return []byte(p)
}

// benchClients connects benchPublishers paho clients as bench-0 ... to addr.
func benchClients(b *testing.B, addr string) []paho.Client {
	b.Helper()
	clients := make([]paho.Client, benchPublishers)
	for i := range clients {
		id := fmt.Sprintf("bench-%d", i)
		c, err := pahoConnect(b, "tcp://"+addr, pahoOpts{user: id, pass: password(id)})
		if err != nil {
			b.Fatalf("connect %s: %v", id, err)
		}
		clients[i] = c
	}
	return clients
}

// benchPublish publishes b.N messages and returns and reports the rate.
func benchPublish(b *testing.B, clients []paho.Client) float64 {
	b.Helper()
	b.ResetTimer()
	start, cpu := time.Now(), cpuTime()
	publishAll(b, clients, b.N)
	elapsed, cpu := time.Since(start), cpuTime()-cpu
	b.StopTimer()
	rate := float64(b.N) / elapsed.Seconds()
	b.ReportMetric(rate, "msgs/s")
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/msg")
	return rate
}

// cpuTime returns the CPU time (user and system) this process has used: unlike wall time, it does not change with
// the load other processes put on the machine. The publishing clients run in this process too, alike for both
// brokers.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// publishAll publishes n messages, spread over the clients (client i as device bench-i), each keeping benchWindow
// QoS 1 publishes in flight, and returns after the last PUBACK.
func publishAll(b *testing.B, clients []paho.Client, n int) {
	b.Helper()
	payload := benchPayload()
	var failed atomic.Value
	var wg sync.WaitGroup
	for i, c := range clients {
		count := n / len(clients)
		if i < n%len(clients) {
			count++
		}
		topic := fmt.Sprintf("devices/bench-%d/events/reading", i)
		wg.Go(func() {
			var window [benchWindow]paho.Token
			wait := func(tok paho.Token) bool {
				if !tok.WaitTimeout(30 * time.Second) {
					failed.Store(fmt.Errorf("%s: no PUBACK within 30s", topic))
					return false
				}
				if err := tok.Error(); err != nil {
					failed.Store(fmt.Errorf("%s: %w", topic, err))
					return false
				}
				return true
			}
			for j := range count {
				if tok := window[j%benchWindow]; tok != nil && !wait(tok) {
					return
				}
				window[j%benchWindow] = c.Publish(topic, 1, false, payload)
			}
			for _, tok := range window {
				if tok != nil && !wait(tok) {
					return
				}
			}
		})
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
}
