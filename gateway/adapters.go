package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/cloudevents/sdk-go/v2/event"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/deadletter"
	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/ingest"
	"github.com/edgegate/edgegate/rules"
)

// consumer takes each event from ingest: the state view and the rules see it as it enters the log's commit
// queue (not an event the log refuses); the log makes it durable (QoS 1) or queues it (QoS 0).
type consumer struct{ g *Gateway }

var _ ingest.AsyncConsumer = consumer{}

func (c consumer) Consume(ctx context.Context, r ingest.Result, durable bool) error {
	e, see := c.entry(r), func() { c.see(r) }
	if !durable {
		return fullErr(c.g.events.EnqueueFunc(e, see))
	}
	p, err := c.g.events.AppendAsyncFunc(ctx, e, see)
	if err == nil {
		_, err = p.Wait(ctx)
	}
	return fullErr(err)
}

// ConsumeAsync queues a QoS 1 event; the device's PUBACK waits for its commit, while its next publishes go on.
func (c consumer) ConsumeAsync(ctx context.Context, r ingest.Result) (ingest.Durability, error) {
	p, err := c.g.events.AppendAsyncFunc(ctx, c.entry(r), func() { c.see(r) })
	if err != nil {
		return ingest.Durability{}, fullErr(err)
	}
	return ingest.Durability{Done: p.Done(), Wait: func(ctx context.Context) error {
		_, err := p.Wait(ctx)
		return fullErr(err)
	}}, nil
}

// entry is the log entry of an event.
func (c consumer) entry(r ingest.Result) buffer.Entry {
	return buffer.Entry{Data: r.JSON, Type: r.Event.Type(), Subject: r.Event.Subject(), Time: r.Event.Time(), Priority: r.Priority}
}

// see shows the event to the state view and the rules once the log has queued it. With the engine idle the rules
// run here, and their commands are written before the log writer is woken for the event.
func (c consumer) see(r ingest.Result) {
	if r.DataJSON {
		c.g.state.ApplyChecked(r.Event) // the normalizer validated the JSON data
	} else {
		c.g.state.Apply(r.Event)
	}
	c.g.rules.Submit(r.Event)
}

// fullErr marks the log's ErrFull as ingest's, so that the device is refused the way its protocol allows.
func fullErr(err error) error {
	if errors.Is(err, buffer.ErrFull) {
		return fmt.Errorf("%w: %w", ingest.ErrFull, err)
	}
	return err
}

// emitter appends events derived by rules to the log; they go upstream and back into the rules like any event.
type emitter struct{ g *Gateway }

func (e *emitter) Emit(_ context.Context, ev *event.Event) error {
	data, err := ev.MarshalJSON()
	if err != nil {
		return fmt.Errorf("gateway: emit: encode: %w", err)
	}
	if err := e.g.events.Enqueue(buffer.Entry{Data: data, Type: ev.Type(), Subject: ev.Subject(), Time: ev.Time()}); err != nil {
		return fmt.Errorf("gateway: emit: %w", err)
	}
	e.g.state.Apply(ev)
	e.g.rules.Submit(ev)
	return nil
}

// commander sends rule commands through the embedded broker.
type commander struct{ g *Gateway }

func (c commander) Command(ctx context.Context, device, command string, payload []byte) error {
	return offline(c.g.broker.Command(ctx, device, command, payload))
}

// offline marks ingest's "device not connected" as the rules' ErrDeviceOffline: the engine waits a while for the
// device instead of spending its retries.
func offline(err error) error {
	if errors.Is(err, ingest.ErrNotConnected) {
		return fmt.Errorf("%w: %w", rules.ErrDeviceOffline, err)
	}
	return err
}

// SendCommand lets the rule engine publish a command as the rule fires and wait for the device apart.
func (c commander) SendCommand(device, command string, payload []byte) (func(context.Context) error, error) {
	return c.g.broker.SendCommand(device, command, payload)
}

var _ rules.CommandSender = commander{}

// commandSink delivers cloud-to-device commands to registered devices only. A registered device that is not
// connected (the sinks start before the local broker, so right after a start none is), or whose connections have
// no subscription the command's topic matches (a device subscribes to its commands right after it connects; a
// command published before reaches no one), is reported as forward.ErrDeviceOffline: the sink holds the command
// until the device can take it.
type commandSink struct{ g *Gateway }

