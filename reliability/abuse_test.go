//go:build linux

package reliability

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/e2e"
	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// The abuse scenarios run the real edgegate binary with hostile clients next to a well-behaved one. Each asserts
// that the process stays up (pid alive, /healthz 200), that the well-behaved device keeps getting PUBACKs for its
// QoS 1 events with a low latency during the abuse, that a metric (or a log line) says what happened, and that
// nothing of the abuse is forwarded upstream: only the good device's events (and the presence events of devices
// that logged in) reach the upstream broker.

// Devices of the abuse scenarios; each password is "<id>-pw".
const (
	goodID     = "good"     // publishes QoS 1 events all along and measures their latency
	evilID     = "evil"     // the abuser, a registered device
	victimID   = "victim"   // the device the abuser targets
	observerID = "observer" // may subscribe to "#": sees every message the broker routes
)

// Bounds of the abuse scenarios.
const (
	// abuseConnectTimeout is mqtt.connect_timeout of the abuse gateways.
	abuseConnectTimeout = time.Second
	// abuseMaxPacket and abuseMaxPayload are mqtt.max_packet_bytes and ingest.max_payload_bytes; the payload
	// limit is above 100 KB so that a 100k-deep JSON payload reaches the JSON check.
	abuseMaxPacket  = 256 << 10
	abuseMaxPayload = 128 << 10
	// goodLatencyBound bounds the good device's p99 PUBACK latency during the abuse (generous: the tests run
	// under -race on two cores next to the abuser).
	goodLatencyBound = 250 * time.Millisecond
	// goodInterval is the pause between the good device's publishes; goodSamples is the fewest PUBACK
	// latencies a scenario gathers before it computes the p99 (so that one outlier is not the p99).
	goodInterval = 5 * time.Millisecond
	goodSamples  = 200
	// closeWithin bounds how long the gateway may take to close a connection that broke the protocol.
	closeWithin = 3 * time.Second
)

// presenceTypes are the events a device's connection itself makes; any device that logged in has them upstream.
var presenceTypes = []string{"device.connected", "device.disconnected"}

// abuseEnv is one gateway under abuse, its upstream and its well-behaved device.
type abuseEnv struct {
	t     *testing.T
	start time.Time
	gw    *e2e.Gateway
	up    *mosquittotest.Broker
	tap   *e2e.Tap
	good  *steady
	pid   int
	m0    e2e.Metrics // metrics right after start

	// victimLoggedIn is set by scenarios in which the victim device connects (and so has presence events).
	victimLoggedIn bool
}

func abuseDevices() []e2e.Device {
	var out []e2e.Device
	for _, id := range []string{goodID, evilID, victimID, observerID} {
		out = append(out, e2e.Device{ID: id, Password: id + "-pw"})
	}
	return out
}

// startAbuse starts an upstream broker, a gateway forwarding to it with the abuse configuration (set overrides
// keys) and the good device's publisher.
func startAbuse(t *testing.T, set map[string]any) *abuseEnv {
	t.Helper()
	binary := bin(t) // built once for the package: not part of the scenario's time
	e := &abuseEnv{t: t, start: time.Now()}
	e.up = mosquittotest.Start(t)
	e.tap = e2e.NewTap(t, e.up)
	cfg := map[string]any{
		"mqtt.connect_timeout":     abuseConnectTimeout.String(),
		"mqtt.max_packet_bytes":    abuseMaxPacket,
		"ingest.max_payload_bytes": abuseMaxPayload,
		// A strict mapping: what is published under devices/{device}/json/ must be JSON.
		"ingest.mappings": []any{map[string]any{
			"name": "strict-json", "topic": "devices/{device}/json/{type}", "type": "{type}", "format": "json",
		}},
	}
	for k, v := range set {
		cfg[k] = v
	}
	devs := abuseDevices()
	e.gw = e2e.Prepare(t, binary, e2e.Config{Devices: devs, Upstream: e.up.URL(), Set: cfg})
	if err := e2e.WriteRegistryGrants(e.gw.RegistryPath(), devs, map[string]e2e.Grant{
		observerID: {Subscribe: []string{"#"}},
	}); err != nil {
		t.Fatal(err)
	}
	e.gw.Restart()
	e.pid = e.gw.PID()
	e.good = startSteady(t, e.gw.MQTTURL(), devs[0])
	e.good.waitAcked(t, 5, 10*time.Second)
	e.m0 = e.gw.MustMetrics()
	return e
}

// delta returns how much the series grew since start.
func (e *abuseEnv) delta(name string, labels ...string) float64 {
	return e.gw.MustMetrics().Get(name, labels...) - e.m0.Get(name, labels...)
}

