package forward

import (
	"crypto/tls"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestRateLimit: a rate cap of 100 events/s spreads 30 events over at least 0.29 s (burst 1). Only a lower
// bound is checked: the cap may never be exceeded, whatever the machine.
func TestRateLimit(t *testing.T) {
	up := newUpstream(t, nil)
	log := newMemLog(t)
	for i := range 30 {
		log.add("sensor.reading", "hall", i+1)
	}
	sc := httpSink(up.srv.URL, ModeStructured)
	sc.RateLimit = 100
	startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:web") == 30 })
	reqs := up.requests()
	if len(reqs) != 30 {
		t.Fatalf("%d requests, want 30", len(reqs))
	}
	if span := reqs[29].at.Sub(reqs[0].at); span < 280*time.Millisecond {
		t.Errorf("30 events at 100/s took %s, less than the cap allows", span)
	}
}

// TestCursorStoreFailure: when the log cannot store the cursor the sink goes on sending, counts the error and
// stores the cursor once the log works again.
func TestCursorStoreFailure(t *testing.T) {
	up := newUpstream(t, nil)
	log := newMemLog(t)
	log.mu.Lock()
	log.ackErr = errors.New("disk on fire")
	log.mu.Unlock()
	for i := range 5 {
		log.add("sensor.reading", "hall", i+1)
	}
	r := startForwarder(t, Config{Sinks: []SinkConfig{httpSink(up.srv.URL, ModeStructured)}}, log, nil)
	waitFor(t, 10*time.Second, "every event sent", func() bool { return len(up.requests()) == 5 })
	waitFor(t, 10*time.Second, "the failure counted", func() bool {
		return testutil.ToFloat64(r.f.metrics.errors.WithLabelValues("web")) >= 1
	})
	if c := log.Cursor("sink:web"); c != 0 {
		t.Errorf("cursor = %d while the log fails", c)
	}
	// The fifth acknowledgement may still be on its way when the fifth request and the first failure are seen.
	waitFor(t, 10*time.Second, "the health cursor at 5 (carried, not yet stored)", func() bool {
		return sinkHealth(r, "web").Cursor == 5
	})
	if c := log.Cursor("sink:web"); c != 0 {
		t.Errorf("cursor = %d while the log fails", c)
	}
	log.mu.Lock()
	log.ackErr = nil
	log.mu.Unlock()
	log.add("sensor.reading", "hall", 6)
	waitFor(t, 10*time.Second, "the cursor stored", func() bool { return log.Cursor("sink:web") == 6 })
	if len(up.requests()) != 6 {
		t.Errorf("%d requests, want 6 (nothing sent twice)", len(up.requests()))
	}
}

// TestDrainRateAndAckAge: the drain rate gauge follows the acknowledged events and falls to 0 when they stop.
// The last-ack age grows while nothing is acknowledged, past the time the sink has been idle, and drops back
// to about 0 with the next acknowledgement. Each age read is checked against bounds measured around it: the
// last acknowledgement happened between adding the last event and seeing the cursor pass it.
func TestDrainRateAndAckAge(t *testing.T) {
	up := newUpstream(t, nil)
	log := newMemLog(t)
	r := startForwarderWith(t, Config{Sinks: []SinkConfig{httpSink(up.srv.URL, ModeStructured)}}, log, nil,
		func(f *Forwarder) { f.rateEvery = 20 * time.Millisecond })
	rate := r.f.metrics.drainRate.WithLabelValues("web")
	stop := make(chan struct{})
	produced := make(chan struct{})
	go func() {
		defer close(produced)
		for i := 0; i < 2000; i++ {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			log.add("sensor.reading", "hall", i+1)
		}
	}()
	waitFor(t, 10*time.Second, "a drain rate above zero", func() bool { return testutil.ToFloat64(rate) > 0 })
	close(stop)
	<-produced

	// ackOne adds an event and waits until it is acknowledged: the sink's last acknowledgement then lies
	// between the two times returned.
	ackOne := func() (after, before time.Time) {
		t.Helper()
		after = time.Now()
		seq := log.add("sensor.reading", "hall", 5000+int(log.last()))
		waitFor(t, 10*time.Second, "the cursor past the new event", func() bool { return log.Cursor("sink:web") == seq })
		return after, time.Now()
	}
	// checkAge reads the age and checks it against the bounds the window [ackAfter, ackBefore] of the last
	// acknowledgement gives; it returns the age read.
	checkAge := func(what string, ackAfter, ackBefore time.Time) float64 {
		t.Helper()
		lo := time.Since(ackBefore).Seconds()
		age := lastAckAge(t, r, "web")
		hi := time.Since(ackAfter).Seconds()
		if age < lo || age > hi {
			t.Errorf("%s: last ack age = %.4f s, want between %.4f and %.4f", what, age, lo, hi)
		}
		return age
	}

	ackAfter, ackBefore := ackOne()
	waitFor(t, 10*time.Second, "the drain rate back to 0 with nothing to acknowledge", func() bool {
		return testutil.ToFloat64(rate) == 0
	})
	// Idle: the age grows past the time since the cursor passed the last event.
	const idle = 0.3 // seconds
	waitFor(t, 10*time.Second, fmt.Sprintf("the last ack age past %v s", idle), func() bool {
		return lastAckAge(t, r, "web") > idle
	})
	first := checkAge("idle", ackAfter, ackBefore)
	if first <= idle {
		t.Errorf("idle: last ack age = %.4f s, want more than %v s", first, idle)
	}
	waitFor(t, 10*time.Second, "the last ack age to keep growing", func() bool {
		return lastAckAge(t, r, "web") > first
	})
	grown := checkAge("still idle", ackAfter, ackBefore)

	// A new acknowledgement brings it back to about 0.
	ackAfter, ackBefore = ackOne()
	if age := checkAge("after a new ack", ackAfter, ackBefore); age >= grown || age >= idle {
		t.Errorf("after a new ack: last ack age = %.4f s, not back near 0 (it was %.4f s)", age, grown)
	}
}

// lastAckAge reads edgegate_forward_last_ack_age_seconds of the named sink from the forwarder's registry.
func lastAckAge(t *testing.T, r *running, sinkName string) float64 {
	t.Helper()
	mfs, err := r.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "edgegate_forward_last_ack_age_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if l := m.GetLabel(); len(l) == 1 && l[0].GetName() == "sink" && l[0].GetValue() == sinkName {
				return m.GetGauge().GetValue()
			}
		}
	}
	t.Fatalf("edgegate_forward_last_ack_age_seconds{sink=%q} not exported", sinkName)
	return 0
}

