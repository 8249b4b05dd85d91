package buffer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// Sentinel errors, checked with errors.Is.
var (
	// ErrFull means the log has no room for the event (max_bytes or min_free_bytes reached and nothing may be
	// dropped, the filesystem is out of space, or the append queue is full for Enqueue).
	ErrFull = errors.New("log is full")
	// ErrClosed means the log has stopped.
	ErrClosed = errors.New("log is closed")
	// ErrCorrupt means the log file is damaged; Recover moves it aside so that a new log can start.
	ErrCorrupt = errors.New("log file is damaged")
	// ErrLocked means another process (a running gateway) holds the log file.
	ErrLocked = errors.New("database is locked by another process (is edgegate running?)")

	errDamaged = errors.New("damaged")
)

// Entry is one event to store.
type Entry struct {
	// Data is the CloudEvent in JSON structured mode, stored as is (copied: the caller may reuse it once
	// Append or Enqueue returned).
	Data []byte
	// Type is the CloudEvent type, kept in the record header for filters and stats.
	Type string
	// Subject is the device id.
	Subject string
	// Time is the event time (TTL, export ranges); the zero time means the time of the append.
	Time time.Time
	// Priority ranks the event for drop-oldest: 0 (lowest, the default) to 9 (highest). Lower priorities are
	// dropped first.
	Priority uint8
}

// Record is a stored entry with its sequence number.
type Record struct {
	// Seq numbers records from 1 in append order; a number is never reused, even after the record is removed.
	Seq uint64
	Entry
}

const (
	defaultSegmentSize = 8192
	maxBatchEntries    = 4096
	maxBatchBytes      = 4 << 20
	maxQueueBytes      = 64 << 20
	arenaChunk         = 64 << 10
	maxArenaEntry      = arenaChunk / 4
	maxFreeChunks      = 16
	openTimeout        = time.Second
	tickEvery          = 100 * time.Millisecond
	ttlEvery           = time.Second
	compactCheckEvery  = 10 * time.Second
	compactMinFile     = 32 << 20
)

// Log is the durable, ordered event log. Appends are made durable by one writer goroutine (Run) that commits
// everything queued in one transaction (group commit). Readers read committed records from any position and
// keep their position in named cursors. All methods are safe for concurrent use.
type Log struct {
	cfg      Config
	path     string
	logger   *slog.Logger
	m        *metrics
	segSize  uint64
	tool     bool
	lockf    *os.File // holds the lock of lockLog while the log is open
	required []string
	opened   string // how the last open of the file found it: openNew, openClean or openRebuilt

	// Test hooks: beforeCommit fails a commit when it returns an error; now is the clock; statfs reports
	// the free space of the filesystem holding a path; beforeReopen fails the opening of the file again after
	// a failed commit when it returns an error; afterSwap runs inside compaction's swap of the files.
	beforeCommit   func() error
	beforeReopen   func() error
	afterSwap      func() // called by compaction between renaming the new file over the log and opening it
	now            func() time.Time
	statfs         func(path string) (int64, error)
	compactMinFile int64
	compactEvery   time.Duration
	tickEvery      time.Duration
	saveEvery      time.Duration // see the constant
	epoch          time.Time     // origin of pending.start

	dbMu sync.RWMutex // guards db: readers hold it shared; compaction and close hold it exclusively
	db   *bolt.DB     // nil once closed

	writeMu sync.Mutex // serialises write transactions, compaction and close

	state   atomic.Pointer[state] // the committed state, replaced after every commit
	full    atomic.Bool           // the last room check failed (reject fast path)
	damaged atomic.Bool           // a read or commit met damage: Close leaves the full check to the next open

	mu           sync.Mutex
	queue        []*batch
	queued       int
	queuedBytes  int64
	batchHint    int           // entries of the last sealed batch: the initial capacity of the next one
	chunks       [][]byte      // free arena chunks
	space        chan struct{} // closed and replaced when the queue shrinks and someone waits
	spaceWaiters int
	notify       chan struct{} // closed and replaced when a commit adds records or the log closes
	saved        chan struct{} // closed and replaced when a commit saves a cursor or the log closes
	cursors      map[string]*cursor
	closed       bool
	running      bool
	stopOnce     sync.Once
	stop         chan struct{}
	runDone      chan struct{}

	wake      chan struct{}
	saveAsked atomic.Bool  // a cursor moved since the last commit took the positions to save
	saveNow   atomic.Bool  // and its reader waits for it (AckNow): no saveEvery spacing
	busySince atomic.Int64 // when the write transaction or fsync in progress began (Unix ns), 0 when none is
	lastSaved atomic.Int64 // when a commit last saved moved cursors (Unix ns)

	// Owned by the writer.
	compactHeld  bool // compaction waits for room on the filesystem (roomToCompact)
	unsynced     bool
	lastSync     time.Time
	lastTTL      time.Time
	lastCompact  time.Time
	lastCommit   time.Duration // how long the last commit of appends took
	lastAppended time.Time     // when it ended
	limiter      dropLog
	fullProbe    int64 // size of the smallest event refused since the log became full
	// After a failed commit (see recoverCommit): the file could not be opened again (db is nil until the
	// next commit opens it), and the seqs of a failed commit the file took nonetheless, still to delete.
	reopen           bool
	undoFrom, undoTo uint64
	hideFrom, hideTo uint64 // what reloadState hides (state.hideFrom): a failed commit the file may have taken
	recovering       bool
}

