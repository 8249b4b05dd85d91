package gateway_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"golang.org/x/crypto/bcrypt"

	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/internal/eventually"
	"github.com/edgegate/edgegate/rules"
)

// ruleNames lists the names of the rules in force.
func ruleNames(gw *testGateway) []string {
	var names []string
	for _, r := range gw.Rules().Rules() {
		names = append(names, r.Name)
	}
	slices.Sort(names)
	return names
}

// emittedN returns, for each event of type typ in the log, its data.n.
func emittedN(t *testing.T, evs []storedEvent, typ string) []int {
	t.Helper()
	var ns []int
	for _, e := range eventsOfType(evs, typ) {
		var d struct{ N *int }
		if err := json.Unmarshal(e.Data, &d); err != nil || d.N == nil {
			t.Fatalf("%s event %s: data %s has no number n (%v)", typ, e.ID, e.Data, err)
		}
		ns = append(ns, *d.N)
	}
	return ns
}

// TestHotReloadLosesNoEvent changes the rule file (one rule kept, one changed, one removed, one added) while a
// device streams events, and lets the file watch reload it. Every event must be evaluated exactly once, by either
// the old or the new rule set as a whole, switching once. A broken file afterwards keeps the rules in force and is
// reported with its file and line.
func TestHotReloadLosesNoEvent(t *testing.T) {
	t.Parallel()
	gw := startGateway(t, func(c *gateway.Config) {
		c.ID = "gw-reload"
		c.MQTT.PublishRate, c.MQTT.PublishBurst = 1e5, 1e5
		writeRules(t, c.Rules.Dir, "rules.yaml", readTestdata(t, "reload-before.yaml"))
	})
	if got, want := ruleNames(gw), []string{"change", "keep", "remove"}; !slices.Equal(got, want) {
		t.Fatalf("rules in force at start: %v, want %v", got, want)
	}
	sensor := connectDevice(t, gw.MQTTAddr("tcp"), "kitchen-motion")

	// The publisher sends tick n = 0, 1, 2, ... one QoS 1 publish at a time until told to stop; bounded in count
	// and time.
	const maxEvents = 5000
	var sent, stopAt atomic.Int64
	stopAt.Store(maxEvents)
	pubErr := make(chan error, 1)
	go func() {
		deadline := time.Now().Add(30 * time.Second)
		for n := int64(0); n < stopAt.Load(); n++ {
			if time.Now().After(deadline) {
				pubErr <- fmt.Errorf("publisher: still running after 30s at n=%d", n)
				return
			}
			tok := sensor.Publish("devices/kitchen-motion/events/tick", 1, false, fmt.Sprintf(`{"n":%d}`, n))
			if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				pubErr <- fmt.Errorf("publisher: tick %d: not acknowledged: %v", n, tok.Error())
				return
			}
			sent.Store(n + 1)
		}
		pubErr <- nil
	}()

	waitFor(t, 10*time.Second, "50 ticks sent before the change", func() bool { return sent.Load() >= 50 })
	writeRules(t, gw.Cfg.Rules.Dir, "rules.yaml", readTestdata(t, "reload-after.yaml"))
	waitFor(t, 10*time.Second, "the file watch to reload the rules", func() bool {
		return slices.Equal(ruleNames(gw), []string{"add", "change", "keep"})
	})
	// At least 50 more after the reload (the publish in flight now may have been evaluated before it), then stop.
	stopAt.Store(sent.Load() + 51)
	if err := <-pubErr; err != nil {
		t.Fatal(err)
	}
	total := int(sent.Load())

	var evs []storedEvent
	waitFor(t, 10*time.Second, "every tick evaluated", func() bool {
		evs = logEvents(t, gw.Log())
		return len(eventsOfType(evs, "seen.keep")) >= total &&
			len(eventsOfType(evs, "seen.change.v1"))+len(eventsOfType(evs, "seen.change.v2")) >= total
	})
	if ticks := len(eventsOfType(evs, "tick")); ticks != total {
		t.Fatalf("log holds %d ticks, the device had %d acknowledged", ticks, total)
	}
	all := make([]int, total)
	for i := range all {
		all[i] = i
	}
	keep := emittedN(t, evs, "seen.keep")
	slices.Sort(keep)
	if !slices.Equal(keep, all) {
		t.Fatalf("the kept rule saw ticks %v, want each of 0..%d exactly once", compact(keep), total-1)
	}
	// The old set ran for a prefix of the ticks and the new set for the rest, each tick under exactly one.
	v1, v2 := emittedN(t, evs, "seen.change.v1"), emittedN(t, evs, "seen.change.v2")
	removed, added := emittedN(t, evs, "seen.remove"), emittedN(t, evs, "seen.add")
	switchAt := len(v1)
	if switchAt < 50 || switchAt > total-50 {
		t.Errorf("the new rules took over at tick %d, want between 50 and %d", switchAt, total-50)
	}
	if !slices.Equal(v1, all[:switchAt]) || !slices.Equal(v2, all[switchAt:]) {
		t.Errorf("changed rule: old version saw %v, new version saw %v; want 0..%d then %d..%d",
			compact(v1), compact(v2), switchAt-1, switchAt, total-1)
	}
	if !slices.Equal(removed, all[:switchAt]) {
		t.Errorf("removed rule saw %v, want exactly the ticks before the switch 0..%d", compact(removed), switchAt-1)
	}
	if !slices.Equal(added, all[switchAt:]) {
		t.Errorf("added rule saw %v, want exactly the ticks from the switch %d..%d", compact(added), switchAt, total-1)
	}
	// Derived events name this gateway's rules as their source and their cause.
	for _, e := range eventsOfType(evs, "seen.keep")[:3] {
		if e.Source != "/gateways/gw-reload/rules" || e.Rule != "keep" || e.CausationID == "" || e.Subject != "kitchen-motion" {
			t.Errorf("derived event %+v, want source /gateways/gw-reload/rules, rule keep, a causationid, subject kitchen-motion", e)
		}
	}
	if got := metricSum(t, gw.Reg, "edgegate_rules_queue_dropped_total", nil); got != 0 {
		t.Errorf("edgegate_rules_queue_dropped_total = %g, want 0", got)
	}

	// A broken file: the reload fails naming the file and line, the rules in force stay and keep working.
	bad := readTestdata(t, "reload-bad.yaml")
	badLine := 0
	for i, l := range strings.Split(bad, "\n") {
		if strings.Contains(l, "# BAD") {
			badLine = i + 1
		}
	}
	writeRules(t, gw.Cfg.Rules.Dir, "rules.yaml", bad)
	err := gw.Rules().Reload()
	if !errors.Is(err, rules.ErrInvalidRules) {
		t.Fatalf("Reload of a broken file = %v, want an error wrapping rules.ErrInvalidRules", err)
	}
	mustContain(t, "the reload error", err.Error(), fmt.Sprintf("rules.yaml:%d", badLine), "launch")
	if got, want := ruleNames(gw), []string{"add", "change", "keep"}; !slices.Equal(got, want) {
		t.Errorf("rules in force after a failed reload: %v, want the previous %v", got, want)
	}
	publish(t, sensor, "devices/kitchen-motion/events/tick", 1, fmt.Sprintf(`{"n":%d}`, total))
	waitFor(t, 10*time.Second, "the tick after the failed reload to be evaluated by the previous rules", func() bool {
		return slices.Contains(emittedN(t, logEvents(t, gw.Log()), "seen.add"), total)
	})
	if got := metricSum(t, gw.Reg, "edgegate_rules_reloads_total", map[string]string{"result": "error"}); got < 1 {
		t.Errorf("edgegate_rules_reloads_total{result=error} = %g, want >= 1", got)
	}
}

