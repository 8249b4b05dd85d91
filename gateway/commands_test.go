package gateway_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/deadletter"
	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// deadLettersOf returns the dead letters of gw with the given reason, oldest first.
func deadLettersOf(t testing.TB, gw *testGateway, reason string) []deadletter.Record {
	t.Helper()
	recs, err := gw.DeadLetters().List(0, 1000)
	if err != nil {
		t.Fatalf("list dead letters: %v", err)
	}
	var out []deadletter.Record
	for _, r := range recs {
		if r.Reason == reason {
			out = append(out, r)
		}
	}
	return out
}

// TestCloudCommandRoundTrip sends cloud-to-device commands through a real upstream broker: the gateway's MQTT sink
// takes them from edgegate/{gateway}/commands/{device}/{command} and the registered device receives each payload on
// its local command topic. A command for a device the registry does not know becomes a dead letter (reason
// unknown_device) and is published to no one. Commands never enter the log and never go back upstream: the only
// events the sink publishes are the devices' own (presence and a marker event sent afterwards).
func TestCloudCommandRoundTrip(t *testing.T) {
	t.Parallel()
	const gwID = "gw-c2d"
	cloud := mosquittotest.Start(t)
	// Subscribed before the gateway starts: it sees every event the sink publishes.
	upstream := subscribe(t, connectClient(t, cloud.Addr(), "cloud-watch", "", ""), "edgegate/#")
	app := connectClient(t, cloud.Addr(), "cloud-app", "", "")
	gw := startGateway(t, func(c *gateway.Config) {
		c.ID = gwID
		c.Forward.Sinks = []forward.SinkConfig{{
			Name: "cloud", Type: forward.TypeMQTT,
			BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
			MQTT: &forward.MQTTConfig{URL: cloud.URL(), ConnectTimeout: time.Second},
		}}
	})
	addr := gw.MQTTAddr("tcp")

	light := subscribe(t, connectDevice(t, addr, "kitchen-light-1"), "devices/kitchen-light-1/commands/#")
	local := subscribe(t, connectDevice(t, addr, "observer"), "devices/#") // every message published locally
	sensor := connectDevice(t, addr, "kitchen-motion")
	// The sink counts as connected once its command subscription is acknowledged.
	waitFor(t, 10*time.Second, "the cloud sink connected", func() bool {
		return metricSum(t, gw.Reg, "edgegate_forward_connected", map[string]string{"sink": "cloud"}) == 1
	})

	cmdTopic := func(device, command string) string {
		return "edgegate/" + gwID + "/commands/" + device + "/" + command
	}
	type sent struct{ device, command, payload string }
	cmds := []sent{
		{"kitchen-light-1", "lights.on", `{"on":true,"brightness":80}`},
		{"no-such-device", "lights.on", `{"on":true,"ghost":1}`},
		{"kitchen-light-1", "lights.off", `{"on":false}`},
	}

	// 1. A command for a registered device arrives on its local command topic with its payload.
	publish(t, app, cmdTopic(cmds[0].device, cmds[0].command), 1, cmds[0].payload)
	got := light.waitLen(t, 1, 10*time.Second)
	if want := "devices/kitchen-light-1/commands/lights.on"; got[0].Topic != want || string(got[0].Payload) != cmds[0].payload {
		t.Errorf("the light received %s %s, want %s %s", got[0].Topic, got[0].Payload, want, cmds[0].payload)
	}

	// 2. A command for an unknown device is dead-lettered with its upstream topic and bytes.
	publish(t, app, cmdTopic(cmds[1].device, cmds[1].command), 1, cmds[1].payload)
	var unknown []deadletter.Record
	waitFor(t, 10*time.Second, "the unknown_device dead letter", func() bool {
		unknown = deadLettersOf(t, gw, forward.ReasonUnknownDevice)
		return len(unknown) >= 1
	})
	if len(unknown) != 1 {
		t.Fatalf("%d unknown_device dead letters, want 1: %+v", len(unknown), unknown)
	}
	if r := unknown[0]; r.DeviceID != cmds[1].device || r.Topic != cmdTopic(cmds[1].device, cmds[1].command) ||
		string(r.Payload) != cmds[1].payload || r.Detail == "" {
		t.Errorf("dead letter = {device %q topic %q payload %q detail %q}, want {%q %q %q, a detail}",
			r.DeviceID, r.Topic, r.Payload, r.Detail, cmds[1].device, cmdTopic(cmds[1].device, cmds[1].command), cmds[1].payload)
	}

	// 3. A further command: the sink delivers commands in order, so once the light and the observer have seen it,
	// they would have seen anything published locally for the unknown device before.
	publish(t, app, cmdTopic(cmds[2].device, cmds[2].command), 1, cmds[2].payload)
	offTopic := "devices/kitchen-light-1/commands/lights.off"
	waitFor(t, 10*time.Second, "the light and the observer see lights.off", func() bool {
		return bytes.Contains(topicsOf(local.all()), []byte(offTopic)) && bytes.Contains(topicsOf(light.all()), []byte(offTopic))
	})
	wantLocal := []string{
		"devices/kitchen-light-1/commands/lights.on " + cmds[0].payload,
		offTopic + " " + cmds[2].payload,
	}
	for name, in := range map[string]*inbox{"kitchen-light-1": light, "observer (devices/#)": local} {
		var have []string
		for _, m := range in.all() {
			have = append(have, m.Topic+" "+string(m.Payload))
		}
		if strings.Join(have, "\n") != strings.Join(wantLocal, "\n") {
			t.Errorf("%s received:\n%s\nwant exactly:\n%s", name, strings.Join(have, "\n"), strings.Join(wantLocal, "\n"))
		}
	}

	// 4. A device event after the commands: the sink sends the log in order, so once the marker is upstream,
	// every event the log held before it is upstream too.
	publish(t, sensor, "devices/kitchen-motion/events/test.marker", 1, `{"n":1}`)
	markerTopic := "edgegate/" + gwID + "/events/kitchen-motion/test.marker"
	waitFor(t, 10*time.Second, "the marker event upstream", func() bool {
		return bytes.Contains(topicsOf(upstream.all()), []byte(markerTopic))
	})

	var onCmdTopics []string
	ids := map[string]bool{}
	for _, m := range upstream.all() {
		if strings.HasPrefix(m.Topic, "edgegate/"+gwID+"/commands/") {
			onCmdTopics = append(onCmdTopics, m.Topic+" "+string(m.Payload))
			continue
		}
		var ev storedEvent
		if err := json.Unmarshal(m.Payload, &ev); err != nil {
			t.Errorf("upstream %s: not CloudEvent JSON: %v: %s", m.Topic, err, m.Payload)
			continue
		}
		ids[ev.ID] = true
		switch {
		case !strings.HasPrefix(m.Topic, "edgegate/"+gwID+"/events/"):
			t.Errorf("the gateway published on %s, outside its event topics: %s", m.Topic, m.Payload)
		case ev.Type == "device.connected" && ev.Subject != cmds[1].device:
		case ev.Type == "test.marker" && ev.Subject == "kitchen-motion":
		default:
			t.Errorf("the gateway forwarded an event that is neither presence nor the marker: %s %s", m.Topic, m.Payload)
		}
	}
	// Exactly what the cloud application published (the gateway did not republish a command upstream).
	var wantCmdTopics []string
	for _, c := range cmds {
		wantCmdTopics = append(wantCmdTopics, cmdTopic(c.device, c.command)+" "+c.payload)
	}
	if strings.Join(onCmdTopics, "\n") != strings.Join(wantCmdTopics, "\n") {
		t.Errorf("upstream command topics carried:\n%s\nwant only the cloud's own commands:\n%s",
			strings.Join(onCmdTopics, "\n"), strings.Join(wantCmdTopics, "\n"))
	}
	// Every event the log took went upstream (the sink has no type filter) and was checked above.
	if appended := metricSum(t, gw.Reg, "edgegate_buffer_appended_total", nil); appended != float64(len(ids)) {
		t.Errorf("the log took %g events, the sink forwarded %d distinct ones: something else entered the log", appended, len(ids))
	}
	for _, ev := range logEvents(t, gw.Log()) {
		if ev.Type != "device.connected" && ev.Type != "test.marker" {
			t.Errorf("the log holds an event that is neither presence nor the marker: %+v", ev)
		}
	}
	if n := len(deadLettersOf(t, gw, forward.ReasonCommandFailed)); n != 0 {
		t.Errorf("%d command_failed dead letters, want none", n)
	}
	if got := metricSum(t, gw.Reg, "edgegate_ingest_commands_total", map[string]string{"outcome": "acked"}); got != 2 {
		t.Errorf("edgegate_ingest_commands_total{outcome=acked} = %g, want 2", got)
	}
}