// waitDelta polls until the series grew by at least want since start.
func (e *abuseEnv) waitDelta(want float64, name string, labels ...string) {
	e.t.Helper()
	var got float64
	deadline := time.Now().Add(5 * time.Second)
	for {
		got = e.delta(name, labels...)
		if got >= want {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s grew by %v, want at least %v", e2e.SeriesKey(name, labels...), got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// alive fails the test unless the gateway process runs and answers /healthz with 200.
func (e *abuseEnv) alive() {
	e.t.Helper()
	if !e.gw.Running() || !e2e.Alive(e.pid) || e.gw.PID() != e.pid {
		e.t.Fatalf("gateway process %d is gone (exit: %v)", e.pid, e.gw.ExitErr())
	}
	code, err := e.gw.Healthz()
	if err != nil || code != 200 {
		e.t.Fatalf("/healthz: %d %v", code, err)
	}
}

// finish stops the good device and checks the end state: the process is up, the good device got every PUBACK
// quickly, and once the sink has forwarded the whole log, the upstream saw the good device's events and, from
// any other device, only presence events and what allowed accepts. It returns the upstream events.
func (e *abuseEnv) finish(scenario string, allowed func(ev e2e.TapEvent) bool) []e2e.TapEvent {
	e.t.Helper()
	e.alive()
	if n := e.good.acked(); n < goodSamples {
		e.good.waitAcked(e.t, goodSamples-n, 30*time.Second)
	}
	st := e.good.stop()
	e.t.Logf("good device during the abuse: %d PUBACKs, p50 %s, p99 %s, max %s", st.n, st.p50, st.p99, st.max)
	if st.failed > 0 {
		e.t.Errorf("good device: %d of %d QoS 1 publishes got no PUBACK (%v)", st.failed, st.n+st.failed, st.err)
	}
	if st.p99 > goodLatencyBound {
		e.t.Errorf("good device: p99 PUBACK latency %s, want < %s", st.p99, goodLatencyBound)
	}

	// Every event in the log forwarded, and every forwarded event at the tap.
	var last uint64
	e2e.WaitFor(e.t, 15*time.Second, "the sink to forward the whole log and the tap to receive it", func() bool {
		s, err := e.gw.Status()
		if err != nil {
			return false
		}
		sink, ok := s.Sink(e2e.SinkName)
		last = uint64(s.Backlog.LastSeq)
		return ok && sink.Cursor == last && uint64(len(e.tap.Events())) >= last
	})
	evs := e.tap.Events()
	if bad := e.tap.Bad(); len(bad) > 0 {
		e.t.Errorf("upstream got %d payloads that are not CloudEvents, first %q", len(bad), bad[0])
	}
	goodSeen := 0
	for _, ev := range evs {
		switch {
		case slices.Contains(presenceTypes, ev.Type):
			if loggedIn := ev.Subject == goodID || ev.Subject == evilID || ev.Subject == observerID ||
				(ev.Subject == victimID && e.victimLoggedIn); !loggedIn {
				e.t.Errorf("upstream got a presence event of %q, which never logged in: %+v", ev.Subject, ev)
			}
		case ev.Subject == goodID && ev.Type == e2e.EventType:
			goodSeen++
		case allowed != nil && allowed(ev):
		default:
			e.t.Errorf("forwarded upstream from the abuse: subject %q type %q data %.120s", ev.Subject, ev.Type, ev.Data)
		}
	}
	acked := e.good.c.Acked()
	if goodSeen < len(acked) {
		e.t.Errorf("upstream got %d of the good device's %d acknowledged events", goodSeen, len(acked))
	}
	e.alive()
	ids := map[string]bool{}
	for _, ev := range evs {
		ids[ev.ID] = true
	}
	note := fmt.Sprintf("good device p99 %s max %s", st.p99.Round(time.Millisecond), st.max.Round(time.Millisecond))
	if e.t.Failed() {
		note += "; FAILED"
	}
	report.Add(e2e.Row{Scenario: "abuse/" + scenario, Sent: e.good.c.Sent(), Acked: len(acked), Delivered: len(evs),
		Unique: len(ids), Duplicates: len(evs) - len(ids), Elapsed: time.Since(e.start), Note: note})
	return evs
}

// steady is the well-behaved device: QoS 1 events every goodInterval, each PUBACK's latency recorded.
type steady struct {
	c    *e2e.Client
	quit chan struct{}
	done chan struct{}

	stopOnce sync.Once

	mu     sync.Mutex
	lat    []time.Duration
	failed int
	err    error
}

type steadyStats struct {
	n, failed     int
	p50, p99, max time.Duration
	err           error
}

// steadyMax bounds the good device's publishes in one scenario.
const steadyMax = 3000

func startSteady(t *testing.T, url string, dev e2e.Device) *steady {
	s := &steady{c: e2e.NewClient(t, url, dev), quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		for range steadyMax {
			select {
			case <-s.quit:
				return
			case <-ctx.Done():
				return
			default:
			}
			t0 := time.Now()
			_, ok, err := s.c.Publish(ctx, 5*time.Second)
			d := time.Since(t0)
			s.mu.Lock()
			switch {
			case err != nil:
				s.err = err
			case ok:
				s.lat = append(s.lat, d)
			default:
				s.failed++
			}
			s.mu.Unlock()
			select {
			case <-s.quit:
				return
			case <-time.After(goodInterval):
			}
		}
	}()
	t.Cleanup(func() { s.stop() })
	return s
}

func (s *steady) acked() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.lat)
}

// waitAcked waits until n more PUBACKs than now arrived.
func (s *steady) waitAcked(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	target := s.acked() + n
	e2e.WaitFor(t, timeout, fmt.Sprintf("%d PUBACKs of the good device", target), func() bool { return s.acked() >= target })
}

// stop ends the publishing (it may run from a test and from its cleanup) and returns the figures.
func (s *steady) stop() steadyStats {
	s.stopOnce.Do(func() { close(s.quit) })
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	lat := slices.Clone(s.lat)
	slices.Sort(lat)
	st := steadyStats{n: len(lat), failed: s.failed, err: s.err}
	if len(lat) > 0 {
		st.p50 = lat[len(lat)/2]
		st.p99 = lat[(len(lat)*99+99)/100-1] // the smallest value at or above 99% of the samples
		st.max = lat[len(lat)-1]
	}
	return st
}

// login connects a raw client as the device (MQTT 3.1.1 or 5) and fails unless the CONNACK accepts it.
func login(t *testing.T, addr, id string, v5 bool) *rawConn {
	t.Helper()
	c := dialRaw(t, addr)
	level := byte(4)
	if v5 {
		level = 5
	}
	if rc := c.connect(connectSpec{level: level, clientID: id, username: id, password: id + "-pw", keepAlive: 30, clean: true}); rc != 0 {
		t.Fatalf("login %s: CONNACK code %#x", id, rc)
	}
	return c
}

// stillConnected fails the test unless a PINGREQ on c is answered.
func stillConnected(t *testing.T, c *rawConn) {
	t.Helper()
	c.mustSend([]byte{pktPingreq << 4, 0})
	for {
		p, err := c.read(5 * time.Second)
		if err != nil {
			t.Fatalf("the device was disconnected: %v", err)
		}
		if p.typ == pktPingresp {
			return
		}
	}
}

// awaitPuback reads until the PUBACK of id and returns its reason code.
func awaitPuback(t *testing.T, c *rawConn, id uint16, v5 bool) byte {
	t.Helper()
	for {
		p, err := c.read(5 * time.Second)
		if err != nil {
			t.Fatalf("waiting for PUBACK %d: %v", id, err)
		}
		if p.typ == pktPuback && len(p.body) >= 2 && uint16(p.body[0])<<8|uint16(p.body[1]) == id {
			return mustCode(t, p, v5)
		}
	}
}

// TestAbuseMalformedPackets sends packets that break the protocol from raw sockets, before and after CONNECT.
// Each connection must be closed quickly and counted in edgegate_ingest_connections_closed_total.
func TestAbuseMalformedPackets(t *testing.T) {
	e := startAbuse(t, nil)
	addr := e.gw.MQTTAddr
	validConnect := connectPacket(connectSpec{level: 4, clientID: evilID, username: evilID, password: evilID + "-pw", keepAlive: 30, clean: true})
	topic := "devices/" + evilID + "/events/x"
	cases := []struct {
		name   string
		login  int    // 0: none, 4 or 5: log in with that protocol level first
		send   []byte // the offending bytes
		reason string // the label of edgegate_ingest_connections_closed_total that must grow
		within time.Duration
		metric string // instead of edgegate_ingest_connections_closed_total
	}{
		// Before CONNECT.
		{name: "truncated stream: CONNECT cut short", send: validConnect[:10], reason: "timeout", within: abuseConnectTimeout + closeWithin},
		{name: "truncated packet: CONNECT body ends in the variable header", send: packet(pktConnect<<4, mqttStr("MQTT"), []byte{4}), reason: "malformed"},
		{name: "remaining length of 5 bytes (overflow)", send: []byte{pktConnect << 4, 0xff, 0xff, 0xff, 0xff, 0x7f}, reason: "malformed"},
		{name: "remaining length of 5 bytes (value 0)", send: []byte{pktConnect << 4, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00}, reason: "malformed"},
		{name: "client id not UTF-8", send: connectPacket(connectSpec{level: 4, clientID: "evil\xff\xfe", username: evilID, password: evilID + "-pw", clean: true}), reason: "malformed"},
		{name: "client id with NUL", send: connectPacket(connectSpec{level: 4, clientID: "evil\x00", username: evilID, password: evilID + "-pw", clean: true}), reason: "malformed"},
		{name: "username not UTF-8", send: connectPacket(connectSpec{level: 4, clientID: evilID, username: "evil\xc3\x28", password: evilID + "-pw", clean: true}),
			// mochi reads the user name as bytes: it is no registered device, so the login is refused.
			metric: "edgegate_ingest_auth_failures_total", reason: "bad_credentials"},
		{name: "protocol level 9", send: connectPacket(connectSpec{level: 9, clientID: evilID, username: evilID, password: evilID + "-pw", clean: true}), reason: "malformed"},
		{name: "protocol name MQTX", send: connectPacket(connectSpec{level: 4, name: "MQTX", clientID: evilID, username: evilID, password: evilID + "-pw", clean: true}), reason: "malformed"},
		{name: "CONNECT reserved flag set", send: func() []byte {
			b := slices.Clone(validConnect)
			b[2+6+1] |= 0x01 // fixed header (2) + protocol name (6) + level (1): the connect flags
			return b
		}(), reason: "malformed"},
		{name: "CONNECT with fixed header flags", send: func() []byte {
			b := slices.Clone(validConnect)
			b[0] |= 0x02
			return b
		}(), reason: "malformed"},
		{name: "first packet is a PUBLISH", send: publishPacket(publishSpec{topic: topic, payload: []byte("{}")}), reason: "malformed"},
		{name: "MQTT 5 CONNECT with a PUBLISH-only property (topic alias)", send: connectPacket(connectSpec{level: 5, clientID: evilID,
			username: evilID, password: evilID + "-pw", clean: true, props: props(prop{propTopicAlias, u16(1)})}), reason: "malformed"},
		{name: "MQTT 5 CONNECT with a property length past the packet", send: connectPacket(connectSpec{level: 5, clientID: evilID,
			username: evilID, password: evilID + "-pw", clean: true, props: []byte{0x7f, propSessionExpiry, 0, 0, 0, 1}}), reason: "malformed"},

		// After CONNECT (MQTT 3.1.1).
		{name: "PUBLISH with QoS 3", login: 4, send: func() []byte {
			b := publishPacket(publishSpec{topic: topic, payload: []byte("{}"), qos: 1, packetID: 1})
			b[0] |= 0x06
			return b
		}(), reason: "malformed"},
		{name: "PUBLISH topic not UTF-8", login: 4, send: publishPacket(publishSpec{topic: "devices/evil/events/\xff\xfe", payload: []byte("{}")}), reason: "malformed"},
		{name: "PUBLISH topic with NUL", login: 4, send: publishPacket(publishSpec{topic: "devices/evil/events/a\x00b", payload: []byte("{}")}), reason: "malformed"},
		{name: "PUBLISH topic length past the packet", login: 4, send: packet(pktPublish<<4, u16(500), []byte("devices/")), reason: "malformed"},
		{name: "PUBLISH with a wildcard in the topic", login: 4, send: publishPacket(publishSpec{topic: "devices/evil/events/#", payload: []byte("{}")}), reason: "malformed"},
		{name: "PUBLISH QoS 1 with packet id 0", login: 4, send: publishPacket(publishSpec{topic: topic, payload: []byte("{}"), qos: 1, packetID: 0}), reason: "malformed"},
		{name: "PUBLISH remaining length of 5 bytes", login: 4, send: []byte{pktPublish << 4, 0x80, 0x80, 0x80, 0x80, 0x01}, reason: "malformed"},
		{name: "SUBSCRIBE with reserved bits 0000", login: 4, send: subscribePacket(1, false, 0x0, "devices/evil/commands/#"), reason: "malformed"},
		{name: "SUBSCRIBE with reserved bits 0011", login: 4, send: subscribePacket(1, false, 0x3, "devices/evil/commands/#"), reason: "malformed"},
		{name: "SUBSCRIBE without filters", login: 4, send: packet(pktSubscribe<<4|0x2, u16(1)), reason: "malformed"},
		{name: "UNSUBSCRIBE with reserved bits 0000", login: 4, send: packet(pktUnsubscribe<<4, u16(1), mqttStr("devices/evil/commands/#")), reason: "malformed"},
		{name: "PINGREQ with flags", login: 4, send: []byte{pktPingreq<<4 | 0x1, 0}, reason: "malformed"},
		{name: "reserved packet type 0", login: 4, send: []byte{0x00, 0x00}, reason: "malformed"},
		{name: "second CONNECT", login: 4, send: validConnect, reason: "malformed"},

		// After CONNECT (MQTT 5): properties out of place.
		{name: "MQTT 5 PUBLISH with a CONNECT-only property (session expiry)", login: 5, send: publishPacket(publishSpec{topic: topic,
			payload: []byte("{}"), v5: true, props: props(prop{propSessionExpiry, u32(60)})}), reason: "malformed"},
		{name: "MQTT 5 PUBLISH with a CONNACK-only property (maximum packet size)", login: 5, send: publishPacket(publishSpec{topic: topic,
			payload: []byte("{}"), qos: 1, packetID: 7, v5: true, props: props(prop{propMaxPacketSize, u32(10)})}), reason: "malformed"},
		{name: "MQTT 5 SUBSCRIBE with a PUBLISH-only property (content type)", login: 5, send: packet(pktSubscribe<<4|0x2, u16(1),
			props(prop{propContentType, mqttStr("application/json")}), mqttStr("devices/evil/commands/#"), []byte{1}), reason: "malformed"},
		{name: "MQTT 5 PUBLISH with topic alias 0", login: 5, send: publishPacket(publishSpec{topic: topic,
			payload: []byte("{}"), v5: true, props: props(prop{propTopicAlias, u16(0)})}), reason: "malformed"},
		// The gateway grants no topic aliases (each would hold up to 64 KiB for the connection's life).
		{name: "MQTT 5 PUBLISH with a topic alias", login: 5, send: publishPacket(publishSpec{topic: topic,
			payload: []byte("{}"), v5: true, props: props(prop{propTopicAlias, u16(1)})}), reason: "malformed"},
		{name: "MQTT 5 PUBLISH without topic or alias", login: 5, send: publishPacket(publishSpec{topic: "",
			payload: []byte("{}"), v5: true}), reason: "malformed"},
		{name: "MQTT 5 PUBLISH from a client with a subscription identifier", login: 5, send: publishPacket(publishSpec{topic: topic,
			payload: []byte("{}"), v5: true, props: props(prop{propSubscriptionID, varInt(5)})}), reason: "malformed"},
		{name: "MQTT 5 PUBLISH with a bad UTF-8 content type", login: 5, send: publishPacket(publishSpec{topic: topic,
			payload: []byte("{}"), v5: true, props: props(prop{propContentType, mqttStr("text/\xff")})}), reason: "malformed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var c *rawConn
			if tc.login != 0 {
				c = login(t, addr, evilID, tc.login == 5)
			} else {
				c = dialRaw(t, addr)
			}
			metric := tc.metric
			if metric == "" {
				metric = "edgegate_ingest_connections_closed_total"
			}
			before := e.gw.MustMetrics().Get(metric, "reason", tc.reason)
			start := time.Now()
			_ = c.send(tc.send) // the gateway may close before it read everything
			within := tc.within
			if within == 0 {
				within = closeWithin
			}
			got, err := c.closedWithin(within)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range got {
				switch {
				case p.typ == pktConnack && mustCode(t, p, tc.login == 5) != 0:
				case p.typ == pktDisconnect:
				case p.typ == pktConnack && tc.login == 0:
					t.Errorf("the gateway accepted the connection: %v", p)
				default:
					t.Errorf("unexpected answer before the close: %v", p)
				}
			}
			took := time.Since(start)
			e2e.WaitFor(t, 5*time.Second, metric+"{reason="+tc.reason+"} to grow", func() bool {
				return e.gw.MustMetrics().Get(metric, "reason", tc.reason) > before
			})
			t.Logf("closed after %s", took.Round(time.Millisecond))
		})
	}
	// The good device went on all along.
	e.good.waitAcked(t, 3, 10*time.Second)
	e.finish("malformed", nil)
}

