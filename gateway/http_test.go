package gateway_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/internal/eventually"
)

// TestHTTPAPI checks the admin API of a running gateway: health, readiness (not before Run, then yes, then not
// after stop), the key metric families, the status document and the device list with state built from events.
func TestHTTPAPI(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	writeRules(t, cfg.Rules.Dir, "lights.yaml", shippedLightsRules(t, "5m"))
	gw := newGateway(t, cfg)

	// Before Run nothing is served yet; the handler itself must say "not ready".
	rec := httptest.NewRecorder()
	gw.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Errorf("/readyz before Run: status %d, want 503: %s", rec.Code, rec.Body)
	}
	if gw.Ready() {
		t.Error("Ready() before Run = true")
	}

	gw.start(t)
	addr := gw.HTTPAddr()
	if code, body := httpGet(t, addr, "/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %q, want 200 \"ok\\n\"", code, body)
	}
	var ready struct {
		Ready, Healthy bool
		Problems       []string
	}
	httpJSON(t, addr, "/readyz", 200, &ready)
	if !ready.Ready || !ready.Healthy || len(ready.Problems) != 0 {
		t.Errorf("/readyz after start: %+v, want ready and healthy without problems", ready)
	}

	mqttAddr := gw.MQTTAddr("tcp")
	thermo := connectDevice(t, mqttAddr, "thermo-1")
	motion := connectDevice(t, mqttAddr, "kitchen-motion")
	publish(t, thermo, "devices/thermo-1/telemetry", 1, `{"temp":21.5,"humidity":40}`)
	publish(t, motion, "devices/kitchen-motion/events/room.entered", 1, `{"room":"kitchen"}`)

	type device struct {
		ID        string         `json:"id"`
		Room      string         `json:"room"`
		Kind      string         `json:"kind"`
		Connected bool           `json:"connected"`
		State     map[string]any `json:"state"`
	}
	var devs []device
	httpJSON(t, addr, "/api/devices", 200, &devs)
	byID := map[string]device{}
	for _, d := range devs {
		byID[d.ID] = d
	}
	th := byID["thermo-1"]
	if th.Kind != "thermometer" || th.Room != "living-room" || !th.Connected {
		t.Errorf("/api/devices thermo-1 = %+v, want a connected thermometer in living-room", th)
	}
	if rep, _ := th.State["reported"].(map[string]any); rep["temp"] != 21.5 || rep["humidity"] != 40.0 {
		t.Errorf("/api/devices thermo-1 reported state = %v, want temp 21.5 and humidity 40", th.State["reported"])
	}
	if th.State["last_event"] != "telemetry" || th.State["online"] != true {
		t.Errorf("/api/devices thermo-1 state = %v, want last_event telemetry and online", th.State)
	}
	if km := byID["kitchen-motion"]; km.State["last_event"] != "room.entered" {
		t.Errorf("/api/devices kitchen-motion state = %v, want last_event room.entered", km.State)
	}
	if hl := byID["hall-light"]; hl.Connected || len(hl.State) != 0 {
		t.Errorf("/api/devices hall-light = %+v, want not connected and no state", hl)
	}

	var st struct {
		gateway.Status
		Backlog struct {
			Events  int64  `json:"events"`
			LastSeq uint64 `json:"last_seq"`
		} `json:"backlog"`
		Rules []struct {
			Name string `json:"name"`
			Kind string `json:"kind"`
		} `json:"rules"`
	}
	httpJSON(t, addr, "/api/status", 200, &st)
	if st.ID != "edgegate" || !st.Ready || !st.Healthy || st.Clients != 2 || st.Devices != len(devs) || st.Uptime == "" ||
		time.Since(st.Started) > time.Minute {
		t.Errorf("/api/status = %+v, want id edgegate, ready, healthy, 2 clients, %d devices, started just now", st.Status, len(devs))
	}
	// Two presence events, the telemetry and the motion.
	if st.Backlog.Events < 4 || st.Backlog.LastSeq < 4 {
		t.Errorf("/api/status backlog = %+v, want at least 4 events", st.Backlog)
	}
	if len(st.Rules) != 2 || st.Rules[0].Name != "lights-on-motion" || st.Rules[1].Kind != "absence" {
		t.Errorf("/api/status rules = %+v, want the two shipped light rules", st.Rules)
	}

	code, metrics := httpGet(t, addr, "/metrics")
	if code != 200 {
		t.Fatalf("/metrics: status %d", code)
	}
	mustContain(t, "/metrics", metrics,
		"edgegate_gateway_ready 1",
		"edgegate_gateway_stalled 0",
		"edgegate_ingest_connections 2",
		`edgegate_ingest_messages_total{qos="1"} 2`,
		"edgegate_ingest_events_total",
		"edgegate_ingest_normalize_duration_seconds_bucket",
		"edgegate_buffer_appended_total",
		"edgegate_buffer_fsync_duration_seconds_bucket",
		"edgegate_rules_evaluated_total",
		"edgegate_rules_evaluation_duration_seconds_bucket",
		"edgegate_deadletter_records 0",
	)

	gw.stop()
	if gw.Ready() {
		t.Error("Ready() after Run returned = true")
	}
	if got := metricSum(t, gw.Reg, "edgegate_gateway_ready", nil); got != 0 {
		t.Errorf("edgegate_gateway_ready after stop = %g, want 0", got)
	}
	// The handler still answers (for a last look); it reports not ready.
	rec = httptest.NewRecorder()
	gw.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	var after map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &after); err != nil || rec.Code != http.StatusServiceUnavailable || after["ready"] != false {
		t.Errorf("/readyz after stop: %d %s, want 503 with ready false", rec.Code, rec.Body)
	}
}

