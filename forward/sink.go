package forward

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// outcome is a connection's verdict on one sent unit.
type outcome struct {
	gen  uint64 // the connection that sent the unit
	last uint64 // Seq of the unit's last event
	// err is nil when the upstream acknowledged the unit.
	err error
	// reject: err is a permanent refusal; the unit is dead-lettered and the sink moves on.
	reject bool
	// retryAfter is how long the upstream asked to wait before trying again (0: the usual backoff).
	retryAfter time.Duration
}

// conn is one connection to an upstream. A sink dials a new one after any failure and never reuses one, so an
// acknowledgement counts only on the connection that sent the event.
type conn interface {
	// send starts delivering one unit (one event, or several for a batching transport); its outcome arrives
	// on outcomes. The sink never has more than its window in flight, so send does not wait for room.
	send(recs []Record) error
	// outcomes delivers an outcome per unit sent (buffered: window outcomes fit).
	outcomes() <-chan outcome
	// lost is closed when the connection fails; cause says why.
	lost() <-chan struct{}
	cause() error
	// close drops the connection and waits for its goroutines.
	close()
}

// transport dials connections to one upstream.
type transport interface {
	// dial connects; gen numbers the connection (the outcomes carry it).
	dial(ctx context.Context, gen uint64) (conn, error)
	// unitSize is the most events one send may carry (1 unless the transport batches).
	unitSize() int
	// target names the upstream for logs and health, without credentials.
	target() string
	// wait waits for what closed connections left running (bounded by the transport's timeouts).
	wait()
	// dialReaches reports whether a successful dial shows that the upstream is there (a broker connection);
	// when it does not (an HTTP client, whose requests each stand alone), only an acknowledged send does.
	dialReaches() bool
}

// errStalled ends a connection that stopped acknowledging.
var errStalled = errors.New("forward: upstream stalled: no acknowledgement within ack_timeout")

// retryError carries how long an upstream asked to wait (Retry-After).
type retryError struct {
	err   error
	after time.Duration
}

func (e *retryError) Error() string { return e.err.Error() }
func (e *retryError) Unwrap() error { return e.err }

// stopGrace bounds the wait for acknowledgements of events in flight when the sink stops.
const stopGrace = time.Second

// sink drains the log into one upstream.
type sink struct {
	name, typ, cursor string
	cfg               SinkConfig
	tr                transport
	unitBytes         int // the most bytes of a unit's events as a JSON array (an MQTT batch); 0: no bound
	src               Source
	dl                DeadLetterer
	log               *slog.Logger
	m                 sinkMetrics
	filter            typeFilter
	lim               *rate.Limiter // nil: no rate cap; a sink's lanes share its limiter
	tick              time.Duration // how often a connection checks for a stall (and hands a held-back cursor)

	// The priorities this sink carries: lo <= p < hi. A lane of a sink carries those of its own range and
	// passes over the others; the sink itself leaves those of its lanes to them (see lane).
	lo, hi uint8
	lanes  []*lane       // the sink's lanes, highest first (none for a lane)
	moved  chan struct{} // signalled when one of the sink's lanes moves its cursor
	pub    *lane         // for a lane: where it publishes its cursor
	base   string        // for a lane: the cursor of its sink, where a new lane starts

	ackedCount atomic.Uint64 // events acknowledged, for the drain rate

	// Owned by the run goroutine.
	gen       uint64
	done      uint64              // the cursor: everything up to it is carried
	handed    uint64              // the cursor as last handed to the log (Ack)
	urged     uint64              // the cursor as last handed with AckNow
	persisted uint64              // the cursor as durably stored in the log, as last learned
	unsaved   []sentUnit          // the units sent past persisted, in send order: what a crash would send again
	unsavedN  int                 // events in unsaved; never more than the window
	maxSent   uint64              // the highest Seq ever sent in log order (for resent_total)
	ahead     *ahead              // events going ahead of the backlog on this connection (nil: none)
	scan      *backlogScan        // the last scan of the backlog (see scanBacklog)
	sentAhead map[uint64]struct{} // sent ahead on an earlier connection and not under the cursor (for resent_total)
	ackFail   bool                // the last Ack to the log failed (logged once)
	failing   bool                // the last connection ended in a failure and none has been acknowledged since

	mu      sync.Mutex
	started time.Time
	st      sinkState
}