// TestAbuseHugeRemainingLength declares a 200 MB packet: before CONNECT and after it. The gateway must refuse it
// from its fixed header (before reading or allocating its body) and close the connection, and its memory must not
// jump.
func TestAbuseHugeRemainingLength(t *testing.T) {
	e := startAbuse(t, nil)
	const huge = 200 << 20
	rss0, err := e2e.RSS(e.pid)
	if err != nil {
		t.Fatal(err)
	}
	filler := make([]byte, 64<<10)
	const conns = 4
	var worst time.Duration
	for i := range conns {
		var c *rawConn
		hdr := cat([]byte{pktConnect << 4}, varInt(huge))
		if i%2 == 1 {
			c = login(t, e.gw.MQTTAddr, evilID, false)
			hdr = cat([]byte{pktPublish << 4}, varInt(huge))
		} else {
			c = dialRaw(t, e.gw.MQTTAddr)
		}
		start := time.Now()
		_ = c.send(hdr)
		_ = c.send(filler) // a body starts arriving; the gateway must not wait for (or buffer) the rest
		if _, err := c.closedWithin(closeWithin); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		worst = max(worst, time.Since(start))
	}
	e.waitDelta(conns, "edgegate_ingest_connections_closed_total", "reason", "too_large")
	rss1, err := e2e.RSS(e.pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d connections declaring %d MB closed, slowest after %s; RSS %d MB -> %d MB", conns, huge>>20,
		worst.Round(time.Millisecond), rss0>>20, rss1>>20)
	if grow := rss1 - rss0; grow > 32<<20 {
		t.Errorf("RSS grew by %d MB after packets declaring %d MB (want < 32 MB)", grow>>20, huge>>20)
	}
	e.finish("huge-remaining-length", nil)
}

