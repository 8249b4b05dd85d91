package forward

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"
)

func recs(seqs ...uint64) []Record {
	out := make([]Record, len(seqs))
	for i, s := range seqs {
		out[i] = Record{Seq: s}
	}
	return out
}

func TestTracker(t *testing.T) {
	type step struct {
		op       string // push, skip, ack, reject
		seqs     []uint64
		wantDone uint64
		passed   int
	}
	tests := []struct {
		name  string
		start uint64
		steps []step
		// after the steps
		records, unacked int
	}{
		{name: "in order", start: 10, steps: []step{
			{op: "push", seqs: []uint64{11}, wantDone: 10},
			{op: "push", seqs: []uint64{12}, wantDone: 10},
			{op: "ack", seqs: []uint64{11}, wantDone: 11, passed: 1},
			{op: "ack", seqs: []uint64{12}, wantDone: 12, passed: 1},
		}},
		{name: "out of order held until the gap fills", steps: []step{
			{op: "push", seqs: []uint64{1}}, {op: "push", seqs: []uint64{2}}, {op: "push", seqs: []uint64{3}},
			{op: "ack", seqs: []uint64{3}, wantDone: 0},
			{op: "ack", seqs: []uint64{2}, wantDone: 0},
			{op: "ack", seqs: []uint64{1}, wantDone: 3, passed: 3},
		}},
		{name: "skips ride with the unit before", steps: []step{
			{op: "skip", seqs: []uint64{1}, wantDone: 1},
			{op: "push", seqs: []uint64{2}, wantDone: 1},
			{op: "skip", seqs: []uint64{3}, wantDone: 1},
			{op: "skip", seqs: []uint64{4}, wantDone: 1},
			{op: "push", seqs: []uint64{5}, wantDone: 1},
			{op: "ack", seqs: []uint64{2}, wantDone: 4, passed: 1},
		}, records: 1, unacked: 1},
		{name: "batch units and gaps in seq", steps: []step{
			{op: "push", seqs: []uint64{3, 5, 9}},
			{op: "push", seqs: []uint64{12, 13}},
			{op: "ack", seqs: []uint64{13}, wantDone: 0},
			{op: "ack", seqs: []uint64{9}, wantDone: 13, passed: 5},
		}},
		{name: "rejected units pass but do not count", steps: []step{
			{op: "push", seqs: []uint64{1}}, {op: "push", seqs: []uint64{2}},
			{op: "reject", seqs: []uint64{1}, wantDone: 1},
			{op: "ack", seqs: []uint64{2}, wantDone: 2, passed: 1},
		}},
		{name: "unknown and repeated acks are ignored", steps: []step{
			{op: "push", seqs: []uint64{1}}, {op: "push", seqs: []uint64{2}},
			{op: "ack", seqs: []uint64{7}, wantDone: 0},
			{op: "ack", seqs: []uint64{2}, wantDone: 0},
			{op: "ack", seqs: []uint64{2}, wantDone: 0},
			{op: "ack", seqs: []uint64{1}, wantDone: 2, passed: 2},
			{op: "ack", seqs: []uint64{1}, wantDone: 2},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := newTracker(tc.start)
			for i, s := range tc.steps {
				passed := 0
				switch s.op {
				case "push":
					tr.push(recs(s.seqs...))
				case "skip":
					tr.skip(s.seqs[0])
				case "ack", "reject":
					_, passed = tr.ack(s.seqs[0], s.op == "reject")
				}
				if s.op != "push" && tr.done != s.wantDone && !(s.wantDone == 0 && tr.done == tc.start) {
					t.Fatalf("step %d %s %v: done = %d, want %d", i, s.op, s.seqs, tr.done, s.wantDone)
				}
				if passed != s.passed {
					t.Fatalf("step %d %s %v: passed = %d, want %d", i, s.op, s.seqs, passed, s.passed)
				}
			}
			if tr.records != tc.records || tr.unacked != tc.unacked {
				t.Errorf("records, unacked = %d, %d, want %d, %d", tr.records, tr.unacked, tc.records, tc.unacked)
			}
		})
	}
}

