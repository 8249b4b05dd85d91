package ingest_test

import (
	"context"
	"errors"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/ingest"
)

// declare100MB is a fixed header declaring a remaining length of 100 MB, followed by a few body bytes.
func declare100MB(packetType byte) []byte {
	b := []byte{packetType << 4}
	for n := 100 << 20; ; {
		d := byte(n % 128)
		if n /= 128; n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			break
		}
	}
	return append(b, 0, 4, 'M', 'Q', 'T', 'T')
}

func TestOversizePacketRefusedFromItsHeader(t *testing.T) {
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.ConnectTimeout = 20 * time.Second }})
	cases := []struct {
		name    string
		connect bool
		typ     byte
	}{
		{"CONNECT", false, packets.Connect},
		{"PUBLISH after CONNECT", true, packets.Publish},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rc := dialRaw(t, tb.addr, 4)
			if c.connect {
				rc.mustConnect("sensor-1")
			}
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			start := time.Now()
			if err := rc.write(declare100MB(c.typ)); err != nil {
				t.Fatal(err)
			}
			rc.expectClosed(2 * time.Second) // well before connect_timeout and any keep-alive
			elapsed := time.Since(start)
			runtime.ReadMemStats(&after)
			const limit = 8 << 20
			if d := int64(after.HeapAlloc) - int64(before.HeapAlloc); d > limit {
				t.Errorf("heap grew by %d bytes while refusing the packet", d)
			}
			if d := after.TotalAlloc - before.TotalAlloc; d > limit {
				t.Errorf("%d bytes allocated while refusing the packet: the body was allocated", d)
			}
			t.Logf("closed after %s", elapsed)
		})
	}
	// The broker keeps serving.
	rc := dialRaw(t, tb.addr, 5)
	rc.mustConnect("sensor-2")
	if code := rc.publishAck("devices/sensor-2/events/still.up", []byte(`{}`)); code >= 0x80 {
		t.Fatalf("PUBACK 0x%02x", code)
	}
}

func TestConnectTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.ConnectTimeout = timeout }})
	cases := []struct {
		name string
		send []byte
	}{
		{"nothing sent", nil},
		{"half a CONNECT", []byte{0x10, 30, 0, 4, 'M', 'Q'}},
		{"fixed header only", []byte{0x10}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rc := dialRaw(t, tb.addr, 4)
			start := time.Now()
			if len(c.send) > 0 {
				if err := rc.write(c.send); err != nil {
					t.Fatal(err)
				}
			}
			rc.expectClosed(3 * time.Second)
			if d := time.Since(start); d < timeout-50*time.Millisecond {
				t.Errorf("closed after %s, before the %s connect timeout", d, timeout)
			}
		})
	}
	// A client that completes CONNECT in time keeps its connection past the connect timeout.
	rc := dialRaw(t, tb.addr, 5)
	rc.connect(connectOpts{user: "sensor-1", keepalive: 60})
	time.Sleep(2 * timeout) // let the connect deadline pass: the connection must outlive it
	if code := rc.publishAck("devices/sensor-1/events/late", []byte(`{}`)); code >= 0x80 {
		t.Fatalf("PUBACK 0x%02x", code)
	}
	waitFor(t, "refused connections released", func() bool { return tb.Clients() == 1 })
}