// sentUnit is a unit sent past the persisted cursor: the Seq of its last event and its number of events.
type sentUnit struct {
	last uint64
	n    int
}

type sinkState struct {
	connected, stalled bool
	lastErr            string
	lastErrAt, lastAck time.Time
	cursor             uint64
	inFlight           int
}

// lane is a sink's priority lane as the sink sees it: the priorities it carries and how far its cursor is.
type lane struct {
	lo, hi uint8
	done   atomic.Uint64 // the lane's cursor: every event of its priorities up to it is carried
	notify chan struct{} // the sink's moved channel
}

// publish records the lane's cursor and tells its sink.
func (l *lane) publish(done uint64) {
	l.done.Store(done)
	select {
	case l.notify <- struct{}{}:
	default:
	}
}

// newSink builds a sink named name (cfg.Name, or a lane's name) carrying the priorities lo <= p < hi.
func newSink(cfg SinkConfig, name string, lo, hi uint8, gatewayID string, src Source, cmds CommandSink, dl DeadLetterer, log *slog.Logger, m *metrics) (*sink, error) {
	s := &sink{
		name:   name,
		typ:    cfg.Type,
		cursor: CursorName(name),
		cfg:    cfg,
		src:    src,
		dl:     dl,
		log:    log,
		m:      m.forSink(name),
		filter: newTypeFilter(cfg.Types),
		tick:   stallCheckEvery(cfg.AckTimeout),
		lo:     lo,
		hi:     hi,

		sentAhead: map[uint64]struct{}{},
	}
	var err error
	switch cfg.Type {
	case TypeMQTT:
		s.tr, err = newMQTTTransport(cfg, gatewayID, cmds, dl, log)
	case TypeNATS:
		s.tr, err = newNATSTransport(cfg, gatewayID, log)
	case TypeHTTP:
		s.tr, err = newHTTPTransport(cfg, log)
	default:
		err = fmt.Errorf("type %q is not mqtt, nats or http", cfg.Type)
	}
	if err != nil {
		return nil, err
	}
	if cfg.RateLimit > 0 {
		s.lim = rate.NewLimiter(rate.Limit(cfg.RateLimit), max(1, s.tr.unitSize()))
	}
	if cfg.MQTT != nil && cfg.MQTT.Mode == ModeBatch {
		s.unitBytes = cfg.MQTT.BatchMaxBytes
	}
	return s, nil
}

