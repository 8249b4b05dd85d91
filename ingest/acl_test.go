package ingest_test

import (
	"fmt"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/ingest"
)

// aclDevices: "granted" has extra grants; "watcher" may subscribe to every device topic.
var aclDevices = []dev{
	{id: "sensor-1"},
	{id: "sensor-2"},
	{id: "granted", publish: []string{"devices/a", "site/+/temp", "zone/a/#"},
		subscribe: []string{"devices/a", "site/+/temp", "zone/a/#"}},
	{id: "watcher", subscribe: []string{"devices/#"}},
}

func TestACLPublish(t *testing.T) {
	tb := startBroker(t, brokerOpts{devices: aclDevices})
	cases := []struct {
		topic string
		ok    bool
	}{
		{"devices/granted/events/x", true},
		{"devices/granted", true},
		{"devices/granted/telemetry/a/b", true},
		{"devices/sensor-1/events/x", false},
		{"devices/granted2/events/x", false},
		{"devices/grante/events/x", false},
		{"devices/a", true},      // grant devices/a
		{"devices/a/b", false},   // a grant without wildcard is that topic only
		{"site/x/temp", true},    // grant site/+/temp
		{"site/x/y/temp", false}, // '+' is exactly one level
		{"site/temp", false},
		{"zone/a", true}, // grant zone/a/# matches its parent
		{"zone/a/b/c", true},
		{"zone/ab", false},
		{"$SYS/broker/x", false},
		{"other/topic", false},
	}
	rc := dialRaw(t, tb.addr, 5)
	rc.mustConnect("granted")
	denied := 0
	for _, c := range cases {
		events, letters := len(tb.cons.ofType("x"))+len(tb.cons.ofType("telemetry.a.b")), len(tb.dl.all())
		code, acked := rc.publishFenced(c.topic, []byte(`{}`))
		switch {
		case c.ok && (!acked || code >= 0x80):
			t.Errorf("publish %q: PUBACK %v reason 0x%02x, want success", c.topic, acked, code)
		case !c.ok && acked && code != packets.ErrNotAuthorized.Code:
			t.Errorf("publish %q: PUBACK reason 0x%02x, want 0x87", c.topic, code)
		case !c.ok:
			// mochi drops a client's publish to a $ topic before the ACL sees it (no PUBACK, not counted).
			if acked {
				denied++
			}
			e, l := len(tb.cons.ofType("x"))+len(tb.cons.ofType("telemetry.a.b")), len(tb.dl.all())
			if e != events || l != letters {
				t.Errorf("publish %q: refused, yet handled: %d events, %d dead letters", c.topic, e-events, l-letters)
			}
		}
	}
	if n := tb.cons.count("x", "granted"); n != 1 {
		t.Errorf("%d x events about granted, want 1", n)
	}
	if got := tb.metric(t, "edgegate_ingest_acl_denied_total", "action", "publish"); got != float64(denied) {
		t.Errorf("acl denied{publish} = %v, want %d", got, denied)
	}

	// MQTT 3.1.1 has no negative PUBACK: QoS 0 is dropped, QoS 1 ends the connection. Nothing is consumed.
	t.Run("v3.1.1 QoS 0 dropped", func(t *testing.T) {
		cl := mustPaho(t, tb, "sensor-1")
		publish(t, cl, "devices/sensor-2/events/spoofed", 0, `{}`)
		publish(t, cl, "devices/sensor-1/events/after", 1, `{}`)
		tb.cons.waitCount(t, "after", "sensor-1", 1)
		if n := tb.cons.count("spoofed", ""); n != 0 {
			t.Fatalf("%d spoofed events", n)
		}
		if !cl.IsConnectionOpen() {
			t.Fatal("QoS 0 refusal ended the connection")
		}
	})
	t.Run("v3.1.1 QoS 1 disconnected", func(t *testing.T) {
		rc := dialRaw(t, tb.addr, 4)
		rc.mustConnect("sensor-2")
		rc.publish("devices/sensor-1/events/spoofed", 1, []byte(`{}`))
		rc.expectClosed(waitTimeout)
		if n := tb.cons.count("spoofed", ""); n != 0 {
			t.Fatalf("%d spoofed events", n)
		}
	})
}

