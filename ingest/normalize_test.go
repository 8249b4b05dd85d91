package ingest

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/goccy/go-yaml"
	"github.com/google/uuid"
)

// The -update flag rewrites golden files. Another test file of the package may define it first; then that
// definition is used.
var _ = func() bool {
	if flag.Lookup("update") == nil {
		flag.Bool("update", false, "rewrite golden files under testdata/")
	}
	return true
}()

func updateGolden() bool {
	f := flag.Lookup("update")
	if f == nil {
		return false
	}
	v, _ := f.Value.(flag.Getter).Get().(bool)
	return v
}

// received is the fixed receipt time of test messages.
var received = time.Date(2024, 5, 1, 12, 0, 0, 0, time.FixedZone("CEST", 2*3600))

// testNormalizer returns a normalizer whose ids are deterministic: 00000000-0000-7000-8000-000000000001, ...
func testNormalizer(t testing.TB, cfg NormalizeConfig) *Normalizer {
	t.Helper()
	n, err := NewNormalizer("gw-1", cfg)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	seq := 0
	n.newID = func(dst *[36]byte) {
		mu.Lock()
		seq++
		copy(dst[:], fmt.Sprintf("00000000-0000-7000-8000-%012d", seq))
		mu.Unlock()
	}
	return n
}

// checkResult checks what every event must satisfy: valid, JSON as the sdk encodes it, and a JSON that
// decodes to the same event.
func checkResult(t testing.TB, r Result) {
	t.Helper()
	if r.Event == nil {
		t.Fatal("no event")
	}
	if err := r.Event.Validate(); err != nil {
		t.Fatalf("invalid event: %v", err)
	}
	sdk, err := r.Event.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(r.JSON, sdk) {
		t.Fatalf("JSON differs from Event.MarshalJSON:\n got %s\nwant %s", r.JSON, sdk)
	}
	if !json.Valid(r.JSON) {
		t.Fatalf("JSON is not valid: %s", r.JSON)
	}
	var back event.Event
	if err := back.UnmarshalJSON(r.JSON); err != nil {
		t.Fatalf("JSON does not decode: %v\n%s", err, r.JSON)
	}
	again, err := back.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, r.JSON) {
		t.Fatalf("JSON does not round-trip:\n got %s\nwant %s", again, r.JSON)
	}
	if !bytes.Equal(back.Data(), r.Event.Data()) {
		t.Fatalf("data does not round-trip: %q, want %q", back.Data(), r.Event.Data())
	}
}

// golden compares got with testdata/normalize/name.golden, or writes it with -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", "normalize", name+".golden")
	if updateGolden() {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./ingest -run %s -update)", err, t.Name())
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the golden file:\n got %s\nwant %s", path, got, want)
	}
}

// goldenResult renders a result for a golden file: the priority and the event JSON, indented.
func goldenResult(t *testing.T, r Result) []byte {
	t.Helper()
	var ev bytes.Buffer
	if err := json.Indent(&ev, r.JSON, "", "  "); err != nil {
		t.Fatal(err)
	}
	return []byte(fmt.Sprintf("priority: %d\n%s\n", r.Priority, ev.Bytes()))
}

