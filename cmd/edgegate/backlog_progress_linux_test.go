package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// openPTY opens a pseudo-terminal pair: the master, from which the test reads what is written to the terminal,
// and the terminal itself (Linux provides /dev/ptmx; CI runs there).
func openPTY(t *testing.T) (master, tty *os.File) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("no pseudo-terminal: %v", err)
	}
	t.Cleanup(func() { master.Close() })
	// SyscallConn keeps the master non-blocking, so that read deadlines work on it.
	rc, err := master.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var ioErr error
	if err := rc.Control(func(fd uintptr) {
		if ioErr = unix.IoctlSetPointerInt(int(fd), unix.TIOCSPTLCK, 0); ioErr != nil {
			ioErr = fmt.Errorf("unlock: %w", ioErr)
			return
		}
		if n, ioErr = unix.IoctlGetInt(int(fd), unix.TIOCGPTN); ioErr != nil {
			ioErr = fmt.Errorf("pts number: %w", ioErr)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if ioErr != nil {
		t.Fatal(ioErr)
	}
	tty, err = os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tty.Close() })
	return master, tty
}

// drain reads r until it fails and sends what it read.
func drain(r io.Reader) <-chan []byte {
	ch := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(r)
		ch <- b
	}()
	return ch
}

// fillLog stores n CloudEvents in the log in dataDir and returns them as the JSON lines an export writes.
func fillLog(t *testing.T, dataDir string, n int) []string {
	t.Helper()
	lines := make([]string, 0, n)
	for i := range n {
		lines = append(lines, fmt.Sprintf(`{"specversion":"1.0","id":"ev-%05d","source":"/gateways/test-gw/devices/thermo-1",`+
			`"type":"telemetry.temperature","subject":"thermo-1","time":"2026-01-02T03:%02d:%02dZ",`+
			`"datacontenttype":"application/json","data":{"seq":%d}}`, i, i/60%60, i%60, i))
	}
	writeLog(t, dataDir, nil, lines...)
	return lines
}

var progressRE = regexp.MustCompile(`\r\[([= ]{40})\] (\d+)/(\d+) events`)

// TestBacklogExportProgress exports a log with its progress output on a terminal, a pipe and a file: the terminal
// shows a progress bar that ends full at the number of events, the pipe and the file get nothing, and the
// exported events are the same each time.
func TestBacklogExportProgress(t *testing.T) {
	const total = 2500 // more than one read batch of the export
	cfg, dataDir := writeConfig(t, "")
	want := strings.Join(fillLog(t, dataDir, total), "\n") + "\n"

	// export runs the export with stderr as its progress output and checks that it wrote the stored events.
	export := func(t *testing.T, name string, stderr *os.File) {
		t.Helper()
		var out bytes.Buffer
		if code := runMain(context.Background(), []string{"backlog", "export", "--config", cfg}, &out, stderr); code != 0 {
			t.Fatalf("export with stderr on %s: exit %d", name, code)
		}
		if out.String() != want {
			t.Fatalf("export with stderr on %s wrote %d bytes, %d lines, not the %d stored events",
				name, out.Len(), strings.Count(out.String(), "\n"), total)
		}
	}

	t.Run("terminal", func(t *testing.T) {
		shown := onTerminal(t, func(tty *os.File) { export(t, "a terminal", tty) })
		t.Logf("terminal shows %q", shown)
		draws := progressRE.FindAllSubmatchIndex(shown, -1)
		if len(draws) == 0 {
			t.Fatalf("no progress bar on the terminal: %q", shown)
		}
		prev := 0
		for _, m := range draws {
			done, _ := strconv.Atoi(string(shown[m[4]:m[5]]))
			of, _ := strconv.Atoi(string(shown[m[6]:m[7]]))
			if of != total || done < prev || done > total {
				t.Errorf("progress %d/%d after %d: want a count growing up to %d of %d", done, of, prev, total, total)
			}
			prev = done
		}
		last := draws[len(draws)-1]
		if bar := string(shown[last[2]:last[3]]); bar != strings.Repeat("=", 40) || prev != total {
			t.Errorf("last progress [%s] %d/%d, want a full bar at %d/%d", bar, prev, total, total, total)
		}
		// The display ends with the last draw and a new line (the terminal turns \n into \r\n).
		if rest := string(shown[last[1]:]); rest != "\r\n" {
			t.Errorf("after the last progress draw the terminal shows %q, want only the end of the line", rest)
		}
	})

	t.Run("pipe", func(t *testing.T) {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		got := drain(r)
		export(t, "a pipe", w)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		if shown := <-got; len(shown) != 0 {
			t.Errorf("a pipe got progress output: %q", shown)
		}
	})

	t.Run("file", func(t *testing.T) {
		f, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		export(t, "a file", f)
		shown, err := os.ReadFile(f.Name())
		if err != nil {
			t.Fatal(err)
		}
		if len(shown) != 0 {
			t.Errorf("a file got progress output: %q", shown)
		}
	})

	// The events themselves on the terminal (no --out, stdout a terminal): no progress bar among them.
	t.Run("events on the terminal", func(t *testing.T) {
		shown := onTerminal(t, func(tty *os.File) {
			if code := runMain(context.Background(), []string{"backlog", "export", "--config", cfg}, tty, tty); code != 0 {
				t.Fatalf("export to a terminal: exit %d", code)
			}
		})
		if progressRE.Match(shown) {
			t.Errorf("a progress bar among the events on the terminal")
		}
		if n := strings.Count(string(shown), "\n"); n != total {
			t.Errorf("the terminal shows %d lines, want the %d events", n, total)
		}
	})
}

// onTerminal runs fn with a new terminal and returns everything fn had it show.
func onTerminal(t *testing.T, fn func(tty *os.File)) []byte {
	t.Helper()
	master, tty := openPTY(t)
	got := drain(master)
	fn(tty)
	// Closing the terminal ends the reads on the master (EIO) once it has read what was written.
	if err := tty.Close(); err != nil {
		t.Fatal(err)
	}
	if err := master.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	select {
	case shown := <-got:
		return shown
	case <-time.After(15 * time.Second):
		t.Fatal("reading the terminal did not end")
		return nil
	}
}
