package ingest_test

import (
	"bufio"
	"errors"
	"io"
	"math"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/ingest"
)

// connectHeader is the fixed header of a CONNECT announcing a body of n bytes, without the body.
func connectHeader(n int) []byte {
	b := []byte{0x10}
	for {
		d := byte(n % 128)
		if n /= 128; n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

// TestAnnouncedConnectCostsOnlyWhatArrives: a client that announces a CONNECT just under mqtt.max_packet_bytes and
// sends nothing more must not make the broker hold the announced size for it. Otherwise a few bytes per socket,
// without any credentials, hold max_packet_bytes each for connect_timeout: 1000 sockets from one address are
// 256 MiB with the defaults, ten addresses exhaust a small gateway.
func TestAnnouncedConnectCostsOnlyWhatArrives(t *testing.T) {
	const (
		conns     = 200
		announced = 256<<10 - 16 // under the default mqtt.max_packet_bytes
	)
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.ConnectTimeout = 30 * time.Second }})
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range conns {
		rc := dialRaw(t, tb.addr, 4)
		if err := rc.write(connectHeader(announced)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "every connection served", func() bool { return tb.metric(t, "edgegate_ingest_connections") == conns })
	// Without the bound the announced bodies are allocated as soon as their headers are read: watch for a while.
	const limit = 16 << 20 // the announced bodies add up to 50 MiB
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		var now runtime.MemStats
		runtime.ReadMemStats(&now)
		if grew := int64(now.HeapAlloc) - int64(before.HeapAlloc); grew > limit {
			t.Fatalf("heap grew by %d MiB for %d connections that sent 4 bytes each", grew>>20, conns)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// A CONNECT whose body does arrive, in pieces, is still served.
	rc := dialRaw(t, tb.addr, 4)
	if code := rc.connect(connectOpts{user: "sensor-1"}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
}

// TestConnectArrivingInPiecesIsServed: the CONNECT may come in any number of writes, and what follows it on the
// same write (a PUBLISH pipelined behind it) is read as the next packet.
func TestConnectArrivingInPiecesIsServed(t *testing.T) {
	tb := startBroker(t, brokerOpts{})
	for _, piece := range []int{1, 3, 1000} {
		rc := dialRaw(t, tb.addr, 4)
		connect := encode(t, packets.Packet{ProtocolVersion: 4, FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: "sensor-1",
				UsernameFlag: true, Username: []byte("sensor-1"), PasswordFlag: true, Password: []byte(password("sensor-1"))}})
		pub := encode(t, packets.Packet{ProtocolVersion: 4, FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName: "devices/sensor-1/events/pieces", PacketID: 7, Payload: []byte(`{}`)})
		all := append(append([]byte{}, connect...), pub...)
		for i := 0; i < len(all); i += piece {
			if err := rc.write(all[i:min(i+piece, len(all))]); err != nil {
				t.Fatal(err)
			}
		}
		rc.expect(packets.Connack)
		if ack := rc.expect(packets.Puback); ack.PacketID != 7 {
			t.Fatalf("piece %d: PUBACK for %d", piece, ack.PacketID)
		}
		rc.disconnect()
	}
	tb.cons.waitCount(t, "pieces", "sensor-1", 3)
}

// TestWebSocketIdleHTTPConnectionClosed: a client of the WebSocket listener that never upgrades (a plain HTTP
// request, or nothing after its first) is closed within connect_timeout, like a TCP client without CONNECT.
func TestWebSocketIdleHTTPConnectionClosed(t *testing.T) {
	const timeout = 300 * time.Millisecond
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) {
		c.WebSocket = "127.0.0.1:0"
		c.ConnectTimeout = timeout
	}})
	c, err := net.DialTimeout("tcp", tb.Addr("ws"), waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET /mqtt HTTP/1.1\r\nHost: gw\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(waitTimeout))
	r := bufio.NewReader(c)
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatalf("no answer to a request without upgrade: %v", err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	// The connection is idle now: it must be closed, not kept for a next request for ever.
	start := time.Now()
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err = io.Copy(io.Discard, r)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("idle HTTP connection still open %s after its request (connect_timeout %s)", time.Since(start), timeout)
	}
}

// TestWebSocketConnectionsCountAgainstCaps: sockets on the WebSocket listener count against mqtt.max_connections
// (and per IP) from their accept, as on the TCP listener: otherwise sockets that never upgrade are not capped at all.
func TestWebSocketConnectionsCountAgainstCaps(t *testing.T) {
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) {
		c.WebSocket = "127.0.0.1:0"
		c.MaxConnections = 2
		c.ConnectTimeout = 30 * time.Second
	}})
	var held []net.Conn
	for range 2 {
		c, err := net.DialTimeout("tcp", tb.Addr("ws"), waitTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	waitFor(t, "the sockets counted", func() bool { return tb.Clients() == 2 })
	extra, err := net.DialTimeout("tcp", tb.Addr("ws"), waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	_, _ = io.WriteString(extra, "GET /mqtt HTTP/1.1\r\nHost: gw\r\n\r\n")
	_ = extra.SetReadDeadline(time.Now().Add(waitTimeout))
	_, err = io.Copy(io.Discard, extra)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("a socket over mqtt.max_connections is kept open on the WebSocket listener")
	}
	if got := tb.metric(t, "edgegate_ingest_connections_refused_total", "reason", "max_connections"); got != 1 {
		t.Errorf("refused{max_connections} = %v, want 1", got)
	}
	// Freed sockets are released, and a WebSocket device connects.
	for _, c := range held {
		_ = c.Close()
	}
	waitFor(t, "the sockets released", func() bool { return tb.Clients() == 0 })
	if _, err := pahoConnect(t, "ws://"+tb.Addr("ws")+"/mqtt", pahoOpts{user: "sensor-1", pass: "sensor-1-pw"}); err != nil {
		t.Fatalf("websocket device after the release: %v", err)
	}
	waitFor(t, "one connection", func() bool { return tb.Clients() == 1 })
}

// TestPublishRateMustBeFinite: a rate that is not a number, or infinite, is refused with its key.
func TestPublishRateMustBeFinite(t *testing.T) {
	for _, v := range []string{"nan", "+inf", "-inf"} {
		cfg := ingest.DefaultBrokerConfig()
		switch v {
		case "nan":
			cfg.PublishRate = math.NaN()
		case "+inf":
			cfg.PublishRate = math.Inf(1)
		case "-inf":
			cfg.PublishRate = math.Inf(-1)
		}
		err := cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), "mqtt.publish_rate") {
			t.Errorf("publish_rate %s: Validate() = %v, want an error naming mqtt.publish_rate", v, err)
		}
	}
}