// TestTrackerLong runs many units through with acks in a scrambled order and checks the prefix invariant.
func TestTrackerLong(t *testing.T) {
	tr := newTracker(0)
	const n = 5000
	for s := uint64(1); s <= n; s++ {
		tr.push(recs(s))
	}
	// Ack in windows of 16, each window in reverse.
	total := 0
	for base := uint64(1); base <= n; base += 16 {
		for s := min(base+15, n); s >= base; s-- {
			_, p := tr.ack(s, false)
			total += p
			if s > base && tr.done >= s {
				t.Fatalf("cursor %d passed the gap before %d", tr.done, base)
			}
		}
		if tr.done != min(base+15, n) {
			t.Fatalf("done = %d after window at %d", tr.done, base)
		}
	}
	if total != n || !tr.empty() || tr.records != 0 {
		t.Errorf("passed %d, empty %v, records %d", total, tr.empty(), tr.records)
	}
}

func TestTemplates(t *testing.T) {
	tests := []struct {
		name, tmpl   string
		subject, typ string
		sanitize     func(string) string
		check        func(string) error
		want         string
		wantErr      bool
	}{
		{name: "mqtt default", tmpl: DefaultMQTTTopic, subject: "hall", typ: "room.entered", sanitize: mqttLevel,
			check: mqttTopicCheck, want: "edgegate/gw-1/events/hall/room.entered"},
		{name: "mqtt wildcards in values", tmpl: DefaultMQTTTopic, subject: "a/b+#", typ: "", sanitize: mqttLevel,
			check: mqttTopicCheck, want: "edgegate/gw-1/events/a_b__/_"},
		{name: "mqtt sink field", tmpl: "x/{sink}/{type}", subject: "s", typ: "t", sanitize: mqttLevel,
			check: mqttTopicCheck, want: "x/up/t"},
		{name: "mqtt wildcard literal", tmpl: "x/+/{type}", check: mqttTopicCheck, wantErr: true},
		{name: "mqtt reserved", tmpl: "$SYS/{type}", check: mqttTopicCheck, wantErr: true},
		{name: "unknown field", tmpl: "x/{device}", check: mqttTopicCheck, wantErr: true},
		{name: "unclosed", tmpl: "x/{type", check: mqttTopicCheck, wantErr: true},
		{name: "stray close", tmpl: "x/}type", check: mqttTopicCheck, wantErr: true},
		{name: "empty", tmpl: "", check: mqttTopicCheck, wantErr: true},
		{name: "nats default", tmpl: DefaultNATSSubject, subject: "hall motion", typ: "room.entered", sanitize: natsTokens,
			check: natsSubjectCheck, want: "edgegate.gw-1.events.hall_motion.room.entered"},
		{name: "nats wildcards and empty tokens", tmpl: DefaultNATSSubject, subject: "a*>", typ: ".x..y.", sanitize: natsTokens,
			check: natsSubjectCheck, want: "edgegate.gw-1.events.a__._.x._.y._"},
		{name: "nats empty value", tmpl: DefaultNATSSubject, subject: "", typ: "t", sanitize: natsTokens,
			check: natsSubjectCheck, want: "edgegate.gw-1.events._.t"},
		{name: "nats wildcard literal", tmpl: "a.*.{type}", check: natsSubjectCheck, wantErr: true},
		{name: "nats trailing dot", tmpl: "a.{type}.", check: natsSubjectCheck, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tmpl, err := parseTemplate(tc.tmpl, eventFields, tc.check)
			if (err != nil) != tc.wantErr {
				t.Fatalf("parse %q: err = %v, want error %v", tc.tmpl, err, tc.wantErr)
			}
			if err != nil {
				return
			}
			bound := tmpl.bind(map[string]string{fieldGateway: "gw-1", fieldSink: "up"})
			if got := bound.event(tc.subject, tc.typ, tc.sanitize); got != tc.want {
				t.Errorf("render = %q, want %q", got, tc.want)
			}
			if err := tc.check(bound.event(tc.subject, tc.typ, tc.sanitize)); err != nil {
				t.Errorf("rendered %q is invalid: %v", tc.want, err)
			}
		})
	}
}

