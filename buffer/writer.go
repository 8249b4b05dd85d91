package buffer

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Run is the log's single writer. It commits the queued appends in one transaction per batch (group
// commit: what queues during a commit goes into the next one; a transaction also takes in the appends that
// arrive while it is open, until the appenders the previous commit woke have queued again, see settle),
// persists moved cursors with the next commit of appends (or in one of their own when no append comes),
// deletes what every required cursor has passed, applies MaxAge, fsyncs in interval mode and compacts the
// file when it is mostly free space. When ctx ends it commits what is queued, persists the cursors, closes
// the file and returns nil. It returns an error only when the file cannot be reopened after a compaction.
func (l *Log) Run(ctx context.Context) error {
	l.mu.Lock()
	switch {
	case l.running:
		l.mu.Unlock()
		return errors.New("buffer: run: already running")
	case l.closed:
		l.mu.Unlock()
		return fmt.Errorf("buffer: run: %w", ErrClosed)
	}
	l.running = true
	l.mu.Unlock()
	defer close(l.runDone)
	defer func() {
		l.mu.Lock()
		l.running = false
		l.mu.Unlock()
	}()

	period := l.tickEvery
	if l.cfg.Durability == DurabilityInterval && l.cfg.FsyncInterval < period {
		period = l.cfg.FsyncInterval
	}
	tick := time.NewTicker(period)
	defer tick.Stop()
	now := time.Now()
	l.lastSync, l.lastCompact = now, now
	// While appends flow (one was committed within about a commit's time), a moved cursor waits up to that
	// long for the next commit of appends to carry it; otherwise it is committed alone at once.
	grace := time.NewTimer(time.Hour)
	grace.Stop()
	defer grace.Stop()
	settleTimer := time.NewTimer(time.Hour)
	settleTimer.Stop()
	defer settleTimer.Stop()
	var graceC <-chan time.Time
	// In interval mode a write that is not fsync'd yet is fsync'd FsyncInterval after the previous fsync, to the
	// timer, not at the next tick after that.
	syncTimer := time.NewTimer(time.Hour)
	syncTimer.Stop()
	defer syncTimer.Stop()
	var syncC <-chan time.Time
	for {
		if l.unsynced && syncC == nil {
			syncTimer.Reset(time.Until(l.lastSync.Add(l.cfg.FsyncInterval)))
			syncC = syncTimer.C
		}
		select {
		case <-ctx.Done():
			return l.shutdown()
		case <-l.stop:
			return l.shutdown()
		case <-l.wake:
			s := settle{timer: settleTimer}
			for b := l.next(&s); b != nil; b = l.next(&s) {
				l.commit(b, &s) // saves the moved cursors too
				s.after(b)
				// Housekeeping is not starved by a steady stream of batches.
				select {
				case <-tick.C:
					if err := l.housekeep(); err != nil {
						return errors.Join(err, l.shutdown())
					}
				default:
				}
			}
			s.timer.Stop()
			// An AckNow cuts short a wait that Ack began.
			if l.saveAsked.Load() && (graceC == nil || l.saveNow.Load()) {
				if d := l.saveDelay(); d > 0 {
					grace.Reset(d)
					graceC = grace.C
				} else {
					grace.Stop()
					graceC = nil
					l.saveCursors()
				}
			}
		case <-graceC:
			graceC = nil
			if l.saveAsked.Load() {
				if l.queueEmpty() {
					l.saveCursors()
				} else {
					select { // the queued appends carry the cursors
					case l.wake <- struct{}{}:
					default:
					}
				}
			}
		case <-syncC:
			syncC = nil
			l.syncDue()
		case <-tick.C:
			if err := l.housekeep(); err != nil {
				return errors.Join(err, l.shutdown())
			}
		}
	}
}

// syncDue fsyncs, in interval mode, what was written since the last fsync if FsyncInterval has passed since.
func (l *Log) syncDue() {
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	if l.db != nil && l.unsynced && time.Since(l.lastSync) >= l.cfg.FsyncInterval {
		l.sync()
	}
}

// pokeEvery is how many entries the writer leaves queued while it waits in an open transaction before it is
// woken to take them: it then puts them while the appenders that the previous commit woke still queue theirs.
const pokeEvery = 32

