//go:build linux

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Result is one scenario's run, stored as JSON in docs/benchmarks/<scenario>.json.
type Result struct {
	Scenario    string            `json:"scenario"`
	Title       string            `json:"title"`
	Description string            `json:"description"`
	Command     string            `json:"command"`
	Date        time.Time         `json:"date"`
	Machine     Machine           `json:"machine"`
	Quick       bool              `json:"quick"`
	Rounds      int               `json:"rounds"`
	Params      map[string]string `json:"params,omitempty"`
	// Subject names the system the result is about; every other row of a group shows subject ÷ row (medians).
	Subject string `json:"subject,omitempty"`
	Rows    []*Row `json:"rows"`
}

// Machine describes where a result was measured.
type Machine struct {
	CPU       string `json:"cpu"`
	Cores     int    `json:"cores"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"go_version"`
	OSArch    string `json:"os_arch"`
	Mosquitto string `json:"mosquitto,omitempty"`
}

// Row is one system in one group (e.g. "gateway" in "QoS 1"), measured once per round.
type Row struct {
	Group  string `json:"group"`
	System string `json:"system"`
	// Metric names the primary value (e.g. "msg/s"); Lower says smaller is better (latencies, sizes).
	Metric  string   `json:"metric"`
	Lower   bool     `json:"lower_is_better,omitempty"`
	Samples []Sample `json:"samples"`
}

// Sample is one round's measurement of a row.
type Sample struct {
	Round    int     `json:"round"`
	Value    float64 `json:"value"`
	Sent     int64   `json:"sent"`
	Received int64   `json:"received"`
	// RSSKiB and HWMKiB are the system under test's VmRSS at the end of the measurement and its VmHWM (peak);
	// CPUSeconds its user + system time during the measurement.
	RSSKiB     int64              `json:"rss_kib"`
	HWMKiB     int64              `json:"hwm_kib"`
	CPUSeconds float64            `json:"cpu_seconds"`
	Extra      map[string]float64 `json:"extra,omitempty"`
}

// Delivery is Received/Sent (1 when nothing was sent).
func (s Sample) Delivery() float64 {
	if s.Sent == 0 {
		return 1
	}
	return float64(s.Received) / float64(s.Sent)
}

// stat is the median and range of a value over the rounds.
type stat struct{ Median, Min, Max float64 }

func summarize(vs []float64) stat {
	if len(vs) == 0 {
		return stat{Median: math.NaN(), Min: math.NaN(), Max: math.NaN()}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{Median: m, Min: s[0], Max: s[len(s)-1]}
}

func (r *Row) stat(f func(Sample) float64) stat {
	vs := make([]float64, 0, len(r.Samples))
	for _, s := range r.Samples {
		vs = append(vs, f(s))
	}
	return summarize(vs)
}

// Value is the median and range of the primary value.
func (r *Row) Value() stat { return r.stat(func(s Sample) float64 { return s.Value }) }

// extraKeys lists the extra values of the row's samples in a stable order.
func (r *Row) extraKeys() []string {
	seen := map[string]bool{}
	var keys []string
	for _, s := range r.Samples {
		for k := range s.Extra {
			if !seen[k] {
				seen[k] = true
				keys = append(keys, k)
			}
		}
	}
	slices.SortStableFunc(keys, func(a, b string) int { return extraOrder(a) - extraOrder(b) })
	return keys
}

func extraOrder(k string) int {
	order := []string{"p50_ms", "p90_ms", "p99_ms", "max_ms", "connected", "idle_mib", "anon_mib", "kib_per_device",
		"transfer_rate", "first_delivery_ms", "live_p99_ms", "live_lost", "duplicates"}
	if i := slices.Index(order, k); i >= 0 {
		return i
	}
	return len(order)
}

// ratio is the median of the group's subject row over the median of row (NaN for the subject itself or
// without one).
func (res *Result) ratio(row *Row) float64 {
	if res.Subject == "" || row.System == res.Subject {
		return math.NaN()
	}
	for _, s := range res.Rows {
		if s.Group == row.Group && s.System == res.Subject {
			if m := row.Value().Median; m != 0 {
				return s.Value().Median / m
			}
		}
	}
	return math.NaN()
}

// row returns the row of group and system, adding it when it is new.
func (res *Result) row(group, system, metric string, lower bool) *Row {
	for _, r := range res.Rows {
		if r.Group == group && r.System == system {
			return r
		}
	}
	r := &Row{Group: group, System: system, Metric: metric, Lower: lower}
	res.Rows = append(res.Rows, r)
	return r
}

// save writes the result to dir/<scenario>.json (a quick run to <scenario>.quick.json, so that a smoke run never
// replaces a real one).
func (res *Result) save(dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("save result: %w", err)
	}
	name := res.Scenario + ".json"
	if res.Quick {
		name = res.Scenario + ".quick.json"
	}
	data, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return "", fmt.Errorf("save result: %w", err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		return "", fmt.Errorf("save result: %w", err)
	}
	return path, nil
}

