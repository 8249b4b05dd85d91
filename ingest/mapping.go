package ingest

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Mapping turns the messages published on matching topics into events of one kind.
//
// Topic is a pattern of '/'-separated levels. A level is a literal, "+" (any one level), or one of the
// placeholders {device}, {type} and {metric}, each matching exactly one non-empty level and usable once. The
// last level may be "#": it matches one or more further levels (unlike an MQTT filter, not zero), available to
// templates as {rest} with its levels joined by '.'. Patterns that start with a wildcard or placeholder do not
// match topics that start with '$', as in MQTT.
//
// Type and Device are templates over the same placeholders. In templates, {device} is the topic's {device}
// level when the pattern has one, else the device that published (the authenticated device).
//
// Example: topic "sensors/{device}/{metric}", type "telemetry.{metric}" turns a publish on "sensors/t1/temp"
// into an event of type "telemetry.temp" about device t1.
type Mapping struct {
	// Name identifies the mapping in errors and dead-letter details. Optional; unique when set.
	Name string `yaml:"name"`
	// Topic is the topic pattern (required).
	Topic string `yaml:"topic"`
	// Type is the event type template, e.g. "{type}", "telemetry.{metric}" or "zigbee2mqtt.state" (required).
	// NormalizeConfig.TypePrefix is put in front of it.
	Type string `yaml:"type"`
	// Format says what the payload is: "json" (it must be JSON, else the message becomes a dead letter
	// not_json), "text" (UTF-8, else not_text), "binary", or "auto" (default): JSON when it parses as JSON,
	// else text when it is valid UTF-8, else binary. An MQTT 5 content type, when set, names the data instead.
	Format string `yaml:"format"`
	// Priority (0 lowest, default, to 9 highest) is carried to the log, whose retention drops the lowest first.
	Priority uint8 `yaml:"priority"`
	// Device is the template of the device the event is about (its subject). Default "{device}".
	Device string `yaml:"device"`
}

// Payload formats of a mapping.
const (
	FormatAuto   = "auto"
	FormatJSON   = "json"
	FormatText   = "text"
	FormatBinary = "binary"
)

type format uint8

const (
	formatAuto format = iota
	formatJSON
	formatText
	formatBinary
)

// levelKind is what one level of a topic pattern matches.
type levelKind uint8

const (
	levelLiteral levelKind = iota
	levelPlus              // "+": any one level
	levelDevice            // {device}
	levelType              // {type}
	levelMetric            // {metric}
)

// placeholder is a variable of a template.
type placeholder uint8

const (
	phNone placeholder = iota // a literal segment
	phDevice
	phType
	phMetric
	phRest
)

var placeholderNames = map[string]placeholder{"device": phDevice, "type": phType, "metric": phMetric, "rest": phRest}

type patternLevel struct {
	kind levelKind
	lit  string
}

// mapping is a compiled Mapping.
type mapping struct {
	name     string
	levels   []patternLevel // without the trailing '#'
	rest     bool           // the pattern ends with '#'
	hasDev   bool           // the pattern has a {device} level
	typ      template       // includes the type prefix
	prefix   int            // length of the type prefix in rendered types
	device   template
	format   format
	priority uint8
}

// captures are the values a topic gave to a matched pattern's placeholders.
type captures struct {
	device, typ, metric string // topic levels; device is the publisher when the pattern has no {device}
	rest                string // the levels matched by '#', still '/'-separated
}

// splitTopic splits a topic into levels, appending to buf (pass a stack array to avoid allocating).
func splitTopic(topic string, buf []string) []string {
	for {
		i := strings.IndexByte(topic, '/')
		if i < 0 {
			return append(buf, topic)
		}
		buf = append(buf, topic[:i])
		topic = topic[i+1:]
	}
}

// match reports whether the topic (split into levels) matches the pattern, and fills c.
func (m *mapping) match(topic string, levels []string, publisher string, c *captures) bool {
	n := len(m.levels)
	if m.rest {
		if len(levels) <= n {
			return false
		}
	} else if len(levels) != n {
		return false
	}
	if topic[0] == '$' && (n == 0 || m.levels[0].kind != levelLiteral) {
		return false
	}
	*c = captures{device: publisher}
	off := 0
	for i := range m.levels {
		pl := &m.levels[i]
		v := levels[i]
		switch pl.kind {
		case levelLiteral:
			if v != pl.lit {
				return false
			}
		case levelPlus:
		default:
			if v == "" {
				return false
			}
			switch pl.kind {
			case levelDevice:
				c.device = v
			case levelType:
				c.typ = v
			case levelMetric:
				c.metric = v
			}
		}
		off += len(v) + 1
	}
	if m.rest {
		c.rest = topic[off:]
		if c.rest == "" {
			return false
		}
	}
	return true
}

// template is a compiled template: literal segments and placeholders.
type template []segment

type segment struct {
	lit string
	ph  placeholder
}

func (s segment) value(c *captures) string {
	switch s.ph {
	case phDevice:
		return c.device
	case phType:
		return c.typ
	case phMetric:
		return c.metric
	case phRest:
		return strings.ReplaceAll(c.rest, "/", ".")
	}
	return s.lit
}

// render fills the template; a template of one segment costs no allocation.
func (t template) render(c *captures) string {
	if len(t) == 1 {
		return t[0].value(c)
	}
	n := 0
	for _, s := range t {
		if s.ph == phNone {
			n += len(s.lit)
		} else {
			n += len(s.value(c))
		}
	}
	var b strings.Builder
	b.Grow(n)
	for _, s := range t {
		b.WriteString(s.value(c))
	}
	return b.String()
}

