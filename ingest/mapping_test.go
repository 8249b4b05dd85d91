package ingest

import (
	"strings"
	"testing"
)

func TestMappingMatch(t *testing.T) {
	cases := []struct {
		pattern, topic string
		match          bool
		device, typ    string // captures when matched (device is "pub" when the pattern has none)
		metric, rest   string
	}{
		{"devices/{device}/events/{type}", "devices/d1/events/room.entered", true, "d1", "room.entered", "", ""},
		{"devices/{device}/events/{type}", "devices/d1/events", false, "", "", "", ""},
		{"devices/{device}/events/{type}", "devices/d1/events/a/b", false, "", "", "", ""},
		{"devices/{device}/events/{type}", "devices//events/x", false, "", "", "", ""},
		{"devices/{device}/events/{type}", "devices/d1/events/", false, "", "", "", ""},
		{"devices/{device}/events/{type}", "Devices/d1/events/x", false, "", "", "", ""},
		{"devices/{device}/telemetry/{metric}", "devices/d1/telemetry/temp", true, "d1", "", "temp", ""},
		{"a/+/b", "a//b", true, "pub", "", "", ""},
		{"a/+/b", "a/x/b", true, "pub", "", "", ""},
		{"a/+/b", "a/x/c", false, "", "", "", ""},
		{"a/#", "a/x", true, "pub", "", "", "x"},
		{"a/#", "a/x/y/z", true, "pub", "", "", "x/y/z"},
		{"a/#", "a", false, "", "", "", ""},
		{"a/#", "a/", false, "", "", "", ""},
		{"a/#", "a//", true, "pub", "", "", "/"},
		{"#", "anything/at/all", true, "pub", "", "", "anything/at/all"},
		{"#", "$SYS/broker", false, "", "", "", ""},
		{"+/online", "$SYS/online", false, "", "", "", ""},
		{"{device}/online", "$dev/online", false, "", "", "", ""},
		{"$SYS/#", "$SYS/broker/load", true, "pub", "", "", "broker/load"},
		{"/lead", "/lead", true, "pub", "", "", ""},
		{"/lead", "lead", false, "", "", "", ""},
		{"x/{device}/{type}/{metric}/#", "x/d/t/m/r1/r2", true, "d", "t", "m", "r1/r2"},
		{"zigbee2mqtt/{device}", "zigbee2mqtt/living room lamp", true, "living room lamp", "", "", ""},
	}
	for _, c := range cases {
		t.Run(c.pattern+" "+c.topic, func(t *testing.T) {
			m, err := compileMapping("test", Mapping{Topic: c.pattern, Type: "t"}, "")
			if err != nil {
				t.Fatal(err)
			}
			var buf [maxLevels]string
			var got captures
			ok := m.match(c.topic, splitTopic(c.topic, buf[:0]), "pub", &got)
			if ok != c.match {
				t.Fatalf("match = %v, want %v", ok, c.match)
			}
			if !ok {
				return
			}
			want := captures{device: c.device, typ: c.typ, metric: c.metric, rest: c.rest}
			if got != want {
				t.Errorf("captures = %+v, want %+v", got, want)
			}
		})
	}
}

func TestSplitTopicManyLevels(t *testing.T) {
	topic := strings.Repeat("a/", 40) + "b"
	var buf [maxLevels]string
	levels := splitTopic(topic, buf[:0])
	if len(levels) != 41 || levels[40] != "b" {
		t.Fatalf("got %d levels, last %q", len(levels), levels[len(levels)-1])
	}
	m, err := compileMapping("test", Mapping{Topic: "a/#", Type: "deep.{rest}"}, "")
	if err != nil {
		t.Fatal(err)
	}
	var c captures
	if !m.match(topic, levels, "pub", &c) || c.rest != strings.Repeat("a/", 39)+"b" {
		t.Fatalf("rest = %q", c.rest)
	}
}

func TestTemplateRender(t *testing.T) {
	c := captures{device: "d1", typ: "room.entered", metric: "temp", rest: "x/y"}
	all := map[placeholder]bool{phDevice: true, phType: true, phMetric: true, phRest: true}
	cases := []struct {
		tpl, prefix, want string
	}{
		{"{type}", "", "room.entered"},
		{"{type}", "com.example.", "com.example.room.entered"},
		{"telemetry.{metric}", "", "telemetry.temp"},
		{"telemetry.{metric}", "p.", "p.telemetry.temp"},
		{"zigbee2mqtt.state", "p.", "p.zigbee2mqtt.state"},
		{"raw.{rest}", "", "raw.x.y"},
		{"{device}-{metric}!", "", "d1-temp!"},
		{"{device}{type}", "", "d1room.entered"},
	}
	for _, tc := range cases {
		tpl, err := parseTemplate(tc.tpl, all)
		if err != nil {
			t.Fatalf("%s: %v", tc.tpl, err)
		}
		if got := tpl.withPrefix(tc.prefix).render(&c); got != tc.want {
			t.Errorf("render(%q, prefix %q) = %q, want %q", tc.tpl, tc.prefix, got, tc.want)
		}
	}
}

func TestMatchDoesNotAllocate(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{Presets: PresetNames()})
	topic := "devices/hall-motion/events/room.entered"
	allocs := testing.AllocsPerRun(100, func() {
		var buf [maxLevels]string
		levels := splitTopic(topic, buf[:0])
		var c captures
		for _, m := range n.mappings {
			if m.match(topic, levels, "pub", &c) {
				if m.typ.render(&c) != "room.entered" {
					t.Fatal("wrong type")
				}
				return
			}
		}
		t.Fatal("no match")
	})
	if allocs != 0 {
		t.Errorf("topic matching allocates %v times", allocs)
	}
}