// TestAbuseIdleSockets opens 1,000 connections that never send CONNECT. The gateway must close every one of them
// within mqtt.connect_timeout (plus a margin) and release their file descriptors.
func TestAbuseIdleSockets(t *testing.T) {
	e := startAbuse(t, nil)
	const n = 1000
	fd0, err := e2e.OpenFDs(e.pid)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		open time.Duration // how long the gateway kept it open
		err  error
	}
	results := make(chan result, n)
	conns := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range conns {
			_ = c.Close()
		}
	})
	limit := abuseConnectTimeout + closeWithin
	for range n {
		c, err := net.DialTimeout("tcp", e.gw.MQTTAddr, 5*time.Second)
		if err != nil {
			t.Fatalf("dial idle socket %d: %v", len(conns), err)
		}
		conns = append(conns, c)
		start := time.Now()
		go func() {
			_ = c.SetReadDeadline(start.Add(limit))
			var b [1]byte
			_, err := c.Read(b[:])
			if err != nil && isTimeout(err) {
				results <- result{err: fmt.Errorf("still open after %s", limit)}
				return
			}
			results <- result{open: time.Since(start)}
		}()
	}
	var peak int
	if f, err := e2e.OpenFDs(e.pid); err == nil {
		peak = f
	}
	var worst time.Duration
	var failed []error
	for range n {
		r := <-results
		if r.err != nil {
			failed = append(failed, r.err)
			continue
		}
		worst = max(worst, r.open)
	}
	if len(failed) > 0 {
		t.Fatalf("%d of %d idle sockets were not closed by the gateway: %v", len(failed), n, failed[0])
	}
	var fd1 int
	e2e.WaitFor(t, 5*time.Second, "the gateway's file descriptors to come back down", func() bool {
		fd1, err = e2e.OpenFDs(e.pid)
		return err == nil && fd1 <= fd0+5
	})
	t.Logf("%d idle sockets: all closed by the gateway, the last after %s (connect_timeout %s); fds %d -> peak %d -> %d",
		n, worst.Round(time.Millisecond), abuseConnectTimeout, fd0, peak, fd1)
	if worst < abuseConnectTimeout-100*time.Millisecond {
		t.Errorf("an idle socket was closed after %s, before the connect timeout %s", worst, abuseConnectTimeout)
	}
	e.waitDelta(n, "edgegate_ingest_connections_closed_total", "reason", "timeout")
	e.finish("idle-sockets", nil)
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestAbuseOversizedPayload publishes a payload over ingest.max_payload_bytes (dead-lettered, the device stays
// connected) and a packet over mqtt.max_packet_bytes (the connection is closed).
func TestAbuseOversizedPayload(t *testing.T) {
	e := startAbuse(t, nil)
	c := login(t, e.gw.MQTTAddr, evilID, false)
	overPayload := []byte(`"` + strings.Repeat("x", abuseMaxPayload+100) + `"`)
	c.mustSend(publishPacket(publishSpec{topic: "devices/evil/events/big", payload: overPayload, qos: 1, packetID: 1}))
	if rc := awaitPuback(t, c, 1, false); rc != 0 {
		t.Fatalf("PUBACK code %#x", rc)
	}
	stillConnected(t, c)
	e.waitDelta(1, "edgegate_ingest_dead_letters_total", "reason", "too_large")
	dls, err := e.gw.DeadLetters()
	if err != nil {
		t.Fatal(err)
	}
	if !hasDeadLetter(dls, "too_large", evilID, "devices/evil/events/big", overPayload) {
		t.Errorf("no too_large dead letter with the original payload among %s", summarize(dls))
	}

	overPacket := make([]byte, abuseMaxPacket+1)
	start := time.Now()
	_ = c.send(publishPacket(publishSpec{topic: "devices/evil/events/bigger", payload: overPacket, qos: 1, packetID: 2}))
	got, err := c.closedWithin(closeWithin)
	if err != nil {
		t.Fatalf("a packet over mqtt.max_packet_bytes: %v", err)
	}
	for _, p := range got {
		if p.typ == pktPuback {
			t.Errorf("the packet over mqtt.max_packet_bytes was acknowledged: %v", p)
		}
	}
	t.Logf("a %d KB packet (limit %d KB): closed after %s", len(overPacket)>>10, abuseMaxPacket>>10, time.Since(start).Round(time.Millisecond))
	e.waitDelta(1, "edgegate_ingest_connections_closed_total", "reason", "too_large")
	e.finish("oversized", nil)
}

func hasDeadLetter(dls []e2e.DeadLetter, reason, device, topic string, payload []byte) bool {
	for _, d := range dls {
		if d.Reason == reason && d.DeviceID == device && d.Topic == topic && string(d.Payload) == string(payload) {
			return true
		}
	}
	return false
}

func summarize(dls []e2e.DeadLetter) string {
	var b strings.Builder
	for _, d := range dls {
		fmt.Fprintf(&b, "[%s %s %s %d bytes] ", d.Reason, d.DeviceID, d.Topic, len(d.Payload))
	}
	return b.String()
}

// TestAbuseInvalidJSON publishes invalid and deeply nested JSON where JSON is required: on a mapping with format
// json, and with the MQTT 5 content type application/json. Each is dead-lettered (not_json) with its original
// bytes, acknowledged, not forwarded; the device stays connected.
func TestAbuseInvalidJSON(t *testing.T) {
	e := startAbuse(t, nil)
	c := login(t, e.gw.MQTTAddr, evilID, true)
	jsonCT := props(prop{propContentType, mqttStr("application/json")})
	deepOpen := strings.Repeat("[", 100_000)
	deepValid := strings.Repeat("[", 20_000) + strings.Repeat("]", 20_000) // valid JSON, nested beyond the limit
	cases := []struct {
		topic   string
		payload string
		props   []byte
	}{
		{"devices/evil/json/broken", `{"temp": 21.5,`, nil},
		{"devices/evil/json/deep", deepOpen, nil},
		{"devices/evil/json/deep-closed", deepValid, nil},
		{"devices/evil/json/nul", "{\"a\":\"\x00\"}", nil},
		{"devices/evil/json/not-utf8", "{\"a\":\"\xff\"}", nil},
		{"devices/evil/events/declared", `not json at all`, jsonCT},
		{"devices/evil/events/declared-deep", deepOpen, jsonCT},
	}
	for i, tc := range cases {
		id := uint16(i + 1)
		c.mustSend(publishPacket(publishSpec{topic: tc.topic, payload: []byte(tc.payload), qos: 1, packetID: id, v5: true, props: tc.props}))
		if rc := awaitPuback(t, c, id, true); rc != 0 {
			t.Errorf("%s: PUBACK reason %#x, want 0 (kept as a dead letter)", tc.topic, rc)
		}
	}
	stillConnected(t, c)
	e.waitDelta(float64(len(cases)), "edgegate_ingest_dead_letters_total", "reason", "not_json")
	dls, err := e.gw.DeadLetters()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		if !hasDeadLetter(dls, "not_json", evilID, tc.topic, []byte(tc.payload)) {
			t.Errorf("%s: no not_json dead letter with the original payload among %s", tc.topic, summarize(dls))
		}
	}
	// The same device, same connection, still gets valid JSON through.
	c.mustSend(publishPacket(publishSpec{topic: "devices/evil/json/fine", payload: []byte(`{"ok":true}`), qos: 1, packetID: 99, v5: true}))
	if rc := awaitPuback(t, c, 99, true); rc != 0 {
		t.Fatalf("valid JSON after the bad: PUBACK reason %#x", rc)
	}
	evs := e.finish("invalid-json", func(ev e2e.TapEvent) bool { return ev.Subject == evilID && ev.Type == "fine" })
	if !slices.ContainsFunc(evs, func(ev e2e.TapEvent) bool { return ev.Subject == evilID && ev.Type == "fine" }) {
		t.Errorf("the valid event after the invalid ones was not forwarded")
	}
}

