package deadletter

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// Record is one dead letter.
type Record struct {
	ID       uint64    `json:"id"`     // assigned by the store, increasing
	Time     time.Time `json:"time"`   // when it happened; set by Add when zero
	Reason   string    `json:"reason"` // short snake_case: not_json, too_large, unknown_topic, command_undelivered, ...
	Detail   string    `json:"detail"` // human text
	DeviceID string    `json:"device_id,omitempty"`
	Topic    string    `json:"topic,omitempty"`
	Payload  []byte    `json:"payload"` // the original bytes, untouched
}

// Reasons the store itself uses.
const (
	// ReasonUnspecified replaces an empty reason.
	ReasonUnspecified = "unspecified"
	// ReasonCorrupt marks a stored record that could not be decoded; List returns its raw bytes as the payload.
	ReasonCorrupt = "corrupt_record"
	// ReasonOther is the metric label for reasons that are not short snake_case ([a-z][a-z0-9_]{0,63}) and for
	// reasons beyond the first 64 distinct ones, so the label set stays bounded. The record keeps its reason.
	ReasonOther = "other"
)

// Sentinel errors.
var (
	// ErrClosed is returned by Add and List after Close.
	ErrClosed = errors.New("deadletter: store closed")
	// ErrTooLarge is returned by Add for a record larger than Config.MaxBytes on its own.
	ErrTooLarge = errors.New("deadletter: record larger than max_bytes")
)

const (
	// DefaultListLimit is the number of records List returns when asked for limit <= 0.
	DefaultListLimit = 100
	// MaxListLimit bounds the records one List call returns.
	MaxListLimit = 10000

	maxReasonLabels  = 64
	evictLogInterval = 10 * time.Second
)

var (
	bucketName    = []byte("records")
	reasonPattern = regexp.MustCompile(`^[a-z][a-z0-9_]{0,63}$`)
)

// Store is the durable dead-letter store. It is safe for concurrent use.
type Store struct {
	db   *bolt.DB
	path string
	cfg  Config
	log  *slog.Logger

	wmu     sync.Mutex // serializes Add (and eviction) and Close
	closed  atomic.Bool
	count   atomic.Int64
	bytes   int64 // guarded by wmu
	reasons map[string]bool
	// Eviction log aggregation, guarded by wmu.
	lastEvictLog  time.Time
	pendingEvicts int

	recordsTotal *prometheus.CounterVec
	evictedTotal prometheus.Counter
	records      prometheus.Gauge
}

// Open opens (creating if needed) the store in the bbolt file at path, waiting at most a second for another
// process's lock. Records beyond the configured bounds are removed right away (counted and logged). reg may be nil
// (no metrics registered), e.g. for read-only tools.
func Open(path string, cfg Config, logger *slog.Logger, reg prometheus.Registerer) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s := &Store{path: path, cfg: cfg.withDefaults(), log: logger.With("component", "deadletter"),
		reasons: make(map[string]bool),
		recordsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_deadletter_records_total",
			Help: "Dead letters stored, by reason.",
		}, []string{"reason"}),
		evictedTotal: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_deadletter_evicted_total",
			Help: "Dead letters removed, oldest first, to stay within max_records and max_bytes.",
		}),
		records: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "edgegate_deadletter_records",
			Help: "Dead letters held in the store.",
		}),
	}
	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, fmt.Errorf("deadletter: open %s: %w", path, err)
		}
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	switch {
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("deadletter: open %s: locked by another process (is edgegate already running?): %w",
			path, err)
	case err != nil:
		return nil, fmt.Errorf("deadletter: open %s (corrupt, or not a dead-letter store?): %w", path, err)
	}
	s.db = db
	if err := s.load(); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("deadletter: open %s: %w", path, err)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{s.recordsTotal, s.evictedTotal, s.records} {
			if err := reg.Register(c); err != nil {
				_ = db.Close()
				return nil, fmt.Errorf("deadletter: register metrics: %w", err)
			}
		}
	}
	return s, nil
}

// load creates the bucket, counts what is stored and trims it to the bounds.
func (s *Store) load() error {
	var evicted int
	err := s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketName)
		if err != nil {
			return err
		}
		var n, size int64
		if err := b.ForEach(func(_, v []byte) error {
			n++
			size += int64(len(v))
			return nil
		}); err != nil {
			return err
		}
		evicted, n, size, err = s.evict(b, n, size, 0)
		s.count.Store(n)
		s.bytes = size
		return err
	})
	if err != nil {
		return err
	}
	s.records.Set(float64(s.count.Load()))
	if evicted > 0 {
		s.evictedTotal.Add(float64(evicted))
		s.log.Warn("dead letters removed to fit the configured bounds", "evicted", evicted,
			"max_records", s.cfg.MaxRecords, "max_bytes", s.cfg.MaxBytes)
	}
	return nil
}

