package ingest_test

import (
	"strings"
	"testing"

	"github.com/edgegate/edgegate/ingest"
)

// TestListenerOff checks that "off" disables a listener as an empty address does, in Validate and in NewBroker alike.
func TestListenerOff(t *testing.T) {
	cases := []struct {
		name               string
		listen, ws, tlsLis string
		wantErr            string // "" for valid
	}{
		{"tcp only, others off", "127.0.0.1:0", "off", "off", ""},
		{"tcp only, others empty", "127.0.0.1:0", "", "", ""},
		{"all off", "off", "off", "off", "no listener enabled"},
		{"all empty", "", "", "", "no listener enabled"},
		{"tcp off, websocket off, tls empty", "off", "off", "", "no listener enabled"},
		{"tcp empty, websocket empty, tls off", "", "", "off", "no listener enabled"},
		{"websocket only", "off", "127.0.0.1:0", "off", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := ingest.DefaultBrokerConfig()
			cfg.Listen, cfg.WebSocket, cfg.TLS.Listen = c.listen, c.ws, c.tlsLis
			err := cfg.Validate()
			if c.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Fatalf("Validate: %v, want an error with %q", err, c.wantErr)
			}
			// "off" needs no certificate: only the missing listener is reported.
			if strings.Contains(err.Error(), "mqtt.tls.cert_file") {
				t.Errorf("Validate asks for a certificate of a TLS listener that is off: %v", err)
			}
		})
	}

	// A configuration that validates runs: "off" is not bound as an address.
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.WebSocket, c.TLS.Listen = "off", "off" }})
	if tb.addr == "" {
		t.Error("no TCP listener")
	}
	for _, l := range []string{"ws", "tls"} {
		if a := tb.Addr(l); a != "" {
			t.Errorf("listener %s bound at %s, want it off", l, a)
		}
	}
}
