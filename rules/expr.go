package rules

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/expr-lang/expr"
	"github.com/expr-lang/expr/ast"
	"github.com/expr-lang/expr/file"
	"github.com/expr-lang/expr/vm"
)

// env is what expressions and templates see. Fields that a rule never uses are not filled in (needs).
type env struct {
	Data   any            `expr:"data"`   // the event data: decoded JSON, or the text of a non-JSON payload
	Event  eventEnv       `expr:"event"`  // the event's attributes
	Device deviceEnv      `expr:"device"` // the metadata of the event's subject
	State  map[string]any `expr:"state"`  // the subject's state in the state view
	Now    time.Time      `expr:"now"`    // the engine's clock
	Window windowEnv      `expr:"window"` // window rules: the aggregate of the window
	First  eventEnv       `expr:"first"`  // sequence rules: the event that started the sequence
}

type eventEnv struct {
	ID         string         `expr:"id"`
	Type       string         `expr:"type"`
	Source     string         `expr:"source"`
	Subject    string         `expr:"subject"`
	Time       time.Time      `expr:"time"`
	Extensions map[string]any `expr:"extensions"`
	Data       any            `expr:"data"`
}

type deviceEnv struct {
	ID     string            `expr:"id"`
	Name   string            `expr:"name"`
	Room   string            `expr:"room"`
	Kind   string            `expr:"kind"`
	Labels map[string]string `expr:"labels"`
	Known  bool              `expr:"known"` // the subject is in the directory
}

type windowEnv struct {
	Key   string    `expr:"key"`
	Count int64     `expr:"count"`
	Sum   float64   `expr:"sum"`
	Avg   float64   `expr:"avg"`
	Min   float64   `expr:"min"`
	Max   float64   `expr:"max"`
	Value float64   `expr:"value"` // the aggregate the rule asked for (agg)
	Start time.Time `expr:"start"`
	End   time.Time `expr:"end"`
}

// needs says which lazily built parts of env an expression reads.
type needs uint8

const (
	needData needs = 1 << iota
	needDevice
	needState
)

// cexpr is an expression compiled once at load.
type cexpr struct {
	src   string
	prog  *vm.Program
	needs needs
}

// coalesce returns its first argument that is neither nil nor an empty string (nil if there is none).
func coalesce(params ...any) (any, error) {
	for _, p := range params {
		if p == nil {
			continue
		}
		if s, ok := p.(string); ok && s == "" {
			continue
		}
		return p, nil
	}
	return nil, nil
}

var exprOptions = []expr.Option{
	expr.Env(&env{}),
	expr.Function("coalesce", coalesce),
	expr.Timezone("UTC"),
}

// compileExpr compiles src; asBool demands a boolean result.
func compileExpr(src string, asBool bool) (*cexpr, error) {
	if strings.TrimSpace(src) == "" {
		return nil, errors.New("empty expression")
	}
	opts := exprOptions
	if asBool {
		opts = append(opts[:len(opts):len(opts)], expr.AsBool())
	}
	prog, err := expr.Compile(src, opts...)
	if err != nil {
		return nil, exprError(err)
	}
	c := &cexpr{src: src, prog: prog}
	node := prog.Node()
	ast.Walk(&node, needsVisitor{&c.needs})
	return c, nil
}

// exprError flattens expr's multi-line error into one line with the column.
func exprError(err error) error {
	var fe *file.Error
	if errors.As(err, &fe) {
		if fe.Column > 0 || fe.Line > 1 {
			return fmt.Errorf("%s (at column %d)", fe.Message, fe.Column+1)
		}
		return errors.New(fe.Message)
	}
	return err
}

type needsVisitor struct{ n *needs }

func (v needsVisitor) Visit(node *ast.Node) {
	if m, ok := (*node).(*ast.MemberNode); ok {
		id, ok1 := m.Node.(*ast.IdentifierNode)
		prop, ok2 := m.Property.(*ast.StringNode)
		if ok1 && ok2 && id.Value == "event" && prop.Value == "data" {
			*v.n |= needData
		}
		return
	}
	id, ok := (*node).(*ast.IdentifierNode)
	if !ok {
		return
	}
	switch id.Value {
	case "data", "first", "window":
		*v.n |= needData
	case "device":
		*v.n |= needDevice
	case "state":
		*v.n |= needState
	}
}

