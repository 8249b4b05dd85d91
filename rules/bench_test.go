package rules

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

type discardStore struct{}

func (discardStore) Set(string, string, any)           {}
func (discardStore) Get(string) (map[string]any, bool) { return nil, false }

// BenchmarkEvaluate measures one event through the engine (timers, index, match, condition, template, action)
// with 1, 100 and 1000 rules loaded. One rule matches; the others listen to other types, ten of them through
// wildcard patterns. Goal: 1000 rules cost at most 3x one rule.
//
//	go test -run '^$' -bench BenchmarkEvaluate -benchmem ./rules/
func BenchmarkEvaluate(b *testing.B) {
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			var sb strings.Builder
			sb.WriteString(`rules:
  - name: hot
    on: {type: sensor.temperature, device: {kind: thermometer}}
    when: data.temp > 30
    actions: [{state: {key: hot, value: '{{ data.temp }}'}}]
`)
			wild := min(10, n-1)
			for i := 1; i < n; i++ {
				typ := fmt.Sprintf("other.type.%d", i)
				if i <= wild {
					typ = fmt.Sprintf("other.%d.*", i)
				}
				fmt.Fprintf(&sb, "  - name: r%d\n    on: {type: %q}\n    when: data.x == %d\n    actions: [{emit: {type: derived.%d}}]\n", i, typ, i, i)
			}
			cfg := DefaultConfig()
			cfg.Dir = writeRules(b, map[string]string{"bench.yaml": sb.String()})
			e, err := New(cfg, Deps{Directory: homeDevices, State: discardStore{}, Clock: NewSimClock(t0)},
				slog.New(slog.DiscardHandler), prometheus.NewRegistry())
			if err != nil {
				b.Fatal(err)
			}
			if got := len(e.Rules()); got != n {
				b.Fatalf("%d rules loaded", got)
			}
			ev := newEvent("sensor.temperature", "thermo-1", t0, map[string]any{"temp": 31.5})
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				e.mu.Lock()
				e.processLocked(ev)
				e.mu.Unlock()
			}
			b.StopTimer()
			if got := e.met.rule(e.set.Load().rules[0]); got == nil {
				b.Fatal("no metrics")
			}
		})
	}
}
