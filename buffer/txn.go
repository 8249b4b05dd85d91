package buffer

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"

	bolt "go.etcd.io/bbolt"
)

// Reasons for dropping events, the label of edgegate_buffer_dropped_total.
const (
	reasonMaxBytes = iota
	reasonMinFree
	reasonMaxAge
	reasonPurge
	numReasons
	reasonDelivered = -1 // removal of an event every required cursor passed: not a drop
	reasonUndone    = -2 // removal of an event whose commit failed (never acknowledged): not counted
)

var reasonNames = [numReasons]string{"max_bytes", "min_free", "max_age", "purge"}

// txn is the writer's view of one write transaction: a private copy of the state that becomes the
// committed state when the transaction commits.
type txn struct {
	l                *Log
	st               *state
	tx               *bolt.Tx
	events, segments *bolt.Bucket
	owned            map[*segMeta]bool // segments copied in this transaction (safe to modify)
	dirty            map[uint64]bool   // segments whose metadata must be written
	tail             *bolt.Bucket      // the bucket put writes to, nil until opened or once deleted
	tailBase         uint64
	tailSeg          *segMeta // the metadata of tail's segment: owned, marked dirty
	key              [8]byte  // put's key (bbolt copies keys)
	lastSeq0         uint64

	saves       map[string]uint64 // cursor positions to persist
	minCursor   uint64
	hasRequired bool
	guard       bool
	freeRoom    int64

	drops     [numReasons]int64
	deleted   int64
	rejected  int
	oversized int // rejected because larger than MaxBytes
}

// mut returns segment i, copied on first write.
func (t *txn) mut(i int) *segMeta {
	s := t.st.segs[i]
	if !t.owned[s] {
		c := *s
		s = &c
		t.st.segs[i] = s
		t.owned[s] = true
	}
	t.dirty[s.Base] = true
	return s
}

// delivered reports whether every required cursor passed seq.
func (t *txn) delivered(seq uint64) bool { return t.hasRequired && seq <= t.minCursor }

// count records the removal of one event.
func (t *txn) count(seq uint64, reason int) {
	switch {
	case reason == reasonUndone:
	case reason == reasonDelivered:
		t.deleted++
	case !t.delivered(seq):
		t.drops[reason]++
	default:
		t.deleted++
	}
}

// putAll stores recs in order, each where makeRoom finds room, and appends the seq given to each to seqs
// (0 for one refused for want of room).
func (t *txn) putAll(recs []pending, seqs *[]uint64) error {
	for i := range recs {
		p := &recs[i]
		size := int64(len(p.val) + keySize)
		ok, err := t.makeRoom(size, p.prio)
		if err != nil {
			return err
		}
		var seq uint64
		if !ok {
			t.rejected++
		} else if seq, err = t.put(p.val, p.prio, p.time, size); err != nil {
			return err
		}
		*seqs = append(*seqs, seq)
	}
	return nil
}

// put appends one record with the next sequence number.
func (t *txn) put(val []byte, prio uint8, tm, size int64) (uint64, error) {
	seq := t.st.lastSeq + 1
	if base := segBase(seq, t.l.segSize); t.tail == nil || t.tailBase != base {
		if err := t.openTail(base, seq, tm); err != nil {
			return 0, err
		}
	}
	binary.BigEndian.PutUint64(t.key[:], seq)
	if err := t.tail.Put(t.key[:], val); err != nil {
		return 0, fmt.Errorf("put %d: %w", seq, err)
	}
	seg := t.tailSeg
	seg.Count++
	seg.Bytes += size
	seg.MaxSeq = seq
	seg.Prio[prio]++
	seg.PrioBytes[prio] += size
	t.st.prioBytes[prio] += size
	seg.MinTime = min(seg.MinTime, tm)
	seg.MaxTime = max(seg.MaxTime, tm)
	t.st.lastSeq = seq
	t.st.events++
	t.st.bytes += size
	return seq, nil
}

