package ingest_test

import (
	"slices"
	"sync/atomic"
	"testing"

	"github.com/edgegate/edgegate/ingest"
)

// lastPresence returns the type of the last presence event about device, "" when there is none.
func (c *consumer) lastPresence(device string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := len(c.results) - 1; i >= 0; i-- {
		r := c.results[i]
		if r.Event.Subject() == device && (r.Event.Type() == "device.connected" || r.Event.Type() == "device.disconnected") {
			return r.Event.Type()
		}
	}
	return ""
}

// A device whose session is taken over by its new connection stays online: once the old connection has ended, the
// last presence event is device.connected. A device.disconnected for the old connection, if any, comes before
// the new connection's device.connected and says taken_over.
func TestPresenceOnlineAfterTakeovers(t *testing.T) {
	tb := startBroker(t, brokerOpts{})
	const rounds = 40
	prev := dialRaw(t, tb.addr, 4)
	prev.mustConnect("sensor-1")
	for i := range rounds {
		rc := dialRaw(t, tb.addr, 4)
		rc.mustConnect("sensor-1") // takes the session over from prev
		prev.expectClosed(waitTimeout)
		// The old connection has ended, and mochi forgot it, once the broker counts one connection; the new one
		// is announced (mochi writes its CONNACK first).
		waitFor(t, "the old connection to end", func() bool { return tb.Clients() == 1 })
		tb.cons.waitCount(t, "device.connected", "sensor-1", i+2)
		if !tb.Connected("sensor-1") {
			t.Fatalf("takeover %d: Connected(sensor-1) = false once its device.connected was consumed", i)
		}
		if last := tb.cons.lastPresence("sensor-1"); last != "device.connected" {
			t.Fatalf("takeover %d: last presence event %q, want device.connected", i, last)
		}
		if !tb.Connected("sensor-1") {
			t.Fatalf("takeover %d: Connected(sensor-1) = false", i)
		}
		prev = rc
	}
	for _, r := range tb.cons.disconnectReasons("sensor-1") {
		if r != ingest.PresenceTakenOver {
			t.Errorf("disconnect reasons %v, want only %s", tb.cons.disconnectReasons("sensor-1"), ingest.PresenceTakenOver)
			break
		}
	}
	if n := tb.cons.count("device.connected", "sensor-1"); n != rounds+1 {
		t.Errorf("%d device.connected events, want %d", n, rounds+1)
	}
	// The last connection ends: now the device is offline.
	n := len(tb.cons.disconnectReasons("sensor-1"))
	prev.disconnect()
	waitFor(t, "the presence event", func() bool { return len(tb.cons.disconnectReasons("sensor-1")) == n+1 })
	if r := tb.cons.disconnectReasons("sensor-1"); r[n] != ingest.PresenceCleanDisconnect {
		t.Errorf("reason %q, want %q", r[n], ingest.PresenceCleanDisconnect)
	}
	if last := tb.cons.lastPresence("sensor-1"); last != "device.disconnected" {
		t.Errorf("last presence event %q, want device.disconnected", last)
	}
}

// A device is online while any of its connections is: device.disconnected is emitted when the last one ends.
func TestPresenceOnlineWhileAnyConnectionIsUp(t *testing.T) {
	tb := startBroker(t, brokerOpts{})
	a := dialRaw(t, tb.addr, 4)
	a.mustConnect("sensor-1")
	b := dialRaw(t, tb.addr, 5)
	if code := b.connect(connectOpts{user: "sensor-1", clientID: "sensor-1:b"}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	tb.cons.waitCount(t, "device.connected", "sensor-1", 2)

	b.disconnect()
	waitFor(t, "the second connection to end", func() bool { return tb.Clients() == 1 })
	if r := tb.cons.disconnectReasons("sensor-1"); len(r) != 0 {
		t.Errorf("device.disconnected %v while a connection of the device is up", r)
	}
	if last := tb.cons.lastPresence("sensor-1"); last != "device.connected" || !tb.Connected("sensor-1") {
		t.Errorf("last presence event %q, Connected %v; want device.connected, true", last, tb.Connected("sensor-1"))
	}

	_ = a.c.Close()
	waitFor(t, "the presence event", func() bool { return len(tb.cons.disconnectReasons("sensor-1")) == 1 })
	if r := tb.cons.disconnectReasons("sensor-1"); !slices.Equal(r, []string{ingest.PresenceConnectionLost}) {
		t.Errorf("disconnect reasons %v, want [%s]", r, ingest.PresenceConnectionLost)
	}
}

// Connected changes before the presence event that reports the change is handed on: a rule that reacts to
// device.disconnected by looking at Connected sees the device offline, and one reacting to device.connected
// online.
func TestConnectedChangesWithPresenceEvents(t *testing.T) {
	var started atomic.Pointer[testBroker]
	tb := startBroker(t, brokerOpts{consumer: func(c *consumer) ingest.Consumer {
		c.probe = func(device string) bool { return started.Load().Connected(device) }
		return c
	}})
	started.Store(tb)
	for range 3 {
		rc := dialRaw(t, tb.addr, 4)
		rc.mustConnect("sensor-1")
		rc.disconnect()
		waitFor(t, "the presence event", func() bool { return tb.cons.count("device.disconnected", "sensor-1") == 1 })
		tb.cons.mu.Lock()
		got := slices.Clone(tb.cons.probed)
		tb.cons.probed, tb.cons.results = nil, nil
		tb.cons.mu.Unlock()
		if want := []string{"device.connected true", "device.disconnected false"}; !slices.Equal(got, want) {
			t.Fatalf("Connected as the events were consumed: %q, want %q", got, want)
		}
	}
}
