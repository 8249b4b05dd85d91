package ingest

import (
	"encoding/json"
	"testing"
	"time"
)

func TestPresenceGolden(t *testing.T) {
	cases := []struct {
		name      string
		prefix    string
		device    string
		connected bool
		reason    string
	}{
		{"presence_connected", "", "hall-motion", true, ""},
		{"presence_disconnected_will", "", "hall-motion", false, PresenceWillPublished},
		{"presence_prefixed", "com.example.", "hall-motion", false, PresenceConnectionLost},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := testNormalizer(t, NormalizeConfig{TypePrefix: c.prefix})
			r := n.Presence(c.device, c.connected, c.reason, received)
			checkResult(t, r)
			golden(t, c.name, goldenResult(t, r))
		})
	}
}

func TestPresenceReasons(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{})
	reasons := []string{PresenceCleanDisconnect, PresenceConnectionLost, PresenceWillPublished, PresenceKickedLimit,
		PresenceTakenOver, PresenceServerShutdown, "", "odd \"reason\"\n\x01\\ é \xff"}
	for _, reason := range reasons {
		for _, connected := range []bool{true, false} {
			r := n.Presence("dev 1", connected, reason, time.Time{})
			checkResult(t, r)
			want := "device.disconnected"
			if connected {
				want = "device.connected"
			}
			if r.Event.Type() != want || r.Event.Subject() != "dev 1" || r.Priority != 0 {
				t.Errorf("type %q subject %q priority %d", r.Event.Type(), r.Event.Subject(), r.Priority)
			}
			var data map[string]string
			if err := json.Unmarshal(r.Event.Data(), &data); err != nil {
				t.Fatalf("data %s: %v", r.Event.Data(), err)
			}
			wantReason := reason
			if reason == "odd \"reason\"\n\x01\\ é \xff" {
				wantReason = "odd \"reason\"\n\x01\\ é \ufffd"
			}
			if data["reason"] != wantReason || (reason == "" && len(data) != 0) {
				t.Errorf("data = %q, want reason %q", data, wantReason)
			}
			if r.Event.Time().IsZero() {
				t.Error("no time")
			}
		}
	}
}

func TestPresenceEmptyDevice(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{})
	r := n.Presence("", false, PresenceServerShutdown, received)
	checkResult(t, r)
	if r.Event.Subject() != "" {
		t.Errorf("subject = %q, want none", r.Event.Subject())
	}
}