// topicsOf returns the topics of msgs, one per line.
func topicsOf(msgs []message) []byte {
	var b bytes.Buffer
	for _, m := range msgs {
		b.WriteString(m.Topic)
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// TestRuleCommandNeverAcknowledged: a rule commands a light that receives its commands (QoS 1) and never sends a
// PUBACK. Each attempt ends after the command timeout — the rules' own (rules.command_timeout) or the broker's wait
// for the PUBACK (mqtt.command_timeout), whichever is shorter — and the command is sent again after the backoff,
// command_retries times; then it becomes a dead letter (reason command_undelivered) and a failed command action in
// the metrics. Every copy carries the same payload, with the id of the causing event, so the device can tell a
// repeat from a new command.
func TestRuleCommandNeverAcknowledged(t *testing.T) {
	t.Parallel()
	const (
		timeout = 400 * time.Millisecond
		retries = 3                      // not the default (2)
		backoff = 100 * time.Millisecond // doubles: 100ms, 200ms, 400ms
		rule    = "kitchen-light-on"
	)
	ruleFile := `rules:
  - name: ` + rule + `
    on: room.entered
    actions:
      - command:
          device: kitchen-light-1
          command: lights.on
          payload: {on: true, cause: '{{ event.id }}'}
`
	for _, tc := range []struct {
		name    string
		timeout func(*gateway.Config) // the short timeout; the other one stays at its default (5s)
		// ingestTimeouts and ingestAbandoned are edgegate_ingest_commands_total{outcome="timeout"} and
		// {outcome="abandoned"}: an attempt that the broker's own timer ends counts as a timeout, one the rules
		// stop waiting for first as abandoned.
		ingestTimeouts, ingestAbandoned float64
	}{
		{"rules.command_timeout", func(c *gateway.Config) { c.Rules.CommandTimeout = timeout }, 0, retries + 1},
		{"mqtt.command_timeout", func(c *gateway.Config) { c.MQTT.CommandTimeout = timeout }, retries + 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			gw := startGateway(t, func(c *gateway.Config) {
				c.Rules.CommandRetries = retries
				c.Rules.CommandBackoff = backoff
				tc.timeout(c)
				writeRules(t, c.Rules.Dir, "light.yaml", ruleFile)
			})
			addr := gw.MQTTAddr("tcp")
			lightCl := connectClientWith(t, addr, "kitchen-light-1", "kitchen-light-1", "kitchen-light-1-pw",
				func(o *paho.ClientOptions) { o.SetAutoAckDisabled(true) })
			light := subscribe(t, lightCl, "devices/kitchen-light-1/commands/#") // QoS 1; the inbox never acks
			sensor := connectDevice(t, addr, "kitchen-motion")

			publish(t, sensor, "devices/kitchen-motion/events/room.entered", 1, `{"room":"kitchen"}`)
			var undelivered []deadletter.Record
			waitFor(t, 30*time.Second, "the command_undelivered dead letter", func() bool {
				undelivered = deadLettersOf(t, gw, "command_undelivered")
				return len(undelivered) >= 1
			})
			// The last copy was sent a whole timeout before the dead letter was written.
			got := light.waitLen(t, retries+1, 5*time.Second)
			for i, m := range got {
				t.Logf("copy %d: +%s qos %d dup %t packet id %d %s", i+1, m.At.Sub(got[0].At).Round(time.Millisecond),
					m.QoS, m.Duplicate, m.MessageID, m.Payload)
			}
			if len(got) != retries+1 {
				t.Fatalf("the light received %d copies, want %d (1 + command_retries %d)", len(got), retries+1, retries)
			}

			entered := eventsOfType(logEvents(t, gw.Log()), "room.entered")
			if len(entered) != 1 {
				t.Fatalf("the log holds %d room.entered events, want 1", len(entered))
			}
			var body struct {
				On    bool   `json:"on"`
				Cause string `json:"cause"`
			}
			if err := json.Unmarshal(got[0].Payload, &body); err != nil || !body.On || body.Cause != entered[0].ID {
				t.Errorf("payload %s, want {\"on\":true,\"cause\":%q} (%v)", got[0].Payload, entered[0].ID, err)
			}
			wantPayload := string(got[0].Payload)
			for i, m := range got {
				if m.Topic != "devices/kitchen-light-1/commands/lights.on" || string(m.Payload) != wantPayload || m.QoS != 1 {
					t.Errorf("copy %d: %s qos %d %s, want devices/kitchen-light-1/commands/lights.on qos 1 %s",
						i+1, m.Topic, m.QoS, m.Payload, wantPayload)
				}
				if i == 0 {
					continue
				}
				// Each retry waits for the attempt before it to time out, then for the backoff; the bound leaves
				// the backoff as room for delivery jitter.
				if gap := m.At.Sub(got[i-1].At); gap < timeout {
					t.Errorf("copy %d came %s after copy %d, want >= %s (the command timeout)", i+1, gap, i, timeout)
				}
			}
			// Over all retries: a timeout each and the doubling backoffs, less one backoff for jitter. The upper
			// bound is loose (for loaded machines); it fails when the short timeout is not the one applied (5s).
			span, expect := got[len(got)-1].At.Sub(got[0].At), retries*timeout+backoff*(1<<retries-1)
			if lo, hi := expect-backoff, expect+3*time.Second; span < lo || span > hi {
				t.Errorf("the copies came within %s, want %s to %s (%d timeouts of %s and the doubling backoff from %s)",
					span, lo, hi, retries, timeout, backoff)
			}

			if len(undelivered) != 1 {
				t.Fatalf("%d command_undelivered dead letters, want 1: %+v", len(undelivered), undelivered)
			}
			r := undelivered[0]
			if r.DeviceID != "kitchen-light-1" || r.Topic != "devices/kitchen-light-1/commands/lights.on" ||
				string(r.Payload) != wantPayload {
				t.Errorf("dead letter = {device %q topic %q payload %s}, want {kitchen-light-1 devices/kitchen-light-1/commands/lights.on %s}",
					r.DeviceID, r.Topic, r.Payload, wantPayload)
			}
			mustContain(t, "the dead letter's detail", r.Detail, rule, entered[0].ID, fmt.Sprintf("%d attempt(s)", retries+1))

			action := func(outcome string) float64 {
				return metricSum(t, gw.Reg, "edgegate_rules_actions_total",
					map[string]string{"rule": rule, "action": "command", "outcome": outcome})
			}
			if f, ok := action("failed"), action("ok"); f != 1 || ok != 0 {
				t.Errorf("edgegate_rules_actions_total{action=command}: failed %g, ok %g; want 1 and 0", f, ok)
			}
			if got := metricSum(t, gw.Reg, "edgegate_ingest_commands_total", map[string]string{"outcome": "acked"}); got != 0 {
				t.Errorf("edgegate_ingest_commands_total{outcome=acked} = %g, want 0", got)
			}
			// Each attempt ends in exactly one outcome; the last may still be counting when the dead letter is in.
			var timeouts, abandoned float64
			waitFor(t, 10*time.Second, "every attempt's outcome counted", func() bool {
				timeouts = metricSum(t, gw.Reg, "edgegate_ingest_commands_total", map[string]string{"outcome": "timeout"})
				abandoned = metricSum(t, gw.Reg, "edgegate_ingest_commands_total", map[string]string{"outcome": "abandoned"})
				return timeouts+abandoned >= retries+1
			})
			if timeouts != tc.ingestTimeouts || abandoned != tc.ingestAbandoned {
				t.Errorf("edgegate_ingest_commands_total: timeout %g, abandoned %g; want %g and %g", timeouts, abandoned,
					tc.ingestTimeouts, tc.ingestAbandoned)
			}
		})
	}
}