// run connects, drains and reconnects with backoff until ctx ends.
func (s *sink) run(ctx context.Context) error {
	s.done = s.src.Cursor(s.cursor)
	if s.pub != nil {
		// The sink's cursor passes an event of a lane only once the lane carried it: a lane that is new, or
		// behind its sink after a crash, starts where its sink is.
		if b := s.src.Cursor(s.base); b > s.done {
			if err := s.src.Ack(s.cursor, b); err != nil {
				s.log.Warn("lane starts at its own cursor, not its sink's", "cursor", s.done, "sink_cursor", b, "error", err)
			} else {
				s.done = b
			}
		}
		s.pub.publish(s.done)
	}
	s.handed = s.done
	s.persisted = s.src.Persisted(s.cursor)
	if s.done > s.persisted {
		// Acknowledged before this run and not stored yet: how many events that is is unknown, so it takes
		// the whole window until the log has stored it.
		s.unsaved = append(s.unsaved[:0], sentUnit{last: s.done, n: s.cfg.Window})
		s.unsavedN = s.cfg.Window
	}
	s.mu.Lock()
	s.started = time.Now()
	s.st.cursor = s.done
	s.mu.Unlock()
	s.log.Info("sink starting", "type", s.typ, "target", s.tr.target(), "cursor", s.done)

	defer s.tr.wait()
	attempt := 0
	for {
		res := s.session(ctx)
		if ctx.Err() != nil {
			s.log.Info("sink stopped", "cursor", s.done)
			return nil
		}
		if res.progressed {
			attempt = 0
		}
		attempt++
		delay := s.backoff(attempt)
		var re *retryError
		if errors.As(res.err, &re) && re.after > 0 {
			delay = re.after
		}
		s.failed(res.err)
		s.failing = true
		s.log.Warn("upstream connection failed; retrying", "target", s.tr.target(), "error", res.err,
			"attempt", attempt, "retry_in", delay.Round(time.Millisecond))
		t := time.NewTimer(delay)
		if hr, ok := s.aheadAllowed(); ok {
			// Meanwhile the backlog grows: scanning it now leaves the next connection only the latest events to
			// scan. The scan stops with the pause and goes on in the next one (a long backlog).
			sctx, stop := context.WithTimeout(ctx, delay)
			if _, err := s.scanBacklog(sctx, hr, s.done); err != nil && sctx.Err() == nil {
				s.log.Warn("cannot scan the backlog", "error", err)
			}
			stop()
		}
		select {
		case <-ctx.Done():
			t.Stop()
			s.log.Info("sink stopped", "cursor", s.done)
			return nil
		case <-t.C:
		}
		s.m.reconnects.Inc()
	}
}

// backoff is exponential with full jitter: a random wait in [backoff_min, min(backoff_max, backoff_min·2^attempt)).
func (s *sink) backoff(attempt int) time.Duration {
	lo, hi := s.cfg.BackoffMin, s.cfg.BackoffMax
	ceil := hi
	if attempt < 30 && lo<<attempt > 0 && lo<<attempt < hi {
		ceil = lo << attempt
	}
	if ceil <= lo {
		return lo
	}
	return lo + rand.N(ceil-lo)
}

type sessionResult struct {
	err        error
	progressed bool // an acknowledgement arrived on this connection
}

