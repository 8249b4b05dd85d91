package forward

import "sort"

// tracker keeps the units sent on one connection, in send order, and computes the cursor: the end of the
// contiguous prefix of acknowledged (or passed-over) units. An acknowledgement that arrives before an earlier
// one is held until the gap fills.
type tracker struct {
	q    []unit
	head int
	// done is the cursor: every event up to it has been acknowledged or passed over.
	done uint64
	// records counts the events in q (acknowledged or not); unacked those still waiting.
	records, unacked int
}

// unit is a send: one event, or several for a batching transport.
type unit struct {
	last     uint64 // Seq of the unit's last event
	upTo     uint64 // the cursor once the unit is done: last, or later when passed-over events follow it
	n        int
	acked    bool
	rejected bool
	recs     []Record
}

func newTracker(done uint64) tracker { return tracker{done: done} }

func (t *tracker) empty() bool { return t.head == len(t.q) }

// push records a unit just sent.
func (t *tracker) push(recs []Record) {
	last := recs[len(recs)-1].Seq
	t.q = append(t.q, unit{last: last, upTo: last, n: len(recs), recs: recs})
	t.records += len(recs)
	t.unacked += len(recs)
}

// hold records an event this sink does not carry and its cursor may pass only later, when ack(seq) is called
// (an event of one of its priority lanes, not carried by the lane yet).
func (t *tracker) hold(seq uint64) {
	t.q = append(t.q, unit{last: seq, upTo: seq})
}

// skip passes over an event this sink does not carry: the cursor moves past it with the units before it.
func (t *tracker) skip(seq uint64) {
	if t.empty() {
		t.done = max(t.done, seq)
		return
	}
	t.q[len(t.q)-1].upTo = seq
}

// ack marks the unit ending at last done (rejected: refused for good) and pops the acknowledged prefix. It
// returns the unit (nil when unknown or already done) and how many acknowledged (not rejected) events the
// cursor passed.
func (t *tracker) ack(last uint64, rejected bool) (u *unit, passed int) {
	live := t.q[t.head:]
	i := sort.Search(len(live), func(i int) bool { return live[i].last >= last })
	if i == len(live) || live[i].last != last || live[i].acked {
		return nil, 0
	}
	u = &live[i]
	u.acked, u.rejected = true, rejected
	t.unacked -= u.n
	found := *u
	for t.head < len(t.q) && t.q[t.head].acked {
		h := &t.q[t.head]
		t.done = h.upTo
		t.records -= h.n
		if !h.rejected {
			passed += h.n
		}
		*h = unit{} // drop the reference to the records
		t.head++
	}
	if t.head == len(t.q) {
		t.q, t.head = t.q[:0], 0
	} else if t.head > 64 && t.head > len(t.q)/2 {
		t.q = append(t.q[:0], t.q[t.head:]...)
		t.head = 0
	}
	return &found, passed
}
