package rules

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
)

// ErrInvalidRules is returned (wrapped in a *LoadError) when a rule set has problems.
var ErrInvalidRules = errors.New("invalid rules")

// Problem is one thing wrong in a rule file.
type Problem struct {
	File    string `json:"file"`
	Line    int    `json:"line"`
	Key     string `json:"key"`
	Message string `json:"message"`
}

func (p Problem) String() string {
	loc := p.File
	if p.Line > 0 {
		loc = fmt.Sprintf("%s:%d", p.File, p.Line)
	}
	if p.Key == "" {
		return loc + ": " + p.Message
	}
	return loc + ": " + p.Key + ": " + p.Message
}

// LoadError lists every problem found in a rule set. errors.Is(err, ErrInvalidRules) is true for it.
type LoadError struct {
	Problems []Problem
}

func (e *LoadError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "rules: %d problem(s):", len(e.Problems))
	for _, p := range e.Problems {
		b.WriteString("\n  ")
		b.WriteString(p.String())
	}
	return b.String()
}

// Is makes errors.Is(err, ErrInvalidRules) true.
func (e *LoadError) Is(target error) bool { return target == ErrInvalidRules }

// Limits of the rule format.
const (
	maxDuration    = 366 * 24 * time.Hour
	maxWindowParts = 1000 // size / slide
	maxFileBytes   = 4 << 20
)