// session runs one connection: it sends from the cursor, advances the cursor on acknowledgements and ends on the
// first failure, a stall or ctx's end.
//
// Flow control counts against the cursor as the log stored it durably, not as acknowledged: at most window
// events are sent past it, in flight or acknowledged and not yet stored. So whatever ends the connection —
// an upstream failure or a crash of the gateway — at most window events are sent again.
func (s *sink) session(ctx context.Context) (res sessionResult) {
	s.gen++
	gen := s.gen
	c, err := s.tr.dial(ctx, gen)
	if err != nil {
		return sessionResult{err: err}
	}
	if s.tr.dialReaches() || !s.failing {
		// After a failed send, a sink whose dial does not reach the upstream stays disconnected until a send
		// is acknowledged, instead of looking healthy between its retries.
		s.setConnected(true)
	}
	s.log.Info("upstream connected", "target", s.tr.target(), "cursor", s.done)
	defer s.setConnected(false)
	defer c.close()

	tr := newTracker(s.done)
	defer s.setInFlight(0)
	defer s.endAhead()
	defer s.advance(&tr, true) // whatever ends the connection, what it acknowledged goes to the log now
	next := s.done             // the last Seq read (sent or passed over)
	var pending []Record
	var held []heldEvent // events of the lanes the cursor waits for
	s.forgetUnacked()
	s.learnPersisted()

	// One goroutine at a time waits for the log to grow.
	wctx, wcancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { wcancel(); wg.Wait() }()
	wake := make(chan error, 1)
	waiting, woke, spurious := false, false, 0
	// One goroutine at a time waits for the log to store the cursor.
	stored := make(chan error, 1)
	storing := false
	// With a backlog, one goroutine scans it (see ahead), then one at a time waits for the log to grow past what
	// was read ahead.
	type scanResult struct {
		a   *ahead
		err error
	}
	var scanDone chan scanResult
	if hr, ok := s.aheadAllowed(); ok {
		scanDone = make(chan scanResult, 1)
		wg.Add(1)
		go func(after uint64) {
			defer wg.Done()
			a, err := s.scanBacklog(wctx, hr, after)
			scanDone <- scanResult{a, err}
		}(s.done)
	}
	aheadWake := make(chan error, 1)
	// waitFailed ends the session on a wait's error: when ctx ended (the sink stops), after a moment for the
	// acknowledgements in flight; otherwise with the error, which says what was waited for.
	waitFailed := func(err error, what string) bool {
		if err == nil {
			return false
		}
		if ctx.Err() != nil {
			s.finish(c, &tr, gen)
		} else {
			res.err = fmt.Errorf("forward: %s: %w", what, err)
		}
		return true
	}
	aheadWoke := func(err error) bool {
		if s.ahead != nil {
			s.ahead.waiting = false
		}
		return waitFailed(err, "wait for the log")
	}

	stall := time.NewTicker(s.tick)
	defer stall.Stop()
	lastProgress := time.Now()

	// The rate cap holds the next unit until its tokens are due.
	var hold *time.Timer
	var holdC <-chan time.Time
	var holdUntil time.Time
	holdN := 0
	defer func() {
		if hold != nil {
			hold.Stop()
		}
	}()

	var skipTo uint64 // a priority read scanned up to here: what is not pending up to it is passed over
	for {
		if len(pending) == 0 && !waiting {
			recs, scanned, err := s.read(next)
			if err != nil {
				res.err = fmt.Errorf("forward: read the log after %d: %w", next, err)
				return res
			}
			for len(recs) > 0 && recs[0].Seq <= next {
				recs = recs[1:]
			}
			if len(recs) > 0 {
				pending, spurious, skipTo = recs, 0, scanned
			} else {
				switch {
				case scanned > next: // only records of other priorities: passed over
					tr.skip(scanned)
					next, spurious = scanned, 0
				case woke:
					spurious++ // the log said there is more, but nothing is readable yet
				}
				waiting = true
				delay := min(time.Duration(spurious)*10*time.Millisecond, 200*time.Millisecond)
				wg.Add(1)
				go func(after uint64) {
					defer wg.Done()
					if delay > 0 {
						t := time.NewTimer(delay)
						select {
						case <-wctx.Done():
							t.Stop()
						case <-t.C:
						}
					}
					wake <- s.src.Wait(wctx, after)
				}(next)
			}
			woke = false
		}

		// Events going ahead of a backlog take the window's room first (see ahead); the log growing past what was
		// read ahead is taken in before any acknowledgement.
		if a := s.ahead; a != nil && a.waiting {
			select {
			case err := <-aheadWake:
				if aheadWoke(err) {
					return res
				}
			default:
			}
		}
		if a := s.ahead; a != nil && a.reading && (!a.waiting || next >= a.tail) {
			idle := tr.unacked+a.unacked == 0
			wait, err := s.sendAhead(c, next)
			if err != nil {
				res.err = err
				return res
			}
			if idle && a.unacked > 0 {
				lastProgress = time.Now()
			}
			if wait {
				a.waiting = true
				wg.Add(1)
				go func(after uint64) {
					defer wg.Done()
					aheadWake <- s.src.Wait(wctx, after)
				}(a.tail)
			}
		}
		for len(pending) > 0 && s.unsavedN < s.window() {
			if r := &pending[0]; s.passAhead(&tr, r) {
				next, pending = r.Seq, pending[1:]
				continue
			} else if !s.carries(r) {
				if l := s.laneOf(r); l != nil && l.done.Load() < r.Seq {
					if len(held) >= maxHeldWindows*s.window() {
						break // the lanes are that far behind: read on once they carried some (s.moved)
					}
					tr.hold(r.Seq) // the cursor passes it once the lane has carried it
					held = append(held, heldEvent{l, r.Seq})
				} else {
					tr.skip(r.Seq)
				}
				next, pending = r.Seq, pending[1:]
				continue
			}
			n, limit := 1, min(s.tr.unitSize(), s.window()-s.unsavedN)
			room := newUnitRoom(s.unitBytes, &pending[0])
			for n < len(pending) && n < limit && s.carries(&pending[n]) && !s.wentAhead(pending[n].Seq) &&
				room.take(&pending[n]) {
				n++
			}
			if s.lim != nil {
				now := time.Now()
				if holdUntil.IsZero() {
					r := s.lim.ReserveN(now, n)
					if d := r.DelayFrom(now); r.OK() && d > 0 {
						holdUntil, holdN = now.Add(d), n
						if hold == nil {
							hold = time.NewTimer(d)
						} else {
							hold.Reset(d)
						}
						holdC = hold.C
						break
					}
				} else if now.Before(holdUntil) {
					break
				} else {
					n = min(n, holdN)
					holdUntil = time.Time{}
				}
			}
			u := pending[:n:n]
			if err := c.send(u); err != nil {
				res.err = err
				return res
			}
			s.m.sent.Add(float64(n))
			for _, r := range u {
				s.countResend(r.Seq)
			}
			s.maxSent = max(s.maxSent, u[n-1].Seq)
			if tr.unacked+s.aheadUnacked() == 0 {
				lastProgress = time.Now()
			}
			tr.push(u)
			s.unsaved = append(s.unsaved, sentUnit{last: u[n-1].Seq, n: n})
			s.unsavedN += n
			next, pending = u[n-1].Seq, pending[n:]
			s.log.Debug("sent", "seq", u[n-1].Seq, "events", n)
		}
		if len(pending) == 0 && skipTo > next {
			tr.skip(skipTo)
			next = skipTo
		}
		s.advance(&tr, false)
		if !storing && s.handed > s.persisted {
			storing = true
			wg.Add(1)
			go func(after uint64) {
				defer wg.Done()
				stored <- s.src.WaitPersisted(wctx, s.cursor, after)
			}(s.persisted)
		}
		if len(pending) == 0 && !waiting && s.unsavedN < s.window() && ctx.Err() == nil {
			// Everything read is sent and the window has room: read on at once, for what was appended
			// meanwhile, or wait for the log to grow. Otherwise those events would wait for the next
			// acknowledgement (a round trip to the upstream) or the stall check's tick.
			continue
		}

		select {
		case err := <-stored:
			storing = false
			if waitFailed(err, "wait for the log to store the cursor") {
				return res
			}
			s.learnPersisted()
		case o := <-c.outcomes():
			// Only an acknowledgement shows the upstream takes events: a connection whose every answer is a
			// refusal neither ends a failure nor resets the backoff.
			acked := o.err == nil
			if err := s.settle(&tr, o, gen); err != nil {
				res.err = err
				return res
			}
		drain:
			for {
				select {
				case o := <-c.outcomes():
					acked = acked || o.err == nil
					if err := s.settle(&tr, o, gen); err != nil {
						res.err = err
						return res
					}
				default:
					break drain
				}
			}
			lastProgress = time.Now()
			if acked {
				res.progressed = true
				if s.failing {
					s.failing = false
					s.setConnected(true)
				}
			}
			s.advance(&tr, false)
		case <-c.lost():
			res.err = c.cause()
			return res
		case err := <-wake:
			waiting, woke = false, true
			if waitFailed(err, "wait for the log") {
				return res
			}
		case r := <-scanDone:
			scanDone = nil
			switch {
			case r.err != nil && ctx.Err() != nil:
				s.finish(c, &tr, gen)
				return res
			case r.err != nil:
				s.log.Warn("cannot scan the backlog; sending in log order only", "error", r.err)
			case r.a != nil && next < r.a.from:
				s.ahead = r.a
				s.m.ahead.Set(1)
				s.log.Info("backlog: the events of devices with none in it before its last events go ahead of it",
					"devices_behind", len(r.a.behind), "backlog_end", r.a.mark,
					"scanned_in", r.a.scan.Round(time.Millisecond))
			}
		case err := <-aheadWake:
			if aheadWoke(err) {
				return res
			}
		case <-stall.C:
			s.advance(&tr, true) // hands a cursor held back, or retries one the log refused
			if inFlight := tr.unacked + s.aheadUnacked(); inFlight > 0 && time.Since(lastProgress) > s.cfg.AckTimeout {
				s.setStalled(true)
				s.log.Warn("upstream stalled: events in flight and no acknowledgement; reconnecting",
					"target", s.tr.target(), "in_flight", inFlight, "ack_timeout", s.cfg.AckTimeout)
				res.err = errStalled
				return res
			}
		case <-s.moved:
			held = s.release(&tr, held)
			s.advance(&tr, false)
		case <-holdC:
			holdC = nil
		case <-ctx.Done():
			s.finish(c, &tr, gen)
			return res
		}
	}
}

