package buffer

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// longTests reports whether the long variants run (EDGEGATE_LONG=1).
func longTests() bool { return os.Getenv("EDGEGATE_LONG") == "1" }

// TestCrash kills a real child process (this test in a process of its own, crashChild) with SIGKILL while it appends
// from many goroutines, then reopens the log: the file passes bbolt's check, every acknowledged append is
// there with its payload, in order (each appending goroutine's events in the order it appended them), and no
// event is stored twice. Each round continues the same file: the
// reopen after the kill takes the full check and free list rebuild, and the next child, started after that
// reopen's Close, opens the file the clean way. EDGEGATE_LONG=1 runs 30 rounds instead of 5.
func TestCrash(t *testing.T) {
	if path := os.Getenv("EDGEGATE_CRASH_PATH"); path != "" {
		crashChild(t, path, os.Getenv("EDGEGATE_CRASH_ROUND"))
		return
	}
	if testing.Short() {
		t.Skip("kills child processes")
	}
	rounds := 5
	if longTests() {
		rounds = 30
	}
	path := filepath.Join(t.TempDir(), "events.db")
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	acked := map[uint64]string{} // seq → payload id, over all rounds
	var cursorMax uint64         // the highest position the child acknowledged for "sink"
	for round := range rounds {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrash$", "-test.count=1", "-test.timeout=60s")
		cmd.Env = append(os.Environ(), "EDGEGATE_CRASH_PATH="+path,
			"EDGEGATE_CRASH_ROUND="+strconv.Itoa(round))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		ready := make(chan string, 1)
		firstAck := make(chan struct{}) // closed when the child has said its first acknowledged append
		lines := make(chan []string, 1)
		go func() {
			var got []string
			sawAck := false
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if kind, ok := strings.CutPrefix(sc.Text(), "ready "); ok {
					ready <- kind
					continue
				}
				if !sawAck && strings.HasPrefix(sc.Text(), "ack ") {
					sawAck = true
					close(firstAck)
				}
				got = append(got, sc.Text())
			}
			lines <- got
		}()
		select {
		case kind := <-ready:
			want := openClean
			if round == 0 {
				want = openNew
			}
			if kind != want {
				t.Fatalf("round %d: the child opened the file as %q, want %q", round, kind, want)
			}
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatalf("round %d: the child did not start: %s", round, stderr.String())
		}
		// The crash moment is counted from the first acknowledged append, not from the open: on a loaded machine
		// the first commit (and its fsync) may take longer than the pause, and a round without any acknowledged
		// append checks nothing.
		select {
		case <-firstAck:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatalf("round %d: the child acknowledged no append within 30s: %s", round, stderr.String())
		}
		time.Sleep(time.Duration(50+rng.IntN(250)) * time.Millisecond) // the crash moment
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		// Everything the child wrote is read before Wait, which closes the pipe: lines still in it would be
		// lost, and a lost "cursor" line would make the stored cursor look ahead of every one said.
		got := <-lines
		_ = cmd.Wait()
		n := 0
		for _, line := range got {
			f := strings.Fields(line)
			switch {
			case len(f) == 3 && f[0] == "ack":
				seq, err := strconv.ParseUint(f[1], 10, 64)
				if err != nil {
					t.Fatalf("bad line %q", line)
				}
				if prev, dup := acked[seq]; dup {
					t.Fatalf("round %d: seq %d acknowledged for %s and %s", round, seq, prev, f[2])
				}
				acked[seq] = f[2]
				n++
			case len(f) == 2 && f[0] == "cursor":
				pos, _ := strconv.ParseUint(f[1], 10, 64)
				cursorMax = max(cursorMax, pos)
			default:
				// A line cut by the kill: its append may or may not be stored.
			}
		}
		if n == 0 {
			t.Fatalf("round %d: no append acknowledged before the kill; stderr: %s", round, stderr.String())
		}
		verifyAfterCrash(t, path, acked, cursorMax)
		t.Logf("round %d: %d appends acknowledged before SIGKILL, %d in total", round, n, len(acked))
	}
}

