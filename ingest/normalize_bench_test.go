package ingest

import (
	"testing"
	"time"
)

// BenchmarkNormalize measures one message to one event, including the CloudEvents JSON encoding.
// Run: go test -run '^$' -bench Normalize -benchmem ./ingest/
func BenchmarkNormalize(b *testing.B) {
	n, err := NewNormalizer("gw-1", NormalizeConfig{Presets: []string{PresetZigbee2MQTT, PresetTasmota}})
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now()
	cases := []struct {
		name string
		msg  Message
	}{
		{"event_json", Message{DeviceID: "hall-motion", Topic: "devices/hall-motion/events/room.entered",
			Payload: []byte(`{"room":"hall","time":"2024-05-01T12:00:00.123Z","level":3}`), QoS: 1, Received: now}},
		{"telemetry", Message{DeviceID: "t-17", Topic: "devices/t-17/telemetry/temperature",
			Payload: []byte(`21.5`), QoS: 0, Received: now}},
		{"cloudevent", Message{DeviceID: "hall-motion", Topic: "devices/hall-motion/events/room.entered",
			Payload: []byte(`{"specversion":"1.0","id":"e-1","source":"/hall","type":"room.entered",` +
				`"time":"2024-05-01T12:00:00Z","datacontenttype":"application/json","data":{"room":"hall"}}`), QoS: 1, Received: now}},
		{"preset_zigbee2mqtt", Message{DeviceID: "z2m", Topic: "zigbee2mqtt/kitchen_sensor",
			Payload: []byte(`{"battery":97,"humidity":41.2,"linkquality":120,"temperature":21.4,"voltage":3000}`), QoS: 1, Received: now}},
		{"preset_tasmota_text", Message{DeviceID: "plug-1", Topic: "tele/plug-1/LWT", Payload: []byte(`Online`), Received: now}},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(c.msg.Payload)))
			for b.Loop() {
				if _, err := n.Normalize(c.msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("presence", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			n.Presence("hall-motion", false, PresenceConnectionLost, now)
		}
	})
}

// TestNormalizeAllocs pins the allocations per event (the speed goal is in BenchmarkNormalize): the event and
// its attribute values (1), the id inside uuid.NewV7 (1), the JSON (1), and a rendered type when the template
// is not a single literal or placeholder (1).
func TestNormalizeAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector changes allocation counts")
	}
	n, err := NewNormalizer("gw-1", NormalizeConfig{Presets: []string{PresetZigbee2MQTT, PresetTasmota}})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		msg  Message
		max  float64
	}{
		{"event_json", Message{DeviceID: "d", Topic: "devices/d/events/room.entered",
			Payload: []byte(`{"room":"hall","time":"2024-05-01T12:00:00.123Z"}`), Received: received}, 3},
		{"telemetry_metric", Message{DeviceID: "d", Topic: "devices/d/telemetry/temp", Payload: []byte(`21.5`), Received: received}, 4},
		{"preset_text", Message{DeviceID: "p", Topic: "tele/p/LWT", Payload: []byte(`Online`), Received: received}, 3},
		{"binary", Message{DeviceID: "d", Topic: "devices/d/events/raw", Payload: []byte{0xff, 0}, Received: received}, 3},
	}
	for _, c := range cases {
		if _, err := n.Normalize(c.msg); err != nil { // warm the source cache
			t.Fatal(err)
		}
		got := testing.AllocsPerRun(200, func() {
			if _, err := n.Normalize(c.msg); err != nil {
				t.Fatal(err)
			}
		})
		if got > c.max {
			t.Errorf("%s: %v allocations per event, want at most %v", c.name, got, c.max)
		}
	}
}