// read reads the log after next: a lane reads only its priorities when the source can (scanned then says how
// far it looked); otherwise every record, scanned = next.
func (s *sink) read(next uint64) ([]Record, uint64, error) {
	if pr, ok := s.src.(PriorityReader); ok && s.pub != nil {
		return pr.ReadPriority(next, s.cfg.BatchSize, s.lo, s.hi)
	}
	recs, err := s.src.Read(next, s.cfg.BatchSize)
	return recs, next, err
}

// unitRoom is what is left of a unit's byte bound as its events are taken.
type unitRoom struct {
	left  int
	bound bool
}

// newUnitRoom starts a unit of at most limit bytes (0: no bound) with its first event, which it holds whatever
// its size.
func newUnitRoom(limit int, first *Record) unitRoom {
	if limit <= 0 {
		return unitRoom{}
	}
	return unitRoom{left: limit - 2 - len(first.Data), bound: true} // the array's brackets
}

// take reports whether r fits in the unit too, and counts it in if so.
func (u *unitRoom) take(r *Record) bool {
	if !u.bound {
		return true
	}
	if need := len(r.Data) + 1; need <= u.left { // a comma before it
		u.left -= need
		return true
	}
	return false
}

// maxHeldWindows bounds the events of lanes that a sink holds (it passes them only once their lane carried them)
// to this many of its windows: a lane that cannot deliver holds up its sink after that, instead of the sink
// reading, and keeping in memory, the whole backlog of the lane's priorities.
const maxHeldWindows = 4

