package devices

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// MaxTopicBytes is the longest topic name or filter MQTT can carry.
const MaxTopicBytes = 65535

// ErrInvalidTopic is wrapped by ValidTopic for a topic name a client may not publish to.
var ErrInvalidTopic = errors.New("invalid topic")

// ErrInvalidFilter is wrapped by ValidFilter for a malformed topic filter.
var ErrInvalidFilter = errors.New("invalid topic filter")

// ValidTopic reports whether t is a topic name a client may publish to: 1 to 65535 bytes of UTF-8 without NUL
// and without the wildcards + and #.
func ValidTopic(t string) error {
	if err := checkString(t); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidTopic, err)
	}
	if i := strings.IndexAny(t, "+#"); i >= 0 {
		return fmt.Errorf("%w: wildcard %q at byte %d", ErrInvalidTopic, t[i], i)
	}
	return nil
}

// ValidFilter reports whether f is a well-formed topic filter: 1 to 65535 bytes of UTF-8 without NUL, where +
// stands for a whole level and # only for the whole last level.
func ValidFilter(f string) error {
	if err := checkString(f); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidFilter, err)
	}
	start := 0
	for start <= len(f) {
		end := levelEnd(f, start)
		level := f[start:end]
		if strings.ContainsAny(level, "+#") {
			switch {
			case level == "+":
			case level == "#" && end == len(f):
			case level == "#":
				return fmt.Errorf("%w: # must be the last level", ErrInvalidFilter)
			default:
				return fmt.Errorf("%w: wildcard inside level %q", ErrInvalidFilter, level)
			}
		}
		start = end + 1
	}
	return nil
}

func checkString(s string) error {
	switch {
	case s == "":
		return errors.New("empty")
	case len(s) > MaxTopicBytes:
		return fmt.Errorf("%d bytes, more than %d", len(s), MaxTopicBytes)
	case strings.IndexByte(s, 0) >= 0:
		return errors.New("contains NUL")
	case !utf8.ValidString(s):
		return errors.New("not valid UTF-8")
	}
	return nil
}

// levelEnd returns the index of the '/' that ends the level starting at start, or len(s).
func levelEnd(s string, start int) int {
	if i := strings.IndexByte(s[start:], '/'); i >= 0 {
		return start + i
	}
	return len(s)
}

// TopicMatch reports whether the topic filter matches the topic name, as an MQTT broker decides it: + matches
// exactly one level (an empty one too), # matches the rest including the parent level ("a/#" matches "a"), a
// filter starting with a wildcard does not match a topic starting with $, and a filter without wildcards matches
// only the identical topic. An invalid filter or topic matches nothing.
func TopicMatch(filter, topic string) bool {
	return ValidTopic(topic) == nil && ValidFilter(filter) == nil && match(filter, topic)
}

// match is TopicMatch for a valid topic and a valid filter. It does not allocate.
func match(filter, topic string) bool {
	if topic[0] == '$' && (filter[0] == '+' || filter[0] == '#') {
		return false
	}
	fi, ti := 0, 0
	for {
		fEnd := levelEnd(filter, fi)
		fl := filter[fi:fEnd]
		if fl == "#" {
			return true
		}
		tEnd := levelEnd(topic, ti)
		if fl != "+" && fl != topic[ti:tEnd] {
			return false
		}
		fDone, tDone := fEnd == len(filter), tEnd == len(topic)
		switch {
		case fDone && tDone:
			return true
		case tDone:
			return filter[fEnd+1:] == "#"
		case fDone:
			return false
		}
		fi, ti = fEnd+1, tEnd+1
	}
}

// FilterCovers reports whether every topic the filter matches is also matched by grant, so that a client allowed
// grant may subscribe to filter. Invalid filters cover and are covered by nothing. A grant starting with a wildcard
// covers no filter that starts with $ (such a grant matches no $ topic).
func FilterCovers(grant, filter string) bool {
	return ValidFilter(grant) == nil && ValidFilter(filter) == nil && covers(grant, filter)
}

// covers is FilterCovers for two valid filters.
func covers(grant, filter string) bool {
	if filter[0] == '$' && (grant[0] == '+' || grant[0] == '#') {
		return false
	}
	gi, fi := 0, 0
	for {
		gEnd := levelEnd(grant, gi)
		gl := grant[gi:gEnd]
		if gl == "#" {
			return true
		}
		fEnd := levelEnd(filter, fi)
		fl := filter[fi:fEnd]
		if fl == "#" {
			// "#" also matches the parent level, which "+/#" does not, unless the parent is no topic at all:
			// before the first level, or when it would be the empty topic (filter "/#").
			noParent := fi == 0 || (fi == 1 && filter[0] == '/')
			return noParent && grant[gi:] == "+/#"
		}
		if gl != "+" && gl != fl {
			return false
		}
		gDone, fDone := gEnd == len(grant), fEnd == len(filter)
		switch {
		case gDone && fDone:
			return true
		case fDone:
			return grant[gEnd+1:] == "#"
		case gDone:
			return false
		}
		gi, fi = gEnd+1, fEnd+1
	}
}
