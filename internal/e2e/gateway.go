//go:build linux

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/goccy/go-yaml"
)

// Timeouts of the process lifecycle.
const (
	// ReadyTimeout bounds the wait for a started gateway to report ready.
	ReadyTimeout = 30 * time.Second
	// StopTimeout bounds a graceful stop (SIGTERM until exit); a gateway that takes longer fails the test
	// (a hang on shutdown) and is killed.
	StopTimeout = 20 * time.Second
)

// Gateway is an edgegate process of the test's own: `edgegate run` with a generated configuration on free
// loopback ports. The test's cleanup kills it if it still runs.
type Gateway struct {
	t   testing.TB
	bin string

	// Dir holds the configuration, the registry and the process's output (gateway.log).
	Dir string
	// ConfigPath is the configuration file `edgegate run --config` reads.
	ConfigPath string
	// DataDir is the gateway's data directory (the durable log is DataDir/events.db).
	DataDir string
	// MQTTAddr and HTTPAddr are the device listener and the admin API (host:port on 127.0.0.1).
	MQTTAddr, HTTPAddr string

	http *http.Client
	tree map[string]any // the configuration as written

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	exitErr error
	starts  int
}

// Start writes the registry and configuration of cfg, starts `edgegate run` and waits until it reports ready
// (every part running, the sink possibly still disconnected). A gateway that does not come up fails the test.
func Start(t testing.TB, bin string, cfg Config) *Gateway {
	t.Helper()
	g := Prepare(t, bin, cfg)
	g.Restart()
	return g
}

// Prepare writes the registry and configuration of cfg and returns the Gateway without starting it (Restart
// starts it). Tests use it to change files in Dir or DataDir before the first start.
func Prepare(t testing.TB, bin string, cfg Config) *Gateway {
	t.Helper()
	dir := t.TempDir()
	dataDir := cfg.DataDir
	if dataDir == "" {
		dataDir = filepath.Join(dir, "data")
	}
	g := &Gateway{
		t:          t,
		bin:        bin,
		Dir:        dir,
		ConfigPath: filepath.Join(dir, "edgegate.yaml"),
		DataDir:    dataDir,
		http:       &http.Client{Timeout: 5 * time.Second},
	}
	if err := WriteRegistry(filepath.Join(dir, "devices.yaml"), cfg.Devices); err != nil {
		t.Fatalf("e2e: %v", err)
	}
	g.tree = baseTree(dir, dataDir, "", "", cfg.Upstream)
	for k, v := range cfg.Set {
		if err := setPath(g.tree, k, v); err != nil {
			t.Fatalf("e2e: %v", err)
		}
	}
	if err := g.pickPorts(); err != nil {
		t.Fatalf("e2e: %v", err)
	}
	t.Cleanup(func() {
		g.kill()
		if t.Failed() {
			t.Logf("e2e: gateway output (%s), last lines:\n%s", g.logPath(), tail(g.Output(), 60))
		}
	})
	return g
}

// MQTTURL is the device listener as a paho URL: tcp://127.0.0.1:PORT.
func (g *Gateway) MQTTURL() string { return "tcp://" + g.MQTTAddr }

// HTTPURL is the admin API's base URL: http://127.0.0.1:PORT.
func (g *Gateway) HTTPURL() string { return "http://" + g.HTTPAddr }

func (g *Gateway) logPath() string { return filepath.Join(g.Dir, "gateway.log") }

// Output returns everything the gateway processes of this Gateway wrote to stdout and stderr so far.
func (g *Gateway) Output() string {
	data, _ := os.ReadFile(g.logPath())
	return string(data)
}

// Starts counts the processes started so far.
func (g *Gateway) Starts() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.starts
}

// PID is the running process's id, 0 when none runs.
func (g *Gateway) PID() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cmd == nil {
		return 0
	}
	return g.cmd.Process.Pid
}

// Running reports whether the process is alive.
func (g *Gateway) Running() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cmd == nil {
		return false
	}
	select {
	case <-g.exited:
		return false
	default:
		return true
	}
}

