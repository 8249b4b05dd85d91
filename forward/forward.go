package forward

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
)

// Record is one event as stored in the log.
type Record struct {
	// Seq is the event's position in the log (increasing; gaps are possible where retention removed events).
	Seq uint64
	// Type and Subject are the CloudEvent's type and subject (the device id).
	Type, Subject string
	// Priority is the event's retention priority (the log drops lower priorities first when full).
	Priority uint8
	// Data is the CloudEvent in structured JSON, sent upstream as is.
	Data []byte
}

// Source is the durable log as a sink sees it.
type Source interface {
	// Read returns up to max committed records with Seq > after, in order.
	Read(after uint64, max int) ([]Record, error)
	// Wait blocks until a record with Seq > after exists or ctx ends (then it returns ctx's error).
	Wait(ctx context.Context, after uint64) error
	// Cursor returns the position of the named cursor (0: from the start).
	Cursor(name string) uint64
	// Ack advances the named cursor to upTo (never backwards); the log persists it soon after, without
	// Ack waiting for it.
	Ack(name string, upTo uint64) error
	// AckNow is Ack from a reader that sends nothing more until the position is persisted: the log stores it
	// as soon as it can, also when an Ack left it waiting to be grouped with later ones.
	AckNow(name string, upTo uint64) error
	// Persisted returns the position of the named cursor as durably stored: where it is after a crash.
	Persisted(name string) uint64
	// WaitPersisted blocks until the persisted position of the named cursor is past after, or ctx ends (then
	// it returns ctx's error).
	WaitPersisted(ctx context.Context, name string, after uint64) error
}

// PriorityReader is what a Source may also offer: reading only the records of some priorities. A priority
// lane uses it to pass over the others without reading them.
type PriorityReader interface {
	// ReadPriority returns up to max committed records with Seq > after and priority p, lo <= p < hi, in
	// order, and scanned: every record with after < Seq <= scanned that it did not return has another
	// priority.
	ReadPriority(after uint64, max int, lo, hi uint8) (recs []Record, scanned uint64, err error)
}

// CommandSink delivers cloud-to-device commands locally. It returns an error wrapping ErrUnknownDevice for a
// device it does not know; the sink dead-letters those (reason unknown_device).
type CommandSink interface {
	DeliverCommand(ctx context.Context, device, command string, payload []byte) error
}

// DeadLetterer keeps what could not be delivered, with the reason and enough context to look into it.
type DeadLetterer interface {
	DeadLetter(reason, detail, device, topic string, payload []byte)
}

// ErrUnknownDevice is what a CommandSink wraps when a command names a device it does not know.
var ErrUnknownDevice = errors.New("forward: unknown device")

// Dead-letter reasons used by the sinks.
const (
	// ReasonUnknownDevice: a cloud-to-device command for a device the gateway does not know.
	ReasonUnknownDevice = "unknown_device"
	// ReasonCommandFailed: a cloud-to-device command the gateway could not deliver locally.
	ReasonCommandFailed = "command_failed"
	// ReasonBadCommandTopic: a message on the command subscription whose topic does not fit the template.
	ReasonBadCommandTopic = "bad_command_topic"
	// ReasonUpstreamRejected: events an upstream refused for good: an HTTP 400, 409, 413, 415, 422 or 431, or
	// a NATS event larger than the server's max_payload or the stream's max_msg_size.
	ReasonUpstreamRejected = "upstream_rejected"
)

// SinkHealth is the state of one sink, for /readyz and `edgegate status`.
type SinkHealth struct {
	Name string `json:"name"`
	Type string `json:"type"`
	// Target is the upstream's URL without credentials.
	Target string `json:"target"`
	// Connected: the connection is up (http: the last request did not fail, or none was made yet).
	Connected bool `json:"connected"`
	// Healthy: connected and not stalled. During an upstream outage a sink is unhealthy; its events wait in
	// the log.
	Healthy bool `json:"healthy"`
	// Stalled: the last connection had events in flight and no acknowledgement within ack_timeout; it stays
	// set until an acknowledgement arrives on a later connection.
	Stalled bool `json:"stalled"`
	// LastError is the latest failure ("" when none yet), LastErrorTime when it happened.
	LastError     string    `json:"last_error,omitempty"`
	LastErrorTime time.Time `json:"last_error_time,omitzero"`
	// LastAck is when the upstream last acknowledged an event (zero: not yet).
	LastAck time.Time `json:"last_ack,omitzero"`
	// Cursor is the sequence number up to which every event has been carried (or passed over).
	Cursor uint64 `json:"cursor"`
	// InFlight counts the events sent and not yet acknowledged.
	InFlight int `json:"in_flight"`
}

