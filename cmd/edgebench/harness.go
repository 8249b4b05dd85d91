//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// harness holds what every scenario shares: the built binaries, a work directory and the processes started.
type harness struct {
	root    string // module root
	work    string // temporary directory, removed by close
	quick   bool
	rounds  int
	logf    func(format string, args ...any)
	bins    binaries
	mu      sync.Mutex
	procs   []*proc
	counter atomic.Int64
}

type binaries struct {
	Edgegate, Devsim, Edgebench, Mosquitto string
}

// newHarness finds the module root, makes the work directory and builds edgegate, devsim and edgebench into it.
func newHarness(ctx context.Context, quick bool, rounds int, logf func(string, ...any)) (*harness, error) {
	root, err := moduleRoot()
	if err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp("", "edgebench-")
	if err != nil {
		return nil, fmt.Errorf("work directory: %w", err)
	}
	h := &harness{root: root, work: work, quick: quick, rounds: rounds, logf: logf}
	h.bins.Mosquitto = findMosquitto()
	start := time.Now()
	for _, b := range []struct {
		dst *string
		pkg string
	}{{&h.bins.Edgegate, "./cmd/edgegate"}, {&h.bins.Devsim, "./cmd/devsim"}, {&h.bins.Edgebench, "./cmd/edgebench"}} {
		*b.dst = filepath.Join(work, "bin", filepath.Base(b.pkg))
		cmd := exec.CommandContext(ctx, "go", "build", "-o", *b.dst, b.pkg)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			h.close()
			return nil, fmt.Errorf("go build %s: %w\n%s", b.pkg, err, out)
		}
	}
	logf("built edgegate, devsim and edgebench in %s", time.Since(start).Round(time.Millisecond))
	return h, nil
}

// close kills every process still running and removes the work directory.
func (h *harness) close() {
	h.mu.Lock()
	procs := h.procs
	h.procs = nil
	h.mu.Unlock()
	for _, p := range procs {
		p.Kill()
	}
	_ = os.RemoveAll(h.work)
}

// start starts a tracked process; its output goes to a log file in the work directory, and its stderr lines
// to lines when set.
func (h *harness) start(ctx context.Context, name, bin string, args []string, lines func(string)) (*proc, error) {
	return h.startOut(ctx, name, bin, args, lines, nil)
}

// startOut is start that also passes every stdout line to outLines.
func (h *harness) startOut(ctx context.Context, name, bin string, args []string, errLines, outLines func(string)) (*proc, error) {
	logFile := filepath.Join(h.work, fmt.Sprintf("%s-%d.log", name, h.counter.Add(1)))
	p, err := startProc(ctx, name, bin, args, logFile, errLines, outLines)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	h.procs = append(h.procs, p)
	h.mu.Unlock()
	return p, nil
}

// dir makes a fresh directory in the work directory.
func (h *harness) dir(name string) (string, error) {
	d := filepath.Join(h.work, fmt.Sprintf("%s-%d", name, h.counter.Add(1)))
	if err := os.MkdirAll(d, 0o755); err != nil {
		return "", fmt.Errorf("mkdir: %w", err)
	}
	return d, nil
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if data, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil &&
			bytes.Contains(data, []byte("module github.com/edgegate/edgegate\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run edgebench inside the edgegate repository (no go.mod of github.com/edgegate/edgegate above the current directory)")
		}
		dir = parent
	}
}

func findMosquitto() string {
	if st, err := os.Stat("/usr/sbin/mosquitto"); err == nil && !st.IsDir() {
		return "/usr/sbin/mosquitto"
	}
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p
	}
	return ""
}

// machine describes this computer.
func machine() Machine {
	m := Machine{Cores: runtime.NumCPU(), OSArch: runtime.GOOS + "/" + runtime.GOARCH}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(data), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	if out, err := exec.Command("go", "env", "GOVERSION").Output(); err == nil {
		m.GoVersion = strings.TrimSpace(string(out))
	} else {
		m.GoVersion = runtime.Version()
	}
	if bin := findMosquitto(); bin != "" {
		// mosquitto -h prints its version on the first line and exits non-zero.
		out, _ := exec.Command(bin, "-h").CombinedOutput()
		first, _, _ := strings.Cut(string(out), "\n")
		m.Mosquitto = strings.TrimSpace(first)
	}
	return m
}