func TestConnectionCaps(t *testing.T) {
	t.Run("total", func(t *testing.T) {
		tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.MaxConnections = 3 }})
		var open []*rawConn
		for _, id := range []string{"sensor-1", "sensor-2", "light-1"} {
			rc := dialRaw(t, tb.addr, 5)
			rc.mustConnect(id)
			open = append(open, rc)
		}
		extra := dialRaw(t, tb.addr, 5)
		extra.expectClosed(waitTimeout)
		if got := tb.metric(t, "edgegate_ingest_connections_refused_total", "reason", "max_connections"); got != 1 {
			t.Errorf("refused{max_connections} = %v, want 1", got)
		}
		// A freed slot is available again.
		open[0].disconnect()
		waitFor(t, "a free slot", func() bool { return tb.Clients() == 2 })
		again := dialRaw(t, tb.addr, 5)
		again.mustConnect("sensor-1")
	})
	t.Run("per IP", func(t *testing.T) {
		tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.MaxConnectionsPerIP = 2 }})
		for _, id := range []string{"sensor-1", "sensor-2"} {
			dialRaw(t, tb.addr, 4).mustConnect(id)
		}
		dialRaw(t, tb.addr, 4).expectClosed(waitTimeout)
		if got := tb.metric(t, "edgegate_ingest_connections_refused_total", "reason", "max_connections_per_ip"); got != 1 {
			t.Errorf("refused{max_connections_per_ip} = %v, want 1", got)
		}
		// Another source address has its own allowance.
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: waitTimeout}
		c, err := d.Dial("tcp", tb.addr)
		if err != nil {
			t.Fatalf("no second loopback address (Linux routes all of 127/8): %v", err)
		}
		t.Cleanup(func() { _ = c.Close() })
		other := &rawConn{t: t, c: c, r: newReader(c), version: 4}
		other.mustConnect("light-1")
	})
	t.Run("per device", func(t *testing.T) {
		tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.MaxConnectionsPerDevice = 2 }})
		connect := func(clientID string) (*rawConn, byte) {
			rc := dialRaw(t, tb.addr, 5)
			return rc, rc.connect(connectOpts{user: "sensor-1", clientID: clientID})
		}
		first, code1 := connect("sensor-1")
		_, code2 := connect("sensor-1:b")
		if code1 != 0 || code2 != 0 {
			t.Fatalf("CONNACKs 0x%02x 0x%02x, want both accepted", code1, code2)
		}
		if _, code := connect("sensor-1:c"); code != packets.ErrBadUsernameOrPassword.Code {
			t.Fatalf("a third connection of the device: CONNACK 0x%02x, want 0x%02x", code, packets.ErrBadUsernameOrPassword.Code)
		}
		if got := tb.metric(t, "edgegate_ingest_auth_failures_total", "reason", "device_connection_limit"); got != 1 {
			t.Errorf("auth failures{device_connection_limit} = %v, want 1", got)
		}
		// Another device is not affected, and a takeover of one of the device's sessions replaces it.
		dialRaw(t, tb.addr, 5).mustConnect("sensor-2")
		if _, code := connect("sensor-1:b"); code != 0 {
			t.Fatalf("a takeover at the cap: CONNACK 0x%02x, want accepted", code)
		}
		// A connection that ends frees its place (once the broker has forgotten it).
		first.disconnect()
		waitFor(t, "a connection accepted below the cap again", func() bool {
			_, code := connect("sensor-1:c")
			return code == 0
		})
	})
}

func TestPublishRateLimit(t *testing.T) {
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) {
		c.PublishRate, c.PublishBurst = 0.1, 3 // one token every 10 s: nothing refills during the test
	}})
	noisy := dialRaw(t, tb.addr, 5)
	noisy.mustConnect("sensor-1")
	for i := range 3 {
		if code := noisy.publishAck("devices/sensor-1/events/tick", []byte(`{}`)); code >= 0x80 {
			t.Fatalf("publish %d within the burst: PUBACK 0x%02x", i, code)
		}
	}
	for i := range 5 {
		if code := noisy.publishAck("devices/sensor-1/events/tick", []byte(`{}`)); code != packets.ErrMessageRateTooHigh.Code {
			t.Fatalf("publish %d over the limit: PUBACK 0x%02x, want 0x96", i, code)
		}
	}
	// MQTT 3.1.1: no PUBACK for a refused publish; the device is not disconnected.
	noisy311 := dialRaw(t, tb.addr, 4)
	if code := noisy311.connect(connectOpts{user: "sensor-1", clientID: "sensor-1:second"}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code) // a second connection of sensor-1: it shares the device's bucket
	}
	if _, acked := noisy311.publishFenced("devices/sensor-1/events/tick", []byte(`{}`)); acked {
		t.Error("PUBACK for a publish over the rate limit")
	}
	if got := tb.metric(t, "edgegate_ingest_rate_limited_total", "outcome", "refused"); got != 6 {
		t.Errorf("rate limited{refused} = %v, want 6", got)
	}
	if n := tb.cons.count("tick", "sensor-1"); n != 3 {
		t.Errorf("%d events from the limited device, want 3", n)
	}
	// Another device is not affected.
	quiet := dialRaw(t, tb.addr, 5)
	quiet.mustConnect("sensor-2")
	for i := range 3 {
		if code := quiet.publishAck("devices/sensor-2/events/tick", []byte(`{}`)); code >= 0x80 {
			t.Fatalf("other device, publish %d: PUBACK 0x%02x", i, code)
		}
	}
	tb.cons.waitCount(t, "tick", "sensor-2", 3)
	if r := tb.cons.disconnectReasons("sensor-1"); len(r) != 0 {
		t.Errorf("limited device disconnected: %v", r)
	}
}

// TestPublishRateLimitOutlivesConnections: a device does not get a full bucket back by reconnecting.
func TestPublishRateLimitOutlivesConnections(t *testing.T) {
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) {
		c.PublishRate, c.PublishBurst = 0.1, 2 // one token every 10 s: nothing refills during the test
	}})
	accepted := 0
	for i := range 3 {
		c := dialRaw(t, tb.addr, 5)
		c.mustConnect("sensor-1")
		for range 2 {
			if code := c.publishAck("devices/sensor-1/events/tick", []byte(`{}`)); code < 0x80 {
				accepted++
			}
		}
		c.disconnect()
		waitFor(t, "the device's disconnection", func() bool { return len(tb.cons.disconnectReasons("sensor-1")) == i+1 })
	}
	if accepted != 2 {
		t.Fatalf("%d publishes accepted over three connections, want the burst of 2", accepted)
	}
}