// TestHealthzNamesAStalledPart: with a stall_timeout shorter than any commit, /healthz answers 503 naming the log
// while devices keep it committing, and /readyz reports the problem; with the load over, both are fine again.
func TestHealthzNamesAStalledPart(t *testing.T) {
	t.Parallel()
	gw := startGateway(t, func(c *gateway.Config) { c.StallTimeout = time.Nanosecond })
	addr := gw.HTTPAddr()
	thermo := connectDevice(t, gw.MQTTAddr("tcp"), "thermo-1")

	stop, done := make(chan struct{}), make(chan struct{})
	go func() { // bounded: 20,000 events or 30 s
		defer close(done)
		deadline := time.Now().Add(30 * time.Second)
		for i := 0; i < 20000 && time.Now().Before(deadline); i++ {
			select {
			case <-stop:
				return
			default:
			}
			thermo.Publish("devices/thermo-1/telemetry", 1, false, fmt.Sprintf(`{"temp":%d}`, i)).WaitTimeout(10 * time.Second)
		}
	}()
	var code int
	var body string
	seen := eventually.Within(30*time.Second, func() bool {
		code, body = httpGet(t, addr, "/healthz")
		return code == http.StatusServiceUnavailable
	})
	close(stop)
	<-done
	if !seen {
		t.Fatalf("/healthz stayed %d %q while the log committed with stall_timeout 1ns", code, body)
	}
	mustContain(t, "the /healthz body", body, "stalled: buffer: a commit of the log (writes and fsyncs) has been running for")

	eventually.True(t, 10*time.Second, "/healthz to answer 200 ok once the load is over", func() bool {
		code, body = httpGet(t, addr, "/healthz")
		return code == http.StatusOK && body == "ok\n"
	})
	var ready struct {
		Healthy  bool
		Problems []string
	}
	httpJSON(t, addr, "/readyz", http.StatusOK, &ready)
	if !ready.Healthy || len(ready.Problems) != 0 {
		t.Errorf("/readyz after the load: %+v, want healthy without problems", ready)
	}
	if got := metricSum(t, gw.Reg, "edgegate_gateway_stalled", nil); got != 0 {
		t.Errorf("edgegate_gateway_stalled = %v after the load, want 0", got)
	}
}
