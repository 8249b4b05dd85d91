package buffer

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

var errInjected = errors.New("injected write error")

// TestCommitFailure: a failed commit acknowledges none of its events, every appender gets the error, the
// sequence numbers stay consistent and the log works again afterwards.
func TestCommitFailure(t *testing.T) {
	l := openTest(t, Config{Cursors: []string{"sink"}}, 4)
	var failing atomic.Bool
	l.beforeCommit = func() error {
		if failing.Load() {
			return errInjected
		}
		return nil
	}
	run(t, l.Log)
	appendN(t, l.Log, 10, ev)

	failing.Store(true)
	if err := l.Ack("sink", 5); err != nil {
		t.Fatal(err)
	}
	seqs, errs := appendConcurrently(l.Log, 20, 100)
	for i, err := range errs {
		if !errors.Is(err, errInjected) || seqs[i] != 0 {
			t.Fatalf("appender %d during failure: seq %d, err %v; want 0 and the injected error", i, seqs[i], err)
		}
	}
	if l.LastSeq() != 10 || l.Stats().Events != 10 {
		t.Fatalf("after failed commits: last seq %d, %d events; want 10 and 10", l.LastSeq(), l.Stats().Events)
	}
	if got := testutilCounter(t, l, "edgegate_buffer_commit_errors_total"); got == 0 {
		t.Fatal("commit_errors_total = 0")
	}

	failing.Store(false)
	seq, err := l.Append(context.Background(), ev(200))
	if err != nil || seq != 11 {
		t.Fatalf("append after recovery = %d, %v; want 11", seq, err)
	}
	waitSaved(t, l.Log, "sink", 5)
	recs := readAll(t, l.Log)
	if len(recs) != 11-4 || recs[0].Seq != 5 || recs[len(recs)-1].Seq != 11 {
		t.Fatalf("stored %v, want 5..11 (segment 1..4 delivered)", seqsOf(recs))
	}
	checkDB(t, l.Log)
}

func TestLocked(t *testing.T) {
	l := openTest(t, Config{}, 0)
	tests := []struct {
		name string
		open func() error
	}{
		{"tool", func() error { _, err := OpenTool(Config{Path: l.path}, nil); return err }},
		{"second gateway", func() error { _, err := Open(Config{Path: l.path}, nil, nil); return err }},
		{"recover", func() error { _, err := Recover(l.path); return err }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.open()
			if !errors.Is(err, ErrLocked) {
				t.Fatalf("err = %v, want ErrLocked", err)
			}
			if !strings.Contains(err.Error(), l.path+": database is locked by another process (is edgegate running?)") {
				t.Fatalf("message %q does not name the file and the cause", err)
			}
		})
	}
	if _, err := os.Stat(l.path); err != nil {
		t.Fatalf("the log moved while locked: %v", err)
	}
}

func TestOpenToolMissing(t *testing.T) {
	_, err := OpenTool(Config{Path: filepath.Join(t.TempDir(), "events.db")}, nil)
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("OpenTool on a missing file = %v, want not exist", err)
	}
}

