//go:build linux

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/goccy/go-yaml"
	"golang.org/x/crypto/bcrypt"

	"github.com/edgegate/edgegate/internal/freeport"
)

// Device is a registered device and its password.
type Device struct {
	ID       string
	Password string
}

// Devices returns n devices named prefix-000, prefix-001, … with the password "<id>-pw".
func Devices(prefix string, n int) []Device {
	out := make([]Device, n)
	for i := range out {
		id := fmt.Sprintf("%s-%03d", prefix, i)
		out[i] = Device{ID: id, Password: id + "-pw"}
	}
	return out
}

// hashCache keeps the hashes made by WriteRegistry, by password, so a suite hashes each password once.
var hashCache sync.Map

// hash returns a bcrypt hash of password at the lowest cost the registry accepts (4): the registry verifies it
// like any other, in well under a millisecond.
func hash(password string) (string, error) {
	if h, ok := hashCache.Load(password); ok {
		return h.(string), nil
	}
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		return "", fmt.Errorf("hash password: %w", err)
	}
	hashCache.Store(password, string(h))
	return string(h), nil
}

// WriteRegistry writes a device registry (devices.yaml) listing devs with bcrypt password hashes.
func WriteRegistry(path string, devs []Device) error {
	type entry struct {
		ID           string `yaml:"id"`
		PasswordHash string `yaml:"password_hash"`
	}
	doc := struct {
		Devices []entry `yaml:"devices"`
	}{Devices: []entry{}}
	for _, d := range devs {
		h, err := hash(d.Password)
		if err != nil {
			return err
		}
		doc.Devices = append(doc.Devices, entry{ID: d.ID, PasswordHash: h})
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

// SinkName is the name of the MQTT sink a Config with an Upstream gets; its log cursor is "sink:cloud".
const SinkName = "cloud"

// EventType is the CloudEvent type of the events Client.Publish sends.
const EventType = "e2e.tick"

// Config describes a gateway to start.
type Config struct {
	// Devices are written to the gateway's registry.
	Devices []Device
	// Upstream is the MQTT URL (tcp://host:port) of the sink "cloud"; "" configures no sink.
	Upstream string
	// DataDir is the gateway's data directory; "" is a new directory under t.TempDir().
	DataDir string
	// Set overrides configuration keys, by dotted path into the YAML ("buffer.max_bytes", "forward.sinks.0.window",
	// "mqtt.publish_rate"). Durations are written as strings ("200ms"). A nil value removes the key.
	Set map[string]any
}

// baseTree is the configuration every gateway starts from. The buffer's free-space guard is off unless a test
// sets buffer.min_free_bytes; the per-device rate limit is high enough for load tests.
func baseTree(workDir, dataDir, mqttAddr, httpAddr, upstream string) map[string]any {
	tree := map[string]any{
		"id":               "e2e",
		"data_dir":         dataDir,
		"shutdown_timeout": "10s",
		"log":              map[string]any{"level": "info", "format": "text"},
		"http":             map[string]any{"listen": httpAddr},
		"mqtt": map[string]any{
			"listen":                 mqttAddr,
			"publish_rate":           100000,
			"publish_burst":          100000,
			"max_connections_per_ip": 100000,
		},
		"devices": map[string]any{"registry": filepath.Join(workDir, "devices.yaml")},
		"rules":   map[string]any{"dir": ""},
		"buffer":  map[string]any{"min_free_bytes": 0},
		"forward": map[string]any{"sinks": []any{}},
	}
	if upstream != "" {
		tree["forward"] = map[string]any{"sinks": []any{map[string]any{
			"name":        SinkName,
			"type":        "mqtt",
			"window":      64,
			"ack_timeout": "2s",
			"backoff_min": "50ms",
			"backoff_max": "500ms",
			"mqtt": map[string]any{
				"url":              upstream,
				"keep_alive":       "5s",
				"connect_timeout":  "2s",
				"disable_commands": true,
			},
		}}}
	}
	return tree
}

// setPath sets (or with a nil value deletes) the value at a dotted path, creating maps on the way; a numeric
// element indexes a list.
func setPath(tree map[string]any, path string, v any) error {
	parts := strings.Split(path, ".")
	var cur any = tree
	for i, p := range parts {
		last := i == len(parts)-1
		switch node := cur.(type) {
		case map[string]any:
			if last {
				if v == nil {
					delete(node, p)
				} else {
					node[p] = v
				}
				return nil
			}
			next, ok := node[p]
			if !ok || next == nil {
				next = map[string]any{}
				node[p] = next
			}
			cur = next
		case []any:
			n, err := strconv.Atoi(p)
			if err != nil || n < 0 || n >= len(node) {
				return fmt.Errorf("config key %q: %q is not an index of a list of %d", path, p, len(node))
			}
			if last {
				node[n] = v
				return nil
			}
			cur = node[n]
		default:
			return fmt.Errorf("config key %q: %q is not a map or a list", path, strings.Join(parts[:i], "."))
		}
	}
	return nil
}

// FreePort returns a loopback port that was free a moment ago, outside the kernel's ephemeral range.
func FreePort() (int, error) { return freeport.Get() }
