//go:build unix

package bridgebench

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// GatewayPackage is the import path of the daemon BuildGateway builds.
const GatewayPackage = "github.com/edgegate/edgegate/cmd/edgegate"

// BuildGateway builds the edgegate daemon into dir and returns the binary's path. It runs `go build` in the
// current directory, which must be inside the module (as it is for `go test` and for a command run from the
// repository).
func BuildGateway(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "edgegate")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, GatewayPackage)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("build edgegate: %w\n%s", err, out)
	}
	return bin, nil
}

// benchPassword is the MQTT password of every bench device (hashed into the generated registry).
const benchPassword = "bench-pw"

// gatewayID names the gateway in the forward topic.
const gatewayID = "bench"

// gatewayProc is an edgegate process with its generated configuration.
type gatewayProc struct {
	dir        string
	port       int
	httpPort   int
	proc       *process
	configPath string
}

// eventTopicFilter is what the subscriber subscribes to on the cloud broker for the gateway's events: the
// default forward topic edgegate/{gateway}/events/{subject}/{type} and, in batch mode, the default batch topic
// edgegate/{gateway}/batches.
const eventTopicFilter = "edgegate/" + gatewayID + "/#"

// writeGatewayConfig writes the registry of the devices and the configuration of a gateway forwarding to
// cloudURL.
func writeGatewayConfig(dir string, ids []string, cloudURL string, o Options) (*gatewayProc, error) {
	g := &gatewayProc{dir: dir, configPath: filepath.Join(dir, "edgegate.yaml")}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	var err error
	if g.port, err = freePort(); err != nil {
		return nil, err
	}
	if g.httpPort, err = freePort(); err != nil {
		return nil, err
	}
	// The lowest bcrypt cost: the devices' logins are not what is measured (at the default cost they would charge
	// the gateway about half a second of CPU per run).
	hashed, err := bcrypt.GenerateFromPassword([]byte(benchPassword), bcrypt.MinCost)
	hash := string(hashed)
	if err != nil {
		return nil, fmt.Errorf("gateway registry: %w", err)
	}
	var reg bytes.Buffer
	reg.WriteString("devices:\n")
	for _, id := range ids {
		fmt.Fprintf(&reg, "  - id: %s\n    kind: bench\n    password_hash: %q\n", id, hash)
	}
	regPath := filepath.Join(dir, "devices.yaml")
	if err := os.WriteFile(regPath, reg.Bytes(), 0o600); err != nil {
		return nil, fmt.Errorf("gateway registry: %w", err)
	}
	var c bytes.Buffer
	fmt.Fprintf(&c, "id: %s\n", gatewayID)
	fmt.Fprintf(&c, "data_dir: %s\n", filepath.Join(dir, "data"))
	fmt.Fprintf(&c, "shutdown_timeout: 5s\n")
	fmt.Fprintf(&c, "log: {level: warn, format: text}\n")
	fmt.Fprintf(&c, "http: {listen: \"127.0.0.1:%d\"}\n", g.httpPort)
	fmt.Fprintf(&c, "mqtt:\n  listen: \"127.0.0.1:%d\"\n  publish_rate: 1000000\n  publish_burst: 1000000\n", g.port)
	fmt.Fprintf(&c, "devices: {registry: %s}\n", regPath)
	fmt.Fprintf(&c, "buffer:\n  durability: %s\n  max_bytes: %d\n", o.Durability, int64(4)<<30)
	fmt.Fprintf(&c, "rules: {dir: \"\"}\n")
	if o.LivePriority > 0 {
		fmt.Fprintf(&c, "ingest:\n  mappings:\n    - {name: live, topic: \"devices/%s/telemetry\", type: telemetry, priority: %d}\n",
			liveDeviceID, o.LivePriority)
	}
	fmt.Fprintf(&c, "forward:\n  sinks:\n    - name: cloud\n      type: mqtt\n")
	if o.Window > 0 {
		fmt.Fprintf(&c, "      window: %d\n", o.Window)
	}
	if o.LivePriority > 0 {
		fmt.Fprintf(&c, "      priority_lanes: [%d]\n", o.LivePriority)
	}
	fmt.Fprintf(&c, "      backoff_min: 100ms\n      backoff_max: 1s\n")
	if o.Batch {
		fmt.Fprintf(&c, "      mqtt: {url: %q, mode: batch}\n", cloudURL)
	} else {
		fmt.Fprintf(&c, "      mqtt: {url: %q}\n", cloudURL)
	}
	if err := os.WriteFile(g.configPath, c.Bytes(), 0o600); err != nil {
		return nil, fmt.Errorf("gateway config: %w", err)
	}
	return g, nil
}

func (g *gatewayProc) addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(g.port)) }
func (g *gatewayProc) url() string  { return "tcp://" + g.addr() }
func (g *gatewayProc) logPath() string {
	return filepath.Join(g.dir, "edgegate.log")
}

func (g *gatewayProc) start(ctx context.Context, bin string, procs int) error {
	var env []string
	if procs > 0 {
		env = []string{fmt.Sprintf("GOMAXPROCS=%d", procs)}
	}
	p, err := startProcessEnv(ctx, "edgegate", g.logPath(), env, bin, "run", "--config", g.configPath)
	if err != nil {
		return err
	}
	g.proc = p
	if err := waitListening(ctx, p, g.addr(), startTimeout); err != nil {
		p.Kill()
		return fmt.Errorf("%w\n%s", err, tailFile(g.logPath(), 20))
	}
	return nil
}

// tailFile returns the last n lines of a file ("" when it cannot be read).
func tailFile(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
