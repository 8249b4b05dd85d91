package gateway_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/gateway"
)

// shippedLightsRules returns configs/rules.d/lights.yaml with only the absence period shortened to absence.
func shippedLightsRules(t *testing.T, absence string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "configs", "rules.d", "lights.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	const within = "within: 5m"
	if n := strings.Count(string(b), within); n != 1 {
		t.Fatalf("lights.yaml has %d %q, want exactly 1 (the absence period this test shortens)", n, within)
	}
	return strings.Replace(string(b), within, "within: "+absence, 1)
}

// TestReferenceScenario runs the shipped lights rules through the whole gateway: motion in the kitchen turns on
// both kitchen lights (and nothing else), a repeat inside the debounce window sends nothing new, and once the
// kitchen has been quiet for the absence period both kitchen lights are turned off.
func TestReferenceScenario(t *testing.T) {
	t.Parallel()
	// The repeat must reach the rules before the absence counted from the first motion ends, or that absence
	// turns the lights off first: the period leaves room for a slow first command and the pause before the repeat.
	const absence = 5 * time.Second
	gw := startGateway(t, func(c *gateway.Config) {
		writeRules(t, c.Rules.Dir, "lights.yaml", shippedLightsRules(t, absence.String()))
	})
	addr := gw.MQTTAddr("tcp")

	lights := map[string]*inbox{}
	for _, id := range []string{"kitchen-light-1", "kitchen-light-2", "hall-light"} {
		c := connectDevice(t, addr, id)
		lights[id] = subscribe(t, c, "devices/"+id+"/commands/#")
	}
	sensor := connectDevice(t, addr, "kitchen-motion")

	first := time.Now()
	publish(t, sensor, "devices/kitchen-motion/events/room.entered", 1, `{"room":"kitchen"}`)
	for _, id := range []string{"kitchen-light-1", "kitchen-light-2"} {
		lights[id].waitLen(t, 1, 10*time.Second)
	}

	// A repeat well inside the 30s debounce: no new lights.on, but it re-arms the absence timer.
	time.Sleep(300 * time.Millisecond) // spaces the two events apart so the re-armed deadline is distinguishable
	repeat := time.Now()
	publish(t, sensor, "devices/kitchen-motion/events/room.entered", 1, `{"room":"kitchen"}`)

	for _, id := range []string{"kitchen-light-1", "kitchen-light-2"} {
		msgs := lights[id].waitLen(t, 2, absence+10*time.Second)
		if len(msgs) != 2 {
			t.Fatalf("%s received %d messages, want lights.on then lights.off: %+v", id, len(msgs), msgs)
		}
		on, off := msgs[0], msgs[1]
		if want := "devices/" + id + "/commands/lights.on"; on.Topic != want {
			t.Errorf("%s: first command on %s, want %s", id, on.Topic, want)
		}
		if want := "devices/" + id + "/commands/lights.off"; off.Topic != want {
			t.Errorf("%s: second command on %s, want %s (a repeat inside the debounce window must send nothing)", id, off.Topic, want)
		}
		if lat := on.At.Sub(first); lat > 2*time.Second {
			t.Errorf("%s: lights.on arrived %s after the motion, want well under a second", id, lat)
		}
		// The absence is counted from the last room.entered: the repeat must have re-armed it.
		if quiet := off.At.Sub(repeat); quiet < absence {
			t.Errorf("%s: lights.off came %s after the last motion, want >= %s (the repeat re-arms the absence)", id, quiet, absence)
		}
		var onBody, offBody struct {
			On    bool   `json:"on"`
			Cause string `json:"cause"`
		}
		if err := json.Unmarshal(on.Payload, &onBody); err != nil || !onBody.On {
			t.Errorf("%s: lights.on payload %s, want {\"on\":true,...} (%v)", id, on.Payload, err)
		}
		if err := json.Unmarshal(off.Payload, &offBody); err != nil || offBody.On {
			t.Errorf("%s: lights.off payload %s, want {\"on\":false,...} (%v)", id, off.Payload, err)
		}
		// The cause is the id of the CloudEvent in the log: the first motion for lights.on, the last for lights.off.
		entered := eventsOfType(logEvents(t, gw.Log()), "room.entered")
		if len(entered) != 2 {
			t.Fatalf("log holds %d room.entered events, want 2", len(entered))
		}
		if onBody.Cause != entered[0].ID {
			t.Errorf("%s: lights.on cause %q, want the first room.entered event %q", id, onBody.Cause, entered[0].ID)
		}
		if offBody.Cause != entered[1].ID {
			t.Errorf("%s: lights.off cause %q, want the last room.entered event %q", id, offBody.Cause, entered[1].ID)
		}
	}
	// Both kitchen lights got lights.off, which comes after every evaluation above: the hall light, connected and
	// subscribed all along, must have received nothing.
	if msgs := lights["hall-light"].all(); len(msgs) != 0 {
		t.Errorf("hall-light received %d commands, want none: %+v", len(msgs), msgs)
	}
	acked := func() float64 {
		return metricSum(t, gw.Reg, "edgegate_ingest_commands_total", map[string]string{"outcome": "acked"})
	}
	waitFor(t, 5*time.Second, "4 acknowledged commands", func() bool { return acked() >= 4 })
	if got := acked(); got != 4 {
		t.Errorf("edgegate_ingest_commands_total{outcome=acked} = %g, want 4 (2 lights × on, off)", got)
	}
}