var (
	nameRE    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	typeRE    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$`)
	commandRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
)

// loader reads one rule set; problems collect across files.
type loader struct {
	dir      Directory
	problems []Problem
	warnings []string
	file     string
}

func (l *loader) errf(n ast.Node, key, format string, args ...any) {
	l.problems = append(l.problems, Problem{File: l.file, Line: lineOf(n), Key: key, Message: fmt.Sprintf(format, args...)})
}

// lineOf returns the line of a node (0 when unknown).
func lineOf(n ast.Node) int {
	if n == nil {
		return 0
	}
	switch x := n.(type) {
	case *ast.MappingNode:
		if len(x.Values) > 0 {
			return lineOf(x.Values[0])
		}
	case *ast.MappingValueNode:
		if x.Key != nil {
			if l := lineOf(x.Key); l > 0 {
				return l
			}
		}
	case *ast.SequenceNode:
		if x.Start == nil && len(x.Values) > 0 {
			return lineOf(x.Values[0])
		}
	case *ast.LiteralNode:
		if x.Start != nil {
			return x.Start.Position.Line
		}
	case *ast.AnchorNode:
		if x.Value != nil {
			return lineOf(x.Value)
		}
	case *ast.TagNode:
		if x.Value != nil {
			return lineOf(x.Value)
		}
	}
	if tk := n.GetToken(); tk != nil && tk.Position != nil {
		return tk.Position.Line
	}
	return 0
}

// loadDir reads every *.yaml / *.yml file in dir (sorted by name) and compiles the rules.
func loadDir(dir string, d Directory) ([]*rule, []string, error) {
	if dir == "" {
		return nil, nil, nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("rules: read dir: %w", err)
	}
	var names []string
	for _, e := range entries {
		n := e.Name()
		if e.IsDir() || strings.HasPrefix(n, ".") {
			continue
		}
		if ext := filepath.Ext(n); ext == ".yaml" || ext == ".yml" {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	l := &loader{dir: d}
	var all []*rule
	for _, n := range names {
		path := filepath.Join(dir, n)
		data, err := readLimited(path)
		if err != nil {
			l.problems = append(l.problems, Problem{File: path, Message: err.Error()})
			continue
		}
		all = append(all, l.parseFile(path, data)...)
	}
	return l.finish(all)
}

func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Size() > maxFileBytes {
		return nil, fmt.Errorf("file is %d bytes, more than the %d allowed", fi.Size(), maxFileBytes)
	}
	return os.ReadFile(path)
}

// parseRules compiles one file's bytes (used by tests and the fuzz target).
func parseRules(name string, data []byte, d Directory) ([]*rule, []string, error) {
	l := &loader{dir: d}
	return l.finish(l.parseFile(name, data))
}

// finish checks what spans files (unique names) and numbers the rules.
func (l *loader) finish(all []*rule) ([]*rule, []string, error) {
	seen := map[string]*rule{}
	for _, r := range all {
		if o, ok := seen[r.name]; ok {
			l.problems = append(l.problems, Problem{File: r.file, Line: r.line, Key: r.path + ".name",
				Message: fmt.Sprintf("rule %q is already defined at %s:%d", r.name, o.file, o.line)})
			continue
		}
		seen[r.name] = r
	}
	if len(l.problems) > 0 {
		return nil, l.warnings, &LoadError{Problems: l.problems}
	}
	var out []*rule
	for _, r := range all {
		if r.disabled {
			continue
		}
		r.index = len(out)
		out = append(out, r)
	}
	return out, l.warnings, nil
}

// errYAMLPanic marks the error of parseYAML when the YAML parser panicked; errLoaderPanic starts the problem
// recorded when the loader itself panicked on a file.
var (
	errYAMLPanic   = errors.New("YAML parser failed")
	errLoaderPanic = errors.New("internal error while loading this file")
)

// parseYAML parses data into YAML documents. The parser is third-party code fed operator files: a panic in it is
// returned as an error wrapping errYAMLPanic rather than taking the gateway down. A panic in the loader's own code
// is a bug, reported apart (errLoaderPanic, see parseFile).
func parseYAML(data []byte) (f *ast.File, err error) {
	defer func() {
		if p := recover(); p != nil {
			f, err = nil, fmt.Errorf("%w: %v", errYAMLPanic, p)
		}
	}()
	return parser.ParseBytes(data, 0)
}

func (l *loader) parseFile(name string, data []byte) (rules []*rule) {
	l.file = name
	first := len(l.problems)
	defer func() {
		// report a file's problems in line order
		ps := l.problems[first:]
		sort.SliceStable(ps, func(i, j int) bool { return ps[i].Line < ps[j].Line })
	}()
	defer func() {
		// A panic in the loader is a bug (FuzzLoadRules fails on it), but a rule file must never take the running
		// gateway down: the file is reported as not loaded, and the rules in force stay.
		if p := recover(); p != nil {
			l.problems = append(l.problems, Problem{File: name, Message: fmt.Sprintf("%v: %v", errLoaderPanic, p)})
			rules = nil
		}
	}()
	f, err := parseYAML(data)
	if errors.Is(err, errYAMLPanic) {
		l.problems = append(l.problems, Problem{File: name, Message: err.Error()})
		return nil
	}
	if err != nil {
		line := 0
		var ye yaml.Error
		if errors.As(err, &ye) && ye.GetToken() != nil && ye.GetToken().Position != nil {
			line = ye.GetToken().Position.Line
		}
		msg := err.Error()
		if ye != nil {
			msg = ye.GetMessage()
		}
		l.problems = append(l.problems, Problem{File: name, Line: line, Message: "YAML: " + msg})
		return nil
	}
	var body ast.Node
	for _, doc := range f.Docs {
		if doc == nil || doc.Body == nil {
			continue
		}
		if _, ok := doc.Body.(*ast.CommentGroupNode); ok {
			continue
		}
		if body != nil {
			l.errf(doc.Body, "", "only one YAML document per file")
			return nil
		}
		body = doc.Body
	}
	if body == nil {
		return nil // an empty file holds no rules
	}
	top := l.fields(body, "", "rules")
	if top == nil {
		return nil
	}
	rn, ok := top["rules"]
	if !ok {
		l.errf(body, "rules", "missing: a rule file is a mapping with a rules: list")
		return nil
	}
	if isNull(rn) {
		return nil
	}
	seq, ok := unwrap(rn).(*ast.SequenceNode)
	if !ok {
		l.errf(rn, "rules", "must be a list of rules, got %s", kindOf(rn))
		return nil
	}
	for i, item := range seq.Values {
		if r := l.rule(item, fmt.Sprintf("rules[%d]", i)); r != nil {
			rules = append(rules, r)
		}
	}
	return rules
}

// unwrap strips tags, anchors and comments; aliases are left for the caller to reject.
func unwrap(n ast.Node) ast.Node {
	for {
		switch x := n.(type) {
		case *ast.TagNode:
			n = x.Value
		case *ast.AnchorNode:
			n = x.Value
		default:
			return n
		}
	}
}

func isNull(n ast.Node) bool {
	if n == nil {
		return true
	}
	_, ok := unwrap(n).(*ast.NullNode)
	return ok
}

func kindOf(n ast.Node) string {
	switch unwrap(n).(type) {
	case *ast.MappingNode, *ast.MappingValueNode:
		return "a mapping"
	case *ast.SequenceNode:
		return "a list"
	case *ast.NullNode, nil:
		return "nothing"
	case *ast.AliasNode:
		return "an alias"
	}
	return "a scalar"
}

// mapEntries returns the entries of a mapping node (nil, false if it is not one).
func mapEntries(n ast.Node) ([]*ast.MappingValueNode, bool) {
	switch x := unwrap(n).(type) {
	case *ast.MappingNode:
		return x.Values, true
	case *ast.MappingValueNode:
		return []*ast.MappingValueNode{x}, true
	}
	return nil, false
}

func keyString(k ast.MapKeyNode) string {
	switch x := k.(type) {
	case *ast.StringNode:
		return x.Value
	case *ast.MappingKeyNode:
		if x.Value != nil {
			return x.Value.String()
		}
	}
	if k == nil {
		return ""
	}
	return k.String()
}

// fields reads a mapping whose keys must be among allowed (nil allowed = any key). It reports unknown and
// duplicate keys and returns nil if n is not a mapping.
func (l *loader) fields(n ast.Node, path string, allowed ...string) map[string]ast.Node {
	entries, ok := mapEntries(n)
	if !ok {
		if path == "" {
			l.errf(n, path, "a rule file is a mapping with a rules: list, got %s", kindOf(n))
		} else {
			l.errf(n, path, "must be a mapping, got %s", kindOf(n))
		}
		return nil
	}
	out := make(map[string]ast.Node, len(entries))
	for _, e := range entries {
		k := keyString(e.Key)
		kp := join(path, k)
		if _, dup := out[k]; dup {
			l.errf(e, kp, "duplicate key")
			continue
		}
		if allowed != nil && !contains(allowed, k) {
			l.errf(e, kp, "unknown key (allowed: %s)", strings.Join(allowed, ", "))
			continue
		}
		v := e.Value
		if v == nil {
			v = &ast.NullNode{BaseNode: &ast.BaseNode{}, Token: e.GetToken()}
		}
		out[k] = v
	}
	return out
}

// keysInOrder returns a mapping's keys in file order.
func keysInOrder(n ast.Node) []string {
	entries, _ := mapEntries(n)
	keys := make([]string, 0, len(entries))
	for _, e := range entries {
		keys = append(keys, keyString(e.Key))
	}
	return keys
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// scalar returns the text of a scalar node; ok is false (and a problem recorded) for anything else.
func (l *loader) scalar(n ast.Node, path string) (string, bool) {
	switch x := unwrap(n).(type) {
	case *ast.StringNode:
		return x.Value, true
	case *ast.LiteralNode:
		if x.Value != nil {
			return strings.TrimRight(x.Value.Value, "\n"), true
		}
		return "", true
	case *ast.IntegerNode, *ast.FloatNode, *ast.BoolNode, *ast.InfinityNode, *ast.NanNode:
		return x.GetToken().Value, true
	}
	l.errf(n, path, "must be a string, got %s", kindOf(n))
	return "", false
}

func (l *loader) str(n ast.Node, path string) (string, bool) {
	if n == nil {
		return "", false
	}
	return l.scalar(n, path)
}

func (l *loader) boolean(n ast.Node, path string) bool {
	if b, ok := unwrap(n).(*ast.BoolNode); ok {
		return b.Value
	}
	l.errf(n, path, "must be true or false, got %s", kindOf(n))
	return false
}

func (l *loader) duration(n ast.Node, path string) (time.Duration, bool) {
	s, ok := l.scalar(n, path)
	if !ok {
		return 0, false
	}
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		l.errf(n, path, "%q is not a duration (like 30s, 5m, 1h30m)", s)
		return 0, false
	}
	if d <= 0 {
		l.errf(n, path, "must be > 0, got %s", d)
		return 0, false
	}
	if d > maxDuration {
		l.errf(n, path, "must be at most %s, got %s", maxDuration, d)
		return 0, false
	}
	return d, true
}

func (l *loader) expr(n ast.Node, path string, asBool bool) *cexpr {
	s, ok := l.scalar(n, path)
	if !ok {
		return nil
	}
	c, err := compileExpr(s, asBool)
	if err != nil {
		l.errf(n, path, "expression %q: %v", s, err)
		return nil
	}
	return c
}

func (l *loader) template(n ast.Node, path string) *template {
	s, ok := l.scalar(n, path)
	if !ok {
		return nil
	}
	t, err := compileTemplate(s)
	if err != nil {
		l.errf(n, path, "template: %v", err)
		return nil
	}
	return t
}

// value decodes arbitrary YAML (structured template data).
func (l *loader) value(n ast.Node, path string) *vtemplate {
	var v any
	if err := yaml.NodeToValue(n, &v); err != nil {
		msg := err.Error()
		var ye yaml.Error
		if errors.As(err, &ye) {
			msg = ye.GetMessage()
		}
		l.errf(n, path, "%s", msg)
		return nil
	}
	vt, err := compileValue(normalizeYAML(v))
	if err != nil {
		l.errf(n, path, "%v", err)
		return nil
	}
	return vt
}

// normalizeYAML turns the YAML decoder's maps with non-string keys into map[string]any.
func normalizeYAML(v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, val := range x {
			x[k] = normalizeYAML(val)
		}
		return x
	case map[any]any:
		out := make(map[string]any, len(x))
		for k, val := range x {
			out[fmt.Sprint(k)] = normalizeYAML(val)
		}
		return out
	case []any:
		for i, val := range x {
			x[i] = normalizeYAML(val)
		}
		return x
	case uint64:
		return float64(x)
	case int:
		return int64(x)
	}
	return v
}

// pattern reads a type/source/subject pattern.
func (l *loader) pattern(n ast.Node, path string, re *regexp.Regexp) (pattern, bool) {
	s, ok := l.scalar(n, path)
	if !ok {
		return pattern{}, false
	}
	if s == "" {
		l.errf(n, path, "must not be empty (leave the key out to match anything)")
		return pattern{}, false
	}
	if re != nil && !re.MatchString(strings.ReplaceAll(s, "*", "x")) {
		l.errf(n, path, "%q is not a valid pattern (letters, digits, . _ - : / and * as wildcard)", s)
		return pattern{}, false
	}
	return newPattern(s), true
}

var selectorKeys = []string{"id", "name", "room", "kind"}

func validSelectorKey(k string) bool {
	if contains(selectorKeys, k) {
		return true
	}
	label, ok := strings.CutPrefix(k, "labels.")
	return ok && label != ""
}

// matcher reads an `on` block or a sequence/absence step. A plain string is a type pattern. withWhen allows a
// `when:` inside (steps).
func (l *loader) matcher(n ast.Node, path string, withWhen bool) *matcher {
	m := &matcher{}
	if _, ok := unwrap(n).(*ast.StringNode); ok {
		if p, ok := l.pattern(n, path, typeRE); ok {
			m.typ = p
		}
		return m
	}
	allowed := []string{"type", "source", "subject", "device"}
	if withWhen {
		allowed = append(allowed, "when")
	}
	f := l.fields(n, path, allowed...)
	if f == nil {
		return m
	}
	if v, ok := f["type"]; ok {
		m.typ, _ = l.pattern(v, join(path, "type"), typeRE)
	}
	if v, ok := f["source"]; ok {
		m.source, _ = l.pattern(v, join(path, "source"), nil)
	}
	if v, ok := f["subject"]; ok {
		m.subject, _ = l.pattern(v, join(path, "subject"), nil)
	}
	if v, ok := f["device"]; ok {
		dp := join(path, "device")
		df := l.fields(v, dp)
		for _, k := range keysInOrder(v) {
			val, ok := df[k]
			if !ok {
				continue
			}
			if !validSelectorKey(k) {
				l.errf(val, join(dp, k), "unknown device key (use id, name, room, kind or labels.NAME)")
				continue
			}
			if p, ok := l.pattern(val, join(dp, k), nil); ok {
				m.device = append(m.device, deviceCond{key: k, pat: p})
			}
		}
	}
	if v, ok := f["when"]; ok {
		m.when = l.expr(v, join(path, "when"), true)
	}
	return m
}

var ruleKeys = []string{"name", "description", "disabled", "on", "when", "key", "debounce", "throttle",
	"window", "sequence", "absence", "actions"}

func (l *loader) rule(n ast.Node, path string) *rule {
	f := l.fields(n, path, ruleKeys...)
	if f == nil {
		return nil
	}
	before := len(l.problems)
	r := &rule{file: l.file, line: lineOf(n), path: path, on: &matcher{}}
	if v, ok := f["name"]; ok {
		if s, ok := l.str(v, join(path, "name")); ok {
			if !nameRE.MatchString(s) {
				l.errf(v, join(path, "name"), "%q must be 1-64 letters, digits, '.', '_' or '-'", s)
			}
			r.name = s
		}
	} else {
		l.errf(n, join(path, "name"), "missing: every rule needs a name")
	}
	if v, ok := f["description"]; ok {
		r.description, _ = l.str(v, join(path, "description"))
	}
	if v, ok := f["disabled"]; ok {
		r.disabled = l.boolean(v, join(path, "disabled"))
	}
	if v, ok := f["on"]; ok {
		r.on = l.matcher(v, join(path, "on"), false)
	}
	if v, ok := f["when"]; ok {
		r.when = l.expr(v, join(path, "when"), true)
	}
	if v, ok := f["key"]; ok {
		r.key = l.expr(v, join(path, "key"), false)
	}
	if v, ok := f["debounce"]; ok {
		r.debounce, _ = l.duration(v, join(path, "debounce"))
	}
	if v, ok := f["throttle"]; ok {
		r.throttle, _ = l.duration(v, join(path, "throttle"))
	}
	var temporal []string
	if v, ok := f["window"]; ok {
		r.kind = kindWindow
		r.window = l.window(v, join(path, "window"))
		temporal = append(temporal, "window")
	}
	if v, ok := f["sequence"]; ok {
		r.kind = kindSequence
		r.pair = l.pair(v, join(path, "sequence"), "first", "then")
		temporal = append(temporal, "sequence")
	}
	if v, ok := f["absence"]; ok {
		r.kind = kindAbsence
		r.pair = l.pair(v, join(path, "absence"), "after", "missing")
		temporal = append(temporal, "absence")
	}
	if len(temporal) > 1 {
		l.errf(n, path, "a rule has at most one of window, sequence, absence; this one has %s", strings.Join(temporal, ", "))
	}
	if r.debounce > 0 && r.throttle > 0 {
		l.errf(f["throttle"], join(path, "throttle"), "use debounce or throttle, not both")
	}
	if r.pair != nil && r.on.typ.isSet() {
		for i, st := range []*matcher{r.pair.a, r.pair.b} {
			name := []string{r.pair.aName, r.pair.bName}[i]
			if st != nil && st.typ.isSet() && st.typ.disjoint(r.on.typ) {
				l.errf(f["on"], join(path, "on.type"), "%s excludes every event of %s.%s (%s): leave on.type out",
					r.on.typ.raw, r.kind, name, st.typ.raw)
			}
		}
	}
	if v, ok := f["actions"]; ok {
		r.actions = l.actions(v, join(path, "actions"))
	} else {
		l.errf(n, join(path, "actions"), "missing: a rule needs at least one action")
	}
	if len(l.problems) > before {
		return nil
	}
	r.finish()
	return r
}

func (l *loader) window(n ast.Node, path string) *windowSpec {
	f := l.fields(n, path, "size", "slide", "agg", "value", "group_by", "emit", "threshold")
	if f == nil {
		return nil
	}
	w := &windowSpec{agg: "count", emit: "close"}
	if v, ok := f["size"]; ok {
		w.size, _ = l.duration(v, join(path, "size"))
	} else {
		l.errf(n, join(path, "size"), "missing: how long a window lasts, e.g. 5m")
	}
	w.slide = w.size
	if v, ok := f["slide"]; ok {
		if s, ok := l.duration(v, join(path, "slide")); ok && w.size > 0 {
			switch {
			case s > w.size:
				l.errf(v, join(path, "slide"), "must be at most size (%s), got %s", w.size, s)
			case w.size%s != 0:
				l.errf(v, join(path, "slide"), "size (%s) must be a whole multiple of slide (%s)", w.size, s)
			case w.size/s > maxWindowParts:
				l.errf(v, join(path, "slide"), "size / slide must be at most %d, got %d", maxWindowParts, w.size/s)
			default:
				w.slide = s
			}
		}
	}
	if v, ok := f["agg"]; ok {
		if s, ok := l.str(v, join(path, "agg")); ok {
			if !contains([]string{"count", "sum", "avg", "min", "max"}, s) {
				l.errf(v, join(path, "agg"), "%q is not count, sum, avg, min or max", s)
			}
			w.agg = s
		}
	}
	if v, ok := f["value"]; ok {
		w.value = l.expr(v, join(path, "value"), false)
	} else if w.agg != "count" {
		l.errf(n, join(path, "value"), "missing: agg %s needs a value expression, e.g. data.temp", w.agg)
	}
	if v, ok := f["group_by"]; ok {
		w.groupBy = l.expr(v, join(path, "group_by"), false)
	}
	if v, ok := f["emit"]; ok {
		if s, ok := l.str(v, join(path, "emit")); ok {
			if s != "close" && s != "crossing" {
				l.errf(v, join(path, "emit"), "%q is not close or crossing", s)
			}
			w.emit = s
		}
	}
	if v, ok := f["threshold"]; ok {
		w.threshold = l.expr(v, join(path, "threshold"), true)
	} else if w.emit == "crossing" {
		l.errf(n, join(path, "threshold"), "missing: emit crossing needs a threshold, e.g. window.value > 30")
	}
	return w
}

func (l *loader) pair(n ast.Node, path, aName, bName string) *pairSpec {
	f := l.fields(n, path, aName, bName, "within", "key")
	if f == nil {
		return nil
	}
	p := &pairSpec{aName: aName, bName: bName}
	if v, ok := f[aName]; ok {
		p.a = l.matcher(v, join(path, aName), true)
	} else {
		l.errf(n, join(path, aName), "missing")
	}
	if v, ok := f[bName]; ok {
		p.b = l.matcher(v, join(path, bName), true)
	} else {
		l.errf(n, join(path, bName), "missing")
	}
	if v, ok := f["within"]; ok {
		p.within, _ = l.duration(v, join(path, "within"))
	} else {
		l.errf(n, join(path, "within"), "missing: how long to wait, e.g. 5m")
	}
	if v, ok := f["key"]; ok {
		p.key = l.expr(v, join(path, "key"), false)
	}
	return p
}

func (l *loader) actions(n ast.Node, path string) []*action {
	seq, ok := unwrap(n).(*ast.SequenceNode)
	if !ok {
		l.errf(n, path, "must be a list of actions, got %s", kindOf(n))
		return nil
	}
	if len(seq.Values) == 0 {
		l.errf(n, path, "a rule needs at least one action")
	}
	var out []*action
	for i, item := range seq.Values {
		ap := fmt.Sprintf("%s[%d]", path, i)
		before := len(l.problems)
		f := l.fields(item, ap, "command", "emit", "state")
		if f == nil || (len(f) == 0 && len(l.problems) > before) {
			continue
		}
		if len(f) != 1 {
			l.errf(item, ap, "an action is exactly one of command, emit, state")
			continue
		}
		a := &action{line: lineOf(item)}
		for k, v := range f {
			switch k {
			case "command":
				a.kind = actCommand
				l.command(a, v, join(ap, k))
			case "emit":
				a.kind = actEmit
				l.emit(a, v, join(ap, k))
			case "state":
				a.kind = actState
				l.state(a, v, join(ap, k))
			}
		}
		out = append(out, a)
	}
	return out
}

func (l *loader) payload(n ast.Node, path string) *payload {
	switch unwrap(n).(type) {
	case *ast.StringNode, *ast.LiteralNode:
		if t := l.template(n, path); t != nil {
			return &payload{text: t}
		}
		return nil
	case *ast.NullNode:
		return nil
	}
	if vt := l.value(n, path); vt != nil {
		return &payload{data: vt}
	}
	return nil
}

func (l *loader) command(a *action, n ast.Node, path string) {
	f := l.fields(n, path, "device", "to", "command", "payload")
	if f == nil {
		return
	}
	dv, hasDevice := f["device"]
	tv, hasTo := f["to"]
	switch {
	case hasDevice && hasTo:
		l.errf(n, path, "use device (one named device) or to (a selector), not both")
	case !hasDevice && !hasTo:
		l.errf(n, path, "missing: device (a device id) or to (a selector like {kind: light, room: kitchen})")
	case hasDevice:
		a.device = l.template(dv, join(path, "device"))
		if a.device != nil {
			if id, lit := a.device.literal(); lit {
				l.checkDevice(dv, join(path, "device"), id)
			}
		}
	case hasTo:
		tp := join(path, "to")
		tf := l.fields(tv, tp)
		if tf != nil && len(tf) == 0 {
			l.errf(tv, tp, "an empty selector would pick every device; name at least one key")
		}
		for _, k := range keysInOrder(tv) {
			v, ok := tf[k]
			if !ok {
				continue
			}
			if !validSelectorKey(k) {
				l.errf(v, join(tp, k), "unknown selector key (use id, name, room, kind or labels.NAME)")
				continue
			}
			if t := l.template(v, join(tp, k)); t != nil {
				a.to = append(a.to, selTmpl{key: k, val: t})
			}
		}
	}
	if v, ok := f["command"]; ok {
		if s, ok := l.str(v, join(path, "command")); ok {
			if !commandRE.MatchString(s) {
				l.errf(v, join(path, "command"), "%q must be 1-128 letters, digits, '.', '_' or '-'", s)
			}
			a.command = s
		}
	} else {
		l.errf(n, join(path, "command"), "missing: the command name, e.g. lights.on")
	}
	if v, ok := f["payload"]; ok {
		a.payload = l.payload(v, join(path, "payload"))
	}
}

func (l *loader) checkDevice(n ast.Node, path, id string) {
	if l.dir == nil {
		l.warnings = append(l.warnings, fmt.Sprintf("%s:%d: %s: device %q not checked: no device directory", l.file, lineOf(n), path, id))
		return
	}
	if _, ok := l.dir.Device(id); !ok {
		l.errf(n, path, "unknown device %q (not in the device registry)", id)
	}
}

func (l *loader) emit(a *action, n ast.Node, path string) {
	f := l.fields(n, path, "type", "subject", "data")
	if f == nil {
		return
	}
	if v, ok := f["type"]; ok {
		if s, ok := l.str(v, join(path, "type")); ok {
			if !typeRE.MatchString(s) {
				l.errf(v, join(path, "type"), "%q is not a valid event type", s)
			}
			a.evType = s
		}
	} else {
		l.errf(n, join(path, "type"), "missing: the type of the derived event, e.g. room.occupied")
	}
	if v, ok := f["subject"]; ok {
		a.subject = l.template(v, join(path, "subject"))
	}
	if v, ok := f["data"]; ok {
		a.payload = l.payload(v, join(path, "data"))
	}
}

func (l *loader) state(a *action, n ast.Node, path string) {
	f := l.fields(n, path, "device", "key", "value")
	if f == nil {
		return
	}
	if v, ok := f["device"]; ok {
		a.device = l.template(v, join(path, "device"))
	}
	if v, ok := f["key"]; ok {
		if t := l.template(v, join(path, "key")); t != nil {
			if s, lit := t.literal(); lit && s == "" {
				l.errf(v, join(path, "key"), "must not be empty")
			}
			a.stateKey = t
		}
	} else {
		l.errf(n, join(path, "key"), "missing: the state key to set")
	}
	if v, ok := f["value"]; ok {
		a.value = l.value(v, join(path, "value"))
	} else {
		l.errf(n, join(path, "value"), "missing: the value to set (a template like '{{ data.temp }}' keeps its type)")
	}
}

// Check loads the rule files of dir as New would (named devices are checked against d when it is not nil) and
// describes the rules, without running anything. It is what `edgegate check-config` needs.
func Check(dir string, d Directory) ([]RuleInfo, error) {
	rules, _, err := loadDir(dir, d)
	if err != nil {
		return nil, err
	}
	return newRuleSet(rules).infos(), nil
}
