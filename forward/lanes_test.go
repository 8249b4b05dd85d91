package forward

import (
	"fmt"
	"slices"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// addPrio appends an event of the given priority; each subject numbers its events from 1.
func (l *memLog) addPrio(typ, subject string, n int, prio uint8) uint64 {
	seq := l.add(typ, subject, n)
	l.mu.Lock()
	l.recs[len(l.recs)-1].Priority = prio
	l.mu.Unlock()
	return seq
}

// ReadPriority makes memLog a PriorityReader, as the gateway's log is.
func (l *memLog) ReadPriority(after uint64, max int, lo, hi uint8) ([]Record, uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Record
	scanned := after
	for _, r := range l.recs {
		if r.Seq <= after {
			continue
		}
		if r.Priority >= lo && r.Priority < hi {
			out = append(out, r)
		}
		scanned = r.Seq
		if len(out) == max {
			break
		}
	}
	return out, scanned, nil
}

// plainSource hides the PriorityReader of a Source: lanes then read every record and pass over the others.
type plainSource struct{ Source }

// mixedLog fills a log with total events: subject "temp" (priority 0) and, every alarmEvery-th event, subject
// "alarm" (priority 7). It returns the Seq of the first alarm.
func mixedLog(t *testing.T, total, alarmEvery int) (*memLog, uint64) {
	log := newMemLog(t)
	var first uint64
	temps, alarms := 0, 0
	for i := 1; i <= total; i++ {
		if i%alarmEvery == 0 {
			alarms++
			seq := log.addPrio("alarm.raised", "alarm", alarms, 7)
			if first == 0 {
				first = seq
			}
		} else {
			temps++
			log.addPrio("temp.reported", "temp", temps, 0)
		}
	}
	return log, first
}

// laneSink is the HTTP sink "up" towards url, window 16, with the given priority lanes.
func laneSink(url string, lanes ...int) SinkConfig {
	s := fastSink("up", TypeHTTP)
	s.HTTP = &HTTPConfig{URL: url}
	s.Window = 16
	s.PriorityLanes = lanes
	return s
}

// TestPriorityLanesHoldTheCursor: the sink's cursor does not pass an event of a lane before the lane has
// carried it, while the sink goes on sending its own events up to its window; removing the lane later loses
// nothing.
func TestPriorityLanesHoldTheCursor(t *testing.T) {
	log, firstAlarm := mixedLog(t, 400, 10)
	up := newEventUpstream(t, "alarm")
	up.down.Store(true)
	r := startForwarder(t, Config{Sinks: []SinkConfig{laneSink(up.srv.URL, 5)}}, plainSource{log}, nil)

	if got := r.f.CursorNames(); !slices.Equal(got, []string{"sink:up", "sink:up@p5"}) {
		t.Fatalf("CursorNames = %v", got)
	}
	// The sink sends the temps before the first alarm, then a window more, and stops: its cursor waits at
	// the alarm the lane cannot deliver.
	wantTemps := int(firstAlarm-1) + 16
	waitFor(t, 10*time.Second, "the sink's window sent past the held alarm", func() bool {
		return countSubject(up.accepted(), "temp") >= wantTemps
	})
	waitFor(t, 10*time.Second, "the lane failing on the alarm", func() bool {
		h := sinkHealth(r, "up@p5")
		return h.LastError != "" && !h.Healthy
	})
	if c := log.Cursor("sink:up"); c != firstAlarm-1 {
		t.Errorf("sink cursor = %d, want %d (just before the alarm its lane has not carried)", c, firstAlarm-1)
	}
	if c := log.Cursor("sink:up@p5"); c >= firstAlarm {
		t.Errorf("lane cursor = %d, past the alarm at %d it could not deliver", c, firstAlarm)
	}
	if h := sinkHealth(r, "up"); !h.Healthy {
		t.Errorf("the sink itself is unhealthy: %+v", h)
	}

	// Stop, drop the lane and start again with the alarms accepted: every event arrives, none is lost.
	r.stop()
	up.down.Store(false)
	r2 := startForwarder(t, Config{Sinks: []SinkConfig{laneSink(up.srv.URL)}}, log, nil)
	waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:up") == 400 })
	got := up.accepted()
	checkLaneDelivery(t, got, 400)
	if n := len(r2.f.CursorNames()); n != 1 {
		t.Errorf("without lanes: %d cursors", n)
	}
}

// TestPriorityLanesHoldBounded: a lane that cannot deliver holds up its sink after a few windows of the lane's
// events, instead of the sink reading the whole backlog of the lane's priorities into memory; once the lane
// delivers, everything arrives.
func TestPriorityLanesHoldBounded(t *testing.T) {
	log := newMemLog(t)
	const alarms = 3000
	for i := 1; i <= alarms; i++ {
		log.addPrio("alarm.raised", "alarm", i, 7)
	}
	log.addPrio("temp.reported", "temp", 1, 0)
	up := newEventUpstream(t, "alarm")
	up.down.Store(true)
	r := startForwarder(t, Config{Sinks: []SinkConfig{laneSink(up.srv.URL, 5)}}, plainSource{log}, nil)
	// Three failed attempts of the lane, with its backoff between them, give the sink ample time to read the
	// in-memory log to its end, were it not bounded.
	waitFor(t, 10*time.Second, "the lane failing three times", func() bool {
		return testutil.ToFloat64(r.f.metrics.reconnects.WithLabelValues("up@p5")) >= 3
	})
	// Reading goes a read ahead of the held events at most (the sink holds 4 windows of 16).
	log.mu.Lock()
	read := log.maxRead
	log.mu.Unlock()
	if read > 1000 {
		t.Fatalf("the sink read up to seq %d of a lane's events it holds, want a bound of a few windows", read)
	}
	up.down.Store(false)
	waitFor(t, 30*time.Second, "every event delivered", func() bool { return log.Cursor("sink:up") == alarms+1 })
	checkLaneDelivery(t, up.accepted(), alarms+1)
	r.stop()
}

// TestPriorityLanesDrainFirst: after an outage, a backlog of low-priority events does not hold back the
// higher-priority ones: with the rate capped, every alarm arrives before half of the backlog has.
func TestPriorityLanesDrainFirst(t *testing.T) {
	const total = 1500
	log, _ := mixedLog(t, total, 50) // 30 alarms, the last one at the very end
	up := newEventUpstream(t, "alarm")
	sc := laneSink(up.srv.URL, 5, 9)
	sc.RateLimit = 1500 // the lanes share it: about a second for the whole backlog
	startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)

	waitFor(t, 20*time.Second, "the cursors at the end", func() bool {
		return log.Cursor("sink:up") == total && log.Cursor("sink:up@p5") == total && log.Cursor("sink:up@p9") == total
	})
	got := up.accepted()
	checkLaneDelivery(t, got, total)
	lastAlarm, temps := -1, 0
	tempsBefore := 0
	for i, a := range got {
		switch a.subject {
		case "temp":
			temps++
		case "alarm":
			lastAlarm, tempsBefore = i, temps
		}
	}
	if lastAlarm < 0 || tempsBefore > (total-total/50)/2 {
		t.Errorf("the last alarm arrived after %d of %d temps: the lane did not go first", tempsBefore, total-total/50)
	}
	t.Logf("the last alarm arrived after %d of %d temps", tempsBefore, temps)
}

