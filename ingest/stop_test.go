package ingest_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edgegate/edgegate/ingest"
)

// TestStopDisconnectsDevices: when the broker stops, every connected device is told so and disconnected, on each
// listener: MQTT 5 gets DISCONNECT with reason 0x8B (server shutting down), MQTT 3.1.1 sees its connection close.
// The broker ends these sessions itself, not through mochi's Clients.GetByListener, which takes the clients' read
// lock twice: a device connecting or disconnecting between the two deadlocks the stop for good
// (mochi-mqtt/server#488).
func TestStopDisconnectsDevices(t *testing.T) {
	n, err := ingest.NewNormalizer("gw-test", ingest.NormalizeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	registry := newRegistry(t, defaultDevices)
	cfg := ingest.DefaultBrokerConfig()
	cfg.Listen = "127.0.0.1:0"
	b, err := ingest.NewBroker(cfg, ingest.Deps{Normalizer: n, Auth: registry, ACL: registry, Consumer: &consumer{},
		DeadLetters: &deadLetters{}}, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	v5 := dialRaw(t, b.Addr("tcp"), 5)
	v5.mustConnect("sensor-1")
	v3 := dialRaw(t, b.Addr("tcp"), 4)
	v3.mustConnect("light-1")

	cancel()
	pk, err := v5.read(5 * time.Second)
	if err != nil || pk.FixedHeader.Type != packets.Disconnect || pk.ReasonCode != packets.ErrServerShuttingDown.Code {
		t.Errorf("MQTT 5 device: got packet type %d reason 0x%02x, err %v; want DISCONNECT 0x%02x",
			pk.FixedHeader.Type, pk.ReasonCode, err, packets.ErrServerShuttingDown.Code)
	}
	v3.expectClosed(5 * time.Second)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("broker run: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the broker did not stop")
	}
}
