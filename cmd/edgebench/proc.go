//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/edgegate/edgegate/internal/bridgebench"
	"github.com/edgegate/edgegate/internal/freeport"
)

// proc is a child process in its own process group. The whole group is killed when the context given to
// startProc ends, by Stop and by Kill; the harness tracks every proc and kills what is left when it closes.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has been waited for
	out  *tailBuffer   // the last lines of its stdout and stderr
}

// startProc starts bin in a new process group, its output kept in a bounded buffer (and in logFile when set).
// errLines, when set, receives every line the process writes on stderr; outLines every line on stdout.
func startProc(ctx context.Context, name, bin string, args []string, logFile string, errLines, outLines func(string)) (*proc, error) {
	p := &proc{name: name, done: make(chan struct{}), out: &tailBuffer{max: 64 << 10}}
	var w io.Writer = p.out
	var f *os.File
	if logFile != "" {
		var err error
		if f, err = os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
			return nil, fmt.Errorf("%s: log: %w", name, err)
		}
		w = io.MultiWriter(p.out, f)
	}
	cmd := exec.Command(bin, args...)
	var pipes []*io.PipeWriter
	// tee sends what the process writes to w and, line by line, to fn.
	tee := func(fn func(string)) io.Writer {
		if fn == nil {
			return w
		}
		pr, pw := io.Pipe()
		pipes = append(pipes, pw)
		go func() {
			sc := bufio.NewScanner(pr)
			for sc.Scan() {
				fn(sc.Text())
			}
			_, _ = io.Copy(io.Discard, pr)
		}()
		return io.MultiWriter(w, pw)
	}
	cmd.Stdout, cmd.Stderr = tee(outLines), tee(errLines)
	defer func() {
		if len(pipes) > 0 {
			go func() {
				<-p.done
				for _, pw := range pipes {
					_ = pw.Close()
				}
			}()
		}
	}()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		if f != nil {
			_ = f.Close()
		}
		close(p.done)
		return nil, fmt.Errorf("%s: start %s: %w", name, bin, err)
	}
	p.cmd = cmd
	go func() {
		_ = cmd.Wait()
		if f != nil {
			_ = f.Close()
		}
		close(p.done)
	}()
	go func() {
		select {
		case <-ctx.Done():
			p.Kill()
		case <-p.done:
		}
	}()
	return p, nil
}

// Pid is the process id, also its process group id.
func (p *proc) Pid() int { return p.cmd.Process.Pid }

// Exited reports whether the process has ended.
func (p *proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits until the process ends or ctx does, and returns its exit error.
func (p *proc) Wait(ctx context.Context) error {
	select {
	case <-p.done:
	case <-ctx.Done():
		p.Kill()
		return ctx.Err()
	}
	if err := p.cmd.ProcessState; err != nil && !err.Success() {
		return fmt.Errorf("%s: %s\n%s", p.name, err, p.out.tail(20))
	}
	return nil
}

func (p *proc) signal(sig syscall.Signal) {
	// The negative pid is the process group: whatever the process started goes too.
	if err := syscall.Kill(-p.cmd.Process.Pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		_ = p.cmd.Process.Signal(sig)
	}
}

// Kill sends SIGKILL to the process group and waits for the process.
func (p *proc) Kill() {
	if p.cmd == nil {
		return
	}
	if !p.Exited() {
		p.signal(syscall.SIGKILL)
	}
	<-p.done
}

// Stop sends SIGTERM to the process group and waits up to grace before killing it.
func (p *proc) Stop(grace time.Duration) {
	if p.cmd == nil || p.Exited() {
		p.Kill()
		return
	}
	p.signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
	}
	p.Kill()
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tailBuffer) Write(b []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, b...)
	if len(t.buf) > t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
	}
	return len(b), nil
}

func (t *tailBuffer) tail(n int) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	lines := strings.Split(strings.TrimRight(string(t.buf), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// usage is a process's resource use as /proc reports it.
type usage = bridgebench.Usage

// readUsage reads a process's CPU time and resident set from /proc.
func readUsage(pid int) (usage, error) { return bridgebench.ReadUsage(pid) }

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) { return freeport.Get() }

func freeAddr() (string, error) {
	p, err := freePort()
	if err != nil {
		return "", err
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)), nil
}

// poll calls cond every interval until it returns true, p exits, ctx ends or timeout passes.
func poll(ctx context.Context, p *proc, timeout, interval time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return nil
		}
		if p != nil && p.Exited() {
			return fmt.Errorf("%s exited before %s (%s)\n%s", p.name, what, p.cmd.ProcessState, p.out.tail(20))
		}
		if time.Now().After(deadline) {
			msg := fmt.Sprintf("no %s within %s", what, timeout)
			if p != nil {
				msg += "\n" + p.out.tail(20)
			}
			return errors.New(msg)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// waitListening waits until addr accepts TCP connections.
func waitListening(ctx context.Context, p *proc, addr string, timeout time.Duration) error {
	return poll(ctx, p, timeout, 5*time.Millisecond, "listener on "+addr, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = c.Close()
		}
		return err == nil
	})
}

// httpGet fetches url and returns its status and body.
func httpGet(ctx context.Context, url string) (int, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	return resp.StatusCode, body, err
}

// metricSum adds up every sample of a Prometheus metric (all label sets) in a text exposition.
func metricSum(exposition []byte, name string) (float64, bool) {
	var sum float64
	found := false
	for line := range bytes.SplitSeq(exposition, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte(name)) {
			continue
		}
		rest := line[len(name):]
		if len(rest) == 0 || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		f := strings.Fields(string(rest))
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			continue
		}
		sum += v
		found = true
	}
	return sum, found
}