func TestNormalizeGolden(t *testing.T) {
	custom := NormalizeConfig{
		TypePrefix: "com.example.",
		Mappings: []Mapping{
			{Name: "meter", Topic: "site/+/meter/{device}/{metric}", Type: "meter.{metric}", Format: FormatJSON, Priority: 7},
			{Name: "alarm", Topic: "alarms/{type}", Type: "alarm.{type}", Device: "{device}", Format: FormatText, Priority: 9},
			{Name: "raw", Topic: "raw/{device}/#", Type: "raw.{rest}", Format: FormatBinary},
			{Name: "panel", Topic: "panels/{device}/{type}", Type: "panel.{type}", Device: "panel-{device}"},
		},
	}
	cases := []struct {
		name string
		cfg  NormalizeConfig
		msg  Message
	}{
		{"default_event_json", NormalizeConfig{}, Message{DeviceID: "hall-motion", Topic: "devices/hall-motion/events/room.entered",
			Payload: []byte(`{"room":"hall"}`), QoS: 1}},
		{"default_event_time_field", NormalizeConfig{}, Message{DeviceID: "hall-motion", Topic: "devices/hall-motion/events/room.entered",
			Payload: []byte(" {\"room\":\"hall\",\"time\":\"2024-04-30T22:15:00.5+02:00\"}\n"), QoS: 1}},
		{"default_event_empty", NormalizeConfig{}, Message{DeviceID: "door-1", Topic: "devices/door-1/events/door.opened"}},
		{"default_telemetry", NormalizeConfig{}, Message{DeviceID: "t-17", Topic: "devices/t-17/telemetry",
			Payload: []byte(`{"temperature":21.5,"humidity":40,"ts":1714557600}`)}},
		{"default_telemetry_metric", NormalizeConfig{TimeField: "ts"}, Message{DeviceID: "t-17", Topic: "devices/t-17/telemetry/temperature",
			Payload: []byte(`{"value":21.5,"ts":1714557600123}`)}},
		{"default_telemetry_number", NormalizeConfig{}, Message{DeviceID: "t-17", Topic: "devices/t-17/telemetry/temperature",
			Payload: []byte(`21.5`)}},
		{"auto_text", NormalizeConfig{}, Message{DeviceID: "btn", Topic: "devices/btn/events/pressed",
			Payload: []byte("short \"press\"\n")}},
		{"auto_binary", NormalizeConfig{}, Message{DeviceID: "cam", Topic: "devices/cam/events/frame",
			Payload: []byte{0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10}}},
		{"content_type_wins", NormalizeConfig{}, Message{DeviceID: "cam", Topic: "devices/cam/events/snapshot",
			Payload: []byte{0x89, 'P', 'N', 'G'}, ContentType: "image/png"}},
		{"content_type_text_json_payload", NormalizeConfig{}, Message{DeviceID: "lcd", Topic: "devices/lcd/events/shown",
			Payload: []byte(`{"a":1}`), ContentType: "text/plain; charset=utf-8"}},
		{"content_type_vendor_json", NormalizeConfig{}, Message{DeviceID: "lcd", Topic: "devices/lcd/events/shown",
			Payload: []byte(`{"a":1}`), ContentType: "application/vnd.example+json"}},
		{"content_type_invalid_ignored", NormalizeConfig{}, Message{DeviceID: "lcd", Topic: "devices/lcd/events/shown",
			Payload: []byte(`{"a":1}`), ContentType: "not a content type"}},
		{"device_id_escaped", NormalizeConfig{}, Message{DeviceID: "unit 7/a?b", Topic: "devices/unit 7/events/x",
			Payload: []byte(`true`)}},
		{"custom_meter", custom, Message{DeviceID: "meter-gw", Topic: "site/berlin/meter/m-1/energy",
			Payload: []byte(`{"kwh":1234.5,"time":"2024-05-01T09:59:58Z"}`)}},
		{"custom_alarm_publisher", custom, Message{DeviceID: "siren-2", Topic: "alarms/smoke", Payload: []byte("kitchen")}},
		{"custom_rest", custom, Message{DeviceID: "x", Topic: "raw/x/a/b/c", Payload: []byte("text, but binary format")}},
		{"custom_device_template", custom, Message{DeviceID: "hub", Topic: "panels/3/touch", Payload: []byte(`{"x":1}`)}},
		{"custom_default_still_on", custom, Message{DeviceID: "hall-motion", Topic: "devices/hall-motion/events/room.entered",
			Payload: []byte(`{"room":"hall"}`)}},
		{"cloudevent_passthrough", custom, Message{DeviceID: "hall-motion", Topic: "devices/hall-motion/events/ignored",
			Payload: []byte(`{"specversion":"1.0","id":"dev-42","source":"urn:dev:hall","type":"room.entered","subject":"someone-else",` +
				`"time":"2024-05-01T08:00:00Z","datacontenttype":"application/json","data":{"room":"hall"},"seq":7}`)}},
		{"cloudevent_passthrough_no_time", NormalizeConfig{}, Message{DeviceID: "hall-motion", Topic: "devices/hall-motion/events/x",
			Payload: []byte(`{"specversion":"1.0","id":"dev-43","source":"/hall","type":"room.left","data_base64":"AAEC",` +
				`"datacontenttype":"application/octet-stream"}`), ContentType: "application/cloudevents+json"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := testNormalizer(t, c.cfg)
			c.msg.Received = received
			r, err := n.Normalize(c.msg)
			if err != nil {
				t.Fatal(err)
			}
			checkResult(t, r)
			golden(t, c.name, goldenResult(t, r))
		})
	}
}

