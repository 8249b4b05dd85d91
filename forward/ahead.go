package forward

import (
	"context"
	"fmt"
	"maps"
	"time"
)

// HeaderReader is what a Source may also offer: reading records without their data. A sink that connects with a
// backlog reads the backlog's headers once to learn which devices have events in it; the new events of the
// other devices then go ahead of the backlog (see ahead).
type HeaderReader interface {
	// ReadHeaders is Read with Data left nil. It may give up when ctx ends (a scan between connection attempts
	// keeps to the pause), returning ctx's error.
	ReadHeaders(ctx context.Context, after uint64, max int) ([]Record, error)
}

// scanChunk is how many headers one read of a backlog scan takes.
const scanChunk = 4096

// ahead lets the events of devices that have nothing in a sink's backlog, or only recent events, go upstream at
// once instead of after the backlog: a device that came online near the end of an outage, or whose events were
// all delivered before it.
//
// When a connection starts with more than aheadBudget events to send, the sink reads the headers of that backlog
// (see backlogScan). A device (subject) with an event the sink carries in the backlog before its last aheadBudget
// events (seqs up to from) is "behind" until the sink's reader has passed its last such event; the others may go
// ahead. The reader goes on in log order from the cursor, as always. Beside it, the sink reads the log after from
// and sends at once, on the same connection, each event it carries of a device that is not behind: nothing older
// of that device is still to be sent, so its order holds. An event of a device that is behind waits for the
// reader, and its device stays behind until the reader has passed it. When the reader reaches an event that went
// ahead, it passes over it once it is acknowledged (holding the cursor until then), so the cursor keeps its
// meaning: everything up to it went upstream. Once the reader catches up with what was read ahead, the sink is
// back to log order alone.
//
// Events sent ahead are not under the cursor until the reader passes them: a reconnect, or a restart after a
// crash, sends them again. aheadBudget bounds how many there are at a time, and with them those duplicates.
type ahead struct {
	from    uint64            // the backlog's last aheadBudget events start after it
	mark    uint64            // where the backlog ended when it was scanned
	behind  map[string]uint64 // device -> the Seq the reader must pass before its events may go ahead
	scan    time.Duration     // how long the scan took at the connection's start
	reading bool              // still reading ahead (false once the reader caught up)
	tail    uint64            // the last Seq read ahead
	pending []Record          // read ahead, not looked at yet
	waiting bool              // a goroutine waits for the log to grow past tail
	sent    map[uint64]*aheadEvent
	unacked int // events in sent not yet acknowledged
	total   int // events sent ahead on this connection
}

// aheadEvent is an event sent ahead that the reader has not passed yet.
type aheadEvent struct {
	rec   Record
	acked bool // acknowledged (or rejected for good)
	held  bool // the reader reached it before its acknowledgement: the cursor waits for it (tracker.hold)
}

// aheadBudget is the most events sent ahead and not yet passed by the cursor, four windows; the devices of the
// backlog's last aheadBudget events may go ahead.
func aheadBudget(window int) int { return 4 * window }

// aheadAllowed reports whether the sink may send events ahead of a backlog: not configured for strict order,
// not a priority lane (its own sink decides), without a rate cap (whose tokens go in log order), with a window of
// at least 8 (room comes back by quarters) and a source that reads headers.
func (s *sink) aheadAllowed() (HeaderReader, bool) {
	hr, ok := s.src.(HeaderReader)
	return hr, ok && !s.cfg.StrictOrder && s.pub == nil && s.lim == nil && s.cfg.Window >= 8
}

// backlogScan is what the passes over a sink's log learned: the last aheadBudget events the sink carries, and
// for each device the last of its events before those. It is kept for the sink's life: each connection and each
// connection attempt scans only what was appended since the last, so a connection that comes back after an outage
// finds the scan all but done, and a link that keeps dropping does not read a long backlog again at every
// reconnect. What the cursor has passed needs no scan, and an entry of behind at or below the cursor no longer
// holds its device back.
type backlogScan struct {
	pos      uint64            // the last Seq scanned
	n        int               // the events the sink carries among those scanned
	subjects []string          // the last aheadBudget of those events, a ring: their devices
	seqs     []uint64          // and their Seqs
	behind   map[string]uint64 // device -> the Seq of its last event before the ring's
	from     uint64            // the Seq of the last event before the ring's (0: none)
}

// scanBacklog reads the headers after the cursor up to the log's end, going on from the previous scan (see
// backlogScan). When the sink carries more than aheadBudget events there, it returns the ahead state for them;
// otherwise nil. Its memory is aheadBudget events' devices and Seqs plus the devices, whatever the backlog's
// length. It is called from one goroutine at a time.
func (s *sink) scanBacklog(ctx context.Context, hr HeaderReader, cursor uint64) (*ahead, error) {
	start := time.Now()
	n := aheadBudget(s.cfg.Window) // the backlog's last events, whose devices may go ahead
	b := s.scan
	if b == nil {
		b = &backlogScan{subjects: make([]string, n), seqs: make([]uint64, n), behind: map[string]uint64{}}
		s.scan = b
	}
	b.pos = max(b.pos, cursor)
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		recs, err := hr.ReadHeaders(ctx, b.pos, scanChunk)
		if err != nil {
			return nil, fmt.Errorf("forward: scan the backlog after %d: %w", b.pos, err)
		}
		for i := range recs {
			r := &recs[i]
			if !s.carries(r) {
				continue
			}
			j := b.n % n
			if b.n >= n { // the event leaving the backlog's last events: its device is behind until the reader passes it
				b.behind[b.subjects[j]] = b.seqs[j]
				b.from = b.seqs[j]
			}
			b.subjects[j], b.seqs[j] = r.Subject, r.Seq
			b.n++
		}
		if len(recs) > 0 {
			b.pos = recs[len(recs)-1].Seq
		}
		if len(recs) < scanChunk {
			break
		}
	}
	maps.DeleteFunc(b.behind, func(_ string, seq uint64) bool { return seq <= cursor })
	if cursor >= b.from {
		return nil, nil // no more than aheadBudget events to send
	}
	return &ahead{from: b.from, mark: b.pos, tail: b.from, scan: time.Since(start), reading: true,
		behind: maps.Clone(b.behind), sent: map[uint64]*aheadEvent{}}, nil
}

