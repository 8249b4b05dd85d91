package forward

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// idSet returns the distinct event ids of got.
func idSet(got []received) map[string]bool {
	set := make(map[string]bool, len(got))
	for _, r := range got {
		set[r.id] = true
	}
	return set
}

// hasAll reports whether every id of want is in got.
func hasAll(got, want map[string]bool) bool {
	for id := range want {
		if !got[id] {
			return false
		}
	}
	return true
}

// sameIDs reports the difference between the ids that arrived at an upstream and the ids it should have got.
func sameIDs(t *testing.T, who string, got map[string]bool, want map[string]bool) {
	t.Helper()
	var missing, extra []string
	for id := range want {
		if !got[id] {
			missing = append(missing, id)
		}
	}
	for id := range got {
		if !want[id] {
			extra = append(extra, id)
		}
	}
	slices.Sort(missing)
	slices.Sort(extra)
	if len(missing) > 0 {
		t.Errorf("%s: %d events never arrived, e.g. %v", who, len(missing), missing[:min(10, len(missing))])
	}
	if len(extra) > 0 {
		t.Errorf("%s: %d events arrived that its types filter excludes, e.g. %v", who, len(extra), extra[:min(10, len(extra))])
	}
}

// TestMultipleSinks: two sinks with different types filters read one log, each through its own cursor. While
// one upstream is down (the HTTP endpoint answering 503, then the MQTT broker killed) the other keeps
// delivering: its cursor reaches the end of the log and it stays healthy, while the sink whose upstream is
// down is unhealthy and its cursor stays where the outage began. Once the upstream is back that sink catches
// up. Every event reaches each upstream whose filter selects it, and no other.
func TestMultipleSinks(t *testing.T) {
	b := mosquittotest.Start(t)
	col := collect(t, b.URL(), "edgegate/gw1/events/#")
	b.Save() // the collector's session and subscription survive the kill

	acc := newEventUpstream(t, "") // the web sink's upstream

	web := httpSink(acc.srv.URL, ModeStructured) // "web", cursor sink:web
	web.Types = []string{"sensor.*", "door.opened"}
	mq := mqttSink("up", b.URL()) // cursor sink:up
	mq.Types = []string{"door.*"}
	mq.Window = 8

	// Which types each sink carries; "noise" goes to neither. door.opened goes to both.
	types := []string{"sensor.reading", "door.opened", "door.closed", "noise"}
	carriesWeb := func(typ string) bool { return strings.HasPrefix(typ, "sensor.") || typ == "door.opened" }
	carriesUp := func(typ string) bool { return strings.HasPrefix(typ, "door.") }

	log := newMemLog(t)
	wantWeb, wantUp := map[string]bool{}, map[string]bool{}
	n := 0
	// addEvents appends count events, cycling through types from types[first]; n numbers them over the whole
	// log, so it grows per subject for any subset of the events.
	addEvents := func(count, first int) {
		for i := range count {
			n++
			typ := types[(first+i)%len(types)]
			seq := log.add(typ, []string{"hall", "kitchen", "porch"}[n%3], n)
			id := fmt.Sprintf("ev-%06d", seq)
			if carriesWeb(typ) {
				wantWeb[id] = true
			}
			if carriesUp(typ) {
				wantUp[id] = true
			}
		}
	}
	atEnd := func(cursor string) func() bool {
		return func() bool { return log.Cursor(cursor) == log.last() }
	}

	addEvents(40, 0)
	r := startForwarder(t, Config{Sinks: []SinkConfig{web, mq}}, log, nil)
	waitFor(t, 10*time.Second, "sink:web at the end of the log", atEnd("sink:web"))
	waitFor(t, 10*time.Second, "sink:up at the end of the log", atEnd("sink:up"))
	upHasAll := func() bool { return hasAll(idSet(col.all()), wantUp) }
	waitFor(t, 10*time.Second, "the first door events at the MQTT collector", upHasAll)

	// The HTTP upstream goes down. The first event of the outage is one that web carries, so its cursor
	// cannot move at all.
	held := log.last()
	acc.down.Store(true)
	addEvents(40, 0)
	waitFor(t, 10*time.Second, "sink:up at the end of the log while web's upstream is down", atEnd("sink:up"))
	waitFor(t, 10*time.Second, "every door event at the MQTT collector", upHasAll)
	waitFor(t, 10*time.Second, "web to be refused a few times (retrying)", func() bool { return acc.refusals() >= 3 })
	if c, h := log.Cursor("sink:web"), sinkHealth(r, "web"); c != held || h.Cursor != held {
		t.Errorf("web's cursor moved during its outage: log %d, health %d, want %d", c, h.Cursor, held)
	}
	if h := sinkHealth(r, "up"); !h.Healthy || h.Cursor != log.last() || h.InFlight != 0 {
		t.Errorf("up's health while web's upstream is down = %+v, want healthy at cursor %d", h, log.last())
	}
	// An HTTP sink counts as connected from each new attempt until its first request fails, so poll.
	waitFor(t, 10*time.Second, "web unhealthy with the 503 as its last error", func() bool {
		h := sinkHealth(r, "web")
		return !h.Healthy && strings.Contains(h.LastError, "503")
	})

	acc.down.Store(false)
	waitFor(t, 10*time.Second, "web to catch up", atEnd("sink:web"))
	waitFor(t, 10*time.Second, "web healthy again", func() bool { return sinkHealth(r, "web").Healthy })
	if !hasAll(idSet(acc.accepted()), wantWeb) {
		t.Error("web's cursor is at the end, but its upstream did not acknowledge every event web carries")
	}

	// Now the broker goes down. The first event of this outage is a door.opened, which up carries.
	b.Stop()
	waitFor(t, 10*time.Second, "up to notice the broker is gone", func() bool {
		h := sinkHealth(r, "up")
		return !h.Healthy && !h.Connected && h.LastError != ""
	})
	held = log.last()
	addEvents(40, 1)
	waitFor(t, 10*time.Second, "sink:web at the end of the log while the broker is down", atEnd("sink:web"))
	reconnects := r.f.metrics.reconnects.WithLabelValues("up")
	before := testutil.ToFloat64(reconnects)
	waitFor(t, 10*time.Second, "up to retry", func() bool { return testutil.ToFloat64(reconnects) >= before+2 })
	if h := sinkHealth(r, "web"); !h.Healthy || h.Cursor != log.last() || h.InFlight != 0 {
		t.Errorf("web's health while the broker is down = %+v, want healthy at cursor %d", h, log.last())
	}
	if !hasAll(idSet(acc.accepted()), wantWeb) {
		t.Error("web's cursor is at the end while the broker is down, but its upstream did not acknowledge every event web carries")
	}
	if h := sinkHealth(r, "up"); h.Healthy || h.Connected || h.Cursor != held {
		t.Errorf("up's health while the broker is down = %+v, want unhealthy at cursor %d", h, held)
	}
	if c := log.Cursor("sink:up"); c != held {
		t.Errorf("up's cursor moved during its outage: %d, want %d", c, held)
	}
	if r.f.Healthy() {
		t.Error("Forwarder.Healthy while the broker is down")
	}

	b.Start()
	waitFor(t, 30*time.Second, "up to catch up", atEnd("sink:up"))
	waitFor(t, 10*time.Second, "up healthy again", func() bool { return sinkHealth(r, "up").Healthy })
	waitFor(t, 10*time.Second, "every door event at the MQTT collector", upHasAll)

	// Each upstream got exactly the events of its own filter, each device's in order; the HTTP upstream
	// acknowledged none twice (a 503 acknowledges nothing, so nothing acknowledged is sent again).
	sameIDs(t, "web", idSet(acc.accepted()), wantWeb)
	sameIDs(t, "up", idSet(col.all()), wantUp)
	if dups := checkDelivery(t, acc.accepted(), len(wantWeb)); dups != 0 {
		t.Errorf("web: %d events acknowledged twice", dups)
	}
	checkDelivery(t, col.all(), len(wantUp))
	for name, want := range map[string]int{"web": len(wantWeb), "up": len(wantUp)} {
		if v := testutil.ToFloat64(r.f.metrics.acked.WithLabelValues(name)); v != float64(want) {
			t.Errorf("acked_total{sink=%q} = %v, want %d", name, v, want)
		}
	}
}