func TestNormalizeContract(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{Presets: []string{PresetZigbee2MQTT}})
	payload := []byte(`{"room":"hall"}`)
	r, err := n.Normalize(Message{DeviceID: "z2m", Topic: "zigbee2mqtt/hall_sensor", Payload: payload, Received: received})
	if err != nil {
		t.Fatal(err)
	}
	ev := r.Event
	checks := []struct{ what, got, want string }{
		{"id", ev.ID(), "00000000-0000-7000-8000-000000000001"},
		{"source", ev.Source(), "/gateways/gw-1/devices/z2m"},
		{"subject", ev.Subject(), "hall_sensor"},
		{"type", ev.Type(), "zigbee2mqtt.state"},
		{"time", ev.Time().Format(time.RFC3339Nano), "2024-05-01T10:00:00Z"},
		{"datacontenttype", ev.DataContentType(), "application/json"},
		{"data", string(ev.Data()), `{"room":"hall"}`},
		{"specversion", ev.SpecVersion(), "1.0"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.what, c.got, c.want)
		}
	}
	if len(ev.Extensions()) != 0 {
		t.Errorf("extensions = %v, want none", ev.Extensions())
	}
	if ev.Time().Location() != time.UTC {
		t.Errorf("time is in %v, want UTC", ev.Time().Location())
	}
}

func TestNormalizeZeroReceived(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{})
	before := time.Now()
	r, err := n.Normalize(Message{DeviceID: "d", Topic: "devices/d/telemetry", Payload: []byte(`1`)})
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Event.Time(); got.Before(before.Add(-time.Second)) || got.After(time.Now().Add(time.Second)) {
		t.Errorf("time = %v, want about now", got)
	}
}

func TestNormalizeDeadLetters(t *testing.T) {
	cfg := NormalizeConfig{
		MaxPayloadBytes: 64,
		Presets:         []string{PresetTasmota},
		Mappings: []Mapping{
			{Topic: "strict/{device}", Type: "strict", Format: FormatJSON},
			{Topic: "text/{device}", Type: "text", Format: FormatText},
			{Topic: "anon/{type}", Type: "anon.{type}"},
			{Topic: "blank/{device}/{type}", Type: "{type}"},
		},
	}
	cases := []struct {
		name   string
		msg    Message
		reason string
	}{
		{"too_large", Message{DeviceID: "d", Topic: "devices/d/telemetry", Payload: bytes.Repeat([]byte("1"), 65)}, ReasonTooLarge},
		{"unknown_topic", Message{DeviceID: "d", Topic: "somewhere/else"}, ReasonUnknownTopic},
		{"unknown_topic_extra_level", Message{DeviceID: "d", Topic: "devices/d/events/a/b"}, ReasonUnknownTopic},
		{"unknown_topic_empty_device", Message{DeviceID: "d", Topic: "devices//events/x"}, ReasonUnknownTopic},
		{"unknown_topic_dollar", Message{DeviceID: "d", Topic: "$SYS/x"}, ReasonUnknownTopic},
		{"invalid_topic_empty", Message{DeviceID: "d", Topic: ""}, ReasonInvalidTopic},
		{"invalid_topic_wildcard", Message{DeviceID: "d", Topic: "devices/+/telemetry"}, ReasonInvalidTopic},
		{"invalid_topic_hash", Message{DeviceID: "d", Topic: "devices/d/#"}, ReasonInvalidTopic},
		{"invalid_topic_nul", Message{DeviceID: "d", Topic: "devices/d\x00/telemetry"}, ReasonInvalidTopic},
		{"invalid_topic_utf8", Message{DeviceID: "d", Topic: "devices/\xff/telemetry"}, ReasonInvalidTopic},
		{"not_json_format", Message{DeviceID: "d", Topic: "strict/d", Payload: []byte(`{"a":`)}, ReasonNotJSON},
		{"not_json_empty", Message{DeviceID: "d", Topic: "strict/d"}, ReasonNotJSON},
		{"not_json_bad_utf8", Message{DeviceID: "d", Topic: "strict/d", Payload: []byte("\"\xff\"")}, ReasonNotJSON},
		{"not_json_content_type", Message{DeviceID: "d", Topic: "devices/d/telemetry", Payload: []byte(`nope`),
			ContentType: "application/json"}, ReasonNotJSON},
		{"not_text", Message{DeviceID: "d", Topic: "text/d", Payload: []byte{0xff, 0xfe}}, ReasonNotText},
		{"not_text_with_content_type", Message{DeviceID: "d", Topic: "text/d", Payload: []byte{0xff, 0xfe},
			ContentType: "text/plain"}, ReasonNotText},
		{"invalid_cloudevent_missing_id", Message{DeviceID: "d", Topic: "devices/d/events/x",
			Payload: []byte(`{"specversion":"1.0","source":"/s","type":"t"}`)}, ReasonInvalidCloudEvent},
		{"invalid_cloudevent_version", Message{DeviceID: "d", Topic: "devices/d/events/x",
			Payload: []byte(`{"specversion":"0.3","id":"1","source":"/s","type":"t"}`)}, ReasonInvalidCloudEvent},
		{"invalid_cloudevent_version_number", Message{DeviceID: "d", Topic: "devices/d/events/x",
			Payload: []byte(`{"specversion":1,"id":"1","source":"/s","type":"t"}`)}, ReasonInvalidCloudEvent},
		{"invalid_cloudevent_content_type", Message{DeviceID: "d", Topic: "devices/d/events/x",
			Payload: []byte(`{"id":"1"}`), ContentType: "application/cloudevents+json"}, ReasonInvalidCloudEvent},
		{"invalid_cloudevent_blank_type", Message{DeviceID: "d", Topic: "devices/d/events/x",
			Payload: []byte(`{"specversion":"1.0","id":"1","source":"/s","type":" "}`)}, ReasonInvalidCloudEvent},
		{"empty_type", Message{DeviceID: "d", Topic: "blank/d/ "}, ReasonEmptyType},
		{"invalid_device_blank", Message{DeviceID: "", Topic: "anon/x"}, ReasonInvalidDevice},
		{"invalid_device_utf8", Message{DeviceID: "\xff", Topic: "devices/d/telemetry"}, ReasonInvalidDevice},
	}
	n := testNormalizer(t, cfg)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := n.Normalize(c.msg)
			var dl *DeadLetterError
			if !errors.As(err, &dl) {
				t.Fatalf("err = %v (event %v), want a *DeadLetterError", err, r.Event)
			}
			if dl.Reason != c.reason {
				t.Fatalf("reason = %q (%s), want %q", dl.Reason, dl.Detail, c.reason)
			}
			if dl.Detail == "" || !strings.Contains(err.Error(), c.reason) {
				t.Errorf("error %q: want a detail and the reason", err)
			}
			if r.Event != nil || r.JSON != nil {
				t.Errorf("a dead letter came with an event")
			}
		})
	}
}

