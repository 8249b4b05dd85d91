package gateway_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/ingest"
	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// TestPriorityLanesAfterAnOutage: a device's telemetry (priority 0) and alarms (priority 7, from a mapping) pile
// up in the log while the cloud broker is down. When it comes back, the alarms go up first on the sink's lane,
// every event arrives, each kind in order, and the log drains to empty: retention waits for both cursors.
func TestPriorityLanesAfterAnOutage(t *testing.T) {
	t.Parallel()
	const telemetry, alarmEvery = 600, 20
	cloud := mosquittotest.Start(t)
	col := newCloudCollector(t, cloud.URL())
	cloud.Save() // the collector's session survives the outage
	cloud.Stop()

	gw := startGateway(t, func(c *gateway.Config) {
		c.Log.Level = "info"
		c.Ingest.Mappings = []ingest.Mapping{{Name: "alarms", Topic: "devices/{device}/alarms/{type}", Type: "alarm.{type}", Priority: 7}}
		c.Forward.Sinks = []forward.SinkConfig{{
			Name: "cloud", Type: forward.TypeMQTT, PriorityLanes: []int{5},
			RateLimit:  400, // the lanes share it: the backlog takes about two seconds
			BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
			MQTT: &forward.MQTTConfig{URL: cloud.URL(), ConnectTimeout: time.Second},
		}}
	})
	dev := connectDevice(t, gw.MQTTAddr("tcp"), "hall-motion")
	alarms := 0
	for i := 1; i <= telemetry; i++ {
		publish(t, dev, "devices/hall-motion/telemetry", 1, fmt.Sprintf(`{"n":%d}`, i))
		if i%alarmEvery == 0 {
			alarms++
			publish(t, dev, "devices/hall-motion/alarms/smoke", 1, fmt.Sprintf(`{"n":%d}`, alarms))
		}
	}
	total := telemetry + alarms
	if st := gw.Log().Stats(); st.Events < int64(total) {
		t.Fatalf("backlog = %d events, want at least %d", st.Events, total)
	}

	cloud.Start()
	// Counted by type: the device's presence event goes up too, and the log drains once the cloud broker has
	// acknowledged everything, which may be before its subscriber has received the last events.
	waitFor(t, 30*time.Second, "every event upstream", func() bool { return col.uniqueOf("telemetry", "alarm.smoke") == total })
	waitFor(t, 30*time.Second, "the log drained", func() bool { return gw.Log().Stats().Events == 0 })

	got := col.all()
	seen := map[string]bool{}
	last := map[string]int{}
	temps, tempsBeforeLastAlarm := 0, -1
	for _, e := range got {
		if seen[e.id] || (e.typ != "telemetry" && e.typ != "alarm.smoke") { // presence events go up too
			continue
		}
		seen[e.id] = true
		if e.n <= last[e.typ] {
			t.Errorf("%s: n=%d arrived after n=%d", e.typ, e.n, last[e.typ])
		}
		last[e.typ] = e.n
		switch e.typ {
		case "telemetry":
			temps++
		case "alarm.smoke":
			tempsBeforeLastAlarm = temps
		}
	}
	if last["telemetry"] != telemetry || last["alarm.smoke"] != alarms {
		t.Errorf("last arrivals: telemetry %d (want %d), alarms %d (want %d)", last["telemetry"], telemetry,
			last["alarm.smoke"], alarms)
	}
	if tempsBeforeLastAlarm < 0 || tempsBeforeLastAlarm > telemetry/2 {
		t.Errorf("the last alarm arrived after %d of %d telemetry events: the lane did not go first",
			tempsBeforeLastAlarm, telemetry)
	}
	t.Logf("the last alarm arrived after %d of %d telemetry events", tempsBeforeLastAlarm, telemetry)
}

