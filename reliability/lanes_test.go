//go:build linux

package reliability

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/e2e"
)

// The cloud sink's priority lane in TestCrashWithLanes: priority_lanes [5] makes "cloud@p5", cursor
// "sink:cloud@p5", MQTT client id the sink's with "-p5" appended.
const (
	laneName       = e2e.SinkName + "@p5"
	sinkClientID   = "e2e-" + e2e.SinkName
	laneClientID   = sinkClientID + "-p5"
	alarmKind      = "alarm"
	alarmPriority  = 7
	alarmTopicTmpl = "devices/%s/alarms/overheat"
)

// cursorOf is the log cursor of a sink or lane.
func cursorOf(name string) string { return "sink:" + name }

// connectedAs reports whether the gateway's status shows the named sink or lane connected (false on any error).
func connectedAs(g *e2e.Gateway, name string) bool {
	st, err := g.Status()
	if err != nil {
		return false
	}
	s, ok := st.Sink(name)
	return ok && s.Connected
}

// connectionsOf counts the upstream connections the named sink or lane made, from the gateway's log lines
// (text format: msg="upstream connected" component=forward sink=NAME …) over every process.
func connectionsOf(output, name string) int {
	n := 0
	for line := range strings.Lines(output) {
		if !strings.Contains(line, `msg="upstream connected"`) {
			continue
		}
		for f := range strings.FieldsSeq(line) {
			if f == "sink="+name || f == `sink="`+name+`"` {
				n++
				break
			}
		}
	}
	return n
}