func (c *cexpr) run(e *env) (any, error) {
	out, err := expr.Run(c.prog, e)
	if err != nil {
		return nil, exprError(err)
	}
	return out, nil
}

func (c *cexpr) bool(e *env) (bool, error) {
	out, err := c.run(e)
	if err != nil {
		return false, err
	}
	b, ok := out.(bool)
	if !ok {
		return false, fmt.Errorf("result is %T, not bool", out)
	}
	return b, nil
}

// key evaluates a key expression to a string; nil and "" are errors (a key must name something).
func (c *cexpr) key(e *env) (string, error) {
	out, err := c.run(e)
	if err != nil {
		return "", err
	}
	s := formatValue(out)
	if s == "" {
		return "", fmt.Errorf("key %s is empty", c.src)
	}
	return s, nil
}

// number evaluates a numeric expression.
func (c *cexpr) number(e *env) (float64, error) {
	out, err := c.run(e)
	if err != nil {
		return 0, err
	}
	return toFloat(out)
}

func toFloat(v any) (float64, error) {
	switch n := v.(type) {
	case float64:
		return n, nil
	case float32:
		return float64(n), nil
	case int:
		return float64(n), nil
	case int64:
		return float64(n), nil
	case int32:
		return float64(n), nil
	case uint64:
		return float64(n), nil
	case json.Number:
		return n.Float64()
	case string:
		f, err := strconv.ParseFloat(strings.TrimSpace(n), 64)
		if err != nil {
			return 0, fmt.Errorf("value %q is not a number", n)
		}
		return f, nil
	case bool:
		if n {
			return 1, nil
		}
		return 0, nil
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return float64(rv.Int()), nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return float64(rv.Uint()), nil
	case reflect.Float32, reflect.Float64:
		return rv.Float(), nil
	}
	return 0, fmt.Errorf("value %v (%T) is not a number", v, v)
}

// formatValue renders a value for a template or a key: strings as they are, whole numbers without a fraction,
// nil as "", times in RFC 3339, maps and lists as JSON.
func formatValue(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return x
	case bool:
		return strconv.FormatBool(x)
	case int:
		return strconv.Itoa(x)
	case int64:
		return strconv.FormatInt(x, 10)
	case int32:
		return strconv.FormatInt(int64(x), 10)
	case float64:
		return formatFloat(x)
	case float32:
		return formatFloat(float64(x))
	case time.Time:
		return x.UTC().Format(time.RFC3339Nano)
	case time.Duration:
		return x.String()
	case fmt.Stringer:
		return x.String()
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}

func formatFloat(f float64) string {
	if f == math.Trunc(f) && math.Abs(f) < 1e15 {
		return strconv.FormatInt(int64(f), 10)
	}
	return strconv.FormatFloat(f, 'g', -1, 64)
}

// template is a string with {{ expr }} segments. A template that is exactly one segment keeps the type of its
// value where the value is used as data (valueOf).
type template struct {
	raw    string
	parts  []tmplPart
	single *cexpr
	needs  needs
}

type tmplPart struct {
	lit string
	ex  *cexpr
}

// compileTemplate compiles every {{ }} segment of s.
func compileTemplate(s string) (*template, error) {
	t := &template{raw: s}
	rest := s
	for {
		i := strings.Index(rest, "{{")
		if i < 0 {
			if strings.Contains(rest, "}}") {
				return nil, errors.New(`"}}" without "{{"`)
			}
			if rest != "" {
				t.parts = append(t.parts, tmplPart{lit: rest})
			}
			break
		}
		if strings.Contains(rest[:i], "}}") {
			return nil, errors.New(`"}}" without "{{"`)
		}
		if i > 0 {
			t.parts = append(t.parts, tmplPart{lit: rest[:i]})
		}
		rest = rest[i+2:]
		j := strings.Index(rest, "}}")
		if j < 0 {
			return nil, errors.New(`"{{" without "}}"`)
		}
		src := strings.TrimSpace(rest[:j])
		c, err := compileExpr(src, false)
		if err != nil {
			return nil, fmt.Errorf("{{ %s }}: %w", src, err)
		}
		t.parts = append(t.parts, tmplPart{ex: c})
		t.needs |= c.needs
		rest = rest[j+2:]
	}
	if len(t.parts) == 1 && t.parts[0].ex != nil {
		t.single = t.parts[0].ex
	}
	return t, nil
}