func TestNormalizeTime(t *testing.T) {
	recv := received.UTC()
	cases := []struct {
		name    string
		field   string // time_field
		payload string
		want    time.Time
	}{
		{"rfc3339", "", `{"time":"2024-04-30T10:00:00Z"}`, time.Date(2024, 4, 30, 10, 0, 0, 0, time.UTC)},
		{"rfc3339_offset_nanos", "", `{"time":"2024-04-30T12:00:00.123456789+02:00"}`, time.Date(2024, 4, 30, 10, 0, 0, 123456789, time.UTC)},
		{"rfc3339_escaped", "", `{"time":"2024-04-30T10:00:00\u005a"}`, time.Date(2024, 4, 30, 10, 0, 0, 0, time.UTC)},
		{"epoch_seconds", "", `{"time":1714471200}`, time.Date(2024, 4, 30, 10, 0, 0, 0, time.UTC)},
		{"epoch_seconds_fraction", "", `{"time":1714471200.25}`, time.Date(2024, 4, 30, 10, 0, 0, 250000000, time.UTC)},
		{"epoch_milliseconds", "", `{"time":1714471200123}`, time.Date(2024, 4, 30, 10, 0, 0, 123000000, time.UTC)},
		{"epoch_exponent", "", `{"time":1.7144712e9}`, time.Date(2024, 4, 30, 10, 0, 0, 0, time.UTC)},
		{"custom_field", "ts", `{"time":"bad","ts":1714471200}`, time.Date(2024, 4, 30, 10, 0, 0, 0, time.UTC)},
		{"first_duplicate_wins", "", `{"time":1714471200,"time":1}`, time.Date(2024, 4, 30, 10, 0, 0, 0, time.UTC)},
		{"nested_ignored", "", `{"x":{"time":1714471200}}`, recv},
		{"absent", "", `{"temp":1}`, recv},
		{"not_an_object", "", `[{"time":1714471200}]`, recv},
		{"bad_string", "", `{"time":"yesterday"}`, recv},
		{"bad_date", "", `{"time":"2024-02-30T10:00:00Z"}`, recv},
		{"before_2000", "", `{"time":12345}`, recv},
		{"negative", "", `{"time":-1714471200}`, recv},
		{"huge", "", `{"time":1e300}`, recv},
		{"far_future_ms", "", `{"time":999999999999999}`, recv},
		{"null", "", `{"time":null}`, recv},
		{"object", "", `{"time":{"s":1}}`, recv},
		{"bool", "", `{"time":true}`, recv},
		{"disabled", "-", `{"time":1714471200}`, recv},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := testNormalizer(t, NormalizeConfig{TimeField: c.field})
			r, err := n.Normalize(Message{DeviceID: "d", Topic: "devices/d/telemetry", Payload: []byte(c.payload), Received: received})
			if err != nil {
				t.Fatal(err)
			}
			checkResult(t, r)
			if got := r.Event.Time(); !got.Equal(c.want) {
				t.Errorf("time = %v, want %v", got, c.want)
			}
		})
	}
}

