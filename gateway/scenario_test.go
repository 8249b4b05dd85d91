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
	const absence = time.Second
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
		msgs := lights[id].waitLen(t, 2, 10*time.Second)
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