// cursor is a named reader position: pos in memory, saved on disk (committed; fsync'd in fsync mode).
type cursor struct {
	pos, saved uint64
}

// batch is the unit of group commit: the entries of one transaction. Appends join the oldest queued batch
// while it has room, also while the writer already puts its first entries into the transaction; the writer
// seals it (no more appends join it) before it commits.
type batch struct {
	recs   []pending // appended under Log.mu until sealed; read by the writer
	bytes  int64
	sealed bool // under Log.mu: removed from the queue, recs is final
	taken  int  // under Log.mu: entries the writer has taken into the transaction
	// The encoded entries (pending.val) of up to maxArenaEntry bytes share arena chunks, recycled once the
	// commit is over; both under Log.mu.
	arena    []byte
	chunks   [][]byte
	waiters  int          // under Log.mu: entries whose appender waits for done
	returned atomic.Int32 // appenders that returned from Wait
	done     chan struct{}
	seqs     []uint64 // written by the writer: the seq given to recs[i], 0 when refused for want of room
	err      error    // set for every entry when the commit failed
}

// waiting reports whether some appenders of b, sealed, have not returned from Wait yet.
func (b *batch) waiting() bool { return b.returned.Load() < int32(b.waiters) }

// full reports whether the batch takes no more entries.
func (b *batch) full() bool { return len(b.recs) >= maxBatchEntries || b.bytes >= maxBatchBytes }

type pending struct {
	val    []byte
	prio   uint8
	waited bool          // an appender waits for it: its append duration is observed
	time   int64         // event time, unix nanoseconds
	start  time.Duration // when it was appended, since Log.epoch
}

// state is the committed view of the log, immutable once published.
type state struct {
	segs      []*segMeta
	events    int64
	bytes     int64
	lastSeq   uint64
	dropHint  [maxPriority + 1]uint64 // no record of that priority with seq <= hint is stored
	prioBytes [maxPriority + 1]int64  // bytes stored per priority
	// hideFrom..hideTo (0: none) are the records of a failed commit that the file took nonetheless, until the
	// commit deleting them succeeds: their appenders were told they are not stored, so no reader sees them.
	hideFrom, hideTo uint64
	hiddenN          int64 // how many records hideFrom..hideTo holds, counted in events (as are their bytes)
	hiddenBytes      int64
}

func (s *state) clone() *state {
	c := *s
	c.segs = slices.Clone(s.segs)
	return &c
}

// hidden reports whether seq belongs to a failed commit that readers must not see.
func (s *state) hidden(seq uint64) bool {
	return s.hideFrom != 0 && seq >= s.hideFrom && seq <= s.hideTo
}

// storedAfter reports whether a record with Seq > after may be stored: the newest segment's MaxSeq bounds the
// stored sequence numbers from above (removals inside a segment leave it as it was).
func (s *state) storedAfter(after uint64) bool {
	n := len(s.segs)
	return s.events > 0 && n > 0 && s.segs[n-1].MaxSeq > after
}

func (s *state) firstSeq() uint64 {
	if len(s.segs) == 0 {
		return 0
	}
	return s.segs[0].MinSeq
}

type openOptions struct {
	tool    bool
	segSize uint64
}

// Open opens or creates the log at cfg.Path for the gateway: zero fields of cfg take the defaults of
// DefaultConfig, persisted cursors not in cfg.Cursors are removed, and the metrics are registered with reg
// (nil: not registered). After a clean Close, Open reads the file's meta pages, bbolt's free list and the
// per-segment metadata, no events, so its time does not grow with the backlog. After a crash (the file was
// not closed by Close) it first walks every page of the file once, read-only, to catch damage and to
// rebuild bbolt's free list, which takes time in proportion to the file's size. It logs which ("log opened",
// clean=true or false). It starts nothing: Run commits appends.
func Open(cfg Config, logger *slog.Logger, reg prometheus.Registerer) (*Log, error) {
	return open(cfg, logger, reg, openOptions{})
}

// OpenTool opens an existing log for an offline tool (stats, export, import, purge). Every persisted cursor and
// every cursor in cfg.Cursors (the configured sinks', at position 0 when it saved none) holds events as the
// gateway's would, and no cursor is removed. It registers no metrics. It fails within about a second with
// ErrLocked while a running gateway has the log open (see lockLog). Run is needed only to Append; Purge, Read and
// Stats work without it.
func OpenTool(cfg Config, logger *slog.Logger) (*Log, error) {
	return open(cfg, logger, nil, openOptions{tool: true})
}

