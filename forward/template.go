package forward

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Fields a topic or subject template may name.
const (
	fieldGateway = "gateway"
	fieldSink    = "sink"
	fieldSubject = "subject"
	fieldType    = "type"
	fieldDevice  = "device"
	fieldCommand = "command"
)

var eventFields = []string{fieldGateway, fieldSink, fieldSubject, fieldType}

// batchFields are the fields of a batch's topic: a batch mixes subjects and types.
var batchFields = []string{fieldGateway, fieldSink}

// template is a parsed topic or subject template: literal text and {field} placeholders.
type template struct {
	parts []tmplPart
}

type tmplPart struct {
	lit   string
	field string // "" for a literal
}

// parseTemplate parses s, allowing only the named fields, and checks that a rendering is valid for its
// protocol (check gets the template rendered with every field "x").
func parseTemplate(s string, fields []string, check func(string) error) (*template, error) {
	if s == "" {
		return nil, errors.New("empty")
	}
	t := &template{}
	rest := s
	for rest != "" {
		i := strings.IndexAny(rest, "{}")
		if i < 0 {
			t.parts = append(t.parts, tmplPart{lit: rest})
			break
		}
		if rest[i] == '}' {
			return nil, fmt.Errorf("%q: '}' without '{'", s)
		}
		if i > 0 {
			t.parts = append(t.parts, tmplPart{lit: rest[:i]})
		}
		j := strings.IndexByte(rest[i:], '}')
		if j < 0 {
			return nil, fmt.Errorf("%q: '{' without '}'", s)
		}
		name := rest[i+1 : i+j]
		if !slices.Contains(fields, name) {
			return nil, fmt.Errorf("%q: unknown field {%s} (known: {%s})", s, name, strings.Join(fields, "}, {"))
		}
		t.parts = append(t.parts, tmplPart{field: name})
		rest = rest[i+j+1:]
	}
	if check != nil {
		if err := check(t.render(func(string) string { return "x" })); err != nil {
			return nil, fmt.Errorf("%q: %w", s, err)
		}
	}
	return t, nil
}

// render fills the placeholders with value(field).
func (t *template) render(value func(field string) string) string {
	var b strings.Builder
	for _, p := range t.parts {
		if p.field == "" {
			b.WriteString(p.lit)
		} else {
			b.WriteString(value(p.field))
		}
	}
	return b.String()
}

// bind fills the fields known when the sink is built (gateway, sink) and keeps the others as placeholders.
func (t *template) bind(static map[string]string) *template {
	out := &template{}
	for _, p := range t.parts {
		if v, ok := static[p.field]; ok && p.field != "" {
			p = tmplPart{lit: v}
		}
		if n := len(out.parts); n > 0 && p.field == "" && out.parts[n-1].field == "" {
			out.parts[n-1].lit += p.lit
			continue
		}
		out.parts = append(out.parts, p)
	}
	return out
}

// eventRenderer renders a bound event template for a record.
func (t *template) event(subject, typ string, sanitize func(string) string) string {
	return t.render(func(f string) string {
		switch f {
		case fieldSubject:
			return sanitize(subject)
		case fieldType:
			return sanitize(typ)
		}
		return ""
	})
}

func mqttTopicCheck(topic string) error {
	if strings.ContainsAny(topic, "+#\x00") {
		return errors.New("a topic name may not contain '+', '#' or NUL")
	}
	if strings.HasPrefix(topic, "$") {
		return errors.New("topics starting with '$' are reserved to the broker")
	}
	return nil
}

func natsSubjectCheck(subject string) error {
	if strings.ContainsAny(subject, " \t\r\n*>") {
		return errors.New("a subject may not contain whitespace, '*' or '>'")
	}
	if slices.Contains(strings.Split(subject, "."), "") {
		return errors.New("a subject may not have empty tokens (leading, trailing or double '.')")
	}
	return nil
}

