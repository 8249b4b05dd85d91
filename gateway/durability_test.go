package gateway_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestAckedEventIsDurable checks the durability contract end to end: once a QoS 1 publish is acknowledged, its
// CloudEvent is in the log (read straight away, no waiting) with every required attribute, and it is still there,
// unchanged, after the gateway restarts on the same data directory.
func TestAckedEventIsDurable(t *testing.T) {
	t.Parallel()
	gw := startGateway(t, nil)
	sensor := connectDevice(t, gw.MQTTAddr("tcp"), "hall-motion")

	const deviceTime = "2026-03-04T05:06:07Z"
	payload := `{"room":"hall","time":"` + deviceTime + `","level":3}`
	publish(t, sensor, "devices/hall-motion/events/room.entered", 1, payload)
	// The PUBACK arrived: the event must be readable now.
	got := eventsOfType(logEvents(t, gw.Log()), "room.entered")
	if len(got) != 1 {
		t.Fatalf("right after the PUBACK the log holds %d room.entered events, want 1", len(got))
	}
	ev := got[0]
	if ev.SpecVersion != "1.0" || ev.ID == "" || ev.Subject != "hall-motion" || ev.Type != "room.entered" {
		t.Errorf("event = %+v, want specversion 1.0, an id, subject hall-motion, type room.entered", ev)
	}
	if !strings.Contains(ev.Source, "edgegate") || !strings.Contains(ev.Source, "hall-motion") {
		t.Errorf("source %q, want it to name the gateway (edgegate) and the device (hall-motion)", ev.Source)
	}
	if want, _ := time.Parse(time.RFC3339, deviceTime); !ev.Time.Equal(want) {
		t.Errorf("time %s, want the device's timestamp %s", ev.Time, want)
	}
	if ev.DataContentType != "application/json" {
		t.Errorf("datacontenttype %q, want application/json", ev.DataContentType)
	}
	var data map[string]any
	if err := json.Unmarshal(ev.Data, &data); err != nil || data["room"] != "hall" || data["level"] != 3.0 {
		t.Errorf("data %s, want the payload %s (%v)", ev.Data, payload, err)
	}

	// Restart on the same data directory.
	gw.stop()
	gw2 := runGateway(t, gw.Cfg)
	again := eventsOfType(logEvents(t, gw2.Log()), "room.entered")
	if len(again) != 1 {
		t.Fatalf("after a restart the log holds %d room.entered events, want 1", len(again))
	}
	if a := again[0]; a.ID != ev.ID || a.Seq != ev.Seq || !a.Time.Equal(ev.Time) || a.Source != ev.Source || string(a.Data) != string(ev.Data) {
		t.Errorf("after a restart the event is %+v, want it unchanged: %+v", a, ev)
	}
	// New events continue the sequence and get new ids.
	sensor2 := connectDevice(t, gw2.MQTTAddr("tcp"), "hall-motion")
	publish(t, sensor2, "devices/hall-motion/events/room.entered", 1, `{"room":"hall"}`)
	evs := eventsOfType(logEvents(t, gw2.Log()), "room.entered")
	if len(evs) != 2 || evs[1].Seq <= ev.Seq || evs[1].ID == ev.ID {
		t.Errorf("after a restart a new event got %+v, want a later seq than %d and a new id", evs, ev.Seq)
	}
}
