package ingest

import (
	"errors"
	"os"
	"strings"
	"testing"
)

func TestPresetsGolden(t *testing.T) {
	cases := []struct {
		name, preset string
		msg          Message
	}{
		{"zigbee2mqtt_state", PresetZigbee2MQTT, Message{DeviceID: "z2m", Topic: "zigbee2mqtt/kitchen_sensor",
			Payload: []byte(`{"battery":97,"humidity":41.2,"linkquality":120,"temperature":21.4}`)}},
		{"zigbee2mqtt_availability_text", PresetZigbee2MQTT, Message{DeviceID: "z2m", Topic: "zigbee2mqtt/kitchen_sensor/availability",
			Payload: []byte(`offline`)}},
		{"zigbee2mqtt_availability_json", PresetZigbee2MQTT, Message{DeviceID: "z2m", Topic: "zigbee2mqtt/kitchen_sensor/availability",
			Payload: []byte(`{"state":"online"}`)}},
		{"zigbee2mqtt_bridge_state", PresetZigbee2MQTT, Message{DeviceID: "z2m", Topic: "zigbee2mqtt/bridge/state",
			Payload: []byte(`{"state":"online"}`)}},
		{"zigbee2mqtt_bridge_response", PresetZigbee2MQTT, Message{DeviceID: "z2m", Topic: "zigbee2mqtt/bridge/response/device/rename",
			Payload: []byte(`{"data":{"from":"0x00158d0001","to":"kitchen_sensor"},"status":"ok"}`)}},
		{"tasmota_sensor", PresetTasmota, Message{DeviceID: "plug-1", Topic: "tele/plug-1/SENSOR",
			Payload: []byte(`{"Time":"2024-05-01T11:59:00","ENERGY":{"Power":42,"Voltage":230}}`)}},
		{"tasmota_state", PresetTasmota, Message{DeviceID: "plug-1", Topic: "tele/plug-1/STATE",
			Payload: []byte(`{"Time":"2024-05-01T11:59:00","Uptime":"0T01:00:00","POWER":"ON"}`)}},
		{"tasmota_lwt", PresetTasmota, Message{DeviceID: "plug-1", Topic: "tele/plug-1/LWT", Payload: []byte(`Offline`)}},
		{"tasmota_result", PresetTasmota, Message{DeviceID: "plug-1", Topic: "stat/plug-1/RESULT", Payload: []byte(`{"POWER":"OFF"}`)}},
		{"tasmota_power", PresetTasmota, Message{DeviceID: "plug-1", Topic: "stat/plug-1/POWER", Payload: []byte(`ON`)}},
		{"tasmota_other_tele", PresetTasmota, Message{DeviceID: "plug-1", Topic: "tele/plug-1/INFO1",
			Payload: []byte(`{"Info1":{"Module":"Sonoff Basic","Version":"13.4.0"}}`)}},
		{"tasmota_other_stat", PresetTasmota, Message{DeviceID: "plug-1", Topic: "stat/plug-1/STATUS",
			Payload: []byte(`{"Status":{"Module":1}}`)}},
		{"shelly_rpc", PresetShelly, Message{DeviceID: "shellyplus1-a8032ab12345", Topic: "shellyplus1-a8032ab12345/events/rpc",
			Payload: []byte(`{"src":"shellyplus1-a8032ab12345","dst":"shellyplus1-a8032ab12345/events","method":"NotifyStatus","params":{"ts":1714557540.12,"switch:0":{"id":0,"output":true}}}`)}},
		{"shelly_online", PresetShelly, Message{DeviceID: "shellyplus1-a8032ab12345", Topic: "shellyplus1-a8032ab12345/online",
			Payload: []byte(`false`)}},
		{"shelly_status", PresetShelly, Message{DeviceID: "shellyplus1-a8032ab12345", Topic: "shellyplus1-a8032ab12345/status/switch:0",
			Payload: []byte(`{"id":0,"source":"button","output":true,"apower":8.9}`)}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := testNormalizer(t, NormalizeConfig{Presets: []string{c.preset}})
			c.msg.Received = received
			r, err := n.Normalize(c.msg)
			if err != nil {
				t.Fatal(err)
			}
			checkResult(t, r)
			golden(t, "preset_"+c.name, goldenResult(t, r))
		})
	}
}

