package ingest_test

import (
	"fmt"
	"slices"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/ingest"
)

// An MQTT 5 will with a Will Delay Interval is published as soon as the connection is lost: local subscribers get
// it, it becomes an event like any message from the device, and the presence event says will_published — whether
// the session ends with the connection or outlives it.
func TestDelayedWillPublishedAtOnce(t *testing.T) {
	for _, expiry := range []uint32{0, 60} {
		t.Run(fmt.Sprintf("session_expiry_%d", expiry), func(t *testing.T) {
			tb := startBroker(t, brokerOpts{devices: []dev{
				{id: "sensor-1"},
				{id: "watcher", subscribe: []string{"devices/sensor-1/events/#"}},
			}})
			w := dialRaw(t, tb.addr, 5)
			w.mustConnect("watcher")
			if codes := w.subscribe("devices/sensor-1/events/#"); codes[0] != 1 {
				t.Fatalf("SUBACK %v", codes)
			}

			rc := dialRaw(t, tb.addr, 5)
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
				ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: "sensor-1",
				UsernameFlag: true, Username: []byte("sensor-1"), PasswordFlag: true, Password: []byte(password("sensor-1")),
				WillFlag: true, WillTopic: "devices/sensor-1/events/gone", WillPayload: []byte(`{"bye":1}`),
				WillProperties: packets.Properties{WillDelayInterval: 30}}}
			pk.Properties.SessionExpiryInterval = expiry
			pk.Properties.SessionExpiryIntervalFlag = expiry > 0
			rc.send(pk)
			if ack := rc.expect(packets.Connack); ack.ReasonCode != 0 {
				t.Fatalf("CONNACK 0x%02x", ack.ReasonCode)
			}
			tb.cons.waitCount(t, "device.connected", "sensor-1", 1)
			_ = rc.c.Close() // connection lost

			got := w.expect(packets.Publish)
			if got.TopicName != "devices/sensor-1/events/gone" || string(got.Payload) != `{"bye":1}` {
				t.Errorf("watcher got %q %s, want the will", got.TopicName, got.Payload)
			}
			tb.cons.waitCount(t, "gone", "sensor-1", 1)
			waitFor(t, "the presence event", func() bool { return len(tb.cons.disconnectReasons("sensor-1")) == 1 })
			if r := tb.cons.disconnectReasons("sensor-1"); !slices.Equal(r, []string{ingest.PresenceWillPublished}) {
				t.Errorf("disconnect reasons %v, want [%s]", r, ingest.PresenceWillPublished)
			}
			if dl := tb.dl.all(); len(dl) != 0 {
				t.Errorf("dead letters %v", dl)
			}
		})
	}
}
