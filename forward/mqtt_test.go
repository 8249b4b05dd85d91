package forward

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// TestMQTTDeliversInOrder: every event arrives once per connection, in order, on the templated topic; the
// cursor follows; events outside the types filter are passed over.
func TestMQTTDeliversInOrder(t *testing.T) {
	tests := []struct {
		name   string
		window int
		types  []string
		want   func(typ string) bool
	}{
		{name: "window 1", window: 1},
		{name: "window 64", window: 64},
		{name: "types filter", window: 8, types: []string{"sensor.*", "door.opened"},
			want: func(typ string) bool { return strings.HasPrefix(typ, "sensor.") || typ == "door.opened" }},
	}
	types := []string{"sensor.reading", "door.opened", "door.closed", "sensor.battery.low", "noise"}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := mosquittotest.Start(t)
			col := collect(t, b.URL(), "edgegate/gw1/events/#")
			log := newMemLog(t)
			const n = 300
			want := 0
			for i := range n {
				typ := types[i%len(types)]
				log.add(typ, []string{"hall", "kitchen"}[i%2], i+1)
				if tc.want == nil || tc.want(typ) {
					want++
				}
			}
			sc := mqttSink("up", b.URL())
			sc.Window, sc.Types = tc.window, tc.types
			r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)

			waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:up") == n })
			waitFor(t, 10*time.Second, "every event upstream", func() bool { return col.unique() == want })
			got := col.all()
			if dups := checkDelivery(t, got, want); dups != 0 {
				t.Errorf("%d duplicates without any reconnect", dups)
			}
			for _, g := range got {
				if !strings.HasPrefix(g.topic, "edgegate/gw1/events/"+g.subject+"/") {
					t.Errorf("topic %s for subject %s", g.topic, g.subject)
				}
			}
			h := sinkHealth(r, "up")
			if !h.Healthy || !h.Connected || h.Stalled || h.Cursor != n || h.InFlight != 0 || h.LastAck.IsZero() {
				t.Errorf("health = %+v", h)
			}
			if h.Target != b.URL() || h.Type != TypeMQTT {
				t.Errorf("health target/type = %s/%s", h.Target, h.Type)
			}
			err := testutil.GatherAndCompare(r.reg, strings.NewReader(joinLines(
				"# HELP edgegate_forward_acked_total Events acknowledged by the upstream (counted once: when the sink's cursor passes them, or for an event sent ahead of a backlog, when it is acknowledged).",
				"# TYPE edgegate_forward_acked_total counter",
				`edgegate_forward_acked_total{sink="up"} `+strconv.Itoa(want),
				"# HELP edgegate_forward_sent_total Events handed to the upstream connection, resends included.",
				"# TYPE edgegate_forward_sent_total counter",
				`edgegate_forward_sent_total{sink="up"} `+strconv.Itoa(want),
				"# HELP edgegate_forward_connected 1 when the sink's upstream connection is up, else 0.",
				"# TYPE edgegate_forward_connected gauge",
				`edgegate_forward_connected{sink="up"} 1`,
				"# HELP edgegate_forward_in_flight Events sent and not yet acknowledged.",
				"# TYPE edgegate_forward_in_flight gauge",
				`edgegate_forward_in_flight{sink="up"} 0`,
			)), "edgegate_forward_acked_total", "edgegate_forward_sent_total", "edgegate_forward_connected",
				"edgegate_forward_in_flight")
			if err != nil {
				t.Error(err)
			}
			if v := testutil.ToFloat64(r.f.metrics.resent.WithLabelValues("up")); v != 0 {
				t.Errorf("resent_total = %v, want 0", v)
			}
		})
	}
}

// TestMQTTOutage: the broker is killed (SIGKILL) while events keep coming and restarted; every event arrives,
// per subject in order, with at most a window of duplicates per reconnect.
//
// mosquitto acknowledges a PUBLISH before it has written it to the subscribers, so a SIGKILL between the two
// loses a message inside the broker that no publisher can save. To test the sink and not that, the sink talks
// through a proxy whose return path is blackholed just before the kill: acknowledgements stop, and the kill
// happens once the subscriber has every event the sink sent. The events in flight at the kill (a full window)
// must be sent again after the restart.
// In batch mode the same holds, batches of up to 4 events being sent again instead of single events.
func TestMQTTOutage(t *testing.T) {
	for _, mode := range []string{ModeStructured, ModeBatch} {
		t.Run(mode, func(t *testing.T) { testMQTTOutage(t, mode) })
	}
}

