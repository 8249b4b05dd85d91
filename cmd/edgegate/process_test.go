package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"golang.org/x/crypto/bcrypt"

	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/internal/eventually"
	"github.com/edgegate/edgegate/internal/testpki"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// binary builds the edgegate command once per test run.
func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "edgegate-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "edgegate")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		_ = os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// proc is a running edgegate process.
type proc struct {
	cmd   *exec.Cmd
	mqtt  string
	http  string
	mu    sync.Mutex
	lines []string
	exit  chan error
}

var readyRE = regexp.MustCompile(`msg=ready mqtt=(\S+) http=(\S+)`)

// startDaemon runs `edgegate run --config cfg` and waits for its ready log line.
func startDaemon(t *testing.T, cfg string, env ...string) *proc {
	t.Helper()
	d := &proc{exit: make(chan error, 1)}
	d.cmd = exec.Command(binary(t), "run", "--config", cfg)
	d.cmd.Env = append(os.Environ(), env...)
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan [2]string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			d.mu.Lock()
			d.lines = append(d.lines, line)
			d.mu.Unlock()
			if m := readyRE.FindStringSubmatch(line); m != nil {
				ready <- [2]string{m[1], m[2]}
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
	select {
	case a := <-ready:
		d.mqtt, d.http = a[0], a[1]
	case err := <-d.exit:
		t.Fatalf("edgegate exited before ready: %v\n%s", err, d.log())
	case <-time.After(20 * time.Second):
		t.Fatalf("edgegate not ready within 20s\n%s", d.log())
	}
	return d
}

func (d *proc) log() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return strings.Join(d.lines, "\n")
}

// metrics returns the daemon's /metrics page.
func (d *proc) metrics(t *testing.T) string {
	t.Helper()
	resp, err := http.Get("http://" + d.http + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

// waitLog waits until a log line contains s.
func (d *proc) waitLog(t *testing.T, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if strings.Contains(d.log(), s) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no log line with %q within %s\n%s", s, timeout, d.log())
}

// wait waits for the process to exit and returns its error.
func (d *proc) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case err := <-d.exit:
		return err
	case <-time.After(timeout):
		t.Fatalf("edgegate did not exit within %s\n%s", timeout, d.log())
		return nil
	}
}

func TestReadyAfterBindAndCleanStop(t *testing.T) {
	sockPath := filepath.Join(t.TempDir(), "notify.sock")
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	// The watchdog's WATCHDOG=1 notifications (every 100 ms for WatchdogSec=200ms) are counted apart.
	msgs := make(chan string, 16)
	var fed atomic.Int64
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := sock.ReadFromUnix(buf)
			if err != nil {
				close(msgs)
				return
			}
			if m := string(buf[:n]); m == "WATCHDOG=1" {
				fed.Add(1)
			} else {
				msgs <- m
			}
		}
	}()

	cfg, _ := writeConfig(t, "shutdown_timeout: 5s\n")
	d := startDaemon(t, cfg, "NOTIFY_SOCKET="+sockPath, "WATCHDOG_USEC=200000")
	select {
	case m := <-msgs:
		if !strings.Contains(m, "READY=1") {
			t.Fatalf("first notification %q, want READY=1", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no READY=1 notification")
	}
	n := fed.Load()
	if !eventually.Within(10*time.Second, func() bool { return fed.Load() >= n+3 }) {
		t.Fatalf("%d WATCHDOG=1 notifications in 10s after READY, want one every 100ms\n%s", fed.Load()-n, d.log())
	}
	// The garbage collector runs at the daemon's default GOGC unless the environment sets one.
	wantGC := "300"
	if v, ok := os.LookupEnv("GOGC"); ok {
		wantGC = v
	}
	metrics := d.metrics(t)
	if !strings.Contains(metrics, "\ngo_gc_gogc_percent "+wantGC+"\n") {
		t.Errorf("/metrics does not show go_gc_gogc_percent %s", wantGC)
	}
	// READY means the listeners are bound: both answer at once.
	for _, addr := range []string{d.mqtt, d.http} {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			t.Fatalf("READY was sent but %s does not accept: %v", addr, err)
		}
		c.Close()
	}

	start := time.Now()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := d.wait(t, 10*time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v (want status 0)\n%s", err, d.log())
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("stop took %s, longer than shutdown_timeout 5s", took)
	}
	select {
	case m := <-msgs:
		if !strings.Contains(m, "STOPPING=1") {
			t.Errorf("notification after SIGTERM %q, want STOPPING=1", m)
		}
	case <-time.After(time.Second):
		t.Error("no STOPPING=1 notification")
	}
	for _, want := range []string{"stopping", "log closed"} {
		if !strings.Contains(d.log(), want) {
			t.Errorf("log has no %q line:\n%s", want, d.log())
		}
	}
}

