package gateway_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/gateway"
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