// heldEvent is an event of a lane that the sink's cursor may pass only once the lane has carried it.
type heldEvent struct {
	lane *lane
	seq  uint64
}

// carries reports whether the sink sends r: its type passes the filter and its priority is in the sink's range.
func (s *sink) carries(r *Record) bool {
	return r.Priority >= s.lo && r.Priority < s.hi && s.filter.match(r.Type)
}

// laneOf returns the lane of the sink that carries r, or nil (r is not carried by this sink's lanes, or this
// sink is a lane).
func (s *sink) laneOf(r *Record) *lane {
	if !s.filter.match(r.Type) {
		return nil
	}
	for _, l := range s.lanes {
		if r.Priority >= l.lo && r.Priority < l.hi {
			return l
		}
	}
	return nil
}

// release lets the cursor pass the held events that their lanes have carried; it returns those still held.
func (s *sink) release(tr *tracker, held []heldEvent) []heldEvent {
	keep := held[:0]
	for _, h := range held {
		if h.lane.done.Load() >= h.seq {
			tr.ack(h.seq, false)
		} else {
			keep = append(keep, h)
		}
	}
	return keep
}

// finish waits a moment for the acknowledgements of events in flight when the sink stops, so fewer are sent
// again at the next start.
func (s *sink) finish(c conn, tr *tracker, gen uint64) {
	if tr.unacked+s.aheadUnacked() > 0 {
		t := time.NewTimer(min(stopGrace, s.cfg.AckTimeout))
		defer t.Stop()
	wait:
		for tr.unacked+s.aheadUnacked() > 0 {
			select {
			case o := <-c.outcomes():
				if s.settle(tr, o, gen) != nil {
					break wait
				}
			case <-c.lost():
				break wait
			case <-t.C:
				break wait
			}
		}
	}
}