func TestPortInUseNamesTheKey(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg, _ := writeConfig(t, "")
	data, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	data = bytes.Replace(data, []byte("listen: 127.0.0.1:0\nhttp"), []byte("listen: "+ln.Addr().String()+"\nhttp"), 1)
	if err := os.WriteFile(cfg, data, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(binary(t), "run", "--config", cfg).CombinedOutput()
	if err == nil {
		t.Fatalf("started on a port in use:\n%s", out)
	}
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	for _, want := range []string{"port " + port + " is already in use", "mqtt.listen"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("error does not say %q:\n%s", want, out)
		}
	}
}

func TestSIGHUPReloadsRulesAndDevices(t *testing.T) {
	rulesDir := t.TempDir()
	write := func(body string) {
		if err := os.WriteFile(filepath.Join(rulesDir, "r.yaml"), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("rules:\n  - name: first\n    on: {type: a.b}\n    actions:\n      - state: {key: seen, value: '1'}\n")
	cfg, _ := writeConfig(t, "")
	data, _ := os.ReadFile(cfg)
	data = regexp.MustCompile(`(?m)^  dir: .*$`).ReplaceAll(data, []byte("  dir: "+rulesDir+"\n  watch: false"))
	// The registry is a copy, to which a device is added below.
	registry := filepath.Join(t.TempDir(), "devices.yaml")
	shipped, err := os.ReadFile(filepath.Join(repo, "configs/devices.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(registry, shipped, 0o600); err != nil {
		t.Fatal(err)
	}
	data = regexp.MustCompile(`(?m)^  registry: .*$`).ReplaceAll(data, []byte("  registry: "+registry))
	if err := os.WriteFile(cfg, data, 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, cfg)

	rulesNow := func() []string {
		var st struct {
			Rules []struct{ Name string } `json:"rules"`
		}
		code, out, errOut := runCmd(t, "status", "--addr", d.http, "--json")
		if code != 0 {
			t.Fatalf("status: exit %d: %s", code, errOut)
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("status --json: %v\n%s", err, out)
		}
		var names []string
		for _, r := range st.Rules {
			names = append(names, r.Name)
		}
		return names
	}
	if got := rulesNow(); len(got) != 1 || got[0] != "first" {
		t.Fatalf("rules at start %v, want [first]", got)
	}

	write("rules:\n  - name: second\n    on: {type: a.b}\n    actions:\n      - state: {key: seen, value: '2'}\n")
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.waitLog(t, "rules reloaded", 5*time.Second)
	if got := rulesNow(); len(got) != 1 || got[0] != "second" {
		t.Fatalf("rules after SIGHUP %v, want [second]", got)
	}

	// The registry is read again too: a device added to it logs in without a restart.
	hash, err := bcrypt.GenerateFromPassword([]byte("pantry-sensor-pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	added := fmt.Appendf(slices.Clone(shipped), "\n  - id: pantry-sensor\n    password_hash: %q\n", hash)
	if err := os.WriteFile(registry, added, 0o600); err != nil {
		t.Fatal(err)
	}
	pantry := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + d.mqtt).SetClientID("pantry-sensor").
		SetUsername("pantry-sensor").SetPassword("pantry-sensor-pw").SetAutoReconnect(false))
	if tok := pantry.Connect(); tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
		t.Fatal("pantry-sensor logged in before the registry was reloaded")
	}
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually.True(t, 5*time.Second, "the second registry reload", func() bool {
		return strings.Count(d.log(), "device registry reloaded") == 2 // the first came with the rules above
	})
	if tok := pantry.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("pantry-sensor cannot log in after the registry was reloaded: %v", tok.Error())
	}
	pantry.Disconnect(0)

	// A broken file keeps the rules in force and says where the mistake is.
	write("rules:\n  - name: third\n    on: {type: a.b}\n    actions:\n      - explode: {}\n")
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.waitLog(t, "rules reload failed", 5*time.Second)
	if !strings.Contains(d.log(), "r.yaml:") {
		t.Errorf("reload error does not name the file and line:\n%s", d.log())
	}
	if got := rulesNow(); len(got) != 1 || got[0] != "second" {
		t.Fatalf("rules after a bad reload %v, want [second] kept", got)
	}
}

// connectThermo connects the device thermo-1 to the daemon's MQTT listener; it disconnects when the test ends.
func connectThermo(t *testing.T, d *proc) paho.Client {
	t.Helper()
	opts := paho.NewClientOptions().AddBroker("tcp://" + d.mqtt).SetClientID("thermo-1").
		SetUsername("thermo-1").SetPassword("thermo-1-pw").SetAutoReconnect(false).SetConnectRetry(false)
	cl := paho.NewClient(opts)
	if tok := cl.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("connect: %v", tok.Error())
	}
	t.Cleanup(func() { cl.Disconnect(0) })
	return cl
}