// sut is a running system under test: an MQTT broker devices connect to.
type sut struct {
	name     string
	proc     *proc
	url      string // tcp://127.0.0.1:PORT
	httpAddr string // gateway admin API
	startup  time.Duration
	// received counts the device messages the system took in since the baseline was taken.
	received func(ctx context.Context) (int64, error)
	sub      paho.Client
}

func (s *sut) stop() {
	if s.sub != nil {
		s.sub.Disconnect(0)
	}
	s.proc.Stop(10 * time.Second)
}

func (s *sut) usage() usage {
	u, _ := readUsage(s.proc.Pid())
	return u
}

// gatewayOptions configures a gateway started by startGateway.
type gatewayOptions struct {
	Registry   string
	RulesDir   string // "" no rules
	Durability string // fsync (default) or interval
	DataDir    string // "" a fresh one
	MaxBytes   int64  // 0: the default
}

// startGateway writes a configuration on free ports and starts the edgegate binary; it returns when /readyz
// answers 200. Device rate and connection limits are raised so that they do not cap a benchmark.
func (h *harness) startGateway(ctx context.Context, o gatewayOptions) (*sut, error) {
	dir, err := h.dir("gateway")
	if err != nil {
		return nil, err
	}
	if o.DataDir == "" {
		o.DataDir = filepath.Join(dir, "data")
	}
	if o.Durability == "" {
		o.Durability = "fsync"
	}
	mqttAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	httpAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	var cfg bytes.Buffer
	fmt.Fprintf(&cfg, "id: bench\ndata_dir: %s\nshutdown_timeout: 10s\nlog: {level: warn}\n", o.DataDir)
	fmt.Fprintf(&cfg, "http: {listen: %q}\n", httpAddr)
	fmt.Fprintf(&cfg, "mqtt:\n  listen: %q\n  max_connections: 100000\n  max_connections_per_ip: 100000\n", mqttAddr)
	fmt.Fprintf(&cfg, "  publish_rate: 1000000\n  publish_burst: 1000000\n")
	// Lights report their state on devices/{id}/state/light, which the built-in mappings leave out.
	fmt.Fprintf(&cfg, "ingest:\n  mappings:\n    - {name: state, topic: \"devices/{device}/state/{metric}\", type: \"state.{metric}\"}\n")
	fmt.Fprintf(&cfg, "devices: {registry: %q}\n", o.Registry)
	fmt.Fprintf(&cfg, "buffer: {durability: %s", o.Durability)
	if o.MaxBytes > 0 {
		fmt.Fprintf(&cfg, ", max_bytes: %d", o.MaxBytes)
	}
	fmt.Fprintf(&cfg, "}\n")
	if o.RulesDir != "" {
		fmt.Fprintf(&cfg, "rules: {dir: %q}\n", o.RulesDir)
	}
	path := filepath.Join(dir, "edgegate.yaml")
	if err := os.WriteFile(path, cfg.Bytes(), 0o600); err != nil {
		return nil, fmt.Errorf("gateway config: %w", err)
	}
	start := time.Now()
	p, err := h.start(ctx, "edgegate", h.bins.Edgegate, []string{"run", "--config", path}, nil)
	if err != nil {
		return nil, err
	}
	s := &sut{name: "gateway", proc: p, url: "tcp://" + mqttAddr, httpAddr: httpAddr}
	err = poll(ctx, p, 60*time.Second, 2*time.Millisecond, "200 from /readyz", func() bool {
		code, _, err := httpGet(ctx, "http://"+httpAddr+"/readyz")
		return err == nil && code == 200
	})
	if err != nil {
		p.Kill()
		return nil, fmt.Errorf("gateway: %w", err)
	}
	s.startup = time.Since(start)
	// Device messages that became events: events appended to the log less the presence events (one at each
	// connect and disconnect), which the caller accounts for with presence.
	base, err := gatewayAppended(ctx, httpAddr)
	if err != nil {
		p.Kill()
		return nil, err
	}
	s.received = func(ctx context.Context) (int64, error) {
		n, err := gatewayAppended(ctx, httpAddr)
		return n - base, err
	}
	return s, nil
}

