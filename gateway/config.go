package gateway

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/goccy/go-yaml"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/deadletter"
	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/ingest"
	"github.com/edgegate/edgegate/rules"
)

// Config is the whole gateway configuration, as read from YAML.
type Config struct {
	// ID names this gateway in event sources and upstream topics. Default "edgegate".
	ID string `yaml:"id"`
	// DataDir holds the durable log, dead letters and rule state. Default "data".
	DataDir string `yaml:"data_dir"`
	// ShutdownTimeout bounds a graceful stop. Default 15s.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	// StallTimeout is how long one commit of the log (its writes and fsyncs) or one rule evaluation may run
	// before the gateway counts as stalled: /healthz answers 503 naming the part, and under systemd with
	// WatchdogSec the watchdog is no longer fed, so systemd restarts the gateway. Default 60s.
	StallTimeout time.Duration `yaml:"stall_timeout"`

	Log        LogConfig              `yaml:"log"`
	HTTP       HTTPConfig             `yaml:"http"`
	MQTT       ingest.BrokerConfig    `yaml:"mqtt"`
	Ingest     ingest.NormalizeConfig `yaml:"ingest"`
	Devices    DevicesConfig          `yaml:"devices"`
	Buffer     buffer.Config          `yaml:"buffer"`
	Forward    forward.Config         `yaml:"forward"`
	Rules      rules.Config           `yaml:"rules"`
	DeadLetter deadletter.Config      `yaml:"deadletter"`
}

// LogConfig selects the log level and format.
type LogConfig struct {
	Level  string `yaml:"level"`  // debug, info (default), warn, error
	Format string `yaml:"format"` // text (default) or json
}

// HTTPConfig configures the admin HTTP API (metrics, health, status).
type HTTPConfig struct {
	// Listen is the admin API address. Default "127.0.0.1:8080" (loopback only); "off" disables it.
	Listen string `yaml:"listen"`
}

// DevicesConfig points at the device registry and says how often the device state view is saved.
type DevicesConfig struct {
	// Registry is the YAML file listing devices, credentials and metadata. Default "configs/devices.yaml".
	Registry string `yaml:"registry"`
	// StateSaveInterval is how often the device state view (what devices reported, their last_seen, the keys
	// rules set) is saved to data_dir/device-state.json when it changed; it is saved at every stop too and loaded
	// at start, so a restart keeps it. After a crash, the start replays onto it the events the log still holds
	// from after the last save (up to the newest 100,000), so only the keys rules set since, and what was in
	// events already delivered and removed from the log, are lost. Default 30s.
	StateSaveInterval time.Duration `yaml:"state_save_interval"`
}

// DefaultConfig returns the configuration used for every key the YAML leaves out.
func DefaultConfig() Config {
	return Config{
		ID:              "edgegate",
		DataDir:         "data",
		ShutdownTimeout: 15 * time.Second,
		StallTimeout:    time.Minute,
		Log:             LogConfig{Level: "info", Format: "text"},
		HTTP:            HTTPConfig{Listen: "127.0.0.1:8080"},
		MQTT:            ingest.DefaultBrokerConfig(),
		Ingest:          ingest.DefaultNormalizeConfig(),
		Devices:         DevicesConfig{Registry: "configs/devices.yaml", StateSaveInterval: 30 * time.Second},
		Buffer:          buffer.DefaultConfig(),
		Forward:         forward.Config{},
		Rules:           rules.DefaultConfig(),
		DeadLetter:      deadletter.DefaultConfig(),
	}
}

// LoadConfig reads a YAML file strictly (an unknown key is an error, with its line) over the defaults.
func LoadConfig(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	return ParseConfig(path, data)
}

// ParseConfig decodes YAML (named name in errors) over the defaults. It does not validate. A file without any key
// (empty, only comments, or only "---") is all defaults.
func ParseConfig(name string, data []byte) (Config, error) {
	cfg := DefaultConfig()
	dec := yaml.NewDecoder(bytes.NewReader(data), yaml.Strict())
	if err := dec.Decode(&cfg); err != nil {
		if errors.Is(err, io.EOF) { // no document with content
			if onlyComments(data) {
				return DefaultConfig(), nil
			}
			return Config{}, fmt.Errorf("config: %s: no settings found: write the keys as one YAML document", name)
		}
		return Config{}, fmt.Errorf("config: %s: %w", name, devices.YAMLError(err))
	}
	return cfg, nil
}

// onlyComments reports whether data holds nothing but blank lines, comments and document markers.
func onlyComments(data []byte) bool {
	for line := range strings.Lines(string(data)) {
		t := strings.TrimSpace(line)
		for _, marker := range []string{"---", "..."} {
			if rest, ok := strings.CutPrefix(t, marker); ok && (rest == "" || rest[0] == ' ' || rest[0] == '\t') {
				t = strings.TrimSpace(rest)
			}
		}
		if t != "" && !strings.HasPrefix(t, "#") {
			return false
		}
	}
	return true
}

// RulesConfig is the rule engine's configuration as the gateway runs it: the rules section, with the source of
// derived events named after the gateway. The gateway adds the state file under the data directory; the dry runs
// of the rules tools keep their state in memory.
func (c Config) RulesConfig() rules.Config {
	rc := c.Rules
	rc.Source = "/gateways/" + c.ID + "/rules"
	return rc
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// Validate reports every problem of the configuration, each naming its key.
func (c Config) Validate() error {
	var errs []error
	if !idRE.MatchString(c.ID) {
		errs = append(errs, fmt.Errorf("id: %q must be 1-64 letters, digits, '.', '_' or '-'", c.ID))
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("data_dir: must be set"))
	}
	if c.ShutdownTimeout <= 0 {
		errs = append(errs, fmt.Errorf("shutdown_timeout: must be > 0, got %s", c.ShutdownTimeout))
	}
	if c.StallTimeout <= 0 {
		errs = append(errs, fmt.Errorf("stall_timeout: must be > 0, got %s", c.StallTimeout))
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log.level: %q is not debug, info, warn or error", c.Log.Level))
	}
	if c.Log.Format != "text" && c.Log.Format != "json" {
		errs = append(errs, fmt.Errorf("log.format: %q is not text or json", c.Log.Format))
	}
	if c.HTTP.Listen != "off" {
		if _, _, err := net.SplitHostPort(c.HTTP.Listen); err != nil {
			errs = append(errs, fmt.Errorf("http.listen: %q is not host:port or off", c.HTTP.Listen))
		}
	}
	if c.Devices.StateSaveInterval <= 0 {
		errs = append(errs, fmt.Errorf("devices.state_save_interval: must be > 0, got %s", c.Devices.StateSaveInterval))
	}
	if c.Devices.Registry == "" {
		errs = append(errs, errors.New("devices.registry: must name the device registry file"))
	} else if _, err := os.Stat(c.Devices.Registry); err != nil {
		errs = append(errs, fmt.Errorf("devices.registry: %w", err))
	}
	errs = append(errs, c.MQTT.Validate(), c.Ingest.Validate(), c.Buffer.Validate(), c.Forward.ValidateFor(c.ID),
		c.Rules.Validate(), c.DeadLetter.Validate())
	return errors.Join(errs...)
}
