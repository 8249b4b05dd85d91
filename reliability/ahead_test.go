//go:build linux

package reliability

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/e2e"
)

// TestCrashWhileSendingAhead: while the upstream link is down, ten devices pile up a backlog; at the end of the
// outage four more devices, quiet until then, report for the first time, and keep reporting once the link is up.
// Their events go upstream ahead of the backlog (all of theirs are among its last events). The gateway
// is killed while it sends ahead — events the upstream acknowledged that are not under the sink's cursor yet —
// and started again: no acknowledged event is lost, each device's events arrive in order, the duplicates stay
// within the window per new connection plus the events sent ahead before the kill, and the log drains to empty.
func TestCrashWhileSendingAhead(t *testing.T) {
	t.Parallel()
	start := time.Now()
	const window = 64 // the e2e default
	behindDevs, aheadDevs := e2e.Devices("behind", 10), e2e.Devices("ahead", 4)
	perBehind, perAhead := scale(500, 2000), scale(100, 400)
	u := newUpstream(t, false)
	g := e2e.Start(t, bin(t), e2e.Config{Devices: slices.Concat(behindDevs, aheadDevs), Upstream: u.url(),
		Set: map[string]any{"forward.sinks.0.window": window}})
	behind := e2e.NewFleet(t, g.MQTTURL(), behindDevs)
	ahead := e2e.NewFleet(t, g.MQTTURL(), aheadDevs)

	// The devices' connections are events too (presence): they go up before the outage.
	waitDrained(t, g, 10*time.Second)
	u.link.Down()
	e2e.WaitFor(t, 10*time.Second, "the sink to notice the outage", func() bool { return !sinkConnected(g) })
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	behind.Run(ctx, e2e.Load{PerDevice: perBehind})
	ahead.Run(ctx, e2e.Load{PerDevice: 2}) // their first events (and connections) end the backlog
	if b := backlog(g.MustMetrics()); b < float64(len(behindDevs)*perBehind) {
		t.Fatalf("backlog at the end of the outage = %v, want at least %d", b, len(behindDevs)*perBehind)
	}

	u.link.Up()
	done := make(chan struct{})
	go func() {
		defer close(done)
		ahead.Run(ctx, e2e.Load{PerDevice: perAhead, Interval: 20 * time.Millisecond})
	}()
	var sentAhead float64
	e2e.WaitFor(t, 15*time.Second, "events sent ahead of the backlog", func() bool {
		m, err := g.Metrics()
		if err != nil {
			return false
		}
		if sentAhead = sinkMetric(m, "edgegate_forward_sent_ahead_total"); sentAhead == 0 {
			return false
		}
		if b := backlog(m); b <= window {
			t.Fatalf("the backlog (%v events) drained before the kill: nothing sent ahead is left above the cursor", b)
		}
		return true
	})
	g.Kill9()
	chk, err := g.CheckLog()
	if err != nil {
		t.Fatalf("log after kill -9 while sending ahead: %v", err)
	}
	t.Logf("kill -9 after %v events sent ahead: log intact (%d records), persisted cursor %d", sentAhead, chk.Events,
		chk.Cursors["sink:"+e2e.SinkName])
	g.Restart()
	<-done

	both := &e2e.Fleet{Clients: slices.Concat(behind.Clients, ahead.Clients)}
	o := measure(t, both, u.coll, time.Minute)
	waitDrained(t, g, 30*time.Second)
	if err := g.Stop(); err != nil {
		t.Errorf("graceful stop: %v", err)
	}
	// Each new connection sends again at most a window of events the upstream may have (see TestCrash), and the
	// connection after the kill also the events sent ahead before it: they were not under the cursor.
	connections := strings.Count(g.Output(), "upstream connected")
	limit := window*max(connections-1, 0) + int(sentAhead)
	record(t, "crash while sending ahead", start, o, fmt.Sprintf("%d devices x %d behind, %d x %d ahead, kill -9 after %v sent ahead, "+
		"%d connections", len(behindDevs), perBehind, len(aheadDevs), perAhead+2, sentAhead, connections))
	if o.counts.Duplicates > limit {
		t.Errorf("%d duplicates, want at most %d (window %d x (%d connections - 1) + %v sent ahead)",
			o.counts.Duplicates, limit, window, connections, sentAhead)
	}
}
