//go:build linux

package reliability

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/e2e"
	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// upstream is the cloud side of a scenario: a mosquitto of the test's own, a link in front of it for the
// gateway (down: an outage), optionally a proxy in front of the link (resets and stalls), and the collector,
// which always connects to the broker directly. An outage takes the link down rather than killing the broker:
// a killed mosquitto loses the deliveries to the collector it had acknowledged to the gateway but not yet
// written out, which would count as losses that are not the gateway's.
type upstream struct {
	broker *mosquittotest.Broker
	link   *e2e.Link
	proxy  *mosquittotest.Proxy
	coll   *e2e.Collector
}

func newUpstream(t *testing.T, viaProxy bool) *upstream {
	t.Helper()
	var extra []string
	keep := os.Getenv("RELIABILITY_KEEP_LOGS") // a directory: the broker's and the gateway's logs of failed tests go there
	if keep != "" {
		extra = append(extra, "log_type all")
	}
	u := &upstream{broker: mosquittotest.Start(t, extra...)}
	if keep != "" {
		t.Cleanup(func() {
			if t.Failed() {
				name := filepath.Join(keep, strings.ReplaceAll(t.Name(), "/", "_")+"-mosquitto.log")
				_ = os.WriteFile(name, []byte(u.broker.Log()), 0o600)
			}
		})
	}
	u.link = e2e.NewLink(t, u.broker.Addr())
	if viaProxy {
		u.proxy = mosquittotest.NewProxy(t, strings.TrimPrefix(u.link.URL(), "tcp://"))
	}
	u.coll = e2e.NewCollector(t, u.broker)
	return u
}

// url is the address the gateway's sink dials.
func (u *upstream) url() string {
	if u.proxy != nil {
		return u.proxy.URL()
	}
	return u.link.URL()
}

// sinkMetric reads a per-sink gauge or counter of the cloud sink.
func sinkMetric(m e2e.Metrics, name string) float64 { return m.Get(name, "sink", e2e.SinkName) }

// backlog is the cloud sink's cursor backlog in the log.
func backlog(m e2e.Metrics) float64 {
	return m.Get("edgegate_buffer_backlog_events", "cursor", "sink:"+e2e.SinkName)
}

// waitDrained polls /metrics until the cloud sink has nothing left in the log and nothing in flight.
func waitDrained(t *testing.T, g *e2e.Gateway, timeout time.Duration) e2e.Metrics {
	t.Helper()
	var m e2e.Metrics
	e2e.WaitFor(t, timeout, "the backlog to drain to 0", func() bool {
		var err error
		m, err = g.Metrics()
		return err == nil && backlog(m) == 0 && sinkMetric(m, "edgegate_forward_in_flight") == 0
	})
	return m
}

// outcome is what a scenario measured.
type outcome struct {
	sent, acked    int
	counts         e2e.Counts
	lost           []e2e.Key
	orderErrors    []string
	deliveredNotAk int // events that arrived upstream without their PUBACK having reached the device
}

// measure waits until every acknowledged event arrived upstream (bounded by timeout) and the collector is
// quiet, then counts.
func measure(t *testing.T, f *e2e.Fleet, c *e2e.Collector, timeout time.Duration) outcome {
	t.Helper()
	acked := f.Acked()
	lost := c.WaitFor(acked, timeout)
	c.Settle(300*time.Millisecond, 5*time.Second)
	o := outcome{sent: f.Sent(), acked: len(acked), counts: c.Counts(), lost: lost, orderErrors: c.OrderErrors()}
	o.deliveredNotAk = o.counts.Events - (o.acked - len(lost))
	return o
}

