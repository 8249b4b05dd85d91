package deadletter

import (
	"errors"
	"fmt"
)

// Defaults for Config fields left at zero.
const (
	DefaultMaxRecords = 10000
	DefaultMaxBytes   = 64 << 20
)

// Config bounds the dead-letter store (YAML key deadletter). A zero field means its default.
type Config struct {
	// MaxRecords is the number of records kept; beyond it the oldest are removed. Default 10000.
	MaxRecords int `yaml:"max_records"`
	// MaxBytes bounds the stored size of all records (payloads included); beyond it the oldest are removed.
	// Default 64 MiB.
	MaxBytes int64 `yaml:"max_bytes"`
}

// DefaultConfig returns the configuration with every default spelled out.
func DefaultConfig() Config {
	return Config{MaxRecords: DefaultMaxRecords, MaxBytes: DefaultMaxBytes}
}

// Validate reports every problem of the configuration at once.
func (c Config) Validate() error {
	var errs []error
	if c.MaxRecords < 0 {
		errs = append(errs, fmt.Errorf("deadletter.max_records: must be > 0 (or 0 for %d), got %d",
			DefaultMaxRecords, c.MaxRecords))
	}
	if c.MaxBytes < 0 {
		errs = append(errs, fmt.Errorf("deadletter.max_bytes: must be > 0 (or 0 for %d), got %d",
			DefaultMaxBytes, c.MaxBytes))
	}
	return errors.Join(errs...)
}

// withDefaults fills in zero fields.
func (c Config) withDefaults() Config {
	if c.MaxRecords == 0 {
		c.MaxRecords = DefaultMaxRecords
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = DefaultMaxBytes
	}
	return c
}