// settleIdle and settleMax bound how long a commit waits for the appenders that the previous commit woke:
// settleIdle without a new entry, settleMax in all. An appender that is slow to return from Wait (or a
// Pending that is never waited for) does not hold the commits back for longer.
const (
	settleIdle = 100 * time.Microsecond
	settleMax  = time.Millisecond
)

// settle tells how long the writer waits for the appenders that the previous commit woke. Closed-loop
// appenders (a device waiting for its PUBACK before the next publish) queue their next event right after
// they return from Wait: when the next commit waits for them, they share it instead of splitting into two
// alternating halves, each with its own fsync. The writer waits on the wake channel, which the appenders
// signal with the first entry of a batch, every pokeEvery entries and when the last of them returns from
// Wait; once they all returned it yields the processor once, for those still on their way to the queue.
type settle struct {
	prev     *batch      // the batch of the previous commit; nil: nobody to wait for
	timer    *time.Timer // fires when nothing was appended for settleIdle, or at the deadline
	deadline time.Time   // settleMax after the previous commit
	quiet    bool        // every appender of prev had returned before the last yield, and nothing came since
	idle     bool        // the timer fired and nothing came since
}

// after starts the wait for the appenders of b, just committed.
func (s *settle) after(b *batch) {
	s.prev, s.quiet, s.idle = b, false, false
	s.deadline = time.Now().Add(settleMax)
	s.timer.Reset(settleIdle)
}

// settled reports whether the writer stops waiting: nobody to wait for, the appenders of prev all returned
// and a yield since brought nothing, or the timer fired.
func (s *settle) settled() bool { return s.prev == nil || s.quiet || s.idle }

// wait blocks until something is appended, the last appender of prev returns from Wait or the timer fires;
// once they all returned, it yields the processor once instead.
func (s *settle) wait(wake <-chan struct{}) {
	if s.prev.waiting() {
		select {
		case <-wake:
		case <-s.timer.C:
			s.idle = true
		}
		return
	}
	s.quiet = true
	runtime.Gosched()
}

// arrived notes that entries came: the wait starts over, within the deadline.
func (s *settle) arrived() {
	s.quiet, s.idle = false, false
	if s.prev != nil {
		s.timer.Reset(min(settleIdle, time.Until(s.deadline)))
	}
}

// next returns the oldest queued batch, or nil when none is queued once the appenders of the previous
// commit have run.
func (l *Log) next(s *settle) *batch {
	for {
		if b := l.head(); b != nil || s.settled() {
			return b
		}
		s.wait(l.wake)
	}
}

// fill puts the entries of b, the oldest queued batch, into t as they are appended, and seals b once no
// more come (see settle) or it is full. It records each entry's seq in b.seqs (0: refused for want of
// room).
func (l *Log) fill(t *txn, b *batch, s *settle) error {
	done := 0
	for {
		l.mu.Lock()
		recs := b.recs
		b.taken = len(recs)
		if len(recs) == done && (b.sealed || b.full() || s.settled()) {
			l.seal(b)
			l.mu.Unlock()
			return nil
		}
		l.mu.Unlock()
		if len(recs) == done {
			s.wait(l.wake)
			continue
		}
		s.arrived()
		if b.seqs == nil {
			b.seqs = make([]uint64, 0, cap(recs))
		}
		if err := t.putAll(recs[done:], &b.seqs); err != nil {
			l.mu.Lock()
			l.seal(b) // later appends go to the next batch, not to this failed commit
			l.mu.Unlock()
			return err
		}
		done = len(recs)
	}
}

// saveGrace is how long a moved cursor waits for a commit of appends to carry it: the last commit's duration,
// within 100µs and 2ms.
func (l *Log) saveGrace() time.Duration {
	return min(max(l.lastCommit, 100*time.Microsecond), 2*time.Millisecond)
}

// saveEvery is the least time between a commit that saved cursors and a commit that saves only cursors (Ack;
// AckNow does not wait for it). A sink draining a backlog moves its cursor with every acknowledgement: saved at
// once each time, the cursors took a commit (two fsyncs) per round trip, more fsyncs than the live appends, for
// nothing a crash would show, since events past the saved cursor are sent again anyway (a sink counts them in its
// window until they are saved).
const saveEvery = 5 * time.Millisecond