func TestParseEventTime(t *testing.T) {
	cases := []struct {
		raw  string
		want time.Time
		ok   bool
	}{
		{`"2000-01-01T00:00:00Z"`, time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC), true},
		{`"1999-12-31T23:59:59Z"`, time.Time{}, false},
		{`"9999-12-31T23:59:59.999999999Z"`, time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC), true},
		{`"9999-12-31T23:59:59Z"`, time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC), true},
		{`"9999-12-31T23:00:00-02:00"`, time.Time{}, false}, // year 10000 in UTC
		{`946684800`, time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC), true},
		{`100000000000`, time.Unix(1e11, 0).UTC(), true}, // 1e11 is still seconds: year 5138
		{`100000000001`, time.Time{}, false},             // above 1e11 are milliseconds: 1973
		{`253402300799999`, time.Date(9999, 12, 31, 23, 59, 59, 999000000, time.UTC), true},
		{`""`, time.Time{}, false},
		{`"2024-05-01T12:00:00"`, time.Time{}, false}, // no zone
		{`1714471200.`, time.Time{}, false},
		{``, time.Time{}, false},
	}
	for _, c := range cases {
		got, ok := parseEventTime([]byte(c.raw))
		if ok != c.ok || (ok && !got.Equal(c.want)) {
			t.Errorf("parseEventTime(%s) = %v, %v; want %v, %v", c.raw, got, ok, c.want, c.ok)
		}
	}
}

func TestNormalizeIDs(t *testing.T) {
	const count = 100_000
	var prev [36]byte
	seen := make(map[[36]byte]bool, count)
	var g idGen
	for i := range count {
		var id [36]byte
		g.next(&id)
		if seen[id] {
			t.Fatalf("id %s repeated after %d ids", id[:], i)
		}
		seen[id] = true
		if i > 0 && bytes.Compare(id[:], prev[:]) <= 0 {
			t.Fatalf("id %s not after %s", id[:], prev[:])
		}
		prev = id
	}
	u, err := uuid.Parse(string(prev[:]))
	if err != nil {
		t.Fatal(err)
	}
	if u.Version() != 7 || u.String() != string(prev[:]) {
		t.Errorf("id %s: version %d, canonical %s", prev[:], u.Version(), u)
	}

	// Through Normalize, from many goroutines: unique, and each goroutine's ids increase.
	n, err := NewNormalizer("gw-1", NormalizeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	const workers, per = 4, 500
	ids := make([][]string, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for range per {
				r, err := n.Normalize(Message{DeviceID: "d", Topic: "devices/d/telemetry", Payload: []byte(`1`)})
				if err != nil {
					t.Error(err)
					return
				}
				ids[w] = append(ids[w], r.Event.ID())
			}
		})
	}
	wg.Wait()
	all := map[string]bool{}
	for _, list := range ids {
		for i, id := range list {
			if all[id] {
				t.Fatalf("id %s repeated", id)
			}
			all[id] = true
			if i > 0 && id <= list[i-1] {
				t.Fatalf("id %s not after %s", id, list[i-1])
			}
		}
	}
}

func TestNormalizeConcurrent(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{Presets: []string{PresetZigbee2MQTT, PresetTasmota, PresetShelly}})
	msgs := []Message{
		{DeviceID: "a", Topic: "devices/a/events/x", Payload: []byte(`{"time":1714471200}`)},
		{DeviceID: "z2m", Topic: "zigbee2mqtt/lamp", Payload: []byte(`{"state":"ON"}`)},
		{DeviceID: "plug", Topic: "tele/plug/LWT", Payload: []byte(`Online`)},
		{DeviceID: "a", Topic: "devices/a/events/x", Payload: []byte(`{"specversion":"1.0","id":"1","source":"/a","type":"t"}`)},
		{DeviceID: "a", Topic: "nowhere"},
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for i := range 200 {
				m := msgs[i%len(msgs)]
				r, err := n.Normalize(m)
				if err != nil {
					var dl *DeadLetterError
					if !errors.As(err, &dl) {
						t.Error(err)
					}
					continue
				}
				if r.Event.Validate() != nil || len(r.JSON) == 0 {
					t.Error("bad result")
				}
				_ = n.Presence("a", i%2 == 0, "", received)
			}
		})
	}
	wg.Wait()
}