// countSubject counts the arrivals of subject.
func countSubject(got []received, subject string) int {
	n := 0
	for _, a := range got {
		if a.subject == subject {
			n++
		}
	}
	return n
}

// checkLaneDelivery checks that every event of the log (ids ev-000001 on) arrived and that each subject's
// events arrived in order the first time.
func checkLaneDelivery(t *testing.T, got []received, want int) {
	t.Helper()
	seen := map[string]bool{}
	last := map[string]int{}
	for _, a := range got {
		if seen[a.id] {
			continue
		}
		seen[a.id] = true
		if a.n <= last[a.subject] {
			t.Errorf("subject %s: n=%d arrived after n=%d", a.subject, a.n, last[a.subject])
		}
		last[a.subject] = a.n
	}
	for i := 1; i <= want; i++ {
		if id := fmt.Sprintf("ev-%06d", i); !seen[id] {
			t.Errorf("%s never arrived", id)
		}
	}
}

// TestPriorityLanesMQTT: against a real broker, a sink and its lane connect with client ids of their own (the
// broker would drop one of two connections sharing an id), every event arrives once per lane order, and a
// cloud-to-device command is delivered once: only the sink itself subscribes to commands.
func TestPriorityLanesMQTT(t *testing.T) {
	b := mosquittotest.Start(t)
	col := collect(t, b.URL(), "edgegate/gw1/events/#")
	log, _ := mixedLog(t, 300, 7)
	cmds := &commands{known: map[string]bool{"lamp": true}}
	sc := mqttSink("up", b.URL())
	sc.PriorityLanes = []int{5}
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, cmds)

	waitFor(t, 10*time.Second, "every event upstream", func() bool { return col.unique() == 300 })
	waitFor(t, 10*time.Second, "both cursors at the end", func() bool {
		return log.Cursor("sink:up") == 300 && log.Cursor("sink:up@p5") == 300
	})
	checkLaneDelivery(t, col.all(), 300)
	for _, name := range []string{"up", "up@p5"} {
		if h := sinkHealth(r, name); !h.Healthy || h.Cursor != 300 {
			t.Errorf("%s: %+v", name, h)
		}
	}
	if n := testutil.ToFloat64(r.f.metrics.reconnects.WithLabelValues("up")) +
		testutil.ToFloat64(r.f.metrics.reconnects.WithLabelValues("up@p5")); n != 0 {
		t.Errorf("%v reconnects: the two connections pushed each other out", n)
	}

	pub := paho.NewClient(paho.NewClientOptions().AddBroker(b.URL()).SetClientID("cloud"))
	if tok := pub.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud connect: %v", tok.Error())
	}
	defer pub.Disconnect(0)
	for _, c := range []string{"lights.on", "lights.off"} {
		if tok := pub.Publish("edgegate/gw1/commands/lamp/"+c, 1, false, `{}`); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("publish: %v", tok.Error())
		}
	}
	waitFor(t, 10*time.Second, "the commands", func() bool { return len(cmds.all()) >= 2 })
	// A second subscriber would have delivered each command again by the time a third one round-trips.
	if tok := pub.Publish("edgegate/gw1/commands/lamp/probe", 1, false, `{}`); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("publish: %v", tok.Error())
	}
	waitFor(t, 10*time.Second, "the probe command", func() bool {
		return slices.ContainsFunc(cmds.all(), func(c command) bool { return c.command == "probe" })
	})
	if n := len(cmds.all()); n != 3 {
		t.Errorf("%d commands delivered, want 3: %+v", n, cmds.all())
	}
}

// TestConfigCursorNames: the cursor names a configuration gives (for tools that read the log without running
// the sinks) are those of the sinks once built, lanes included.
func TestConfigCursorNames(t *testing.T) {
	a := laneSink("http://127.0.0.1:1", 5, 9)
	b := laneSink("http://127.0.0.1:1")
	b.Name = "archive"
	cfg := Config{Sinks: []SinkConfig{a, b}}
	f, err := New(cfg, "gw1", newMemLog(t), nil, &deadLetters{}, testLogger(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"sink:up", "sink:up@p9", "sink:up@p5", "sink:archive"}
	if got := cfg.CursorNames(); !slices.Equal(got, want) || !slices.Equal(f.CursorNames(), want) {
		t.Errorf("Config.CursorNames %v, Forwarder.CursorNames %v, want %v", got, f.CursorNames(), want)
	}
}