// TestKill9KeepsAcknowledgedEvents publishes QoS 1 events while the gateway is killed with SIGKILL: every event
// the device got a PUBACK for is in the log after the restart.
func TestKill9KeepsAcknowledgedEvents(t *testing.T) {
	cfg, _ := writeConfig(t, "")
	d := startDaemon(t, cfg)

	cl := connectThermo(t, d)

	var (
		mu    sync.Mutex
		acked []int
	)
	killed, giveUp := make(chan struct{}), make(chan struct{})
	go func() {
		// Kill once a few hundred events are acknowledged, while more are in flight.
		for {
			mu.Lock()
			n := len(acked)
			mu.Unlock()
			if n >= 300 {
				break
			}
			select {
			case <-giveUp:
				return
			case <-time.After(time.Millisecond):
			}
		}
		_ = d.cmd.Process.Signal(syscall.SIGKILL)
		close(killed)
	}()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32) // publishes in flight
	deadline := time.Now().Add(20 * time.Second)
publish:
	for i := 0; i < 5000 && time.Now().Before(deadline); i++ {
		select {
		case <-killed:
			break publish
		case sem <- struct{}{}:
		}
		wg.Add(1)
		tok := cl.Publish("devices/thermo-1/telemetry/temperature", 1, false, fmt.Sprintf(`{"seq":%d}`, i))
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			if tok.WaitTimeout(5*time.Second) && tok.Error() == nil {
				mu.Lock()
				acked = append(acked, i)
				mu.Unlock()
			}
		}(i)
	}
	select {
	case <-killed:
	case <-time.After(30 * time.Second): // every publish has been answered or timed out by now
		close(giveUp)
		mu.Lock()
		n := len(acked)
		mu.Unlock()
		t.Fatalf("%d publishes acknowledged, fewer than the 300 the kill waits for", n)
	}
	_ = d.wait(t, 10*time.Second)
	wg.Wait()

	// The log after the crash: every acknowledged seq is there.
	exp := filepath.Join(t.TempDir(), "after.jsonl")
	if code, _, errOut := runCmd(t, "backlog", "export", "--config", cfg, "--out", exp); code != 0 {
		t.Fatalf("export after kill -9: exit %d: %s", code, errOut)
	}
	raw, err := os.ReadFile(exp)
	if err != nil {
		t.Fatal(err)
	}
	have := map[int]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		var ev struct {
			Type string `json:"type"`
			Data struct {
				Seq *int `json:"seq"`
			} `json:"data"`
		}
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("a record in the log after kill -9 does not parse: %v: %q", err, line)
		}
		if ev.Type == "telemetry.temperature" && ev.Data.Seq != nil {
			have[*ev.Data.Seq] = true
		}
	}
	mu.Lock()
	defer mu.Unlock()
	lost := 0
	for _, s := range acked {
		if !have[s] {
			lost++
		}
	}
	t.Logf("acknowledged %d, in the log %d, lost %d", len(acked), len(have), lost)
	if len(acked) < 300 {
		t.Fatalf("only %d acknowledged before the kill", len(acked))
	}
	if lost != 0 {
		t.Fatalf("%d acknowledged events are not in the log after kill -9", lost)
	}

	// The gateway starts again on the same data and keeps appending after the last event.
	d2 := startDaemon(t, cfg)
	_ = d2.cmd.Process.Signal(syscall.SIGTERM)
	if err := d2.wait(t, 10*time.Second); err != nil {
		t.Fatalf("restart after kill -9: %v\n%s", err, d2.log())
	}
}