func TestCommandTopic(t *testing.T) {
	tests := []struct {
		tmpl, filter string
		topics       map[string][2]string // topic -> device, command ("" = no match)
		wantErr      bool
	}{
		{tmpl: DefaultCommandTopic, filter: "edgegate/gw1/commands/+/+", topics: map[string][2]string{
			"edgegate/gw1/commands/lamp/lights.on": {"lamp", "lights.on"},
			"edgegate/gw2/commands/lamp/lights.on": {},
			"edgegate/gw1/commands/lamp":           {},
			"edgegate/gw1/commands/lamp/on/extra":  {},
			"edgegate/gw1/commands//lights.on":     {},
		}},
		{tmpl: "{command}/x-{gateway}/{sink}/{device}", filter: "+/x-gw1/up/+", topics: map[string][2]string{
			"reboot/x-gw1/up/pump": {"pump", "reboot"},
		}},
		{tmpl: "cmd/{device}", wantErr: true},
		{tmpl: "cmd/{device}/{device}/{command}", wantErr: true},
		{tmpl: "cmd/dev-{device}/{command}", wantErr: true},
		{tmpl: "cmd/+/{device}/{command}", wantErr: true},
		{tmpl: "cmd/{type}/{device}/{command}", wantErr: true},
	}
	for _, tc := range tests {
		ct, err := parseCommandTopic(tc.tmpl)
		if (err != nil) != tc.wantErr {
			t.Errorf("%q: err = %v, want error %v", tc.tmpl, err, tc.wantErr)
			continue
		}
		if err != nil {
			continue
		}
		ct.bind("gw1", "up")
		if ct.filter != tc.filter {
			t.Errorf("%q: filter = %q, want %q", tc.tmpl, ct.filter, tc.filter)
		}
		for topic, want := range tc.topics {
			d, c, ok := ct.match(topic)
			if ok != (want[0] != "") || ok && (d != want[0] || c != want[1]) {
				t.Errorf("%q: match(%q) = %q, %q, %v; want %v", tc.tmpl, topic, d, c, ok, want)
			}
		}
	}
}

func TestTypeFilter(t *testing.T) {
	tests := []struct {
		patterns []string
		match    []string
		nomatch  []string
	}{
		{nil, []string{"a", "sensor.x", ""}, nil},
		{[]string{"*"}, []string{"a", "b.c"}, nil},
		{[]string{"sensor.*"}, []string{"sensor.x", "sensor.x.y"}, []string{"sensor", "sensorx", "a.sensor.x"}},
		{[]string{"door.opened", "room.*"}, []string{"door.opened", "room.entered"}, []string{"door.closed", "door.opened.x"}},
	}
	for _, tc := range tests {
		f := newTypeFilter(tc.patterns)
		for _, s := range tc.match {
			if !f.match(s) {
				t.Errorf("%v should match %q", tc.patterns, s)
			}
		}
		for _, s := range tc.nomatch {
			if f.match(s) {
				t.Errorf("%v should not match %q", tc.patterns, s)
			}
		}
	}
}

func TestEventID(t *testing.T) {
	tests := []struct {
		in      string
		want    string
		wantErr bool
	}{
		{in: `{"specversion":"1.0","id":"abc","type":"t"}`, want: "abc"},
		{in: ` { "data" : {"id":"inner","x":[1,{"id":"deeper"}]}, "id" : "outer" } `, want: "outer"},
		{in: `{"data":"a \"quoted\" \\ id","id":"x\u0041\n"}`, want: "xA\n"},
		{in: `{"\u0069d":"escaped-key"}`, want: "escaped-key"},
		{in: `{"n":-1.5e3,"ok":true,"nil":null,"id":"after-literals"}`, want: "after-literals"},
		{in: `{"id":7}`, wantErr: true},
		{in: `{"ID":"upper"}`, wantErr: true},
		{in: `{}`, wantErr: true},
		{in: `[]`, wantErr: true},
		{in: `{"data":{"id":"only-inner"}}`, wantErr: true},
		{in: `{"id":"unterminated`, wantErr: true},
		{in: ``, wantErr: true},
	}
	for _, tc := range tests {
		got, err := eventID([]byte(tc.in))
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("eventID(%s) = %q, %v; want %q (error %v)", tc.in, got, err, tc.want, tc.wantErr)
		}
	}
}