// settle applies one outcome; it returns the error that ends the connection, if any.
func (s *sink) settle(tr *tracker, o outcome, gen uint64) error {
	if o.gen != gen {
		return nil // an acknowledgement counts only on the connection that sent the event
	}
	if o.err != nil && !o.reject {
		if o.retryAfter > 0 {
			return &retryError{err: o.err, after: o.retryAfter}
		}
		return o.err
	}
	if a := s.ahead; a != nil {
		if ev, ok := a.sent[o.last]; ok && !ev.acked {
			s.settleAhead(tr, ev, o)
			return nil
		}
	}
	u, passed := tr.ack(o.last, o.reject)
	if u == nil {
		return nil
	}
	if o.reject {
		s.rejected(o.err, u.recs)
	} else {
		s.acknowledged()
	}
	if passed > 0 {
		s.m.acked.Add(float64(passed))
		s.ackedCount.Add(uint64(passed))
	}
	return nil
}

// rejected dead-letters events the upstream refused for good. The refusal is the sink's last error; being an
// answer, it ends a stall, but it does not show the sink connected (only an acknowledgement does).
func (s *sink) rejected(err error, recs []Record) {
	s.m.errors.Add(float64(len(recs)))
	s.log.Warn("upstream rejected events; dead-lettered", "target", s.tr.target(), "events", len(recs),
		"last_seq", recs[len(recs)-1].Seq, "error", err)
	for _, r := range recs {
		s.dl.DeadLetter(ReasonUpstreamRejected, fmt.Sprintf("sink %s: %v", s.name, err), r.Subject, s.tr.target(), r.Data)
	}
	s.mu.Lock()
	s.st.lastErr, s.st.lastErrAt = err.Error(), time.Now()
	s.answeredLocked()
	s.mu.Unlock()
}

// acknowledged records an acknowledgement: its time, and the end of a stall.
func (s *sink) acknowledged() {
	now := time.Now()
	s.mu.Lock()
	s.st.lastAck = now
	s.answeredLocked()
	s.mu.Unlock()
}

// answeredLocked ends a stall: the upstream answered. s.mu is held.
func (s *sink) answeredLocked() {
	if s.st.stalled {
		s.st.stalled = false
		s.m.stalled.Set(0)
		s.log.Info("upstream recovered from a stall", "target", s.tr.target())
	}
}

// forgetUnacked drops the units past the cursor from the flow control when a connection starts: they were
// not acknowledged, and the new connection sends them again.
func (s *sink) forgetUnacked() {
	for n := len(s.unsaved); n > 0 && s.unsaved[n-1].last > s.done; n-- {
		s.unsavedN -= s.unsaved[n-1].n
		s.unsaved = s.unsaved[:n-1]
	}
}

// learnPersisted reads how far the log stored the cursor and releases the units it covers from the flow
// control.
func (s *sink) learnPersisted() {
	p := s.src.Persisted(s.cursor)
	if p <= s.persisted {
		return
	}
	s.persisted = p
	i := 0
	for i < len(s.unsaved) && s.unsaved[i].last <= p {
		s.unsavedN -= s.unsaved[i].n
		i++
	}
	if i == len(s.unsaved) {
		s.unsaved = s.unsaved[:0]
	} else if i > 0 {
		s.unsaved = append(s.unsaved[:0], s.unsaved[i:]...)
	}
}

