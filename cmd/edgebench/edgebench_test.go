//go:build linux

package main

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func needMosquitto(t *testing.T) {
	t.Helper()
	if findMosquitto() == "" {
		t.Fatal("mosquitto is not installed (scripts/test.sh installs it); the baselines need it")
	}
}

// The quick run of every scenario goes through the command line as a person would run it, writes one result
// per scenario, and the report renders them: the harness cannot rot unnoticed.
func TestQuickRunOfEveryScenario(t *testing.T) {
	needMosquitto(t)
	dir := t.TempDir()
	// A bound against a hang only: it includes building the gateway and the bench tools, which on a loaded 2-core
	// machine takes minutes.
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	if code := runMain(ctx, []string{"run", "--quick", "--out", dir, "all"}, &stdout, &stderr); code != 0 {
		t.Fatalf("edgebench run --quick all: exit %d\n%s\n%s", code, stdout.String(), stderr.String())
	}
	results, err := loadResults(dir, true)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]*Result{}
	for _, r := range results {
		byName[r.Scenario] = r
	}
	for _, s := range scenarios() {
		r := byName[s.name]
		if r == nil {
			t.Errorf("%s: no result written", s.name)
			continue
		}
		if len(r.Rows) == 0 || !r.Quick || r.Machine.Cores == 0 || r.Machine.GoVersion == "" {
			t.Errorf("%s: %d rows, quick %t, machine %+v", s.name, len(r.Rows), r.Quick, r.Machine)
		}
		for _, row := range r.Rows {
			if len(row.Samples) != 1 {
				t.Errorf("%s %s/%s: %d samples, want 1", s.name, row.Group, row.System, len(row.Samples))
			}
			for _, smp := range row.Samples {
				if !(smp.Value > 0) {
					t.Errorf("%s %s/%s: value %v", s.name, row.Group, row.System, smp.Value)
				}
				if row.Group != "binary size" && (smp.RSSKiB <= 0 || smp.HWMKiB < smp.RSSKiB) {
					t.Errorf("%s %s/%s: rss %d KiB, peak %d KiB", s.name, row.Group, row.System, smp.RSSKiB, smp.HWMKiB)
				}
			}
		}
	}
	t.Run("ingest", func(t *testing.T) {
		r := need(t, byName, "ingest", 6)
		for _, row := range r.Rows {
			// QoS 1: every acknowledged message was received; for the gateway, every one is an event in the log.
			if row.Group == "QoS 1" && row.Samples[0].Delivery() != 1 {
				t.Errorf("%s %s: delivered %d of %d", row.Group, row.System, row.Samples[0].Received, row.Samples[0].Sent)
			}
			if row.Samples[0].Sent != 10*int64(pickQuickCount(row.Group)) {
				t.Errorf("%s %s: sent %d", row.Group, row.System, row.Samples[0].Sent)
			}
		}
	})
	t.Run("durable", func(t *testing.T) {
		r := need(t, byName, "durable", 6) // 2 device counts × fsync, interval, bare mochi
		for _, row := range r.Rows {
			x := row.Samples[0].Extra
			if row.Samples[0].Delivery() != 1 || !(x["p50_ms"] > 0 && x["p50_ms"] <= x["p99_ms"] && x["p99_ms"] <= x["max_ms"]) {
				t.Errorf("%s %s: delivered %.3f, latency %v", row.Group, row.System, row.Samples[0].Delivery(), x)
			}
		}
	})
	t.Run("latency", func(t *testing.T) {
		r := need(t, byName, "latency", 5)
		for _, row := range r.Rows {
			// Every room.entered was answered by exactly one command to the room's one light (or, for the
			// floor of the one-at-a-time probe, reached the light itself).
			if s := row.Samples[0]; s.Sent == 0 || s.Received != s.Sent {
				t.Errorf("%s: %d commands for %d events", row.System, s.Received, s.Sent)
			}
		}
	})
	t.Run("footprint", func(t *testing.T) {
		r := need(t, byName, "footprint", 9)
		for _, row := range r.Rows {
			s := row.Samples[0]
			switch {
			case strings.HasSuffix(row.Group, "devices connected"):
				if s.Received != s.Sent || s.Extra["connected"] != float64(s.Sent) {
					t.Errorf("%s: %d of %d devices connected", row.System, s.Received, s.Sent)
				}
			case row.Group == "binary size" && row.System == "gateway":
				if s.Value < 1 || s.Value > 500 {
					t.Errorf("binary size %.1f MiB", s.Value)
				}
			}
		}
	})
	t.Run("online-drain", func(t *testing.T) {
		for name, rows := range map[string]int{"online": 3, "drain": 5} {
			r := need(t, byName, name, rows)
			for _, row := range r.Rows {
				if (row.System == "gateway" || row.System == liveLaneSystem || row.System == batchSystem) && row.Samples[0].Delivery() != 1 {
					t.Errorf("%s gateway: delivered %.3f", name, row.Samples[0].Delivery())
				}
				if row.System == "bridge-defaults" && row.Samples[0].Delivery() >= 1 {
					t.Errorf("drain bridge-defaults kept a backlog over its queue limit: delivered %.3f", row.Samples[0].Delivery())
				}
			}
		}
	})
	t.Run("report", func(t *testing.T) {
		md := filepath.Join(dir, "benchmarks.md")
		stdout.Reset()
		if code := runMain(ctx, []string{"report", "--quick", "--in", dir, "--out", md}, &stdout, &stderr); code != 0 {
			t.Fatalf("report: exit %d: %s", code, stderr.String())
		}
		data, err := os.ReadFile(md)
		if err != nil {
			t.Fatal(err)
		}
		text := string(data)
		for _, s := range scenarios() {
			if !strings.Contains(text, "\n## "+s.name+" — ") {
				t.Errorf("report lacks scenario %s", s.name)
			}
		}
		for _, want := range []string{"- Command: `go run ./cmd/edgebench run --quick --out ", "- Machine: ", " cores, Linux ",
			"| QoS 1 | gateway | ", "gateway ÷ this"} {
			if !strings.Contains(text, want) {
				t.Errorf("report lacks %q", want)
			}
		}
	})
}