// runMixed makes every device publish perDevice telemetry events on its telemetry client (tele.Clients[i])
// and, after every alarmEvery-th of them, an alarm on its alarm client (alarms.Clients[i]), pausing interval
// after each telemetry event. progress gets the running count of publishes of both kinds. The channel is
// closed when every device is done or ctx ends.
func runMixed(ctx context.Context, tele, alarms *e2e.Fleet, perDevice, alarmEvery int, interval time.Duration,
	progress func(int64)) <-chan struct{} {
	const ackTimeout = 5 * time.Second
	var n atomic.Int64
	var wg sync.WaitGroup
	for i, tc := range tele.Clients {
		ac := alarms.Clients[i]
		wg.Go(func() {
			for j := 1; j <= perDevice; j++ {
				if _, _, err := tc.Publish(ctx, ackTimeout); err != nil {
					return
				}
				progress(n.Add(1))
				if j%alarmEvery == 0 {
					if _, _, err := ac.Publish(ctx, ackTimeout); err != nil {
						return
					}
					progress(n.Add(1))
				}
				select {
				case <-ctx.Done():
					return
				case <-time.After(interval):
				}
			}
		})
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	return done
}

// TestCrashWithLanes: TestCrash with a priority lane. The cloud sink has priority_lanes [5] and a mapping gives
// the devices' alarms priority 7, so the alarms go upstream on the lane ("cloud@p5", a connection and cursor of
// its own) and the telemetry on the sink. Devices publish both while the upstream link is down; the gateway is
// killed twice during the outage and once while the sink drains. While the sink drains, the link refuses the
// lane's connections: the sink must not let its cursor pass the alarms the lane has not carried, or the kill
// loses them (a restarted lane starts where its sink is). No acknowledged event of either kind is lost, each
// device's events of each kind arrive in order, the duplicates of each cursor stay within the window per new
// connection of that cursor, the log passes the integrity check after each crash and drains to empty (the
// retention waits for both cursors), and the status lists the sink and its lane.
func TestCrashWithLanes(t *testing.T) {
	t.Parallel()
	start := time.Now()
	const (
		window     = 32
		alarmEvery = 4 // one alarm after every 4th telemetry event of a device
	)
	devs := e2e.Devices("lanes", 20)
	perDevice := scale(80, 800)
	total := int64(len(devs) * (perDevice + perDevice/alarmEvery))
	u := newUpstream(t, false)
	g := e2e.Start(t, bin(t), e2e.Config{Devices: devs, Upstream: u.url(), Set: map[string]any{
		"forward.sinks.0.window":         window,
		"forward.sinks.0.priority_lanes": []any{5},
		"forward.sinks.0.mqtt.client_id": sinkClientID,
		"ingest.mappings": []any{map[string]any{"name": "alarms", "topic": "devices/{device}/alarms/{type}",
			"type": "alarm.{type}", "priority": alarmPriority}},
	}})
	tele := e2e.NewFleet(t, g.MQTTURL(), devs)
	alarms := &e2e.Fleet{}
	for _, d := range devs {
		topic := fmt.Sprintf(alarmTopicTmpl, d.ID)
		alarms.Clients = append(alarms.Clients, e2e.NewKindClient(t, g.MQTTURL(), d, alarmKind, topic))
	}
	both := &e2e.Fleet{Clients: slices.Concat(tele.Clients, alarms.Clients)}
	cursors := []string{cursorOf(e2e.SinkName), cursorOf(laneName)}

	// crash kills the gateway, checks the log (both cursors stored in it) and starts it again.
	crash := func(when string) {
		t.Helper()
		acked := map[string]uint64{}
		if st, err := g.Status(); err == nil {
			for _, name := range []string{e2e.SinkName, laneName} {
				if s, ok := st.Sink(name); ok {
					acked[cursorOf(name)] = s.Cursor
				}
			}
		}
		g.Kill9()
		chk, err := g.CheckLog()
		if err != nil {
			t.Fatalf("log after kill -9 %s: %v", when, err)
		}
		for _, c := range cursors {
			if _, ok := chk.Cursors[c]; !ok {
				t.Errorf("log after kill -9 %s: no cursor %s among %v", when, c, chk.Cursors)
			}
		}
		t.Logf("kill -9 %s: log intact (%d records); cursors acknowledged %v, persisted %v", when, chk.Events, acked,
			chk.Cursors)
		g.Restart()
	}
	// disconnected checks that the status lists the sink and its lane, neither connected.
	disconnected := func(when string) {
		t.Helper()
		st, err := g.Status()
		if err != nil {
			t.Errorf("status %s: %v", when, err)
			return
		}
		for _, name := range []string{e2e.SinkName, laneName} {
			if s, ok := st.Sink(name); !ok || s.Connected || s.Healthy {
				t.Errorf("status %s: %s = %+v (listed %v), want listed and disconnected", when, name, s, ok)
			}
		}
		out, errOut, code, err := g.Tool("status", "--json")
		if err != nil || code != 0 {
			t.Errorf("edgegate status --json %s: exit %d, %v: %s", when, code, err, errOut)
			return
		}
		var cli struct {
			Sinks []struct {
				Name      string `json:"name"`
				Connected bool   `json:"connected"`
			} `json:"sinks"`
		}
		if err := json.Unmarshal([]byte(out), &cli); err != nil {
			t.Errorf("edgegate status --json %s: %v: %s", when, err, out)
			return
		}
		var names []string
		for _, s := range cli.Sinks {
			names = append(names, s.Name)
			if s.Connected {
				t.Errorf("edgegate status --json %s: %s connected during the outage", when, s.Name)
			}
		}
		slices.Sort(names)
		if !slices.Equal(names, []string{e2e.SinkName, laneName}) {
			t.Errorf("edgegate status --json %s lists the sinks %v, want [%s %s]", when, names, e2e.SinkName, laneName)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	prog, marks := progressAt(total/5, total*2/5, total*11/20, total*7/10)
	done := runMixed(ctx, tele, alarms, perDevice, alarmEvery, 5*time.Millisecond, prog)

	await(t, marks[0], time.Minute, "a fifth of the events")
	e2e.WaitFor(t, 10*time.Second, "the sink and its lane to connect", func() bool {
		return connectedAs(g, e2e.SinkName) && connectedAs(g, laneName)
	})
	u.link.Down()
	e2e.WaitFor(t, 10*time.Second, "the sink and its lane to notice the outage", func() bool {
		return !connectedAs(g, e2e.SinkName) && !connectedAs(g, laneName)
	})
	await(t, marks[1], time.Minute, "40% of the events")
	crash("during the outage (1st)")
	disconnected("after the first restart, during the outage")
	await(t, marks[2], time.Minute, "55% of the events")
	m := g.MustMetrics()
	for _, c := range cursors {
		if b := m.Get("edgegate_buffer_backlog_events", "cursor", c); b <= 0 {
			t.Errorf("backlog of %s before the second kill during the outage = %v, want > 0", c, b)
		}
	}
	crash("during the outage (2nd)")
	await(t, marks[3], time.Minute, "70% of the events")

	// The link comes back for the sink only: the lane's connections are refused. The sink drains its own
	// events, up to its window past the first alarm the lane has not carried, and stops there: the kill comes
	// once it has sent at least a window and sent nothing more for a while. A sink whose cursor passed the
	// alarms would instead go on draining (and have stored a cursor past alarms no one carried).
	u.link.Block(laneClientID)
	alarmsBefore := u.coll.CountKind(alarmKind).Events
	u.link.Up()
	lastSent, since := -1.0, time.Now()
	e2e.WaitFor(t, 20*time.Second, "the sink to send a window of its backlog and stop", func() bool {
		m, err := g.Metrics()
		if err != nil {
			return false
		}
		sent := sinkMetric(m, "edgegate_forward_sent_total")
		if sent != lastSent || sinkMetric(m, "edgegate_forward_in_flight") != 0 {
			lastSent, since = sent, time.Now()
			return false
		}
		return lastSent >= window && time.Since(since) >= 200*time.Millisecond
	})
	if connectedAs(g, laneName) {
		t.Fatalf("the lane is connected although the link refuses its client id %s", laneClientID)
	}
	crash("while the sink drains and its lane is refused")
	if n := u.coll.CountKind(alarmKind).Events; n != alarmsBefore {
		t.Errorf("%d alarms arrived while the lane could not connect: the sink carried its lane's events", n-alarmsBefore)
	}
	u.link.Unblock(laneClientID)
	<-done

	o := measure(t, both, u.coll, time.Minute)
	e2e.WaitFor(t, 30*time.Second, "the log to drain to 0 events", func() bool {
		m, err := g.Metrics()
		if err != nil || m.Get("edgegate_buffer_events") != 0 {
			return false
		}
		for _, name := range []string{e2e.SinkName, laneName} {
			if m.Get("edgegate_buffer_backlog_events", "cursor", cursorOf(name)) != 0 ||
				m.Get("edgegate_forward_in_flight", "sink", name) != 0 {
				return false
			}
		}
		return true
	})
	if err := g.Stop(); err != nil {
		t.Errorf("graceful stop: %v", err)
	}
	if _, err := g.CheckLog(); err != nil {
		t.Errorf("log after the final stop: %v", err)
	}

	// The bound of TestCrash, per cursor: a cursor's first connection sends nothing twice and each further
	// one (a reconnect, or the first connection after a kill -9) at most window events. The sink carries the
	// telemetry and the presence events, the lane the alarms, each with its own window and connections.
	out := g.Output()
	sinkConns, laneConns := connectionsOf(out, e2e.SinkName), connectionsOf(out, laneName)
	tk, ak := u.coll.CountKind(""), u.coll.CountKind(alarmKind)
	sinkDups, laneDups := o.counts.Duplicates-ak.Duplicates, ak.Duplicates
	record(t, "crash with lanes", start, o, fmt.Sprintf("%d devices x (%d + %d alarms), upstream down, 3x kill -9 "+
		"(2 during the outage, 1 with the lane refused), window %d, sink: %d connections, %d duplicates; "+
		"lane: %d connections, %d duplicates", len(devs), perDevice, perDevice/alarmEvery, window, sinkConns,
		sinkDups, laneConns, laneDups))
	if sinkConns < 2 || laneConns < 2 {
		t.Errorf("connections counted from the log: sink %d, lane %d; want at least 2 each (before the outage, after it)",
			sinkConns, laneConns)
	}
	if limit := window * max(sinkConns-1, 0); sinkDups > limit {
		t.Errorf("sink %s: %d duplicates, want at most %d (window %d x (%d connections - 1))", e2e.SinkName,
			sinkDups, limit, window, sinkConns)
	}
	if limit := window * max(laneConns-1, 0); laneDups > limit {
		t.Errorf("lane %s: %d duplicates, want at most %d (window %d x (%d connections - 1))", laneName,
			laneDups, limit, window, laneConns)
	}

	// Every acknowledged event of both kinds arrived (record checks the loss) under one id each, and no more
	// events arrived without a PUBACK than publishes got none.
	ackedBy := map[string]int{}
	for _, k := range both.Acked() {
		ackedBy[k.Kind]++
	}
	for kind, kc := range map[string]e2e.KindCounts{"": tk, alarmKind: ak} {
		if kc.IDs != kc.Events || kc.SeqDuplicates != 0 {
			t.Errorf("kind %q: %d events arrived under %d ids (%d under more than one)", kind, kc.Events, kc.IDs,
				kc.SeqDuplicates)
		}
		if kc.Events < ackedBy[kind] {
			t.Errorf("kind %q: %d unique events arrived, fewer than the %d acknowledged", kind, kc.Events, ackedBy[kind])
		}
	}
	if ackedBy[alarmKind] == 0 || ackedBy[""] == 0 {
		t.Errorf("acknowledged: %d telemetry events, %d alarms; want both kinds", ackedBy[""], ackedBy[alarmKind])
	}
	if o.deliveredNotAk > o.sent-o.acked {
		t.Errorf("%d events arrived without their PUBACK, more than the %d publishes that got none", o.deliveredNotAk,
			o.sent-o.acked)
	}
}
