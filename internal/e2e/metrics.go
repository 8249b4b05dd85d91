//go:build linux

package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// Metrics is one scrape of /metrics: each sample's value by its series key, the metric name followed by its
// labels sorted by name, as in edgegate_forward_stalled{sink="cloud"}.
type Metrics map[string]float64

// SeriesKey builds the series key of name with label pairs given as "name", "value", … in any order.
func SeriesKey(name string, labelPairs ...string) string {
	if len(labelPairs) == 0 {
		return name
	}
	type kv struct{ k, v string }
	var kvs []kv
	for i := 0; i+1 < len(labelPairs); i += 2 {
		kvs = append(kvs, kv{labelPairs[i], labelPairs[i+1]})
	}
	slices.SortFunc(kvs, func(a, b kv) int { return strings.Compare(a.k, b.k) })
	var b strings.Builder
	b.WriteString(name)
	b.WriteByte('{')
	for i, p := range kvs {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%q", p.k, p.v)
	}
	b.WriteByte('}')
	return b.String()
}

// Get returns the value of the series name{labelPairs…} (0 when absent).
func (m Metrics) Get(name string, labelPairs ...string) float64 {
	return m[SeriesKey(name, labelPairs...)]
}

// Has reports whether the series name{labelPairs…} is present.
func (m Metrics) Has(name string, labelPairs ...string) bool {
	_, ok := m[SeriesKey(name, labelPairs...)]
	return ok
}

// Sum adds up every series of the metric name, whatever its labels.
func (m Metrics) Sum(name string) float64 {
	var s float64
	for k, v := range m {
		if k == name || strings.HasPrefix(k, name+"{") {
			s += v
		}
	}
	return s
}

// Metrics scrapes the gateway's /metrics.
func (g *Gateway) Metrics() (Metrics, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*1e9)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, g.HTTPURL()+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := g.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape: %s", resp.Status)
	}
	return ParseMetrics(resp.Body)
}

// MustMetrics scrapes /metrics and fails the test when it cannot.
func (g *Gateway) MustMetrics() Metrics {
	g.t.Helper()
	m, err := g.Metrics()
	if err != nil {
		g.t.Fatalf("e2e: %v", err)
	}
	return m
}

// ParseMetrics parses the Prometheus text exposition format (the samples; comments are skipped).
func ParseMetrics(r io.Reader) (Metrics, error) {
	m := Metrics{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		name, labels, rest := line, "", ""
		if i := strings.IndexByte(line, '{'); i >= 0 {
			j := strings.LastIndexByte(line, '}')
			if j < i {
				return nil, fmt.Errorf("metrics: bad line %q", line)
			}
			name, labels, rest = line[:i], line[i+1:j], strings.TrimSpace(line[j+1:])
		} else {
			f := strings.Fields(line)
			if len(f) < 2 {
				return nil, fmt.Errorf("metrics: bad line %q", line)
			}
			name, rest = f[0], f[1]
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return nil, fmt.Errorf("metrics: no value in %q", line)
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics: value in %q: %w", line, err)
		}
		pairs, err := parseLabels(labels)
		if err != nil {
			return nil, fmt.Errorf("metrics: labels in %q: %w", line, err)
		}
		m[SeriesKey(name, pairs...)] = v
	}
	return m, sc.Err()
}

// parseLabels splits `a="x",b="y"` into "a", "x", "b", "y".
func parseLabels(s string) ([]string, error) {
	var out []string
	for s = strings.TrimSpace(s); s != ""; {
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			return nil, fmt.Errorf("no '=' in %q", s)
		}
		k := strings.TrimSpace(s[:eq])
		s = strings.TrimSpace(s[eq+1:])
		v, rest, err := unquotePrefix(s)
		if err != nil {
			return nil, err
		}
		out = append(out, k, v)
		s = strings.TrimPrefix(strings.TrimSpace(rest), ",")
		s = strings.TrimSpace(s)
	}
	return out, nil
}

func unquotePrefix(s string) (val, rest string, err error) {
	if s == "" || s[0] != '"' {
		return "", "", fmt.Errorf("label value not quoted in %q", s)
	}
	for i := 1; i < len(s); i++ {
		switch s[i] {
		case '\\':
			i++
		case '"':
			v, err := strconv.Unquote(s[:i+1])
			if err != nil {
				return "", "", err
			}
			return v, s[i+1:], nil
		}
	}
	return "", "", fmt.Errorf("unterminated label value in %q", s)
}