// saveDelay is how long moved cursors wait before a commit of their own: while appends flow (one was committed
// within saveGrace), for the next commit of appends to carry them; unless a reader waits for them (AckNow),
// until saveEvery after the last commit that saved cursors.
func (l *Log) saveDelay() time.Duration {
	var d time.Duration
	if g := l.saveGrace(); time.Since(l.lastAppended) < g {
		d = g
	}
	if l.saveNow.Load() {
		return d
	}
	return max(d, l.saveEvery-time.Since(time.Unix(0, l.lastSaved.Load())))
}

// queueEmpty reports whether no append waits for a commit.
func (l *Log) queueEmpty() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.queue) == 0
}

// saveCursors commits the moved cursors (and deletes what they passed) in a transaction of their own. Every
// Ack up to its start shares it; a failure is retried by the next commit or tick.
func (l *Log) saveCursors() {
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	if l.db == nil && !l.reopen {
		return
	}
	if _, err := l.update(nil); err != nil {
		l.m.commitErrors.Inc()
		l.limiter.failed(err, 0)
		return
	}
	if l.db.NoSync {
		l.unsynced = true
	}
}

// commit makes one batch durable and wakes its appenders. It starts the transaction with the entries
// queued so far and puts those appended meanwhile too, until fill seals the batch (see settle).
func (l *Log) commit(b *batch, s *settle) {
	defer close(b.done)
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	start := time.Now()
	t, err := l.update(func(t *txn) error { return l.fill(t, b, s) })
	l.mu.Lock()
	l.seal(b) // when the transaction failed before fill sealed it
	l.recycle(b)
	l.mu.Unlock()
	l.lastAppended = time.Now()
	l.lastCommit = l.lastAppended.Sub(start)
	l.m.commitDuration.Observe(l.lastCommit.Seconds())
	if err != nil {
		if isNoSpace(err) {
			err = fmt.Errorf("%w: %w", ErrFull, err)
		}
		b.err = err
		l.m.commitErrors.Inc()
		l.limiter.failed(err, len(b.recs))
		return
	}
	end := time.Since(l.epoch)
	for i, seq := range b.seqs {
		if r := &b.recs[i]; seq != 0 && r.waited {
			l.m.appendDuration.Observe((end - r.start).Seconds())
		}
	}
	l.m.batchSize.Observe(float64(len(b.recs)))
	l.m.appended.Add(float64(len(b.recs) - t.rejected))
	if t.rejected > 0 {
		l.m.rejected.Add(float64(t.rejected))
		l.limiter.rejected += int64(t.rejected)
		// Without a required cursor a refusal is about priority (the log holds only higher ones), which the
		// next event may not share: the fast refusal in enqueue is for a log that owes its events to a sink.
		if l.cfg.WhenFull == WhenFullReject && t.rejected > t.oversized && t.hasRequired {
			for i := range b.recs {
				if size := int64(len(b.recs[i].val) + keySize); b.seqs[i] == 0 && size <= l.cfg.MaxBytes &&
					(l.fullProbe == 0 || size < l.fullProbe) {
					l.fullProbe = size
				}
			}
			l.full.Store(true)
		}
	}
	if l.db.NoSync {
		l.unsynced = true
		if time.Since(l.lastSync) >= l.cfg.FsyncInterval {
			l.sync()
		}
	}
}

// sync fsyncs the file in interval mode.
func (l *Log) sync() {
	defer l.busy()()
	start := time.Now()
	err := l.db.Sync()
	l.m.fsyncDuration.Observe(time.Since(start).Seconds())
	l.lastSync = time.Now()
	if err != nil {
		l.m.commitErrors.Inc()
		l.limiter.failed(fmt.Errorf("fsync: %w", err), 0)
		return
	}
	l.unsynced = false
}

