//go:build unix

package bridgebench

import (
	"context"
	"flag"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

var (
	flagDevices  = flag.Int("devices", 10, "bench devices publishing at once")
	flagMessages = flag.Int("messages", 10000, "messages per device in BenchmarkOnline")
	flagInflight = flag.Int("inflight", 0, "the most unacknowledged publishes of one bench device (0: the default, 100)")
	flagPayload  = flag.Int("payload", 0, "the bytes of each device message, JSON (0: the default, 100)")
	flagDrain    = flag.Int("drain", 100000, "backlog of BenchmarkDrain (e.g. 1000000)")
	flagLive     = flag.Float64("live-rate", 200, "live messages per second during BenchmarkDrain")
	flagDefaults = flag.Bool("bridge-defaults", true, "BenchmarkDrain also runs the bridge at mosquitto's default queue limit, once")
	flagDurable  = flag.String("durability", "fsync", "the gateway log's buffer.durability: fsync or interval")
	flagWindow   = flag.Int("window", 0, "the gateway sink's window (0: the forward default)")
	flagProcs    = flag.Int("gateway-procs", 0, "run the gateway with GOMAXPROCS set to this (0: Go's default)")
	flagLivePrio = flag.Int("live-priority", 0, "BenchmarkDrain: the live device's priority, with a priority lane for it at the gateway (0: none)")
	flagBatch    = flag.Bool("batch", false, "the gateway's MQTT sink in batch mode (JSON arrays of up to 128 events per message)")
	flagProgress = flag.Bool("progress", false, "log each run's progress (the benchmark log keeps only its first lines)")
	flagEdgegate = flag.String("edgegate", "", "a built edgegate binary to measure (default: build cmd/edgegate)")
	flagKeep     = flag.Bool("keep", false, "keep each run's directory (configurations, logs, data)")
)

func needMosquitto(tb testing.TB) {
	tb.Helper()
	if FindMosquitto() == "" {
		tb.Skip(ErrNoMosquitto.Error())
	}
}

func buildGateway(tb testing.TB) string {
	tb.Helper()
	if *flagEdgegate != "" {
		return *flagEdgegate
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := BuildGateway(ctx, tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	return bin
}

func TestPayloadFields(t *testing.T) {
	at := time.UnixMicro(1764760000123456)
	p := payload(7, 12345, at, 100)
	if len(p) != 100 {
		t.Fatalf("payload is %d bytes, want 100: %s", len(p), p)
	}
	// As the subscriber sees it from the bridge (as published) and from the gateway (inside a CloudEvent,
	// possibly re-encoded with spaces).
	ce := `{"specversion":"1.0","id":"0190abc-1","source":"/gateways/bench","type":"telemetry","data":` +
		strings.ReplaceAll(string(p), ":", ": ") + `}`
	for _, b := range [][]byte{p, []byte(ce)} {
		d, ok1 := intField(b, "bd")
		s, ok2 := intField(b, "bs")
		ts, ok3 := intField(b, "bt")
		if !ok1 || !ok2 || !ok3 || d != 7 || s != 12345 || ts != at.UnixMicro() {
			t.Errorf("fields of %s = %d %d %d (%v %v %v)", b, d, s, ts, ok1, ok2, ok3)
		}
	}
	if id, ok := stringField([]byte(ce), "id"); !ok || string(id) != "0190abc-1" {
		t.Errorf("id = %q, %v", id, ok)
	}
	if _, ok := intField([]byte(`{"bd":"x"}`), "bd"); ok {
		t.Error("a string parsed as an integer")
	}
	if got := payload(probeDevice, 1, at, 64); !strings.HasPrefix(string(got), `{"bd":-1,`) {
		t.Errorf("probe payload %s", got)
	}
}

func TestPercentile(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 100; i++ {
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	if p := percentile(d, 99); p != 99*time.Millisecond {
		t.Errorf("p99 = %s", p)
	}
	if p := percentile(d, 50); p != 50*time.Millisecond {
		t.Errorf("p50 = %s", p)
	}
	if p := percentile(nil, 99); p != 0 {
		t.Errorf("p99 of nothing = %s", p)
	}
}

// TestSmoke runs both scenarios on both systems with a small load and checks that the gateway delivers every
// acknowledged message and that the counting sees what was sent.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts brokers and builds the gateway; skipped with -short")
	}
	needMosquitto(t)
	bin := buildGateway(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	base := Options{
		Devices: 3, Messages: 200, Backlog: 1500, LiveRate: 100, LiveTail: 300 * time.Millisecond,
		Inflight: 20, StallTimeout: 5 * time.Second, Timeout: time.Minute, GatewayBinary: bin, KeepDir: *flagKeep, Logf: t.Logf,
	}
	for _, v := range []struct {
		name  string
		sys   System
		batch bool
	}{{"gateway", Gateway, false}, {"gateway-batch", Gateway, true}, {"bridge", MosquittoBridge, false}} {
		o := base
		o.System, o.Batch = v.sys, v.batch
		sys := v.sys
		t.Run("online/"+v.name, func(t *testing.T) {
			r, err := RunOnline(ctx, o)
			t.Log(r)
			if err != nil {
				t.Fatal(err)
			}
			want := o.Devices * o.Messages
			if r.Sent != want || r.Acked != want {
				t.Errorf("sent %d acked %d, want %d", r.Sent, r.Acked, want)
			}
			checkCommon(t, r)
		})
		t.Run("drain/"+v.name, func(t *testing.T) {
			r, err := RunDrain(ctx, o)
			t.Log(r)
			if err != nil {
				t.Fatal(err)
			}
			if r.Sent != o.Backlog || r.Acked != o.Backlog {
				t.Errorf("sent %d acked %d, want %d", r.Sent, r.Acked, o.Backlog)
			}
			if r.LiveSent == 0 || r.LatencySamples+r.LiveLost == 0 {
				t.Errorf("no live traffic measured: %+v", r)
			}
			if sys == Gateway && r.LiveLost != 0 {
				t.Errorf("gateway lost %d live messages", r.LiveLost)
			}
			checkCommon(t, r)
		})
	}
}

func checkCommon(t *testing.T, r Result) {
	t.Helper()
	if r.Malformed != 0 {
		t.Errorf("%d malformed arrivals", r.Malformed)
	}
	if r.Unique > r.Acked || r.Duplicates < 0 {
		t.Errorf("counts do not add up: %+v", r)
	}
	if r.System == Gateway && (r.Lost != 0 || r.Unique != r.Acked) {
		t.Errorf("gateway delivered %d of %d acknowledged messages (%d lost)", r.Unique, r.Acked, r.Lost)
	}
	if r.Rate <= 0 || r.Duration <= 0 {
		t.Errorf("no rate measured: %+v", r)
	}
	if r.PeakRSS <= 0 {
		t.Errorf("no RSS measured for the system under test: %+v", r)
	}
}

func benchOptions(b *testing.B, bin string) Options {
	logf := func(string, ...any) {}
	if *flagProgress {
		logf = b.Logf
	}
	return Options{Devices: *flagDevices, Messages: *flagMessages, Backlog: *flagDrain, LiveRate: *flagLive,
		GatewayBinary: bin, KeepDir: *flagKeep, Logf: logf, Durability: *flagDurable, Window: *flagWindow, GatewayProcs: *flagProcs,
		LivePriority: *flagLivePrio, Batch: *flagBatch, Inflight: *flagInflight,
		PayloadBytes: *flagPayload}
}

// compare runs run for the gateway and the bridge alternately, b.N rounds, and reports each system's median
// figures and the ratio gateway/bridge of the median rates.
func compare(b *testing.B, run func(context.Context, Options) (Result, error)) map[System][]Result {
	needMosquitto(b)
	bin := buildGateway(b)
	b.ResetTimer()
	res := map[System][]Result{}
	for range b.N {
		for _, sys := range []System{Gateway, MosquittoBridge} {
			o := benchOptions(b, bin)
			o.System = sys
			r, err := run(context.Background(), o)
			b.Log(r)
			if err != nil {
				b.Fatal(err)
			}
			res[sys] = append(res[sys], r)
		}
	}
	b.StopTimer()
	gw, br := median(res[Gateway], rateOf), median(res[MosquittoBridge], rateOf)
	b.ReportMetric(gw, "gateway-msg/s")
	b.ReportMetric(br, "bridge-msg/s")
	if br > 0 {
		b.ReportMetric(gw/br, "ratio")
	}
	for _, sys := range []System{Gateway, MosquittoBridge} {
		b.ReportMetric(median(res[sys], func(r Result) float64 { return float64(r.Lost) }), sys.String()+"-lost")
		b.ReportMetric(median(res[sys], func(r Result) float64 { return float64(r.LatencyP99) / 1e6 }), sys.String()+"-p99-ms")
		b.ReportMetric(median(res[sys], func(r Result) float64 { return r.CPUPercent }), sys.String()+"-cpu-%")
		b.ReportMetric(median(res[sys], func(r Result) float64 { return float64(r.PeakRSS) / (1 << 20) }), sys.String()+"-peak-MiB")
	}
	return res
}

func rateOf(r Result) float64 { return r.Rate }

func median(rs []Result, f func(Result) float64) float64 {
	if len(rs) == 0 {
		return 0
	}
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	slices.Sort(v)
	return v[len(v)/2]
}

// BenchmarkOnline compares forwarding with everything up. One round (gateway, then bridge) per b.N:
//
//	go test -run '^$' -bench Online -benchtime 3x ./internal/bridgebench/
func BenchmarkOnline(b *testing.B) {
	compare(b, RunOnline)
}

// BenchmarkDrain compares draining a backlog after a cloud outage, with live traffic. One round per b.N, then
// (with -bridge-defaults) one run of the bridge at mosquitto's default queue limit:
//
//	go test -run '^$' -bench Drain -benchtime 3x ./internal/bridgebench/ [-drain 1000000]
func BenchmarkDrain(b *testing.B) {
	res := compare(b, RunDrain)
	gw, br := res[Gateway], res[MosquittoBridge]
	b.ReportMetric(median(gw, func(r Result) float64 { return float64(r.Unique) }), "gateway-delivered")
	b.ReportMetric(median(br, func(r Result) float64 { return float64(r.Unique) }), "bridge-delivered")
	b.ReportMetric(median(gw, func(r Result) float64 { return float64(r.AfterP99) / 1e6 }), "gateway-after-p99-ms")
	b.ReportMetric(median(br, func(r Result) float64 { return float64(r.AfterP99) / 1e6 }), "bridge-after-p99-ms")
	if *flagDefaults {
		o := benchOptions(b, "")
		o.System = MosquittoBridgeDefaults
		o.StallTimeout = 5 * time.Second
		r, err := RunDrain(context.Background(), o)
		b.Log(r)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(r.Unique), "bridge-defaults-delivered")
		b.ReportMetric(float64(r.Lost), "bridge-defaults-lost")
	}
}

// Example of the one-line result, for the harness's output.
var _ = fmt.Stringer(Result{})