// record adds the scenario's row to the report, logs its figures and checks what every scenario must hold:
// no acknowledged event lost, no device event stored twice, every upstream payload a CloudEvent, each device's
// events in order.
func record(t *testing.T, name string, start time.Time, o outcome, note string) {
	t.Helper()
	row := e2e.Row{Scenario: name, Sent: o.sent, Acked: o.acked, Delivered: o.counts.Messages - o.counts.Other,
		Unique: o.counts.Events, Duplicates: o.counts.Duplicates, Lost: len(o.lost), Elapsed: time.Since(start), Note: note}
	report.Add(row)
	t.Logf("%s: sent %d, acked %d, delivered %d (unique %d, duplicate messages %d, other events %d), "+
		"delivered without PUBACK %d, lost %d, %s; %s", name, row.Sent, row.Acked, row.Delivered, row.Unique,
		row.Duplicates, o.counts.Other, o.deliveredNotAk, row.Lost, row.Elapsed.Round(time.Millisecond), note)
	if len(o.lost) > 0 {
		show := o.lost[:min(len(o.lost), 10)]
		t.Errorf("%s: %d acknowledged events never arrived upstream, e.g. %v", name, len(o.lost), show)
	}
	if o.counts.SeqDuplicates > 0 {
		t.Errorf("%s: %d device publishes arrived under more than one event id (stored twice)", name, o.counts.SeqDuplicates)
	}
	if o.counts.Bad > 0 {
		t.Errorf("%s: %d upstream payloads are not CloudEvents", name, o.counts.Bad)
	}
	if len(o.orderErrors) > 0 {
		t.Errorf("%s: per-device order broken: %v", name, o.orderErrors)
	}
}

// TestSteady: 50 devices publish N QoS 1 events each to a healthy upstream: exactly 50·N unique events arrive,
// none twice, each device's in the order it published them.
func TestSteady(t *testing.T) {
	t.Parallel()
	start := time.Now()
	perDevice := scale(20, 1000)
	devs := e2e.Devices("steady", 50)
	u := newUpstream(t, false)
	g := e2e.Start(t, bin(t), e2e.Config{Devices: devs, Upstream: u.url()})
	f := e2e.NewFleet(t, g.MQTTURL(), devs)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f.Run(ctx, e2e.Load{PerDevice: perDevice})
	o := measure(t, f, u.coll, time.Minute)
	waitDrained(t, g, 30*time.Second)
	record(t, "steady", start, o, fmt.Sprintf("%d devices x %d", len(devs), perDevice))

	want := len(devs) * perDevice
	if o.sent != want || o.acked != want {
		t.Errorf("sent %d, acked %d: want %d each on a healthy gateway", o.sent, o.acked, want)
	}
	if o.counts.Events != want {
		t.Errorf("unique device events upstream = %d, want exactly %d", o.counts.Events, want)
	}
	if o.counts.Duplicates != 0 {
		t.Errorf("%d duplicate messages without any failure", o.counts.Duplicates)
	}
	if err := g.Stop(); err != nil {
		t.Errorf("graceful stop: %v", err)
	}
}

// progressAt returns a Fleet progress callback and a channel per threshold, closed when the fleet's running
// count of publishes reaches it.
func progressAt(thresholds ...int64) (func(int64), []chan struct{}) {
	chans := make([]chan struct{}, len(thresholds))
	for i := range chans {
		chans[i] = make(chan struct{})
	}
	var mu sync.Mutex
	next := 0
	return func(n int64) {
		mu.Lock()
		defer mu.Unlock()
		for next < len(thresholds) && n >= thresholds[next] {
			close(chans[next])
			next++
		}
	}, chans
}

// await waits for ch or fails the test after timeout.
func await(t *testing.T, ch <-chan struct{}, timeout time.Duration, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(timeout):
		t.Fatalf("timed out after %s waiting for %s", timeout, what)
	}
}

// sinkConnected reports whether the gateway's status shows the cloud sink connected (false on any error).
func sinkConnected(g *e2e.Gateway) bool {
	st, err := g.Status()
	if err != nil {
		return false
	}
	s, ok := st.Sink(e2e.SinkName)
	return ok && s.Connected
}

// runFleet starts the fleet's load in the background; the returned channel yields the publish count.
func runFleet(ctx context.Context, f *e2e.Fleet, load e2e.Load) <-chan int64 {
	done := make(chan int64, 1)
	go func() { done <- f.Run(ctx, load) }()
	return done
}