// TestHTTPTLS: a server is trusted through ca_file; without it the sink does not send and says why.
func TestHTTPTLS(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		tls    TLSConfig
		sends  bool
		errHas string
	}{
		{name: "ca_file", tls: TLSConfig{CAFile: ca}, sends: true},
		{name: "insecure_skip_verify", tls: TLSConfig{InsecureSkipVerify: true}, sends: true},
		{name: "system roots", tls: TLSConfig{}, errHas: "certificate"},
		{name: "wrong server name", tls: TLSConfig{CAFile: ca, ServerName: "other.example"}, errHas: "certificate"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			log := newMemLog(t)
			log.add("sensor.reading", "hall", 1)
			sc := httpSink(srv.URL, ModeStructured)
			sc.HTTP.TLS = tc.tls
			r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
			if tc.sends {
				waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:web") == 1 })
				return
			}
			waitFor(t, 10*time.Second, "a TLS error", func() bool {
				return strings.Contains(sinkHealth(r, "web").LastError, tc.errHas)
			})
			if log.Cursor("sink:web") != 0 {
				t.Error("cursor moved without a trusted server")
			}
		})
	}
	if _, err := tlsConfig(TLSConfig{CertFile: ca, KeyFile: ca}, testLogger(t)); err == nil {
		t.Error("a certificate without its key loaded")
	}
	if c, err := tlsConfig(TLSConfig{CAFile: ca, ServerName: "x"}, testLogger(t)); err != nil || c.ServerName != "x" ||
		c.MinVersion != tls.VersionTLS12 {
		t.Errorf("tlsConfig = %+v, %v", c, err)
	}
}
