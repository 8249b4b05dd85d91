package rules

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"time"
)

type ruleKind int

const (
	kindSimple ruleKind = iota
	kindWindow
	kindSequence
	kindAbsence
)

func (k ruleKind) String() string {
	return [...]string{"simple", "window", "sequence", "absence"}[k]
}

// rule is a compiled rule. It is immutable once loaded; its runtime state lives in ruleState.
type rule struct {
	name, description string
	file              string
	line              int
	path              string // rules[i] in its file
	index             int    // position in the rule set (evaluation order)
	disabled          bool

	kind     ruleKind
	on       *matcher
	when     *cexpr
	key      *cexpr // gate (and default correlation) key; nil = subject
	debounce time.Duration
	throttle time.Duration
	window   *windowSpec
	pair     *pairSpec // sequence (first→then) or absence (after→missing)
	actions  []*action

	types       []pattern // what the rule is indexed under
	needs       needs     // what the match and condition read
	fingerprint string    // identity of the state the rule keeps
	met         *ruleMetrics
}

type windowSpec struct {
	size, slide time.Duration
	agg         string // count, sum, avg, min, max
	value       *cexpr
	groupBy     *cexpr
	emit        string // close or crossing
	threshold   *cexpr
}

// pairSpec is a sequence (a=first, b=then) or an absence (a=after, b=missing).
type pairSpec struct {
	aName, bName string
	a, b         *matcher
	within       time.Duration
	key          *cexpr
}

type actionKind int

const (
	actCommand actionKind = iota
	actEmit
	actState
)

func (k actionKind) String() string { return [...]string{"command", "emit", "state"}[k] }

type selTmpl struct {
	key string
	val *template
}

type action struct {
	kind actionKind
	line int
	// command: device or to; state: device
	device   *template
	to       []selTmpl
	command  string
	payload  *payload // command payload or emit data
	evType   string   // emit
	subject  *template
	stateKey *template
	value    *vtemplate
}

func (a *action) needs() needs {
	n := a.payload.needs()
	if a.device != nil {
		n |= a.device.needs
	}
	for _, s := range a.to {
		n |= s.val.needs
	}
	if a.subject != nil {
		n |= a.subject.needs
	}
	if a.value != nil {
		n |= a.value.needs
	}
	if a.stateKey != nil {
		n |= a.stateKey.needs
	}
	return n
}

// finish derives the index patterns, needs and fingerprint.
func (r *rule) finish() {
	r.needs = r.on.needs()
	if r.when != nil {
		r.needs |= r.when.needs
	}
	if r.key != nil {
		r.needs |= r.key.needs
	}
	switch {
	case r.pair != nil:
		for _, st := range []*matcher{r.pair.a, r.pair.b} {
			r.needs |= st.needs()
			switch {
			case st.typ.isSet():
				r.addType(st.typ)
			case r.on.typ.isSet():
				r.addType(r.on.typ)
			default:
				r.addType(newPattern("*"))
			}
		}
		if r.pair.key != nil {
			r.needs |= r.pair.key.needs
		}
	default:
		if r.on.typ.isSet() {
			r.addType(r.on.typ)
		} else {
			r.addType(newPattern("*"))
		}
	}
	if w := r.window; w != nil {
		for _, c := range []*cexpr{w.value, w.groupBy, w.threshold} {
			if c != nil {
				r.needs |= c.needs
			}
		}
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s|", r.kind)
	if w := r.window; w != nil {
		fmt.Fprintf(h, "%s|%s|%s|%s|%s|%s|%s", w.size, w.slide, w.agg, srcOf(w.value), srcOf(w.groupBy), srcOf(r.key), w.emit)
	}
	if p := r.pair; p != nil {
		fmt.Fprintf(h, "%s|%s|%s|%s|%s", p.a.typ.raw, p.b.typ.raw, p.within, srcOf(p.key), srcOf(r.key))
	}
	r.fingerprint = hex.EncodeToString(h.Sum(nil)[:8])
}

func srcOf(c *cexpr) string {
	if c == nil {
		return ""
	}
	return c.src
}

func (r *rule) addType(p pattern) {
	for _, t := range r.types {
		if t.raw == p.raw {
			return
		}
	}
	r.types = append(r.types, p)
}

// RuleInfo describes a loaded rule (for status pages and logs).
type RuleInfo struct {
	Name        string   `json:"name"`
	Description string   `json:"description,omitempty"`
	File        string   `json:"file"`
	Line        int      `json:"line"`
	Kind        string   `json:"kind"`    // simple, window, sequence or absence
	Types       []string `json:"types"`   // event type patterns the rule listens to
	Actions     []string `json:"actions"` // e.g. "command lights.on", "emit room.occupied", "state occupied"
}

func (r *rule) info() RuleInfo {
	ri := RuleInfo{Name: r.name, Description: r.description, File: r.file, Line: r.line, Kind: r.kind.String()}
	for _, t := range r.types {
		ri.Types = append(ri.Types, t.raw)
	}
	for _, a := range r.actions {
		ri.Actions = append(ri.Actions, a.describe())
	}
	return ri
}

func (a *action) describe() string {
	switch a.kind {
	case actCommand:
		return "command " + a.command
	case actEmit:
		return "emit " + a.evType
	default:
		return "state " + a.stateKey.raw
	}
}

// ruleSet is an immutable, indexed set of rules.
type ruleSet struct {
	rules    []*rule
	byType   map[string][]*rule // exact type → rules, in rule order
	wildcard []*rule            // rules with at least one wildcard type pattern, in rule order
	maxSpan  time.Duration      // the longest window size or within (for a dry run's final flush)
}

func newRuleSet(rules []*rule) *ruleSet {
	s := &ruleSet{rules: rules, byType: map[string][]*rule{}}
	for _, r := range rules {
		wild := false
		for _, t := range r.types {
			if t.isExact() {
				s.byType[t.raw] = append(s.byType[t.raw], r)
			} else {
				wild = true
			}
		}
		if wild {
			s.wildcard = append(s.wildcard, r)
		}
		var span time.Duration
		if r.window != nil && r.window.size > span {
			span = r.window.size
		}
		if r.pair != nil && r.pair.within > span {
			span = r.pair.within
		}
		if span > s.maxSpan {
			s.maxSpan = span
		}
	}
	return s
}

// candidates appends to dst the rules that may match an event of type typ, in rule order, without duplicates.
func (s *ruleSet) candidates(dst []*rule, typ string) []*rule {
	exact := s.byType[typ]
	dst = append(dst, exact...)
	n := len(dst)
	for _, r := range s.wildcard {
		ok := false
		for _, t := range r.types {
			if !t.isExact() && t.match(typ) {
				ok = true
				break
			}
		}
		if !ok {
			continue
		}
		dup := false
		for _, e := range exact {
			if e == r {
				dup = true
				break
			}
		}
		if !dup {
			dst = append(dst, r)
		}
	}
	if len(dst) > n && len(exact) > 0 {
		insertionSortByIndex(dst)
	}
	return dst
}

func insertionSortByIndex(rs []*rule) {
	for i := 1; i < len(rs); i++ {
		for j := i; j > 0 && rs[j].index < rs[j-1].index; j-- {
			rs[j], rs[j-1] = rs[j-1], rs[j]
		}
	}
}

func (s *ruleSet) infos() []RuleInfo {
	out := make([]RuleInfo, len(s.rules))
	for i, r := range s.rules {
		out[i] = r.info()
	}
	return out
}