// housekeep runs on every tick: saves moved cursors, deletes what all required cursors passed, applies
// MaxAge, fsyncs in interval mode, refreshes the full flag, logs drops and compacts.
func (l *Log) housekeep() error {
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	if l.db == nil && !l.reopen {
		return nil
	}
	now := time.Now()
	var cutoff int64
	if l.cfg.MaxAge > 0 && now.Sub(l.lastTTL) >= ttlEvery {
		l.lastTTL = now
		c := unixNano(l.now().Add(-l.cfg.MaxAge))
		if st := l.state.Load(); slices.ContainsFunc(st.segs, func(s *segMeta) bool { return s.MinTime < c }) {
			cutoff = c
		}
	}
	if cutoff != 0 || l.cursorsDirty() || l.deliveredSegments() {
		_, err := l.update(func(t *txn) error {
			if cutoff != 0 {
				return t.expire(cutoff, reasonMaxAge)
			}
			return nil
		})
		if err != nil {
			l.m.commitErrors.Inc()
			l.limiter.failed(err, 0)
		}
	}
	if l.db == nil { // a failed commit's file could not be opened again yet
		l.limiter.flush(now, l.logger)
		return nil
	}
	if l.unsynced && now.Sub(l.lastSync) >= l.cfg.FsyncInterval {
		l.sync()
	}
	l.refreshFull()
	l.limiter.flush(now, l.logger)
	if now.Sub(l.lastCompact) >= l.compactEvery {
		l.lastCompact = now
		return l.maybeCompact()
	}
	return nil
}

// deliveredSegments reports whether a whole segment was passed by every required cursor.
func (l *Log) deliveredSegments() bool {
	st := l.state.Load()
	if len(st.segs) == 0 {
		return false
	}
	minPos, ok := l.minRequired()
	return ok && st.segs[0].MaxSeq <= minPos
}

// minRequired returns the lowest position of the required cursors; ok is false when there are none.
func (l *Log) minRequired() (pos uint64, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.minRequiredLocked()
}

func (l *Log) minRequiredLocked() (uint64, bool) {
	if len(l.required) == 0 {
		return 0, false
	}
	pos := uint64(math.MaxUint64)
	for _, name := range l.required {
		if c := l.cursors[name]; c == nil {
			pos = 0
		} else {
			pos = min(pos, c.pos)
		}
	}
	return pos, true
}

// refreshFull recomputes the reject fast path: full while the smallest event refused since the log became
// full (or a typical event) would still not fit.
func (l *Log) refreshFull() {
	if l.cfg.WhenFull != WhenFullReject {
		l.full.Store(false)
		return
	}
	minPos, ok := l.minRequired()
	if !ok {
		l.full.Store(false) // nothing is owed to a cursor: the oldest events make room
		return
	}
	probe := l.fullProbe
	if probe == 0 {
		probe = min(4096, l.cfg.MaxBytes/16+1)
	}
	st := l.state.Load()
	kept := st.bytes
	for _, s := range st.segs {
		if s.MinSeq > minPos {
			break
		}
		if s.MaxSeq <= minPos {
			kept -= s.Bytes
		} else {
			kept -= s.Bytes * int64(minPos-s.MinSeq+1) / int64(s.MaxSeq-s.MinSeq+1)
		}
	}
	full := kept+probe > l.cfg.MaxBytes
	if room, guarded := l.freeRoom(); guarded && room+(st.bytes-kept) < probe+probe/4 {
		full = true
	}
	if !full {
		l.fullProbe = 0
	}
	if l.full.Swap(full) != full {
		if full {
			l.logger.Warn("log full: rejecting new events", "bytes", st.bytes, "max_bytes", l.cfg.MaxBytes)
		} else {
			l.logger.Info("log has room again", "bytes", st.bytes, "max_bytes", l.cfg.MaxBytes)
		}
	}
}

// freeRoom estimates how many bytes may still be written before the filesystem's free space drops under
// MinFreeBytes: free space plus the free pages inside the file, minus the guard. guarded is false when the
// guard is off or the free space is unknown.
func (l *Log) freeRoom() (room int64, guarded bool) {
	if l.cfg.MinFreeBytes <= 0 {
		return 0, false
	}
	avail, err := l.statfs(l.path)
	if err != nil {
		return 0, false
	}
	s := l.db.Stats()
	slack := int64(s.FreePageN) * int64(l.db.Info().PageSize)
	return avail + slack - l.cfg.MinFreeBytes, true
}

// busy marks a write transaction or fsync as in progress, unless one already is (a commit that retries within
// itself), until the returned function is called.
func (l *Log) busy() (done func()) {
	if !l.busySince.CompareAndSwap(0, time.Now().UnixNano()) {
		return func() {}
	}
	return func() { l.busySince.Store(0) }
}

// Busy returns how long the write transaction or fsync in progress has been running, or 0 when none is. A disk
// that stops answering shows here, while appends wait for that commit. Compaction, which copies the file and
// takes time in proportion to its size, is not counted.
func (l *Log) Busy() time.Duration {
	since := l.busySince.Load()
	if since == 0 {
		return 0
	}
	return max(time.Since(time.Unix(0, since)), time.Nanosecond)
}

