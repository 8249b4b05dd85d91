//go:build linux

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/goccy/go-yaml"

	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// Grant gives a registered device topics beyond its own devices/{id}/…: MQTT filters it may publish and
// subscribe to (the registry's publish and subscribe keys).
type Grant struct {
	Publish   []string
	Subscribe []string
}

// WriteRegistryGrants writes a device registry like WriteRegistry, with the grants of the devices named in grants.
// A test calls it between Prepare and Restart to replace the registry Prepare wrote.
func WriteRegistryGrants(path string, devs []Device, grants map[string]Grant) error {
	type entry struct {
		ID           string   `yaml:"id"`
		PasswordHash string   `yaml:"password_hash"`
		Publish      []string `yaml:"publish,omitempty"`
		Subscribe    []string `yaml:"subscribe,omitempty"`
	}
	doc := struct {
		Devices []entry `yaml:"devices"`
	}{Devices: []entry{}}
	for _, d := range devs {
		h, err := hash(d.Password)
		if err != nil {
			return err
		}
		g := grants[d.ID]
		doc.Devices = append(doc.Devices, entry{ID: d.ID, PasswordHash: h, Publish: g.Publish, Subscribe: g.Subscribe})
	}
	data, err := yaml.Marshal(doc)
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}

// RegistryPath is the registry file Prepare writes and the configuration names.
func (g *Gateway) RegistryPath() string { return filepath.Join(g.Dir, "devices.yaml") }

// Healthz GETs /healthz and returns its status code (0 and the error when the request fails).
func (g *Gateway) Healthz() (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, g.HTTPURL()+"/healthz", nil)
	if err != nil {
		return 0, err
	}
	resp, err := g.http.Do(req)
	if err != nil {
		return 0, fmt.Errorf("healthz: %w", err)
	}
	_ = resp.Body.Close()
	return resp.StatusCode, nil
}

// DeadLetter is one record of GET /api/deadletters.
type DeadLetter struct {
	ID       uint64 `json:"id"`
	Reason   string `json:"reason"`
	Detail   string `json:"detail"`
	DeviceID string `json:"device_id"`
	Topic    string `json:"topic"`
	Payload  []byte `json:"payload"`
}

// DeadLetters fetches up to 10000 dead letters from GET /api/deadletters, oldest first.
func (g *Gateway) DeadLetters() ([]DeadLetter, error) {
	var out []DeadLetter
	code, err := g.getJSON("/api/deadletters?limit=10000", &out)
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("GET /api/deadletters: status %d", code)
	}
	return out, nil
}

// RSS returns the process's resident set size in bytes (VmRSS of /proc/PID/status).
func RSS(pid int) (int64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, fmt.Errorf("rss: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:")
		if !ok {
			continue
		}
		fields := strings.Fields(rest) // "12345 kB"
		if len(fields) != 2 || fields[1] != "kB" {
			return 0, fmt.Errorf("rss: unexpected VmRSS line %q", sc.Text())
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("rss: %w", err)
		}
		return kb << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("rss: %w", err)
	}
	return 0, fmt.Errorf("rss: no VmRSS in /proc/%d/status", pid)
}

// OpenFDs returns the number of file descriptors the process has open (entries of /proc/PID/fd).
func OpenFDs(pid int) (int, error) {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return 0, fmt.Errorf("open fds: %w", err)
	}
	return len(ents), nil
}

// Alive reports whether a process with the pid exists and is not a zombie.
func Alive(pid int) bool {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the command name in parentheses: "PID (comm) S ...".
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] != 'Z'
}

// TapEvent is one event a Tap received: the CloudEvent's id, subject, type and data.
type TapEvent struct {
	ID      string          `json:"id"`
	Subject string          `json:"subject"`
	Type    string          `json:"type"`
	Data    json.RawMessage `json:"data"`
}

// Tap subscribes to the upstream broker (UpstreamTopic, QoS 1, clean session) and keeps every event it receives,
// so a test can check what was forwarded, not only how much: an abuse test asserts that nothing of the abuse
// left the gateway.
type Tap struct {
	cl paho.Client

	mu     sync.Mutex
	events []TapEvent
	bad    []string
}

// NewTap connects to broker and subscribes to UpstreamTopic.
func NewTap(t testing.TB, broker *mosquittotest.Broker) *Tap {
	t.Helper()
	tp := &Tap{}
	opts := paho.NewClientOptions().AddBroker(broker.URL()).SetClientID(fmt.Sprintf("e2e-tap-%d", time.Now().UnixNano())).
		SetCleanSession(true).SetAutoReconnect(true).SetOrderMatters(true).SetKeepAlive(5 * time.Second).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { tp.record(m.Payload()) })
	tp.cl = paho.NewClient(opts)
	if tok := tp.cl.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("e2e: tap connect: %v", tok.Error())
	}
	if tok := tp.cl.Subscribe(UpstreamTopic, 1, nil); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("e2e: tap subscribe: %v", tok.Error())
	}
	t.Cleanup(func() { tp.cl.Disconnect(0) })
	return tp
}

func (tp *Tap) record(payload []byte) {
	var ev TapEvent
	err := json.Unmarshal(payload, &ev)
	tp.mu.Lock()
	defer tp.mu.Unlock()
	if err != nil || ev.ID == "" {
		tp.bad = append(tp.bad, string(payload))
		return
	}
	tp.events = append(tp.events, ev)
}

// Events returns the events received so far, in order of arrival.
func (tp *Tap) Events() []TapEvent {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return slices.Clone(tp.events)
}

// Bad returns the payloads that were not CloudEvents.
func (tp *Tap) Bad() []string {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return slices.Clone(tp.bad)
}
