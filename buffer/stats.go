package buffer

import (
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Stats describes the log at one moment.
type Stats struct {
	// Events and Bytes are what is stored (Bytes is the measure MaxBytes bounds).
	Events   int64 `json:"events"`
	Bytes    int64 `json:"bytes"`
	MaxBytes int64 `json:"max_bytes"`
	// FirstSeq is the oldest stored record (0 when empty), LastSeq the newest ever committed.
	FirstSeq uint64 `json:"first_seq"`
	LastSeq  uint64 `json:"last_seq"`
	// Oldest is the event time of the oldest stored record.
	Oldest time.Time `json:"oldest,omitzero"`
	// FileBytes is the size of the file (it shrinks only when the log compacts it).
	FileBytes int64 `json:"file_bytes"`
	Segments  int   `json:"segments"`
	// Queued counts the events waiting for the next commit.
	Queued int `json:"queued"`
	// Full is true while the log rejects new events for want of room.
	Full    bool          `json:"full"`
	Cursors []CursorStats `json:"cursors"`
}

// CursorStats describes one named cursor.
type CursorStats struct {
	Name string `json:"name"`
	// Required is true for the cursors that hold events (Config.Cursors).
	Required bool   `json:"required"`
	Position uint64 `json:"position"`
	// Backlog counts the stored events after Position; BacklogBytes is their size (estimated inside the
	// segment Position falls in).
	Backlog      int64 `json:"backlog"`
	BacklogBytes int64 `json:"backlog_bytes"`
	// OldestUnacked is the event time of the first stored event after Position; OldestUnackedAge is its age
	// in seconds (0 when the backlog is empty).
	OldestUnacked    time.Time `json:"oldest_unacked,omitzero"`
	OldestUnackedAge float64   `json:"oldest_unacked_age_seconds"`
}

// Stats returns the log's counts, sizes and, per cursor, the backlog. It reads a few records, no more.
func (l *Log) Stats() Stats {
	st := l.state.Load()
	s := Stats{
		Events:    st.events - st.hiddenN,
		Bytes:     st.bytes - st.hiddenBytes,
		MaxBytes:  l.cfg.MaxBytes,
		FirstSeq:  st.firstSeq(),
		LastSeq:   st.lastSeq,
		FileBytes: fileSize(l.path),
		Segments:  len(st.segs),
		Full:      l.full.Load() && l.cfg.WhenFull == WhenFullReject,
	}
	l.mu.Lock()
	s.Queued = l.queued
	for name, c := range l.cursors {
		s.Cursors = append(s.Cursors, CursorStats{Name: name, Position: c.pos, Required: slices.Contains(l.required, name)})
	}
	l.mu.Unlock()
	slices.SortFunc(s.Cursors, func(a, b CursorStats) int {
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	if s.Cursors == nil {
		s.Cursors = []CursorStats{}
	}
	l.dbMu.RLock()
	defer l.dbMu.RUnlock()
	l.statsFromFile(&s, st)
	return s
}

// statsFromFile fills in what Stats reads from the file: the oldest times and the cursors' backlogs. A damaged
// page (bbolt panics, or the read faults past the file) leaves them as far as they got and marks the log
// damaged, like a read: Stats runs in the metrics collector, where a panic would end the process. l.dbMu is
// held for reading.
func (l *Log) statsFromFile(s *Stats, st *state) {
	if damage, _ := guarded(func() error { l.readStats(s, st); return nil }); damage != nil {
		l.damaged.Store(true)
		l.logger.Error("the log file is damaged: stats incomplete", "path", l.path, "error", damage)
	}
}

// readStats is statsFromFile's reading, unguarded.
func (l *Log) readStats(s *Stats, st *state) {
	now := l.now()
	var tx *bolt.Tx
	if l.db != nil {
		if t, err := l.db.Begin(false); err == nil {
			tx = t
			defer func() { _ = tx.Rollback() }()
		}
	}
	if tx != nil && s.FirstSeq > 0 {
		s.Oldest, _ = l.timeAfter(tx, s.FirstSeq-1)
	}
	for i := range s.Cursors {
		c := &s.Cursors[i]
		c.Backlog, c.BacklogBytes = l.backlog(tx, st, c.Position)
		if c.Position < st.hideFrom { // the hidden records are the newest: behind every cursor that is before them
			c.Backlog, c.BacklogBytes = c.Backlog-st.hiddenN, c.BacklogBytes-st.hiddenBytes
		}
		if c.Backlog == 0 || tx == nil {
			continue
		}
		if t, ok := l.timeAfter(tx, c.Position); ok {
			c.OldestUnacked = t
			c.OldestUnackedAge = max(0, now.Sub(t).Seconds())
		}
	}
}

// backlog counts the stored events after pos and their bytes.
func (l *Log) backlog(tx *bolt.Tx, st *state, pos uint64) (n, bytes int64) {
	for _, s := range st.segs {
		switch {
		case s.MaxSeq <= pos:
			continue
		case s.MinSeq > pos:
			n += s.Count
			bytes += s.Bytes
		case uint64(s.Count) == s.MaxSeq-s.MinSeq+1 || tx == nil:
			k := min(int64(s.MaxSeq-pos), s.Count)
			n += k
			bytes += s.Bytes * k / s.Count
		default:
			var k, b int64
			_ = l.scan(tx, pos, func(seq uint64, v []byte) (bool, error) {
				if seq > s.MaxSeq {
					return false, nil
				}
				k++
				b += int64(len(v) + keySize)
				return true, nil
			})
			n += k
			bytes += b
		}
	}
	return n, bytes
}

// timeAfter returns the event time of the first stored record after seq.
func (l *Log) timeAfter(tx *bolt.Tx, seq uint64) (t time.Time, ok bool) {
	_ = l.scan(tx, seq, func(_ uint64, v []byte) (bool, error) {
		if _, tm, good := recordPriorityTime(v); good {
			t, ok = time.Unix(0, tm).UTC(), true
		}
		return false, nil
	})
	return t, ok
}