// update runs one write transaction: fn, then the deletion of what every required cursor passed, the
// moved cursors and the metadata. On success it publishes the new state; on failure the file's state is
// reloaded. The caller holds writeMu.
func (l *Log) update(fn func(*txn) error) (*txn, error) {
	defer l.busy()()
	if l.db == nil {
		if !l.reopen {
			return nil, ErrClosed
		}
		if err := l.openAgain(); err != nil {
			return nil, err
		}
	}
	t := &txn{l: l, st: l.state.Load().clone(), owned: map[*segMeta]bool{}, dirty: map[uint64]bool{}}
	t.lastSeq0 = t.st.lastSeq
	l.mu.Lock()
	l.saveAsked.Store(false) // the positions taken here are saved, or retried by the next commit or tick
	l.saveNow.Store(false)
	for name, c := range l.cursors {
		if c.pos != c.saved {
			if t.saves == nil {
				t.saves = map[string]uint64{}
			}
			t.saves[name] = c.pos
		}
	}
	t.minCursor, t.hasRequired = l.minRequiredLocked()
	l.mu.Unlock()
	t.freeRoom, t.guard = l.freeRoom()
	committing, txid := false, 0
	err := l.db.Update(func(tx *bolt.Tx) error {
		t.tx = tx
		t.events, t.segments = tx.Bucket(bucketEvents), tx.Bucket(bucketSegments)
		if l.undoTo != 0 {
			if err := t.undo(l.undoFrom, l.undoTo); err != nil {
				return err
			}
		}
		if fn != nil {
			if err := fn(t); err != nil {
				return err
			}
		}
		if err := t.removeDelivered(); err != nil {
			return err
		}
		if err := t.finish(); err != nil {
			return err
		}
		if l.beforeCommit != nil {
			if err := l.beforeCommit(); err != nil {
				return err
			}
		}
		committing, txid = true, tx.ID()
		return nil
	})
	if err != nil {
		if errors.Is(err, ErrCorrupt) {
			l.damaged.Store(true)
		}
		if committing {
			l.recoverCommit(t, txid, err)
		} else {
			l.reloadState()
		}
		return t, err
	}
	// A pending deletion of a failed commit's records was in t (update runs it first): nothing is hidden now.
	l.undoFrom, l.undoTo = 0, 0
	l.hideFrom, l.hideTo = 0, 0
	t.st.hideFrom, t.st.hideTo, t.st.hiddenN, t.st.hiddenBytes = 0, 0, 0, 0
	if !l.db.NoSync {
		// bbolt's write time of the commit: its page writes and its two fsyncs (data, then meta page).
		st := t.tx.Stats()
		l.m.fsyncDuration.Observe(st.GetWriteTime().Seconds())
	}
	prev := l.state.Swap(t.st)
	l.mu.Lock()
	if len(t.saves) > 0 {
		l.lastSaved.Store(time.Now().UnixNano())
	}
	saved := false
	for name, pos := range t.saves {
		if c := l.cursors[name]; c != nil && c.saved < pos {
			c.saved, saved = pos, true
		}
	}
	if saved {
		close(l.saved)
		l.saved = make(chan struct{})
	}
	if t.st.lastSeq > prev.lastSeq {
		close(l.notify)
		l.notify = make(chan struct{})
	}
	l.mu.Unlock()
	l.countRemovals(t)
	return t, nil
}

// countRemovals counts the events a committed transaction dropped or deleted.
func (l *Log) countRemovals(t *txn) {
	for r, n := range t.drops {
		if n > 0 {
			l.m.dropped[r].Add(float64(n))
			l.limiter.drops[r] += n
		}
	}
	if t.deleted > 0 {
		l.m.deleted.Add(float64(t.deleted))
	}
}