// observerView subscribes the observer device (granted "#") and records every topic the broker routes to it.
type observerView struct {
	cl     paho.Client
	mu     sync.Mutex
	topics []string
}

func watchAll(t *testing.T, url string) *observerView {
	t.Helper()
	o := &observerView{}
	opts := paho.NewClientOptions().AddBroker(url).SetClientID(observerID).SetUsername(observerID).
		SetPassword(observerID + "-pw").SetCleanSession(true).SetAutoReconnect(false).SetOrderMatters(true)
	o.cl = paho.NewClient(opts)
	if tok := o.cl.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("observer connect: %v", tok.Error())
	}
	t.Cleanup(func() { o.cl.Disconnect(0) })
	tok := o.cl.Subscribe("#", 1, func(_ paho.Client, m paho.Message) {
		o.mu.Lock()
		o.topics = append(o.topics, m.Topic())
		o.mu.Unlock()
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("observer subscribe: %v", tok.Error())
	}
	if st := tok.(*paho.SubscribeToken).Result()["#"]; st != 1 {
		t.Fatalf("observer subscribe to #: granted %#x, want 1", st)
	}
	return o
}

func (o *observerView) seen(topic string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Contains(o.topics, topic)
}

func (o *observerView) matching(pred func(string) bool) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []string
	for _, tp := range o.topics {
		if pred(tp) {
			out = append(out, tp)
		}
	}
	return out
}

// deniedFlood is how many publishes to another device's topic TestAbuseACL sends in one burst.
const deniedFlood = 3000