// evict removes the oldest records until one more of size bytes fits. It returns how many it removed and the new
// count and size.
func (s *Store) evict(b *bolt.Bucket, n, size, add int64) (int, int64, int64, error) {
	extra := int64(0)
	if add > 0 {
		extra = 1
	}
	evicted := 0
	c := b.Cursor()
	for k, v := c.First(); k != nil && (n+extra > int64(s.cfg.MaxRecords) || size+add > s.cfg.MaxBytes); k, v = c.First() {
		vlen := int64(len(v))
		if err := c.Delete(); err != nil {
			return evicted, n, size, err
		}
		n--
		size -= vlen
		evicted++
	}
	return evicted, n, size, nil
}

// Add stores the record, assigning its ID (and its Time when zero; an empty Reason becomes "unspecified"), and
// removes the oldest records when the store would exceed its bounds. It returns once the record is durable.
func (s *Store) Add(r Record) error {
	if r.Time.IsZero() {
		r.Time = time.Now().UTC()
	}
	if r.Reason == "" {
		r.Reason = ReasonUnspecified
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.closed.Load() {
		return ErrClosed
	}
	var evicted int
	var n, size int64
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketName)
		id, err := b.NextSequence()
		if err != nil {
			return err
		}
		r.ID = id
		val, err := json.Marshal(r)
		if err != nil {
			return err
		}
		if int64(len(val)) > s.cfg.MaxBytes {
			return fmt.Errorf("%w: %d bytes, max_bytes %d", ErrTooLarge, len(val), s.cfg.MaxBytes)
		}
		evicted, n, size, err = s.evict(b, s.count.Load(), s.bytes, int64(len(val)))
		if err != nil {
			return err
		}
		if err := b.Put(key(id), val); err != nil {
			return err
		}
		n++
		size += int64(len(val))
		return nil
	})
	if err != nil {
		return fmt.Errorf("deadletter: add: %w", err)
	}
	s.count.Store(n)
	s.bytes = size
	s.recordsTotal.WithLabelValues(s.label(r.Reason)).Inc()
	s.records.Set(float64(n))
	if evicted > 0 {
		s.evictedTotal.Add(float64(evicted))
		s.logEvicted(evicted, r.ID)
	}
	return nil
}

// label returns the metric label for a reason, bounding the label set. s.wmu is held.
func (s *Store) label(reason string) string {
	if s.reasons[reason] {
		return reason
	}
	if !reasonPattern.MatchString(reason) || len(s.reasons) >= maxReasonLabels {
		return ReasonOther
	}
	s.reasons[reason] = true
	return reason
}

// logEvicted logs evictions, at most one line per evictLogInterval (the count includes the ones not logged yet).
// s.wmu is held.
func (s *Store) logEvicted(n int, newest uint64) {
	s.pendingEvicts += n
	now := time.Now()
	if now.Sub(s.lastEvictLog) < evictLogInterval {
		return
	}
	s.log.Warn("oldest dead letters removed: store full", "evicted", s.pendingEvicts, "newest_id", newest,
		"records", s.count.Load(), "max_records", s.cfg.MaxRecords, "max_bytes", s.cfg.MaxBytes)
	s.pendingEvicts = 0
	s.lastEvictLog = now
}

// List returns up to limit records with an ID greater than after, oldest first. limit <= 0 means
// DefaultListLimit; it is capped at MaxListLimit. A stored record that cannot be decoded is returned with reason
// "corrupt_record" and its raw bytes as the payload.
func (s *Store) List(after uint64, limit int) ([]Record, error) {
	if limit <= 0 {
		limit = DefaultListLimit
	}
	limit = min(limit, MaxListLimit)
	if s.closed.Load() {
		return nil, ErrClosed
	}
	var out []Record
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketName).Cursor()
		if after == ^uint64(0) {
			return nil
		}
		for k, v := c.Seek(key(after + 1)); k != nil && len(out) < limit; k, v = c.Next() {
			out = append(out, decodeRecord(k, v))
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, berrors.ErrDatabaseNotOpen) {
			return nil, ErrClosed
		}
		return nil, fmt.Errorf("deadletter: list: %w", err)
	}
	return out, nil
}

// decodeRecord decodes a stored record; what cannot be decoded comes back as a corrupt_record with the raw bytes.
func decodeRecord(k, v []byte) Record {
	var id uint64
	if len(k) == 8 {
		id = binary.BigEndian.Uint64(k)
	}
	var r Record
	if err := json.Unmarshal(v, &r); err != nil {
		return Record{ID: id, Reason: ReasonCorrupt, Detail: fmt.Sprintf("stored record cannot be decoded: %v", err),
			Payload: append([]byte(nil), v...)}
	}
	r.ID = id // the key is the truth
	return r
}

// Count returns the number of records held.
func (s *Store) Count() int { return int(s.count.Load()) }

// Path returns the store's file.
func (s *Store) Path() string { return s.path }

// Close closes the file. Later calls return nil; Add and List return ErrClosed.
func (s *Store) Close() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.closed.Swap(true) {
		return nil
	}
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("deadletter: close %s: %w", s.path, err)
	}
	return nil
}

func key(id uint64) []byte {
	var k [8]byte
	binary.BigEndian.PutUint64(k[:], id)
	return k[:]
}
