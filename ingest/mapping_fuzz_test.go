package ingest

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzParseTopic: for any pattern that compiles and any topic, matching does not panic and agrees with a
// plain reference matcher; topic validation agrees with the MQTT rules.
// Run: go test ./ingest -run '^$' -fuzz FuzzParseTopic -fuzztime 60s
func FuzzParseTopic(f *testing.F) {
	f.Add("devices/{device}/events/{type}", "devices/d1/events/room.entered")
	f.Add("a/+/{metric}/#", "a/b/c/d/e")
	f.Add("#", "$SYS/x")
	f.Add("{device}/online", "/online")
	f.Add("zigbee2mqtt/bridge/#", "zigbee2mqtt/bridge/")
	f.Add("a//b", "a//b")
	f.Fuzz(func(t *testing.T, pattern, topic string) {
		valid := validTopic(topic)
		wantValid := topic != "" && utf8.ValidString(topic) && !strings.ContainsAny(topic, "\x00+#")
		if valid != wantValid {
			t.Fatalf("validTopic(%q) = %v, want %v", topic, valid, wantValid)
		}
		m, err := compileMapping("fuzz", Mapping{Topic: pattern, Type: "t"}, "")
		if err != nil || !valid {
			return
		}
		var buf [maxLevels]string
		levels := splitTopic(topic, buf[:0])
		if strings.Join(levels, "/") != topic {
			t.Fatalf("splitTopic(%q) = %q", topic, levels)
		}
		var c captures
		got := m.match(topic, levels, "pub", &c)
		want, wantCaps := refMatch(pattern, topic)
		if got != want {
			t.Fatalf("match(%q, %q) = %v, want %v", pattern, topic, got, want)
		}
		if got && c != wantCaps {
			t.Fatalf("match(%q, %q) captures %+v, want %+v", pattern, topic, c, wantCaps)
		}
	})
}

// refMatch is the mapping semantics written plainly.
func refMatch(pattern, topic string) (bool, captures) {
	c := captures{device: "pub"}
	p := strings.Split(pattern, "/")
	tl := strings.Split(topic, "/")
	if strings.HasPrefix(topic, "$") && (p[0] == "#" || p[0] == "+" || strings.HasPrefix(p[0], "{")) {
		return false, c
	}
	for i, lvl := range p {
		if lvl == "#" {
			c.rest = strings.Join(tl[i:], "/")
			return i < len(tl) && c.rest != "", c
		}
		if i >= len(tl) {
			return false, c
		}
		switch lvl {
		case "+":
		case "{device}", "{type}", "{metric}":
			if tl[i] == "" {
				return false, c
			}
			switch lvl {
			case "{device}":
				c.device = tl[i]
			case "{type}":
				c.typ = tl[i]
			default:
				c.metric = tl[i]
			}
		default:
			if lvl != tl[i] {
				return false, c
			}
		}
	}
	return len(p) == len(tl), c
}