// TestAbuseACL has a device publish to another device's topics, subscribe to everything and to another device's
// commands, and leave a last will aimed at another device's topic. None of it may be routed, forwarded or
// delivered: an observer subscribed to "#" and the victim's own command subscription see nothing of it, while the
// same device's messages on its own topics (the control) do get through.
func TestAbuseACL(t *testing.T) {
	e := startAbuse(t, nil)
	e.victimLoggedIn = true
	obs := watchAll(t, e.gw.MQTTURL())
	var victimGot []string
	var vmu sync.Mutex
	victim := paho.NewClient(paho.NewClientOptions().AddBroker(e.gw.MQTTURL()).SetClientID(victimID).SetUsername(victimID).
		SetPassword(victimID + "-pw").SetCleanSession(true).SetAutoReconnect(false))
	if tok := victim.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("victim connect: %v", tok.Error())
	}
	t.Cleanup(func() { victim.Disconnect(0) })
	if tok := victim.Subscribe("devices/victim/commands/#", 1, func(_ paho.Client, m paho.Message) {
		vmu.Lock()
		victimGot = append(victimGot, m.Topic())
		vmu.Unlock()
	}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("victim subscribe: %v", tok.Error())
	}

	addr := e.gw.MQTTAddr
	forbidden := []string{"devices/victim/events/spoof", "devices/victim/commands/lights.on", "devices/victim",
		"devices/victimx/events/a", "edgegate/e2e/events/victim/spoof", "$SYS/broker/spoof", "zigbee2mqtt/victim/set"}

	// MQTT 3.1.1, QoS 0: dropped silently, the connection stays.
	c4 := login(t, addr, evilID, false)
	for _, tp := range forbidden {
		c4.mustSend(publishPacket(publishSpec{topic: tp, payload: []byte(`{"spoof":true}`)}))
	}
	c4.mustSend(publishPacket(publishSpec{topic: "devices/evil/events/control", payload: []byte(`{"own":true}`)}))
	stillConnected(t, c4)
	// A flood of denied publishes: each is counted, but they must not flood the log.
	var denials []byte
	for i := range deniedFlood {
		denials = append(denials, publishPacket(publishSpec{topic: fmt.Sprintf("devices/victim/events/f%d", i%10), payload: []byte(`{}`)})...)
	}
	c4.mustSend(denials)
	stillConnected(t, c4) // answered in order: every denial before it was handled
	// Subscriptions beyond its own commands: every filter refused (0x80) in the SUBACK.
	filters := []string{"#", "+/#", "$SYS/#", "devices/victim/commands/#", "devices/+/commands/#", "devices/#", "+/victim/#",
		"$share/g/devices/victim/commands/#"}
	c4.mustSend(subscribePacket(10, false, 0x2, filters...))
	sa := c4.expect(pktSuback, 5*time.Second)
	if codes := sa.reasonCodes(false); len(codes) != len(filters) || slices.ContainsFunc(codes, func(b byte) bool { return b != 0x80 }) {
		t.Errorf("SUBACK for %v: codes % x, want 0x80 for each", filters, codes)
	}
	// Its own commands: granted (the control).
	c4.mustSend(subscribePacket(11, false, 0x2, "devices/evil/commands/#"))
	if codes := c4.expect(pktSuback, 5*time.Second).reasonCodes(false); len(codes) != 1 || codes[0] != 1 {
		t.Errorf("SUBACK for its own commands: % x, want 01", codes)
	}
	// QoS 1 to another device's topic on MQTT 3.1.1: there is no refusal code, so the gateway disconnects.
	c4.mustSend(publishPacket(publishSpec{topic: "devices/victim/events/spoof-qos1", payload: []byte(`{}`), qos: 1, packetID: 5}))
	if got, err := c4.closedWithin(closeWithin); err != nil {
		t.Errorf("QoS 1 publish to another device's topic (MQTT 3.1.1): %v", err)
	} else if slices.ContainsFunc(got, func(p rawPacket) bool { return p.typ == pktPuback }) {
		t.Errorf("QoS 1 publish to another device's topic was acknowledged: %v", got)
	}

	// MQTT 5: refusals with reason codes, the connection stays.
	c5 := login(t, addr, evilID, true)
	c5.mustSend(publishPacket(publishSpec{topic: "devices/victim/events/spoof", payload: []byte(`{}`), qos: 1, packetID: 1, v5: true}))
	if rc := awaitPuback(t, c5, 1, true); rc != 0x87 {
		t.Errorf("MQTT 5 QoS 1 publish to another device's topic: PUBACK reason %#x, want 0x87 (not authorized)", rc)
	}
	c5.mustSend(subscribePacket(2, true, 0x2, filters...))
	if codes := c5.expect(pktSuback, 5*time.Second).reasonCodes(true); len(codes) != len(filters) || slices.ContainsFunc(codes, func(b byte) bool { return b != 0x87 }) {
		t.Errorf("MQTT 5 SUBACK for %v: % x, want 0x87 for each", filters, codes)
	}
	stillConnected(t, c5)

	// Last wills: one aimed at the victim's topic (refused at CONNECT), one at its own (the control). Both
	// sockets are then cut without DISCONNECT, which is when a will goes out.
	badWill := dialRaw(t, addr)
	if rc := badWill.connect(connectSpec{level: 4, clientID: evilID + ":w1", username: evilID, password: evilID + "-pw", clean: true,
		keepAlive: 30, will: &will{topic: "devices/victim/commands/lights.off", payload: []byte(`{"will":"spoof"}`), qos: 1}}); rc != 0 {
		t.Fatalf("CONNECT with a forbidden will: code %#x, want accepted (the will is dropped)", rc)
	}
	goodWill := dialRaw(t, addr)
	if rc := goodWill.connect(connectSpec{level: 4, clientID: evilID + ":w2", username: evilID, password: evilID + "-pw", clean: true,
		keepAlive: 30, will: &will{topic: "devices/evil/events/lastwill", payload: []byte(`{"will":"own"}`), qos: 1}}); rc != 0 {
		t.Fatalf("CONNECT with an allowed will: code %#x", rc)
	}
	e.waitDelta(1, "edgegate_ingest_acl_denied_total", "action", "will")
	_ = badWill.c.Close()
	_ = goodWill.c.Close()

	// The controls arrive; then nothing forbidden was routed.
	e2e.WaitFor(t, 5*time.Second, "the observer to get the allowed will and the control publish", func() bool {
		return obs.seen("devices/evil/events/lastwill") && obs.seen("devices/evil/events/control")
	})
	// The forbidden will would have gone out with the allowed one; give stragglers a moment all the same.
	e.good.waitAcked(t, 5, 10*time.Second)
	if leaked := obs.matching(func(tp string) bool {
		return !strings.HasPrefix(tp, "devices/"+goodID+"/") && !strings.HasPrefix(tp, "devices/"+evilID+"/")
	}); len(leaked) > 0 {
		t.Errorf("routed to the observer despite the ACL: %v", leaked)
	}
	vmu.Lock()
	if len(victimGot) > 0 {
		t.Errorf("the victim received commands from another device: %v", victimGot)
	}
	vmu.Unlock()
	m := e.gw.MustMetrics()
	denied := func(action string) float64 {
		return m.Get("edgegate_ingest_acl_denied_total", "action", action) - e.m0.Get("edgegate_ingest_acl_denied_total", "action", action)
	}
	t.Logf("acl denied: publish %v, subscribe %v, will %v", denied("publish"), denied("subscribe"), denied("will"))
	// The $SYS topic is dropped before the ACL is asked (MQTT 4.7.2), so it is not among the denials.
	if want := float64(len(forbidden) - 1 + 2 + deniedFlood); denied("publish") < want {
		t.Errorf("edgegate_ingest_acl_denied_total{action=publish} grew by %v, want >= %v", denied("publish"), want)
	}
	if want := float64(2 * len(filters)); denied("subscribe") < want {
		t.Errorf("edgegate_ingest_acl_denied_total{action=subscribe} grew by %v, want >= %v", denied("subscribe"), want)
	}
	if denied("will") != 1 {
		t.Errorf("edgegate_ingest_acl_denied_total{action=will} grew by %v, want 1", denied("will"))
	}
	logged := 0
	for line := range strings.Lines(e.gw.Output()) {
		if strings.Contains(line, "denied") && strings.Contains(line, "level=INFO") {
			logged++
		}
	}
	t.Logf("%v denials, %d of them logged at info", denied("publish")+denied("subscribe"), logged)
	if logged == 0 || logged > 10 {
		t.Errorf("%d denials logged at info for %v denied publishes and subscriptions on 3 connections; want the first ones only (1..10)",
			logged, denied("publish")+denied("subscribe"))
	}
	e.finish("acl", func(ev e2e.TapEvent) bool {
		return ev.Subject == evilID && (ev.Type == "control" || ev.Type == "lastwill")
	})
}