func TestNormalizeConfigValidate(t *testing.T) {
	cases := []struct {
		name string
		cfg  NormalizeConfig
		errs []string // each must appear; none means valid
	}{
		{"zero", NormalizeConfig{}, nil},
		{"default", DefaultNormalizeConfig(), nil},
		{"all presets", NormalizeConfig{Presets: PresetNames()}, nil},
		{"full", NormalizeConfig{TypePrefix: "com.example.", TimeField: "ts", MaxPayloadBytes: 1 << 20,
			Mappings: []Mapping{{Name: "m", Topic: "a/{device}/#", Type: "a.{rest}", Format: FormatJSON, Priority: 9}}}, nil},
		{"time field off", NormalizeConfig{TimeField: "-"}, nil},
		{"bad everything", NormalizeConfig{
			TypePrefix:      "com example",
			MaxPayloadBytes: -1,
			Presets:         []string{"tasmota", "homeassistant", "tasmota"},
			Mappings: []Mapping{
				{Topic: "", Type: ""},
				{Name: "x", Topic: "a/#/b", Type: "{metric}", Format: "xml", Priority: 10},
				{Name: "x", Topic: "a/{device}", Type: "t"},
				{Topic: "a/dev-{device}", Type: "t"},
				{Topic: "a/{device}/{device}", Type: "t{"},
				{Topic: "a/{type}", Type: "{nope}", Device: "}"},
				{Topic: "a/b", Type: "has space"},
			},
		}, []string{
			`ingest.type_prefix: "com example"`,
			"ingest.max_payload_bytes: must be between 1 and 268435456",
			`ingest.presets[1]: unknown preset "homeassistant" (known: shelly, tasmota, zigbee2mqtt)`,
			`ingest.presets[2]: preset "tasmota" is listed twice`,
			"ingest.mappings[0].topic: required",
			"ingest.mappings[0].type: required",
			`ingest.mappings[1].topic: "a/#/b": '#' must be the last level`,
			`ingest.mappings[1].type: "{metric}": placeholder {metric} is not in the topic pattern`,
			`ingest.mappings[1].format: "xml" is not auto, json, text or binary`,
			"ingest.mappings[1].priority: must be 0..9, got 10",
			`ingest.mappings[2].name: "x" is already used by ingest.mappings[1]`,
			`ingest.mappings[3].topic: "a/dev-{device}": level "dev-{device}": wildcards and placeholders`,
			`ingest.mappings[4].topic: "a/{device}/{device}": placeholder {device} is used twice`,
			`ingest.mappings[4].type: "t{": '{' without '}'`,
			`ingest.mappings[5].type: "{nope}": unknown placeholder {nope}`,
			`ingest.mappings[5].device: "}": '}' without '{'`,
			`ingest.mappings[6].type: "has space": "has space" must be valid UTF-8 without spaces`,
		}},
		{"too large", NormalizeConfig{MaxPayloadBytes: 256<<20 + 1}, []string{"ingest.max_payload_bytes"}},
		{"nothing left", NormalizeConfig{DisableDefault: true}, []string{"ingest.disable_default_mappings: no mappings left"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.cfg.Validate()
			if len(c.errs) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				if _, err := NewNormalizer("gw", c.cfg); err != nil {
					t.Fatalf("NewNormalizer: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("Validate: no error")
			}
			for _, want := range c.errs {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error lacks %q:\n%v", want, err)
				}
			}
			if got, want := len(strings.Split(err.Error(), "\n")), len(c.errs); got != want {
				t.Errorf("%d problems reported, want %d:\n%v", got, want, err)
			}
			if _, err := NewNormalizer("gw", c.cfg); err == nil {
				t.Error("NewNormalizer accepted an invalid config")
			}
		})
	}
	if _, err := NewNormalizer("", NormalizeConfig{}); err == nil {
		t.Error("NewNormalizer accepted an empty gateway id")
	}
}

func TestNormalizeConfigYAML(t *testing.T) {
	const doc = `
type_prefix: com.example.
time_field: ts
max_payload_bytes: 131072
presets: [zigbee2mqtt, tasmota, shelly]
disable_default_mappings: false
mappings:
  - name: meter
    topic: site/+/meter/{device}/{metric}
    type: meter.{metric}
    format: json
    priority: 5
    device: "{device}"
`
	cfg := DefaultNormalizeConfig()
	if err := yaml.NewDecoder(strings.NewReader(doc), yaml.Strict()).Decode(&cfg); err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	want := NormalizeConfig{TypePrefix: "com.example.", TimeField: "ts", MaxPayloadBytes: 131072,
		Presets: []string{"zigbee2mqtt", "tasmota", "shelly"},
		Mappings: []Mapping{{Name: "meter", Topic: "site/+/meter/{device}/{metric}", Type: "meter.{metric}",
			Format: "json", Priority: 5, Device: "{device}"}}}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("decoded %+v\nwant    %+v", cfg, want)
	}
	var minimal NormalizeConfig
	if err := yaml.Unmarshal([]byte("presets: [tasmota]\n"), &minimal); err != nil {
		t.Fatal(err)
	}
	if err := minimal.Validate(); err != nil {
		t.Errorf("minimal YAML: %v", err)
	}
}