// Forwarder runs the configured sinks, each draining the log through its own cursor.
type Forwarder struct {
	sinks     []*sink
	cursors   []string // the sinks' and lanes' log cursors (Config.CursorNames)
	metrics   *metrics
	log       *slog.Logger
	rateEvery time.Duration // how often the drain rate is measured
}

// New validates cfg and builds the sinks (TLS material is loaded here); it connects nothing: Run does.
// gatewayID names the gateway in client ids, topics and subjects. cmds may be nil (no cloud-to-device
// commands); dl and logger must not be nil; reg may be nil (metrics are then not exported).
func New(cfg Config, gatewayID string, src Source, cmds CommandSink, dl DeadLetterer, logger *slog.Logger, reg prometheus.Registerer) (*Forwarder, error) {
	if gatewayID == "" {
		return nil, errors.New("forward: new: empty gateway id")
	}
	if err := cfg.ValidateFor(gatewayID); err != nil {
		return nil, err
	}
	if src == nil || dl == nil || logger == nil {
		return nil, errors.New("forward: new: source, dead letterer and logger are required")
	}
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	log := logger.With("component", "forward")
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("forward: new: %w", err)
	}
	f := &Forwarder{metrics: m, log: log, rateEvery: time.Second, cursors: cfg.CursorNames()}
	for _, sc := range cfg.Sinks {
		sc = sc.withDefaults()
		lanes := sc.lanes()
		hi := uint8(maxPriority + 1)
		if len(lanes) > 0 {
			hi = lanes[len(lanes)-1]
		}
		s, err := newSink(sc, sc.Name, 0, hi, gatewayID, src, cmds, dl, log.With("sink", sc.Name), m)
		if err != nil {
			return nil, fmt.Errorf("forward: sink %s: %w", sc.Name, err)
		}
		if err := m.addSink(reg, s); err != nil {
			return nil, fmt.Errorf("forward: sink %s: %w", sc.Name, err)
		}
		f.sinks = append(f.sinks, s)
		if len(lanes) > 0 {
			s.moved = make(chan struct{}, 1)
		}
		top := uint8(maxPriority + 1)
		for _, lo := range lanes {
			name := LaneName(sc.Name, lo)
			ls, err := newSink(sc.lane(gatewayID, lo), name, lo, top, gatewayID, src, nil, dl, log.With("sink", name), m)
			if err != nil {
				return nil, fmt.Errorf("forward: sink %s: %w", name, err)
			}
			if err := m.addSink(reg, ls); err != nil {
				return nil, fmt.Errorf("forward: sink %s: %w", name, err)
			}
			ls.lim, ls.base = s.lim, s.cursor
			ls.pub = &lane{lo: lo, hi: top, notify: s.moved}
			s.lanes = append(s.lanes, ls.pub)
			f.sinks = append(f.sinks, ls)
			top = lo
		}
	}
	return f, nil
}

// CursorNames returns the log cursors of the sinks and their priority lanes ("sink:<name>",
// "sink:<name>@p<n>"); the log keeps an event until all of them have passed it.
func (f *Forwarder) CursorNames() []string {
	return slices.Clone(f.cursors)
}

// Run runs every sink until ctx ends, then closes their connections and returns nil. A sink never gives up:
// failures are retried with backoff and shown in Health and the metrics.
func (f *Forwarder) Run(ctx context.Context) error {
	if len(f.sinks) == 0 {
		<-ctx.Done()
		return nil
	}
	var g errgroup.Group
	for _, s := range f.sinks {
		g.Go(func() error { return s.run(ctx) })
	}
	g.Go(func() error {
		f.measureDrainRate(ctx)
		return nil
	})
	return g.Wait()
}

// measureDrainRate updates edgegate_forward_drain_rate_events_per_second every second from the acknowledged
// events counted since the last tick.
func (f *Forwarder) measureDrainRate(ctx context.Context) {
	t := time.NewTicker(f.rateEvery)
	defer t.Stop()
	last := make([]uint64, len(f.sinks))
	prev := time.Now()
	for i, s := range f.sinks {
		last[i] = s.ackedCount.Load()
	}
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			secs := now.Sub(prev).Seconds()
			prev = now
			for i, s := range f.sinks {
				n := s.ackedCount.Load()
				s.m.drainRate.Set(float64(n-last[i]) / secs)
				last[i] = n
			}
		}
	}
}

// Health returns the state of every sink, in configuration order.
func (f *Forwarder) Health() []SinkHealth {
	out := make([]SinkHealth, len(f.sinks))
	for i, s := range f.sinks {
		out[i] = s.health()
	}
	return out
}

// Healthy reports whether every sink is healthy (true without sinks).
func (f *Forwarder) Healthy() bool {
	for _, s := range f.sinks {
		if !s.health().Healthy {
			return false
		}
	}
	return true
}