// TestAbuseAuth tries unknown devices, wrong passwords, a device's credentials with another device's client id and
// anonymous logins. Each is refused in the CONNACK, counted by reason and logged; none makes an event.
func TestAbuseAuth(t *testing.T) {
	e := startAbuse(t, nil)
	addr := e.gw.MQTTAddr
	cases := []struct {
		name   string
		spec   connectSpec
		reason string
	}{
		{"unknown device", connectSpec{level: 4, clientID: "ghost", username: "ghost", password: "ghost-pw"}, "bad_credentials"},
		{"wrong password", connectSpec{level: 4, clientID: evilID, username: evilID, password: "guess"}, "bad_credentials"},
		{"another device's password", connectSpec{level: 4, clientID: victimID, username: victimID, password: evilID + "-pw"}, "bad_credentials"},
		{"empty password", connectSpec{level: 4, clientID: victimID, username: victimID}, "bad_credentials"},
		{"MQTT 5 wrong password", connectSpec{level: 5, clientID: evilID, username: evilID, password: "guess"}, "bad_credentials"},
		{"own credentials, another device's client id", connectSpec{level: 4, clientID: victimID, username: evilID, password: evilID + "-pw"}, "client_id_mismatch"},
		{"own credentials, client id with another device's prefix", connectSpec{level: 4, clientID: victimID + ":x", username: evilID, password: evilID + "-pw"}, "client_id_mismatch"},
		{"anonymous", connectSpec{level: 4, clientID: victimID}, "anonymous"},
	}
	want := map[string]float64{}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.spec.clean, tc.spec.keepAlive = true, 30
			c := dialRaw(t, addr)
			c.mustSend(connectPacket(tc.spec))
			ack := c.expect(pktConnack, 5*time.Second)
			if rc := mustCode(t, ack, tc.spec.level == 5); rc == 0 {
				t.Fatalf("CONNACK accepted the login")
			}
			if _, err := c.closedWithin(closeWithin); err != nil {
				t.Fatal(err)
			}
		})
		want[tc.reason]++
	}
	// A burst of wrong passwords from many sockets at once, next to the good device.
	const burst = 200
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	refused := make(chan bool, burst)
	for i := range burst {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				refused <- false
				return
			}
			defer c.Close()
			conn := &rawConn{t: t, c: c, br: bufio.NewReader(c)}
			if conn.send(connectPacket(connectSpec{level: 4, clientID: evilID, username: evilID, password: fmt.Sprintf("guess-%d", i), clean: true})) != nil {
				refused <- false
				return
			}
			p, err := conn.read(5 * time.Second)
			code, ok := p.code(false)
			refused <- err == nil && p.typ == pktConnack && ok && code != 0
		})
	}
	wg.Wait()
	close(refused)
	for ok := range refused {
		if !ok {
			t.Errorf("a wrong password of the burst was not refused with a CONNACK")
			break
		}
	}
	want["bad_credentials"] += burst
	for reason, n := range want {
		e.waitDelta(n, "edgegate_ingest_auth_failures_total", "reason", reason)
	}
	logged := 0
	for line := range strings.Lines(e.gw.Output()) {
		if strings.Contains(line, `msg="connection refused"`) && strings.Contains(line, "reason=bad_credentials") {
			logged++
		}
	}
	if logged < int(want["bad_credentials"]) {
		t.Errorf("%d refusals for bad credentials logged, want %v", logged, want["bad_credentials"])
	}
	t.Logf("refused logins: %v (each logged)", want)
	e.finish("auth", nil)
}

