package ingest_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/ingest"
)

// fence sends PINGREQ and waits for its PINGRESP: the broker handles a connection's packets in order, so whatever
// the packets sent before made it do is done.
func (rc *rawConn) fence() {
	rc.t.Helper()
	rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
	rc.expect(packets.Pingresp)
}

// A command is acknowledged by the device's PUBACK for it and by nothing else. MQTT packet ids are per direction,
// so a device may publish with the packet id of a command in flight to it: the end of that publish's own flow
// (PUBACK from the broker, or PUBREL from the device) does not acknowledge the command, and the device's real
// PUBACK for the command still does.
func TestCommandAckedOnlyByDevicePuback(t *testing.T) {
	cases := []struct {
		name  string
		qos   byte
		async bool // the consumer is an AsyncConsumer: QoS 1 PUBACKs are written by the acker
	}{
		{"qos1 publish, blocking consumer", 1, false},
		{"qos1 publish, async consumer", 1, true},
		{"qos2 publish, blocking consumer", 2, false},
		{"qos2 publish, async consumer", 2, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var tb *testBroker
			var ac *asyncConsumer
			if c.async {
				tb, ac = startAsync(t, nil)
			} else {
				tb = startBroker(t, brokerOpts{})
			}
			rc := dialRaw(t, tb.addr, 4)
			rc.mustConnect("light-1")
			if codes := rc.subscribe("devices/light-1/commands/#"); codes[0] != 1 {
				t.Fatalf("SUBACK %v", codes)
			}
			wait, err := tb.SendCommand("light-1", "on", []byte("1"))
			if err != nil {
				t.Fatal(err)
			}
			result := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*waitTimeout)
				defer cancel()
				result <- wait(ctx)
			}()
			cmd := rc.expect(packets.Publish) // not acknowledged yet

			// The device publishes with the command's packet id and completes that publish's flow.
			rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: c.qos},
				TopicName: "devices/light-1/events/x", Payload: []byte(`{}`), PacketID: cmd.PacketID})
			if c.qos == 1 {
				if c.async {
					ac.waitQueued(t, 1)
					ac.finish(0, nil)
				}
				if ack := rc.expect(packets.Puback); ack.PacketID != cmd.PacketID {
					t.Fatalf("PUBACK for %d, want %d", ack.PacketID, cmd.PacketID)
				}
			} else {
				rc.expect(packets.Pubrec)
				pubrel := []byte{packets.Pubrel<<4 | 0x02, 2, byte(cmd.PacketID >> 8), byte(cmd.PacketID)}
				if err := rc.write(pubrel); err != nil {
					t.Fatal(err)
				}
				rc.expect(packets.Pubcomp)
			}
			rc.fence()
			select {
			case err := <-result:
				t.Fatalf("the command ended (%v) before the device acknowledged it", err)
			case <-time.After(200 * time.Millisecond):
			}

			// The device's PUBACK for the command.
			rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: cmd.PacketID})
			select {
			case err := <-result:
				if err != nil {
					t.Fatalf("the device acknowledged the command, yet: %v", err)
				}
			case <-time.After(2 * waitTimeout):
				t.Fatal("the command did not end")
			}
			if n := tb.cons.count("x", "light-1"); n != 1 {
				t.Errorf("%d events from the device's publish, want 1", n)
			}
		})
	}
}

// A PUBACK with the packet id of a command sent to another connection of the device does not acknowledge it.
func TestCommandAckFromOtherConnectionIgnored(t *testing.T) {
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.CommandTimeout = time.Second }})
	rc := dialRaw(t, tb.addr, 4)
	rc.mustConnect("light-1")
	rc.subscribe("devices/light-1/commands/#")
	other := dialRaw(t, tb.addr, 4)
	if code := other.connect(connectOpts{user: "light-1", clientID: "light-1:other"}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	wait, err := tb.SendCommand("light-1", "on", []byte("1"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := rc.expect(packets.Publish)
	other.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: cmd.PacketID})
	other.fence()
	ctx, cancel := context.WithTimeout(context.Background(), 2*waitTimeout)
	defer cancel()
	if err := wait(ctx); !errors.Is(err, ingest.ErrNotAcknowledged) {
		t.Errorf("wait: %v, want ErrNotAcknowledged", err)
	}
}