// panicAuth panics when the device "boom" logs in.
type panicAuth struct{ *devices.Registry }

func (a panicAuth) Authenticate(id string, password []byte) bool {
	if id == "boom" {
		panic("test: authenticator failure")
	}
	return a.Registry.Authenticate(id, password)
}

func TestPanicContainedToOneConnection(t *testing.T) {
	tb := startBroker(t, brokerOpts{auth: func(r *devices.Registry) ingest.Authenticator { return panicAuth{r} }})
	steady := dialRaw(t, tb.addr, 5)
	steady.mustConnect("sensor-1")

	boom := dialRaw(t, tb.addr, 4)
	boom.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: "boom", UsernameFlag: true,
		Username: []byte("boom"), PasswordFlag: true, Password: []byte("x")}})
	boom.expectClosed(waitTimeout)
	waitFor(t, "the panic counted", func() bool { return tb.metric(t, "edgegate_ingest_panics_recovered_total") == 1 })

	// The process keeps serving: the existing connection and new ones.
	if code := steady.publishAck("devices/sensor-1/events/after.panic", []byte(`{}`)); code >= 0x80 {
		t.Fatalf("PUBACK 0x%02x", code)
	}
	cl := mustPaho(t, tb, "sensor-2")
	publish(t, cl, "devices/sensor-2/events/after.panic", 1, `{}`)
	tb.cons.waitCount(t, "after.panic", "sensor-2", 1)
	waitFor(t, "the panicked connection released", func() bool {
		return tb.Clients() == 2 && tb.metric(t, "edgegate_ingest_connections") == 2
	})
}

// panicConsumer panics on events of type "boom".
type panicConsumer struct{ *consumer }

func (p panicConsumer) Consume(ctx context.Context, r ingest.Result, durable bool) error {
	if r.Event.Type() == "boom" {
		panic("test: consumer failure")
	}
	return p.consumer.Consume(ctx, r, durable)
}

func TestPanicAfterConnectEndsTheSession(t *testing.T) {
	tb := startBroker(t, brokerOpts{consumer: func(c *consumer) ingest.Consumer { return panicConsumer{c} }})
	other := dialRaw(t, tb.addr, 5)
	other.mustConnect("sensor-2")

	rc := dialRaw(t, tb.addr, 5)
	rc.mustConnect("sensor-1")
	if codes := rc.subscribe("devices/sensor-1/commands/#"); codes[0] != 1 {
		t.Fatalf("SUBACK 0x%02x", codes[0])
	}
	rc.publish("devices/sensor-1/events/boom", 1, []byte(`{}`))
	rc.expectClosed(waitTimeout)
	waitFor(t, "the panic counted", func() bool { return tb.metric(t, "edgegate_ingest_panics_recovered_total") == 1 })
	// The device's session ended: it is no longer connected, its presence says so, commands fail fast.
	waitFor(t, "sensor-1 disconnected", func() bool { return !tb.Connected("sensor-1") })
	// Its presence event follows the end of the session.
	waitFor(t, "sensor-1's presence event", func() bool { return len(tb.cons.disconnectReasons("sensor-1")) > 0 })
	if r := tb.cons.disconnectReasons("sensor-1"); len(r) != 1 || r[0] != ingest.PresenceConnectionLost {
		t.Errorf("disconnect reasons %v, want [%s]", r, ingest.PresenceConnectionLost)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := tb.Command(ctx, "sensor-1", "ping", nil); !errors.Is(err, ingest.ErrNotConnected) {
		t.Errorf("command to the failed device: %v, want ErrNotConnected", err)
	}
	// Everything else keeps working, including the device itself when it reconnects.
	if code := other.publishAck("devices/sensor-2/events/fine", []byte(`{}`)); code >= 0x80 {
		t.Fatalf("PUBACK 0x%02x", code)
	}
	again := dialRaw(t, tb.addr, 5)
	again.mustConnect("sensor-1")
	if code := again.publishAck("devices/sensor-1/events/fine", []byte(`{}`)); code >= 0x80 {
		t.Fatalf("PUBACK 0x%02x", code)
	}
	waitFor(t, "connection count", func() bool { return tb.Clients() == 2 })
}

// Shutdown does not wait for connections that never sent CONNECT: they are closed at once.
func TestShutdownClosesConnectionsWithoutConnect(t *testing.T) {
	cfg := ingest.DefaultBrokerConfig()
	cfg.Listen = "127.0.0.1:0"
	cfg.ConnectTimeout = time.Minute
	b, stop := runBroker(t, cfg)
	var idle []net.Conn
	for range 5 {
		c, err := net.DialTimeout("tcp", b.Addr("tcp"), waitTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	waitFor(t, "5 open connections", func() bool { return b.Clients() >= 5 })
	start := time.Now()
	if err := stop(); err != nil {
		t.Fatalf("with idle connections open: %v", err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("stop took %s with idle connections (connect_timeout 1m)", took)
	}
	for _, c := range idle {
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("an idle connection is still open after the stop")
		}
	}
}