// TestQuietDeviceGoesAheadOfTheBacklog: while the cloud broker is down, hall-motion piles up a backlog, and
// thermo-1, quiet until then, reports once at the end. When the broker comes back, thermo-1's reading goes up
// ahead of hall-motion's backlog (it has nothing older to wait for), every event arrives once in the order its
// device sent it, and the log drains to empty.
func TestQuietDeviceGoesAheadOfTheBacklog(t *testing.T) {
	t.Parallel()
	const backlog = 600
	cloud := mosquittotest.Start(t)
	col := newCloudCollector(t, cloud.URL())
	cloud.Save() // the collector's session survives the outage
	cloud.Stop()

	gw := startGateway(t, func(c *gateway.Config) {
		c.Forward.Sinks = []forward.SinkConfig{{
			Name: "cloud", Type: forward.TypeMQTT, Window: 16,
			BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
			MQTT: &forward.MQTTConfig{URL: cloud.URL(), ConnectTimeout: time.Second},
		}}
	})
	hall := connectDevice(t, gw.MQTTAddr("tcp"), "hall-motion")
	for i := 1; i <= backlog; i++ {
		publish(t, hall, "devices/hall-motion/telemetry", 1, fmt.Sprintf(`{"n":%d}`, i))
	}
	thermo := connectDevice(t, gw.MQTTAddr("tcp"), "thermo-1")
	publish(t, thermo, "devices/thermo-1/telemetry", 1, `{"n":1}`)

	cloud.Start()
	waitFor(t, 30*time.Second, "the log drained", func() bool { return gw.Log().Stats().Events == 0 })
	// The cloud broker acknowledged everything; its subscriber may still be receiving.
	waitFor(t, 30*time.Second, "the collector has every telemetry event", func() bool {
		n := map[string]bool{}
		for _, e := range col.all() {
			if e.typ == "telemetry" {
				n[e.id] = true
			}
		}
		return len(n) == backlog+1
	})

	seen := map[string]bool{}
	last := map[string]int{}
	hallBefore := -1 // hall-motion's telemetry events that arrived before thermo-1's
	for _, e := range col.all() {
		if seen[e.id] || e.typ != "telemetry" {
			continue // presence events go up too
		}
		seen[e.id] = true
		if e.n <= last[e.subject] {
			t.Errorf("%s: n=%d arrived after n=%d", e.subject, e.n, last[e.subject])
		}
		last[e.subject] = e.n
		if e.subject == "thermo-1" {
			hallBefore = last["hall-motion"]
		}
	}
	if last["hall-motion"] != backlog || last["thermo-1"] != 1 {
		t.Fatalf("last arrivals: hall-motion %d (want %d), thermo-1 %d (want 1)", last["hall-motion"], backlog, last["thermo-1"])
	}
	if hallBefore >= backlog {
		t.Errorf("thermo-1's reading arrived after all %d of hall-motion's backlog", backlog)
	}
	if v := metricSum(t, gw.Reg, "edgegate_forward_sent_ahead_total", map[string]string{"sink": "cloud"}); v < 1 {
		t.Errorf("edgegate_forward_sent_ahead_total = %v, want thermo-1's events counted", v)
	}
	t.Logf("thermo-1's reading arrived after %d of hall-motion's %d backlog events", hallBefore, backlog)
}

// cloudEvent is what the cloud collector saw of one event.
type cloudEvent struct {
	id, typ, subject string
	n                int
}

// cloudCollector is a persistent-session subscriber on the cloud broker.
type cloudCollector struct {
	mu  sync.Mutex
	got []cloudEvent
}

func newCloudCollector(t *testing.T, url string) *cloudCollector {
	t.Helper()
	c := &cloudCollector{}
	opts := paho.NewClientOptions().AddBroker(url).SetClientID("cloud-collector").SetCleanSession(false).
		SetAutoReconnect(true).SetMaxReconnectInterval(50 * time.Millisecond).SetConnectRetry(true).
		SetConnectRetryInterval(50 * time.Millisecond).SetResumeSubs(true).SetOrderMatters(true)
	opts.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
		var ev struct {
			ID, Type, Subject string
			Data              struct{ N int }
		}
		if err := json.Unmarshal(m.Payload(), &ev); err != nil {
			t.Errorf("cloud collector: %s: %v", m.Topic(), err)
			return
		}
		c.mu.Lock()
		c.got = append(c.got, cloudEvent{id: ev.ID, typ: ev.Type, subject: ev.Subject, n: ev.Data.N})
		c.mu.Unlock()
	})
	cl := paho.NewClient(opts)
	if tok := cl.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud collector connect: %v", tok.Error())
	}
	if tok := cl.Subscribe("edgegate/#", 1, nil); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud collector subscribe: %v", tok.Error())
	}
	t.Cleanup(func() { cl.Disconnect(0) })
	return c
}

func (c *cloudCollector) all() []cloudEvent {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]cloudEvent(nil), c.got...)
}

// uniqueOf counts the distinct events of the given types received.
func (c *cloudCollector) uniqueOf(types ...string) int {
	seen := map[string]bool{}
	for _, e := range c.all() {
		if slices.Contains(types, e.typ) {
			seen[e.id] = true
		}
	}
	return len(seen)
}