func TestPasswdHashesStdin(t *testing.T) {
	for _, algo := range []string{"bcrypt", "argon2id"} {
		t.Run(algo, func(t *testing.T) {
			cmd := exec.Command(binary(t), "passwd", "--algo", algo)
			cmd.Stdin = strings.NewReader("s3cret-pw\n")
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("passwd: %v", err)
			}
			hash := strings.TrimSpace(string(out))
			for pw, want := range map[string]bool{"s3cret-pw": true, "s3cret-pW": false} {
				ok, err := devices.VerifyPassword(hash, []byte(pw))
				if err != nil || ok != want {
					t.Errorf("VerifyPassword(%q, %q) = %v, %v; want %v", hash, pw, ok, err, want)
				}
			}
		})
	}
	cmd := exec.Command(binary(t), "passwd")
	cmd.Stdin = strings.NewReader("\n")
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "empty password") {
		t.Fatalf("an empty password was hashed: %v %s", err, out)
	}
}

// TestStatusShowsSinks runs the gateway with a sink whose upstream does not answer: `edgegate status` shows one
// row per sink and priority lane, the sink unhealthy with the events published since it started as its backlog
// and its last error with its age.
func TestStatusShowsSinks(t *testing.T) {
	// Port 1: nothing listens there, so every connection attempt is refused. (A port closed again after a
	// listener had it could be bound by a test running alongside before the sink dials it.)
	upstream := "127.0.0.1:1"
	cfg, _ := writeConfig(t, fmt.Sprintf(`forward:
  sinks:
    - name: cloud
      type: mqtt
      priority_lanes: [5]
      backoff_min: 50ms
      backoff_max: 200ms
      mqtt:
        url: tcp://%s
        connect_timeout: 1s
`, upstream))
	d := startDaemon(t, cfg)

	cl := connectThermo(t, d)
	const published = 7
	for i := range published {
		tok := cl.Publish("devices/thermo-1/telemetry/temperature", 1, false, fmt.Sprintf(`{"seq":%d}`, i))
		if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %d: %v", i, tok.Error())
		}
	}

	// SINK TYPE TARGET STATE BACKLOG OLDEST-WAITING IN-FLIGHT LAST-ACK LAST-ERROR
	row := regexp.MustCompile(`(?m)^cloud +mqtt +tcp://` + regexp.QuoteMeta(upstream) +
		` +(\S.*?) {2,}(\S+) +(.+?) {2,}(\d+) +(never|\S+ ago) +(.*)$`)
	status := func() (string, []string) {
		out, err := exec.Command(binary(t), "status", "--addr", d.http).CombinedOutput()
		if err != nil {
			t.Fatalf("status: %v\n%s", err, out)
		}
		return string(out), row.FindStringSubmatch(string(out))
	}
	var (
		out string
		m   []string
	)
	defer func() {
		if t.Failed() {
			t.Logf("last edgegate status:\n%s", out)
		}
	}()
	eventually.True(t, 10*time.Second, "a row for sink cloud with a backlog and a last error", func() bool {
		out, m = status()
		return m != nil && m[2] != "0" && m[6] != "-"
	})
	t.Logf("edgegate status:\n%s", out)
	state, backlog, oldest, lastAck, lastErr := m[1], m[2], m[3], m[5], m[6]
	if state != "unhealthy (disconnected)" {
		t.Errorf("state %q, want unhealthy (disconnected):\n%s", state, out)
	}
	if n, err := strconv.Atoi(backlog); err != nil || n < published {
		t.Errorf("backlog %q, want at least the %d published events:\n%s", backlog, published, out)
	}
	if !regexp.MustCompile(`^\d+(\.\d+)?[a-z]+ ago$`).MatchString(oldest) {
		t.Errorf("oldest waiting event %q, want its age:\n%s", oldest, out)
	}
	if lastAck != "never" {
		t.Errorf("last ack %q, want never:\n%s", lastAck, out)
	}
	if !regexp.MustCompile(`^\d+[a-z]+ ago: .*refused`).MatchString(lastErr) {
		t.Errorf("last error %q, want its age and the refused connection:\n%s", lastErr, out)
	}
	for _, want := range []string{"healthy=false", "problem: sink cloud unhealthy", "\ncloud@p5 ", "log: "} {
		if !strings.Contains(out, want) {
			t.Errorf("status does not show %q:\n%s", want, out)
		}
	}

	// --json keeps the API's document.
	raw, err := exec.Command(binary(t), "status", "--addr", d.http, "--json").Output()
	if err != nil {
		t.Fatalf("status --json: %v", err)
	}
	var st struct {
		Healthy bool `json:"healthy"`
		Sinks   []struct {
			Name      string `json:"name"`
			Healthy   bool   `json:"healthy"`
			LastError string `json:"last_error"`
		} `json:"sinks"`
		Backlog struct {
			Events int64 `json:"events"`
		} `json:"backlog"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, raw)
	}
	if st.Healthy || len(st.Sinks) != 2 || st.Sinks[0].Name != "cloud" || st.Sinks[0].Healthy ||
		st.Sinks[0].LastError == "" || st.Backlog.Events < published {
		t.Errorf("status --json: %s", raw)
	}
}

// crashDevices publish concurrently in TestKill9ManyDevicesRestartTwice; each may publish under devices/{id}/ with
// the password {id}-pw (configs/devices.yaml).
var crashDevices = []string{"thermo-1", "kitchen-motion", "kitchen-light-1", "hall-motion", "hall-light"}

// crashRound is what the devices published to one gateway process until it was killed.
type crashRound struct {
	acked map[string][]int // per device, the seqs a PUBACK came back for
	next  map[string]int   // per device, one more than the highest seq published
	lost  int              // publishes without an acknowledgement (in flight at the kill)
}

// publishUntilKilled connects every device of crashDevices to d and has each publish QoS 1 events with seqs
// counting up from from[device], several in flight at a time, until d is killed with SIGKILL. The kill comes once
// each device has some events acknowledged and together they have at least minAcked, while all keep publishing.
func publishUntilKilled(t *testing.T, d *proc, from map[string]int, minAcked int) crashRound {
	t.Helper()
	clients := make(map[string]paho.Client, len(crashDevices))
	for _, id := range crashDevices {
		opts := paho.NewClientOptions().AddBroker("tcp://" + d.mqtt).SetClientID(id).
			SetUsername(id).SetPassword(id + "-pw").SetAutoReconnect(false).SetConnectRetry(false)
		cl := paho.NewClient(opts)
		if tok := cl.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("connect %s: %v", id, tok.Error())
		}
		defer cl.Disconnect(0)
		clients[id] = cl
	}

	var mu sync.Mutex
	r := crashRound{acked: map[string][]int{}, next: map[string]int{}}
	killed := make(chan struct{})
	var wg sync.WaitGroup
	for _, id := range crashDevices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var inflight sync.WaitGroup
			defer inflight.Wait()
			sem := make(chan struct{}, 16) // publishes in flight for this device
			topic := "devices/" + id + "/telemetry/temperature"
			for seq := from[id]; ; seq++ {
				select {
				case <-killed:
					return
				case sem <- struct{}{}:
				}
				tok := clients[id].Publish(topic, 1, false, fmt.Sprintf(`{"seq":%d}`, seq))
				mu.Lock()
				r.next[id] = seq + 1
				mu.Unlock()
				inflight.Add(1)
				go func() {
					defer inflight.Done()
					defer func() { <-sem }()
					ok := tok.WaitTimeout(5*time.Second) && tok.Error() == nil
					mu.Lock()
					defer mu.Unlock()
					if ok {
						r.acked[id] = append(r.acked[id], seq)
					} else {
						r.lost++
					}
				}()
			}
		}()
	}

	var total, least int
	if !eventually.Within(10*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		total, least = 0, -1
		for _, id := range crashDevices {
			n := len(r.acked[id])
			total += n
			if least < 0 || n < least {
				least = n
			}
		}
		return total >= minAcked && least >= 20
	}) {
		close(killed)
		wg.Wait()
		t.Fatalf("only %d events acknowledged (the slowest device %d) within 10s\n%s", total, least, d.log())
	}
	if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	close(killed)
	if err := d.wait(t, 10*time.Second); err == nil {
		t.Fatal("the gateway exited with status 0 after SIGKILL")
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	for _, id := range crashDevices {
		slices.Sort(r.acked[id])
	}
	return r
}

// stopAndExport stops d with SIGTERM, which must end it cleanly, and exports its log with `backlog export`: per
// device, the seqs of its events in the log's order, and the number of events in the log.
func stopAndExport(t *testing.T, d *proc, cfg string) (map[string][]int, int) {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := d.wait(t, 10*time.Second); err != nil {
		t.Fatalf("stop after a restart: %v\n%s", err, d.log())
	}
	code, out, errOut := runCmd(t, "backlog", "export", "--config", cfg)
	if code != 0 {
		t.Fatalf("export: exit %d: %s", code, errOut)
	}
	seqs := map[string][]int{}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for _, line := range lines {
		var ev struct {
			Type    string `json:"type"`
			Subject string `json:"subject"`
			Data    struct {
				Seq *int `json:"seq"`
			} `json:"data"`
		}
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("a record in the log does not parse: %v: %q", err, line)
		}
		if ev.Type == "telemetry.temperature" && ev.Data.Seq != nil {
			seqs[ev.Subject] = append(seqs[ev.Subject], *ev.Data.Seq)
		}
	}
	return seqs, len(lines)
}

// statusEvents returns the number of events in the log of the running gateway d, from its status API.
func statusEvents(t *testing.T, d *proc) int {
	t.Helper()
	code, out, errOut := runCmd(t, "status", "--addr", d.http, "--json")
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut)
	}
	var st struct {
		Backlog struct {
			Events *int `json:"events"`
		} `json:"backlog"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Backlog.Events == nil {
		t.Fatalf("status --json has no backlog events (%v):\n%s", err, out)
	}
	return *st.Backlog.Events
}