// compact shows a sorted list of ints as ranges, e.g. [0-49 51 53-99].
func compact(ns []int) string {
	var b strings.Builder
	b.WriteByte('[')
	for i := 0; i < len(ns); {
		j := i
		for j+1 < len(ns) && ns[j+1] == ns[j]+1 {
			j++
		}
		if b.Len() > 1 {
			b.WriteByte(' ')
		}
		if j > i {
			fmt.Fprintf(&b, "%d-%d", ns[i], ns[j])
		} else {
			fmt.Fprintf(&b, "%d", ns[i])
		}
		i = j + 1
	}
	b.WriteByte(']')
	return b.String()
}

// TestReloadDevices: the registry is read again while devices stay connected. A broken file changes nothing and
// names its line; a valid one puts in force at once a new light (which the rules select by room and kind, and which
// can log in) and the removal of the thermometer (whose connection is closed and which can no longer log in), and
// leaves the other devices' connections alone.
func TestReloadDevices(t *testing.T) {
	t.Parallel()
	gw, path, original, addr, lost := reloadGateway(t)
	thermo := connectThermo(t, addr, lost)
	motion := connectDevice(t, addr, "kitchen-motion")
	light1c := connectDevice(t, addr, "kitchen-light-1")
	light1 := subscribe(t, light1c, "devices/kitchen-light-1/commands/#")

	// A broken file: the error names it and the line; every device keeps its access.
	broken := append(slices.Clone(original), "  - id: \"not an id!\"\n    password_hash: x\n"...)
	if err := os.WriteFile(path, broken, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := gw.ReloadDevices(); err == nil {
		t.Fatal("ReloadDevices accepted a broken registry")
	} else {
		line := bytes.Count(original, []byte("\n")) + 1
		mustContain(t, "the reload error", err.Error(), "previous registry stays in force",
			fmt.Sprintf("%s:%d: devices[", path, line), `.id: "not an id!"`)
	}
	publish(t, thermo, "devices/thermo-1/telemetry", 1, `{"temp":20}`)
	if got := metricSum(t, gw.Reg, "edgegate_gateway_reloads_total", map[string]string{"what": "devices", "result": "error"}); got != 1 {
		t.Errorf("reloads{devices,error} = %v, want 1", got)
	}

	// Without thermo-1, with a new kitchen light.
	hash, err := bcrypt.GenerateFromPassword([]byte("kitchen-light-3-pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile(`(?s)\n  - id: thermo-1\n.*?\n\n`)
	if !block.Match(original) {
		t.Fatal("the registry has no thermo-1 entry to remove")
	}
	next := block.ReplaceAll(original, []byte("\n"))
	next = fmt.Appendf(next, "\n  - id: kitchen-light-3\n    room: kitchen\n    kind: light\n    password_hash: %q\n", hash)
	if err := os.WriteFile(path, next, 0o600); err != nil {
		t.Fatal(err)
	}
	changed, err := gw.ReloadDevices()
	if err != nil {
		t.Fatalf("ReloadDevices: %v", err)
	}
	if !slices.Equal(changed, []string{"thermo-1"}) {
		t.Errorf("access changed for %v, want [thermo-1]", changed)
	}
	if got := metricSum(t, gw.Reg, "edgegate_gateway_reloads_total", map[string]string{"what": "devices", "result": "ok"}); got != 1 {
		t.Errorf("reloads{devices,ok} = %v, want 1", got)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("thermo-1's connection is still open 10s after its removal")
	}
	if c, err := tryConnect(addr, "thermo-1", "thermo-1-pw"); err == nil {
		c.Disconnect(0)
		t.Fatal("thermo-1 logged in after its removal")
	}
	light3 := subscribe(t, connectDevice(t, addr, "kitchen-light-3"), "devices/kitchen-light-3/commands/#")
	for id, c := range map[string]paho.Client{"kitchen-motion": motion, "kitchen-light-1": light1c} {
		if !c.IsConnectionOpen() {
			t.Errorf("%s was disconnected by a reload that did not change it", id)
		}
	}

	// The rules select the new light by its room and kind.
	publish(t, motion, "devices/kitchen-motion/events/room.entered", 1, `{"room":"kitchen"}`)
	for name, in := range map[string]*inbox{"kitchen-light-1": light1, "kitchen-light-3": light3} {
		if m := in.waitLen(t, 1, 10*time.Second); !strings.HasSuffix(m[0].Topic, "/lights.on") {
			t.Errorf("%s received %s, want lights.on", name, m[0].Topic)
		}
	}
	eventually.True(t, 10*time.Second, "thermo-1's disconnect in the log", func() bool {
		for _, e := range eventsOfType(logEvents(t, gw.Log()), "device.disconnected") {
			if e.Subject == "thermo-1" && string(e.Data) == `{"reason":"revoked"}` {
				return true
			}
		}
		return false
	})
}

// TestReloadDevicesEmptyFile: a registry file without a device list (as one caught between its truncation and
// its writing is) keeps the registered devices in force and connected; an explicit empty list removes them all.
func TestReloadDevicesEmptyFile(t *testing.T) {
	t.Parallel()
	gw, path, original, addr, lost := reloadGateway(t)
	thermo := connectThermo(t, addr, lost)
	for i, doc := range []string{"", "# being written\n", "devices:\n"} {
		if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := gw.ReloadDevices()
		if err == nil {
			t.Fatalf("ReloadDevices took %q, a file without a device list", doc)
		}
		mustContain(t, "the reload error", err.Error(), path+" has no device list", "stays in force", "devices: []")
		if got := metricSum(t, gw.Reg, "edgegate_gateway_reloads_total", map[string]string{"what": "devices", "result": "error"}); got != float64(i+1) {
			t.Errorf("reloads{devices,error} = %v, want %d", got, i+1)
		}
	}
	publish(t, thermo, "devices/thermo-1/telemetry", 1, `{"temp":20}`)
	if !thermo.IsConnectionOpen() {
		t.Fatal("thermo-1 was disconnected by a refused reload")
	}
	if c, err := tryConnect(addr, "kitchen-motion", "kitchen-motion-pw"); err != nil {
		t.Fatalf("kitchen-motion cannot log in after a refused reload: %v", err)
	} else {
		c.Disconnect(0)
	}

	if err := os.WriteFile(path, []byte("devices: []\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	changed, err := gw.ReloadDevices()
	if err != nil {
		t.Fatalf("ReloadDevices(devices: []): %v", err)
	}
	if want := bytes.Count(original, []byte("\n  - id: ")); len(changed) != want || !slices.Contains(changed, "thermo-1") {
		t.Errorf("access changed for %v, want all %d devices", changed, want)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("thermo-1's connection is still open 10s after every device was removed")
	}
}

// tryConnect connects a client without failing the test.
func tryConnect(addr, id, password string) (paho.Client, error) {
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetUsername(id).
		SetPassword(password).SetAutoReconnect(false).SetConnectTimeout(10 * time.Second))
	tok := c.Connect()
	if !tok.WaitTimeout(20 * time.Second) {
		return nil, errors.New("connect timed out")
	}
	return c, tok.Error()
}

// TestReloadDevicesPasswordAndMetadata: a reload that gives thermo-1 a new password closes its connection (with
// reason revoked), refuses the old password and lets the new one in; one that moves kitchen-light-1 to the hall
// (metadata only) leaves its connection open, and the rules select it by its new room at once.
func TestReloadDevicesPasswordAndMetadata(t *testing.T) {
	t.Parallel()
	gw, path, original, addr, lost := reloadGateway(t)
	connectThermo(t, addr, lost)
	kitchenMotion := connectDevice(t, addr, "kitchen-motion")
	hallMotion := connectDevice(t, addr, "hall-motion")
	inboxes := map[string]*inbox{}
	clients := map[string]paho.Client{}
	for _, id := range []string{"kitchen-light-1", "kitchen-light-2", "hall-light"} {
		clients[id] = connectDevice(t, addr, id)
		inboxes[id] = subscribe(t, clients[id], "devices/"+id+"/commands/#")
	}

	hash, err := bcrypt.GenerateFromPassword([]byte("thermo-1-new"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	thermoHash := regexp.MustCompile(`password_hash: "[^"]+" # thermo-1-pw`)
	lightRoom := regexp.MustCompile(`(  - id: kitchen-light-1\n(?:    .*\n)*?    room: )kitchen\n`)
	if !thermoHash.Match(original) || !lightRoom.Match(original) {
		t.Fatal("the registry has no thermo-1 password or kitchen-light-1 room to change")
	}
	next := thermoHash.ReplaceAllLiteral(original, fmt.Appendf(nil, "password_hash: %q # thermo-1-new", hash))
	next = lightRoom.ReplaceAll(next, []byte("${1}hall\n"))
	if err := os.WriteFile(path, next, 0o600); err != nil {
		t.Fatal(err)
	}
	changed, err := gw.ReloadDevices()
	if err != nil {
		t.Fatalf("ReloadDevices: %v", err)
	}
	if !slices.Equal(changed, []string{"thermo-1"}) {
		t.Errorf("access changed for %v, want [thermo-1] (a room is not access)", changed)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("thermo-1's connection is still open 10s after its password changed")
	}
	if c, err := tryConnect(addr, "thermo-1", "thermo-1-pw"); err == nil {
		c.Disconnect(0)
		t.Error("thermo-1 logged in with its old password after the reload")
	}
	if c, err := tryConnect(addr, "thermo-1", "thermo-1-new"); err != nil {
		t.Errorf("thermo-1 cannot log in with its new password: %v", err)
	} else {
		c.Disconnect(100)
	}
	for id, c := range clients {
		if !c.IsConnectionOpen() {
			t.Errorf("%s was disconnected by a reload that changed only metadata or nothing of it", id)
		}
	}

	// Hall motion: the hall light and the moved light. Kitchen motion: only the light left in the kitchen.
	publish(t, hallMotion, "devices/hall-motion/events/room.entered", 1, `{"room":"hall"}`)
	for _, id := range []string{"hall-light", "kitchen-light-1"} {
		if m := inboxes[id].waitLen(t, 1, 10*time.Second); !strings.HasSuffix(m[0].Topic, "/lights.on") {
			t.Errorf("%s received %s, want lights.on", id, m[0].Topic)
		}
	}
	publish(t, kitchenMotion, "devices/kitchen-motion/events/room.entered", 1, `{"room":"kitchen"}`)
	inboxes["kitchen-light-2"].waitLen(t, 1, 10*time.Second)
	// The kitchen command went out with the hall's; kitchen-light-1 must not get a second one from it.
	publish(t, hallMotion, "devices/hall-motion/events/marker", 1, `{}`)
	eventually.True(t, 10*time.Second, "the marker event in the log", func() bool {
		return len(eventsOfType(logEvents(t, gw.Log()), "marker")) == 1
	})
	if got := inboxes["kitchen-light-1"].all(); len(got) != 1 {
		t.Errorf("kitchen-light-1 (moved to the hall) received %d commands, want only the hall's: %+v", len(got), got)
	}
	eventually.True(t, 10*time.Second, "thermo-1's revoked disconnect in the log", func() bool {
		for _, e := range eventsOfType(logEvents(t, gw.Log()), "device.disconnected") {
			if e.Subject == "thermo-1" && string(e.Data) == `{"reason":"revoked"}` {
				return true
			}
		}
		return false
	})
}

// reloadGateway starts a gateway with the shipped lights rules and returns it, its registry file and that file's
// content, its MQTT address, and a channel for thermo-1's connection loss (see connectThermo).
func reloadGateway(t *testing.T) (gw *testGateway, path string, original []byte, addr string, lost chan error) {
	t.Helper()
	gw = startGateway(t, func(c *gateway.Config) {
		writeRules(t, c.Rules.Dir, "lights.yaml", shippedLightsRules(t, "5m"))
	})
	path = gw.Cfg.Devices.Registry
	original, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return gw, path, original, gw.MQTTAddr("tcp"), make(chan error, 1)
}

// connectThermo connects thermo-1, sending the error of its connection loss to lost.
func connectThermo(t *testing.T, addr string, lost chan error) paho.Client {
	t.Helper()
	return connectClientWith(t, addr, "thermo-1", "thermo-1", "thermo-1-pw", func(o *paho.ClientOptions) {
		o.SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	})
}
