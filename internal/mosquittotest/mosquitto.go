package mosquittotest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/freeport"
)

// Binary is where Debian's mosquitto package installs the broker; PATH is searched when it is not there.
const Binary = "/usr/sbin/mosquitto"

// startTimeout bounds the wait for a started broker to accept connections.
const startTimeout = 10 * time.Second

// Broker is a mosquitto process of the test's own, listening on 127.0.0.1 at a port chosen once: Stop kills it,
// Start brings it back on the same port with the same persistence directory. The test's cleanup kills it.
type Broker struct {
	t     testing.TB
	bin   string
	dir   string
	conf  string
	log   string
	db    string
	port  int
	extra []string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// Find returns the path of the mosquitto binary, or "" when it is not installed.
func Find() string {
	if st, err := os.Stat(Binary); err == nil && !st.IsDir() {
		return Binary
	}
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p
	}
	return ""
}

// Start starts a mosquitto of the test's own on a free 127.0.0.1 port and waits until it accepts connections.
// The configuration allows anonymous clients, keeps persistence in a directory under t.TempDir() and does not
// limit queued or in-flight messages (so a message acknowledged to a publisher has been written to every
// connected subscriber's socket, or queued for an offline persistent one). Each extra string is appended to the
// configuration as one line. The test is skipped when mosquitto is not installed; it fails when the broker
// does not start.
func Start(t testing.TB, extra ...string) *Broker {
	t.Helper()
	b, err := TryStart(t, extra...)
	if err != nil {
		t.Fatalf("mosquittotest: %v", err)
	}
	return b
}

// TryStart is Start for configurations the installed broker may refuse (a feature it was built without, a port
// of an extra listener that is taken): when the broker does not start, it returns an error that ends with the
// tail of the broker's log instead of failing the test. The test is still skipped when mosquitto is not
// installed, and fails on errors that are not the broker's (a directory or file that cannot be written).
func TryStart(t testing.TB, extra ...string) (*Broker, error) {
	t.Helper()
	bin := Find()
	if bin == "" {
		t.Skip("mosquitto is not installed (Debian: apt-get install mosquitto); skipping the test that needs its own broker")
	}
	dir := t.TempDir()
	b := &Broker{
		t:     t,
		bin:   bin,
		dir:   dir,
		conf:  filepath.Join(dir, "mosquitto.conf"),
		log:   filepath.Join(dir, "mosquitto.log"),
		db:    filepath.Join(dir, "data", "mosquitto.db"),
		extra: extra,
	}
	if err := os.MkdirAll(filepath.Dir(b.db), 0o700); err != nil {
		t.Fatalf("mosquittotest: %v", err)
	}
	t.Cleanup(func() {
		b.kill()
		if t.Failed() {
			t.Logf("mosquittotest: broker log (%s):\n%s", b.log, tail(b.Log(), 40))
		}
	})
	// A port found free may be taken before mosquitto binds it; try a few.
	var err error
	for range 5 {
		if b.port, err = freePort(); err != nil {
			t.Fatalf("mosquittotest: %v", err)
		}
		if err = b.writeConfig(); err != nil {
			t.Fatalf("mosquittotest: %v", err)
		}
		if err = b.start(); err == nil {
			return b, nil
		}
	}
	return nil, fmt.Errorf("start: %w\n%s", err, tail(b.Log(), 20))
}

// Addr is the broker's host:port (127.0.0.1 and the port chosen at Start).
func (b *Broker) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(b.port)) }

// URL is the broker's address as an MQTT URL for paho: tcp://127.0.0.1:PORT.
func (b *Broker) URL() string { return "tcp://" + b.Addr() }

// Port is the broker's TCP port.
func (b *Broker) Port() int { return b.port }

// Dir is the broker's directory: its configuration, log and persistence live there.
func (b *Broker) Dir() string { return b.dir }

// Running reports whether the broker process is alive.
func (b *Broker) Running() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd == nil {
		return false
	}
	select {
	case <-b.exited:
		return false
	default:
		return true
	}
}

// Stop kills the broker with SIGKILL (no goodbye, nothing saved) and waits until the process is gone.
func (b *Broker) Stop() {
	b.t.Helper()
	b.kill()
}

