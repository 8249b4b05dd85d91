package forward

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// request is what the test server saw of one request.
type request struct {
	header http.Header
	body   string
	at     time.Time
}

// upstream is an httptest server on loopback answering with reply.
type upstream struct {
	mu    sync.Mutex
	reqs  []request
	reply func(n int, r request) (code int, header map[string]string)
	srv   *httptest.Server
}

func newUpstream(t *testing.T, reply func(n int, r request) (int, map[string]string)) *upstream {
	u := &upstream{reply: reply}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		req := request{header: r.Header.Clone(), body: string(body), at: time.Now()}
		u.mu.Lock()
		n := len(u.reqs)
		u.reqs = append(u.reqs, req)
		u.mu.Unlock()
		code, hdr := http.StatusNoContent, map[string]string(nil)
		if u.reply != nil {
			code, hdr = u.reply(n, req)
		}
		for k, v := range hdr {
			w.Header().Set(k, v)
		}
		w.WriteHeader(code)
	}))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *upstream) requests() []request {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]request(nil), u.reqs...)
}

func httpSink(url, mode string) SinkConfig {
	s := fastSink("web", TypeHTTP)
	s.HTTP = &HTTPConfig{URL: url, Mode: mode, Headers: map[string]Secret{"X-Api-Key": "k1"}, BearerToken: "tok"}
	return s
}