func TestACLSubscribe(t *testing.T) {
	tb := startBroker(t, brokerOpts{devices: aclDevices})
	cases := []struct {
		filter string
		ok     bool
	}{
		{"devices/granted/commands/#", true},
		{"devices/granted/commands/+", true},
		{"devices/granted/commands/lights.on", true},
		{"#", false},
		{"+/#", false},
		{"devices/#", false},
		{"devices/+/commands/#", false},
		{"devices/+/commands/lights.on", false},
		{"$SYS/#", false},
		{"devices/sensor-1/commands/#", false},
		{"devices/granted/#", false}, // only commands/# is its own
		{"devices/granted/events/x", false},
		{"devices/a", true},
		{"devices/a/b", false},
		{"devices/a/#", false},
		{"site/x/temp", true},
		{"site/+/temp", true},
		{"site/x/y/temp", false},
		{"site/#", false},
		{"zone/a", true},
		{"zone/a/#", true},
		{"zone/a/b/+", true},
		{"zone/#", false},
		{"zone/+", false},
	}
	for _, v := range []struct {
		version byte
		refused byte
	}{{5, packets.ErrNotAuthorized.Code}, {4, packets.ErrUnspecifiedError.Code}} {
		t.Run(fmt.Sprintf("v%d", v.version), func(t *testing.T) {
			before := tb.metric(t, "edgegate_ingest_acl_denied_total", "action", "subscribe")
			rc := dialRaw(t, tb.addr, v.version)
			rc.mustConnect("granted")
			denied := 0
			for _, c := range cases {
				codes := rc.subscribe(c.filter)
				if len(codes) != 1 {
					t.Fatalf("%s: %d reason codes", c.filter, len(codes))
				}
				want := byte(1)
				if !c.ok {
					want = v.refused
					denied++
				}
				if codes[0] != want {
					t.Errorf("subscribe %q: SUBACK 0x%02x, want 0x%02x", c.filter, codes[0], want)
				}
			}
			if got := tb.metric(t, "edgegate_ingest_acl_denied_total", "action", "subscribe"); got != before+float64(denied) {
				t.Errorf("acl denied{subscribe} = %v, want %v", got, before+float64(denied))
			}
		})
	}
	// A SUBSCRIBE mixing allowed and refused filters gets a reason code per filter.
	rc := dialRaw(t, tb.addr, 5)
	rc.mustConnect("sensor-1")
	codes := rc.subscribe("devices/sensor-1/commands/#", "devices/sensor-2/commands/#")
	if len(codes) != 2 || codes[0] != 1 || codes[1] != packets.ErrNotAuthorized.Code {
		t.Fatalf("SUBACK %x, want [01 87]", codes)
	}
	// The allowed subscription works: a command arrives; the refused one receives nothing.
	if err := tb.Publish("devices/sensor-2/commands/c", []byte("not yours"), false, 0); err != nil {
		t.Fatal(err)
	}
	if err := tb.Publish("devices/sensor-1/commands/c", []byte("yours"), false, 0); err != nil {
		t.Fatal(err)
	}
	pk := rc.expect(packets.Publish)
	if pk.TopicName != "devices/sensor-1/commands/c" || string(pk.Payload) != "yours" {
		t.Fatalf("delivered %s %q", pk.TopicName, pk.Payload)
	}
}

