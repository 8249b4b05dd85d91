package ingest_test

import (
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/ingest"
)

// TestStopDisconnectsDevices: when the broker stops, every connected device is told so and disconnected, on each
// listener: MQTT 5 gets DISCONNECT with reason 0x8B (server shutting down), MQTT 3.1.1 sees its connection close.
// The broker ends these sessions itself, not through mochi's Clients.GetByListener, which takes the clients' read
// lock twice: a device connecting or disconnecting between the two deadlocks the stop for good
// (mochi-mqtt/server#488).
func TestStopDisconnectsDevices(t *testing.T) {
	cfg := ingest.DefaultBrokerConfig()
	cfg.Listen = "127.0.0.1:0"
	b, stop := runBroker(t, cfg)
	v5 := dialRaw(t, b.Addr("tcp"), 5)
	v5.mustConnect("sensor-1")
	v3 := dialRaw(t, b.Addr("tcp"), 4)
	v3.mustConnect("light-1")

	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	pk, err := v5.read(5 * time.Second)
	if err != nil || pk.FixedHeader.Type != packets.Disconnect || pk.ReasonCode != packets.ErrServerShuttingDown.Code {
		t.Errorf("MQTT 5 device: got packet type %d reason 0x%02x, err %v; want DISCONNECT 0x%02x",
			pk.FixedHeader.Type, pk.ReasonCode, err, packets.ErrServerShuttingDown.Code)
	}
	v3.expectClosed(5 * time.Second)
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
}