func TestHTTPModes(t *testing.T) {
	tests := []struct {
		mode  string
		check func(t *testing.T, reqs []request, log *memLog)
	}{
		{ModeStructured, func(t *testing.T, reqs []request, log *memLog) {
			recs, _ := log.Read(0, 10)
			if len(reqs) != 3 {
				t.Fatalf("%d requests, want 3", len(reqs))
			}
			for i, r := range reqs {
				if ct := r.header.Get("Content-Type"); ct != contentTypeStructured {
					t.Errorf("Content-Type = %q", ct)
				}
				if r.body != string(recs[i].Data) {
					t.Errorf("body %d = %s, want %s", i, r.body, recs[i].Data)
				}
			}
		}},
		{ModeBinary, func(t *testing.T, reqs []request, _ *memLog) {
			if len(reqs) != 3 {
				t.Fatalf("%d requests, want 3", len(reqs))
			}
			r := reqs[1]
			want := map[string]string{"Ce-Id": "ev-000002", "Ce-Type": "sensor.reading", "Ce-Subject": "kitchen",
				"Ce-Specversion": "1.0", "Ce-Source": "edgegate/gw1/kitchen", "Content-Type": "application/json"}
			for k, v := range want {
				if got := r.header.Get(k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if r.body != `{"n":2}` {
				t.Errorf("body = %s, want the event's data", r.body)
			}
		}},
		{ModeBatch, func(t *testing.T, reqs []request, log *memLog) {
			if len(reqs) != 1 {
				t.Fatalf("%d requests, want 1", len(reqs))
			}
			if ct := reqs[0].header.Get("Content-Type"); ct != contentTypeBatch {
				t.Errorf("Content-Type = %q", ct)
			}
			var evs []map[string]any
			if err := json.Unmarshal([]byte(reqs[0].body), &evs); err != nil || len(evs) != 3 {
				t.Fatalf("batch body %s: %v (%d events)", reqs[0].body, err, len(evs))
			}
			if evs[2]["id"] != "ev-000003" {
				t.Errorf("third event = %v", evs[2])
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.mode, func(t *testing.T) {
			up := newUpstream(t, nil)
			log := newMemLog(t)
			for i, s := range []string{"hall", "kitchen", "porch"} {
				log.add("sensor.reading", s, i+1)
			}
			r := startForwarder(t, Config{Sinks: []SinkConfig{httpSink(up.srv.URL, tc.mode)}}, log, nil)
			waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:web") == 3 })
			reqs := up.requests()
			tc.check(t, reqs, log)
			for _, rq := range reqs {
				if rq.header.Get("X-Api-Key") != "k1" || rq.header.Get("Authorization") != "Bearer tok" {
					t.Errorf("headers = %v", rq.header)
				}
			}
			if h := sinkHealth(r, "web"); !h.Healthy || h.Cursor != 3 {
				t.Errorf("health = %+v", h)
			}
		})
	}
}

// TestHTTPRetryAfter: 503 and 429 are retried no sooner than Retry-After asks, although the backoff is short.
func TestHTTPRetryAfter(t *testing.T) {
	tests := []struct {
		name string
		code int
	}{{"503", http.StatusServiceUnavailable}, {"429", http.StatusTooManyRequests}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t, func(n int, _ request) (int, map[string]string) {
				if n == 0 {
					return tc.code, map[string]string{"Retry-After": "1"}
				}
				return http.StatusOK, nil
			})
			log := newMemLog(t)
			log.add("sensor.reading", "hall", 1)
			sc := httpSink(up.srv.URL, ModeStructured)
			sc.BackoffMin, sc.BackoffMax = time.Millisecond, 5*time.Millisecond
			r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
			waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:web") == 1 })
			reqs := up.requests()
			if len(reqs) != 2 {
				t.Fatalf("%d requests, want 2", len(reqs))
			}
			if gap := reqs[1].at.Sub(reqs[0].at); gap < 900*time.Millisecond {
				t.Errorf("retried after %s, Retry-After asked for 1s", gap)
			}
			if reqs[0].body != reqs[1].body {
				t.Error("the retry carried a different body")
			}
			if v := testutil.ToFloat64(r.f.metrics.resent.WithLabelValues("web")); v != 1 {
				t.Errorf("resent_total = %v, want 1", v)
			}
			if len(r.dl.all()) != 0 {
				t.Errorf("dead letters: %+v", r.dl.all())
			}
		})
	}
}

// TestHTTPRejected: a 4xx (other than 408/429) dead-letters the event and the sink moves on.
func TestHTTPRejected(t *testing.T) {
	up := newUpstream(t, func(_ int, r request) (int, map[string]string) {
		if strings.Contains(r.body, `"type":"bad"`) {
			return http.StatusBadRequest, nil
		}
		return http.StatusAccepted, nil
	})
	log := newMemLog(t)
	log.add("sensor.reading", "hall", 1)
	bad := log.add("bad", "porch", 2)
	log.add("sensor.reading", "hall", 3)
	r := startForwarder(t, Config{Sinks: []SinkConfig{httpSink(up.srv.URL, ModeStructured)}}, log, nil)
	waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:web") == 3 })
	dls := r.dl.all()
	if len(dls) != 1 {
		t.Fatalf("dead letters = %+v, want 1", dls)
	}
	recs, _ := log.Read(bad-1, 1)
	if d := dls[0]; d.reason != ReasonUpstreamRejected || d.device != "porch" || string(d.payload) != string(recs[0].Data) ||
		!strings.Contains(d.detail, "400") || d.topic != up.srv.URL {
		t.Errorf("dead letter = %+v", d)
	}
	if len(up.requests()) != 3 {
		t.Errorf("%d requests, want 3 (no retry of the rejected event)", len(up.requests()))
	}
	if v := testutil.ToFloat64(r.f.metrics.acked.WithLabelValues("web")); v != 2 {
		t.Errorf("acked_total = %v, want 2", v)
	}
}

// TestHTTPStall: a request without an answer within ack_timeout is a stall; the event is sent again.
func TestHTTPStall(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	up := newUpstream(t, func(n int, _ request) (int, map[string]string) {
		if n == 0 {
			<-release
		}
		return http.StatusOK, nil
	})
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	log := newMemLog(t)
	log.add("sensor.reading", "hall", 1)
	sc := httpSink(up.srv.URL, ModeStructured)
	sc.AckTimeout = 200 * time.Millisecond
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:web") == 1 })
	once.Do(func() { close(release) })
	if v := testutil.ToFloat64(r.f.metrics.errors.WithLabelValues("web")); v < 1 {
		t.Errorf("errors_total = %v after a stall", v)
	}
	if h := sinkHealth(r, "web"); h.Stalled || !strings.Contains(h.LastError, "stalled") {
		t.Errorf("health after recovery = %+v", h)
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Duration
	}{
		{"", 0},
		{"0", 0},
		{"-3", 0},
		{"2", 2 * time.Second},
		{" 7 ", 7 * time.Second},
		{"99999999999999", time.Minute},
		{"Wed, 01 May 2024 12:00:30 GMT", 30 * time.Second},
		{"Wed, 01 May 2024 13:00:00 GMT", time.Minute},
		{"Wed, 01 May 2024 11:00:00 GMT", 0},
		{"soon", 0},
	}
	for _, tc := range tests {
		if got := parseRetryAfter(tc.in, now, time.Minute); got != tc.want {
			t.Errorf("parseRetryAfter(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

// TestHTTPHealthDuringOutage: an HTTP sink whose upstream keeps failing stays unhealthy between its retries (its
// "connection" is only a client, always there), and turns healthy once a request succeeds.
func TestHTTPHealthDuringOutage(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	up := newUpstream(t, func(int, request) (int, map[string]string) {
		if down.Load() {
			return http.StatusServiceUnavailable, nil
		}
		return http.StatusNoContent, nil
	})
	log := newMemLog(t)
	log.add("sensor.reading", "s1", 1)
	sc := httpSink(up.srv.URL, ModeStructured)
	sc.BackoffMin, sc.BackoffMax = 5*time.Millisecond, 20*time.Millisecond // many retries in the sampled time
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitFor(t, 10*time.Second, "the first failure", func() bool { return sinkHealth(r, "web").LastError != "" })
	tries := len(up.requests())
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
		if h := sinkHealth(r, "web"); h.Healthy || h.Connected {
			t.Fatalf("healthy between two failed requests: %+v", h)
		}
	}
	if n := len(up.requests()) - tries; n < 5 {
		t.Fatalf("only %d retries in a second: the sampling proves little", n)
	}
	down.Store(false)
	waitFor(t, 10*time.Second, "healthy after a request succeeded", func() bool {
		h := sinkHealth(r, "web")
		return h.Healthy && h.Connected && h.Cursor == 1
	})
}

// TestHTTPEndpointRefused: an answer that says the endpoint or the credentials are wrong (an expired token, a
// wrong URL) is about every event alike: the sink retries, its cursor stays, nothing is dead-lettered, and
// health shows it unhealthy with the answer; once the endpoint accepts, every event is delivered, in order.
func TestHTTPEndpointRefused(t *testing.T) {
	const events = 3
	for _, code := range []int{http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound,
		http.StatusMethodNotAllowed, http.StatusProxyAuthRequired, http.StatusGone} {
		t.Run(strconv.Itoa(code), func(t *testing.T) {
			var refusing atomic.Bool
			refusing.Store(true)
			var mu sync.Mutex
			var delivered []string
			up := newUpstream(t, func(_ int, r request) (int, map[string]string) {
				if refusing.Load() {
					return code, nil
				}
				mu.Lock()
				delivered = append(delivered, r.body)
				mu.Unlock()
				return http.StatusOK, nil
			})
			log := newMemLog(t)
			for i := range events {
				log.add("sensor.reading", "hall", i+1)
			}
			sc := httpSink(up.srv.URL, ModeStructured)
			sc.BackoffMin, sc.BackoffMax = time.Millisecond, 5*time.Millisecond
			r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
			waitFor(t, 10*time.Second, "retries, or the events passed over", func() bool {
				return len(up.requests()) > events+2 && sinkHealth(r, "web").LastError != "" ||
					log.Cursor("sink:web") > 0 || len(r.dl.all()) > 0
			})
			if c := log.Cursor("sink:web"); c != 0 {
				t.Errorf("cursor = %d while the endpoint refuses, want 0", c)
			}
			if dls := r.dl.all(); len(dls) != 0 {
				t.Errorf("%d dead letters while the endpoint refuses, want none; the first: %s", len(dls), dls[0].detail)
			}
			if h := sinkHealth(r, "web"); h.Healthy || h.Connected || !strings.Contains(h.LastError, strconv.Itoa(code)) ||
				h.LastErrorTime.IsZero() {
				t.Errorf("health while the endpoint refuses = %+v", h)
			}
			reqs := up.requests()
			for _, rq := range reqs {
				if rq.body != reqs[0].body {
					t.Fatalf("a request carried another event than the first: the cursor moved")
				}
			}

			refusing.Store(false)
			waitFor(t, 10*time.Second, "every event delivered", func() bool { return log.Cursor("sink:web") == events })
			recs, _ := log.Read(0, events)
			mu.Lock()
			got := slices.Clone(delivered)
			mu.Unlock()
			if len(got) != events {
				t.Fatalf("%d events delivered, want %d", len(got), events)
			}
			for i, rec := range recs {
				if got[i] != string(rec.Data) {
					t.Errorf("delivered %d = %s, want %s", i, got[i], rec.Data)
				}
			}
			if dls := r.dl.all(); len(dls) != 0 {
				t.Errorf("dead letters: %+v", dls)
			}
			waitFor(t, 10*time.Second, "healthy once delivered", func() bool {
				h := sinkHealth(r, "web")
				return h.Healthy && h.Connected
			})
		})
	}
}

// TestHTTPRefusesEvents: which answers dead-letter the events of a request, and which retry them.
func TestHTTPRefusesEvents(t *testing.T) {
	refuse := []int{400, 409, 413, 415, 422, 431}
	for code := 100; code < 600; code++ {
		if got, want := refusesEvents(code), slices.Contains(refuse, code); got != want {
			t.Errorf("refusesEvents(%d) = %t, want %t", code, got, want)
		}
	}
}

// TestHTTPRejectionHealth: a refused event is the sink's last error. The refusal is an answer, so it ends a
// stall, but it does not show a sink that failed connected again: only an acknowledgement does.
func TestHTTPRejectionHealth(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	up := newUpstream(t, func(n int, r request) (int, map[string]string) {
		if n == 0 {
			<-release // no answer: a stall
		}
		if strings.Contains(r.body, `"type":"bad"`) {
			return http.StatusUnprocessableEntity, nil
		}
		return http.StatusOK, nil
	})
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	log := newMemLog(t)
	log.add("bad", "hall", 1)
	sc := httpSink(up.srv.URL, ModeStructured)
	sc.AckTimeout = 200 * time.Millisecond
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitFor(t, 10*time.Second, "the event dead-lettered after a stall", func() bool {
		return log.Cursor("sink:web") == 1 && len(r.dl.all()) == 1
	})
	if h := sinkHealth(r, "web"); h.Stalled || h.Connected || h.Healthy || !strings.Contains(h.LastError, "422") {
		t.Errorf("health after a stall and a refusal = %+v, want not stalled, not connected, 422 as the last error", h)
	}
	if v := testutil.ToFloat64(r.f.metrics.stalled.WithLabelValues("web")); v != 0 {
		t.Errorf("stalled = %v after an answer", v)
	}

	log.add("sensor.reading", "hall", 2)
	waitFor(t, 10*time.Second, "healthy after an acknowledgement", func() bool {
		h := sinkHealth(r, "web")
		return h.Healthy && h.Connected && h.Cursor == 2 && !h.LastAck.IsZero()
	})
}