func TestDeadLetterErrorAs(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{})
	_, err := n.Normalize(Message{DeviceID: "d", Topic: "x"})
	wrapped := fmt.Errorf("broker: %w", err)
	var dl *DeadLetterError
	if !errors.As(wrapped, &dl) || dl.Reason != ReasonUnknownTopic {
		t.Fatalf("errors.As(%v) = %v", wrapped, dl)
	}
	if got := dl.Error(); got != "ingest: dead letter: unknown_topic: no mapping matches the topic" {
		t.Errorf("Error() = %q", got)
	}
}

func TestNormalizePassthrough(t *testing.T) {
	const head = `{"specversion":"1.0","id":"dev-1","source":"/s","type":"t"`
	cases := []struct {
		name, payload string
		reason        string // dead letter; "" for an event
		check         func(t *testing.T, ev *event.Event)
	}{
		{"minimal", head + `}`, "", func(t *testing.T, ev *event.Event) {
			if ev.ID() != "dev-1" || ev.Source() != "/s" || ev.Type() != "t" || ev.Subject() != "d" || !ev.Time().Equal(received) {
				t.Errorf("event %v", ev)
			}
		}},
		{"subject replaced", head + `,"subject":"other"}`, "", func(t *testing.T, ev *event.Event) {
			if ev.Subject() != "d" {
				t.Errorf("subject %q", ev.Subject())
			}
		}},
		{"own time kept", head + `,"time":"2024-01-01T00:00:00+02:00"}`, "", func(t *testing.T, ev *event.Event) {
			if !ev.Time().Equal(time.Date(2023, 12, 31, 22, 0, 0, 0, time.UTC)) {
				t.Errorf("time %v", ev.Time())
			}
		}},
		{"extensions kept", head + `,"seq":3,"flag":true,"note":"x","Upper":"y"}`, "", func(t *testing.T, ev *event.Event) {
			ext := ev.Extensions()
			if len(ext) != 4 || ext["note"] != "x" || ext["upper"] != "y" {
				t.Errorf("extensions %v", ext)
			}
		}},
		{"text data", head + `,"datacontenttype":"text/plain","data":"hi"}`, "", func(t *testing.T, ev *event.Event) {
			if string(ev.Data()) != "hi" {
				t.Errorf("data %q", ev.Data())
			}
		}},
		{"base64 data", head + `,"data_base64":"AAE="}`, "", func(t *testing.T, ev *event.Event) {
			if !bytes.Equal(ev.Data(), []byte{0, 1}) {
				t.Errorf("data %q", ev.Data())
			}
		}},
		{"prefix not applied", head + `}`, "", func(t *testing.T, ev *event.Event) {
			if ev.Type() != "t" {
				t.Errorf("type %q", ev.Type())
			}
		}},
		{"object extension", head + `,"ext":{"a":1}}`, ReasonInvalidCloudEvent, nil},
		{"array extension", head + `,"ext":[1]}`, ReasonInvalidCloudEvent, nil},
		{"text data not a string", head + `,"datacontenttype":"text/plain","data":5}`, ReasonInvalidCloudEvent, nil},
		{"bad source", `{"specversion":"1.0","id":"1","source":"::bad","type":"t"}`, ReasonInvalidCloudEvent, nil},
		{"bad time", head + `,"time":"yesterday"}`, ReasonInvalidCloudEvent, nil},
		{"relative dataschema", head + `,"dataschema":"rel"}`, ReasonInvalidCloudEvent, nil},
		{"data and data_base64", head + `,"data_base64":"AA==","data":1}`, ReasonInvalidCloudEvent, nil},
		{"missing source", `{"specversion":"1.0","id":"1","type":"t"}`, ReasonInvalidCloudEvent, nil},
		{"nested specversion is plain data", `{"inner":{"specversion":"1.0"}}`, "", func(t *testing.T, ev *event.Event) {
			if ev.Type() != "com.example.x" || ev.ID() == "dev-1" {
				t.Errorf("event %v", ev)
			}
		}},
	}
	n := testNormalizer(t, NormalizeConfig{TypePrefix: "com.example."})
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := n.Normalize(Message{DeviceID: "d", Topic: "devices/d/events/x", Payload: []byte(c.payload), Received: received})
			if c.reason != "" {
				var dl *DeadLetterError
				if !errors.As(err, &dl) || dl.Reason != c.reason {
					t.Fatalf("err = %v, want dead letter %s", err, c.reason)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			checkResult(t, r)
			c.check(t, r.Event)
		})
	}
}