func TestACLWillToForbiddenTopicNeverPublished(t *testing.T) {
	tb := startBroker(t, brokerOpts{devices: aclDevices})
	got := make(chan string, 16)
	watcher, err := pahoConnect(t, "tcp://"+tb.addr, pahoOpts{user: "watcher", pass: password("watcher")})
	if err != nil {
		t.Fatal(err)
	}
	if tok := watcher.Subscribe("devices/+/events/#", 1, func(_ paho.Client, m paho.Message) {
		got <- m.Topic()
	}); !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
		t.Fatalf("watcher subscribe: %v", tok.Error())
	}
	next := func() string {
		t.Helper()
		select {
		case tp := <-got:
			return tp
		case <-time.After(waitTimeout):
			t.Fatal("watcher received nothing")
			return ""
		}
	}

	// sensor-1's will names sensor-2's topic: it is dropped at CONNECT, and the connection still works.
	rc := dialRaw(t, tb.addr, 4)
	will := &packets.Packet{TopicName: "devices/sensor-2/events/spoofed.will", Payload: []byte(`{}`)}
	if code := rc.connect(connectOpts{user: "sensor-1", will: will}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	if got := tb.metric(t, "edgegate_ingest_acl_denied_total", "action", "will"); got != 1 {
		t.Errorf("acl denied{will} = %v, want 1", got)
	}
	_ = rc.c.Close() // no DISCONNECT: a will would be published now
	waitFor(t, "sensor-1 disconnected", func() bool { return len(tb.cons.disconnectReasons("sensor-1")) == 1 })
	if r := tb.cons.disconnectReasons("sensor-1"); r[0] != "connection_lost" {
		t.Errorf("disconnect reason %q, want connection_lost", r[0])
	}
	// A message published after the disconnect is the first thing the watcher sees.
	sensor2 := mustPaho(t, tb, "sensor-2")
	publish(t, sensor2, "devices/sensor-2/events/sentinel", 1, `{}`)
	if tp := next(); tp != "devices/sensor-2/events/sentinel" {
		t.Fatalf("watcher received %s before the sentinel", tp)
	}
	if n := tb.cons.count("spoofed.will", ""); n != 0 {
		t.Errorf("%d events from the refused will", n)
	}

	// Control: a will on the device's own topic is published to the same watcher.
	rc = dialRaw(t, tb.addr, 4)
	will = &packets.Packet{TopicName: "devices/sensor-1/events/own.will", Payload: []byte(`{}`)}
	if code := rc.connect(connectOpts{user: "sensor-1", will: will}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	_ = rc.c.Close()
	if tp := next(); tp != "devices/sensor-1/events/own.will" {
		t.Fatalf("watcher received %s, want the will", tp)
	}
	tb.cons.waitCount(t, "own.will", "sensor-1", 1)
}

// TestRevoke: Revoke closes every connection of the device — an MQTT 5 one with DISCONNECT "not authorized" —
// without publishing its will, records "revoked" as the reason (of the one device.disconnected, when the last
// connection ends), and drops its stored session; other devices keep their connections.
func TestRevoke(t *testing.T) {
	tb := startBroker(t, brokerOpts{})
	other := mustPaho(t, tb, "sensor-2")

	// A stored session of sensor-1 (clean session off), then two live connections: MQTT 5 with a will, and 3.1.1.
	if storedSession(t, tb) {
		t.Fatal("a session is stored before the first connection")
	}
	waitFor(t, "the stored session's connection to end", func() bool { return len(tb.cons.disconnectReasons("sensor-1")) == 1 })
	if !storedSession(t, tb) {
		t.Fatal("no session stored between two connections with clean session off")
	}
	waitFor(t, "the stored session's connections to end", func() bool { return len(tb.cons.disconnectReasons("sensor-1")) == 2 })
	v5 := dialRaw(t, tb.addr, 5)
	will := &packets.Packet{TopicName: "devices/sensor-1/events/went.offline", Payload: []byte(`{}`)}
	if code := v5.connect(connectOpts{user: "sensor-1", will: will}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	v4 := dialRaw(t, tb.addr, 4)
	if code := v4.connect(connectOpts{user: "sensor-1", clientID: "sensor-1:b"}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	tb.cons.waitCount(t, "device.connected", "sensor-1", 4)

	if n := tb.Revoke("sensor-1"); n != 2 {
		t.Fatalf("Revoke closed %d connections, want 2", n)
	}
	if pk := v5.expect(packets.Disconnect); pk.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Errorf("MQTT 5 DISCONNECT reason 0x%02x, want 0x%02x", pk.ReasonCode, packets.ErrNotAuthorized.Code)
	}
	v5.expectClosed(waitTimeout)
	v4.expectClosed(waitTimeout)
	waitFor(t, "both connections to end", func() bool { return tb.Clients() == 1 })
	if r := tb.cons.disconnectReasons("sensor-1"); len(r) != 3 || r[2] != ingest.PresenceRevoked {
		t.Errorf("disconnect reasons %v, want one more after the first two, %q", r, ingest.PresenceRevoked)
	}
	if tb.Connected("sensor-1") {
		t.Error("sensor-1 still connected after Revoke")
	}

	if storedSession(t, tb) {
		t.Error("the stored session of sensor-1 survived Revoke")
	}
	// Other devices were not touched; the will was not published.
	publish(t, other, "devices/sensor-2/events/sentinel", 1, `{}`)
	tb.cons.waitCount(t, "sentinel", "sensor-2", 1)
	if n := tb.cons.count("went.offline", "sensor-1"); n != 0 {
		t.Errorf("the revoked connection's will was published (%d events)", n)
	}
}

// storedSession connects sensor-1 as "sensor-1:stored" with clean session off, subscribes to its commands and
// disconnects; it reports whether the broker had a session stored for it (CONNACK session present).
func storedSession(t *testing.T, tb *testBroker) bool {
	t.Helper()
	opts := paho.NewClientOptions().AddBroker("tcp://" + tb.addr).SetClientID("sensor-1:stored").
		SetUsername("sensor-1").SetPassword(password("sensor-1")).SetCleanSession(false).SetProtocolVersion(4).
		SetAutoReconnect(false).SetConnectTimeout(waitTimeout)
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(2*waitTimeout) || tok.Error() != nil {
		t.Fatalf("connect sensor-1:stored: %v", tok.Error())
	}
	defer c.Disconnect(0)
	if s := c.Subscribe("devices/sensor-1/commands/#", 1, nil); !s.WaitTimeout(waitTimeout) || s.Error() != nil {
		t.Fatalf("subscribe: %v", s.Error())
	}
	return tok.(*paho.ConnectToken).SessionPresent()
}