// TestAbuseFlood has one device flood QoS 0 events far above its rate limit from several connections while the
// good device publishes QoS 1 events: the limiter holds the flood back (counted), the flood's accepted share
// stays within the rate, and the good device's latency stays low.
func TestAbuseFlood(t *testing.T) {
	// The limit is per device: the good device publishes below it.
	const rate, burst = 500, 500
	e := startAbuse(t, map[string]any{"mqtt.publish_rate": rate, "mqtt.publish_burst": burst})
	const (
		conns    = 4
		maxMsgs  = 20_000 // in all
		maxFlood = 3 * time.Second
		batch    = 500
	)
	var buf []byte
	for i := range batch {
		// 1 KB events: what the gateway's socket buffers hold when the flood stops is then read within a second.
		payload := fmt.Appendf(nil, `{"n":%03d,"pad":"%s"}`, i, strings.Repeat("x", 1000))
		buf = append(buf, publishPacket(publishSpec{topic: "devices/evil/events/flood", payload: payload})...)
	}
	pktLen := len(buf) / batch // every packet of the batch has the same length
	raws := make([]*rawConn, conns)
	for i := range conns {
		raws[i] = dialRaw(t, e.gw.MQTTAddr)
		if rc := raws[i].connect(connectSpec{level: 4, clientID: fmt.Sprintf("%s:flood%d", evilID, i), username: evilID,
			password: evilID + "-pw", clean: true, keepAlive: 30}); rc != 0 {
			t.Fatalf("flood login: %#x", rc)
		}
	}
	qos0 := func() float64 {
		return e.gw.MustMetrics().Get("edgegate_ingest_messages_total", "qos", "0") - e.m0.Get("edgegate_ingest_messages_total", "qos", "0")
	}
	floodStart := time.Now()
	deadline := floodStart.Add(maxFlood)
	var wg sync.WaitGroup
	var mu sync.Mutex
	written := 0
	for _, c := range raws {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				mu.Lock()
				if written+batch > maxMsgs {
					mu.Unlock()
					return
				}
				written += batch
				mu.Unlock()
				_ = c.c.SetWriteDeadline(deadline)
				if n, err := c.c.Write(buf); err != nil {
					// Back-pressure held the flood back: count only the whole packets written.
					mu.Lock()
					written -= batch - n/pktLen
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	// Until the deadline, let the gateway read what was written; then reset the flood connections, which
	// discards whatever it has not read.
	for time.Now().Before(deadline) && qos0() < float64(written) {
		time.Sleep(20 * time.Millisecond)
	}
	read := qos0()
	m := e.gw.MustMetrics()
	delayed := m.Get("edgegate_ingest_rate_limited_total", "outcome", "delayed") - e.m0.Get("edgegate_ingest_rate_limited_total", "outcome", "delayed")
	refused := m.Get("edgegate_ingest_rate_limited_total", "outcome", "refused") - e.m0.Get("edgegate_ingest_rate_limited_total", "outcome", "refused")
	floodTook := time.Since(floodStart)
	for _, c := range raws {
		if tc, ok := c.c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		_ = c.c.Close()
	}
	// Each connection is served in order, so the limiter holds the flood back (delayed) rather than refusing it:
	// a refusal needs more than a second's worth of publishes waiting at once.
	if delayed == 0 {
		t.Errorf("rate limit metric: delayed %v, refused %v; want delays", delayed, refused)
	}
	evs := e.finish("flood", func(ev e2e.TapEvent) bool { return ev.Subject == evilID && ev.Type == "flood" })
	flood := 0
	for _, ev := range evs {
		if ev.Subject == evilID && ev.Type == "flood" {
			flood++
		}
	}
	// The limiter lets through the burst, the rate over the time the flood was read, and reservations up to a
	// second ahead (held back, then accepted).
	bound := burst + int(rate*(time.Since(floodStart).Seconds()+1))
	t.Logf("flood: %d QoS 0 messages written from %d connections, %v read by the gateway in %s; rate limit delayed %v, refused %v; %d accepted and forwarded (bound %d)",
		written, conns, read, floodTook.Round(time.Millisecond), delayed, refused, flood, bound)
	if flood > bound {
		t.Errorf("%d flood events forwarded, more than the rate limit allows (%d)", flood, bound)
	}
	if flood > written/2 {
		t.Errorf("%d of the %d flood messages became events: the rate limit did not hold the flood back", flood, written)
	}
}

// TestAbuseSubscriptions has a device subscribe to thousands of distinct, long filters inside its own namespace
// (which the ACL allows). The broker keeps every filter for the session's life, so the gateway must refuse them
// beyond a per-client limit, and its memory must not grow with them.
func TestAbuseSubscriptions(t *testing.T) {
	e := startAbuse(t, nil)
	rss0, err := e2e.RSS(e.pid)
	if err != nil {
		t.Fatal(err)
	}
	c := login(t, e.gw.MQTTAddr, evilID, false)
	subscribe := func(n int, filter func(i int) string) (granted int) {
		t.Helper()
		for i := range n {
			c.mustSend(subscribePacket(uint16(i+1), false, 0x2, filter(i)))
		}
		for range n {
			for {
				p, err := c.read(10 * time.Second)
				if err != nil {
					t.Fatalf("waiting for SUBACKs: %v", err)
				}
				if p.typ != pktSuback {
					continue
				}
				if code := mustCode(t, p, false); code < 0x80 {
					granted++
				}
				break
			}
		}
		return granted
	}
	const small, long = 2000, 500
	start := time.Now()
	grantedSmall := subscribe(small, func(i int) string { return fmt.Sprintf("devices/evil/commands/c%05d", i) })
	grantedLong := subscribe(long, func(i int) string {
		return fmt.Sprintf("devices/evil/commands/l%05d/%s", i, strings.Repeat("x", 60_000))
	})
	took := time.Since(start)
	stillConnected(t, c)
	rss1, err := e2e.RSS(e.pid)
	if err != nil {
		t.Fatal(err)
	}
	limited := e.delta("edgegate_ingest_acl_denied_total", "action", "subscribe_limit")
	t.Logf("%d short and %d 60 KB filters in %s: %d and %d granted, %v refused by the limit; RSS %d MB -> %d MB",
		small, long, took.Round(time.Millisecond), grantedSmall, grantedLong, limited, rss0>>20, rss1>>20)
	if grantedSmall == 0 || grantedSmall >= small/2 {
		t.Errorf("%d of %d distinct filters granted, want a limit well below", grantedSmall, small)
	}
	if grantedLong != 0 {
		t.Errorf("%d long filters granted after %d short ones", grantedLong, grantedSmall)
	}
	if want := float64(small + long - grantedSmall - grantedLong); limited != want {
		t.Errorf("edgegate_ingest_acl_denied_total{action=subscribe_limit} grew by %v, want %v", limited, want)
	}
	if grow := rss1 - rss0; grow > 32<<20 {
		t.Errorf("RSS grew by %d MB with the subscriptions (want < 32 MB)", grow>>20)
	}
	e.finish("subscriptions", nil)
}

// TestAbuseSessions has a device open persistent sessions under ever new client ids ("evil:sN", clean session
// off), each with a subscription, and leave them. The broker keeps a stored session for up to mqtt.session_expiry,
// so the gateway must keep only the newest few per device, and its memory must not grow with the rest.
func TestAbuseSessions(t *testing.T) {
	e := startAbuse(t, nil)
	const sessions = 1000
	// ingest keeps 16 stored sessions per device; one more may escape a count while its disconnect is still
	// being processed when the next connection arrives.
	const kept, slack = 16, 1
	rss0, err := e2e.RSS(e.pid)
	if err != nil {
		t.Fatal(err)
	}
	persistent := func(i int) connectSpec {
		return connectSpec{level: 4, clientID: fmt.Sprintf("%s:s%d", evilID, i), username: evilID, password: evilID + "-pw", keepAlive: 30}
	}
	start := time.Now()
	for i := range sessions {
		c := dialRaw(t, e.gw.MQTTAddr)
		if rc := c.connect(persistent(i)); rc != 0 {
			t.Fatalf("session %d: CONNACK %#x", i, rc)
		}
		c.mustSend(subscribePacket(1, false, 0x2, "devices/evil/commands/#"))
		c.expect(pktSuback, 5*time.Second)
		c.mustSend([]byte{pktDisconnect << 4, 0})
		if _, err := c.closedWithin(closeWithin); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	e.waitDelta(sessions-kept-slack, "edgegate_ingest_sessions_dropped_total")
	rss1, err := e2e.RSS(e.pid)
	if err != nil {
		t.Fatal(err)
	}
	dropped := e.delta("edgegate_ingest_sessions_dropped_total")
	t.Logf("%d persistent sessions opened and left in %s: %v dropped; RSS %d MB -> %d MB", sessions, took.Round(time.Millisecond),
		dropped, rss0>>20, rss1>>20)
	if dropped < sessions-kept-slack || dropped > sessions-kept {
		t.Errorf("%v stored sessions dropped, want %d (all but the newest %d)", dropped, sessions-kept, kept)
	}
	if grow := rss1 - rss0; grow > 24<<20 {
		t.Errorf("RSS grew by %d MB with the sessions (want < 24 MB)", grow>>20)
	}
	// Persistence still works for the newest sessions; the oldest are gone.
	sessionPresent := func(i int) bool {
		c := dialRaw(t, e.gw.MQTTAddr)
		c.mustSend(connectPacket(persistent(i)))
		ack := c.expect(pktConnack, 5*time.Second)
		if mustCode(t, ack, false) != 0 {
			t.Fatalf("session %d: CONNACK % x", i, ack.body)
		}
		c.mustSend([]byte{pktDisconnect << 4, 0})
		return ack.body[0]&1 == 1
	}
	if !sessionPresent(sessions - 1) {
		t.Errorf("the newest stored session was not resumed")
	}
	if sessionPresent(0) {
		t.Errorf("the oldest stored session was resumed: it should have been dropped")
	}
	e.finish("sessions", nil)
}