// Exited is closed when the current process exits (nil when none was started).
func (g *Gateway) Exited() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.exited
}

// Restart starts the gateway (again) with the same configuration, ports and data directory and waits until it
// reports ready. It fails the test when the process is already running or does not come up.
func (g *Gateway) Restart() {
	g.t.Helper()
	if g.Running() {
		g.t.Fatalf("e2e: restart: the gateway is still running (pid %d)", g.PID())
	}
	for try := 1; ; try++ {
		before := len(g.Output())
		if err := g.spawn(); err != nil {
			g.t.Fatalf("e2e: %v", err)
		}
		err := g.WaitReady(ReadyTimeout)
		if err == nil {
			return
		}
		// A port found free may be taken by another test before the gateway binds it: on the first start
		// only (later starts must keep the ports), pick new ones and try again.
		out := g.Output()[before:]
		if g.Starts() == try && try < 3 && !g.Running() && strings.Contains(out, "already in use") {
			if perr := g.pickPorts(); perr != nil {
				g.t.Fatalf("e2e: %v", perr)
			}
			continue
		}
		g.t.Fatalf("e2e: %v\n%s", err, tail(g.Output(), 40))
	}
}

// pickPorts chooses free ports for the MQTT and HTTP listeners and writes the configuration.
func (g *Gateway) pickPorts() error {
	mqttPort, err := FreePort()
	if err != nil {
		return err
	}
	httpPort, err := FreePort()
	if err != nil {
		return err
	}
	g.MQTTAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(mqttPort))
	g.HTTPAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(httpPort))
	if err := setPath(g.tree, "mqtt.listen", g.MQTTAddr); err != nil {
		return err
	}
	if err := setPath(g.tree, "http.listen", g.HTTPAddr); err != nil {
		return err
	}
	data, err := yaml.Marshal(g.tree)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if err := os.WriteFile(g.ConfigPath, data, 0o600); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	return nil
}

// Spawn starts the process without waiting for it to become ready (for tests of a start that must fail).
func (g *Gateway) Spawn() error { return g.spawn() }

func (g *Gateway) spawn() error {
	out, err := os.OpenFile(g.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("gateway output: %w", err)
	}
	g.mu.Lock()
	g.starts++
	fmt.Fprintf(out, "=== e2e: start #%d at %s\n", g.starts, time.Now().Format(time.RFC3339Nano))
	g.mu.Unlock()
	cmd := exec.Command(g.bin, "run", "--config", g.ConfigPath)
	cmd.Dir = g.Dir
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), "GOTRACEBACK=all")
	if err := cmd.Start(); err != nil {
		_ = out.Close()
		return fmt.Errorf("start %s: %w", g.bin, err)
	}
	exited := make(chan struct{})
	g.mu.Lock()
	g.cmd, g.exited, g.exitErr = cmd, exited, nil
	g.mu.Unlock()
	go func() {
		err := cmd.Wait()
		_ = out.Close()
		g.mu.Lock()
		g.exitErr = err
		g.mu.Unlock()
		close(exited)
	}()
	return nil
}