// window is how many events the reader may have sent past the stored cursor: the configured window, less the
// events sent ahead that are in flight.
func (s *sink) window() int { return s.cfg.Window - s.aheadUnacked() }

// aheadUnacked is the number of events sent ahead and in flight.
func (s *sink) aheadUnacked() int {
	if s.ahead == nil {
		return 0
	}
	return s.ahead.unacked
}

// passAhead is the reader meeting r: when r went ahead, the cursor passes it (at once when acknowledged, else
// once it is) and passAhead reports true.
func (s *sink) passAhead(tr *tracker, r *Record) bool {
	a := s.ahead
	if a == nil {
		return false
	}
	ev, ok := a.sent[r.Seq]
	if !ok {
		return false
	}
	if ev.acked {
		tr.skip(r.Seq)
		delete(a.sent, r.Seq)
	} else {
		tr.hold(r.Seq)
		ev.held = true
	}
	return true
}

// sendAhead reads past the backlog and sends what may go ahead, while the window and the budget have room. next
// is the reader's position. It reports wait when it has read everything in the log: then the session waits for
// the log to grow past a.tail.
func (s *sink) sendAhead(c conn, next uint64) (wait bool, err error) {
	a := s.ahead
	for a.reading {
		if next >= a.tail {
			// The reader caught up with what was read ahead: from here on, log order alone.
			a.reading, a.pending = false, nil
			s.m.ahead.Set(0)
			s.log.Info("backlog sent; back to log order", "sent_ahead", a.total)
			break
		}
		if len(a.pending) == 0 {
			recs, err := s.src.Read(a.tail, s.cfg.BatchSize)
			if err != nil {
				return false, fmt.Errorf("forward: read the log after %d: %w", a.tail, err)
			}
			if len(recs) == 0 {
				return true, nil
			}
			a.pending, a.tail = recs, recs[len(recs)-1].Seq
		}
		r := &a.pending[0]
		if r.Seq <= next || !s.carries(r) {
			a.pending = a.pending[1:] // the reader sent it, or passes over it
			continue
		}
		if a.behind[r.Subject] > next {
			a.behind[r.Subject] = r.Seq // the reader sends it, and nothing newer of its device may go before it
			a.pending = a.pending[1:]
			continue
		}
		if s.unsavedN >= s.window() || len(a.sent) >= aheadBudget(s.cfg.Window) {
			break // no room: it waits for acknowledgements, or for the reader
		}
		if err := c.send(a.pending[:1:1]); err != nil {
			return false, err
		}
		s.m.sent.Inc()
		s.m.sentAhead.Inc()
		s.countResend(r.Seq)
		a.sent[r.Seq] = &aheadEvent{rec: *r}
		a.unacked++
		a.total++
		a.pending = a.pending[1:]
	}
	s.endAheadIfDone()
	return false, nil
}

// countResend counts in resent_total an event sent before: by the reader (up to maxSent), or ahead on an earlier
// connection.
func (s *sink) countResend(seq uint64) {
	if _, again := s.sentAhead[seq]; again || seq <= s.maxSent {
		s.m.resent.Inc()
		delete(s.sentAhead, seq)
	}
}

// endAheadIfDone ends the state of sending ahead once the reader has caught up and passed every event sent ahead.
func (s *sink) endAheadIfDone() {
	if a := s.ahead; a != nil && !a.reading && len(a.sent) == 0 {
		s.ahead = nil
	}
}

// settleAhead applies the outcome of an event sent ahead (acknowledged, or rejected for good).
func (s *sink) settleAhead(tr *tracker, ev *aheadEvent, o outcome) {
	a := s.ahead
	ev.acked = true
	a.unacked--
	seq := ev.rec.Seq
	if o.reject {
		s.rejected(o.err, []Record{ev.rec})
	} else {
		s.acknowledged()
		s.m.acked.Inc()
		s.ackedCount.Add(1)
	}
	ev.rec = Record{Seq: seq} // only its Seq is needed from now on
	if ev.held {
		tr.ack(seq, false)
		delete(a.sent, seq)
	}
	s.endAheadIfDone()
}

// endAhead is the end of a connection: the events sent ahead that the cursor did not pass will be sent again
// (counted as resent then).
func (s *sink) endAhead() {
	if a := s.ahead; a != nil {
		for seq := range a.sent {
			s.sentAhead[seq] = struct{}{}
		}
	}
	s.ahead = nil
	s.m.ahead.Set(0)
	for seq := range s.sentAhead {
		if seq <= s.done {
			delete(s.sentAhead, seq)
		}
	}
}

// wentAhead reports whether the event at seq was sent ahead and the reader has not passed it yet.
func (s *sink) wentAhead(seq uint64) bool {
	if s.ahead == nil {
		return false
	}
	_, ok := s.ahead.sent[seq]
	return ok
}