// advance moves the cursor to the tracker's acknowledged prefix and hands it to the log to store.
//
// Each hand costs the log a commit of its own (two fsyncs) when no append carries it, so while events are still
// in flight and the window has room, the cursor is handed only once a quarter of the window is acknowledged and
// not yet stored: a backlog drains with about one cursor commit per quarter window instead of one per
// acknowledgement. It is handed at once when nothing is in flight (caught up, or a trickle), when force is set
// (the stall check's tick, the end of a connection) and when the window is full: then nothing more is sent until
// the log stores the cursor, and an upstream that holds back its acknowledgements until it sees more traffic
// (Nagle's algorithm against the gateway's delayed TCP acknowledgement, about 40 ms on Linux) would otherwise
// stall the sink. With the window full it is handed with AckNow, also when it was handed before and is not stored
// yet: the log stores it without first waiting to group it with later cursor moves, which would bound a small
// window's throughput to a window per wait.
func (s *sink) advance(tr *tracker, force bool) {
	if tr.done > s.done {
		s.done = tr.done
		if s.pub != nil {
			s.pub.publish(s.done)
		}
	}
	inFlight := tr.unacked + s.aheadUnacked()
	s.mu.Lock()
	s.st.cursor = s.done
	s.st.inFlight = inFlight
	s.mu.Unlock()
	s.m.inFlight.Set(float64(inFlight))
	w := s.window()
	full := s.unsavedN >= w
	if s.done <= s.handed && !(full && s.done > s.persisted && s.done > s.urged) {
		return
	}
	if !force && !full && tr.unacked > 0 && s.unsavedN-tr.unacked < max(1, w/4) {
		return
	}
	ack := s.src.Ack
	if full {
		ack = s.src.AckNow
	}
	if err := ack(s.cursor, s.done); err != nil {
		s.m.errors.Inc()
		if !s.ackFail {
			s.log.Error("cannot store the sink's cursor; sending pauses once a window of events waits for it",
				"cursor", s.done, "error", err)
			s.ackFail = true
		}
		return
	}
	if s.ackFail {
		s.log.Info("sink's cursor stored again", "cursor", s.done)
		s.ackFail = false
	}
	s.handed = s.done
	if full {
		s.urged = s.done
	}
	s.learnPersisted()
}

func stallCheckEvery(ackTimeout time.Duration) time.Duration {
	return min(max(ackTimeout/4, 10*time.Millisecond), time.Second)
}

func (s *sink) setConnected(on bool) {
	s.mu.Lock()
	s.st.connected = on
	s.mu.Unlock()
	if on {
		s.m.connected.Set(1)
	} else {
		s.m.connected.Set(0)
	}
}

func (s *sink) setInFlight(n int) {
	s.mu.Lock()
	s.st.inFlight = n
	s.mu.Unlock()
	s.m.inFlight.Set(float64(n))
}

// setStalled shows a stall (or its end) in health and the metric; a stall is also the last error.
func (s *sink) setStalled(on bool) {
	s.mu.Lock()
	s.st.stalled = on
	if on {
		s.st.lastErr, s.st.lastErrAt = errStalled.Error(), time.Now()
	}
	s.mu.Unlock()
	if on {
		s.m.stalled.Set(1)
	} else {
		s.m.stalled.Set(0)
	}
}

func (s *sink) failed(err error) {
	s.m.errors.Inc()
	s.mu.Lock()
	s.st.lastErr = err.Error()
	s.st.lastErrAt = time.Now()
	s.mu.Unlock()
}

func (s *sink) health() SinkHealth {
	s.mu.Lock()
	defer s.mu.Unlock()
	return SinkHealth{
		Name:          s.name,
		Type:          s.typ,
		Target:        s.tr.target(),
		Connected:     s.st.connected,
		Healthy:       s.st.connected && !s.st.stalled,
		Stalled:       s.st.stalled,
		LastError:     s.st.lastErr,
		LastErrorTime: s.st.lastErrAt,
		LastAck:       s.st.lastAck,
		Cursor:        s.st.cursor,
		InFlight:      s.st.inFlight,
	}
}

// loss is the end of a connection: closed once, with the first cause. Connections embed it.
type loss struct {
	once sync.Once
	ch   chan struct{} // make it when the connection is made
	err  error
}

// lost is closed when the connection is lost.
func (l *loss) lost() <-chan struct{} { return l.ch }

// cause says why the connection was lost (valid once lost() is closed).
func (l *loss) cause() error { return l.err }

// markLost records the first cause and closes lost().
func (l *loss) markLost(err error) {
	l.once.Do(func() {
		l.err = err
		close(l.ch)
	})
}
