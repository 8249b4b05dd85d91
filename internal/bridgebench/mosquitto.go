//go:build unix

package bridgebench

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
)

// MosquittoBinary is where Debian's mosquitto package installs the broker; PATH is searched when it is not
// there.
const MosquittoBinary = "/usr/sbin/mosquitto"

// FindMosquitto returns the path of the mosquitto binary, or "" when it is not installed.
func FindMosquitto() string {
	if st, err := os.Stat(MosquittoBinary); err == nil && !st.IsDir() {
		return MosquittoBinary
	}
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p
	}
	return ""
}

// mosquitto is a broker process of the run's own on a port chosen once; stop and start keep the port and the
// persistence directory.
type mosquitto struct {
	name  string
	bin   string
	dir   string
	port  int
	extra []string
	proc  *process
}

// newMosquitto writes the configuration of a broker in dir (created) on a free port; extra lines are appended.
func newMosquitto(name, bin, dir string, extra ...string) (*mosquitto, error) {
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	m := &mosquitto{name: name, bin: bin, dir: dir, extra: extra}
	var err error
	if m.port, err = freePort(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if err := m.writeConfig(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return m, nil
}

func (m *mosquitto) addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(m.port)) }
func (m *mosquitto) url() string  { return "tcp://" + m.addr() }
func (m *mosquitto) logPath() string {
	return filepath.Join(m.dir, "mosquitto.log")
}

func (m *mosquitto) writeConfig() error {
	var c bytes.Buffer
	fmt.Fprintf(&c, "listener %d 127.0.0.1\n", m.port)
	fmt.Fprintf(&c, "allow_anonymous true\n")
	fmt.Fprintf(&c, "persistence true\n")
	fmt.Fprintf(&c, "persistence_location %s/\n", filepath.Join(m.dir, "data"))
	fmt.Fprintf(&c, "persistence_file mosquitto.db\n")
	fmt.Fprintf(&c, "log_dest file %s\n", m.logPath())
	fmt.Fprintf(&c, "log_timestamp_format %%H:%%M:%%S\n")
	fmt.Fprintf(&c, "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n")
	if os.Geteuid() == 0 {
		// mosquitto drops root privileges to the "mosquitto" user unless told otherwise; that user could not
		// write to our directory.
		if u, err := user.Current(); err == nil {
			fmt.Fprintf(&c, "user %s\n", u.Username)
		}
	}
	for _, l := range m.extra {
		fmt.Fprintln(&c, l)
	}
	return os.WriteFile(filepath.Join(m.dir, "mosquitto.conf"), c.Bytes(), 0o600)
}

// start runs the broker and waits until it accepts connections.
func (m *mosquitto) start(ctx context.Context) error {
	if m.proc != nil && !m.proc.Exited() {
		return nil
	}
	p, err := startProcess(ctx, m.name, filepath.Join(m.dir, "stderr.log"), m.bin, "-c", filepath.Join(m.dir, "mosquitto.conf"))
	if err != nil {
		return err
	}
	m.proc = p
	if err := waitListening(ctx, p, m.addr(), startTimeout); err != nil {
		p.Kill()
		return fmt.Errorf("%w\n%s", err, tailFile(m.logPath(), 10))
	}
	return nil
}

// stop ends the broker with SIGTERM, so it writes its persistence file; it is killed if it does not exit in
// time.
func (m *mosquitto) stop() {
	if m.proc != nil {
		m.proc.Stop(startTimeout)
	}
}

// kill ends the broker with SIGKILL (nothing saved).
func (m *mosquitto) kill() {
	if m.proc != nil {
		m.proc.Kill()
	}
}
