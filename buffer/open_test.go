package buffer

import (
	"bytes"
	"encoding/binary"
	"errors"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"hash/fnv"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// newestMeta returns the offset of the newest valid meta page of a bbolt file's bytes and what it says.
func newestMeta(t testing.TB, b []byte) (int, boltMeta) {
	t.Helper()
	m0, ok0 := parseMeta(b)
	if !ok0 {
		t.Fatal("meta page 0 is not valid")
	}
	off := 0
	m := m0
	if m1, ok := parseMeta(b[m0.pageSize:]); ok && m1.txid > m0.txid {
		off, m = int(m0.pageSize), m1
	}
	return off, m
}

// setFreelist writes freelist into the meta page at off and updates its checksum.
func setFreelist(b []byte, off int, freelist uint64) {
	m := b[off+boltPageHeader : off+boltPageHeader+boltMetaSize]
	binary.NativeEndian.PutUint64(m[32:], freelist)
	h := fnv.New64a()
	_, _ = h.Write(m[:boltMetaSumOff])
	binary.NativeEndian.PutUint64(m[boltMetaSumOff:], h.Sum64())
}

// asAfterCrash rewrites the file's newest meta page to name no free list, as every commit but Close's
// leaves it: the file is then what a crash after its last commit leaves.
func asAfterCrash(t testing.TB, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	off, _ := newestMeta(t, b)
	setFreelist(b, off, boltNoFreelist)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// syncBuffer is a bytes.Buffer for a logger.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// logLine returns the first logged line holding msg.
func logLine(t testing.TB, logs *syncBuffer, msg string) string {
	t.Helper()
	for line := range strings.Lines(logs.String()) {
		if strings.Contains(line, "msg=\""+msg+"\"") {
			return line
		}
	}
	t.Fatalf("no %q in the log:\n%s", msg, logs.String())
	return ""
}

// TestCleanCloseOpensWithoutScan: Close leaves the file's newest meta page naming a synced free list, and the
// next Open takes the path that reads it (clean=true in "log opened") with every event and cursor intact;
// the first commit of that run clears the mark, so a crash from then on would take the full check; a second
// Close sets it again. In both durability modes (interval mode must fsync the mark too).
func TestCleanCloseOpensWithoutScan(t *testing.T) {
	for _, durability := range []string{DurabilityFsync, DurabilityInterval} {
		t.Run(durability, func(t *testing.T) {
			cfg := Config{Durability: durability, Cursors: []string{"sink"}}
			l := openTest(t, cfg, 64)
			if l.opened != openNew {
				t.Fatalf("a new file opened as %q", l.opened)
			}
			stop := run(t, l.Log)
			fill(t, l.Log, 1000)
			if err := l.Ack("sink", 300); err != nil {
				t.Fatal(err)
			}
			waitSaved(t, l.Log, "sink", 300)
			stop()
			cfg.Path = l.path

			b, err := os.ReadFile(cfg.Path)
			if err != nil {
				t.Fatal(err)
			}
			if _, m := newestMeta(t, b); m.freelist == boltNoFreelist {
				t.Fatalf("after Close the newest meta (txid %d) names no free list", m.txid)
			}
			if kind, err := openKind(cfg.Path); kind != openClean || err != nil {
				t.Fatalf("openKind after Close = %q, %v; want clean", kind, err)
			}

			var logs syncBuffer
			l2, err := open(cfg, slog.New(slog.NewTextHandler(&logs, nil)), nil, openOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer l2.Close()
			if l2.opened != openClean {
				t.Fatalf("reopen took the %q path, want clean", l2.opened)
			}
			if line := logLine(t, &logs, "log opened"); !strings.Contains(line, " clean=true ") {
				t.Fatalf("log opened without clean=true: %s", line)
			}
			if l2.LastSeq() != 1000 || l2.Cursor("sink") != 300 || l2.Stats().Events != 1000-256 {
				t.Fatalf("after reopen: last seq %d, cursor %d, %d events; want 1000, 300, %d",
					l2.LastSeq(), l2.Cursor("sink"), l2.Stats().Events, 1000-256)
			}
			if recs := readAll(t, l2); len(recs) != 1000-256 || recs[0].Seq != 257 {
				t.Fatalf("read %d records from %d", len(recs), recs[0].Seq)
			}
			checkDB(t, l2)
			if kind, _ := openKind(cfg.Path); kind != openRebuilt {
				t.Fatalf("while open (after its first commit) the file reads as %q, want rebuilt", kind)
			}
			if err := l2.Close(); err != nil {
				t.Fatal(err)
			}
			if line := logLine(t, &logs, "log closed"); !strings.Contains(line, " clean=true") {
				t.Fatalf("log closed without clean=true: %s", line)
			}
			if kind, err := openKind(cfg.Path); kind != openClean || err != nil {
				t.Fatalf("openKind after the second Close = %q, %v; want clean", kind, err)
			}
		})
	}
}

// TestOpenAfterCrashImage: a file whose newest meta names no free list (what a crash leaves) takes the full
// check and the rebuild (clean=false), keeps every event, and is marked clean again by Close.
func TestOpenAfterCrashImage(t *testing.T) {
	cfg := Config{Cursors: []string{"sink"}}
	l := openTest(t, cfg, 64)
	stop := run(t, l.Log)
	fill(t, l.Log, 500)
	stop()
	cfg.Path = l.path
	asAfterCrash(t, cfg.Path)
	if kind, err := openKind(cfg.Path); kind != openRebuilt || err != nil {
		t.Fatalf("openKind = %q, %v; want rebuilt", kind, err)
	}
	var logs syncBuffer
	l2, err := open(cfg, slog.New(slog.NewTextHandler(&logs, nil)), nil, openOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l2.opened != openRebuilt {
		t.Fatalf("opened as %q, want rebuilt", l2.opened)
	}
	if line := logLine(t, &logs, "log opened"); !strings.Contains(line, " clean=false ") {
		t.Fatalf("log opened without clean=false: %s", line)
	}
	logLine(t, &logs, "the log was not closed cleanly (a crash): its file was checked and bbolt's free list rebuilt, which reads the whole file once")
	if len(readAll(t, l2)) != 500 {
		t.Fatal("events lost")
	}
	checkDB(t, l2)
	if err := l2.Close(); err != nil {
		t.Fatal(err)
	}
	if kind, _ := openKind(cfg.Path); kind != openClean {
		t.Fatalf("after Close: %q, want clean", kind)
	}
}

// TestDamageFoundWhileRunning: damage the open path no longer looks for (a data page of a cleanly closed file)
// makes Read fail with ErrCorrupt, and Close then leaves the mark off, so that the next Open checks the whole
// file and reports ErrCorrupt with the recovery command.
func TestDamageFoundWhileRunning(t *testing.T) {
	l := openTest(t, Config{}, 0)
	stop := run(t, l.Log)
	fill(t, l.Log, 3000)
	stop()
	b, err := os.ReadFile(l.path)
	if err != nil {
		t.Fatal(err)
	}
	for i := len(b) / 2; i < len(b)*3/4; i++ {
		b[i] = byte(i*13 + 5)
	}
	path := filepath.Join(t.TempDir(), "events.db")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	l2, err := Open(Config{Path: path}, nil, nil)
	if errors.Is(err, ErrCorrupt) {
		t.Skip("the damage hit the free list page, found by Open itself (TestCorruptAndRecover covers that)")
	}
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	var after uint64
	for {
		recs, err := l2.Read(after, 1000)
		if errors.Is(err, ErrCorrupt) {
			break
		}
		if err != nil {
			t.Fatalf("read = %v, want ErrCorrupt", err)
		}
		if len(recs) == 0 {
			t.Fatal("read the damaged log to its end without ErrCorrupt")
		}
		after = recs[len(recs)-1].Seq
	}
	// Stats reads the file too (the metrics collector calls it): on the damaged pages it stops, it does not panic.
	for pos := uint64(0); pos <= 3000; pos += 10 {
		if err := l2.Ack("reader", pos); err != nil {
			t.Fatal(err)
		}
		_ = l2.Stats()
	}
	// Compaction does not copy a damaged file (bbolt would panic on its pages).
	if err := l2.compact(fileSize(path), 0); err != nil {
		t.Fatalf("compact of the damaged log = %v", err)
	}
	if got := testutil.ToFloat64(l2.m.compactions); got != 0 {
		t.Errorf("compactions = %v, want the damaged log left as it is", got)
	}
	if err := l2.Close(); err != nil {
		t.Fatal(err)
	}
	// The full check (backlog recover's) finds the damage that Open did not; the sound original passes it.
	if err := Check(path); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Check of the damaged file = %v, want ErrCorrupt", err)
	}
	if err := Check(l.path); err != nil {
		t.Errorf("Check of the sound file = %v", err)
	}
	if kind, _ := openKind(path); kind != openRebuilt {
		t.Fatalf("after damage was found the file reads as %q, want rebuilt", kind)
	}
	if _, err := Open(Config{Path: path}, nil, nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("the next Open = %v, want ErrCorrupt", err)
	}
}

// TestParseMeta: the meta decoder agrees with the file bbolt wrote and refuses a changed byte.
func TestParseMeta(t *testing.T) {
	l := openTest(t, Config{}, 0)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(l.path)
	if err != nil {
		t.Fatal(err)
	}
	off, m := newestMeta(t, b)
	if m.pageSize != uint64(os.Getpagesize()) || m.pgid*m.pageSize > uint64(len(b)) || m.freelist >= m.pgid {
		t.Fatalf("meta %+v of a %d-byte file", m, len(b))
	}
	for _, i := range []int{0, 8, 32, 48, 60} {
		c := bytes.Clone(b)
		c[off+boltPageHeader+i] ^= 1
		if _, ok := parseMeta(c[off:]); ok {
			t.Errorf("meta with byte %d changed accepted", i)
		}
	}
}
