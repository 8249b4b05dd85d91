package gateway_test

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/internal/mqttraw"
)

// TestRefusedEventTriggersNothing: an event the log refuses (full, reject policy) neither changes the device's
// state nor reaches the rules, so a device that sends it again later does not set off its rule twice.
func TestRefusedEventTriggersNothing(t *testing.T) {
	t.Parallel()
	gw := startFullGateway(t, func(c *gateway.Config) {
		writeRules(t, c.Rules.Dir, "lights.yaml", shippedLightsRules(t, "1m"))
	})
	addr := gw.MQTTAddr("tcp")

	sensor := connectDevice(t, addr, "kitchen-motion")
	rejected := metricSum(t, gw.Reg, "edgegate_buffer_rejected_total", nil)
	publish(t, sensor, "devices/kitchen-motion/events/room.entered", 0, `{"room":"kitchen"}`)
	waitFor(t, 10*time.Second, "the event refused", func() bool {
		return metricSum(t, gw.Reg, "edgegate_buffer_rejected_total", nil) > rejected
	})
	if st, _ := gw.State().Get("kitchen-motion"); st["last_event"] == "room.entered" {
		t.Errorf("the refused event changed the state: %v", st)
	}
	if n := metricSum(t, gw.Reg, "edgegate_rules_evaluated_total", nil); n != 0 {
		t.Errorf("rules evaluated %v events; the refused event reached them", n)
	}
}

// TestFullLogRefusesMQTT5WithQuotaExceeded: with the real log full under the reject policy, an MQTT 5 device's
// QoS 1 publish gets PUBACK reason 0x97 (quota exceeded), so it keeps the event and retries later.
func TestFullLogRefusesMQTT5WithQuotaExceeded(t *testing.T) {
	t.Parallel()
	gw := startFullGateway(t, nil)
	addr := gw.MQTTAddr("tcp")

	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	send := func(pk packets.Packet) {
		t.Helper()
		pk.ProtocolVersion = 5
		b, err := mqttraw.Encode(pk)
		if err == nil {
			_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_, err = c.Write(b)
		}
		if err != nil {
			t.Fatalf("send packet type %d: %v", pk.FixedHeader.Type, err)
		}
	}
	expect := func(typ byte) packets.Packet {
		t.Helper()
		for {
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			var pk packets.Packet
			b, err := r.ReadByte()
			if err == nil {
				err = pk.FixedHeader.Decode(b)
			}
			var n int
			if err == nil {
				n, _, err = packets.DecodeLength(r)
			}
			body := make([]byte, n)
			if err == nil {
				_, err = io.ReadFull(r, body)
			}
			if err != nil {
				t.Fatalf("waiting for packet type %d: %v", typ, err)
			}
			if pk.FixedHeader.Type != typ {
				continue
			}
			pk.ProtocolVersion, pk.FixedHeader.Remaining = 5, n
			switch typ {
			case packets.Connack:
				err = pk.ConnackDecode(body)
			case packets.Puback:
				err = pk.PubackDecode(body)
			}
			if err != nil {
				t.Fatalf("decode packet type %d: %v", typ, err)
			}
			return pk
		}
	}
	send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "kitchen-motion",
		UsernameFlag: true, Username: []byte("kitchen-motion"), PasswordFlag: true, Password: []byte("kitchen-motion-pw")}})
	if ack := expect(packets.Connack); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK reason 0x%02x", ack.ReasonCode)
	}
	send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 7,
		// Larger than the events the log refused: a smaller one may still fit.
		TopicName: "devices/kitchen-motion/events/room.entered", Payload: []byte(`{"room":"kitchen","pad":"` + strings.Repeat("x", 1000) + `"}`)})
	if ack := expect(packets.Puback); ack.PacketID != 7 || ack.ReasonCode != packets.ErrQuotaExceeded.Code {
		t.Errorf("PUBACK id %d reason 0x%02x, want id 7 reason 0x%02x (quota exceeded)", ack.PacketID, ack.ReasonCode,
			packets.ErrQuotaExceeded.Code)
	}
}

// startFullGateway starts a gateway (changed by mutate, when not nil) whose log is full under the reject policy:
// 8 KiB, a sink whose upstream never answers (its cursor holds every event), filled by a device's telemetry.
func startFullGateway(t *testing.T, mutate func(*gateway.Config)) *testGateway {
	t.Helper()
	gw := startGateway(t, func(c *gateway.Config) {
		c.Buffer.MaxBytes = 8 << 10
		c.Buffer.WhenFull = buffer.WhenFullReject
		// Port 1: no test listens there. A port merely free now could be taken by the broker of a test running
		// alongside, which would then receive this gateway's events and let the log drain.
		c.Forward.Sinks = []forward.SinkConfig{{Name: "cloud", Type: forward.TypeMQTT,
			MQTT: &forward.MQTTConfig{URL: "tcp://127.0.0.1:1", ConnectTimeout: 100 * time.Millisecond}}}
		if mutate != nil {
			mutate(c)
		}
	})
	filler := connectDevice(t, gw.MQTTAddr("tcp"), "hall-motion")
	waitFor(t, 10*time.Second, "the log full", func() bool {
		publish(t, filler, "devices/hall-motion/telemetry", 0, `{"pad":"`+strings.Repeat("x", 200)+`"}`)
		return gw.Log().Stats().Full
	})
	return gw
}
