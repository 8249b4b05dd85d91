package buffer

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"time"

	bolt "go.etcd.io/bbolt"
)

const (
	compactSlack   = 4 << 20
	compactTxBytes = 16 << 20
)

// maybeCompact compacts the file when it is mostly free space: larger than compactMinFile and than twice
// the used size plus 4 MiB. The caller holds writeMu. Only a failure to reopen the file is returned.
func (l *Log) maybeCompact() error {
	size := fileSize(l.path)
	if size < l.compactMinFile {
		return nil
	}
	used, err := l.usedBytes()
	if err != nil || size <= 2*(used+compactSlack) || !l.roomToCompact(used) {
		return nil
	}
	return l.compact(size, used)
}

// roomToCompact reports whether the filesystem has room for the copy compaction writes (the used part of the
// file, plus slack) above the free-space guard, MinFreeBytes: a copy that filled the disk would fail anyway,
// and until then everything else writing there would find it full. It logs when compaction starts and stops
// waiting for room. Unknown free space counts as room.
func (l *Log) roomToCompact(used int64) bool {
	avail, err := l.statfs(l.path)
	if err != nil {
		return true
	}
	need := used + compactSlack + max(l.cfg.MinFreeBytes, 0)
	room := avail >= need
	switch {
	case room && l.compactHeld:
		l.logger.Info("room for compaction again", "free_bytes", avail)
		l.m.compactHeld.Set(0)
	case !room && !l.compactHeld:
		l.logger.Warn("the log file is mostly free space, but the filesystem has no room to compact it",
			"free_bytes", avail, "needed_bytes", need)
		l.m.compactHeld.Set(1)
	}
	l.compactHeld = !room
	return room
}

// usedBytes is the part of the file bbolt uses: the high-water mark minus the free pages.
func (l *Log) usedBytes() (int64, error) {
	var hwm int64
	if err := l.db.View(func(tx *bolt.Tx) error { hwm = tx.Size(); return nil }); err != nil {
		return 0, err
	}
	s := l.db.Stats()
	return hwm - int64(s.FreePageN+s.PendingPageN)*int64(l.db.Info().PageSize), nil
}

// compact copies the live data into a new file next to the log, fsyncs it, renames it over the log and
// reopens it. Appends wait meanwhile (the writer holds writeMu); readers wait for the swap only.
func (l *Log) compact(oldSize, used int64) error {
	if l.damaged.Load() {
		return nil // copying a damaged file would fail, or crash on it: recovery is the way (backlog recover)
	}
	start := time.Now()
	tmp := l.path + ".compact"
	fail := func(err error) error {
		_ = os.Remove(tmp)
		l.m.compactErrors.Inc()
		l.logger.Error("compaction failed; the log keeps its file", "error", err)
		return nil
	}
	_ = os.Remove(tmp)
	dst, err := bolt.Open(tmp, 0o600, &bolt.Options{Timeout: openTimeout, NoSync: true,
		NoFreelistSync: true, FreelistType: bolt.FreelistMapType})
	if err != nil {
		return fail(err)
	}
	if err := copyInto(dst, l.db, l.path); err != nil {
		if errors.Is(err, ErrCorrupt) {
			l.damaged.Store(true)
		}
		_ = dst.Close()
		return fail(err)
	}
	// The new file gets a synced free list, so that the reopen below reads it instead of walking the file.
	dst.NoFreelistSync = false
	if err := dst.Update(func(*bolt.Tx) error { return nil }); err != nil {
		_ = dst.Close()
		return fail(err)
	}
	err = dst.Sync()
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fail(err)
	}

	l.dbMu.Lock()
	defer l.dbMu.Unlock()
	if err := os.Rename(tmp, l.path); err != nil {
		return fail(err)
	}
	if err := syncDir(filepath.Dir(l.path)); err != nil {
		l.logger.Warn("fsync of the data directory after compaction", "error", err)
	}
	if l.afterSwap != nil {
		l.afterSwap()
	}
	ndb, kind, err := openDB(l.path, l.cfg.Durability)
	if err != nil {
		// The old file is no longer at the path: nothing more may be committed to it.
		_ = l.db.Close()
		l.db = nil
		l.m.compactErrors.Inc()
		return fmt.Errorf("buffer: compact: reopen: %w", err)
	}
	old := l.db
	l.db = ndb
	l.unsynced = false
	if err := old.Close(); err != nil {
		l.logger.Warn("close the log file replaced by compaction", "error", err)
	}
	l.m.compactions.Inc()
	l.logger.Info("log compacted", "file_bytes_before", oldSize, "file_bytes_after", fileSize(l.path),
		"used_bytes", used, "duration", time.Since(start).Round(time.Millisecond), "reopen", kind)
	return nil
}