func testMQTTOutage(t *testing.T, mode string) {
	b := mosquittotest.Start(t)
	p := mosquittotest.NewProxy(t, b.Addr())
	col := collect(t, b.URL(), "edgegate/gw1/#") // events and batches
	// The collector's session and subscription survive the kill.
	b.Save()

	log := newMemLog(t)
	sc := mqttSink("up", p.URL())
	sc.Window = 16
	if mode == ModeBatch {
		sc.BatchSize, sc.MQTT.Mode = 4, ModeBatch
	}
	sc.AckTimeout = 10 * time.Second // the kill, not a stall, ends the connection
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)

	const n = 1200
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	prodDone := make(chan struct{})
	go func() {
		defer close(prodDone)
		producer(ctx, log, n, []string{"hall", "kitchen", "porch"}, 20, 5*time.Millisecond)
	}()

	waitFor(t, 10*time.Second, "some events upstream", func() bool { return col.unique() >= 150 })
	p.Blackhole(true)
	// Everything the sink has sent (cursor + in flight: the log has no gaps and no filter) has reached the
	// collector, and a full window waits for acknowledgements that cannot come.
	var cursor uint64
	waitFor(t, 10*time.Second, "a full window in flight, all of it at the collector", func() bool {
		h := sinkHealth(r, "up")
		cursor = h.Cursor
		return h.InFlight == sc.Window && col.unique() >= int(h.Cursor)+h.InFlight
	})
	b.Stop()
	waitFor(t, 10*time.Second, "the sink to notice", func() bool { return !sinkHealth(r, "up").Connected })
	// Only now: acknowledgements the broker sent before the kill and the proxy has not read yet must stay lost.
	p.Blackhole(false)
	reconnects := r.f.metrics.reconnects.WithLabelValues("up")
	waitFor(t, 10*time.Second, "failed reconnect attempts", func() bool { return testutil.ToFloat64(reconnects) >= 2 })
	if h := sinkHealth(r, "up"); h.Healthy || h.LastError == "" || h.Cursor < cursor || h.InFlight != 0 {
		t.Errorf("health during the outage = %+v (cursor before the kill %d)", h, cursor)
	}
	if r.f.Healthy() {
		t.Error("Forwarder.Healthy during the outage")
	}
	b.Start()

	<-prodDone
	waitFor(t, 30*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:up") == n })
	waitForOrReport(t, 10*time.Second, "every event upstream", func() bool { return col.unique() == n })
	dups := checkDelivery(t, col.all(), n)
	conns := testutil.ToFloat64(reconnects) + 1
	if limit := sc.Window * int(conns); dups > limit {
		t.Errorf("%d duplicates, more than window %d × %v connections", dups, sc.Window, conns)
	}
	if dups == 0 {
		t.Error("no duplicates: the window in flight at the kill was not sent again")
	}
	if !sinkHealth(r, "up").Healthy {
		t.Errorf("not healthy after the outage: %+v", sinkHealth(r, "up"))
	}
	if v := testutil.ToFloat64(r.f.metrics.acked.WithLabelValues("up")); v != n {
		t.Errorf("acked_total = %v, want %d", v, n)
	}
	t.Logf("outage: %d events, %d duplicates, %v connections", n, dups, conns)
}

// TestMQTTStall: a path that swallows acknowledgements is declared stalled, dropped and replaced; nothing is
// lost and the stall clears when acknowledgements come back.
func TestMQTTStall(t *testing.T) {
	b := mosquittotest.Start(t)
	p := mosquittotest.NewProxy(t, b.Addr())
	col := collect(t, b.URL(), "edgegate/gw1/events/#")
	log := newMemLog(t)
	sc := mqttSink("up", p.URL())
	sc.AckTimeout = 300 * time.Millisecond
	sc.Window = 8
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	stalled := r.f.metrics.stalled.WithLabelValues("up")

	for i := range 40 {
		log.add("sensor.reading", "hall", i+1)
	}
	waitFor(t, 10*time.Second, "the first events acknowledged", func() bool { return log.Cursor("sink:up") == 40 })

	p.Blackhole(true)
	for i := range 40 {
		log.add("sensor.reading", "hall", 41+i)
	}
	waitFor(t, 10*time.Second, "the stall", func() bool { return sinkHealth(r, "up").Stalled })
	if v := testutil.ToFloat64(stalled); v != 1 {
		t.Errorf("stalled gauge = %v during the stall", v)
	}
	if h := sinkHealth(r, "up"); h.Healthy || !strings.Contains(h.LastError, "stalled") {
		t.Errorf("health during the stall = %+v", h)
	}
	if c := log.Cursor("sink:up"); c != 40 {
		t.Errorf("cursor moved to %d without acknowledgements", c)
	}

	p.Blackhole(false)
	waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:up") == 80 })
	waitFor(t, 10*time.Second, "the stall to clear", func() bool { return !sinkHealth(r, "up").Stalled })
	if v := testutil.ToFloat64(stalled); v != 0 {
		t.Errorf("stalled gauge = %v after recovery", v)
	}
	waitFor(t, 10*time.Second, "every event upstream", func() bool { return col.unique() == 80 })
	checkDelivery(t, col.all(), 80)
	if v := testutil.ToFloat64(r.f.metrics.resent.WithLabelValues("up")); v < 1 {
		t.Errorf("resent_total = %v, want the stalled events sent again", v)
	}
}

