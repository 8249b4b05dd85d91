package buffer

import (
	"errors"
	"log/slog"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the log's Prometheus metrics; they exist (unregistered) when no registry is given.
type metrics struct {
	appendDuration prometheus.Histogram
	batchSize      prometheus.Histogram
	commitDuration prometheus.Histogram
	fsyncDuration  prometheus.Histogram
	appended       prometheus.Counter
	dropped        [numReasons]prometheus.Counter
	deleted        prometheus.Counter
	rejected       prometheus.Counter
	commitErrors   prometheus.Counter
	compactions    prometheus.Counter
	compactErrors  prometheus.Counter
	compactHeld    prometheus.Gauge
}

func newMetrics(l *Log, reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		appendDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "edgegate_buffer_append_duration_seconds",
			Help:    "Time from Append to the event being durable (fsync'd, or written in interval mode).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "edgegate_buffer_commit_batch_size",
			Help:    "Events per group commit.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 8),
		}),
		commitDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "edgegate_buffer_commit_duration_seconds",
			Help:    "Duration of one commit transaction: from its first event to the end of the commit, the appends it takes in while open and the fsync (in fsync mode) included.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		}),
		fsyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "edgegate_buffer_fsync_duration_seconds",
			Help:    "Duration of the writes and fsyncs of one commit in fsync mode (bbolt's write time: pages, fsync, meta page, fsync); of the periodic fsync in interval mode.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		}),
		appended: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_buffer_appended_total",
			Help: "Events committed to the log.",
		}),
		deleted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_buffer_delivered_deleted_total",
			Help: "Events deleted after every required cursor passed them (not a loss).",
		}),
		rejected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_buffer_rejected_total",
			Help: "Events refused with ErrFull (log or append queue full).",
		}),
		commitErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_buffer_commit_errors_total",
			Help: "Failed commits or fsyncs; the events of a failed commit are not acknowledged.",
		}),
		compactions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_buffer_compactions_total",
			Help: "Compactions of the log file that returned free space to the filesystem.",
		}),
		compactErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_buffer_compaction_errors_total",
			Help: "Compactions that failed (the log keeps its file).",
		}),
		compactHeld: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "edgegate_buffer_compaction_waiting_for_room",
			Help: "1 while the log file is mostly free space but the filesystem lacks the room for compaction's copy above min_free_bytes.",
		}),
	}
	dropped := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "edgegate_buffer_dropped_total",
		Help: "Events removed before every required cursor passed them, by reason (max_bytes, min_free, max_age, purge).",
	}, []string{"reason"})
	for r, name := range reasonNames {
		m.dropped[r] = dropped.WithLabelValues(name)
	}
	if reg == nil {
		return m, nil
	}
	cs := []prometheus.Collector{m.appendDuration, m.batchSize, m.commitDuration, m.fsyncDuration, m.appended,
		dropped, m.deleted, m.rejected, m.commitErrors, m.compactions, m.compactErrors, m.compactHeld, &collector{l: l}}
	var errs []error
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			errs = append(errs, err)
		}
	}
	return m, errors.Join(errs...)
}

var (
	descEvents = prometheus.NewDesc("edgegate_buffer_events",
		"Events stored in the log.", nil, nil)
	descBytes = prometheus.NewDesc("edgegate_buffer_bytes",
		"Bytes of the events stored in the log (the max_bytes measure).", nil, nil)
	descFileSize = prometheus.NewDesc("edgegate_buffer_file_size_bytes",
		"Size of the log file.", nil, nil)
	descFull = prometheus.NewDesc("edgegate_buffer_full",
		"1 when the log rejects new events for want of room.", nil, nil)
	descQueue = prometheus.NewDesc("edgegate_buffer_queue_events",
		"Events waiting for the next commit.", nil, nil)
	descBacklog = prometheus.NewDesc("edgegate_buffer_backlog_events",
		"Stored events a cursor has not acknowledged.", []string{"cursor"}, nil)
	descBacklogBytes = prometheus.NewDesc("edgegate_buffer_backlog_bytes",
		"Bytes of the stored events a cursor has not acknowledged (estimated within a segment).", []string{"cursor"}, nil)
	descBacklogAge = prometheus.NewDesc("edgegate_buffer_backlog_oldest_age_seconds",
		"Age (by event time) of the oldest event a cursor has not acknowledged; 0 when none.", []string{"cursor"}, nil)
)

// collector reports the gauges computed from the log's state at scrape time.
type collector struct{ l *Log }

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descEvents, descBytes, descFileSize, descFull, descQueue, descBacklog,
		descBacklogBytes, descBacklogAge} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	st := c.l.Stats()
	ch <- prometheus.MustNewConstMetric(descEvents, prometheus.GaugeValue, float64(st.Events))
	ch <- prometheus.MustNewConstMetric(descBytes, prometheus.GaugeValue, float64(st.Bytes))
	ch <- prometheus.MustNewConstMetric(descFileSize, prometheus.GaugeValue, float64(st.FileBytes))
	full := 0.0
	if st.Full {
		full = 1
	}
	ch <- prometheus.MustNewConstMetric(descFull, prometheus.GaugeValue, full)
	ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(st.Queued))
	for _, cs := range st.Cursors {
		ch <- prometheus.MustNewConstMetric(descBacklog, prometheus.GaugeValue, float64(cs.Backlog), cs.Name)
		ch <- prometheus.MustNewConstMetric(descBacklogBytes, prometheus.GaugeValue, float64(cs.BacklogBytes), cs.Name)
		ch <- prometheus.MustNewConstMetric(descBacklogAge, prometheus.GaugeValue, cs.OldestUnackedAge, cs.Name)
	}
}

// dropLog logs drops, rejections and commit failures at most once per second, with counts.
type dropLog struct {
	drops    [numReasons]int64
	rejected int64
	failures int64
	lastErr  error
	lost     int64
	last     time.Time
}

func (d *dropLog) failed(err error, events int) {
	d.failures++
	d.lost += int64(events)
	d.lastErr = err
}

func (d *dropLog) flush(now time.Time, logger *slog.Logger) {
	if now.Sub(d.last) < time.Second {
		return
	}
	var attrs []any
	for r, n := range d.drops {
		if n > 0 {
			attrs = append(attrs, reasonNames[r], n)
		}
	}
	if len(attrs) > 0 {
		logger.Warn("events dropped to make room or by age", attrs...)
	}
	if d.rejected > 0 {
		logger.Warn("events rejected: log full", "count", d.rejected)
	}
	if d.failures > 0 {
		logger.Error("commit failed: events not stored", "failures", d.failures, "events", d.lost, "error", d.lastErr)
	}
	if len(attrs) > 0 || d.rejected > 0 || d.failures > 0 {
		*d = dropLog{last: now}
	}
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}