func verifyAfterCrash(t *testing.T, path string, acked map[uint64]string, cursorMax uint64) {
	t.Helper()
	l := openTest(t, Config{Path: path, Cursors: []string{"sink"}}, 0)
	defer l.Close()
	if l.opened != openRebuilt {
		t.Fatalf("the reopen after SIGKILL took the %q path, want rebuilt", l.opened)
	}
	checkDB(t, l.Log)
	pos := l.Cursor("sink")
	if pos > cursorMax {
		t.Fatalf("cursor at %d, past every acknowledged position (%d)", pos, cursorMax)
	}
	stored := map[uint64]string{}
	ids := map[string]uint64{}
	lastI := map[[2]int]int{} // per round and appender, the last event index seen
	lastRound := 0
	var prev uint64
	for _, r := range readAll(t, l.Log) {
		if r.Seq <= prev {
			t.Fatalf("seq %d after %d", r.Seq, prev)
		}
		prev = r.Seq
		var p struct{ ID string }
		if err := json.Unmarshal(r.Data, &p); err != nil {
			t.Fatalf("seq %d: %v", r.Seq, err)
		}
		if other, dup := ids[p.ID]; dup {
			t.Fatalf("event %s stored twice, at %d and %d", p.ID, other, r.Seq)
		}
		// Each appender's events are stored in the order it appended them, and a round's after the last.
		var round, g, i int
		if _, err := fmt.Sscanf(p.ID, "r%d-g%d-%d", &round, &g, &i); err != nil {
			t.Fatalf("seq %d: id %q: %v", r.Seq, p.ID, err)
		}
		if round < lastRound {
			t.Fatalf("seq %d: an event of round %d after one of round %d", r.Seq, round, lastRound)
		}
		lastRound = round
		key := [2]int{round, g}
		if prevI, ok := lastI[key]; ok && i <= prevI {
			t.Fatalf("seq %d: appender %d of round %d: event %d stored after its event %d", r.Seq, g, round, i, prevI)
		}
		lastI[key] = i
		ids[p.ID] = r.Seq
		stored[r.Seq] = p.ID
	}
	for seq, id := range acked {
		if seq <= pos {
			continue // the sink passed it: it may be deleted
		}
		if got, ok := stored[seq]; !ok || got != id {
			t.Fatalf("acknowledged append %d (%s) lost: stored %q", seq, id, got)
		}
	}
	if l.LastSeq() < prev {
		t.Fatalf("last seq %d below stored %d", l.LastSeq(), prev)
	}
}

// crashChild is TestCrash in its child process, on the log at path: it appends until killed and prints each
// acknowledged append ("ack <seq> <id>") and each cursor position it is about to acknowledge ("cursor <pos>").
func crashChild(t *testing.T, path, round string) {
	l, err := open(Config{Path: path, Cursors: []string{"sink"}}, nil, nil, openOptions{segSize: 256})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second) // bounded if nobody kills us
	defer cancel()
	go func() { _ = l.Run(ctx) }()
	var mu sync.Mutex // one write per line
	say := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		_, _ = fmt.Fprintf(os.Stdout, format, args...)
	}
	say("ready %s\n", l.opened)
	var wg sync.WaitGroup
	for g := range 32 {
		wg.Go(func() {
			for i := 0; i < 1_000_000 && ctx.Err() == nil; i++ {
				id := fmt.Sprintf("r%s-g%d-%d", round, g, i)
				seq, err := l.Append(ctx, Entry{Data: fmt.Appendf(nil, `{"id":%q,"pad":"%0100d"}`, id, i), Type: "crash", Subject: "g"})
				if err != nil {
					return
				}
				say("ack %d %s\n", seq, id)
			}
		})
	}
	wg.Go(func() { // a sink that acknowledges behind the appenders, so that segments get deleted
		for ctx.Err() == nil {
			if last := l.LastSeq(); last > 300 {
				// Said before the Ack: the Ack may be stored before a kill cuts the line that follows it.
				say("cursor %d\n", last-300)
				_ = l.Ack("sink", last-300)
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
	wg.Wait()
}