func gatewayAppended(ctx context.Context, httpAddr string) (int64, error) {
	code, body, err := httpGet(ctx, "http://"+httpAddr+"/metrics")
	if err != nil || code != 200 {
		return 0, fmt.Errorf("gateway metrics: %d %w", code, err)
	}
	v, ok := metricSum(body, "edgegate_buffer_appended_total")
	if !ok {
		return 0, errors.New("gateway metrics: no edgegate_buffer_appended_total")
	}
	return int64(v), nil
}

// startMosquitto starts mosquitto on a free port (anonymous, no persistence, no queue limits) with the extra
// configuration lines.
func (h *harness) startMosquitto(ctx context.Context, extra ...string) (*sut, error) {
	if h.bins.Mosquitto == "" {
		return nil, errors.New("mosquitto is not installed (Debian: apt-get install mosquitto)")
	}
	dir, err := h.dir("mosquitto")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	var cfg bytes.Buffer
	fmt.Fprintf(&cfg, "listener %d 127.0.0.1\nallow_anonymous true\npersistence false\n", port)
	fmt.Fprintf(&cfg, "max_queued_messages 0\nmax_inflight_messages 0\nmax_connections -1\n")
	fmt.Fprintf(&cfg, "log_dest stderr\nlog_type error\nlog_type warning\n")
	if os.Geteuid() == 0 {
		// mosquitto drops root privileges to the "mosquitto" user unless told to stay.
		if u, err := user.Current(); err == nil {
			fmt.Fprintf(&cfg, "user %s\n", u.Username)
		}
	}
	for _, l := range extra {
		fmt.Fprintln(&cfg, l)
	}
	path := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(path, cfg.Bytes(), 0o600); err != nil {
		return nil, fmt.Errorf("mosquitto config: %w", err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	start := time.Now()
	p, err := h.start(ctx, "mosquitto", h.bins.Mosquitto, []string{"-c", path}, nil)
	if err != nil {
		return nil, err
	}
	if err := waitListening(ctx, p, addr, 15*time.Second); err != nil {
		p.Kill()
		return nil, fmt.Errorf("mosquitto: %w", err)
	}
	return &sut{name: "mosquitto", proc: p, url: "tcp://" + addr, startup: time.Since(start)}, nil
}

// startMochi starts `edgebench bare-mochi`: mochi-mqtt with allow-all authentication and nothing else.
func (h *harness) startMochi(ctx context.Context) (*sut, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	start := time.Now()
	p, err := h.start(ctx, "bare-mochi", h.bins.Edgebench, []string{"bare-mochi", "--listen", addr}, nil)
	if err != nil {
		return nil, err
	}
	if err := waitListening(ctx, p, addr, 15*time.Second); err != nil {
		p.Kill()
		return nil, fmt.Errorf("bare-mochi: %w", err)
	}
	return &sut{name: "mochi", proc: p, url: "tcp://" + addr, startup: time.Since(start)}, nil
}

// subscribe counts, in this process, the messages a plain broker delivers on filter: the broker baselines are
// measured receiving and delivering to one subscriber.
func (s *sut) subscribe(ctx context.Context, filter string, qos byte) error {
	var n atomic.Int64
	opts := paho.NewClientOptions().AddBroker(s.url).SetClientID(fmt.Sprintf("edgebench-sub-%d", time.Now().UnixNano())).
		SetCleanSession(true).SetAutoReconnect(false).SetOrderMatters(false).SetConnectTimeout(5 * time.Second)
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("subscriber: connect %s: %v", s.url, tok.Error())
	}
	tok := c.Subscribe(filter, qos, func(paho.Client, paho.Message) { n.Add(1) })
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		c.Disconnect(0)
		return fmt.Errorf("subscriber: subscribe %s: %v", filter, tok.Error())
	}
	s.sub = c
	s.received = func(context.Context) (int64, error) { return n.Load(), nil }
	return nil
}

