package forward

import (
	"errors"
	"strings"
)

// typeFilter selects events by CloudEvent type: "*" matches any type, "prefix.*" every type starting with
// "prefix.", anything else exactly. An empty filter matches every type.
type typeFilter struct {
	any      bool
	exact    map[string]bool
	prefixes []string
}

func validPattern(p string) error {
	switch {
	case p == "":
		return errors.New("empty pattern")
	case p == "*":
		return nil
	case strings.HasSuffix(p, ".*"):
		if strings.Contains(p[:len(p)-2], "*") || len(p) == 2 {
			return errors.New(`"*" may only be the whole pattern or follow a non-empty prefix and '.' at the end ("sensor.*")`)
		}
	case strings.Contains(p, "*"):
		return errors.New(`"*" may only be the whole pattern or follow a non-empty prefix and '.' at the end ("sensor.*")`)
	}
	return nil
}

func newTypeFilter(patterns []string) typeFilter {
	f := typeFilter{any: len(patterns) == 0, exact: map[string]bool{}}
	for _, p := range patterns {
		switch {
		case p == "*":
			f.any = true
		case strings.HasSuffix(p, ".*"):
			f.prefixes = append(f.prefixes, p[:len(p)-1]) // keep the dot: "sensor."
		default:
			f.exact[p] = true
		}
	}
	return f
}

func (f typeFilter) match(typ string) bool {
	if f.any || f.exact[typ] {
		return true
	}
	for _, p := range f.prefixes {
		if strings.HasPrefix(typ, p) {
			return true
		}
	}
	return false
}