// literal reports whether the template has no expression (and its text).
func (t *template) literal() (string, bool) {
	for _, p := range t.parts {
		if p.ex != nil {
			return "", false
		}
	}
	return t.raw, true
}

// render evaluates the template to a string.
func (t *template) render(e *env) (string, error) {
	if s, ok := t.literal(); ok {
		return s, nil
	}
	var b strings.Builder
	for _, p := range t.parts {
		if p.ex == nil {
			b.WriteString(p.lit)
			continue
		}
		v, err := p.ex.run(e)
		if err != nil {
			return "", fmt.Errorf("{{ %s }}: %w", p.ex.src, err)
		}
		b.WriteString(formatValue(v))
	}
	return b.String(), nil
}

// valueOf evaluates the template as a value: a single segment keeps its type, anything else is a string.
func (t *template) valueOf(e *env) (any, error) {
	if t.single != nil {
		v, err := t.single.run(e)
		if err != nil {
			return nil, fmt.Errorf("{{ %s }}: %w", t.single.src, err)
		}
		return v, nil
	}
	return t.render(e)
}

// vtemplate is a structured template: YAML data whose strings are templates.
type vtemplate struct {
	str   *template
	keys  []string // map, sorted
	m     map[string]*vtemplate
	list  []*vtemplate
	lit   any // scalars other than strings
	isMap bool
	isArr bool
	needs needs
}

// compileValue compiles every string in v (as decoded from YAML) into a template.
func compileValue(v any) (*vtemplate, error) {
	switch x := v.(type) {
	case string:
		t, err := compileTemplate(x)
		if err != nil {
			return nil, err
		}
		return &vtemplate{str: t, needs: t.needs}, nil
	case map[string]any:
		vt := &vtemplate{isMap: true, m: make(map[string]*vtemplate, len(x))}
		for k, val := range x {
			c, err := compileValue(val)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", k, err)
			}
			vt.keys = append(vt.keys, k)
			vt.m[k] = c
			vt.needs |= c.needs
		}
		sort.Strings(vt.keys)
		return vt, nil
	case []any:
		vt := &vtemplate{isArr: true}
		for i, val := range x {
			c, err := compileValue(val)
			if err != nil {
				return nil, fmt.Errorf("[%d]: %w", i, err)
			}
			vt.list = append(vt.list, c)
			vt.needs |= c.needs
		}
		return vt, nil
	case nil, bool, int, int64, uint64, float64:
		return &vtemplate{lit: x}, nil
	}
	return nil, fmt.Errorf("unsupported value %T", v)
}

func (vt *vtemplate) eval(e *env) (any, error) {
	switch {
	case vt.str != nil:
		return vt.str.valueOf(e)
	case vt.isMap:
		out := make(map[string]any, len(vt.m))
		for _, k := range vt.keys {
			v, err := vt.m[k].eval(e)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", k, err)
			}
			out[k] = v
		}
		return out, nil
	case vt.isArr:
		out := make([]any, len(vt.list))
		for i, c := range vt.list {
			v, err := c.eval(e)
			if err != nil {
				return nil, fmt.Errorf("[%d]: %w", i, err)
			}
			out[i] = v
		}
		return out, nil
	}
	return vt.lit, nil
}

// payload is the body of a command or the data of an emitted event: a string template (sent as rendered) or
// structured data (sent as JSON).
type payload struct {
	text *template
	data *vtemplate
}

func (p *payload) needs() needs {
	switch {
	case p == nil:
		return 0
	case p.text != nil:
		return p.text.needs
	case p.data != nil:
		return p.data.needs
	}
	return 0
}

// render returns the bytes and whether they are JSON.
func (p *payload) render(e *env) ([]byte, bool, error) {
	switch {
	case p == nil:
		return nil, false, nil
	case p.text != nil:
		s, err := p.text.render(e)
		if err != nil {
			return nil, false, err
		}
		b := []byte(s)
		return b, json.Valid(b), nil
	default:
		v, err := p.data.eval(e)
		if err != nil {
			return nil, false, err
		}
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(v); err != nil {
			return nil, false, fmt.Errorf("encode JSON: %w", err)
		}
		return bytes.TrimRight(buf.Bytes(), "\n"), true, nil
	}
}