// TestOutage: while devices keep publishing, the TCP link between the gateway and the upstream broker goes
// down (e2e.Link drops the sink's connection and refuses new ones; the broker itself keeps running) and comes
// back up later: every acknowledged event arrives, and the backlog the outage built up drains to 0.
func TestOutage(t *testing.T) {
	t.Parallel()
	start := time.Now()
	devs := e2e.Devices("outage", 20)
	perDevice := scale(60, 600)
	total := int64(len(devs) * perDevice)
	u := newUpstream(t, false)
	g := e2e.Start(t, bin(t), e2e.Config{Devices: devs, Upstream: u.url()})
	f := e2e.NewFleet(t, g.MQTTURL(), devs)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	prog, marks := progressAt(total/4, total*3/4)
	done := runFleet(ctx, f, e2e.Load{PerDevice: perDevice, Interval: 5 * time.Millisecond, Progress: prog})

	await(t, marks[0], time.Minute, "a quarter of the events")
	e2e.WaitFor(t, 10*time.Second, "the sink to connect", func() bool { return sinkConnected(g) })
	u.link.Down()
	e2e.WaitFor(t, 10*time.Second, "the sink to notice the outage", func() bool { return !sinkConnected(g) })
	await(t, marks[1], time.Minute, "three quarters of the events")
	m := g.MustMetrics()
	peak := backlog(m)
	if peak <= 0 {
		t.Errorf("backlog during the outage = %v, want > 0 (the outage did not hold events back)", peak)
	}
	u.link.Up()
	<-done

	o := measure(t, f, u.coll, time.Minute)
	waitDrained(t, g, 30*time.Second)
	record(t, "outage", start, o, fmt.Sprintf("%d devices x %d, upstream down, backlog peak %.0f", len(devs), perDevice, peak))
	if o.acked != int(total) {
		t.Errorf("acked %d of %d: an upstream outage must not cost devices their PUBACKs", o.acked, total)
	}
	if err := g.Stop(); err != nil {
		t.Errorf("graceful stop: %v", err)
	}
}

// TestCrash: the outage of TestOutage plus three kill -9 of the gateway, two during the outage (the second
// hits a process that started with the link down and never reached the upstream) and one while the backlog
// drains: no acknowledged event is lost, the duplicates stay within the window per new connection of the sink
// (a kill -9 included), the persisted cursor is never more than a window behind the acknowledged one, and the
// log passes the integrity check after each crash.
func TestCrash(t *testing.T) {
	t.Parallel()
	crashScenario(t, "crash", nil)
}

// TestCrashBatched is TestCrash with the sink in batch mode (JSON arrays of up to 8 events per message): the
// same promises, whole batches being sent again after a kill -9.
func TestCrashBatched(t *testing.T) {
	t.Parallel()
	o := crashScenario(t, "crash-batched", map[string]any{"forward.sinks.0.mqtt.mode": "batch", "forward.sinks.0.batch_size": 8})
	if o.counts.Batches == 0 || o.counts.Batches >= o.counts.Messages {
		t.Errorf("%d batches for %d events upstream: the backlog did not go in batches", o.counts.Batches, o.counts.Messages)
	}
}

