package buffer

import (
	"strings"
	"testing"
	"time"
)

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		edit func(c *Config)
		want []string // message prefixes, in any order
	}{
		{"default", func(*Config) {}, nil},
		{"interval", func(c *Config) { c.Durability = DurabilityInterval }, nil},
		{"drop-oldest", func(c *Config) { c.WhenFull = WhenFullDropOldest; c.MinFreeBytes = 0 }, nil},
		{"bad durability", func(c *Config) { c.Durability = "sometimes" }, []string{`buffer.durability: "sometimes"`}},
		{"interval without interval", func(c *Config) { c.Durability = DurabilityInterval; c.FsyncInterval = 0 },
			[]string{"buffer.fsync_interval: must be > 0"}},
		{"everything wrong", func(c *Config) {
			c.MaxBytes, c.MaxAge, c.WhenFull, c.MinFreeBytes, c.QueueSize = 0, -time.Second, "panic", -1, 0
			c.Cursors = []string{"a", "", "a", strings.Repeat("x", MaxCursorName+1)}
		}, []string{"buffer.max_bytes: must be > 0, got 0", "buffer.max_age:", `buffer.when_full: "panic"`,
			"buffer.min_free_bytes:", "buffer.queue_size:", "buffer.cursors[1]: empty", `buffer.cursors[2]: "a" listed twice`,
			"buffer.cursors[3]: name of 1025 bytes, at most 1024"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			tt.edit(&c)
			err := c.Validate()
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("Validate = %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("Validate = nil")
			}
			lines := strings.Split(err.Error(), "\n")
			if len(lines) != len(tt.want) {
				t.Fatalf("%d problems, want %d: %v", len(lines), len(tt.want), err)
			}
			for _, w := range tt.want {
				found := false
				for _, l := range lines {
					found = found || strings.HasPrefix(l, w)
				}
				if !found {
					t.Errorf("no problem starts with %q in %v", w, err)
				}
			}
		})
	}
	if err := (Config{}).withDefaults().Validate(); err != nil {
		t.Fatalf("zero config with defaults: %v", err)
	}
}