func open(cfg Config, logger *slog.Logger, reg prometheus.Registerer, o openOptions) (*Log, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("buffer: config: %w", err)
	}
	if cfg.Path == "" {
		return nil, errors.New("buffer: config: path is empty")
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if o.segSize == 0 {
		o.segSize = defaultSegmentSize
	}
	if o.tool {
		if _, err := os.Stat(cfg.Path); err != nil {
			return nil, fmt.Errorf("buffer: open %s: %w", cfg.Path, err)
		}
	}
	l := &Log{
		cfg:            cfg,
		path:           cfg.Path,
		logger:         logger.With("component", "buffer"),
		segSize:        o.segSize,
		tool:           o.tool,
		now:            time.Now,
		statfs:         diskFree,
		compactMinFile: compactMinFile,
		compactEvery:   compactCheckEvery,
		tickEvery:      tickEvery,
		saveEvery:      saveEvery,
		epoch:          time.Now(),
		space:          make(chan struct{}),
		notify:         make(chan struct{}),
		saved:          make(chan struct{}),
		cursors:        map[string]*cursor{},
		stop:           make(chan struct{}),
		runDone:        make(chan struct{}),
		wake:           make(chan struct{}, 1),
	}
	lockf, err := lockLog(cfg.Path)
	if err != nil {
		return nil, fmt.Errorf("buffer: open %s: %w", cfg.Path, err)
	}
	l.lockf = lockf
	if !o.tool {
		_ = os.Remove(cfg.Path + ".compact") // left by a compaction that did not finish; the log is intact
	}
	start := time.Now()
	db, kind, err := openDB(cfg.Path, cfg.Durability)
	if err != nil {
		_ = lockf.Close()
		return nil, err
	}
	l.db = db
	l.opened = kind
	if err := l.init(); err != nil {
		_ = db.Close()
		_ = lockf.Close()
		return nil, err
	}
	m, err := newMetrics(l, reg)
	if err != nil {
		_ = db.Close()
		_ = lockf.Close()
		return nil, fmt.Errorf("buffer: metrics: %w", err)
	}
	l.m = m
	st := l.state.Load()
	l.logger.Info("log opened", "path", cfg.Path, "events", st.events, "bytes", st.bytes,
		"first_seq", st.firstSeq(), "last_seq", st.lastSeq, "segments", len(st.segs),
		"clean", kind != openRebuilt, "duration", time.Since(start).Round(time.Millisecond))
	if kind == openRebuilt {
		l.logger.Warn("the log was not closed cleanly (a crash): its file was checked and bbolt's free list "+
			"rebuilt, which reads the whole file once", "file_bytes", fileSize(cfg.Path))
	}
	return l, nil
}

// openDB opens the bbolt file, turning lock timeouts and damage into ErrLocked and ErrCorrupt, and tells how
// it found the file (openKind). A file closed by Close opens at once: bbolt reads the free list written at
// that close. Any other existing file is read into the page cache (preread), gets precheck, then bbolt
// rebuilds its free list by walking the file.
func openDB(path, durability string) (db *bolt.DB, kind string, err error) {
	kind, err = openKind(path)
	if err != nil {
		return nil, "", err
	}
	if kind == openRebuilt {
		preread(path)
		if err := precheck(path); err != nil {
			return nil, "", err
		}
	}
	defer func() {
		// bbolt panics on some kinds of damage (while rebuilding the free list); report it as damage.
		if r := recover(); r != nil {
			db, kind, err = nil, "", corruptError(path, fmt.Errorf("%v", r))
		}
	}()
	db, err = bolt.Open(path, 0o600, &bolt.Options{
		Timeout:        openTimeout,
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
	})
	switch {
	case err == nil:
	case errors.Is(err, berrors.ErrTimeout):
		return nil, "", fmt.Errorf("buffer: open %s: %w", path, ErrLocked)
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrChecksum),
		errors.Is(err, berrors.ErrVersionMismatch), errors.Is(err, berrors.ErrInvalidMapping),
		strings.Contains(err.Error(), "invalid"), strings.Contains(err.Error(), "file size too small"):
		return nil, "", corruptError(path, err)
	default:
		return nil, "", fmt.Errorf("buffer: open %s: %w", path, err)
	}
	if kind == openNew {
		// The new file's name must outlive a power loss as its first commits do.
		if err := syncDir(filepath.Dir(path)); err != nil {
			_ = db.Close()
			return nil, "", fmt.Errorf("buffer: open %s: %w", path, err)
		}
	}
	db.NoSync = durability == DurabilityInterval
	return db, kind, nil
}

// preread reads the file from start to end, into the page cache, before the walks of precheck and of bbolt's
// free list rebuild touch every page of it in tree order. From a cold disk those walks fault in one page at a
// time, in no useful order: for a million events, a 280 MiB file, they took 2.8 s after a reboot, against
// 0.35 s after this sequential read (BenchmarkOpenColdCache). When the file is cached already the read costs
// a copy of it (about 40 ms there). Errors are left to the walks, which report them.
func preread(path string) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		if _, err := f.Read(buf); err != nil {
			return
		}
	}
}

// openReadOnly opens the log file at path read-only, for a check: ErrLocked while a process holds it, ErrCorrupt
// (naming the recovery) when bbolt refuses it.
func openReadOnly(path string) (*bolt.DB, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: openTimeout})
	switch {
	case err == nil:
		return db, nil
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("buffer: open %s: %w", path, ErrLocked)
	case errors.Is(err, os.ErrPermission):
		return nil, fmt.Errorf("buffer: open %s: %w", path, err)
	default:
		return nil, corruptError(path, err)
	}
}

