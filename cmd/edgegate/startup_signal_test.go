//go:build unix

package main

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startBlocked starts `edgegate run` with its device registry behind a named pipe, so that gateway.New blocks
// reading it for as long as the test wants, and returns once the daemon is inside gateway.New, together with a
// function that feeds the pipe one copy of the registry (waiting, bounded, for a reader).
func startBlocked(t *testing.T) (d *proc, ready <-chan struct{}, feed func()) {
	t.Helper()
	registry, err := os.ReadFile(filepath.Join(repo, "configs/devices.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(t.TempDir(), "devices.yaml")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, _ := writeConfig(t, "shutdown_timeout: 5s\n")
	data, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	data = regexp.MustCompile(`(?m)^  registry: .*$`).ReplaceAll(data, []byte("  registry: "+fifo))
	if err := os.WriteFile(cfg, data, 0o600); err != nil {
		t.Fatal(err)
	}

	d = &proc{exit: make(chan error, 1)}
	d.cmd = exec.Command(binary(t), "run", "--config", cfg)
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	readyC := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		seen := false
		for sc.Scan() {
			line := sc.Text()
			d.mu.Lock()
			d.lines = append(d.lines, line)
			d.mu.Unlock()
			if m := readyRE.FindStringSubmatch(line); m != nil && !seen {
				d.mu.Lock()
				d.mqtt, d.http = m[1], m[2]
				d.mu.Unlock()
				seen = true
				close(readyC)
			}
		}
		d.exit <- d.cmd.Wait()
	}()
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			_ = d.cmd.Process.Kill()
			<-d.exit
		}
	})

	// Opening a pipe for writing without blocking fails (ENXIO) until a reader has it open.
	open := func() *os.File {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			fd, err := syscall.Open(fifo, syscall.O_WRONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
			if err == nil {
				if err := syscall.SetNonblock(fd, false); err != nil {
					t.Fatal(err)
				}
				return os.NewFile(uintptr(fd), fifo)
			}
			if !errors.Is(err, syscall.ENXIO) {
				t.Fatal(err)
			}
			select {
			case err := <-d.exit:
				d.exit <- err
				t.Fatalf("edgegate exited before it read the registry: %v\n%s", err, d.log())
			case <-time.After(5 * time.Millisecond):
			}
		}
		t.Fatalf("edgegate did not open the registry within 20s\n%s", d.log())
		return nil
	}
	w := open() // gateway.New waits for the registry now
	feed = func() {
		t.Helper()
		if w == nil {
			w = open()
		}
		_, err := w.Write(registry)
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		w = nil
		if err != nil {
			t.Fatalf("write the registry: %v", err)
		}
	}
	t.Cleanup(func() {
		if w != nil {
			w.Close()
		}
	})
	return d, readyC, feed
}

// alive fails the test if the daemon exits within the given time (a signal's default action is quick).
func (d *proc) alive(t *testing.T, within time.Duration, what string) {
	t.Helper()
	select {
	case err := <-d.exit:
		d.exit <- err
		t.Fatalf("edgegate exited after %s during start-up: %v\n%s", what, err, d.log())
	case <-time.After(within):
	}
}

// TestSIGHUPDuringStartup sends SIGHUP (systemctl reload) while gateway.New is still at work: the daemon must not
// die of it (systemd would not restart it), must become ready, and then carries out the reload.
func TestSIGHUPDuringStartup(t *testing.T) {
	d, ready, feed := startBlocked(t)
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.alive(t, 300*time.Millisecond, "SIGHUP")
	feed() // New goes on
	select {
	case <-ready:
	case err := <-d.exit:
		t.Fatalf("edgegate exited before ready: %v\n%s", err, d.log())
	case <-time.After(20 * time.Second):
		t.Fatalf("edgegate not ready within 20s\n%s", d.log())
	}
	// The reload the SIGHUP asked for happens now that the gateway runs: it reads the registry again.
	feed()
	d.waitLog(t, "device registry reloaded", 10*time.Second)
	d.waitLog(t, "rules reloaded", 10*time.Second)

	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := d.wait(t, 10*time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v (want status 0)\n%s", err, d.log())
	}
}

// TestStopDuringStartup sends SIGTERM, then SIGINT, while gateway.New is at work: the daemon finishes its start-up
// and stops cleanly (exit status 0, the log closed) instead of dying of the signal.
func TestStopDuringStartup(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			d, _, feed := startBlocked(t)
			if err := d.cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			d.alive(t, 300*time.Millisecond, sig.String())
			feed()
			if err := d.wait(t, 20*time.Second); err != nil {
				t.Fatalf("exit after %s during start-up: %v (want status 0)\n%s", sig, err, d.log())
			}
			for _, want := range []string{"stop requested during start-up", "stopped"} {
				if !strings.Contains(d.log(), want) {
					t.Errorf("log has no %q line:\n%s", want, d.log())
				}
			}
		})
	}
}
