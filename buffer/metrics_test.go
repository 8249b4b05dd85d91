package buffer

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/edgegate/edgegate/internal/metricstest"
)

func testutilCounter(t testing.TB, l testLog, name string, labels ...string) float64 {
	t.Helper()
	return metricstest.Value(t, l.reg, name, labels...)
}

func testutilHistogramCount(t testing.TB, l testLog, name string) uint64 {
	t.Helper()
	mfs, err := l.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	return 0
}

func TestMetricsExposed(t *testing.T) {
	l := openTest(t, Config{Cursors: []string{"cloud"}}, 0)
	run(t, l.Log)
	appendN(t, l.Log, 10, ev)
	if err := l.Ack("cloud", 4); err != nil {
		t.Fatal(err)
	}
	want := `
# HELP edgegate_buffer_backlog_events Stored events a cursor has not acknowledged.
# TYPE edgegate_buffer_backlog_events gauge
edgegate_buffer_backlog_events{cursor="cloud"} 6
# HELP edgegate_buffer_events Events stored in the log.
# TYPE edgegate_buffer_events gauge
edgegate_buffer_events 10
# HELP edgegate_buffer_appended_total Events committed to the log.
# TYPE edgegate_buffer_appended_total counter
edgegate_buffer_appended_total 10
`
	if err := testutil.GatherAndCompare(l.reg, strings.NewReader(want), "edgegate_buffer_backlog_events",
		"edgegate_buffer_events", "edgegate_buffer_appended_total"); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"edgegate_buffer_append_duration_seconds", "edgegate_buffer_commit_batch_size",
		"edgegate_buffer_commit_duration_seconds", "edgegate_buffer_file_size_bytes", "edgegate_buffer_bytes",
		"edgegate_buffer_backlog_bytes", "edgegate_buffer_backlog_oldest_age_seconds", "edgegate_buffer_dropped_total",
		"edgegate_buffer_rejected_total", "edgegate_buffer_full"} {
		if n, err := testutil.GatherAndCount(l.reg, name); err != nil || n == 0 {
			t.Errorf("%s: %d series, %v", name, n, err)
		}
	}
	if n := testutilHistogramCount(t, l, "edgegate_buffer_append_duration_seconds"); n != 10 {
		t.Errorf("append duration observed %d times, want 10", n)
	}
	if lint, err := testutil.GatherAndLint(l.reg); err != nil || len(lint) > 0 {
		t.Errorf("lint: %v %v", lint, err)
	}
}

func histogramSum(t testing.TB, l testLog, name string) float64 {
	t.Helper()
	mfs, err := l.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetHistogram().GetSampleSum()
		}
	}
	return 0
}

// TestFsyncDurationInFsyncMode: in the default durability every commit's writes and fsyncs are observed in
// edgegate_buffer_fsync_duration_seconds (it is not only the periodic fsync of interval mode).
func TestFsyncDurationInFsyncMode(t *testing.T) {
	l := openTest(t, Config{}, 0)
	run(t, l.Log)
	appendN(t, l.Log, 20, ev)
	commits := testutilHistogramCount(t, l, "edgegate_buffer_commit_batch_size")
	syncs := testutilHistogramCount(t, l, "edgegate_buffer_fsync_duration_seconds")
	if commits < 20 || syncs != commits {
		t.Errorf("%d commits, %d fsync observations: want one per commit", commits, syncs)
	}
	if sum := histogramSum(t, l, "edgegate_buffer_fsync_duration_seconds"); sum <= 0 {
		t.Errorf("fsync duration sum %v, want > 0", sum)
	}
}
