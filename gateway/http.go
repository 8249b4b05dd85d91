package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/deadletter"
	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/rules"
)

// Status is what `edgegate status` and GET /api/status show.
type Status struct {
	ID       string               `json:"id"`
	Ready    bool                 `json:"ready"`
	Started  time.Time            `json:"started"`
	Uptime   string               `json:"uptime"`
	Clients  int                  `json:"clients"`
	Devices  int                  `json:"devices"`
	Backlog  buffer.Stats         `json:"backlog"`
	Sinks    []forward.SinkHealth `json:"sinks"`
	Rules    []rules.RuleInfo     `json:"rules"`
	Healthy  bool                 `json:"healthy"`
	Problems []string             `json:"problems,omitempty"`
}

// Handler serves the admin API: /metrics, /healthz, /readyz, /api/status, /api/devices, /api/deadletters.
func (g *Gateway) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g.reg, promhttp.HandlerOpts{Registry: g.reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		stalls := g.Stalls()
		if len(stalls) == 0 {
			_, _ = w.Write([]byte("ok\n"))
			return
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		for _, s := range stalls {
			_, _ = fmt.Fprintln(w, "stalled:", s)
		}
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		st := g.Status()
		code := http.StatusOK
		if !st.Ready || !st.Healthy {
			code = http.StatusServiceUnavailable
		}
		problems := st.Problems
		if problems == nil {
			problems = []string{}
		}
		writeJSON(w, code, map[string]any{"ready": st.Ready, "healthy": st.Healthy, "problems": problems, "sinks": st.Sinks})
	})
	mux.HandleFunc("GET /api/status", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, g.Status())
	})
	mux.HandleFunc("GET /api/devices", func(w http.ResponseWriter, _ *http.Request) {
		type dev struct {
			ID        string            `json:"id"`
			Name      string            `json:"name,omitempty"`
			Room      string            `json:"room,omitempty"`
			Kind      string            `json:"kind,omitempty"`
			Labels    map[string]string `json:"labels,omitempty"`
			Connected bool              `json:"connected"`
			State     map[string]any    `json:"state,omitempty"`
		}
		all := g.registry.All()
		out := make([]dev, 0, len(all)) // [] rather than null without devices
		for _, d := range all {
			st, _ := g.state.Get(d.ID)
			out = append(out, dev{ID: d.ID, Name: d.Name, Room: d.Room, Kind: d.Kind, Labels: d.Labels,
				Connected: g.broker.Connected(d.ID), State: st})
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("GET /api/deadletters", func(w http.ResponseWriter, r *http.Request) {
		after, limit, err := deadLetterQuery(r)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
			return
		}
		recs, err := g.dead.List(after, limit)
		if err != nil {
			code := http.StatusInternalServerError
			if errors.Is(err, deadletter.ErrClosed) {
				code = http.StatusServiceUnavailable // the gateway has stopped
			}
			writeJSON(w, code, map[string]string{"error": err.Error()})
			return
		}
		if recs == nil {
			recs = []deadletter.Record{}
		}
		writeJSON(w, http.StatusOK, recs)
	})
	return mux
}

// deadLetterQuery reads the parameters of GET /api/deadletters as the store's List takes them: after (a record id,
// default 0) and limit (absent: 0, which List, like any limit of 0 or less, takes as its default; List caps it).
// A value that is not a number is an error rather than a silent default: a client paging with a bad cursor would
// otherwise be shown the first page again.
func deadLetterQuery(r *http.Request) (after uint64, limit int, err error) {
	q := r.URL.Query()
	if v := q.Get("after"); v != "" {
		if after, err = strconv.ParseUint(v, 10, 64); err != nil {
			return 0, 0, fmt.Errorf("after: %q is not a record id (a number >= 0)", v)
		}
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil && !errors.Is(err, strconv.ErrRange) {
			return 0, 0, fmt.Errorf("limit: %q is not a number", v)
		}
		// Out of range: the largest or smallest int64. Clamped so that it fits an int wherever this runs.
		limit = int(max(min(n, deadletter.MaxListLimit), 0))
	}
	return after, limit, nil
}

// Stalls names the parts stuck in one step for longer than stall_timeout: the log in a commit (a disk that stopped
// answering) or the rules in one evaluation. None means the gateway is live; /healthz and the systemd watchdog
// follow it.
func (g *Gateway) Stalls() []string {
	var out []string
	if d := g.events.Busy(); d > g.cfg.StallTimeout {
		out = append(out, fmt.Sprintf("buffer: a commit of the log (writes and fsyncs) has been running for %s", d.Round(time.Millisecond)))
	}
	if d := g.rules.Busy(); d > g.cfg.StallTimeout {
		out = append(out, fmt.Sprintf("rules: one evaluation has been running for %s", d.Round(time.Millisecond)))
	}
	return out
}

// Status gathers the gateway's state for the status API and /readyz.
func (g *Gateway) Status() Status {
	st := Status{
		ID:      g.cfg.ID,
		Ready:   g.ready.Load(),
		Started: g.started,
		Clients: g.broker.Clients(),
		Devices: g.registry.Len(),
		Backlog: g.events.Stats(),
		Rules:   g.rules.Rules(),
		Healthy: true,
	}
	if !g.started.IsZero() {
		st.Uptime = time.Since(g.started).Round(time.Second).String()
	}
	for _, s := range g.Stalls() {
		st.Healthy = false
		st.Problems = append(st.Problems, "stalled: "+s)
	}
	sinks := g.fwd.Health()
	st.Sinks = sinks
	for _, s := range sinks {
		if !s.Healthy {
			st.Healthy = false
			st.Problems = append(st.Problems, "sink "+s.Name+" unhealthy: "+s.LastError)
		}
	}
	if !st.Ready {
		st.Problems = append(st.Problems, "not ready")
	}
	return st
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
