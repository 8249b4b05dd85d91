package rules

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the engine's Prometheus metrics. A nil *metrics counts nothing (dry runs).
type metrics struct {
	evaluated *prometheus.CounterVec
	matched   *prometheus.CounterVec
	actions   *prometheus.CounterVec
	errors    *prometheus.CounterVec
	duration  *prometheus.HistogramVec
	dropped   prometheus.Counter
	reloads   *prometheus.CounterVec
}

// ruleMetrics are one rule's series, resolved once at load.
type ruleMetrics struct {
	evaluated, matched, errors prometheus.Counter
	duration                   prometheus.Observer
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		evaluated: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_rules_evaluated_total", Help: "Events evaluated by a rule (its type matched the rule's index).",
		}, []string{"rule"}),
		matched: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_rules_matched_total", Help: "Events that matched a rule's on, when and pattern step (or window closes that passed).",
		}, []string{"rule"}),
		actions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_rules_actions_total",
			Help: "Actions taken by rules, by action (command, emit, state) and outcome (ok, failed, dropped, no_target, error, loop).",
		}, []string{"rule", "action", "outcome"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_rules_errors_total", Help: "Evaluation errors (expression type errors, bad templates, failed actions).",
		}, []string{"rule"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "edgegate_rules_evaluation_duration_seconds",
			Help:    "Time a rule takes to evaluate one event (match, condition, pattern step and actions); observed for every evaluation counted in edgegate_rules_evaluated_total.",
			Buckets: []float64{1e-6, 5e-6, 25e-6, 100e-6, 500e-6, 2.5e-3, 10e-3, 50e-3, 0.25, 1},
		}, []string{"rule"}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_rules_queue_dropped_total", Help: "Events not evaluated because the rules input queue was full.",
		}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_rules_reloads_total", Help: "Rule reloads by result (ok, error).",
		}, []string{"result"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.evaluated, m.matched, m.actions, m.errors, m.duration, m.dropped, m.reloads} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("rules: register metrics: %w", err)
			}
		}
	}
	for _, r := range []string{"ok", "error"} {
		m.reloads.WithLabelValues(r)
	}
	return m, nil
}

// bind resolves the per-rule counters of rules.
func (m *metrics) bind(rules []*rule) {
	for _, r := range rules {
		r.met = &ruleMetrics{
			evaluated: m.evaluated.WithLabelValues(r.name),
			matched:   m.matched.WithLabelValues(r.name),
			errors:    m.errors.WithLabelValues(r.name),
			duration:  m.duration.WithLabelValues(r.name),
		}
	}
}

func (m *metrics) rule(r *rule) *ruleMetrics {
	if r.met == nil {
		m.bind([]*rule{r})
	}
	return r.met
}

func (m *metrics) action(r *rule, kind actionKind, outcome string) {
	if m == nil {
		return
	}
	m.actions.WithLabelValues(r.name, kind.String(), outcome).Inc()
}

// logLimiter lets one message per key through every interval and counts the rest.
type logLimiter struct {
	mu         sync.Mutex
	every      time.Duration
	last       map[string]time.Time
	suppressed map[string]int
}

func newLogLimiter(every time.Duration) *logLimiter {
	return &logLimiter{every: every, last: map[string]time.Time{}, suppressed: map[string]int{}}
}

// log writes the record unless one with the same key was written less than every ago.
func (l *logLimiter) log(lg *slog.Logger, level slog.Level, key, msg string, args ...any) {
	l.mu.Lock()
	now := time.Now()
	if t, ok := l.last[key]; ok && now.Sub(t) < l.every {
		l.suppressed[key]++
		l.mu.Unlock()
		return
	}
	if len(l.last) > 10000 {
		clear(l.last)
		clear(l.suppressed)
	}
	l.last[key] = now
	n := l.suppressed[key]
	delete(l.suppressed, key)
	l.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed", n)
	}
	lg.Log(context.Background(), level, msg, args...)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
