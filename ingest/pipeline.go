package ingest

import (
	"context"
	"errors"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// AsyncConsumer is a Consumer that can take an event at once and tell later when it is durable. With one, a
// device's QoS 1 publishes do not wait for each other: each event is queued in the order it arrived, and its
// PUBACK is written — in the same order — once the event is durable, so the events of one connection share
// commits instead of taking one commit each. Local subscribers get the message when it is queued.
type AsyncConsumer interface {
	Consumer
	// ConsumeAsync queues r as Consume does with durable set. wait returns once the event is durable, or the
	// reason it is not (ErrFull: no room for it); it is called once, from another goroutine.
	ConsumeAsync(ctx context.Context, r Result) (wait func(context.Context) error, err error)
}

// maxPendingAcks bounds the QoS 1 publishes of one connection that wait for their events to become durable;
// the connection's next publish is read only when there is room (back-pressure, as an unacknowledged window).
const maxPendingAcks = 256

// ackJob is one PUBACK to write in order: after wait (nil: at once), or refusing with code when refuse is set.
type ackJob struct {
	id     uint16
	wait   func(context.Context) error
	refuse bool
	code   packets.Code
}

// acker writes one connection's PUBACKs in the order of its publishes.
type acker struct {
	jobs     chan ackJob
	stopOnce sync.Once
}

// ackerOf returns the connection's acker, starting it on first use. It is called only from the goroutine that
// reads the connection (mochi's publish hook), so it needs no lock.
func (h *hook) ackerOf(cl *mqtt.Client, st *clientState) *acker {
	if st.acks == nil {
		st.acks = &acker{jobs: make(chan ackJob, maxPendingAcks)}
		h.ackers.Add(1)
		go h.runAcker(cl, st.version, st.acks)
	}
	return st.acks
}

// stopAcker lets the connection's acker finish the PUBACKs queued and end. A PUBACK for a closed connection is
// not written; the device resends that publish when it reconnects.
func stopAcker(st *clientState) {
	if a := st.acks; a != nil {
		a.stopOnce.Do(func() { close(a.jobs) })
	}
}

func (h *hook) runAcker(cl *mqtt.Client, version byte, a *acker) {
	defer h.ackers.Done()
	for j := range a.jobs {
		code := packets.CodeSuccess
		switch {
		case j.refuse:
			code = j.code
		case j.wait != nil:
			if err := j.wait(*h.b.ctx.Load()); err != nil {
				reason := "error"
				code = packets.ErrUnspecifiedError
				if errors.Is(err, ErrFull) {
					reason, code = "full", packets.ErrQuotaExceeded
				}
				h.b.m.rejected.WithLabelValues(reason).Inc()
				h.b.log.Debug("event not stored: no acknowledgement", "client_id", cl.ID, "error", err)
			}
		}
		if code.Code >= packets.ErrUnspecifiedError.Code && version != 5 {
			continue // MQTT 3.1.1 has no refusal: no PUBACK, and the device sends again later
		}
		pk := packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Puback},
			PacketID:    j.id,
			ReasonCode:  code.Code,
			Created:     time.Now().Unix(),
		}
		if code.Code >= packets.ErrUnspecifiedError.Code {
			pk.Properties.ReasonString = code.Reason
		}
		_ = cl.WritePacket(pk) // fails only on a closed connection
	}
}

// publishPipelined handles a QoS 1 publish when the consumer is an AsyncConsumer: the event is queued now, the
// message goes to local subscribers now, and the PUBACK follows in order once the event is durable. mochi is
// told to do nothing more with the packet.
func (h *hook) publishPipelined(cl *mqtt.Client, st *clientState, pk packets.Packet, res *Result, ac AsyncConsumer) error {
	a := h.ackerOf(cl, st)
	job := ackJob{id: pk.PacketID}
	if res != nil {
		wait, err := ac.ConsumeAsync(*h.b.ctx.Load(), *res)
		if err != nil {
			reason := "error"
			job.refuse, job.code = true, packets.ErrUnspecifiedError
			if errors.Is(err, ErrFull) {
				reason, job.code = "full", packets.ErrQuotaExceeded
			}
			h.b.m.rejected.WithLabelValues(reason).Inc()
			h.b.log.Debug("event not accepted: no acknowledgement", "device_id", st.device.id, "topic", pk.TopicName, "error", err)
			a.jobs <- job
			return packets.ErrRejectPacket
		}
		h.b.m.events.Inc()
		job.wait = wait
	}
	// Local subscribers (and the retained store) get the message as mochi would have delivered it.
	if err := h.b.srv.Publish(pk.TopicName, pk.Payload, pk.FixedHeader.Retain, pk.FixedHeader.Qos); err != nil {
		h.b.log.Debug("local delivery failed", "device_id", st.device.id, "topic", pk.TopicName, "error", err)
	}
	a.jobs <- job
	return packets.ErrRejectPacket
}
