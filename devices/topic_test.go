package devices

import (
	"errors"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
)

func TestValidTopic(t *testing.T) {
	tests := []struct {
		topic string
		ok    bool
	}{
		{"a", true},
		{"devices/a/events/room.entered", true},
		{"/", true},
		{"a//b", true},
		{"$SYS/broker", true},
		{"température/ü", true},
		{"", false},
		{"a/+", false},
		{"a/#", false},
		{"a+b", false},
		{"a\x00b", false},
		{"\xff", false},
		{strings.Repeat("a", MaxTopicBytes), true},
		{strings.Repeat("a", MaxTopicBytes+1), false},
	}
	for _, tt := range tests {
		err := ValidTopic(tt.topic)
		if (err == nil) != tt.ok {
			t.Errorf("ValidTopic(%.40q) = %v, want ok=%v", tt.topic, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidTopic) {
			t.Errorf("ValidTopic(%.40q) = %v, not ErrInvalidTopic", tt.topic, err)
		}
	}
}

func TestValidFilter(t *testing.T) {
	tests := []struct {
		filter string
		ok     bool
	}{
		{"a", true},
		{"#", true},
		{"+", true},
		{"+/#", true},
		{"a/+/c", true},
		{"a/#", true},
		{"/#", true},
		{"+/+", true},
		{"$SYS/#", true},
		{"a//+", true},
		{"", false},
		{"a/#/c", false},
		{"#/a", false},
		{"a#", false},
		{"a/b#", false},
		{"a+", false},
		{"a/+b/c", false},
		{"++", false},
		{"##", false},
		{"a\x00", false},
		{"\xc3", false},
		{strings.Repeat("+/", MaxTopicBytes/2) + "#", true},
		{strings.Repeat("+/", MaxTopicBytes/2+1) + "#", false},
	}
	for _, tt := range tests {
		err := ValidFilter(tt.filter)
		if (err == nil) != tt.ok {
			t.Errorf("ValidFilter(%.40q) = %v, want ok=%v", tt.filter, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidFilter) {
			t.Errorf("ValidFilter(%.40q) = %v, not ErrInvalidFilter", tt.filter, err)
		}
	}
}

func TestTopicMatch(t *testing.T) {
	tests := []struct {
		filter, topic string
		want          bool
	}{
		{"devices/a", "devices/a", true},
		{"devices/a", "devices/a/b", false},
		{"devices/a", "devices/ab", false},
		{"devices/a/#", "devices/a", true},
		{"devices/a/#", "devices/a/", true},
		{"devices/a/#", "devices/a/b/c", true},
		{"devices/a/#", "devices/ab", false},
		{"devices/+", "devices/a", true},
		{"devices/+", "devices/", true}, // + matches an empty level
		{"devices/+", "devices", false},
		{"devices/+", "devices/a/b", false},
		{"+/+", "/", true},
		{"+", "/", false},
		{"/+", "/a", true},
		{"#", "a/b/c", true},
		{"#", "/", true},
		{"+/#", "a", true},
		{"#", "$SYS/broker", false},
		{"+/broker", "$SYS/broker", false},
		{"+/#", "$SYS", false},
		{"$SYS/#", "$SYS/broker", true},
		{"$SYS/+", "$SYS/broker", true},
		{"a/$x", "a/$x", true},
		{"a/+", "a/$x", true}, // only a leading $ level is protected
		{"a/b/+/d", "a/b/c/d", true},
		{"a/b/+/d", "a/b/c/e", false},
		{"A", "a", false},
		// Invalid filters and topics match nothing.
		{"a/#/b", "a/x/b", false},
		{"a+", "a+", false},
		{"a", "a/+", false},
		{"", "", false},
		{"#", "", false},
	}
	for _, tt := range tests {
		if got := TopicMatch(tt.filter, tt.topic); got != tt.want {
			t.Errorf("TopicMatch(%q, %q) = %v, want %v", tt.filter, tt.topic, got, tt.want)
		}
	}
}

func TestFilterCovers(t *testing.T) {
	tests := []struct {
		grant, filter string
		want          bool
	}{
		{"devices/a/commands/#", "devices/a/commands/#", true},
		{"devices/a/commands/#", "devices/a/commands", true},
		{"devices/a/commands/#", "devices/a/commands/+", true},
		{"devices/a/commands/#", "devices/a/commands/lights.on", true},
		{"devices/a/commands/#", "devices/a/#", false},
		{"devices/a/commands/#", "devices/+/commands/#", false},
		{"devices/a/commands/#", "#", false},
		{"devices/a/commands/#", "+/#", false},
		{"devices/a/commands/#", "devices/a", false},
		{"devices/+/x", "devices/a/x", true},
		{"devices/+/x", "devices/+/x", true},
		{"devices/+/x", "devices/#", false},
		{"a/#", "a", true},
		{"a/+/#", "a", false},
		{"a/+/#", "a/+", true},
		{"a/+", "a/#", false},
		{"a", "a/#", false},
		{"#", "a/b", true},
		{"#", "#", true},
		{"+/#", "#", true}, // every topic has a first level
		{"+/#", "a/#", true},
		{"a/+/#", "a/#", false}, // a/# matches a
		{"/+/#", "/#", true},    // "/#" cannot match its parent, the empty topic
		{"#", "$SYS/#", false},
		{"+/#", "$SYS/broker", false},
		{"$SYS/#", "$SYS/#", true},
		{"$SYS/#", "$SYS/broker/+", true},
		{"$SYS/#", "+/broker", false},
		{"$SYS/broker", "$SYS/#", false},
		{"a/#/b", "a/x/b", false}, // invalid grant
		{"a/#", "a/#/b", false},   // invalid filter
	}
	for _, tt := range tests {
		if got := FilterCovers(tt.grant, tt.filter); got != tt.want {
			t.Errorf("FilterCovers(%q, %q) = %v, want %v", tt.grant, tt.filter, got, tt.want)
		}
	}
}

// refMatch is a plain restatement of MQTT matching, to check the allocation-free one against.
func refMatch(filter, topic string) bool {
	if ValidFilter(filter) != nil || ValidTopic(topic) != nil {
		return false
	}
	f, tl := strings.Split(filter, "/"), strings.Split(topic, "/")
	if strings.HasPrefix(topic, "$") && (f[0] == "+" || f[0] == "#") {
		return false
	}
	for i, l := range f {
		if l == "#" {
			return true
		}
		if i >= len(tl) || (l != "+" && l != tl[i]) {
			return false
		}
	}
	return len(f) == len(tl)
}

// joinLevels enumerates every filter or topic of 1..depth levels drawn from alphabet.
func joinLevels(alphabet []string, depth int) []string {
	var out []string
	cur := []string{""}
	for d := 1; d <= depth; d++ {
		var next []string
		for _, c := range cur {
			for _, l := range alphabet {
				s := l
				if d > 1 {
					s = c + "/" + l
				}
				next = append(next, s)
			}
		}
		out = append(out, next...)
		cur = next
	}
	return out
}

func validFilters(fs []string) []string {
	var out []string
	for _, f := range fs {
		if ValidFilter(f) == nil {
			out = append(out, f)
		}
	}
	return out
}

// TestMatchAgainstReference compares TopicMatch with refMatch for every filter and topic of a small universe.
func TestMatchAgainstReference(t *testing.T) {
	filters := joinLevels([]string{"a", "$s", "", "+", "#", "a+"}, 3)
	topics := joinLevels([]string{"a", "$s", "", "z"}, 4)
	for _, f := range filters {
		for _, tp := range topics {
			if got, want := TopicMatch(f, tp), refMatch(f, tp); got != want {
				t.Fatalf("TopicMatch(%q, %q) = %v, reference says %v", f, tp, got, want)
			}
		}
	}
}

// TestFilterCoversExhaustive checks that FilterCovers(g, f) holds exactly when every topic f matches is matched by
// g, over a universe where that is decidable by enumeration: filter levels from {a, $s, "", +, #} and
// topic levels from {a, $s, "", z} one level deeper (z stands for every other level; the extra level tells # from
// +). Filters go up to 4 levels; EDGEGATE_LONG=1 goes to 5 (several seconds more).
func TestFilterCoversExhaustive(t *testing.T) {
	depth := 4
	if os.Getenv("EDGEGATE_LONG") != "" {
		depth = 5
	}
	filters := validFilters(joinLevels([]string{"a", "$s", "", "+", "#"}, depth))
	topics := joinLevels([]string{"a", "$s", "", "z"}, depth+1)
	matches := make([][]bool, len(filters))
	for i, f := range filters {
		matches[i] = make([]bool, len(topics))
		for j, tp := range topics {
			matches[i][j] = TopicMatch(f, tp)
		}
	}
	for gi, g := range filters {
		for fi, f := range filters {
			want := true
			for j := range topics {
				if matches[fi][j] && !matches[gi][j] {
					want = false
					break
				}
			}
			if got := FilterCovers(g, f); got != want {
				t.Fatalf("FilterCovers(%q, %q) = %v, but by enumeration %v", g, f, got, want)
			}
		}
	}
}

// TestFilterCoversProperty: FilterCovers(g, f) ⇒ for random topics t, TopicMatch(f, t) ⇒ TopicMatch(g, t).
func TestFilterCoversProperty(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	levels := []string{"a", "b", "$SYS", "", "+", "#", "devices", "x.y"}
	topicLevels := []string{"a", "b", "$SYS", "", "devices", "x.y", "q"}
	randomFrom := func(alphabet []string, maxDepth int) string {
		n := 1 + rng.IntN(maxDepth)
		parts := make([]string, n)
		for i := range parts {
			parts[i] = alphabet[rng.IntN(len(alphabet))]
		}
		return strings.Join(parts, "/")
	}
	covered := 0
	for range 20000 {
		g, f := randomFrom(levels, 4), randomFrom(levels, 4)
		if !FilterCovers(g, f) {
			continue
		}
		covered++
		for range 50 {
			tp := randomFrom(topicLevels, 5)
			if TopicMatch(f, tp) && !TopicMatch(g, tp) {
				t.Fatalf("FilterCovers(%q, %q) but %q matches the filter and not the grant", g, f, tp)
			}
		}
	}
	if covered < 100 {
		t.Fatalf("only %d covering pairs generated; the property was barely exercised", covered)
	}
}
