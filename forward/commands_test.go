package forward

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// presence is a CommandSink for known devices that take commands only while online.
type presence struct {
	mu     sync.Mutex
	known  map[string]bool
	online map[string]bool
	got    []command
}

func (p *presence) DeliverCommand(_ context.Context, device, cmd string, payload []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case !p.known[device]:
		return fmt.Errorf("test: command %s to %q: %w", cmd, device, ErrUnknownDevice)
	case !p.online[device]:
		return fmt.Errorf("test: command %s to %q: %w", cmd, device, ErrDeviceOffline)
	}
	p.got = append(p.got, command{device, cmd, string(payload)})
	return nil
}

func (p *presence) connect(device string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.online[device] = true
}

// of returns the commands delivered to device, in order.
func (p *presence) of(device string) []command {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []command
	for _, c := range p.got {
		if c.device == device {
			out = append(out, c)
		}
	}
	return out
}

// cloudPublisher connects a client to the upstream broker and returns a function that publishes with QoS 1.
func cloudPublisher(t *testing.T, url string) func(topic, payload string) {
	t.Helper()
	pub := paho.NewClient(paho.NewClientOptions().AddBroker(url).SetClientID("cloud-app").SetAutoReconnect(false))
	if tok := pub.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud connect: %v", tok.Error())
	}
	t.Cleanup(func() { pub.Disconnect(0) })
	return func(topic, payload string) {
		t.Helper()
		if tok := pub.Publish(topic, 1, false, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %s: %v", topic, tok.Error())
		}
	}
}

// setHold sets the hold of the first sink's commands.
func setHold(d time.Duration) func(*Forwarder) {
	return func(f *Forwarder) { f.sinks[0].tr.(*mqttTransport).hold = d }
}

// TestMQTTCommandWaitsForDevice: a command for a known device that is not connected is held, not dead-lettered;
// commands for other devices go past it; once the device connects it gets its held commands in order. They are
// acknowledged upstream then: a new connection of the sink does not bring them again.
func TestMQTTCommandWaitsForDevice(t *testing.T) {
	b := mosquittotest.Start(t)
	cmds := &presence{known: map[string]bool{"lamp": true, "fan": true}, online: map[string]bool{"fan": true}}
	cfg := Config{Sinks: []SinkConfig{mqttSink("up", b.URL())}}
	r := startForwarder(t, cfg, newMemLog(t), cmds)
	waitFor(t, 10*time.Second, "the sink connected", func() bool { return sinkHealth(r, "up").Connected })
	send := cloudPublisher(t, b.URL())

	send("edgegate/gw1/commands/lamp/lights.on", `{"n":1}`)
	send("edgegate/gw1/commands/lamp/lights.off", `{"n":2}`)
	send("edgegate/gw1/commands/fan/spin", `{"n":3}`)
	waitFor(t, 10*time.Second, "the fan's command", func() bool { return len(cmds.of("fan")) == 1 })
	if got := cmds.of("lamp"); len(got) != 0 {
		t.Errorf("the lamp, not connected, got %+v", got)
	}
	if dl := r.dl.all(); len(dl) != 0 {
		t.Fatalf("dead letters while the lamp is away: %+v", dl)
	}

	cmds.connect("lamp")
	waitFor(t, 10*time.Second, "the lamp's held commands", func() bool { return len(cmds.of("lamp")) >= 2 })
	want := []command{{"lamp", "lights.on", `{"n":1}`}, {"lamp", "lights.off", `{"n":2}`}}
	if got := cmds.of("lamp"); !slices.Equal(got, want) {
		t.Errorf("the lamp got %+v, want %+v", got, want)
	}

	// Acknowledged: after a reconnect of the sink only the new command arrives.
	r.stop()
	r = startForwarder(t, cfg, newMemLog(t), cmds)
	waitFor(t, 10*time.Second, "the sink connected again", func() bool { return sinkHealth(r, "up").Connected })
	send("edgegate/gw1/commands/fan/marker", `{"n":4}`)
	waitFor(t, 10*time.Second, "the marker", func() bool { return len(cmds.of("fan")) == 2 })
	if got := cmds.of("lamp"); len(got) != 2 {
		t.Errorf("the lamp got %d commands, want 2 (held ones delivered again?): %+v", len(got), got)
	}
	if dl := r.dl.all(); len(dl) != 0 {
		t.Errorf("dead letters: %+v", dl)
	}
}

