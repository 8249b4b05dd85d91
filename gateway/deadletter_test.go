package gateway_test

import (
	"bytes"
	"context"
	"net"
	"os/exec"
	"testing"
	"time"

	"github.com/edgegate/edgegate/deadletter"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/ingest"
)

// TestDeadLettersThroughTheGateway sends what cannot become an event — a non-JSON payload on a JSON mapping (with
// mosquitto_pub) and a publish on a topic no mapping knows (with paho) — and finds both, with their original bytes,
// in DeadLetters() and /api/deadletters, counted in the metrics, while the device stays connected and its next
// good message becomes an event.
func TestDeadLettersThroughTheGateway(t *testing.T) {
	t.Parallel()
	mosquittoPub, err := exec.LookPath("mosquitto_pub")
	if err != nil {
		t.Fatalf("mosquitto_pub not installed (scripts/test.sh installs mosquitto-clients): %v", err)
	}
	gw := startGateway(t, func(c *gateway.Config) {
		c.Ingest.Mappings = []ingest.Mapping{{Name: "readings", Topic: "devices/{device}/readings/{type}",
			Type: "reading.{type}", Format: ingest.FormatJSON}}
	})
	addr := gw.MQTTAddr("tcp")
	host, port := splitAddr(t, addr)
	thermo := connectDevice(t, addr, "thermo-1")

	// 1. Not JSON on the JSON mapping, from a second connection of the same device (client id "thermo-1:cli").
	notJSON := []byte("twenty-one degrees")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, mosquittoPub, "-h", host, "-p", port, "-i", "thermo-1:cli",
		"-u", "thermo-1", "-P", "thermo-1-pw", "-q", "1", "-t", "devices/thermo-1/readings/temp",
		"-m", string(notJSON)).CombinedOutput()
	if err != nil {
		t.Fatalf("mosquitto_pub: %v: %s", err, out)
	}
	// 2. A topic no mapping matches, on the persistent paho connection.
	unknown := []byte(`{"x":1}`)
	publish(t, thermo, "devices/thermo-1/diagnostics/x", 1, string(unknown))

	want := []struct {
		reason, topic string
		payload       []byte
	}{
		{ingest.ReasonNotJSON, "devices/thermo-1/readings/temp", notJSON},
		{ingest.ReasonUnknownTopic, "devices/thermo-1/diagnostics/x", unknown},
	}
	var recs []deadletter.Record
	waitFor(t, 5*time.Second, "2 dead letters", func() bool {
		recs, err = gw.DeadLetters().List(0, 100)
		return err == nil && len(recs) >= 2
	})
	var api []deadletter.Record
	httpJSON(t, gw.HTTPAddr(), "/api/deadletters", 200, &api)
	for name, got := range map[string][]deadletter.Record{"DeadLetters().List": recs, "/api/deadletters": api} {
		if len(got) != len(want) {
			t.Fatalf("%s: %d records, want %d: %+v", name, len(got), len(want), got)
		}
		for i, w := range want {
			r := got[i]
			if r.Reason != w.reason || r.Topic != w.topic || r.DeviceID != "thermo-1" || !bytes.Equal(r.Payload, w.payload) {
				t.Errorf("%s[%d] = {reason %q topic %q device %q payload %q}, want {%q %q thermo-1 %q}",
					name, i, r.Reason, r.Topic, r.DeviceID, r.Payload, w.reason, w.topic, w.payload)
			}
			if r.Detail == "" || r.Time.IsZero() || r.ID == 0 {
				t.Errorf("%s[%d]: detail, time and id must be set: %+v", name, i, r)
			}
		}
	}

	for _, w := range want {
		if got := metricSum(t, gw.Reg, "edgegate_ingest_dead_letters_total", map[string]string{"reason": w.reason}); got != 1 {
			t.Errorf("edgegate_ingest_dead_letters_total{reason=%q} = %g, want 1", w.reason, got)
		}
	}
	if got := metricSum(t, gw.Reg, "edgegate_deadletter_records", nil); got != 2 {
		t.Errorf("edgegate_deadletter_records = %g, want 2", got)
	}
	_, metrics := httpGet(t, gw.HTTPAddr(), "/metrics")
	mustContain(t, "/metrics", metrics, `edgegate_ingest_dead_letters_total{reason="not_json"} 1`,
		`edgegate_ingest_dead_letters_total{reason="unknown_topic"} 1`)

	// The device was not punished: still connected, and its next good message is an event.
	if !thermo.IsConnectionOpen() {
		t.Fatal("thermo-1 was disconnected by its dead letter")
	}
	publish(t, thermo, "devices/thermo-1/readings/temp", 1, `{"temp":21.5}`)
	if evs := eventsOfType(logEvents(t, gw.Log()), "reading.temp"); len(evs) != 1 {
		t.Errorf("log holds %d reading.temp events after a good publish, want 1", len(evs))
	}
	var devs []struct {
		ID        string `json:"id"`
		Connected bool   `json:"connected"`
	}
	httpJSON(t, gw.HTTPAddr(), "/api/devices", 200, &devs)
	for _, d := range devs {
		if d.ID == "thermo-1" && !d.Connected {
			t.Error("/api/devices shows thermo-1 disconnected")
		}
	}
}

func splitAddr(t testing.TB, addr string) (host, port string) {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return host, port
}