// copyInto copies the log file src into dst (bolt.Compact). A damaged page of src, on which bbolt panics or the
// read faults past the file, is ErrCorrupt.
func copyInto(dst, src *bolt.DB, path string) error {
	damage, err := guarded(func() error { return bolt.Compact(dst, src, compactTxBytes) })
	if damage != nil {
		return fmt.Errorf("%w: %s: %v", ErrCorrupt, path, damage)
	}
	return err
}

// syncDir fsyncs a directory so that a new name or a rename in it is durable. Windows cannot fsync a directory
// (NTFS journals its names): there it does nothing.
func syncDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Check reads the whole log file at path, read-only, and reports damage as ErrCorrupt: every page and element
// (as the open after a crash walks them) and every record's header; nil means the file is sound. It fails with
// ErrLocked while a process holds the file (a running gateway). It takes time in proportion to the file's size.
func Check(path string) error {
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("buffer: check %s: %w", path, err)
	}
	if err := precheck(path); err != nil {
		return err
	}
	return readChecked(path, func(tx *bolt.Tx) error {
		events := tx.Bucket(bucketEvents)
		if events == nil || tx.Bucket(bucketMeta) == nil || tx.Bucket(bucketSegments) == nil || tx.Bucket(bucketCursors) == nil {
			return corruptError(path, errors.New("a bucket is missing"))
		}
		return events.ForEachBucket(func(k []byte) error {
			return events.Bucket(k).ForEach(func(key, v []byte) error {
				if _, _, ok := recordPriorityTime(v); !ok || len(key) != keySize {
					return corruptError(path, fmt.Errorf("segment %x: record %x: %w", k, key, errBadRecord))
				}
				return nil
			})
		})
	})
}

// Recover moves a damaged log file aside, as <path>.corrupt-<UTC time>, so that the next start creates a new,
// empty log; nothing is deleted. It refuses while a process holds the file (a running gateway).
func Recover(path string) (movedTo string, err error) {
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("buffer: recover %s: %w", path, err)
	}
	lockf, err := lockLog(path)
	if err != nil {
		return "", fmt.Errorf("buffer: recover %s: %w", path, err)
	}
	defer lockf.Close()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return "", fmt.Errorf("buffer: recover %s: %w", path, err)
	}
	if err := lockFile(f.Fd()); err != nil {
		_ = f.Close()
		return "", fmt.Errorf("buffer: recover %s: %w", path, ErrLocked)
	}
	defer f.Close()
	base := path + ".corrupt-" + time.Now().UTC().Format("20060102T150405Z")
	movedTo = base
	for i := 1; ; i++ {
		if _, err := os.Lstat(movedTo); errors.Is(err, os.ErrNotExist) {
			break
		}
		movedTo = fmt.Sprintf("%s-%d", base, i)
	}
	if err := os.Rename(path, movedTo); err != nil {
		return "", fmt.Errorf("buffer: recover %s: %w", path, err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return movedTo, fmt.Errorf("buffer: recover %s: fsync directory: %w", path, err)
	}
	return movedTo, nil
}