// stateRules arm and disarm a device by events; a door opening while its device is armed sends an alarm. The
// condition reads the state view, so it depends on the view coming back after a restart.
const stateRules = `
rules:
  - name: arm
    on: mode.armed
    actions:
      - state: {key: armed, value: true}
  - name: disarm
    on: mode.disarmed
    actions:
      - state: {key: armed, value: false}
  - name: alarm
    on: door.opened
    when: 'state.armed == true'
    actions:
      - command: {device: hall-light, command: alarm, payload: '{"door":"{{ event.subject }}"}'}
`

// TestDeviceStateSurvivesRestart: the device state view — what a device reported, its last_seen and the keys rules
// set — is saved at stop and loaded at start, with online false until the device connects again, so that a rule
// condition on it holds across the restart.
func TestDeviceStateSurvivesRestart(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	writeRules(t, cfg.Rules.Dir, "state.yaml", stateRules)
	gw := runGateway(t, cfg)
	addr := gw.MQTTAddr("tcp")
	door := connectDevice(t, addr, "thermo-1")
	publish(t, door, "devices/thermo-1/telemetry", 1, `{"celsius":19.5}`)
	publish(t, door, "devices/thermo-1/events/mode.armed", 1, `{}`)
	waitFor(t, 10*time.Second, "thermo-1 armed", func() bool {
		st, _ := gw.State().Get("thermo-1")
		return st["armed"] == true
	})
	door.Disconnect(100)
	gw.stop()
	before, _ := gw.State().Get("thermo-1") // as saved at the stop
	if _, err := os.Stat(filepath.Join(cfg.DataDir, "device-state.json")); err != nil {
		t.Fatalf("no device state saved at stop: %v", err)
	}

	gw = runGateway(t, cfg)
	after, ok := gw.State().Get("thermo-1")
	if !ok {
		t.Fatal("no state for thermo-1 after the restart")
	}
	for _, k := range []string{"armed", "last_seen", "reported"} {
		if !equalJSON(t, after[k], before[k]) {
			t.Errorf("%s after the restart = %v, before %v", k, after[k], before[k])
		}
	}
	if after["online"] != false {
		t.Errorf("online after the restart = %v, want false", after["online"])
	}

	// The condition holds on the loaded state: the door opening sends the alarm.
	addr = gw.MQTTAddr("tcp")
	light := subscribe(t, connectDevice(t, addr, "hall-light"), "devices/hall-light/commands/#")
	door = connectDevice(t, addr, "thermo-1")
	publish(t, door, "devices/thermo-1/events/door.opened", 1, `{}`)
	if m := light.waitLen(t, 1, 10*time.Second); !strings.HasSuffix(m[0].Topic, "/alarm") {
		t.Fatalf("hall-light received %s, want the alarm", m[0].Topic)
	}
}

