package buffer

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// openCounted opens a log whose housekeeping tick never comes during a test (a cursor is then persisted only by
// the prompt saves under test) and which counts its commits; while *gate holds a channel, every commit waits
// for it to close before committing.
func openCounted(t *testing.T) (l testLog, commits *atomic.Int64, gate *atomic.Pointer[chan struct{}]) {
	t.Helper()
	l = openTest(t, Config{Cursors: []string{"sink"}}, 0)
	l.tickEvery = time.Hour
	commits, gate = &atomic.Int64{}, &atomic.Pointer[chan struct{}]{}
	l.beforeCommit = func() error {
		commits.Add(1)
		if g := gate.Load(); g != nil {
			<-*g
		}
		return nil
	}
	run(t, l.Log)
	return l, commits, gate
}

func waitPersisted(t *testing.T, l *Log, name string, pos uint64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := l.WaitPersisted(ctx, name, pos-1); err != nil {
		t.Fatalf("cursor %s not persisted at %d: %v (persisted %d)", name, pos, err, l.Persisted(name))
	}
	if got := l.Persisted(name); got != pos {
		t.Fatalf("persisted %s = %d, want %d", name, got, pos)
	}
}

// TestAckPersistedWithoutAppend: with no append after it, an acknowledged position is persisted by a commit of
// its own, promptly — not by the housekeeping tick, which never comes here — and Persisted never runs ahead of
// Cursor.
func TestAckPersistedWithoutAppend(t *testing.T) {
	l, _, _ := openCounted(t)
	appendN(t, l.Log, 10, ev)
	if err := l.Ack("sink", 7); err != nil {
		t.Fatal(err)
	}
	if p, c := l.Persisted("sink"), l.Cursor("sink"); p > c {
		t.Fatalf("persisted %d ahead of the cursor %d", p, c)
	}
	start := time.Now()
	waitPersisted(t, l.Log, "sink", 7)
	t.Logf("persisted %s after the Ack", time.Since(start).Round(time.Microsecond))
	if l.LastSeq() != 10 {
		t.Fatalf("last seq %d: something was appended", l.LastSeq())
	}
	if l.Persisted("unknown") != 0 {
		t.Errorf("an unknown cursor is persisted at %d", l.Persisted("unknown"))
	}
}

// TestAckSavesAreGrouped: the Acks that arrive while a commit runs share one commit of their own after it; an
// Ack made while appends are queued rides along with their commit instead of adding one; and one made during a
// commit of appends with none after it is still saved promptly, alone.
func TestAckSavesAreGrouped(t *testing.T) {
	l, commits, gate := openCounted(t)
	appendN(t, l.Log, 100, ev)

	hold := func() (release func()) {
		g := make(chan struct{})
		gate.Store(&g)
		return func() { gate.Store(nil); close(g) }
	}
	// Acks during a (held) commit of the cursors.
	release := hold()
	n0 := commits.Load()
	if err := l.Ack("sink", 1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the commit of the first Ack to start", func() bool { return commits.Load() > n0 })
	for pos := uint64(2); pos <= 50; pos++ {
		if err := l.Ack("sink", pos); err != nil {
			t.Fatal(err)
		}
	}
	release()
	waitPersisted(t, l.Log, "sink", 50)
	if n := commits.Load() - n0; n != 2 {
		t.Errorf("50 Acks took %d commits, want 2 (the first, then one for the 49 made meanwhile)", n)
	}

	// An Ack while appends wait for the (held) commit before them.
	release = hold()
	n0 = commits.Load()
	appended := make(chan error, 2)
	go func() { _, err := l.Append(context.Background(), ev(100)); appended <- err }()
	waitFor(t, 10*time.Second, "the first append's commit to start", func() bool { return commits.Load() > n0 })
	go func() { _, err := l.Append(context.Background(), ev(101)); appended <- err }()
	waitFor(t, 10*time.Second, "the second append to queue", func() bool { return !l.queueEmpty() })
	if err := l.Ack("sink", 100); err != nil {
		t.Fatal(err)
	}
	release()
	for range 2 {
		if err := <-appended; err != nil {
			t.Fatal(err)
		}
	}
	waitPersisted(t, l.Log, "sink", 100)
	if n := commits.Load() - n0; n != 2 {
		t.Errorf("two appends and an Ack took %d commits, want 2 (the Ack rides along with the second append)", n)
	}

	// An Ack during a (held) commit of appends with no append after it: saved alone once no append came.
	release = hold()
	n0 = commits.Load()
	go func() { _, err := l.Append(context.Background(), ev(102)); appended <- err }()
	waitFor(t, 10*time.Second, "the append's commit to start", func() bool { return commits.Load() > n0 })
	if err := l.Ack("sink", 102); err != nil {
		t.Fatal(err)
	}
	release()
	if err := <-appended; err != nil {
		t.Fatal(err)
	}
	waitPersisted(t, l.Log, "sink", 102)
	if n := commits.Load() - n0; n != 2 {
		t.Errorf("an append and an Ack made during its commit took %d commits, want 2", n)
	}
}

// TestAckSavesAreSpaced: a sink draining a backlog acknowledges all the time, with no append in between. Its
// cursor is saved by commits of their own at most one per saveEvery after the previous save, not one right after
// the other (each with its fsyncs); and every position is still saved. Here each Ack comes as soon as the previous
// position is saved, which is when a sink with a full window acknowledges next.
func TestAckSavesAreSpaced(t *testing.T) {
	l, commits, _ := openCounted(t)
	const rounds = 20
	appendN(t, l.Log, rounds, ev)
	if err := l.Ack("sink", 1); err != nil {
		t.Fatal(err)
	}
	waitPersisted(t, l.Log, "sink", 1)
	n0 := commits.Load()
	for pos := uint64(2); pos <= rounds; pos++ {
		prev := l.lastSaved.Load()
		if err := l.Ack("sink", pos); err != nil {
			t.Fatal(err)
		}
		waitPersisted(t, l.Log, "sink", pos)
		if gap := time.Duration(l.lastSaved.Load() - prev); gap < saveEvery {
			t.Fatalf("position %d was saved %s after the previous save, want at least %s", pos, gap, saveEvery)
		}
	}
	if n := commits.Load() - n0; n != rounds-1 {
		t.Errorf("%d Acks, each waited for, took %d commits, want %d", rounds-1, n, rounds-1)
	}
}

// TestAckNowIsNotSpaced: a reader that waits for its cursor (a sink with a full window) is not held back by the
// spacing between cursor commits: AckNow saves at once, also a position an Ack already left waiting.
func TestAckNowIsNotSpaced(t *testing.T) {
	l := openTest(t, Config{Cursors: []string{"sink"}}, 0)
	l.tickEvery, l.saveEvery = time.Hour, time.Hour
	run(t, l.Log)
	appendN(t, l.Log, 3, ev)
	if err := l.Ack("sink", 1); err != nil {
		t.Fatal(err)
	}
	waitPersisted(t, l.Log, "sink", 1) // the first save: nothing to space it from
	if err := l.Ack("sink", 2); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := l.WaitPersisted(ctx, "sink", 1); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("an Ack right after a save was persisted at once (%v), want it spaced", err)
	}
	if err := l.AckNow("sink", 2); err != nil {
		t.Fatal(err)
	}
	waitPersisted(t, l.Log, "sink", 2)
	if err := l.AckNow("sink", 3); err != nil {
		t.Fatal(err)
	}
	waitPersisted(t, l.Log, "sink", 3)
}