// checkCrashLog checks the devices' events in the log (per device, seqs in the log's order) against the rounds
// published before: every acknowledged event is there, no event is there twice, each device's events are in the
// order it published them, and nothing is there that was not published.
func checkCrashLog(t *testing.T, have map[string][]int, rounds ...crashRound) {
	t.Helper()
	for id := range have {
		if !slices.Contains(crashDevices, id) {
			t.Errorf("the log has telemetry of %q, which did not publish", id)
		}
	}
	for _, id := range crashDevices {
		seqs := have[id]
		for i := 1; i < len(seqs); i++ {
			if seqs[i] <= seqs[i-1] {
				t.Errorf("%s: seq %d follows seq %d in the log: duplicated or out of order", id, seqs[i], seqs[i-1])
			}
		}
		next := 0
		for _, r := range rounds {
			next = max(next, r.next[id])
		}
		if len(seqs) > 0 && seqs[len(seqs)-1] >= next {
			t.Errorf("%s: the log has seq %d, but the device published only up to %d", id, seqs[len(seqs)-1], next-1)
		}
		var missing []int
		for _, r := range rounds {
			for _, s := range r.acked[id] {
				if _, ok := slices.BinarySearch(seqs, s); !ok {
					missing = append(missing, s)
				}
			}
		}
		if len(missing) > 0 {
			t.Errorf("%s: %d acknowledged events are not in the log, seqs %v", id, len(missing), missing[:min(len(missing), 20)])
		}
	}
}