// parseTemplate compiles a template whose placeholders must all be in allowed.
func parseTemplate(s string, allowed map[placeholder]bool) (template, error) {
	var t template
	for s != "" {
		open := strings.IndexByte(s, '{')
		if close := strings.IndexByte(s, '}'); close >= 0 && (open < 0 || close < open) {
			return nil, errors.New("'}' without '{'")
		}
		if open < 0 {
			t = append(t, segment{lit: s})
			break
		}
		if open > 0 {
			t = append(t, segment{lit: s[:open]})
		}
		end := strings.IndexByte(s[open:], '}')
		if end < 0 {
			return nil, errors.New("'{' without '}'")
		}
		name := s[open+1 : open+end]
		ph, ok := placeholderNames[name]
		if !ok {
			return nil, fmt.Errorf("unknown placeholder {%s} (known: {device}, {type}, {metric}, {rest})", name)
		}
		if !allowed[ph] {
			return nil, fmt.Errorf("placeholder {%s} is not in the topic pattern", name)
		}
		t = append(t, segment{ph: ph})
		s = s[open+end+1:]
	}
	for _, seg := range t {
		if seg.ph == phNone && !validToken(seg.lit) {
			return nil, fmt.Errorf("%q must be valid UTF-8 without spaces or control characters", seg.lit)
		}
	}
	return t, nil
}

// withPrefix returns t with the literal prefix in front, merged into a leading literal segment.
func (t template) withPrefix(prefix string) template {
	if prefix == "" {
		return t
	}
	if len(t) > 0 && t[0].ph == phNone {
		out := append(template{{lit: prefix + t[0].lit}}, t[1:]...)
		return out
	}
	return append(template{{lit: prefix}}, t...)
}

// compileMapping validates m; key names it in errors (e.g. "ingest.mappings[2]").
func compileMapping(key string, m Mapping, typePrefix string) (*mapping, error) {
	var errs []error
	cm := &mapping{name: m.Name, priority: m.Priority}
	if cm.name == "" {
		cm.name = m.Topic
	}
	allowed := map[placeholder]bool{phDevice: true}
	switch {
	case m.Topic == "":
		errs = append(errs, fmt.Errorf("%s.topic: required", key))
	case !utf8.ValidString(m.Topic) || strings.ContainsRune(m.Topic, 0):
		errs = append(errs, fmt.Errorf("%s.topic: %q is not valid UTF-8", key, m.Topic))
	default:
		levels := strings.Split(m.Topic, "/")
		used := map[levelKind]bool{}
		for i, l := range levels {
			pl := patternLevel{kind: levelLiteral, lit: l}
			switch l {
			case "#":
				if i != len(levels)-1 {
					errs = append(errs, fmt.Errorf("%s.topic: %q: '#' must be the last level", key, m.Topic))
				}
				cm.rest = true
				allowed[phRest] = true
				continue
			case "+":
				pl.kind = levelPlus
			case "{device}":
				pl.kind = levelDevice
				cm.hasDev = true
			case "{type}":
				pl.kind = levelType
				allowed[phType] = true
			case "{metric}":
				pl.kind = levelMetric
				allowed[phMetric] = true
			default:
				if strings.ContainsAny(l, "+#{}") {
					errs = append(errs, fmt.Errorf("%s.topic: %q: level %q: wildcards and placeholders ({device}, {type}, {metric}) must fill a whole level",
						key, m.Topic, l))
				}
			}
			if pl.kind >= levelDevice {
				if used[pl.kind] {
					errs = append(errs, fmt.Errorf("%s.topic: %q: placeholder %s is used twice", key, m.Topic, l))
				}
				used[pl.kind] = true
			}
			cm.levels = append(cm.levels, pl)
		}
	}
	if m.Type == "" {
		errs = append(errs, fmt.Errorf("%s.type: required", key))
	} else if t, err := parseTemplate(m.Type, allowed); err != nil {
		errs = append(errs, fmt.Errorf("%s.type: %q: %w", key, m.Type, err))
	} else {
		cm.typ = t.withPrefix(typePrefix)
		cm.prefix = len(typePrefix)
	}
	dev := m.Device
	if dev == "" {
		dev = "{device}"
	}
	if t, err := parseTemplate(dev, allowed); err != nil {
		errs = append(errs, fmt.Errorf("%s.device: %q: %w", key, m.Device, err))
	} else {
		cm.device = t
	}
	switch m.Format {
	case "", FormatAuto:
		cm.format = formatAuto
	case FormatJSON:
		cm.format = formatJSON
	case FormatText:
		cm.format = formatText
	case FormatBinary:
		cm.format = formatBinary
	default:
		errs = append(errs, fmt.Errorf("%s.format: %q is not auto, json, text or binary", key, m.Format))
	}
	if m.Priority > 9 {
		errs = append(errs, fmt.Errorf("%s.priority: must be 0..9, got %d", key, m.Priority))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return cm, nil
}

// defaultMappings are the built-in device topics of the design (§2), tried after custom mappings and presets.
var defaultMappings = []Mapping{
	{Name: "default.events", Topic: "devices/{device}/events/{type}", Type: "{type}"},
	{Name: "default.telemetry", Topic: "devices/{device}/telemetry", Type: "telemetry"},
	{Name: "default.telemetry_metric", Topic: "devices/{device}/telemetry/{metric}", Type: "telemetry.{metric}"},
}
