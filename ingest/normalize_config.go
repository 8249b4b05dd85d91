package ingest

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Defaults applied by NewNormalizer to zero-valued NormalizeConfig fields.
const (
	// DefaultTimeField is the payload field read as the event time when NormalizeConfig.TimeField is empty.
	DefaultTimeField = "time"
	// DefaultMaxPayloadBytes is the payload size limit when NormalizeConfig.MaxPayloadBytes is 0.
	DefaultMaxPayloadBytes = 64 << 10
	// maxPayloadLimit bounds max_payload_bytes; it is the largest MQTT packet the broker can be told to accept.
	maxPayloadLimit = 256 << 20
)

// NormalizeConfig configures how messages become CloudEvents (YAML key `ingest`). The zero value works: empty
// fields take the defaults documented on each field, and the built-in device mappings are on.
type NormalizeConfig struct {
	// TypePrefix is put in front of every event type the normalizer renders, e.g. "com.example.". A CloudEvent
	// published as is by a device keeps its own type. Default "".
	TypePrefix string `yaml:"type_prefix"`
	// TimeField is the top-level field of a JSON object payload that carries the device's timestamp: an RFC 3339
	// string, or a number of seconds (or milliseconds, when it is above 1e11) since the Unix epoch. A missing,
	// malformed or implausible value (before 2000 or after 9999) is ignored and the event gets the time of
	// receipt. Default "time"; "-" turns the lookup off.
	TimeField string `yaml:"time_field"`
	// MaxPayloadBytes is the largest payload that becomes an event; a larger one becomes a dead letter
	// (too_large). Default 65536.
	MaxPayloadBytes int `yaml:"max_payload_bytes"`
	// Mappings are custom topic mappings. They are tried first, in order.
	Mappings []Mapping `yaml:"mappings"`
	// Presets adds the mappings of known device ecosystems after the custom ones, in the order listed:
	// "zigbee2mqtt", "tasmota", "shelly" (see PRESETS.md).
	Presets []string `yaml:"presets"`
	// DisableDefault turns off the built-in mappings, which are tried last:
	// devices/{device}/events/{type} → {type}, devices/{device}/telemetry → telemetry and
	// devices/{device}/telemetry/{metric} → telemetry.{metric}.
	DisableDefault bool `yaml:"disable_default_mappings"`
}

// DefaultNormalizeConfig returns the configuration used for every `ingest` key the YAML leaves out.
func DefaultNormalizeConfig() NormalizeConfig {
	return NormalizeConfig{TimeField: DefaultTimeField, MaxPayloadBytes: DefaultMaxPayloadBytes}
}

// withDefaults returns c with the documented defaults in place of zero values.
func (c NormalizeConfig) withDefaults() NormalizeConfig {
	if c.TimeField == "" {
		c.TimeField = DefaultTimeField
	}
	if c.MaxPayloadBytes == 0 {
		c.MaxPayloadBytes = DefaultMaxPayloadBytes
	}
	return c
}

// Validate reports every problem of the configuration, each naming its key.
func (c NormalizeConfig) Validate() error {
	_, err := c.compile()
	return err
}

// compile validates c and turns its mappings, presets and the defaults into the ordered list the normalizer
// matches against. Every problem is reported, joined.
func (c NormalizeConfig) compile() ([]*mapping, error) {
	var errs []error
	if c.TypePrefix != "" && !validToken(c.TypePrefix) {
		errs = append(errs, fmt.Errorf("ingest.type_prefix: %q must be valid UTF-8 without spaces or control characters", c.TypePrefix))
	}
	if c.TimeField != "-" && c.TimeField != "" && !utf8.ValidString(c.TimeField) {
		errs = append(errs, fmt.Errorf("ingest.time_field: %q is not valid UTF-8", c.TimeField))
	}
	if c.MaxPayloadBytes < 0 || c.MaxPayloadBytes > maxPayloadLimit {
		errs = append(errs, fmt.Errorf("ingest.max_payload_bytes: must be between 1 and %d (0 means %d), got %d",
			maxPayloadLimit, DefaultMaxPayloadBytes, c.MaxPayloadBytes))
	}
	var out []*mapping
	names := make(map[string]string)
	for i, m := range c.Mappings {
		key := fmt.Sprintf("ingest.mappings[%d]", i)
		cm, err := compileMapping(key, m, c.TypePrefix)
		if err != nil {
			errs = append(errs, err)
		}
		if m.Name != "" {
			if prev, dup := names[m.Name]; dup {
				errs = append(errs, fmt.Errorf("%s.name: %q is already used by %s", key, m.Name, prev))
			} else {
				names[m.Name] = key
			}
		}
		if cm != nil {
			out = append(out, cm)
		}
	}
	seen := make(map[string]bool)
	for i, p := range c.Presets {
		key := fmt.Sprintf("ingest.presets[%d]", i)
		ms, ok := presets[p]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("%s: unknown preset %q (known: %s)", key, p, strings.Join(PresetNames(), ", ")))
			continue
		case seen[p]:
			errs = append(errs, fmt.Errorf("%s: preset %q is listed twice", key, p))
			continue
		}
		seen[p] = true
		for _, m := range ms {
			cm, err := compileMapping(key, m, c.TypePrefix)
			if err != nil {
				errs = append(errs, err) // a broken built-in: caught by the tests
				continue
			}
			out = append(out, cm)
		}
	}
	if !c.DisableDefault {
		for _, m := range defaultMappings {
			cm, err := compileMapping("ingest.default_mappings", m, c.TypePrefix)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			out = append(out, cm)
		}
	} else if len(c.Mappings) == 0 && len(c.Presets) == 0 {
		errs = append(errs, errors.New("ingest.disable_default_mappings: no mappings left: add ingest.mappings or ingest.presets"))
	}
	return out, errors.Join(errs...)
}

// validToken reports whether s is valid UTF-8 without white space or control characters.
func validToken(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if unicode.IsSpace(r) || unicode.IsControl(r) {
			return false
		}
	}
	return true
}
