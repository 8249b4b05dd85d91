package rules

import (
	"errors"
	"fmt"
	"os"
	"time"
)

// Config configures the rule engine (YAML key `rules`). The zero value of every field but Dir means its default;
// DefaultConfig spells the defaults out.
type Config struct {
	// Dir is the directory of *.yaml / *.yml rule files, read in name order. "" means no rules.
	Dir string `yaml:"dir"`
	// Watch reloads the rules when a file in Dir changes. Default true.
	Watch *bool `yaml:"watch"`
	// StateFile is where timers, windows, debounce and sequence state are kept across restarts. It is set by the
	// gateway (<data_dir>/rules-state.json); "" keeps state in memory only.
	StateFile string `yaml:"-"`
	// Source is the CloudEvents source of derived events. It is set by the gateway (/gateways/{id}/rules);
	// default "/gateways/edgegate/rules".
	Source string `yaml:"-"`
	// CommandTimeout bounds one delivery attempt of a command (until the device's PUBACK). Default 5s.
	CommandTimeout time.Duration `yaml:"command_timeout"`
	// CommandRetries is how many times a failed command is tried again before it becomes a dead letter
	// (reason command_undelivered). Default 2; -1 means no retry. A retry is a new publish (a new packet id,
	// no DUP flag): a device that must not act twice recognises a repeat by what the rule puts in the payload,
	// e.g. cause: '{{ event.id }}'.
	CommandRetries int `yaml:"command_retries"`
	// CommandBackoff is the wait before the first retry; it doubles for each further retry (at most 30s).
	// Default 500ms.
	CommandBackoff time.Duration `yaml:"command_backoff"`
	// CommandWorkers is the number of commands delivered at the same time. Default 8.
	CommandWorkers int `yaml:"command_workers"`
	// CommandQueueSize bounds the commands waiting for a worker; a command that finds the queue full becomes a
	// dead letter at once. Default 1000.
	CommandQueueSize int `yaml:"command_queue_size"`
	// QueueSize bounds the events waiting for evaluation; Submit refuses (and counts) events beyond it.
	// Default 10000.
	QueueSize int `yaml:"queue_size"`
	// MaxChainDepth is the loop guard: an event derived from an event derived from ... more than this many times
	// is not emitted (counted in edgegate_rules_actions_total{outcome="loop"}). Default 8.
	MaxChainDepth int `yaml:"max_chain_depth"`
	// PersistInterval is how often changed state is written to StateFile while running (it is also written on
	// stop): a crash (kill -9, power loss) loses at most the state changes of the last PersistInterval. The file
	// is written only when something changed. Default 1s.
	PersistInterval time.Duration `yaml:"persist_interval"`
}

// Defaults of Config, applied by withDefaults to every zero field.
const (
	DefaultSource           = "/gateways/edgegate/rules"
	DefaultCommandTimeout   = 5 * time.Second
	DefaultCommandRetries   = 2
	DefaultCommandBackoff   = 500 * time.Millisecond
	DefaultCommandWorkers   = 8
	DefaultCommandQueueSize = 1000
	DefaultQueueSize        = 10000
	DefaultMaxChainDepth    = 8
	DefaultPersistInterval  = time.Second
)

// DefaultConfig returns the configuration with every default spelled out and no rule directory.
func DefaultConfig() Config {
	watch := true
	return Config{
		Watch:            &watch,
		Source:           DefaultSource,
		CommandTimeout:   DefaultCommandTimeout,
		CommandRetries:   DefaultCommandRetries,
		CommandBackoff:   DefaultCommandBackoff,
		CommandWorkers:   DefaultCommandWorkers,
		CommandQueueSize: DefaultCommandQueueSize,
		QueueSize:        DefaultQueueSize,
		MaxChainDepth:    DefaultMaxChainDepth,
		PersistInterval:  DefaultPersistInterval,
	}
}

// withDefaults returns c with every zero field set to its default.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.Watch == nil {
		c.Watch = d.Watch
	}
	if c.Source == "" {
		c.Source = d.Source
	}
	if c.CommandTimeout == 0 {
		c.CommandTimeout = d.CommandTimeout
	}
	if c.CommandRetries == 0 {
		c.CommandRetries = d.CommandRetries
	} else if c.CommandRetries < 0 {
		c.CommandRetries = 0
	}
	if c.CommandBackoff == 0 {
		c.CommandBackoff = d.CommandBackoff
	}
	if c.CommandWorkers == 0 {
		c.CommandWorkers = d.CommandWorkers
	}
	if c.CommandQueueSize == 0 {
		c.CommandQueueSize = d.CommandQueueSize
	}
	if c.QueueSize == 0 {
		c.QueueSize = d.QueueSize
	}
	if c.MaxChainDepth == 0 {
		c.MaxChainDepth = d.MaxChainDepth
	}
	if c.PersistInterval == 0 {
		c.PersistInterval = d.PersistInterval
	}
	return c
}

// Validate reports every problem of the configuration, each starting with its key. Zero values are valid (they
// mean the default). A Dir that is set must be an existing directory.
func (c Config) Validate() error {
	var errs []error
	if c.Dir != "" {
		if fi, err := os.Stat(c.Dir); err != nil {
			errs = append(errs, fmt.Errorf("rules.dir: %w", err))
		} else if !fi.IsDir() {
			errs = append(errs, fmt.Errorf("rules.dir: %q is not a directory", c.Dir))
		}
	}
	neg := func(key string, v int64, unit string) {
		if v < 0 {
			errs = append(errs, fmt.Errorf("rules.%s: must be >= 0, got %d%s", key, v, unit))
		}
	}
	if c.CommandTimeout < 0 {
		errs = append(errs, fmt.Errorf("rules.command_timeout: must be > 0, got %s", c.CommandTimeout))
	}
	if c.CommandRetries < -1 {
		errs = append(errs, fmt.Errorf("rules.command_retries: must be >= -1 (-1 = no retry), got %d", c.CommandRetries))
	}
	if c.CommandRetries > 100 {
		errs = append(errs, fmt.Errorf("rules.command_retries: must be <= 100, got %d", c.CommandRetries))
	}
	if c.CommandBackoff < 0 {
		errs = append(errs, fmt.Errorf("rules.command_backoff: must be > 0, got %s", c.CommandBackoff))
	}
	neg("command_workers", int64(c.CommandWorkers), "")
	if c.CommandWorkers > 1024 {
		errs = append(errs, fmt.Errorf("rules.command_workers: must be <= 1024, got %d", c.CommandWorkers))
	}
	neg("command_queue_size", int64(c.CommandQueueSize), "")
	neg("queue_size", int64(c.QueueSize), "")
	neg("max_chain_depth", int64(c.MaxChainDepth), "")
	if c.PersistInterval < 0 {
		errs = append(errs, fmt.Errorf("rules.persist_interval: must be > 0, got %s", c.PersistInterval))
	}
	return errors.Join(errs...)
}