func TestCorruptAndRecover(t *testing.T) {
	src := openTest(t, Config{}, 0)
	run(t, src.Log)
	fill(t, src.Log, 3000)
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(src.path)
	if err != nil {
		t.Fatal(err)
	}
	// Damage to the data pages of a cleanly closed file is found when read (TestDamageFoundWhileRunning);
	// after a crash Open checks every page and finds it.
	tests := []struct {
		name    string
		damage  func(b []byte) []byte
		corrupt bool
		kind    string // how an intact-enough file opens
	}{
		{"meta pages", func(b []byte) []byte {
			for i := range 2 * 4096 {
				b[i] = byte(i*7 + 3)
			}
			return b
		}, true, ""},
		{"data pages after a crash", func(b []byte) []byte {
			off, _ := newestMeta(t, b)
			setFreelist(b, off, boltNoFreelist)
			for i := len(b) / 2; i < len(b)*3/4; i++ {
				b[i] = byte(i*13 + 5)
			}
			return b
		}, true, ""},
		{"free list page", func(b []byte) []byte {
			_, m := newestMeta(t, b)
			p := b[m.freelist*m.pageSize:]
			p[10], p[11] = 0xff, 0xff // the count is in the first element
			for i := range 64 {
				p[boltPageHeader+i] = byte(i*13 + 5)
			}
			return b
		}, true, ""},
		{"free list page header", func(b []byte) []byte {
			_, m := newestMeta(t, b)
			p := b[m.freelist*m.pageSize:]
			p[8] = 0x02 // a leaf page
			return b
		}, true, ""},
		{"newest meta page", func(b []byte) []byte {
			off, _ := newestMeta(t, b)
			b[off+boltPageHeader+boltMetaSumOff] ^= 0xff // bbolt falls back to the other, older meta
			return b
		}, false, openRebuilt},
		{"older meta page", func(b []byte) []byte {
			off, m := newestMeta(t, b)
			older := int(m.pageSize) - off // the other of pages 0 and 1
			b[older+boltPageHeader+boltMetaSumOff] ^= 0xff
			return b
		}, false, openRebuilt},
		{"truncated", func(b []byte) []byte { return b[:100] }, true, ""},
		{"garbage file", func([]byte) []byte { return []byte(strings.Repeat("not a bbolt file ", 1000)) }, true, ""},
		{"intact", func(b []byte) []byte { return b }, false, openClean},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "events.db")
			if err := os.WriteFile(path, tt.damage(append([]byte(nil), good...)), 0o600); err != nil {
				t.Fatal(err)
			}
			l, err := Open(Config{Path: path}, nil, nil)
			if !tt.corrupt {
				if err != nil {
					t.Fatal(err)
				}
				if l.LastSeq() != 3000 || l.opened != tt.kind {
					t.Fatalf("last seq %d, opened %q; want 3000, %q", l.LastSeq(), l.opened, tt.kind)
				}
				if n := len(readAll(t, l)); n != 3000 {
					t.Fatalf("read %d events, want 3000", n)
				}
				_ = l.Close()
				return
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open = %v, want ErrCorrupt", err)
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "edgegate backlog recover") {
				t.Fatalf("message %q does not name the file and the recovery command", err)
			}
			moved, err := Recover(path)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(filepath.Base(moved), "events.db.corrupt-") || filepath.Dir(moved) != dir {
				t.Fatalf("moved to %s", moved)
			}
			if _, err := os.Stat(moved); err != nil {
				t.Fatalf("the damaged file is gone: %v", err)
			}
			l, err = Open(Config{Path: path}, nil, nil)
			if err != nil {
				t.Fatalf("open after recover: %v", err)
			}
			defer l.Close()
			if l.LastSeq() != 0 {
				t.Fatalf("new log has last seq %d", l.LastSeq())
			}
			// A second recovery in the same second keeps both files.
			_ = l.Close()
			moved2, err := Recover(path)
			if err != nil || moved2 == moved {
				t.Fatalf("second recover = %s, %v", moved2, err)
			}
		})
	}
}

func TestRunTwiceAndClose(t *testing.T) {
	l := openTest(t, Config{}, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	waitFor(t, 5*time.Second, "Run started", func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.running
	})
	if err := l.Run(ctx); err == nil {
		t.Fatal("a second Run succeeded")
	}
	if _, err := l.Append(ctx, ev(1)); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil { // stops Run
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Run = %v", err)
	}
	if err := l.Run(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Run after Close = %v, want ErrClosed", err)
	}
}

// TestBusy: a commit that does not return (a disk that stopped answering) shows in Busy for as long as it hangs;
// an idle log and one whose commit has ended show 0.
func TestBusy(t *testing.T) {
	l := openTest(t, Config{}, 4)
	var hang atomic.Bool
	release := make(chan struct{})
	l.beforeCommit = func() error {
		if hang.Load() {
			<-release
		}
		return nil
	}
	run(t, l.Log)
	appendN(t, l.Log, 3, ev)
	if d := l.Busy(); d != 0 {
		t.Fatalf("Busy of an idle log = %s, want 0", d)
	}

	hang.Store(true)
	p, err := l.AppendAsyncFunc(context.Background(), ev(3), nil)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the hanging commit to show in Busy", func() bool { return l.Busy() > 0 })
	first := l.Busy()
	waitFor(t, 10*time.Second, "Busy to grow with the hanging commit", func() bool { return l.Busy() >= first+20*time.Millisecond })
	select {
	case <-p.Done():
		t.Fatal("the append completed while its commit hung")
	default:
	}

	hang.Store(false)
	close(release)
	if seq, err := p.Wait(context.Background()); err != nil || seq != 4 {
		t.Fatalf("append after the commit returned = %d, %v; want 4", seq, err)
	}
	waitFor(t, 10*time.Second, "Busy to return to 0", func() bool { return l.Busy() == 0 })
}
