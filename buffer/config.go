package buffer

import (
	"errors"
	"fmt"
	"time"
)

// Durability modes.
const (
	// DurabilityFsync makes Append return only after the batch holding the event is written and fsync'd.
	DurabilityFsync = "fsync"
	// DurabilityInterval makes Append return once the batch is written to the file; the file is fsync'd every
	// FsyncInterval, so a power loss may lose up to FsyncInterval of acknowledged events, or damage the file (see
	// Config.Durability).
	DurabilityInterval = "interval"
)

// Policies for a full log.
const (
	// WhenFullReject refuses new events with ErrFull until room comes back (back-pressure).
	WhenFullReject = "reject"
	// WhenFullDropOldest removes stored events, lowest priority and oldest first, to make room; every removal
	// is counted in edgegate_buffer_dropped_total.
	WhenFullDropOldest = "drop-oldest"
)

// Config configures the durable log (yaml key "buffer").
type Config struct {
	// Path is the bbolt file (<data_dir>/events.db); set by the gateway, not read from YAML.
	Path string `yaml:"-"`
	// Durability is "fsync" (default): Append returns after the batch is fsync'd, or "interval": Append returns
	// after the batch is written and the file is fsync'd FsyncInterval after the previous fsync. In interval mode
	// a process crash loses nothing, but a power loss (or kernel crash) may lose the events acknowledged during
	// the last FsyncInterval plus the time of one fsync, and, because the writes between two fsyncs reach the disk
	// in no fixed order, it may leave the file damaged: the gateway then refuses to start, naming the file and
	// `edgegate backlog recover`, which moves it aside (its events are not forwarded unless imported again).
	Durability string `yaml:"durability"`
	// FsyncInterval is the longest time between fsyncs in interval mode (default 200ms).
	FsyncInterval time.Duration `yaml:"fsync_interval"`
	// MaxBytes bounds the total size of the stored events (default 256 MiB).
	MaxBytes int64 `yaml:"max_bytes"`
	// MaxAge drops events whose time is older than this (0, the default, keeps events of any age).
	MaxAge time.Duration `yaml:"max_age"`
	// WhenFull is "reject" (default) or "drop-oldest"; it applies when MaxBytes or MinFreeBytes is reached.
	WhenFull string `yaml:"when_full"`
	// MinFreeBytes is the free space the filesystem holding Path keeps (DefaultConfig: 64 MiB); below it the
	// log is full and acts by WhenFull. 0 turns the guard off.
	MinFreeBytes int64 `yaml:"min_free_bytes"`
	// Cursors names the cursors (sinks) that must carry every event; set by the gateway. An event is deleted
	// only once every one of them has passed it (or a retention rule removes it, counted). Persisted cursors
	// not listed here are removed when the log opens.
	Cursors []string `yaml:"-"`
	// QueueSize bounds the appends waiting for the next commit (default 65536 entries; the queued payloads are
	// also bounded to 64 MiB). When it is full Append waits (back-pressure) and Enqueue returns ErrFull.
	QueueSize int `yaml:"queue_size"`
}

// Defaults used by DefaultConfig and for zero fields.
const (
	defaultFsyncInterval = 200 * time.Millisecond
	defaultMaxBytes      = 256 << 20
	defaultMinFreeBytes  = 64 << 20
	defaultQueueSize     = 65536
)

// DefaultConfig returns the configuration a minimal YAML file gets.
func DefaultConfig() Config {
	return Config{
		Durability:    DurabilityFsync,
		FsyncInterval: defaultFsyncInterval,
		MaxBytes:      defaultMaxBytes,
		WhenFull:      WhenFullReject,
		MinFreeBytes:  defaultMinFreeBytes,
		QueueSize:     defaultQueueSize,
	}
}

// MaxCursorName bounds the length of a cursor's name in bytes (a key of the file).
const MaxCursorName = 1024

// withDefaults fills zero fields with the values of DefaultConfig, except MaxAge (0: no TTL) and MinFreeBytes
// (0: no free-space guard).
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.Durability == "" {
		c.Durability = d.Durability
	}
	if c.FsyncInterval == 0 {
		c.FsyncInterval = d.FsyncInterval
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = d.MaxBytes
	}
	if c.WhenFull == "" {
		c.WhenFull = d.WhenFull
	}
	if c.QueueSize == 0 {
		c.QueueSize = d.QueueSize
	}
	return c
}

// Validate reports every problem of the configuration as given, each naming its key (start from DefaultConfig;
// Open fills zero fields first, see withDefaults). Path is not checked here because the gateway sets it.
func (c Config) Validate() error {
	var errs []error
	switch c.Durability {
	case DurabilityFsync, DurabilityInterval:
	default:
		errs = append(errs, fmt.Errorf("buffer.durability: %q is not fsync or interval", c.Durability))
	}
	if c.Durability == DurabilityInterval && c.FsyncInterval <= 0 {
		errs = append(errs, fmt.Errorf("buffer.fsync_interval: must be > 0, got %s", c.FsyncInterval))
	}
	if c.MaxBytes <= 0 {
		errs = append(errs, fmt.Errorf("buffer.max_bytes: must be > 0, got %d", c.MaxBytes))
	}
	if c.MaxAge < 0 {
		errs = append(errs, fmt.Errorf("buffer.max_age: must be >= 0, got %s", c.MaxAge))
	}
	switch c.WhenFull {
	case WhenFullReject, WhenFullDropOldest:
	default:
		errs = append(errs, fmt.Errorf("buffer.when_full: %q is not reject or drop-oldest", c.WhenFull))
	}
	if c.MinFreeBytes < 0 {
		errs = append(errs, fmt.Errorf("buffer.min_free_bytes: must be >= 0, got %d", c.MinFreeBytes))
	}
	if c.QueueSize <= 0 {
		errs = append(errs, fmt.Errorf("buffer.queue_size: must be > 0, got %d", c.QueueSize))
	}
	seen := map[string]bool{}
	for i, name := range c.Cursors {
		if name == "" {
			errs = append(errs, fmt.Errorf("buffer.cursors[%d]: empty name", i))
		} else if len(name) > MaxCursorName {
			errs = append(errs, fmt.Errorf("buffer.cursors[%d]: name of %d bytes, at most %d", i, len(name), MaxCursorName))
		} else if seen[name] {
			errs = append(errs, fmt.Errorf("buffer.cursors[%d]: %q listed twice", i, name))
		}
		seen[name] = true
	}
	return errors.Join(errs...)
}