// crashScenario runs TestCrash under name, with set added to the gateway's configuration, and returns what the
// upstream received.
func crashScenario(t *testing.T, name string, set map[string]any) outcome {
	start := time.Now()
	const window = 32
	devs := e2e.Devices(name, 20)
	perDevice := scale(80, 800)
	total := int64(len(devs) * perDevice)
	u := newUpstream(t, false)
	cfg := map[string]any{"forward.sinks.0.window": window}
	maps.Copy(cfg, set)
	g := e2e.Start(t, bin(t), e2e.Config{Devices: devs, Upstream: u.url(), Set: cfg})
	f := e2e.NewFleet(t, g.MQTTURL(), devs)

	// crash kills the gateway, checks the log and starts it again. It measures the cursor lag: how far the
	// sink's acknowledged position (read just before the kill) was ahead of the position persisted in the log.
	// The sink never has more than window events sent past the persisted position (in flight, or acknowledged
	// and not yet persisted), and the log has no gaps here, so each lag is at most window.
	var lag uint64
	crash := func(when string) {
		t.Helper()
		var acked uint64
		if st, err := g.Status(); err == nil {
			if s, ok := st.Sink(e2e.SinkName); ok {
				acked = s.Cursor
			}
		}
		g.Kill9()
		chk, err := g.CheckLog()
		if err != nil {
			t.Fatalf("log after kill -9 %s: %v", when, err)
		}
		persisted := chk.Cursors["sink:"+e2e.SinkName]
		if acked > persisted {
			lag += acked - persisted
			if acked-persisted > window {
				t.Errorf("kill -9 %s: persisted cursor %d is %d behind the acknowledged %d, more than the window %d",
					when, persisted, acked-persisted, acked, window)
			}
		}
		t.Logf("kill -9 %s: log intact (%d records); sink cursor acknowledged %d, persisted %d", when, chk.Events, acked, persisted)
		g.Restart()
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	prog, marks := progressAt(total/5, total*2/5, total*11/20, total*7/10)
	done := runFleet(ctx, f, e2e.Load{PerDevice: perDevice, Interval: 5 * time.Millisecond, Progress: prog})

	await(t, marks[0], time.Minute, "a fifth of the events")
	e2e.WaitFor(t, 10*time.Second, "the sink to connect", func() bool { return sinkConnected(g) })
	u.link.Down()
	e2e.WaitFor(t, 10*time.Second, "the sink to notice the outage", func() bool { return !sinkConnected(g) })
	await(t, marks[1], time.Minute, "40% of the events")
	crash("during the outage (1st)")
	await(t, marks[2], time.Minute, "55% of the events")
	// The link is still down: the restarted gateway has not reached the upstream, and the events of the
	// outage wait in its log.
	if st, err := g.Status(); err != nil {
		t.Errorf("status before the second kill: %v", err)
	} else if s, ok := st.Sink(e2e.SinkName); !ok || s.Connected || s.Healthy {
		t.Errorf("sink before the second kill during the outage = %+v (found %v), want disconnected", s, ok)
	}
	if b := backlog(g.MustMetrics()); b <= 0 {
		t.Errorf("backlog before the second kill during the outage = %v, want > 0", b)
	}
	crash("during the outage (2nd)")
	await(t, marks[3], time.Minute, "70% of the events")
	u.link.Up()
	// Kill again once the sink is draining: events in flight and a cursor that moves.
	e2e.WaitFor(t, 15*time.Second, "the sink to drain", func() bool {
		m, err := g.Metrics()
		return err == nil && sinkMetric(m, "edgegate_forward_acked_total") > 0
	})
	crash("while draining")
	<-done

	o := measure(t, f, u.coll, time.Minute)
	waitDrained(t, g, 30*time.Second)
	if err := g.Stop(); err != nil {
		t.Errorf("graceful stop: %v", err)
	}
	if _, err := g.CheckLog(); err != nil {
		t.Errorf("log after the final stop: %v", err)
	}
	// The bound: duplicates <= window x (connections - 1). The sink sends at most window events past its cursor
	// as persisted in the log, in flight or acknowledged and not yet persisted (forward counts its window
	// against buffer.Log.Persisted). A new connection starts from the acknowledged cursor (a reconnect in the
	// same process) or from the persisted one (the first connection after a kill -9), so it sends again at most
	// window events the upstream may already have; the first connection sends nothing twice. connections counts
	// every connection of the sink over the four processes from their logs: the first process's connection
	// before the outage, the connection made when the link comes back up (by the process started after the
	// second kill), the first connection after the kill while draining, and any reconnect after a stall. The
	// process started between the two kills during the outage never connects, so it adds none.
	connections := strings.Count(g.Output(), "upstream connected")
	limit := window * max(connections-1, 0)
	record(t, name, start, o, fmt.Sprintf("%d devices x %d, upstream down, 3x kill -9 (2 during the outage), window %d, cursor lag %d, "+
		"%d connections", len(devs), perDevice, window, lag, connections))
	if o.counts.Duplicates > limit {
		t.Errorf("%d duplicates, want at most %d (window %d x (%d connections - 1))",
			o.counts.Duplicates, limit, window, connections)
	}
	return o
}