// TestMQTTCommandHoldEnds: a command whose device does not connect within the hold is dead-lettered
// (command_failed) and acknowledged upstream.
func TestMQTTCommandHoldEnds(t *testing.T) {
	const hold = 300 * time.Millisecond
	b := mosquittotest.Start(t)
	cmds := &presence{known: map[string]bool{"lamp": true, "fan": true}, online: map[string]bool{"fan": true}}
	cfg := Config{Sinks: []SinkConfig{mqttSink("up", b.URL())}}
	r := startForwarderWith(t, cfg, newMemLog(t), cmds, setHold(hold))
	waitFor(t, 10*time.Second, "the sink connected", func() bool { return sinkHealth(r, "up").Connected })
	send := cloudPublisher(t, b.URL())

	sent := time.Now()
	send("edgegate/gw1/commands/lamp/lights.on", `{"n":1}`)
	waitFor(t, 10*time.Second, "the dead letter", func() bool { return len(r.dl.all()) > 0 })
	if took := time.Since(sent); took < hold {
		t.Errorf("dead-lettered after %s, before the hold of %s ended", took, hold)
	}
	dl := r.dl.all()[0]
	if dl.reason != ReasonCommandFailed || dl.device != "lamp" || dl.topic != "edgegate/gw1/commands/lamp/lights.on" ||
		string(dl.payload) != `{"n":1}` || !strings.Contains(dl.detail, "did not take the command within") ||
		!strings.Contains(dl.detail, ErrDeviceOffline.Error()) {
		t.Errorf("dead letter = %+v", dl)
	}

	r.stop()
	cmds.connect("lamp")
	r = startForwarderWith(t, cfg, newMemLog(t), cmds, setHold(hold))
	waitFor(t, 10*time.Second, "the sink connected again", func() bool { return sinkHealth(r, "up").Connected })
	send("edgegate/gw1/commands/fan/marker", `{}`)
	waitFor(t, 10*time.Second, "the marker", func() bool { return len(cmds.of("fan")) == 1 })
	if got := cmds.of("lamp"); len(got) != 0 {
		t.Errorf("the dead-lettered command came again: %+v", got)
	}
	if dl := r.dl.all(); len(dl) != 0 {
		t.Errorf("dead letters after the reconnect: %+v", dl)
	}
}

// TestMQTTCommandHoldBounded: at most maxHeldCommands wait; a further command for a device that is not
// connected is dead-lettered at once. The held ones reach the device in order once it connects.
func TestMQTTCommandHoldBounded(t *testing.T) {
	b := mosquittotest.Start(t)
	cmds := &presence{known: map[string]bool{"lamp": true}, online: map[string]bool{}}
	cfg := Config{Sinks: []SinkConfig{mqttSink("up", b.URL())}}
	r := startForwarder(t, cfg, newMemLog(t), cmds)
	waitFor(t, 10*time.Second, "the sink connected", func() bool { return sinkHealth(r, "up").Connected })
	send := cloudPublisher(t, b.URL())

	for i := range maxHeldCommands + 1 {
		send("edgegate/gw1/commands/lamp/step", fmt.Sprintf(`{"n":%d}`, i))
	}
	waitFor(t, 10*time.Second, "the dead letter", func() bool { return len(r.dl.all()) > 0 })
	dl := r.dl.all()
	if len(dl) != 1 || dl[0].reason != ReasonCommandFailed || string(dl[0].payload) != fmt.Sprintf(`{"n":%d}`, maxHeldCommands) ||
		!strings.Contains(dl[0].detail, "wait already") {
		t.Fatalf("dead letters = %+v, want one command_failed for the last command", dl)
	}

	cmds.connect("lamp")
	waitFor(t, 10*time.Second, "the held commands", func() bool { return len(cmds.of("lamp")) >= maxHeldCommands })
	got := cmds.of("lamp")
	if len(got) != maxHeldCommands {
		t.Fatalf("the lamp got %d commands, want %d", len(got), maxHeldCommands)
	}
	for i, c := range got {
		if want := fmt.Sprintf(`{"n":%d}`, i); c.payload != want {
			t.Errorf("command %d: %s, want %s", i, c.payload, want)
		}
	}
}