// openTail makes the segment starting at base, which seq (of time tm) opens or continues, the one put
// writes to.
func (t *txn) openTail(base, seq uint64, tm int64) error {
	var seg *segMeta
	if n := len(t.st.segs); n > 0 && t.st.segs[n-1].Base == base {
		seg = t.mut(n - 1)
	} else {
		seg = &segMeta{Base: base, MinSeq: seq, MinTime: tm, MaxTime: tm}
		t.owned[seg] = true
		t.dirty[base] = true
		t.st.segs = append(t.st.segs, seg)
	}
	b, err := t.events.CreateBucketIfNotExists(seqKey(base))
	if err != nil {
		return fmt.Errorf("segment %d: %w", base, err)
	}
	b.FillPercent = 1.0 // keys only grow: pack pages full
	t.tail, t.tailBase, t.tailSeg = b, base, seg
	return nil
}

// makeRoom decides whether an event of size bytes and priority prio fits, removing events to make room:
// first those every required cursor passed, then (drop-oldest, or no required cursor) the oldest of the
// lowest priority, never of a priority above prio.
func (t *txn) makeRoom(size int64, prio uint8) (bool, error) {
	cfg := &t.l.cfg
	if size > cfg.MaxBytes {
		t.oversized++
		return false, nil
	}
	need := size + size/4 // page overhead, for the free-space guard
	short, reason := t.st.bytes+size-cfg.MaxBytes, reasonMaxBytes
	if t.guard && need-t.freeRoom > short {
		short, reason = need-t.freeRoom, reasonMinFree
	}
	if short <= 0 {
		t.freeRoom -= need
		return true, nil
	}
	freed, err := t.reclaimDelivered()
	if err != nil {
		return false, err
	}
	short -= freed
	t.freeRoom += freed
	if short > 0 && (cfg.WhenFull == WhenFullDropOldest || !t.hasRequired) && t.droppable(prio) >= short {
		freed, err := t.dropLowest(short, prio, reason)
		if err != nil {
			return false, err
		}
		short -= freed
		t.freeRoom += freed
	}
	if short > 0 {
		return false, nil
	}
	t.freeRoom -= need
	return true, nil
}

// droppable is the size of the stored events of priority up to prio.
func (t *txn) droppable(prio uint8) int64 {
	var n int64
	for p := range int(prio) + 1 {
		n += t.st.prioBytes[p]
	}
	return n
}

// removeDelivered deletes the whole segments every required cursor passed.
func (t *txn) removeDelivered() error {
	if !t.hasRequired {
		return nil
	}
	removed := false
	for i, s := range t.st.segs {
		if s.Count == 0 {
			continue
		}
		if s.MaxSeq > t.minCursor {
			break
		}
		if _, err := t.dropWhole(i, reasonDelivered); err != nil {
			return err
		}
		removed = true
	}
	if removed {
		t.prune()
	}
	return nil
}

// reclaimDelivered deletes every stored event the required cursors passed, returning the bytes freed.
func (t *txn) reclaimDelivered() (int64, error) {
	if !t.hasRequired {
		return 0, nil
	}
	before := t.st.bytes
	if err := t.removeDelivered(); err != nil {
		return 0, err
	}
	if len(t.st.segs) > 0 && t.st.segs[0].MinSeq <= t.minCursor {
		s := t.st.segs[0]
		if _, _, err := t.sweep(0, s.MinSeq, t.minCursor, 0, reasonDelivered, matchAll); err != nil {
			return 0, err
		}
		t.prune()
	}
	return before - t.st.bytes, nil
}