// TestDeviceStateBadFileMovedAside: a state file that does not load is moved aside, named in the log, and the
// gateway starts with an empty view.
func TestDeviceStateBadFileMovedAside(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	path := filepath.Join(cfg.DataDir, "device-state.json")
	if err := os.WriteFile(path, []byte(`{"version":1,"devices":{"thermo-1":`), 0o600); err != nil {
		t.Fatal(err)
	}
	gw := runGateway(t, cfg)
	if st := gw.State().Stats(); st.Devices != 0 {
		t.Errorf("%d devices in the view, want 0", st.Devices)
	}
	moved, _ := filepath.Glob(path + ".bad-*")
	if len(moved) != 1 {
		t.Fatalf("moved-aside files %v, want one", moved)
	}
	if data, err := os.ReadFile(moved[0]); err != nil || !strings.Contains(string(data), "thermo-1") {
		t.Errorf("the moved-aside file holds %q (%v), want the bad file's bytes", data, err)
	}
}

// equalJSON reports whether two values encode to the same JSON.
func equalJSON(t *testing.T, a, b any) bool {
	t.Helper()
	ja, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	jb, err := json.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	return string(ja) == string(jb)
}

// TestDeviceStateSavedWhileRunning: the device state view is saved every devices.state_save_interval while it
// changes, not only at stop, so that a crash loses at most that much of it.
func TestDeviceStateSavedWhileRunning(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	cfg.Devices.StateSaveInterval = 20 * time.Millisecond
	gw := runGateway(t, cfg)
	thermo := connectDevice(t, gw.MQTTAddr("tcp"), "thermo-1")
	path := filepath.Join(cfg.DataDir, "device-state.json")
	for _, celsius := range []string{"19.5", "20.5"} {
		publish(t, thermo, "devices/thermo-1/telemetry", 1, `{"celsius":`+celsius+`}`)
		waitFor(t, 10*time.Second, "celsius "+celsius+" in the saved state", func() bool {
			data, err := os.ReadFile(path)
			return err == nil && strings.Contains(string(data), `"celsius":`+celsius)
		})
	}
}

// TestRuleCommandWaitsForLight: right after a start, a rule's command for a light that is not connected yet
// (devices come back one by one, while absences that fell due meanwhile fire at once) reaches the light when it
// connects a few seconds later, instead of becoming a dead letter after the command's retries.
func TestRuleCommandWaitsForLight(t *testing.T) {
	t.Parallel()
	gw := startGateway(t, func(c *gateway.Config) {
		writeRules(t, c.Rules.Dir, "lights.yaml", shippedLightsRules(t, "1m"))
	})
	addr := gw.MQTTAddr("tcp")
	sensor := connectDevice(t, addr, "kitchen-motion")
	publish(t, sensor, "devices/kitchen-motion/events/room.entered", 1, `{"room":"kitchen"}`)
	// For each of the two kitchen lights, the evaluation's send and a worker's three tries (the first and the
	// default two retries) find it not connected: without the wait for offline devices, both commands would be
	// dead letters by now.
	waitFor(t, 10*time.Second, "four attempts at each light's command", func() bool {
		return metricSum(t, gw.Reg, "edgegate_ingest_commands_total", map[string]string{"outcome": "not_connected"}) >= 8
	})
	light := connectDevice(t, addr, "kitchen-light-1")
	in := subscribe(t, light, "devices/kitchen-light-1/commands/#")
	// An attempt between the light's connection and its subscription is not sent (it would reach no one and wait
	// command_timeout for an acknowledgement): like one before the connection, it is tried again within a second.
	msgs := in.waitLen(t, 1, 10*time.Second)
	if want := "devices/kitchen-light-1/commands/lights.on"; msgs[0].Topic != want {
		t.Fatalf("the light got %s, want %s", msgs[0].Topic, want)
	}
}