// TestCommandAckedBeforeTheWait: a command the device acknowledged is acknowledged, however late its wait starts
// (the rule engine's worker may be busy with other commands past command_timeout).
func TestCommandAckedBeforeTheWait(t *testing.T) {
	// command_timeout has always passed by the time a wait starts: its timer is due at once.
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.CommandTimeout = time.Nanosecond }})
	rc := dialRaw(t, tb.addr, 4)
	rc.mustConnect("light-1")
	if codes := rc.subscribe("devices/light-1/commands/#"); codes[0] != 1 {
		t.Fatalf("SUBACK %v", codes)
	}
	for i := range 20 {
		wait, err := tb.SendCommand("light-1", "on", []byte("1"))
		if err != nil {
			t.Fatal(err)
		}
		cmd := rc.expect(packets.Publish)
		rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: cmd.PacketID})
		rc.fence()
		if err := wait(context.Background()); err != nil {
			t.Fatalf("command %d, acknowledged before its wait: %v", i, err)
		}
	}
}

// TestCommandToUnsubscribedDevice: a command to a device that is connected but has not subscribed to its command
// topic (it has just connected) is not sent into the void, where it would wait command_timeout for an
// acknowledgement that cannot come: it fails at once with ErrNotSubscribed, which is also ErrNotConnected (the
// device cannot take it yet), and is sent once the device subscribes.
func TestCommandToUnsubscribedDevice(t *testing.T) {
	tb := startBroker(t, brokerOpts{})
	rc := dialRaw(t, tb.addr, 4)
	rc.mustConnect("light-1")
	_, err := tb.SendCommand("light-1", "on", []byte("1"))
	if !errors.Is(err, ingest.ErrNotSubscribed) || !errors.Is(err, ingest.ErrNotConnected) {
		t.Fatalf("command to a device with no subscription: %v, want ErrNotSubscribed (and ErrNotConnected)", err)
	}
	// A subscription that the command's topic does not match changes nothing.
	if codes := rc.subscribe("devices/light-1/commands/off"); codes[0] != 1 {
		t.Fatalf("SUBACK %v", codes)
	}
	if _, err := tb.SendCommand("light-1", "on", []byte("1")); !errors.Is(err, ingest.ErrNotSubscribed) {
		t.Fatalf("command to a device subscribed elsewhere: %v, want ErrNotSubscribed", err)
	}
	if n := tb.metric(t, "edgegate_ingest_commands_total", "outcome", "not_subscribed"); n != 2 {
		t.Errorf("not_subscribed commands counted: %v, want 2", n)
	}
	if codes := rc.subscribe("devices/light-1/commands/+"); codes[0] != 1 {
		t.Fatalf("SUBACK %v", codes)
	}
	wait, err := tb.SendCommand("light-1", "on", []byte("1"))
	if err != nil {
		t.Fatalf("command once the device subscribed: %v", err)
	}
	cmd := rc.expect(packets.Publish)
	if cmd.TopicName != "devices/light-1/commands/on" {
		t.Fatalf("the device got %s", cmd.TopicName)
	}
	rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: cmd.PacketID})
	ctx, cancel := context.WithTimeout(context.Background(), 2*waitTimeout)
	defer cancel()
	if err := wait(ctx); err != nil {
		t.Fatalf("acknowledged command: %v", err)
	}
}

// TestCommandAckedAfterTakeover: a command in flight when the device's connection is taken over by a new one (the
// same client id, the session kept) is sent again on the new connection by the broker, and the device's PUBACK
// there acknowledges it: it does not wait for command_timeout, to be retried and delivered twice.
func TestCommandAckedAfterTakeover(t *testing.T) {
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.CommandTimeout = 2 * waitTimeout }})
	old := dialRaw(t, tb.addr, 4)
	if code := old.connect(connectOpts{user: "light-1", keep: true}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	if codes := old.subscribe("devices/light-1/commands/#"); codes[0] != 1 {
		t.Fatalf("SUBACK %v", codes)
	}
	wait, err := tb.SendCommand("light-1", "on", []byte("1"))
	if err != nil {
		t.Fatal(err)
	}
	result := make(chan error, 1)
	go func() { result <- wait(context.Background()) }()
	cmd := old.expect(packets.Publish) // not acknowledged on this connection

	taker := dialRaw(t, tb.addr, 4)
	if code := taker.connect(connectOpts{user: "light-1", keep: true}); code != 0 {
		t.Fatalf("CONNACK 0x%02x on takeover", code)
	}
	again := taker.expect(packets.Publish)
	if again.PacketID != cmd.PacketID || !again.FixedHeader.Dup || string(again.Payload) != "1" {
		t.Fatalf("resent PUBLISH id %d dup %v payload %q, want id %d dup true payload 1", again.PacketID,
			again.FixedHeader.Dup, again.Payload, cmd.PacketID)
	}
	taker.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: again.PacketID})
	select {
	case err := <-result:
		if err != nil {
			t.Fatalf("acknowledged on the new connection, yet: %v", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("the command acknowledged on the new connection is still waiting")
	}
}