func (c commandSink) DeliverCommand(ctx context.Context, device, command string, payload []byte) error {
	if _, ok := c.g.registry.Get(device); !ok {
		return fmt.Errorf("gateway: command %s to %q: %w", command, device, forward.ErrUnknownDevice)
	}
	err := c.g.broker.Command(ctx, device, command, payload)
	if errors.Is(err, ingest.ErrNotConnected) { // ingest.ErrNotSubscribed too
		return fmt.Errorf("gateway: command %s to %q: %w", command, device, forward.ErrDeviceOffline)
	}
	return err
}

// directory shows the device registry to the rules.
type directory struct{ reg *devices.Registry }

func toRuleDevice(d devices.Device) rules.Device {
	return rules.Device{ID: d.ID, Name: d.Name, Room: d.Room, Kind: d.Kind, Labels: d.Labels}
}

func (d directory) Device(id string) (rules.Device, bool) {
	dev, ok := d.reg.Get(id)
	if !ok {
		return rules.Device{}, false
	}
	return toRuleDevice(dev), true
}

func (d directory) Select(sel map[string]string) []rules.Device {
	devs := d.reg.Select(sel)
	out := make([]rules.Device, len(devs))
	for i, dev := range devs {
		out[i] = toRuleDevice(dev)
	}
	return out
}

// logSource shows the durable log to the forwarding sinks.
type logSource struct{ log *buffer.Log }

func (s *logSource) Read(after uint64, max int) ([]forward.Record, error) {
	recs, err := s.log.Read(after, max)
	return forwardRecords(recs), err
}

// ReadPriority lets a priority lane read only its priorities (forward.PriorityReader).
func (s *logSource) ReadPriority(after uint64, max int, lo, hi uint8) ([]forward.Record, uint64, error) {
	recs, scanned, err := s.log.ReadPriority(after, max, lo, hi)
	return forwardRecords(recs), scanned, err
}

// ReadHeaders lets a sink with a backlog find the devices that have events in it (forward.HeaderReader).
func (s *logSource) ReadHeaders(ctx context.Context, after uint64, max int) ([]forward.Record, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	recs, err := s.log.ReadHeaders(after, max)
	return forwardRecords(recs), err
}

func forwardRecords(recs []buffer.Record) []forward.Record {
	out := make([]forward.Record, len(recs))
	for i, r := range recs {
		out[i] = forward.Record{Seq: r.Seq, Type: r.Type, Subject: r.Subject, Priority: r.Priority, Data: r.Data}
	}
	return out
}

func (s *logSource) Wait(ctx context.Context, after uint64) error { return s.log.Wait(ctx, after) }
func (s *logSource) Cursor(name string) uint64                    { return s.log.Cursor(name) }
func (s *logSource) Ack(name string, upTo uint64) error           { return s.log.Ack(name, upTo) }
func (s *logSource) AckNow(name string, upTo uint64) error        { return s.log.AckNow(name, upTo) }
func (s *logSource) Persisted(name string) uint64                 { return s.log.Persisted(name) }

func (s *logSource) WaitPersisted(ctx context.Context, name string, after uint64) error {
	return s.log.WaitPersisted(ctx, name, after)
}

// deadLetters keeps dead letters in the store; a failure to store one is logged loudly, never silent.
type deadLetters struct {
	store *deadletter.Store
	log   *slog.Logger
}

func (d deadLetters) DeadLetter(reason, detail, device, topic string, payload []byte) {
	err := d.store.Add(deadletter.Record{Reason: reason, Detail: detail, DeviceID: device, Topic: topic,
		Payload: append([]byte(nil), payload...)})
	if err != nil {
		d.log.Error("dead letter could not be stored", "reason", reason, "device_id", device, "topic", topic,
			"payload_bytes", len(payload), "error", err)
	}
}

// Directory shows a device registry to rules (used by the dry-run tools as well as the gateway).
func Directory(reg *devices.Registry) rules.Directory { return directory{reg: reg} }