// dropLowest drops stored events, lowest priority (up to maxPrio) and oldest first, until short bytes are
// freed; it returns the bytes freed.
func (t *txn) dropLowest(short int64, maxPrio uint8, reason int) (int64, error) {
	before := t.st.bytes
	for p := uint8(0); p <= maxPrio && before-t.st.bytes < short; p++ {
		for i := 0; i < len(t.st.segs) && before-t.st.bytes < short; i++ {
			s := t.st.segs[i]
			if s.Prio[p] == 0 {
				continue
			}
			left := short - (before - t.st.bytes)
			if s.Prio[p] == s.Count && s.Bytes <= left {
				if ok, err := t.dropWhole(i, reason); err != nil {
					return 0, err
				} else if ok {
					continue
				}
			}
			from := max(s.MinSeq, t.st.dropHint[p]+1)
			segMax := s.MaxSeq
			last, early, err := t.sweep(i, from, math.MaxUint64, left, reason, func(pr uint8, _ int64) bool { return pr == p })
			if err != nil {
				return 0, err
			}
			if early {
				t.st.dropHint[p] = last
			} else {
				t.st.dropHint[p] = max(t.st.dropHint[p], segMax)
			}
		}
	}
	t.prune()
	return before - t.st.bytes, nil
}

// expire removes the events whose time is before cutoff (unix nanoseconds).
func (t *txn) expire(cutoff int64, reason int) error {
	for i, s := range t.st.segs {
		if s.Count == 0 || s.MinTime >= cutoff {
			continue
		}
		if s.MaxTime < cutoff {
			if ok, err := t.dropWhole(i, reason); err != nil || ok {
				if err != nil {
					return err
				}
				continue
			}
		}
		if _, _, err := t.sweep(i, s.MinSeq, math.MaxUint64, 0, reason, func(_ uint8, tm int64) bool { return tm < cutoff }); err != nil {
			return err
		}
	}
	t.prune()
	return nil
}

func matchAll(uint8, int64) bool { return true }

// dropWhole deletes segment i at once. For a retention reason other than purge it declines (false) when
// some of the segment's events were delivered and others not, so that the caller counts them one by one.
func (t *txn) dropWhole(i int, reason int) (bool, error) {
	s := t.st.segs[i]
	if reason >= 0 && t.hasRequired && s.MinSeq <= t.minCursor && s.MaxSeq > t.minCursor {
		return false, nil
	}
	if err := t.events.DeleteBucket(seqKey(s.Base)); err != nil {
		return false, fmt.Errorf("delete segment %d: %w", s.Base, err)
	}
	if t.tailBase == s.Base {
		t.tail, t.tailSeg = nil, nil
	}
	switch {
	case reason == reasonDelivered:
		t.deleted += s.Count
	case !t.delivered(s.MaxSeq):
		t.drops[reason] += s.Count
	default:
		t.deleted += s.Count
	}
	t.st.events -= s.Count
	t.st.bytes -= s.Bytes
	for p, n := range s.PrioBytes {
		t.st.prioBytes[p] -= n
	}
	m := t.mut(i)
	m.Count, m.Bytes, m.Prio, m.PrioBytes = 0, 0, [maxPriority + 1]int64{}, [maxPriority + 1]int64{}
	return true, nil
}

