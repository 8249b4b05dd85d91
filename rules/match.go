package rules

import (
	"fmt"
	"strings"

	"github.com/cloudevents/sdk-go/v2/event"
)

// pattern matches a string exactly or, with '*' (any run of characters, dots included), as a glob.
type pattern struct {
	raw   string
	parts []string // split at '*'; nil for an exact pattern
}

func newPattern(s string) pattern {
	p := pattern{raw: s}
	if strings.Contains(s, "*") {
		p.parts = strings.Split(s, "*")
	}
	return p
}

func (p pattern) isSet() bool   { return p.raw != "" }
func (p pattern) isExact() bool { return p.parts == nil }

func (p pattern) match(s string) bool {
	if p.parts == nil {
		return s == p.raw
	}
	first, last := p.parts[0], p.parts[len(p.parts)-1]
	if !strings.HasPrefix(s, first) {
		return false
	}
	s = s[len(first):]
	if len(s) < len(last) || !strings.HasSuffix(s, last) {
		return false
	}
	s = s[:len(s)-len(last)]
	for _, mid := range p.parts[1 : len(p.parts)-1] {
		i := strings.Index(s, mid)
		if i < 0 {
			return false
		}
		s = s[i+len(mid):]
	}
	return true
}

// disjoint reports whether no string can match both patterns (checked for exact patterns only).
func (p pattern) disjoint(o pattern) bool {
	switch {
	case p.isExact() && o.isExact():
		return p.raw != o.raw
	case p.isExact():
		return !o.match(p.raw)
	case o.isExact():
		return !p.match(o.raw)
	}
	return false
}

// deviceCond is one metadata condition of `on.device`.
type deviceCond struct {
	key string // id, name, room, kind or labels.X
	pat pattern
}

func (c deviceCond) value(d Device) (string, bool) {
	switch c.key {
	case "id":
		return d.ID, true
	case "name":
		return d.Name, true
	case "room":
		return d.Room, true
	case "kind":
		return d.Kind, true
	}
	v, ok := d.Labels[strings.TrimPrefix(c.key, "labels.")]
	return v, ok
}

// matcher is an `on` block (or a sequence/absence step): attribute patterns, device metadata and, for steps, a
// condition.
type matcher struct {
	typ     pattern
	source  pattern
	subject pattern
	device  []deviceCond
	when    *cexpr
}

func (m *matcher) needs() needs {
	var n needs
	if len(m.device) > 0 {
		n |= needDevice
	}
	if m.when != nil {
		n |= m.when.needs
	}
	return n
}

// matchAttrs checks type, source and subject; it returns "" or why the event does not match.
func (m *matcher) matchAttrs(ev *event.Event) string {
	if m.typ.isSet() {
		if t := ev.Type(); !m.typ.match(t) {
			return fmt.Sprintf("type %s ≠ %s", t, m.typ.raw)
		}
	}
	if m.source.isSet() {
		if s := ev.Source(); !m.source.match(s) {
			return fmt.Sprintf("source %s ≠ %s", s, m.source.raw)
		}
	}
	if m.subject.isSet() {
		if s := ev.Subject(); !m.subject.match(s) {
			return fmt.Sprintf("subject %q ≠ %s", s, m.subject.raw)
		}
	}
	return ""
}

// matchDevice checks the metadata conditions against the subject's device.
func (m *matcher) matchDevice(c *evalCtx) string {
	if len(m.device) == 0 {
		return ""
	}
	d, known := c.device()
	if !known {
		return fmt.Sprintf("device: subject %q is not in the directory", c.ev.Subject())
	}
	for _, dc := range m.device {
		v, ok := dc.value(d)
		if !ok {
			return fmt.Sprintf("device.%s: device %s has no such label", dc.key, d.ID)
		}
		if !dc.pat.match(v) {
			return fmt.Sprintf("device.%s %q ≠ %s", dc.key, v, dc.pat.raw)
		}
	}
	return ""
}