func pickQuickCount(group string) int {
	if group == "QoS 0" {
		return 300
	}
	return 200
}

func need(t *testing.T, m map[string]*Result, name string, rows int) *Result {
	t.Helper()
	r := m[name]
	if r == nil || len(r.Rows) != rows {
		t.Fatalf("%s: want %d rows, got %+v", name, rows, r)
	}
	return r
}

// children lists the processes whose parent is this process, and every process in their process groups.
func children(t *testing.T, groups map[int]bool) []string {
	t.Helper()
	self := os.Getpid()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatalf("no /proc: %v", err)
	}
	var out []string
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		s := string(stat)
		i := strings.LastIndexByte(s, ')')
		f := strings.Fields(s[i+1:])
		if len(f) < 3 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		pgrp, _ := strconv.Atoi(f[2])
		if ppid == self && pgrp == pid {
			groups[pgrp] = true
		}
		if ppid == self || groups[pgrp] {
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			out = append(out, fmt.Sprintf("%d %s %s", pid, s[strings.IndexByte(s, '('):i+1],
				strings.ReplaceAll(string(cmdline), "\x00", " ")))
		}
	}
	return out
}

// Interrupting a run (as SIGINT does, through the context) kills every process it started, with their groups.
func TestInterruptLeavesNoProcess(t *testing.T) {
	needMosquitto(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan int, 1)
	var stdout, stderr bytes.Buffer
	go func() {
		done <- runMain(ctx, []string{"run", "--quick", "--out", t.TempDir(), "latency"}, &stdout, &stderr)
	}()
	// Wait until a system under test runs with devsim's load on it, then interrupt.
	groups := map[int]bool{}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		procs := strings.Join(children(t, groups), "\n")
		if strings.Contains(procs, "(devsim) ") && strings.Contains(procs, " --broker ") &&
			(strings.Contains(procs, "(edgegate)") || strings.Contains(procs, "(mosquitto)")) {
			break
		}
		select {
		case code := <-done:
			t.Fatalf("run ended (exit %d) before it was interrupted\n%s", code, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("devsim never started; processes: %s", procs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	select {
	case code := <-done:
		if code == 0 {
			t.Errorf("interrupted run exited 0")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("run did not return within 30s of the interrupt")
	}
	if left := children(t, groups); len(left) > 0 {
		t.Errorf("processes left after the interrupt:\n%s", strings.Join(left, "\n"))
	}
}

func TestSummarize(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want stat
	}{
		{[]float64{3, 1, 2}, stat{2, 1, 3}},
		{[]float64{4, 1, 3, 2}, stat{2.5, 1, 4}},
		{[]float64{7}, stat{7, 7, 7}},
	} {
		if got := summarize(tc.in); got != tc.want {
			t.Errorf("summarize(%v) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
	if got := summarize(nil); !math.IsNaN(got.Median) {
		t.Errorf("summarize(nil) = %+v", got)
	}
	res := &Result{Subject: "gateway", Rows: []*Row{
		{Group: "g", System: "gateway", Samples: []Sample{{Value: 30}, {Value: 10}, {Value: 20}}},
		{Group: "g", System: "mosquitto", Samples: []Sample{{Value: 40}, {Value: 40}, {Value: 40}}},
	}}
	if q := res.ratio(res.Rows[1]); q != 0.5 {
		t.Errorf("ratio %v, want 0.5", q)
	}
	if q := res.ratio(res.Rows[0]); !math.IsNaN(q) {
		t.Errorf("ratio of the subject %v, want NaN", q)
	}
}

func TestMetricSum(t *testing.T) {
	exp := []byte("# HELP x\nedgegate_ingest_messages_total{qos=\"0\"} 5\nedgegate_ingest_messages_total{qos=\"1\"} 7\n" +
		"edgegate_ingest_messages_total_other 100\nedgegate_buffer_appended_total 3e+06\n")
	if v, ok := metricSum(exp, "edgegate_ingest_messages_total"); !ok || v != 12 {
		t.Errorf("messages %v %v", v, ok)
	}
	if v, ok := metricSum(exp, "edgegate_buffer_appended_total"); !ok || v != 3e6 {
		t.Errorf("appended %v %v", v, ok)
	}
	if _, ok := metricSum(exp, "missing"); ok {
		t.Error("missing metric found")
	}
}
