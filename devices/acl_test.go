package devices

import "testing"

func aclRegistry(t testing.TB) *Registry {
	t.Helper()
	r, err := NewRegistry([]Device{
		{ID: "a", CertCN: "a"},
		{ID: "ab", CertCN: "ab"},
		{ID: "bridge", CertCN: "bridge", Publish: []string{"zigbee2mqtt/#", "home/+/status"},
			Subscribe: []string{"zigbee2mqtt/bridge/request/#", "home/+/set"}},
		{ID: "monitor", CertCN: "monitor", Subscribe: []string{"$SYS/broker/#"}},
		{ID: "d.e-f_9", CertCN: "d.e-f_9"},
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestCanPublish(t *testing.T) {
	r := aclRegistry(t)
	tests := []struct {
		id, topic string
		want      bool
	}{
		{"a", "devices/a", true},
		{"a", "devices/a/events/room.entered", true},
		{"a", "devices/a/telemetry/temperature", true},
		{"a", "devices/a/", true},
		{"a", "devices/a/commands/x", true}, // its own tree
		{"a", "devices/ab/events/x", false}, // a prefix of another device's id
		{"ab", "devices/a/events/x", false},
		{"a", "devices/b/events/x", false}, // another device
		{"a", "devices", false},
		{"a", "devices/", false},
		{"a", "devices//a", false},
		{"a", "Devices/a", false},
		{"a", "x/devices/a", false},
		{"a", "devices/a/+", false}, // wildcards are not topics
		{"a", "devices/a/#", false},
		{"a", "devices/a/\x00", false},
		{"a", "", false},
		{"a", "zigbee2mqtt/lamp", false}, // someone else's grant
		{"bridge", "zigbee2mqtt", true},  // # covers the parent
		{"bridge", "zigbee2mqtt/lamp/set", true},
		{"bridge", "zigbee2mqtt2/lamp", false},
		{"bridge", "home/kitchen/status", true},
		{"bridge", "home/kitchen/status/x", false},
		{"bridge", "home//status", true}, // + matches an empty level
		{"bridge", "devices/bridge/events/x", true},
		{"bridge", "$SYS/broker", false},
		{"monitor", "$SYS/broker/load", false}, // subscribe grants do not allow publishing
		{"d.e-f_9", "devices/d.e-f_9/events/x", true},
		{"unknown", "devices/unknown/events/x", false},
		{"", "devices//events", false},
	}
	for _, tt := range tests {
		if got := r.CanPublish(tt.id, tt.topic); got != tt.want {
			t.Errorf("CanPublish(%q, %q) = %v, want %v", tt.id, tt.topic, got, tt.want)
		}
	}
}

func TestCanSubscribe(t *testing.T) {
	r := aclRegistry(t)
	tests := []struct {
		id, filter string
		want       bool
	}{
		{"a", "devices/a/commands/#", true},
		{"a", "devices/a/commands/+", true},
		{"a", "devices/a/commands/lights.on", true},
		{"a", "devices/a/commands", true},
		{"a", "devices/a/#", false}, // wider than the grant
		{"a", "devices/a/events/x", false},
		{"a", "devices/a", false},
		{"a", "devices/+/commands/#", false}, // every device's commands
		{"a", "devices/+/commands/x", false},
		{"a", "devices/ab/commands/#", false},
		{"ab", "devices/a/commands/#", false},
		{"a", "devices/b/commands/#", false},
		{"a", "#", false},
		{"a", "+/#", false},
		{"a", "+", false},
		{"a", "$SYS/#", false},
		{"a", "$SYS/broker/load", false},
		{"a", "devices/a/commands/#/x", false}, // malformed
		{"a", "devices/a/commands/x+", false},
		{"a", "", false},
		{"bridge", "zigbee2mqtt/bridge/request/#", true},
		{"bridge", "zigbee2mqtt/bridge/request/device/rename", true},
		{"bridge", "zigbee2mqtt/bridge/request", true},
		{"bridge", "zigbee2mqtt/bridge/#", false},
		{"bridge", "zigbee2mqtt/+/request/#", false},
		{"bridge", "home/kitchen/set", true},
		{"bridge", "home/+/set", true},
		{"bridge", "home/#", false},
		{"bridge", "home/kitchen/set/x", false},
		{"bridge", "devices/bridge/commands/#", true},
		{"monitor", "$SYS/broker/#", true},
		{"monitor", "$SYS/broker/load/+", true},
		{"monitor", "$SYS/#", false},
		{"monitor", "$SYS/other", false},
		{"monitor", "#", false},
		{"unknown", "devices/unknown/commands/#", false},
	}
	for _, tt := range tests {
		if got := r.CanSubscribe(tt.id, tt.filter); got != tt.want {
			t.Errorf("CanSubscribe(%q, %q) = %v, want %v", tt.id, tt.filter, got, tt.want)
		}
	}
}