// sweep deletes the records of segment i with from <= seq <= until that match, stopping once need bytes are
// freed (need <= 0: no limit). It returns the last seq visited and whether it stopped early. Counts and sizes
// stay exact; the time bounds become exact when the whole segment was visited.
func (t *txn) sweep(i int, from, until uint64, need int64, reason int, match func(prio uint8, tm int64) bool) (last uint64, early bool, err error) {
	s := t.mut(i)
	b := t.events.Bucket(seqKey(s.Base))
	if b == nil {
		return 0, false, fmt.Errorf("%w: segment %d has no bucket", ErrCorrupt, s.Base)
	}
	whole := from <= s.MinSeq && until >= s.MaxSeq
	minT, maxT := int64(math.MaxInt64), int64(math.MinInt64)
	var keys [][]byte
	var freed int64
	c := b.Cursor()
	for k, v := c.Seek(seqKey(from)); k != nil; k, v = c.Next() {
		seq, err := decodeSeqKey(k)
		if err != nil {
			return 0, false, fmt.Errorf("%w: segment %d: %w", ErrCorrupt, s.Base, err)
		}
		if seq > until {
			break
		}
		last = seq
		prio, tm, ok := recordPriorityTime(v)
		if !ok {
			return 0, false, fmt.Errorf("%w: seq %d: bad record header", ErrCorrupt, seq)
		}
		if !match(prio, tm) {
			minT, maxT = min(minT, tm), max(maxT, tm)
			continue
		}
		keys = append(keys, seqKey(seq))
		size := int64(len(v) + keySize)
		freed += size
		s.Count--
		s.Bytes -= size
		s.Prio[prio]--
		s.PrioBytes[prio] -= size
		t.st.prioBytes[prio] -= size
		t.count(seq, reason)
		if need > 0 && freed >= need {
			early = true
			break
		}
	}
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return 0, false, fmt.Errorf("delete: %w", err)
		}
	}
	t.st.events -= int64(len(keys))
	t.st.bytes -= freed
	if s.Count == 0 {
		if err := t.events.DeleteBucket(seqKey(s.Base)); err != nil {
			return 0, false, fmt.Errorf("delete segment %d: %w", s.Base, err)
		}
		if t.tailBase == s.Base {
			t.tail, t.tailSeg = nil, nil
		}
		return last, early, nil
	}
	if len(keys) > 0 {
		k, _ := c.First()
		s.MinSeq, _ = decodeSeqKey(k)
		k, _ = c.Last()
		s.MaxSeq, _ = decodeSeqKey(k)
	}
	if whole && !early {
		s.MinTime, s.MaxTime = minT, maxT
	}
	return last, early, nil
}

// undo deletes the records with from <= seq <= to: those of a commit that reported failure although the file
// took it (see Log.recoverCommit). They are counted neither as drops nor as deletions.
func (t *txn) undo(from, to uint64) error {
	for i, s := range t.st.segs {
		if s.Count == 0 || s.MaxSeq < from || s.MinSeq > to {
			continue
		}
		if _, _, err := t.sweep(i, from, to, 0, reasonUndone, matchAll); err != nil {
			return fmt.Errorf("undo %d-%d: %w", from, to, err)
		}
	}
	t.prune() // a segment emptied here and written to again gets bounds of its own (openTail)
	return nil
}

// prune forgets the emptied segments.
func (t *txn) prune() {
	t.st.segs = slices.DeleteFunc(t.st.segs, func(s *segMeta) bool { return s.Count == 0 })
}

// finish writes the segment metadata, last_seq and the moved cursors.
func (t *txn) finish() error {
	t.prune()
	for base := range t.dirty {
		k := seqKey(base)
		i, found := slices.BinarySearchFunc(t.st.segs, base, func(s *segMeta, b uint64) int {
			switch {
			case s.Base < b:
				return -1
			case s.Base > b:
				return 1
			}
			return 0
		})
		var err error
		if found {
			err = t.segments.Put(k, encodeSegMeta(t.st.segs[i]))
		} else {
			err = t.segments.Delete(k)
		}
		if err != nil {
			return fmt.Errorf("segment %d metadata: %w", base, err)
		}
	}
	if t.st.lastSeq != t.lastSeq0 {
		if err := t.tx.Bucket(bucketMeta).Put(keyLastSeq, encodeUint64(t.st.lastSeq)); err != nil {
			return fmt.Errorf("last_seq: %w", err)
		}
	}
	if len(t.saves) > 0 {
		curs := t.tx.Bucket(bucketCursors)
		for name, pos := range t.saves {
			if err := curs.Put([]byte(name), encodeUint64(pos)); err != nil {
				return fmt.Errorf("cursor %q: %w", name, err)
			}
		}
	}
	return nil
}