// mqttLevel makes s one valid MQTT topic level: '+', '#', '/' and NUL become '_', as does a leading '$' (such
// topics are the broker's); "" becomes "_".
func mqttLevel(s string) string {
	if s == "" {
		return "_"
	}
	if s[0] == '$' {
		s = "_" + s[1:]
	}
	if !strings.ContainsAny(s, "+#/\x00") {
		return s
	}
	return strings.Map(func(r rune) rune {
		switch r {
		case '+', '#', '/', 0:
			return '_'
		}
		return r
	}, s)
}

// natsTokens makes s valid inside a NATS subject: whitespace, '*' and '>' become '_', dots are kept but an empty
// token (leading, trailing or double dot, or "") becomes "_".
func natsTokens(s string) string {
	if s == "" {
		return "_"
	}
	clean := !strings.ContainsAny(s, " \t\r\n*>") && !strings.HasPrefix(s, ".") && !strings.HasSuffix(s, ".") &&
		!strings.Contains(s, "..")
	if clean {
		return s
	}
	s = strings.Map(func(r rune) rune {
		switch r {
		case ' ', '\t', '\r', '\n', '*', '>':
			return '_'
		}
		return r
	}, s)
	toks := strings.Split(s, ".")
	for i, tok := range toks {
		if tok == "" {
			toks[i] = "_"
		}
	}
	return strings.Join(toks, ".")
}

// commandTopic is a parsed command topic template: levels, with {device} and {command} each filling a level.
type commandTopic struct {
	levels  []*template
	device  int
	command int
	filter  string   // the subscription: + for device and command
	fixed   []string // the bound levels ("" at device and command)
}

func parseCommandTopic(s string) (*commandTopic, error) {
	if s == "" {
		return nil, errors.New("empty")
	}
	if strings.ContainsAny(s, "+#\x00") {
		return nil, fmt.Errorf("%q: wildcards are added by the sink; use {device} and {command}", s)
	}
	ct := &commandTopic{device: -1, command: -1}
	for i, lvl := range strings.Split(s, "/") {
		t, err := parseTemplate(lvl, []string{fieldGateway, fieldSink, fieldDevice, fieldCommand}, nil)
		if err != nil && lvl != "" {
			return nil, fmt.Errorf("%q: %w", s, err)
		}
		if t == nil {
			t = &template{}
		}
		for _, p := range t.parts {
			if p.field != fieldDevice && p.field != fieldCommand {
				continue
			}
			if len(t.parts) != 1 {
				return nil, fmt.Errorf("%q: {%s} must fill a whole topic level", s, p.field)
			}
			idx := &ct.device
			if p.field == fieldCommand {
				idx = &ct.command
			}
			if *idx >= 0 {
				return nil, fmt.Errorf("%q: {%s} appears twice", s, p.field)
			}
			*idx = i
		}
		ct.levels = append(ct.levels, t)
	}
	if ct.device < 0 || ct.command < 0 {
		return nil, fmt.Errorf("%q: needs both {device} and {command}", s)
	}
	return ct, nil
}

// bind fills gateway and sink and computes the subscription filter.
func (ct *commandTopic) bind(gateway, sink string) {
	ct.fixed = make([]string, len(ct.levels))
	filter := make([]string, len(ct.levels))
	for i, lvl := range ct.levels {
		switch i {
		case ct.device, ct.command:
			filter[i] = "+"
		default:
			ct.fixed[i] = lvl.render(func(f string) string {
				if f == fieldGateway {
					return mqttLevel(gateway)
				}
				return mqttLevel(sink)
			})
			filter[i] = ct.fixed[i]
		}
	}
	ct.filter = strings.Join(filter, "/")
}

// match extracts device and command from a topic the filter matched.
func (ct *commandTopic) match(topic string) (device, command string, ok bool) {
	levels := strings.Split(topic, "/")
	if len(levels) != len(ct.fixed) {
		return "", "", false
	}
	for i, l := range levels {
		switch i {
		case ct.device:
			device = l
		case ct.command:
			command = l
		default:
			if l != ct.fixed[i] {
				return "", "", false
			}
		}
	}
	return device, command, device != "" && command != ""
}