// TestWaitPersistedEnds: WaitPersisted returns the context's error when it ends and ErrClosed once the log
// has stopped; the cursors acknowledged before Close are persisted by it.
func TestWaitPersistedEnds(t *testing.T) {
	l := openTest(t, Config{Cursors: []string{"sink"}}, 0)
	stop := run(t, l.Log)
	appendN(t, l.Log, 3, ev)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := l.WaitPersisted(ctx, "sink", 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitPersisted with nothing acknowledged = %v, want the context's deadline", err)
	}
	if err := l.Ack("sink", 3); err != nil {
		t.Fatal(err)
	}
	stop()
	if err := l.WaitPersisted(context.Background(), "sink", 3); !errors.Is(err, ErrClosed) {
		t.Errorf("WaitPersisted after the log stopped = %v, want ErrClosed", err)
	}
	if got := l.Persisted("sink"); got != 3 {
		t.Errorf("persisted after stop = %d, want 3", got)
	}
}

// TestAckPersistedCrash kills a child process (this test in a process of its own, ackPersistedChild) with SIGKILL
// right after it saw its acknowledged cursor persisted, with no append after the Ack and no housekeeping tick:
// the reopened log has the cursor there (and the file passes the check).
func TestAckPersistedCrash(t *testing.T) {
	if path := os.Getenv("EDGEGATE_PERSIST_PATH"); path != "" {
		ackPersistedChild(t, path)
		return
	}
	if testing.Short() {
		t.Skip("kills a child process")
	}
	path := filepath.Join(t.TempDir(), "events.db")
	cmd := exec.Command(os.Args[0], "-test.run=^TestAckPersistedCrash$", "-test.count=1", "-test.timeout=60s")
	cmd.Env = append(os.Environ(), "EDGEGATE_PERSIST_PATH="+path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "persisted ") {
				line <- sc.Text()
				return
			}
		}
		close(line)
	}()
	var persisted uint64
	select {
	case l, ok := <-line:
		if !ok {
			t.Fatalf("the child ended without persisting its cursor: %s", stderr.String())
		}
		if persisted, err = strconv.ParseUint(strings.TrimPrefix(l, "persisted "), 10, 64); err != nil {
			t.Fatalf("bad line %q", l)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the child did not persist its cursor: %s", stderr.String())
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()

	l := openTest(t, Config{Path: path, Cursors: []string{"sink"}}, 0)
	checkDB(t, l.Log)
	if got := l.Cursor("sink"); got != persisted {
		t.Errorf("cursor after kill -9 = %d, want %d (persisted before the kill)", got, persisted)
	}
	if got := l.Persisted("sink"); got != persisted {
		t.Errorf("persisted after kill -9 = %d, want %d", got, persisted)
	}
	if l.LastSeq() != 20 {
		t.Errorf("last seq after kill -9 = %d, want 20", l.LastSeq())
	}
}

// ackPersistedChild is TestAckPersistedCrash in its child process, on the log at path: it appends 20 events,
// acknowledges 15, prints "persisted 15" once WaitPersisted says so, and waits to be killed.
func ackPersistedChild(t *testing.T, path string) {
	l, err := open(Config{Path: path, Cursors: []string{"sink"}}, nil, nil, openOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l.tickEvery = time.Hour
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second) // bounded if nobody kills us
	defer cancel()
	go func() { _ = l.Run(ctx) }()
	appendN(t, l, 20, ev)
	if err := l.Ack("sink", 15); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitPersisted(ctx, "sink", 14); err != nil {
		t.Fatal(err)
	}
	fmt.Printf("persisted %d\n", l.Persisted("sink"))
	<-ctx.Done()
}