// TestMQTTReconnectStorm: 20 dropped connections during a transfer lose nothing.
func TestMQTTReconnectStorm(t *testing.T) {
	b := mosquittotest.Start(t)
	p := mosquittotest.NewProxy(t, b.Addr())
	col := collect(t, b.URL(), "edgegate/gw1/events/#")
	log := newMemLog(t)
	sc := mqttSink("up", p.URL())
	sc.Window = 32
	sc.BackoffMin, sc.BackoffMax = 5*time.Millisecond, 50*time.Millisecond
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)

	const n = 3000
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	prodDone := make(chan struct{})
	go func() {
		defer close(prodDone)
		producer(ctx, log, n, []string{"a", "b", "c", "d"}, 50, 5*time.Millisecond)
	}()
	resets, accepted := 0, 0
	for resets < 20 {
		before := log.Cursor("sink:up")
		waitFor(t, 10*time.Second, "progress on a new connection", func() bool {
			return p.Accepted() > accepted && sinkHealth(r, "up").Connected &&
				(log.Cursor("sink:up") > before || log.Cursor("sink:up") == n)
		})
		accepted = p.Accepted()
		if p.ResetAll() > 0 {
			resets++
		}
	}
	<-prodDone
	waitFor(t, 30*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:up") == n })
	waitFor(t, 10*time.Second, "every event upstream", func() bool { return col.unique() == n })
	dups := checkDelivery(t, col.all(), n)
	reconnects := r.f.metrics.reconnects.WithLabelValues("up")
	waitFor(t, 10*time.Second, "a reconnect counted for every reset", func() bool { return testutil.ToFloat64(reconnects) >= 20 })
	conns := testutil.ToFloat64(reconnects) + 1
	if limit := sc.Window * int(conns); dups > limit {
		t.Errorf("%d duplicates, more than window %d × %v connections", dups, sc.Window, conns)
	}
	t.Logf("storm: %d events, %d resets, %d duplicates, %v connections", n, resets, dups, conns)
}

// TestMQTTCommands: commands published upstream reach the CommandSink; one for an unknown device is
// dead-lettered; one published while the gateway is away arrives when it is back (persistent session).
func TestMQTTCommands(t *testing.T) {
	b := mosquittotest.Start(t)
	log := newMemLog(t)
	cmds := &commands{known: map[string]bool{"lamp": true}}
	cfg := Config{Sinks: []SinkConfig{mqttSink("up", b.URL())}}
	r := startForwarder(t, cfg, log, cmds)
	waitFor(t, 10*time.Second, "the sink connected", func() bool { return sinkHealth(r, "up").Connected })

	pub := paho.NewClient(paho.NewClientOptions().AddBroker(b.URL()).SetClientID("cloud"))
	if tok := pub.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud connect: %v", tok.Error())
	}
	defer pub.Disconnect(0)
	send := func(topic, payload string) {
		t.Helper()
		if tok := pub.Publish(topic, 1, false, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %s: %v", topic, tok.Error())
		}
	}
	// Connected is reported once the command subscription is acknowledged.
	send("edgegate/gw1/commands/lamp/lights.on", `{"level":80}`)
	waitFor(t, 10*time.Second, "the first command", func() bool { return len(cmds.all()) > 0 })
	if got := cmds.all()[0]; got != (command{"lamp", "lights.on", `{"level":80}`}) {
		t.Errorf("command = %+v", got)
	}

	send("edgegate/gw1/commands/ghost/lights.on", `{}`)
	waitFor(t, 10*time.Second, "a dead letter", func() bool { return len(r.dl.all()) == 1 })
	dl := r.dl.all()[0]
	if dl.reason != ReasonUnknownDevice || dl.device != "ghost" || dl.topic != "edgegate/gw1/commands/ghost/lights.on" ||
		string(dl.payload) != "{}" {
		t.Errorf("dead letter = %+v", dl)
	}
	if log.last() != 0 {
		t.Errorf("commands entered the log: %d records", log.last())
	}

	// Away: the broker keeps the command for the persistent session.
	r.stop()
	before := len(cmds.all())
	send("edgegate/gw1/commands/lamp/lights.off", `{}`)
	startForwarder(t, cfg, log, cmds)
	waitFor(t, 10*time.Second, "the command sent while away", func() bool { return len(cmds.all()) > before })
	if got := cmds.all()[before]; got != (command{"lamp", "lights.off", `{}`}) {
		t.Errorf("command after reconnect = %+v", got)
	}
}