// TestMQTTCommandsDisabledStayAtBroker: with disable_commands the sink's persistent session no longer takes
// commands. One queued in the session from before is left unacknowledged (not dead-lettered) and arrives once
// commands are enabled again; the subscription itself is removed, so one published meanwhile is not queued for
// the gateway at all.
func TestMQTTCommandsDisabledStayAtBroker(t *testing.T) {
	b := mosquittotest.Start(t)
	cmds := &presence{known: map[string]bool{"lamp": true}, online: map[string]bool{"lamp": true}}
	enabled := Config{Sinks: []SinkConfig{mqttSink("up", b.URL())}}
	disabled := Config{Sinks: []SinkConfig{mqttSink("up", b.URL())}}
	disabled.Sinks[0].MQTT.DisableCommands = true
	send := cloudPublisher(t, b.URL())

	r := startForwarder(t, enabled, newMemLog(t), cmds)
	waitFor(t, 10*time.Second, "the sink connected", func() bool { return sinkHealth(r, "up").Connected })
	r.stop()
	send("edgegate/gw1/commands/lamp/queued", `{"n":1}`) // queued in the session

	r = startForwarder(t, disabled, newMemLog(t), cmds)
	waitFor(t, 10*time.Second, "the sink connected without commands", func() bool { return sinkHealth(r, "up").Connected })
	send("edgegate/gw1/commands/lamp/meanwhile", `{"n":2}`) // after the unsubscribe: not for the gateway
	// A sink reconnecting while commands are disabled leaves the queued command where it is, again.
	r.stop()
	r2 := startForwarder(t, disabled, newMemLog(t), cmds)
	waitFor(t, 10*time.Second, "the sink connected without commands again", func() bool { return sinkHealth(r2, "up").Connected })
	r2.stop()
	if got := cmds.of("lamp"); len(got) != 0 {
		t.Errorf("commands delivered while disabled: %+v", got)
	}
	if dl := append(r.dl.all(), r2.dl.all()...); len(dl) != 0 {
		t.Fatalf("dead letters while commands were disabled: %+v", dl)
	}

	r = startForwarder(t, enabled, newMemLog(t), cmds)
	waitFor(t, 10*time.Second, "the sink connected with commands", func() bool { return sinkHealth(r, "up").Connected })
	send("edgegate/gw1/commands/lamp/marker", `{"n":3}`)
	waitFor(t, 10*time.Second, "the marker", func() bool {
		return slices.ContainsFunc(cmds.of("lamp"), func(c command) bool { return c.command == "marker" })
	})
	want := []command{{"lamp", "queued", `{"n":1}`}, {"lamp", "marker", `{"n":3}`}}
	if got := cmds.of("lamp"); !slices.Equal(got, want) {
		t.Errorf("the lamp got %+v, want %+v", got, want)
	}
	if dl := r.dl.all(); len(dl) != 0 {
		t.Errorf("dead letters: %+v", dl)
	}
}

// TestMQTTCommandTopicChanged: a sink whose command_topic changed from the default no longer takes commands on
// the default topic (its session's old subscription is removed), so they are not dead-lettered as
// bad_command_topic; commands on the new topic arrive.
func TestMQTTCommandTopicChanged(t *testing.T) {
	b := mosquittotest.Start(t)
	cmds := &presence{known: map[string]bool{"lamp": true}, online: map[string]bool{"lamp": true}}
	before := Config{Sinks: []SinkConfig{mqttSink("up", b.URL())}}
	after := Config{Sinks: []SinkConfig{mqttSink("up", b.URL())}}
	after.Sinks[0].MQTT.CommandTopic = "site/{gateway}/to/{device}/{command}"
	send := cloudPublisher(t, b.URL())

	r := startForwarder(t, before, newMemLog(t), cmds)
	waitFor(t, 10*time.Second, "the sink connected", func() bool { return sinkHealth(r, "up").Connected })
	r.stop()

	r = startForwarder(t, after, newMemLog(t), cmds)
	waitFor(t, 10*time.Second, "the sink connected on the new topic", func() bool { return sinkHealth(r, "up").Connected })
	send("edgegate/gw1/commands/lamp/old", `{}`)
	send("site/gw1/to/lamp/new", `{}`) // published after the old one: delivered after it, if that came
	waitFor(t, 10*time.Second, "the command on the new topic", func() bool { return len(cmds.of("lamp")) > 0 })
	if got := cmds.of("lamp"); !slices.Equal(got, []command{{"lamp", "new", `{}`}}) {
		t.Errorf("the lamp got %+v, want only the command on the new topic", got)
	}
	if dl := r.dl.all(); len(dl) != 0 {
		t.Errorf("dead letters: %+v", dl)
	}
}

func TestStaleCommandFilters(t *testing.T) {
	for _, tc := range []struct {
		name       string
		configured string
		disabled   bool
		want       []string
	}{
		{"default", DefaultCommandTopic, false, nil},
		{"custom", "site/{gateway}/{sink}/{device}/{command}", false, []string{"edgegate/gw1/commands/+/+"}},
		{"disabled", DefaultCommandTopic, true, []string{"edgegate/gw1/commands/+/+"}},
		{"disabled custom", "site/{gateway}/{device}/{command}", true, []string{"edgegate/gw1/commands/+/+", "site/gw1/+/+"}},
		{"custom equal to the default", "edgegate/{gateway}/commands/{device}/{command}", false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cur *commandTopic
			if !tc.disabled {
				var err error
				if cur, err = parseCommandTopic(tc.configured); err != nil {
					t.Fatal(err)
				}
				cur.bind("gw1", "up")
			}
			if got := staleCommandFilters(cur, tc.configured, "gw1", "up"); !slices.Equal(got, tc.want) {
				t.Errorf("staleCommandFilters = %q, want %q", got, tc.want)
			}
		})
	}
}
