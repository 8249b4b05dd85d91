package forward

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the forwarder's collectors, labelled by sink only.
type metrics struct {
	sent, sentAhead, acked, resent, reconnects, errors *prometheus.CounterVec
	connected, stalled, inFlight, drainRate, ahead     *prometheus.GaugeVec
}

// sinkMetrics are one sink's children of the collectors.
type sinkMetrics struct {
	sent, sentAhead, acked, resent, reconnects, errors prometheus.Counter
	connected, stalled, inFlight, drainRate, ahead     prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	counter := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_forward_" + name, Help: help}, []string{"sink"})
	}
	gauge := func(name, help string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "edgegate_forward_" + name, Help: help}, []string{"sink"})
	}
	m := &metrics{
		sent: counter("sent_total", "Events handed to the upstream connection, resends included."),
		sentAhead: counter("sent_ahead_total", "Events sent ahead of a backlog (included in sent_total): after a reconnect with more than "+
			"four windows of events to send, the events of a device with nothing older left to send go first."),
		acked: counter("acked_total", "Events acknowledged by the upstream (counted once: when the sink's cursor passes them, "+
			"or for an event sent ahead of a backlog, when it is acknowledged)."),
		resent:     counter("resent_total", "Events sent again after a reconnect because their acknowledgement was not received."),
		reconnects: counter("reconnects_total", "Connection attempts after a failure (lost connection, stall, refused or failed attempt)."),
		errors:     counter("errors_total", "Failures: connection attempts and connections that failed, stalls, sends refused, log errors, events rejected."),
		connected:  gauge("connected", "1 when the sink's upstream connection is up, else 0."),
		stalled:    gauge("stalled", "1 when the upstream stopped acknowledging events in flight (until an acknowledgement arrives again), else 0."),
		inFlight:   gauge("in_flight", "Events sent and not yet acknowledged."),
		drainRate:  gauge("drain_rate_events_per_second", "Events acknowledged per second, measured over the last second."),
		ahead: gauge("sending_ahead", "1 while the sink drains a backlog and sends the events of devices with nothing older left to "+
			"send ahead of it, else 0."),
	}
	for _, c := range []prometheus.Collector{m.sent, m.sentAhead, m.acked, m.resent, m.reconnects, m.errors, m.connected, m.stalled, m.inFlight, m.drainRate, m.ahead} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *metrics) forSink(name string) sinkMetrics {
	return sinkMetrics{
		sent:       m.sent.WithLabelValues(name),
		sentAhead:  m.sentAhead.WithLabelValues(name),
		acked:      m.acked.WithLabelValues(name),
		resent:     m.resent.WithLabelValues(name),
		reconnects: m.reconnects.WithLabelValues(name),
		errors:     m.errors.WithLabelValues(name),
		connected:  m.connected.WithLabelValues(name),
		stalled:    m.stalled.WithLabelValues(name),
		inFlight:   m.inFlight.WithLabelValues(name),
		drainRate:  m.drainRate.WithLabelValues(name),
		ahead:      m.ahead.WithLabelValues(name),
	}
}

// addSink registers the sink's last-ack-age gauge: seconds since the upstream last acknowledged an event (since
// the sink started when none has been yet; 0 before it starts). It grows while there is nothing to send, so
// alert on it together with the log's backlog.
func (m *metrics) addSink(reg prometheus.Registerer, s *sink) error {
	return reg.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "edgegate_forward_last_ack_age_seconds",
		Help:        "Seconds since the upstream last acknowledged an event (since the sink started when none has been yet).",
		ConstLabels: prometheus.Labels{"sink": s.name},
	}, func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		since := s.st.lastAck
		if since.IsZero() {
			since = s.started
		}
		if since.IsZero() {
			return 0
		}
		return time.Since(since).Seconds()
	}))
}