// FuzzEventID: eventID never panics, and on valid JSON objects with a single top-level "id" string it agrees
// with encoding/json.
func FuzzEventID(f *testing.F) {
	for _, s := range []string{
		`{"specversion":"1.0","id":"abc","type":"t"}`,
		`{"data":{"id":"inner"},"id":"outer"}`,
		`{"id":"x\u0041\"y"}`,
		`{"\u0069d":"k"}`,
		`{"a":[1,2,{"b":null}],"id":""}`,
		`{"id":1}`,
		`not json`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := eventID(data)
		if !json.Valid(data) {
			return
		}
		n, want, isString := topLevelIDs(data)
		if n != 1 {
			return
		}
		if !isString {
			if err == nil {
				t.Fatalf("eventID(%s) = %q for a non-string id", data, got)
			}
			return
		}
		if err != nil || got != want {
			t.Fatalf("eventID(%s) = %q, %v; encoding/json says %q", data, got, err, want)
		}
	})
}

// topLevelIDs counts the top-level "id" keys of a JSON object and decodes the last one.
func topLevelIDs(data []byte) (n int, id string, isString bool) {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return 0, "", false
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return 0, "", false
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return 0, "", false
		}
		if tok == "id" {
			n++
			isString = json.Unmarshal(raw, &id) == nil && len(raw) > 0 && raw[0] == '"'
		}
	}
	return n, id, isString
}

// FuzzTemplate: any template that parses renders, for any subject and type, to a valid topic and subject.
func FuzzTemplate(f *testing.F) {
	f.Add(DefaultMQTTTopic, "hall", "room.entered")
	f.Add(DefaultNATSSubject, "a b", ".x..y.")
	f.Add("x/{sink}/{type}", "+#/", "")
	f.Add("{gateway}.{subject}", "*>", "\x00")
	f.Fuzz(func(t *testing.T, tmpl, subject, typ string) {
		static := map[string]string{fieldGateway: "gw", fieldSink: "up"}
		if m, err := parseTemplate(tmpl, eventFields, mqttTopicCheck); err == nil {
			topic := m.bind(static).event(subject, typ, mqttLevel)
			if err := mqttTopicCheck(topic); err != nil {
				t.Fatalf("mqtt %q with %q, %q rendered %q: %v", tmpl, subject, typ, topic, err)
			}
		}
		if n, err := parseTemplate(tmpl, eventFields, natsSubjectCheck); err == nil {
			subj := n.bind(static).event(subject, typ, natsTokens)
			if err := natsSubjectCheck(subj); err != nil {
				t.Fatalf("nats %q with %q, %q rendered %q: %v", tmpl, subject, typ, subj, err)
			}
		}
		if ct, err := parseCommandTopic(tmpl); err == nil {
			ct.bind("gw", "up")
			if ct.device < 0 || ct.command < 0 || ct.device == ct.command {
				t.Fatalf("command topic %q: device %d, command %d", tmpl, ct.device, ct.command)
			}
		}
	})
}

// FuzzRetryAfter: the wait is never negative and never above the cap.
func FuzzRetryAfter(f *testing.F) {
	for _, s := range []string{"", "0", "120", "-1", "Wed, 21 Oct 2015 07:28:00 GMT", "99999999999999999999"} {
		f.Add(s)
	}
	now := time.Date(2015, 10, 21, 7, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, v string) {
		if d := parseRetryAfter(v, now, time.Minute); d < 0 || d > time.Minute {
			t.Fatalf("parseRetryAfter(%q) = %s", v, d)
		}
	})
}