// precheck walks every page and element of an existing file, read-only, before the real open of a file that
// was not closed cleanly. Opening it for writing rebuilds bbolt's free list by walking the file in a goroutine
// of its own, where a damaged page would crash the process; here the same damage is caught and reported as
// ErrCorrupt. It reads page and element headers, not the events, and costs about as much as that rebuild.
func precheck(path string) error {
	if fi, statErr := os.Stat(path); statErr != nil || fi.Size() == 0 {
		return nil // created (or reported) by the real open
	}
	var walk func(b *bolt.Bucket) error
	walk = func(b *bolt.Bucket) error {
		c := b.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if v == nil {
				if err := walk(b.Bucket(k)); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return readChecked(path, func(tx *bolt.Tx) error {
		return tx.ForEach(func(_ []byte, b *bolt.Bucket) error { return walk(b) })
	})
}

// readChecked opens the file at path read-only and runs fn in a read transaction; a damaged page, on which bbolt
// panics or the read faults past the file, is ErrCorrupt.
func readChecked(path string, fn func(tx *bolt.Tx) error) (err error) {
	db, err := openReadOnly(path)
	if err != nil {
		return err
	}
	defer db.Close()
	damage, err := guarded(func() error { return db.View(fn) })
	if damage != nil {
		return corruptError(path, fmt.Errorf("%v", damage))
	}
	return err
}

// guarded runs fn, which reads the log file, and returns what it panicked with (nil when it returned): bbolt panics
// on a damaged page, and a read past the end of the mapped file, which would kill the process with SIGBUS, is made
// a panic too.
func guarded(fn func() error) (damage any, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() { damage = recover() }()
	return nil, fn()
}

func corruptError(path string, cause error) error {
	return fmt.Errorf("buffer: open %s: %w (%v); move it aside and start a new log with "+
		"\"edgegate backlog recover\" (same --config; data_dir %s; the file is kept as %s.corrupt-<time>)",
		path, ErrCorrupt, cause, filepath.Dir(path), filepath.Base(path))
}

// init creates the buckets of a new file, checks the format, loads the state and the cursors.
func (l *Log) init() error {
	var removed []string
	err := l.db.Update(func(tx *bolt.Tx) (err error) {
		defer func() {
			// bbolt panics on some damaged pages; anything wrong in what is read here is damage.
			if r := recover(); r != nil {
				err = fmt.Errorf("%v", r)
			}
			if err != nil {
				err = fmt.Errorf("%w: %w", errDamaged, err)
			}
		}()
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			if tx.Bucket(bucketEvents) != nil || tx.Bucket(bucketSegments) != nil {
				return errors.New("meta bucket missing")
			}
			for _, name := range [][]byte{bucketMeta, bucketSegments, bucketEvents, bucketCursors} {
				if _, err := tx.CreateBucketIfNotExists(name); err != nil {
					return err
				}
			}
			meta = tx.Bucket(bucketMeta)
			if err := meta.Put(keyFormat, []byte{formatVersion}); err != nil {
				return err
			}
			if err := meta.Put(keyLastSeq, encodeUint64(0)); err != nil {
				return err
			}
			if err := meta.Put(keySegmentSize, encodeUint64(l.segSize)); err != nil {
				return err
			}
		}
		if v := meta.Get(keyFormat); len(v) != 1 || v[0] != formatVersion {
			return fmt.Errorf("unknown format %v", v)
		}
		segSize, err := decodeSeqKey(meta.Get(keySegmentSize))
		if err != nil || segSize == 0 || segSize > 1<<32 {
			return fmt.Errorf("segment_size %d: %w", segSize, errBadRecord)
		}
		l.segSize = segSize
		st, err := l.loadState(tx)
		if err != nil {
			return err
		}
		l.state.Store(st)
		curs := tx.Bucket(bucketCursors)
		want := map[string]bool{}
		for _, name := range l.cfg.Cursors {
			want[name] = true
		}
		var stale [][]byte
		err = curs.ForEach(func(k, v []byte) error {
			pos, err := decodeSeqKey(v)
			if err != nil {
				return fmt.Errorf("cursor %q: %w", k, err)
			}
			if !l.tool && !want[string(k)] {
				stale = append(stale, slices.Clone(k))
				return nil
			}
			pos = min(pos, st.lastSeq)
			l.cursors[string(k)] = &cursor{pos: pos, saved: pos}
			return nil
		})
		if err != nil {
			return err
		}
		for _, k := range stale {
			if err := curs.Delete(k); err != nil {
				return err
			}
			removed = append(removed, string(k))
		}
		return nil
	})
	switch {
	case errors.Is(err, errDamaged):
		return corruptError(l.path, err)
	case err != nil:
		return fmt.Errorf("buffer: open %s: %w", l.path, err)
	}
	for _, name := range removed {
		l.logger.Info("cursor removed: no longer configured", "cursor", name)
	}
	// A configured cursor that has not saved a position yet (its sink never acknowledged anything) holds every
	// event.
	for _, name := range l.cfg.Cursors {
		if l.cursors[name] == nil {
			l.cursors[name] = &cursor{}
		}
	}
	if l.tool {
		for name := range l.cursors {
			l.required = append(l.required, name)
		}
		slices.Sort(l.required)
	} else {
		l.required = slices.Clone(l.cfg.Cursors)
	}
	return nil
}

// loadState reads the last seq and the segment metadata (no events).
func (l *Log) loadState(tx *bolt.Tx) (*state, error) {
	meta, segs, events := tx.Bucket(bucketMeta), tx.Bucket(bucketSegments), tx.Bucket(bucketEvents)
	if meta == nil || segs == nil || events == nil || tx.Bucket(bucketCursors) == nil {
		return nil, errors.New("a bucket is missing")
	}
	last, err := decodeSeqKey(meta.Get(keyLastSeq))
	if err != nil {
		return nil, fmt.Errorf("last_seq: %w", err)
	}
	st := &state{lastSeq: last}
	err = segs.ForEach(func(k, v []byte) error {
		m, err := decodeSegMeta(k, v, l.segSize)
		if err != nil {
			return err
		}
		if n := len(st.segs); n > 0 && st.segs[n-1].MaxSeq >= m.MinSeq {
			return fmt.Errorf("segment %d overlaps segment %d", m.Base, st.segs[n-1].Base)
		}
		if m.MaxSeq > last {
			return fmt.Errorf("segment %d holds seq %d past last_seq %d", m.Base, m.MaxSeq, last)
		}
		if events.Bucket(k) == nil {
			return fmt.Errorf("segment %d has no events bucket", m.Base)
		}
		st.segs = append(st.segs, &m)
		st.events += m.Count
		st.bytes += m.Bytes
		for p, n := range m.PrioBytes {
			st.prioBytes[p] += n
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return st, nil
}

// reloadState replaces the in-memory state by what the file holds (after a failed commit).
func (l *Log) reloadState() {
	err := l.db.View(func(tx *bolt.Tx) error {
		st, err := l.loadState(tx)
		if err == nil && l.hideFrom != 0 && st.lastSeq >= l.hideFrom {
			st.hideFrom, st.hideTo = l.hideFrom, l.hideTo
			err = l.scan(tx, l.hideFrom-1, func(seq uint64, v []byte) (bool, error) {
				if seq > st.hideTo {
					return false, nil
				}
				st.hiddenN++
				st.hiddenBytes += int64(len(v) + keySize)
				return true, nil
			})
		}
		if err == nil {
			l.state.Store(st)
		}
		return err
	})
	if err != nil {
		l.logger.Error("reload state after a failed commit", "error", err)
	}
}

// Append stores e and returns its sequence number once the batch holding it is durable: fsync'd in fsync
// mode, written to the file in interval mode (see Config.Durability). When the queue is full it waits
// (back-pressure). It returns ErrFull (wrapped) when the log has no room under the reject policy or the
// filesystem is full, ErrClosed after the log stopped, and the write or fsync error of a failed commit (the
// event is then not stored). When ctx ends first the event may still be stored.
func (l *Log) Append(ctx context.Context, e Entry) (uint64, error) {
	p, err := l.appendAsync(ctx, &e, nil)
	if err != nil {
		return 0, err
	}
	return p.Wait(ctx)
}

// Enqueue queues e for the next commit without waiting (QoS 0): it returns ErrFull when the queue or the log
// (reject policy) is full and ErrClosed after the log stopped. A queued event is lost if that commit fails or
// finds no room (counted in edgegate_buffer_rejected_total or edgegate_buffer_commit_errors_total).
func (l *Log) Enqueue(e Entry) error {
	return l.EnqueueFunc(e, nil)
}

// EnqueueFunc is Enqueue calling queued (when not nil) once the event is queued, before the writer is woken for
// it; queued is not called for an event the log refuses.
func (l *Log) EnqueueFunc(e Entry, queued func()) error {
	if _, _, err := l.enqueue(context.Background(), &e, false, queued); err != nil {
		return fmt.Errorf("buffer: enqueue: %w", err)
	}
	return nil
}

// enqueue queues e for the next commit and calls queued (when not nil) before it wakes the writer.
func (l *Log) enqueue(ctx context.Context, e *Entry, wait bool, queued func()) (*batch, int, error) {
	if e.Priority > maxPriority {
		return nil, 0, fmt.Errorf("priority %d is above %d", e.Priority, maxPriority)
	}
	if l.full.Load() && l.cfg.WhenFull == WhenFullReject {
		l.m.rejected.Inc()
		return nil, 0, ErrFull
	}
	t := e.Time
	if t.IsZero() {
		t = l.now()
	}
	p := pending{prio: e.Priority, waited: wait, time: unixNano(t)}
	if wait {
		p.start = time.Since(l.epoch)
	}
	// An entry of up to maxArenaEntry bytes is encoded into its batch's arena below, under mu (a copy of a
	// few hundred bytes); a larger one gets a buffer of its own, encoded here.
	n := encodedSize(e)
	size := int64(n + keySize)
	if n > maxArenaEntry {
		p.val = encodeRecord(make([]byte, 0, n), e, p.time)
	}

	l.mu.Lock()
	for {
		if l.closed {
			l.mu.Unlock()
			return nil, 0, ErrClosed
		}
		if l.queued < l.cfg.QueueSize && (l.queued == 0 || l.queuedBytes+size <= maxQueueBytes) {
			break
		}
		if !wait {
			l.mu.Unlock()
			l.m.rejected.Inc()
			return nil, 0, fmt.Errorf("%w: append queue full", ErrFull)
		}
		sp := l.space
		l.spaceWaiters++
		l.mu.Unlock()
		select {
		case <-sp:
		case <-ctx.Done():
			l.mu.Lock()
			l.spaceWaiters--
			l.mu.Unlock()
			return nil, 0, ctx.Err()
		}
		l.mu.Lock()
		l.spaceWaiters--
	}
	var b *batch
	if n := len(l.queue); n > 0 && !l.queue[n-1].full() {
		b = l.queue[n-1]
	} else {
		b = &batch{recs: make([]pending, 0, max(l.batchHint, 1)), done: make(chan struct{})}
		l.queue = append(l.queue, b)
	}
	if p.val == nil {
		p.val = encodeRecord(l.reserve(b, n), e, p.time)
	}
	idx := len(b.recs)
	b.recs = append(b.recs, p)
	if wait {
		b.waiters++
	}
	b.bytes += size
	l.queued++
	l.queuedBytes += size
	// The writer is woken by the first entry of a batch and, while it waits for more in an open
	// transaction (see settle), once per pokeEvery entries it has not taken yet.
	poke := idx == 0 || len(b.recs)-b.taken == pokeEvery
	l.mu.Unlock()
	if queued != nil {
		queued()
	}
	if poke {
		l.poke()
	}
	return b, idx, nil
}

// reserve returns room for n bytes (at most maxArenaEntry) in b's arena, as an empty slice of capacity n.
// The caller holds mu.
func (l *Log) reserve(b *batch, n int) []byte {
	if cap(b.arena)-len(b.arena) < n {
		var c []byte
		if k := len(l.chunks); k > 0 {
			c, l.chunks = l.chunks[k-1], l.chunks[:k-1]
		} else {
			c = make([]byte, 0, arenaChunk)
		}
		b.chunks = append(b.chunks, c)
		b.arena = c
	}
	off := len(b.arena)
	b.arena = b.arena[:off+n]
	return b.arena[off : off : off+n]
}

// recycle keeps the arena chunks of b, committed, for the next batches. The caller holds mu.
func (l *Log) recycle(b *batch) {
	for _, c := range b.chunks {
		if len(l.chunks) < maxFreeChunks {
			l.chunks = append(l.chunks, c[:0])
		}
	}
	b.chunks, b.arena = nil, nil
}

// poke wakes the writer.
func (l *Log) poke() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// head returns the oldest queued batch, nil when none is queued.
func (l *Log) head() *batch {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.queue) == 0 {
		return nil
	}
	return l.queue[0]
}

// seal closes b, the oldest queued batch, to appends and removes it from the queue; a sealed batch stays
// as it is. The caller holds mu.
func (l *Log) seal(b *batch) {
	if b.sealed {
		return
	}
	b.sealed = true
	l.queue[0] = nil
	l.queue = l.queue[1:]
	l.queued -= len(b.recs)
	l.queuedBytes -= b.bytes
	l.batchHint = min(len(b.recs), maxBatchEntries)
	if l.spaceWaiters > 0 {
		close(l.space)
		l.space = make(chan struct{})
	}
}

// Read returns up to max committed records with Seq > after, in order. Records removed by acknowledgement or
// retention are skipped, so the returned seqs may have gaps; an empty result means nothing newer is stored.
func (l *Log) Read(after uint64, max int) ([]Record, error) { return l.read(after, max, true) }

// ReadHeaders is Read without the events' data (Data is nil): a pass over a backlog's types, subjects and
// priorities that copies no payload.
func (l *Log) ReadHeaders(after uint64, max int) ([]Record, error) { return l.read(after, max, false) }

func (l *Log) read(after uint64, max int, data bool) (out []Record, err error) {
	if max <= 0 {
		return nil, fmt.Errorf("buffer: read: max must be > 0, got %d", max)
	}
	err = l.readView(func(tx *bolt.Tx, st *state) error {
		return l.scan(tx, after, func(seq uint64, v []byte) (bool, error) {
			if seq > st.lastSeq {
				return false, nil
			}
			if st.hidden(seq) {
				return true, nil
			}
			r, err := toRecord(seq, v, data)
			if err != nil {
				return false, fmt.Errorf("%w: %s: seq %d: %w", ErrCorrupt, l.path, seq, err)
			}
			out = append(out, r)
			return len(out) < max, nil
		})
	})
	if err != nil {
		return out, fmt.Errorf("buffer: read: %w", err)
	}
	return out, nil
}

// ReadPriority is Read for the records whose priority p is lo <= p < hi (a reader that carries only some
// priorities): it returns up to most of them, in order, and scanned, the last seq it looked at: every committed
// record with after < seq <= scanned that it did not return has another priority. Segments that hold no record
// of those priorities are passed over without reading them (their counts per priority are kept in memory).
func (l *Log) ReadPriority(after uint64, most int, lo, hi uint8) (out []Record, scanned uint64, err error) {
	if most <= 0 {
		return nil, after, fmt.Errorf("buffer: read: max must be > 0, got %d", most)
	}
	scanned = after
	err = l.readView(func(tx *bolt.Tx, st *state) error {
		events := tx.Bucket(bucketEvents)
		if events == nil {
			return fmt.Errorf("%w: events bucket missing", ErrCorrupt)
		}
		for _, m := range st.segs {
			if m.MaxSeq <= scanned {
				continue
			}
			end := min(m.MaxSeq, st.lastSeq)
			var n int64
			for p := int(lo); p < int(hi) && p <= maxPriority; p++ {
				n += m.Prio[p]
			}
			if n == 0 {
				scanned = max(scanned, end)
				continue
			}
			seg := events.Bucket(seqKey(m.Base))
			if seg == nil { // removed by a commit after the state was loaded
				scanned = max(scanned, end)
				continue
			}
			c := seg.Cursor()
			for k, v := c.Seek(seqKey(scanned + 1)); k != nil; k, v = c.Next() {
				seq, err := decodeSeqKey(k)
				if err != nil {
					return fmt.Errorf("%w: %w", ErrCorrupt, err)
				}
				if seq > end {
					break
				}
				prio, _, ok := recordPriorityTime(v)
				if !ok {
					return fmt.Errorf("%w: %s: seq %d: %w", ErrCorrupt, l.path, seq, errBadRecord)
				}
				if prio >= lo && prio < hi && !st.hidden(seq) {
					r, err := toRecord(seq, v, true)
					if err != nil {
						return fmt.Errorf("%w: %s: seq %d: %w", ErrCorrupt, l.path, seq, err)
					}
					out = append(out, r)
				}
				scanned = seq
				if len(out) == most {
					return nil
				}
			}
			scanned = max(scanned, end)
		}
		return nil
	})
	if err != nil {
		return out, after, fmt.Errorf("buffer: read: %w", err)
	}
	return out, scanned, nil
}

// readView runs fn in a read transaction with the state published last (records up to its lastSeq are
// committed). A damaged page (bbolt panics, or the read faults past the file) becomes ErrCorrupt.
func (l *Log) readView(fn func(tx *bolt.Tx, st *state) error) (err error) {
	l.dbMu.RLock()
	defer l.dbMu.RUnlock()
	if l.db == nil {
		return ErrClosed
	}
	st := l.state.Load() // published after the commit: records up to its lastSeq are committed
	damage, err := guarded(func() error { return l.db.View(func(tx *bolt.Tx) error { return fn(tx, st) }) })
	if damage != nil {
		err = fmt.Errorf("%w: %s: %v", ErrCorrupt, l.path, damage)
	}
	if errors.Is(err, ErrCorrupt) {
		l.damaged.Store(true)
	}
	return err
}

// scan calls fn for each stored record with seq > after, in order, until fn returns false.
func (l *Log) scan(tx *bolt.Tx, after uint64, fn func(seq uint64, v []byte) (bool, error)) error {
	events := tx.Bucket(bucketEvents)
	if events == nil {
		return fmt.Errorf("%w: events bucket missing", ErrCorrupt)
	}
	start := after + 1
	if start == 0 {
		return nil
	}
	sc := events.Cursor()
	for k, v := sc.Seek(seqKey(segBase(start, l.segSize))); k != nil; k, v = sc.Next() {
		if v != nil {
			return fmt.Errorf("%w: stray key in the events bucket", ErrCorrupt)
		}
		seg := events.Bucket(k)
		c := seg.Cursor()
		for rk, rv := c.Seek(seqKey(start)); rk != nil; rk, rv = c.Next() {
			seq, err := decodeSeqKey(rk)
			if err != nil {
				return fmt.Errorf("%w: %w", ErrCorrupt, err)
			}
			more, err := fn(seq, rv)
			if err != nil || !more {
				return err
			}
		}
	}
	return nil
}

// Wait blocks until a committed record with Seq > after is stored, ctx ends (its error, wrapped) or the log
// closes (ErrClosed): records committed after `after` and removed since (delivered, or dropped by retention) do
// not count. It may return early, when removals inside the newest segment took the newest records. It costs one
// channel receive: every commit wakes all waiters.
func (l *Log) Wait(ctx context.Context, after uint64) error {
	for {
		l.mu.Lock()
		ch, closed := l.notify, l.closed
		st := l.state.Load()
		l.mu.Unlock()
		if st.storedAfter(after) {
			return nil
		}
		if closed {
			return fmt.Errorf("buffer: wait: %w", ErrClosed)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("buffer: wait: %w", ctx.Err())
		}
	}
}

// LastSeq returns the highest sequence number committed (0 before the first append). It does not go down
// when records are removed.
func (l *Log) LastSeq() uint64 { return l.state.Load().lastSeq }

// FirstSeq returns the sequence number of the oldest stored record, 0 when the log is empty.
func (l *Log) FirstSeq() uint64 { return l.state.Load().firstSeq() }

// Cursor returns the position of the named cursor: every record with Seq <= it is acknowledged. It is the
// newest acknowledged position, persisted or not yet (see Persisted); 0 for a new cursor.
func (l *Log) Cursor(name string) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.cursors[name]; c != nil {
		return c.pos
	}
	return 0
}

// Ack moves the named cursor to upTo; it never moves backwards (an older upTo is ignored). It does not wait:
// the writer persists the position promptly, grouped with every Ack made meanwhile. While appends flow it
// rides along with the next commit of appends (when none comes within about a commit's time, or when no
// append was committed lately, the moved cursors are committed alone). Persisted tells how far that got and
// WaitPersisted waits for it: after a crash a cursor is where it was last persisted, and the records after
// it are read again (at-least-once). A record is deleted once every
// cursor in Config.Cursors has passed it; any other name is a reader's cursor that holds nothing (it is
// persisted too, and removed by the next Open that does not list it).
func (l *Log) Ack(name string, upTo uint64) error { return l.ack(name, upTo, false) }

// AckNow is Ack for a reader that sends nothing more until the position is persisted (a sink with a full
// window): the cursor is committed as soon as the writer can, without the spacing Ack keeps between commits
// that save only cursors (saveEvery). While appends flow, the next commit of appends still carries it.
func (l *Log) AckNow(name string, upTo uint64) error { return l.ack(name, upTo, true) }

func (l *Log) ack(name string, upTo uint64, now bool) error {
	switch {
	case name == "":
		return errors.New("buffer: ack: empty cursor name")
	case len(name) > MaxCursorName: // it could never be saved, and every commit would try
		return fmt.Errorf("buffer: ack: cursor name of %d bytes, at most %d", len(name), MaxCursorName)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("buffer: ack %s: %w", name, ErrClosed)
	}
	if last := l.state.Load().lastSeq; upTo > last {
		return fmt.Errorf("buffer: ack %s: seq %d is past the last seq %d", name, upTo, last)
	}
	c := l.cursors[name]
	if c == nil {
		c = &cursor{}
		l.cursors[name] = c
	}
	moved := upTo > c.pos
	c.pos = max(c.pos, upTo)
	if c.pos > c.saved && (moved || now) {
		if now {
			l.saveNow.Store(true)
		}
		l.saveAsked.Store(true)
		select {
		case l.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// Persisted returns the position of the named cursor as last persisted: committed to the file, and fsync'd in
// durability "fsync" (in "interval" a process crash keeps it, a power loss may not). It is what the cursor is
// after a crash; it never exceeds Cursor. 0 for an unknown cursor.
func (l *Log) Persisted(name string) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.cursors[name]; c != nil {
		return c.saved
	}
	return 0
}

// WaitPersisted blocks until the persisted position of the named cursor is past after, ctx ends (its error,
// wrapped) or the log closes (ErrClosed). Every commit that saves a cursor wakes all waiters.
func (l *Log) WaitPersisted(ctx context.Context, name string, after uint64) error {
	for {
		l.mu.Lock()
		ch, closed := l.saved, l.closed
		var saved uint64
		if c := l.cursors[name]; c != nil {
			saved = c.saved
		}
		l.mu.Unlock()
		if saved > after {
			return nil
		}
		if closed {
			return fmt.Errorf("buffer: wait for cursor %s: %w", name, ErrClosed)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("buffer: wait for cursor %s: %w", name, ctx.Err())
		}
	}
}

// Close stops the log: when Run is running it stops it and waits; otherwise it commits what is queued,
// persists the cursors and closes the file. Close is for tools that never call Run; calling it again, or
// after Run returned, does nothing.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.running {
		l.mu.Unlock()
		l.stopOnce.Do(func() { close(l.stop) })
		<-l.runDone
		return nil
	}
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.mu.Unlock()
	return l.shutdown()
}

// shutdown refuses new appends, commits what is queued, persists the cursors and closes the file.
func (l *Log) shutdown() error {
	l.mu.Lock()
	l.closed = true
	queue := l.queue
	for _, b := range queue {
		b.sealed = true
	}
	l.queue, l.queued, l.queuedBytes = nil, 0, 0
	close(l.space)
	l.space = make(chan struct{})
	close(l.notify)
	l.notify = make(chan struct{})
	l.mu.Unlock()
	defer l.wakeSaved() // once the last positions are saved
	for _, b := range queue {
		l.commit(b, &settle{})
	}
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	defer l.lockf.Close() // last: the file is closed, another process may open it
	var errs []error
	if l.cursorsDirty() {
		if _, err := l.update(nil); err != nil {
			errs = append(errs, fmt.Errorf("buffer: close: save cursors: %w", err))
		}
	}
	l.dbMu.Lock()
	defer l.dbMu.Unlock()
	l.reopen = false
	if l.db == nil {
		return errors.Join(errs...)
	}
	clean := false
	if l.damaged.Load() {
		l.logger.Warn("close: the log file is damaged; the next start checks the whole file")
	} else if err := markClean(l.db); err != nil {
		l.logger.Warn("close: the free list was not written; the next start checks the whole file", "error", err)
	} else {
		clean, l.unsynced = true, false // the mark's commit fsync'd the file
	}
	if l.unsynced {
		if err := l.db.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("buffer: close: fsync: %w", err))
		}
	}
	if err := l.db.Close(); err != nil {
		errs = append(errs, fmt.Errorf("buffer: close: %w", err))
	}
	l.db = nil
	l.logger.Info("log closed", "last_seq", l.state.Load().lastSeq, "clean", clean)
	return errors.Join(errs...)
}

// markClean commits an empty transaction that writes bbolt's free list into the file, fsync'd before and
// after its meta page, so that the file's newest meta page names a synced free list: the next open reads that
// list instead of walking the file to rebuild it (see openKind). Every other commit is made without the free
// list and clears the mark, so a file left by a crash is always rebuilt. The caller ensures that no other
// transaction runs on db and that db is closed right after.
func markClean(db *bolt.DB) error {
	db.NoFreelistSync, db.NoSync = false, false
	return db.Update(func(*bolt.Tx) error { return nil })
}

// wakeSaved wakes the WaitPersisted callers.
func (l *Log) wakeSaved() {
	l.mu.Lock()
	close(l.saved)
	l.saved = make(chan struct{})
	l.mu.Unlock()
}

// cursorsDirty reports whether a cursor moved since it was saved.
func (l *Log) cursorsDirty() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.cursors {
		if c.pos != c.saved {
			return true
		}
	}
	return false
}

// isNoSpace reports whether err says the filesystem is full.
func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || strings.Contains(err.Error(), "no space left on device")
}