// WaitReady polls /readyz until the gateway reports "ready": true (a disconnected sink makes /readyz answer
// 503 but the gateway is ready all the same), the process exits, or timeout passes.
func (g *Gateway) WaitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	exited := g.Exited()
	for {
		select {
		case <-exited:
			return fmt.Errorf("gateway exited before it was ready: %v", g.ExitErr())
		default:
		}
		var body struct {
			Ready bool `json:"ready"`
		}
		if _, err := g.getJSON("/readyz", &body); err == nil && body.Ready {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("gateway not ready within %s", timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ExitErr is how the last process ended (nil: exit code 0, or still running).
func (g *Gateway) ExitErr() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.exitErr
}

// Kill9 kills the process with SIGKILL and waits until it is gone.
func (g *Gateway) Kill9() {
	g.t.Helper()
	if !g.Running() {
		g.t.Fatalf("e2e: kill -9: the gateway is not running")
	}
	g.kill()
}

func (g *Gateway) kill() {
	g.mu.Lock()
	cmd, exited := g.cmd, g.exited
	g.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	<-exited
}

// Stop sends SIGTERM and waits for the process to exit. It returns the exit error (nil for exit code 0). A
// process still running after StopTimeout fails the test as a hang on shutdown (with a goroutine dump from
// SIGQUIT in Output) and is killed.
func (g *Gateway) Stop() error {
	g.t.Helper()
	g.mu.Lock()
	cmd, exited := g.cmd, g.exited
	g.mu.Unlock()
	if cmd == nil {
		return errors.New("e2e: stop: the gateway was never started")
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		return g.ExitErr()
	case <-time.After(StopTimeout):
	}
	_ = cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		g.kill()
	}
	g.t.Errorf("e2e: the gateway did not stop within %s of SIGTERM (hang on shutdown); see the goroutine dump", StopTimeout)
	return fmt.Errorf("e2e: stop: hang on shutdown")
}

// getJSON GETs path from the admin API and decodes the body into v; it returns the status code.
func (g *Gateway) getJSON(path string, v any) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, g.HTTPURL()+path, nil)
	if err != nil {
		return 0, err
	}
	resp, err := g.http.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return resp.StatusCode, fmt.Errorf("GET %s: %w", path, err)
	}
	return resp.StatusCode, nil
}

// Status is the part of GET /api/status the tests read.
type Status struct {
	Ready    bool         `json:"ready"`
	Healthy  bool         `json:"healthy"`
	Clients  int          `json:"clients"`
	Problems []string     `json:"problems"`
	Sinks    []SinkStatus `json:"sinks"`
	Backlog  struct {
		Events  int64 `json:"events"`
		Bytes   int64 `json:"bytes"`
		Full    bool  `json:"full"`
		LastSeq int64 `json:"last_seq"`
		Cursors []struct {
			Name    string `json:"name"`
			Backlog int64  `json:"backlog"`
		} `json:"cursors"`
	} `json:"backlog"`
}

// SinkStatus is one sink in Status.
type SinkStatus struct {
	Name      string `json:"name"`
	Connected bool   `json:"connected"`
	Healthy   bool   `json:"healthy"`
	Stalled   bool   `json:"stalled"`
	LastError string `json:"last_error"`
	InFlight  int    `json:"in_flight"`
	Cursor    uint64 `json:"cursor"`
}

// Status fetches GET /api/status.
func (g *Gateway) Status() (Status, error) {
	var st Status
	_, err := g.getJSON("/api/status", &st)
	return st, err
}

// DeviceState fetches GET /api/devices and returns the state view of device id (ok false when it has none).
func (g *Gateway) DeviceState(id string) (state map[string]any, ok bool, err error) {
	var devs []struct {
		ID    string         `json:"id"`
		State map[string]any `json:"state"`
	}
	if _, err := g.getJSON("/api/devices", &devs); err != nil {
		return nil, false, err
	}
	for _, d := range devs {
		if d.ID == id {
			return d.State, d.State != nil, nil
		}
	}
	return nil, false, nil
}

// Sink returns the named sink of the status (ok false when absent).
func (s Status) Sink(name string) (SinkStatus, bool) {
	for _, k := range s.Sinks {
		if k.Name == name {
			return k, true
		}
	}
	return SinkStatus{}, false
}

// Tool runs `edgegate ARGS... --config <this gateway's config>` and returns its stdout, stderr and exit code.
func (g *Gateway) Tool(args ...string) (stdout, stderr string, code int, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, g.bin, append(args, "--config", g.ConfigPath)...)
	cmd.Dir = g.Dir
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return o.String(), e.String(), ee.ExitCode(), nil
	}
	if err != nil {
		return o.String(), e.String(), -1, fmt.Errorf("run edgegate %s: %w", strings.Join(args, " "), err)
	}
	return o.String(), e.String(), 0, nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