func TestDeadLetterDetailBounded(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{})
	payload := `{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"text/plain","data":5,"pad":"` +
		strings.Repeat("é", 500) + `"}`
	_, err := n.Normalize(Message{DeviceID: "d", Topic: "devices/d/events/x", Payload: []byte(payload)})
	var dl *DeadLetterError
	if !errors.As(err, &dl) || dl.Reason != ReasonInvalidCloudEvent {
		t.Fatalf("err = %v", err)
	}
	if len(dl.Detail) > maxDetail || strings.Contains(dl.Detail, "\n") || !utf8.ValidString(dl.Detail) {
		t.Errorf("detail (%d bytes) not bounded to one line: %q", len(dl.Detail), dl.Detail)
	}
}

// Result.DataJSON is set exactly for data the normalizer checked as JSON under a JSON content type.
func TestNormalizeDataJSON(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{Mappings: []Mapping{
		{Topic: "raw/{device}/#", Type: "raw.{rest}", Format: FormatBinary},
		{Topic: "text/{device}/{type}", Type: "{type}", Format: FormatText},
	}})
	ce := `{"specversion":"1.0","id":"dev-1","source":"/hall","type":"room.entered","datacontenttype":"application/json",` +
		`"data":{"room":"hall"}}`
	cases := []struct {
		name    string
		topic   string
		payload string
		ct      string
		want    bool
	}{
		{"json object", "devices/d/events/x", ` {"room":"hall","n":1} `, "", true},
		{"json scalar", "devices/d/events/x", `21.5`, "", true},
		{"json content type", "devices/d/events/x", `{"a":1}`, "application/json; charset=utf-8", true},
		{"vendor json content type", "devices/d/events/x", `{"a":1}`, "application/vnd.example+json", true},
		{"invalid content type ignored", "devices/d/events/x", `{"a":1}`, "not a content type", true},
		{"text", "devices/d/events/x", `hello`, "", false},
		{"broken json is text", "devices/d/events/x", `{"a":`, "", false},
		{"text mapping", "text/d/x", `{"a":1}`, "", false},
		{"binary", "devices/d/events/x", "\x89PNG\xff", "", false},
		{"binary mapping", "raw/d/x", `{"a":1}`, "", false},
		{"json under text content type", "devices/d/events/x", `{"a":1}`, "text/plain", false},
		{"json under binary content type", "devices/d/events/x", `{"a":1}`, "application/octet-stream", false},
		{"empty", "devices/d/events/x", ``, "", false},
		{"cloudevent", "devices/d/events/x", ce, "", false},
		{"cloudevent content type", "devices/d/events/x", ce, "application/cloudevents+json", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := n.Normalize(Message{DeviceID: "d", Topic: c.topic, Payload: []byte(c.payload), ContentType: c.ct,
				Received: received})
			if err != nil {
				t.Fatal(err)
			}
			checkResult(t, r)
			if r.DataJSON != c.want {
				t.Fatalf("DataJSON = %v, want %v (data %q, content type %q)", r.DataJSON, c.want, r.Event.Data(),
					r.Event.DataContentType())
			}
			if r.DataJSON && !json.Valid(r.Event.Data()) {
				t.Fatalf("DataJSON set for data %q that is not JSON", r.Event.Data())
			}
		})
	}
}

// The payload is the data byte for byte unless the event embeds it as JSON: only then is the white space around
// JSON dropped. A JSON-looking payload under a content type that is not JSON keeps every byte.
func TestNormalizeDataUnchangedUnlessEmbeddedAsJSON(t *testing.T) {
	n := testNormalizer(t, NormalizeConfig{})
	cases := []struct {
		name, payload, ct string
		want              string
	}{
		{"text content type", " 42\n", "text/plain", " 42\n"},
		{"csv content type", " 42\n", "text/csv", " 42\n"},
		{"text content type, object", " {\"a\":1}\t", "text/plain; charset=utf-8", " {\"a\":1}\t"},
		{"vendor json content type (embedded as a string)", " {\"a\":1} ", "application/vnd.example+json", " {\"a\":1} "},
		{"binary content type", " {\"a\":1} ", "application/octet-stream", " {\"a\":1} "},
		{"json content type", " {\"a\":1}\r\n", "application/json", "{\"a\":1}"},
		{"json detected", " 42\n", "", "42"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := n.Normalize(Message{DeviceID: "d", Topic: "devices/d/events/x", Payload: []byte(c.payload),
				ContentType: c.ct, Received: received})
			if err != nil {
				t.Fatal(err)
			}
			checkResult(t, r)
			if got := string(r.Event.Data()); got != c.want {
				t.Errorf("data %q, want %q (content type %q)", got, c.want, r.Event.DataContentType())
			}
		})
	}
}