// wildcards is the command subscription as a template: + for {device} and {command}, the other fields kept.
func (ct *commandTopic) wildcards() string {
	levels := make([]string, len(ct.levels))
	for i, lvl := range ct.levels {
		levels[i] = lvl.render(func(f string) string {
			if f == fieldDevice || f == fieldCommand {
				return "+"
			}
			return "{" + f + "}"
		})
	}
	return strings.Join(levels, "/")
}

// couldMatch reports whether some rendering of the topic template t could match the command subscription.
// Values unknown when the configuration is checked count as any text that fits in one level: {device} and
// {command} are + in the subscription, and every other field, of either template, stands for any non-empty
// text without '/' (a field's value never holds one).
func (ct *commandTopic) couldMatch(t *template) bool {
	levels := t.levels()
	if len(levels) != len(ct.levels) {
		return false
	}
	for i, lvl := range levels {
		if i == ct.device || i == ct.command {
			continue // + matches any level, an empty one too
		}
		if !levelsOverlap(lvl, ct.levels[i].parts) {
			return false
		}
	}
	return true
}

// levels splits the template at the '/' of its literal text into the parts of each topic level.
func (t *template) levels() [][]tmplPart {
	out := [][]tmplPart{nil}
	for _, p := range t.parts {
		if p.field != "" {
			out[len(out)-1] = append(out[len(out)-1], p)
			continue
		}
		for i, lit := range strings.Split(p.lit, "/") {
			if i > 0 {
				out = append(out, nil)
			}
			if lit != "" {
				out[len(out)-1] = append(out[len(out)-1], tmplPart{lit: lit})
			}
		}
	}
	return out
}

// patTok is one step of a level pattern: a literal byte, any one byte, or any run of bytes (a field is any one
// byte followed by any run: its value is never empty).
type patTok struct {
	kind byte // patLit, patAny or patRun
	c    byte
}

const (
	patLit = iota
	patAny
	patRun
)

func levelPattern(parts []tmplPart) []patTok {
	var p []patTok
	for _, part := range parts {
		if part.field != "" {
			p = append(p, patTok{kind: patAny}, patTok{kind: patRun})
			continue
		}
		for i := range len(part.lit) {
			p = append(p, patTok{kind: patLit, c: part.lit[i]})
		}
	}
	return p
}

// levelsOverlap reports whether one text matches both level patterns: a search of the pairs of positions the two
// can be at after the same text, over the bytes either names and one byte neither does.
func levelsOverlap(a, b []tmplPart) bool {
	pa, pb := levelPattern(a), levelPattern(b)
	alphabet := []byte{0} // 0 stands for every byte neither pattern names (templates hold no NUL)
	for _, p := range [][]patTok{pa, pb} {
		for _, t := range p {
			if t.kind == patLit && !slices.Contains(alphabet, t.c) {
				alphabet = append(alphabet, t.c)
			}
		}
	}
	type pos struct{ i, j int }
	seen := map[pos]bool{}
	var queue []pos
	add := func(is, js []int) {
		for _, i := range is {
			for _, j := range js {
				if p := (pos{i, j}); !seen[p] {
					seen[p] = true
					queue = append(queue, p)
				}
			}
		}
	}
	add(patClosure(pa, 0), patClosure(pb, 0))
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if p.i == len(pa) && p.j == len(pb) {
			return true
		}
		for _, c := range alphabet {
			add(patStep(pa, p.i, c), patStep(pb, p.j, c))
		}
	}
	return false
}

// patClosure is position i and those a run at i lets the pattern skip to without consuming a byte.
func patClosure(p []patTok, i int) []int {
	out := []int{i}
	for i < len(p) && p[i].kind == patRun {
		i++
		out = append(out, i)
	}
	return out
}

// patStep returns the positions the pattern can be at after consuming c at position i.
func patStep(p []patTok, i int, c byte) []int {
	if i >= len(p) {
		return nil
	}
	switch t := p[i]; {
	case t.kind == patRun:
		return patClosure(p, i)
	case t.kind == patAny, t.c == c:
		return patClosure(p, i+1)
	}
	return nil
}