func TestPresetsDeadLetters(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{Presets: PresetNames(), DisableDefault: true})
	cases := []struct {
		name  string
		msg   Message
		want  string
		event string // the type when it is not a dead letter
	}{
		{"z2m set is a command, not an event", Message{DeviceID: "z2m", Topic: "zigbee2mqtt/lamp/set", Payload: []byte(`{"state":"ON"}`)}, ReasonUnknownTopic, ""},
		{"z2m bridge root", Message{DeviceID: "z2m", Topic: "zigbee2mqtt/bridge", Payload: []byte(`x`)}, "", "zigbee2mqtt.state"},
		{"tasmota lwt binary", Message{DeviceID: "p", Topic: "tele/p/LWT", Payload: []byte{0xff}}, ReasonNotText, ""},
		{"tasmota cmnd is a command", Message{DeviceID: "p", Topic: "cmnd/p/POWER", Payload: []byte(`ON`)}, ReasonUnknownTopic, ""},
		{"tasmota deeper topic", Message{DeviceID: "p", Topic: "tele/p/a/b", Payload: []byte(`1`)}, ReasonUnknownTopic, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := n.Normalize(c.msg)
			if c.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if r.Event.Type() != c.event {
					t.Errorf("type = %q, want %q", r.Event.Type(), c.event)
				}
				return
			}
			var dl *DeadLetterError
			if !errors.As(err, &dl) || dl.Reason != c.want {
				t.Fatalf("err = %v, want dead letter %s", err, c.want)
			}
		})
	}
}

func TestPresetsAreValidAndDocumented(t *testing.T) {
	doc, err := os.ReadFile("PRESETS.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range PresetNames() {
		ms, ok := PresetMappings(name)
		if !ok || len(ms) == 0 {
			t.Fatalf("preset %s has no mappings", name)
		}
		for i, m := range ms {
			if _, err := compileMapping("preset", m, "p."); err != nil {
				t.Errorf("preset %s mapping %d: %v", name, i, err)
			}
			if !strings.Contains(string(doc), "`"+m.Topic+"`") {
				t.Errorf("PRESETS.md does not show topic %s of preset %s", m.Topic, name)
			}
		}
		if !strings.Contains(string(doc), "## "+name) {
			t.Errorf("PRESETS.md has no section %q", "## "+name)
		}
	}
	if _, ok := PresetMappings("nope"); ok {
		t.Error("unknown preset found")
	}
	ms, _ := PresetMappings(PresetTasmota)
	ms[0].Topic = "changed"
	if again, _ := PresetMappings(PresetTasmota); again[0].Topic == "changed" {
		t.Error("PresetMappings returns the preset itself, not a copy")
	}
}

func TestMappingOrder(t *testing.T) {
	// Custom mappings come first, then presets in the order listed, then the defaults.
	n := testNormalizer(t, NormalizeConfig{
		Mappings: []Mapping{{Name: "mine", Topic: "tele/{device}/SENSOR", Type: "mine.sensor"}},
		Presets:  []string{PresetShelly, PresetTasmota},
	})
	cases := []struct{ topic, want string }{
		{"tele/p/SENSOR", "mine.sensor"},
		{"tele/p/STATE", "tasmota.state"},
		{"tele/online", "shelly.online"}, // shelly is listed before tasmota
		{"devices/d/events/x", "x"},
	}
	for _, c := range cases {
		r, err := n.Normalize(Message{DeviceID: "p", Topic: c.topic, Payload: []byte(`1`)})
		if err != nil {
			t.Fatalf("%s: %v", c.topic, err)
		}
		if r.Event.Type() != c.want {
			t.Errorf("%s: type %q, want %q", c.topic, r.Event.Type(), c.want)
		}
	}
}
