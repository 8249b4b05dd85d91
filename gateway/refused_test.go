package gateway_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/internal/freeport"
)

// TestRefusedEventTriggersNothing: an event the log refuses (full, reject policy) neither changes the device's
// state nor reaches the rules, so a device that sends it again later does not set off its rule twice.
func TestRefusedEventTriggersNothing(t *testing.T) {
	t.Parallel()
	port, err := freeport.Get() // nothing listens there
	if err != nil {
		t.Fatal(err)
	}
	gw := startGateway(t, func(c *gateway.Config) {
		c.Buffer.MaxBytes = 8 << 10
		c.Buffer.WhenFull = buffer.WhenFullReject
		// A sink whose upstream never answers: its cursor holds every event, so the log fills up.
		c.Forward.Sinks = []forward.SinkConfig{{Name: "cloud", Type: forward.TypeMQTT,
			MQTT: &forward.MQTTConfig{URL: fmt.Sprintf("tcp://127.0.0.1:%d", port), ConnectTimeout: 100 * time.Millisecond}}}
		writeRules(t, c.Rules.Dir, "lights.yaml", shippedLightsRules(t, "1m"))
	})
	addr := gw.MQTTAddr("tcp")
	filler := connectDevice(t, addr, "hall-motion")
	waitFor(t, 10*time.Second, "the log full", func() bool {
		publish(t, filler, "devices/hall-motion/telemetry", 0, `{"pad":"`+strings.Repeat("x", 200)+`"}`)
		return gw.Log().Stats().Full
	})

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