// TestKill9ManyDevicesRestartTwice kills the gateway with SIGKILL while several devices publish QoS 1 events at
// once, twice, each time restarting it on the same data: through the restarted gateway every acknowledged event
// is in the log exactly once, each device's events in the order it published them, and the second crash keeps the
// events of the first round as they were.
func TestKill9ManyDevicesRestartTwice(t *testing.T) {
	cfg, _ := writeConfig(t, "")

	// Round 1: the devices publish until the gateway is killed; it restarts on the same data.
	first := publishUntilKilled(t, startDaemon(t, cfg), map[string]int{}, 300)
	d := startDaemon(t, cfg)
	inStatus := statusEvents(t, d)
	have1, inLog := stopAndExport(t, d, cfg)
	checkCrashLog(t, have1, first)
	if inStatus != inLog {
		t.Errorf("the restarted gateway's status shows %d events, its log holds %d", inStatus, inLog)
	}

	// Round 2 continues each device's seqs on a gateway started on the same data, killed again.
	second := publishUntilKilled(t, startDaemon(t, cfg), first.next, 300)
	d = startDaemon(t, cfg)
	inStatus = statusEvents(t, d)
	have2, inLog := stopAndExport(t, d, cfg)
	checkCrashLog(t, have2, first, second)
	if inStatus != inLog {
		t.Errorf("the restarted gateway's status shows %d events, its log holds %d", inStatus, inLog)
	}
	for _, id := range crashDevices {
		before := have2[id][:min(len(have2[id]), len(have1[id]))]
		if !slices.Equal(before, have1[id]) {
			t.Errorf("%s: the events of round 1 changed after the second crash: %v, then %v", id, have1[id], before)
		}
	}

	for i, r := range []crashRound{first, second} {
		acked := 0
		for _, id := range crashDevices {
			acked += len(r.acked[id])
		}
		t.Logf("round %d: %d acknowledged, %d without acknowledgement", i+1, acked, r.lost)
	}
	for _, id := range crashDevices {
		t.Logf("%s: %d events after round 1, %d after round 2", id, len(have1[id]), len(have2[id]))
	}
}

