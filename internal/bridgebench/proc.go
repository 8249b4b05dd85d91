//go:build unix

package bridgebench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/edgegate/edgegate/internal/freeport"
)

// startTimeout bounds the wait for a started process to accept connections.
const startTimeout = 15 * time.Second

// process is a child started in its own process group. Stop and Kill signal the whole group; the process is
// also killed when the context given to startProcess ends.
type process struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited and been waited for

	stopWatch chan struct{}
	once      sync.Once
}

// startProcess starts bin with args, its output appended to logPath, in a new process group.
func startProcess(ctx context.Context, name, logPath, bin string, args ...string) (*process, error) {
	return startProcessEnv(ctx, name, logPath, nil, bin, args...)
}

// startProcessEnv is startProcess with env added to this process's environment.
func startProcessEnv(ctx context.Context, name, logPath string, env []string, bin string, args ...string) (*process, error) {
	out, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%s: log: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		_ = out.Close()
		return nil, fmt.Errorf("%s: start %s: %w", name, bin, err)
	}
	p := &process{name: name, cmd: cmd, done: make(chan struct{}), stopWatch: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		_ = out.Close()
		close(p.done)
	}()
	go func() {
		select {
		case <-ctx.Done():
			p.Kill()
		case <-p.stopWatch:
		case <-p.done:
		}
	}()
	return p, nil
}

// Pid is the process id (also its process group id).
func (p *process) Pid() int { return p.cmd.Process.Pid }

// Exited reports whether the process has ended.
func (p *process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *process) signal(sig syscall.Signal) {
	// The negative pid addresses the process group: whatever the process started goes too.
	if err := syscall.Kill(-p.cmd.Process.Pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		_ = p.cmd.Process.Signal(sig)
	}
}

// Kill sends SIGKILL to the process group and waits until the process is gone.
func (p *process) Kill() {
	p.once.Do(func() { close(p.stopWatch) })
	if !p.Exited() {
		p.signal(syscall.SIGKILL)
	}
	<-p.done
}

// Stop sends SIGTERM to the process group, waits up to grace for the process to exit, then kills it. It
// reports whether the process exited on SIGTERM.
func (p *process) Stop(grace time.Duration) bool {
	if p.Exited() {
		p.Kill()
		return true
	}
	p.signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		p.Kill() // ends the watcher; the group may still hold children
		return true
	case <-t.C:
		p.Kill()
		return false
	}
}

// waitListening polls addr until it accepts a TCP connection, the process exits or the timeout passes.
func waitListening(ctx context.Context, p *process, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if p.Exited() {
			return fmt.Errorf("%s exited before listening on %s (%s)", p.name, addr, p.cmd.ProcessState)
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not accept connections on %s within %s", p.name, addr, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) { return freeport.Get() }

// Usage is a process's resource use as /proc reports it.
type Usage struct {
	CPU    time.Duration // user + system time so far
	RSSKiB int64         // resident set now (VmRSS)
	HWMKiB int64         // the largest resident set so far (VmHWM)
	// AnonKiB is the anonymous part of the resident set (RssAnon): the heap and stacks, without mapped files
	// such as the bbolt log, whose pages the kernel can drop and read again.
	AnonKiB int64
}

// clockTick is the unit of utime and stime in /proc/PID/stat (USER_HZ, 100 on every Linux Go supports).
const clockTick = 10 * time.Millisecond

// ReadUsage reads /proc/PID/stat (utime + stime) and /proc/PID/status (VmRSS, VmHWM).
func ReadUsage(pid int) (Usage, error) {
	var u Usage
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return u, fmt.Errorf("read usage: %w", err)
	}
	// The command name (field 2) is in parentheses and may hold spaces; the fields after it are plain.
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return u, fmt.Errorf("read usage: malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return u, fmt.Errorf("read usage: short /proc/%d/stat", pid)
	}
	// f[0] is field 3; utime and stime are fields 14 and 15.
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return u, fmt.Errorf("read usage: %w", err)
	}
	u.CPU = time.Duration(ut+st) * clockTick
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, fmt.Errorf("read usage: %w", err)
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		var dst *int64
		switch {
		case strings.HasPrefix(line, "VmRSS:"):
			dst = &u.RSSKiB
		case strings.HasPrefix(line, "VmHWM:"):
			dst = &u.HWMKiB
		case strings.HasPrefix(line, "RssAnon:"):
			dst = &u.AnonKiB
		default:
			continue
		}
		if fs := strings.Fields(line); len(fs) >= 2 {
			*dst, _ = strconv.ParseInt(fs[1], 10, 64)
		}
	}
	return u, nil
}