// Start starts the broker again on the same port with the same configuration and persistence, and waits until
// it accepts connections. It fails the test when the broker does not come up.
func (b *Broker) Start() {
	b.t.Helper()
	if b.Running() {
		return
	}
	var err error
	// The port was ours a moment ago; give the kernel a little time should it still be held.
	deadline := time.Now().Add(startTimeout)
	for {
		if err = b.start(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("mosquittotest: restart on port %d: %v\n%s", b.port, err, tail(b.Log(), 20))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Save makes the broker write its persistence file now (SIGUSR1) and waits until the new file is in place.
// After Save, a Stop and Start keep the sessions and subscriptions that existed at the time of the Save.
func (b *Broker) Save() {
	b.t.Helper()
	b.mu.Lock()
	cmd := b.cmd
	b.mu.Unlock()
	if cmd == nil || !b.Running() {
		b.t.Fatalf("mosquittotest: save: broker is not running")
	}
	sig := saveSignal()
	if sig == nil {
		b.t.Fatalf("mosquittotest: save: mosquitto has no signal to save its persistence file on this system")
	}
	before, _ := os.Stat(b.db)
	if err := cmd.Process.Signal(sig); err != nil {
		b.t.Fatalf("mosquittotest: save: %v", err)
	}
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		after, err := os.Stat(b.db)
		if err == nil && (before == nil || !os.SameFile(before, after) || !after.ModTime().Equal(before.ModTime())) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.t.Fatalf("mosquittotest: save: %s was not written\n%s", b.db, tail(b.Log(), 20))
}

// Log returns what the broker has logged so far.
func (b *Broker) Log() string {
	data, err := os.ReadFile(b.log)
	if err != nil {
		return ""
	}
	return string(data)
}

func (b *Broker) writeConfig() error {
	var cfg bytes.Buffer
	fmt.Fprintf(&cfg, "# written by mosquittotest\n")
	fmt.Fprintf(&cfg, "listener %d 127.0.0.1\n", b.port)
	fmt.Fprintf(&cfg, "allow_anonymous true\n")
	fmt.Fprintf(&cfg, "persistence true\n")
	fmt.Fprintf(&cfg, "persistence_location %s/\n", filepath.Dir(b.db))
	fmt.Fprintf(&cfg, "persistence_file %s\n", filepath.Base(b.db))
	fmt.Fprintf(&cfg, "autosave_interval 0\n")
	fmt.Fprintf(&cfg, "max_queued_messages 0\n")
	fmt.Fprintf(&cfg, "max_inflight_messages 0\n")
	fmt.Fprintf(&cfg, "log_dest file %s\n", b.log)
	fmt.Fprintf(&cfg, "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n")
	fmt.Fprintf(&cfg, "log_timestamp_format %%H:%%M:%%S\n")
	if os.Geteuid() == 0 {
		// mosquitto drops root privileges to the "mosquitto" user unless told otherwise; that user could not
		// write to the test's directory.
		if u, err := user.Current(); err == nil {
			fmt.Fprintf(&cfg, "user %s\n", u.Username)
		}
	}
	for _, line := range b.extra {
		fmt.Fprintln(&cfg, line)
	}
	return os.WriteFile(b.conf, cfg.Bytes(), 0o600)
}

// start runs the broker and waits until it accepts connections or exits.
func (b *Broker) start() error {
	out, err := os.OpenFile(b.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(b.bin, "-c", b.conf)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		_ = out.Close()
		return fmt.Errorf("run %s: %w", b.bin, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		_ = out.Close()
		close(exited)
	}()
	b.mu.Lock()
	b.cmd, b.exited = cmd, exited
	b.mu.Unlock()

	deadline := time.Now().Add(startTimeout)
	for {
		select {
		case <-exited:
			return fmt.Errorf("mosquitto exited: %s", cmd.ProcessState)
		default:
		}
		c, err := net.DialTimeout("tcp", b.Addr(), time.Second)
		if err == nil {
			_ = c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			b.kill()
			return fmt.Errorf("mosquitto did not accept connections on %s within %s", b.Addr(), startTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (b *Broker) kill() {
	b.mu.Lock()
	cmd, exited := b.cmd, b.exited
	b.cmd = nil
	b.mu.Unlock()
	if cmd == nil {
		return
	}
	if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		b.t.Logf("mosquittotest: kill: %v", err)
	}
	<-exited
}

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) { return freeport.Get() }

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
