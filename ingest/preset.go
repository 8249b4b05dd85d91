package ingest

import "sort"

// Preset names accepted in NormalizeConfig.Presets. Each preset is a list of mappings for the default topic
// layout of one device ecosystem; PRESETS.md shows an example message and the event it becomes for each.
const (
	// PresetZigbee2MQTT maps zigbee2mqtt with its default base topic "zigbee2mqtt". {device} is the friendly
	// name (one topic level: friendly names containing '/' need a custom mapping):
	//
	//	zigbee2mqtt/bridge/#                → zigbee2mqtt.bridge.{rest}, about the publishing device
	//	                                      (e.g. zigbee2mqtt/bridge/state → zigbee2mqtt.bridge.state)
	//	zigbee2mqtt/{device}                → zigbee2mqtt.state
	//	zigbee2mqtt/{device}/availability   → zigbee2mqtt.availability
	//
	// Example: {"temperature":21.5,"humidity":40} on zigbee2mqtt/kitchen_sensor becomes a zigbee2mqtt.state
	// event with subject kitchen_sensor and that JSON as data.
	PresetZigbee2MQTT = "zigbee2mqtt"

	// PresetTasmota maps Tasmota with its default full topic "%prefix%/%topic%/". {device} is the Tasmota topic:
	//
	//	tele/{device}/SENSOR  → tasmota.sensor       tele/{device}/STATE  → tasmota.state
	//	tele/{device}/LWT     → tasmota.lwt (text)   stat/{device}/RESULT → tasmota.result
	//	stat/{device}/POWER   → tasmota.power (text)
	//	tele/{device}/{type}  → tasmota.tele.{type}  stat/{device}/{type} → tasmota.stat.{type} (the rest)
	//
	// Example: "Offline" on tele/plug-1/LWT becomes a tasmota.lwt event with subject plug-1 and text data.
	PresetTasmota = "tasmota"

	// PresetShelly maps Shelly gen2 devices with their default topic prefix (the device id, e.g.
	// shellyplus1-a8032ab12345):
	//
	//	{device}/events/rpc       → shelly.rpc
	//	{device}/online           → shelly.online (payload "true" or "false")
	//	{device}/status/{type}    → shelly.status.{type} (e.g. shelly.status.switch:0)
	//
	// Example: "false" on shellyplus1-a8032ab12345/online becomes a shelly.online event whose data is the JSON
	// value false.
	PresetShelly = "shelly"
)

var presets = map[string][]Mapping{
	PresetZigbee2MQTT: {
		{Name: "zigbee2mqtt.bridge", Topic: "zigbee2mqtt/bridge/#", Type: "zigbee2mqtt.bridge.{rest}"},
		{Name: "zigbee2mqtt.state", Topic: "zigbee2mqtt/{device}", Type: "zigbee2mqtt.state"},
		{Name: "zigbee2mqtt.availability", Topic: "zigbee2mqtt/{device}/availability", Type: "zigbee2mqtt.availability"},
	},
	PresetTasmota: {
		{Name: "tasmota.sensor", Topic: "tele/{device}/SENSOR", Type: "tasmota.sensor"},
		{Name: "tasmota.state", Topic: "tele/{device}/STATE", Type: "tasmota.state"},
		{Name: "tasmota.lwt", Topic: "tele/{device}/LWT", Type: "tasmota.lwt", Format: FormatText},
		{Name: "tasmota.result", Topic: "stat/{device}/RESULT", Type: "tasmota.result"},
		{Name: "tasmota.power", Topic: "stat/{device}/POWER", Type: "tasmota.power", Format: FormatText},
		{Name: "tasmota.tele", Topic: "tele/{device}/{type}", Type: "tasmota.tele.{type}"},
		{Name: "tasmota.stat", Topic: "stat/{device}/{type}", Type: "tasmota.stat.{type}"},
	},
	PresetShelly: {
		{Name: "shelly.rpc", Topic: "{device}/events/rpc", Type: "shelly.rpc"},
		{Name: "shelly.online", Topic: "{device}/online", Type: "shelly.online"},
		{Name: "shelly.status", Topic: "{device}/status/{type}", Type: "shelly.status.{type}"},
	},
}

// PresetNames returns the names of the known presets, sorted.
func PresetNames() []string {
	names := make([]string, 0, len(presets))
	for n := range presets {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// PresetMappings returns a copy of the mappings of the named preset, in the order they are tried, and whether
// the preset exists.
func PresetMappings(name string) ([]Mapping, bool) {
	ms, ok := presets[name]
	return append([]Mapping(nil), ms...), ok
}