// devsimSummary is the part of devsim's JSON summary the harness reads.
type devsimSummary struct {
	Connected      int64   `json:"connected"`
	Sent           int64   `json:"sent"`
	Acked          int64   `json:"acknowledged"`
	PublishErrors  int64   `json:"publish_errors"`
	Commands       int64   `json:"commands_received"`
	PublishSeconds float64 `json:"publish_seconds"`
	Rate           float64 `json:"rate"`
	FirstPublish   int64   `json:"first_publish_unix_ns"`
	LastDone       int64   `json:"last_done_unix_ns"`
	AckLatency     latency `json:"ack_latency"`
	CommandLatency latency `json:"command_latency"`
	FirstError     string  `json:"first_error"`
}

type latency struct {
	N   int64   `json:"n"`
	P50 float64 `json:"p50_ms"`
	P90 float64 `json:"p90_ms"`
	P99 float64 `json:"p99_ms"`
	Max float64 `json:"max_ms"`
}

func (l latency) extra() map[string]float64 {
	return map[string]float64{"p50_ms": l.P50, "p90_ms": l.P90, "p99_ms": l.P99, "max_ms": l.Max}
}

// devsimRun is a started devsim.
type devsimRun struct {
	proc      *proc
	out       string
	connected chan struct{}
}

// startDevsim starts devsim against url with args (device selection and load); connected is closed when
// devsim reports that every device has connected.
func (h *harness) startDevsim(ctx context.Context, url string, args ...string) (*devsimRun, error) {
	dir, err := h.dir("devsim")
	if err != nil {
		return nil, err
	}
	r := &devsimRun{out: filepath.Join(dir, "summary.json"), connected: make(chan struct{})}
	var once sync.Once
	all := append([]string{"--broker", url, "--json", r.out}, args...)
	r.proc, err = h.start(ctx, "devsim", h.bins.Devsim, all, func(line string) {
		if strings.Contains(line, "devsim: connected ") {
			once.Do(func() { close(r.connected) })
		}
	})
	if err != nil {
		return nil, err
	}
	return r, nil
}

// wait waits for devsim to end and reads its summary.
func (r *devsimRun) wait(ctx context.Context) (devsimSummary, error) {
	var s devsimSummary
	if err := r.proc.Wait(ctx); err != nil {
		return s, err
	}
	data, err := os.ReadFile(r.out)
	if err != nil {
		return s, fmt.Errorf("devsim summary: %w", err)
	}
	if err := json.Unmarshal(data, &s); err != nil {
		return s, fmt.Errorf("devsim summary: %w", err)
	}
	return s, nil
}

// runDevsim runs devsim to the end.
func (h *harness) runDevsim(ctx context.Context, url string, args ...string) (devsimSummary, error) {
	r, err := h.startDevsim(ctx, url, args...)
	if err != nil {
		return devsimSummary{}, err
	}
	return r.wait(ctx)
}

// genRegistry runs devsim gen-devices into the work directory and returns the registry and password files.
// Hashes use bcrypt cost 4 so that thousands of devices are generated and authenticated in seconds; the cost
// of a login is not what these benchmarks measure.
func (h *harness) genRegistry(ctx context.Context, n int, kinds string) (registry, passwords string, err error) {
	dir, err := h.dir("registry")
	if err != nil {
		return "", "", err
	}
	registry = filepath.Join(dir, "devices.yaml")
	cmd := exec.CommandContext(ctx, h.bins.Devsim, "gen-devices", strconv.Itoa(n), "--out", registry,
		"--kinds", kinds, "--bcrypt-cost", "4", "--prefix", "dev")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("devsim gen-devices: %w\n%s", err, out)
	}
	return registry, registry + ".passwords", nil
}

// settle polls the system's received count until it reaches want or stops changing for quiet, and returns the
// count and when it last changed.
func settle(ctx context.Context, s *sut, want int64, quiet, timeout time.Duration) (int64, time.Time, error) {
	deadline := time.Now().Add(timeout)
	last, err := s.received(ctx)
	if err != nil {
		return 0, time.Time{}, err
	}
	changed := time.Now()
	for last < want && time.Since(changed) < quiet && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return last, changed, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
		n, err := s.received(ctx)
		if err != nil {
			return last, changed, err
		}
		if n != last {
			last, changed = n, time.Now()
		}
	}
	return last, changed, nil
}