// loadResults reads every <scenario>.json in dir (quick results are left out unless quick is set).
func loadResults(dir string, quick bool) ([]*Result, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, err
	}
	var out []*Result
	for _, p := range paths {
		if strings.HasSuffix(p, ".quick.json") != quick {
			continue
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", p, err)
		}
		var r Result
		if err := json.Unmarshal(data, &r); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		out = append(out, &r)
	}
	slices.SortFunc(out, func(a, b *Result) int { return scenarioOrder(a.Scenario) - scenarioOrder(b.Scenario) })
	return out, nil
}

func scenarioOrder(name string) int {
	for i, s := range scenarios() {
		if s.name == name {
			return i
		}
	}
	return 1 << 20
}

// fmtNum formats a value with a precision that suits its size.
func fmtNum(v float64) string {
	switch {
	case math.IsNaN(v):
		return "–"
	case v == math.Trunc(v) && math.Abs(v) < 1e15:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 1000:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.1f", v)
	case math.Abs(v) >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

func mib(kib float64) string { return fmt.Sprintf("%.1f", kib/1024) }

// table renders the result's rows as a Markdown table: median and range of the primary value, the ratio to
// the baseline, delivery, resources, and the medians of the extra values.
func (res *Result) table(w io.Writer) {
	keys := map[string]bool{}
	var extra []string
	for _, r := range res.Rows {
		for _, k := range r.extraKeys() {
			if !keys[k] {
				keys[k] = true
				extra = append(extra, k)
			}
		}
	}
	slices.SortStableFunc(extra, func(a, b string) int { return extraOrder(a) - extraOrder(b) })
	ratioHead := "ratio"
	if res.Subject != "" {
		ratioHead = res.Subject + " ÷ this"
	}
	head := []string{"group", "system", "median", "range", ratioHead, "delivered", "RSS MiB (peak)", "CPU s"}
	head = append(head, extra...)
	fmt.Fprintf(w, "| %s |\n", strings.Join(head, " | "))
	fmt.Fprintf(w, "|%s\n", strings.Repeat(" --- |", len(head)))
	for _, r := range res.Rows {
		v := r.Value()
		ratio := "–"
		if q := res.ratio(r); !math.IsNaN(q) {
			ratio = fmt.Sprintf("%.2f×", q)
		}
		del := r.stat(Sample.Delivery)
		delivered := "–"
		if r.stat(func(s Sample) float64 { return float64(s.Sent) }).Max > 0 {
			delivered = fmt.Sprintf("%.4f", del.Median)
			if del.Min != del.Max {
				delivered = fmt.Sprintf("%.4f (%.4f–%.4f)", del.Median, del.Min, del.Max)
			}
		}
		rss := r.stat(func(s Sample) float64 { return float64(s.RSSKiB) })
		hwm := r.stat(func(s Sample) float64 { return float64(s.HWMKiB) })
		cpu := r.stat(func(s Sample) float64 { return s.CPUSeconds })
		mem, cpus := "–", "–"
		if hwm.Max > 0 {
			mem = mib(rss.Median) + " (" + mib(hwm.Median) + ")"
			cpus = fmtNum(cpu.Median)
		}
		cells := []string{r.Group, r.System, fmtNum(v.Median) + " " + r.Metric,
			fmtNum(v.Min) + "–" + fmtNum(v.Max), ratio, delivered, mem, cpus}
		for _, k := range extra {
			st := r.stat(func(s Sample) float64 {
				if v, ok := s.Extra[k]; ok {
					return v
				}
				return math.NaN()
			})
			cells = append(cells, fmtNum(st.Median))
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
	}
}