// TestSIGHUPReloadsTLSCertificate: the daemon's MQTT TLS listener serves a renewed certificate after SIGHUP.
func TestSIGHUPReloadsTLSCertificate(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key")
	ca := testpki.NewCA(t, "edgegate test CA")
	roots := ca.Pool()
	issue := func(cn string) {
		_, certPEM, keyPEM := ca.Issue(t, cn, true)
		for path, data := range map[string][]byte{certFile: certPEM, keyFile: keyPEM} {
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	issue("gateway-first")
	cfg, _ := writeConfig(t, fmt.Sprintf("mqtt:\n  listen: 127.0.0.1:0\n  tls: {listen: \"127.0.0.1:0\", cert_file: %s, key_file: %s}\n",
		certFile, keyFile))
	data, _ := os.ReadFile(cfg)
	// writeConfig already sets mqtt.listen; the extra mqtt block above replaces that section.
	data = regexp.MustCompile(`(?m)^mqtt:\n  listen: 127.0.0.1:0\nhttp:`).ReplaceAll(data, []byte("http:"))
	if err := os.WriteFile(cfg, data, 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, cfg)
	var tlsAddr string
	tlsRE := regexp.MustCompile(`msg="mqtt listener ready" component=ingest listener=tls addr=(\S+)`)
	eventually.True(t, 5*time.Second, "the TLS listener's address in the log", func() bool {
		m := tlsRE.FindStringSubmatch(d.log())
		if m != nil {
			tlsAddr = m[1]
		}
		return m != nil
	})
	served := func() string {
		t.Helper()
		c, err := tls.Dial("tcp", tlsAddr, &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12})
		if err != nil {
			t.Fatalf("TLS handshake: %v", err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	if got := served(); got != "gateway-first" {
		t.Fatalf("served %q, want gateway-first", got)
	}

	issue("gateway-renewed")
	if got := served(); got != "gateway-first" {
		t.Fatalf("served %q before SIGHUP, want gateway-first", got)
	}
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.waitLog(t, "TLS certificate reloaded", 5*time.Second)
	if got := served(); got != "gateway-renewed" {
		t.Fatalf("served %q after SIGHUP, want gateway-renewed", got)
	}
	metrics := d.metrics(t)
	if want := `edgegate_gateway_reloads_total{result="ok",what="tls"} 1`; !strings.Contains(metrics, want) {
		t.Errorf("/metrics lacks %s", want)
	}
}
