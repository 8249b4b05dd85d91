package ingest

import (
	"bytes"
	"context"
	"sync"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// AsyncConsumer is a Consumer that can take an event at once and tell later when it is durable. With one, a
// device's QoS 1 publishes do not wait for each other: each event is queued in the order it arrived, and its
// PUBACK is written — in the same order — once the event is durable, so the events of one connection share
// commits instead of taking one commit each. Local subscribers get the message when it is queued.
type AsyncConsumer interface {
	Consumer
	// ConsumeAsync queues r as Consume does with durable set, and tells when the event is durable.
	ConsumeAsync(ctx context.Context, r Result) (Durability, error)
}

// Durability tells when an event queued by ConsumeAsync is durable.
type Durability struct {
	// Wait returns once the event is durable, or the reason it is not (ErrFull: no room for it). It is called
	// once, from another goroutine.
	Wait func(context.Context) error
	// Done, when not nil, is closed once Wait no longer blocks: the PUBACKs of events that are already durable
	// go out together, in one write.
	Done <-chan struct{}
}

// maxPendingAcks bounds the QoS 1 publishes of one connection that wait for their events to become durable;
// the connection's next publish is read only when there is room (back-pressure, as an unacknowledged window).
const maxPendingAcks = 256

// ackJob is one PUBACK to write in order: after wait (nil: at once), or refusing with code when refuse is set.
type ackJob struct {
	id     uint16
	wait   func(context.Context) error
	done   <-chan struct{} // closed once wait no longer blocks; nil: unknown
	refuse bool
	code   packets.Code
}

// ready reports whether the job's PUBACK can be written without waiting.
func (j *ackJob) ready() bool {
	if j.refuse || j.wait == nil {
		return true
	}
	if j.done == nil {
		return false
	}
	select {
	case <-j.done:
		return true
	default:
		return false
	}
}

// maxAckBatch bounds the PUBACKs written in one write.
const maxAckBatch = 256

// acker writes one connection's PUBACKs in the order of its publishes.
type acker struct {
	jobs     chan ackJob
	stopOnce sync.Once
	mods     packets.Mods // how the client lets its refusals be encoded (MQTT 5): maximum size, problem info
}

// ackerOf returns the connection's acker, starting it on first use. It is called only from the goroutine that
// reads the connection (mochi's publish hook), so it needs no lock.
func (h *hook) ackerOf(cl *mqtt.Client, st *clientState) *acker {
	if st.acks == nil {
		st.acks = &acker{jobs: make(chan ackJob, maxPendingAcks)}
		// As mochi encodes the packets it writes to the client (Client.WritePacket).
		st.acks.mods.MaxSize = cl.Properties.Props.MaximumPacketSize
		st.acks.mods.DisallowProblemInfo = cl.Properties.Props.RequestProblemInfoFlag && cl.Properties.Props.RequestProblemInfo == 0
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

// runAcker writes the connection's PUBACKs in order: each once its event is durable, and those that are ready
// together in one write (after a commit, most of a busy connection's are).
func (h *hook) runAcker(cl *mqtt.Client, version byte, a *acker) {
	defer h.ackers.Done()
	var batch []byte
	var next ackJob // a job taken from jobs that was not ready yet: the first of the next batch
	held := false
	for {
		j := next
		if !held {
			var ok bool
			if j, ok = <-a.jobs; !ok {
				return
			}
		}
		held = false
		batch = h.ack(cl, version, a, j, batch[:0])
	more:
		for n := 1; n < maxAckBatch; n++ {
			select {
			case jj, ok := <-a.jobs:
				if !ok {
					writeAcks(cl, batch)
					return
				}
				if !jj.ready() {
					next, held = jj, true
					break more
				}
				batch = h.ack(cl, version, a, jj, batch)
			default:
				break more
			}
		}
		writeAcks(cl, batch)
	}
}

// ack waits for j's event and appends its PUBACK to batch: every PUBACK of the connection goes out through
// writeAcks, so none can overtake another. A refusal (MQTT 5; MQTT 3.1.1 has none) carries its reason code and
// reason string. (mochi's own writes are buffered while deliveries to the client are queued, so a refusal written
// through mochi could be overtaken by the next success PUBACK.)
func (h *hook) ack(cl *mqtt.Client, version byte, a *acker, j ackJob, batch []byte) []byte {
	code := packets.CodeSuccess
	switch {
	case j.refuse:
		code = j.code
	case j.wait != nil:
		if err := j.wait(*h.b.ctx.Load()); err != nil {
			code = h.notTaken(err)
			h.b.log.Debug("event not stored: no acknowledgement", "client_id", cl.ID, "error", err)
		}
	}
	if code.Code == packets.CodeSuccess.Code {
		// A PUBACK with reason Success and no properties is the same in MQTT 3.1.1 and 5.
		return append(batch, packets.Puback<<4, 2, byte(j.id>>8), byte(j.id))
	}
	if version != 5 {
		return batch // no PUBACK: the device sends again later
	}
	return appendRefusal(batch, j.id, code, a.mods)
}

// appendRefusal appends an MQTT 5 PUBACK with reason code (>= 0x80) and its reason string, unless the client
// asked for no problem information or its maximum packet size leaves no room for it.
func appendRefusal(batch []byte, id uint16, code packets.Code, mods packets.Mods) []byte {
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Puback},
		ProtocolVersion: 5,
		PacketID:        id,
		ReasonCode:      code.Code,
		Mods:            mods,
	}
	pk.Properties.ReasonString = code.Reason
	var buf bytes.Buffer
	_ = pk.PubackEncode(&buf) // writes to a bytes.Buffer: cannot fail
	return append(batch, buf.Bytes()...)
}

// writeAcks writes encoded PUBACKs to the connection, holding the client's lock as mochi's own writes do, so
// that whole packets never interleave. A failed write means a closed connection: the device resends what was
// not acknowledged when it reconnects.
func writeAcks(cl *mqtt.Client, b []byte) {
	if len(b) == 0 || cl.Net.Conn == nil {
		return
	}
	cl.Lock()
	defer cl.Unlock()
	_, _ = cl.Net.Conn.Write(b)
}

// publishPipelined handles a QoS 1 publish when the consumer is an AsyncConsumer: the event is queued now, the
// message goes to local subscribers now, and the PUBACK follows in order once the event is durable. mochi is
// told to do nothing more with the packet (see handled).
func (h *hook) publishPipelined(cl *mqtt.Client, st *clientState, pk packets.Packet, res *Result, ac AsyncConsumer) (packets.Packet, error) {
	a := h.ackerOf(cl, st)
	job := ackJob{id: pk.PacketID}
	if res != nil {
		d, err := ac.ConsumeAsync(*h.b.ctx.Load(), *res)
		if err != nil {
			job.refuse, job.code = true, h.notTaken(err)
			h.b.log.Debug("event not accepted: no acknowledgement", "device_id", st.device.id, "topic", pk.TopicName, "error", err)
			a.jobs <- job
			return handled(pk)
		}
		h.b.m.events.Inc()
		job.wait, job.done = d.Wait, d.Done
	}
	// Local subscribers (and the retained store) get the message as mochi would have delivered it; while no
	// client ever subscribed, only a retained message needs mochi.
	if pk.FixedHeader.Retain || h.subscribed.Load() {
		if err := h.b.srv.Publish(pk.TopicName, pk.Payload, pk.FixedHeader.Retain, pk.FixedHeader.Qos); err != nil {
			h.b.log.Debug("local delivery failed", "device_id", st.device.id, "topic", pk.TopicName, "error", err)
		}
	}
	a.jobs <- job
	return handled(pk)
}

// handled tells mochi that a publish needs nothing more from it: no PUBACK (the acker writes it), no retained
// message and no delivery (publishPipelined did both). mochi does nothing for an ignored QoS 0 message. This
// is what packets.ErrRejectPacket means too, but mochi logs a rejection at debug level with the whole packet,
// which costs an allocation of the packet for every publish even when debug logging is off.
func handled(pk packets.Packet) (packets.Packet, error) {
	pk.FixedHeader.Qos = 0
	pk.Ignore = true
	return pk, nil
}
