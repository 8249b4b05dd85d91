//go:build linux

package reliability

import (
	"context"
	"flag"
	"fmt"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/e2e"
)

var soakFor = flag.Duration("reliability.soak.duration", 30*time.Minute, "how long -reliability.soak runs")

// soakSample is one measurement of the gateway process.
type soakSample struct {
	at         time.Duration
	rss        int64
	goroutines float64
	fds        int
	backlog    float64
}

// TestSoak (only with -reliability.soak): 50 devices publish about 1000 events/s for -reliability.soak.duration
// (30 minutes) while the upstream flaps (its connection reset every 10 s, the upstream unreachable for 5 s every
// minute). The gateway's RSS, goroutines and open file descriptors are sampled every 10 s and must stay flat;
// no acknowledged event may be lost.
func TestSoak(t *testing.T) {
	if !*soakRun {
		t.Skip("the soak runs only with -reliability.soak (30 minutes; -reliability.soak.duration to change)")
	}
	start := time.Now()
	devs := e2e.Devices("soak", 50)
	u := newUpstream(t, true)
	g := e2e.Start(t, bin(t), e2e.Config{Devices: devs, Upstream: u.url()})
	f := e2e.NewFleet(t, g.MQTTURL(), devs)

	ctx, cancel := context.WithTimeout(context.Background(), *soakFor)
	defer cancel()
	// 50 devices, each publishing every ~50 ms (20/s after a PUBACK of a few ms): about 1000 events/s.
	done := runFleet(ctx, f, e2e.Load{PerDevice: int(soakFor.Seconds()*25) + 1, Interval: 40 * time.Millisecond})

	var samples []soakSample
	sample := func() {
		pid := g.PID()
		rss, err1 := e2e.RSS(pid)
		fds, err2 := e2e.OpenFDs(pid)
		m, err3 := g.Metrics()
		if err1 != nil || err2 != nil || err3 != nil {
			t.Logf("sample: %v %v %v", err1, err2, err3)
			return
		}
		s := soakSample{at: time.Since(start), rss: rss, goroutines: m.Get("go_goroutines"), fds: fds, backlog: backlog(m)}
		samples = append(samples, s)
		t.Logf("soak %6s: rss %6.1f MiB, goroutines %4.0f, fds %3d, backlog %6.0f, acked %d", s.at.Round(time.Second),
			float64(s.rss)/(1<<20), s.goroutines, s.fds, s.backlog, len(f.Acked()))
	}
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	n := 0
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-tick.C:
			n++
			switch {
			case n%6 == 0: // every minute: the upstream is unreachable for 5 s
				u.link.Down()
				select {
				case <-ctx.Done():
				case <-time.After(5 * time.Second):
				}
				u.link.Up()
			default:
				u.proxy.ResetAll()
			}
			sample()
		}
	}
	<-done
	u.link.Up()
	o := measure(t, f, u.coll, 2*time.Minute)
	waitDrained(t, g, 2*time.Minute)
	sample()
	rate := float64(o.sent) / soakFor.Seconds()
	record(t, "soak", start, o, fmt.Sprintf("%s at %.0f events/s, upstream flapping", *soakFor, rate))
	if len(samples) < 6 {
		t.Fatalf("only %d samples", len(samples))
	}
	// Flat: the last third against the first third after a warm-up sample.
	third := len(samples) / 3
	early, late := samples[1:1+third], samples[len(samples)-third:]
	maxOf := func(ss []soakSample, f func(soakSample) float64) float64 {
		m := 0.0
		for _, s := range ss {
			m = max(m, f(s))
		}
		return m
	}
	rss := func(s soakSample) float64 { return float64(s.rss) }
	gor := func(s soakSample) float64 { return s.goroutines }
	fds := func(s soakSample) float64 { return float64(s.fds) }
	if e, l := maxOf(early, rss), maxOf(late, rss); l > 1.5*e+32<<20 {
		t.Errorf("RSS grew from %.1f MiB to %.1f MiB", e/(1<<20), l/(1<<20))
	}
	if e, l := maxOf(early, gor), maxOf(late, gor); l > e+50 {
		t.Errorf("goroutines grew from %.0f to %.0f", e, l)
	}
	if e, l := maxOf(early, fds), maxOf(late, fds); l > e+20 {
		t.Errorf("open fds grew from %.0f to %.0f", e, l)
	}
	if rate < 800 {
		t.Errorf("%.0f events/s, want about 1000", rate)
	}
	if err := g.Stop(); err != nil {
		t.Errorf("graceful stop: %v", err)
	}
}