// recoverCommit makes the log consistent again after bbolt's commit of t (transaction txid) failed in a write
// or an fsync. bbolt then rolls back in memory only. That matches the file unless the meta page was written
// before the failure (its fsync failed): the page cache then holds the new meta page, so the file names the
// failed transaction while bbolt's free list holds that transaction's pages as free again, for the next
// commit to overwrite (etcd-io/bbolt#233). In that case the file is closed and opened again, which rebuilds
// the free list from the file, the transaction's removals are counted, and its appends — their appenders were
// told they are not stored — are hidden from readers and deleted again by the next commit, attempted here at
// once. When the file
// cannot be opened, the next commit tries again. The caller holds writeMu.
func (l *Log) recoverCommit(t *txn, txid int, cause error) {
	took, err := l.took(txid)
	if err == nil && !took {
		l.reloadState()
		return
	}
	l.logger.Error("commit failed after its meta page was written; opening the log file again", "error", cause)
	if t.st.lastSeq > t.lastSeq0 { // hidden from readers as soon as the file is open again, should it hold them
		l.hideFrom, l.hideTo = t.lastSeq0+1, t.st.lastSeq
	}
	l.dbMu.Lock()
	if err := l.db.Close(); err != nil {
		l.logger.Warn("close the log file after a failed commit", "error", err)
	}
	l.db = nil
	l.dbMu.Unlock()
	l.reopen = true
	if err := l.openAgain(); err != nil {
		l.logger.Error("the log file could not be opened again; the next commit tries again", "error", err)
	} else if took, err = l.took(txid); err != nil {
		l.logger.Error("read the log file opened again", "error", err)
	}
	if !took {
		l.unhide()
		return
	}
	l.countRemovals(t)
	l.undoFrom, l.undoTo = 0, 0 // a pending deletion was in t
	if t.st.lastSeq > t.lastSeq0 {
		l.undoFrom, l.undoTo = t.lastSeq0+1, t.st.lastSeq
		l.logger.Warn("the file took the failed commit; deleting its events", "from_seq", l.undoFrom, "to_seq", l.undoTo)
	}
	if l.db != nil && l.undoTo != 0 && !l.recovering {
		l.recovering = true
		if _, err := l.update(nil); err != nil && l.undoTo != 0 { // not when the file took it nonetheless
			l.logger.Error("delete the events of the failed commit; the next commit tries again", "error", err)
		}
		l.recovering = false
	}
}

// unhide shows the records hidden for a failed commit again: the file did not take it, so their sequence numbers
// are given again.
func (l *Log) unhide() {
	if l.hideFrom == 0 {
		return
	}
	l.hideFrom, l.hideTo = 0, 0
	if st := l.state.Load(); st.hideFrom != 0 {
		c := st.clone()
		c.hideFrom, c.hideTo, c.hiddenN, c.hiddenBytes = 0, 0, 0, 0
		l.state.Store(c)
	}
}

// took reports whether the file names transaction txid or a later one. bbolt reads its meta pages through its
// map of the file, so a read transaction starts at the newest valid meta page in the page cache.
func (l *Log) took(txid int) (bool, error) {
	took := false
	err := l.db.View(func(tx *bolt.Tx) error { took = tx.ID() >= txid; return nil })
	return took, err
}

// openAgain opens the log file after recoverCommit closed it and loads the state it holds.
func (l *Log) openAgain() error {
	if l.beforeReopen != nil {
		if err := l.beforeReopen(); err != nil {
			return fmt.Errorf("buffer: open again after a failed commit: %w", err)
		}
	}
	db, kind, err := openDB(l.path, l.cfg.Durability)
	if err != nil {
		return fmt.Errorf("buffer: open again after a failed commit: %w", err)
	}
	l.dbMu.Lock()
	l.db = db
	l.dbMu.Unlock()
	l.reopen = false
	l.reloadState()
	l.logger.Info("log file opened again", "open", kind, "last_seq", l.state.Load().lastSeq)
	return nil
}

// Purge removes the events whose time is before `before`, whether the cursors passed them or not, and
// returns how many it removed. Those the required cursors had not passed are counted in
// edgegate_buffer_dropped_total{reason="purge"}, the others (delivered, not lost) in
// edgegate_buffer_delivered_deleted_total. It works with or without Run (offline tools).
func (l *Log) Purge(before time.Time) (int, error) {
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	var n int64
	_, err := l.update(func(t *txn) error {
		n0 := t.drops[reasonPurge] + t.deleted
		err := t.expire(unixNano(before), reasonPurge)
		n = t.drops[reasonPurge] + t.deleted - n0
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("buffer: purge: %w", err)
	}
	l.logger.Info("events purged", "before", before, "count", n)
	return int(n), nil
}
