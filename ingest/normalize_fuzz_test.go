package ingest

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/cloudevents/sdk-go/v2/event"
)

var deadLetterReasons = map[string]bool{
	ReasonTooLarge: true, ReasonInvalidTopic: true, ReasonUnknownTopic: true, ReasonNotJSON: true, ReasonNotText: true,
	ReasonInvalidCloudEvent: true, ReasonEmptyType: true, ReasonInvalidDevice: true,
}

// FuzzNormalize: whatever arrives, Normalize does not panic and gives either a valid event whose JSON is what
// the sdk encodes and decodes back to itself, or a dead letter with a known reason.
// Run: go test ./ingest -run '^$' -fuzz FuzzNormalize -fuzztime 60s
func FuzzNormalize(f *testing.F) {
	f.Add("d1", "devices/d1/events/room.entered", []byte(`{"room":"hall","time":1714471200}`), "")
	f.Add("d1", "devices/d1/telemetry/temp", []byte(`21.5`), "")
	f.Add("z2m", "zigbee2mqtt/lamp", []byte(`{"state":"ON"}`), "")
	f.Add("z2m", "zigbee2mqtt/bridge/state", []byte(`online`), "")
	f.Add("p", "tele/p/LWT", []byte("Offline"), "")
	f.Add("s", "s/online", []byte("true"), "application/json")
	f.Add("d1", "devices/d1/events/x", []byte(`{"specversion":"1.0","id":"1","source":"/s","type":"t","data":"x","datacontenttype":"text/plain","ext":"v"}`), "")
	f.Add("d1", "devices/d1/events/x", []byte(`{"specversion":"1.0","id":"1","source":"/s","type":"t"}`), "application/cloudevents+json")
	f.Add("d1", "raw/d1/a/b", []byte{0, 1, 2, 0xff}, "image/png")
	f.Add("d 1/?", "devices/d 1/events/x", []byte("\"\\u0000\""), "text/plain; charset=utf-8")
	n, err := NewNormalizer("gw-1", NormalizeConfig{
		TypePrefix:      "com.example.",
		MaxPayloadBytes: 4096,
		Presets:         PresetNames(),
		Mappings: []Mapping{
			{Topic: "raw/{device}/#", Type: "raw.{rest}", Format: FormatBinary, Priority: 3},
			{Topic: "strict/{device}/{type}", Type: "{type}", Format: FormatJSON},
			{Topic: "text/+/{metric}", Type: "m.{metric}", Device: "x-{device}", Format: FormatText},
		},
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, device, topic string, payload []byte, contentType string) {
		orig := bytes.Clone(payload)
		r, err := n.Normalize(Message{DeviceID: device, Topic: topic, Payload: payload, ContentType: contentType,
			Received: time.Unix(1714471200, 5)})
		if !bytes.Equal(payload, orig) {
			t.Fatal("Normalize modified the payload")
		}
		if err != nil {
			var dl *DeadLetterError
			if !errors.As(err, &dl) {
				t.Fatalf("error %v is not a *DeadLetterError", err)
			}
			if !deadLetterReasons[dl.Reason] {
				t.Fatalf("unknown reason %q", dl.Reason)
			}
			if r.Event != nil || r.JSON != nil {
				t.Fatal("a dead letter came with an event")
			}
			return
		}
		checkResult(t, r)
		ev := r.Event
		if ev.Subject() == "" || !utf8.ValidString(ev.Subject()) {
			t.Fatalf("subject %q", ev.Subject())
		}
		var probe struct {
			SpecVersion *json.RawMessage `json:"specversion"`
		}
		passthrough := contentType != "" && mediaType(contentType) == event.ApplicationCloudEventsJSON ||
			json.Unmarshal(payload, &probe) == nil && probe.SpecVersion != nil
		if !passthrough && !bytes.Equal(ev.Data(), trimJSONSpace(payload)) && !bytes.Equal(ev.Data(), payload) {
			t.Fatalf("data %q is not the payload %q", ev.Data(), payload)
		}
		if r.DataJSON {
			mt := mediaType(ev.DataContentType())
			if passthrough || !json.Valid(ev.Data()) || !utf8.Valid(ev.Data()) ||
				mt != event.ApplicationJSON && mt != event.TextJSON && !strings.HasSuffix(mt, "+json") {
				t.Fatalf("DataJSON set for data %q of type %q (passthrough %v)", ev.Data(), ev.DataContentType(), passthrough)
			}
		}
	})
}

// FuzzScanJSON: scanJSON agrees with encoding/json on validity, and finds top-level members as it does.
func FuzzScanJSON(f *testing.F) {
	for _, s := range []string{`{"time":1,"specversion":"1.0"}`, `[1,{"a":[]}]`, `"\ud800"`, `-0.1e+5`, `{"a":{"time":1},"time":"x"}`,
		` true `, `nul`, `{"a" 1}`, `{"\u0074ime":2}`, "\"\xff\"", `01`, `1.`, `[}`, `{}`, `[]`, `{"a":1,}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fields, ok := scanJSON(b, "time")
		want := json.Valid(b) && utf8.Valid(b)
		if ok != want {
			t.Fatalf("scanJSON(%q) valid = %v, encoding/json says %v", b, ok, want)
		}
		if !ok {
			return
		}
		var obj map[string]json.RawMessage
		if json.Unmarshal(b, &obj) != nil {
			if fields.time != nil || fields.specVersion != nil {
				t.Fatalf("members found in a non-object %q", b)
			}
			return
		}
		// encoding/json keeps the last duplicate and matches names case-insensitively: compare only when the
		// names are unique and exact.
		if dupOrFolded(b) {
			return
		}
		for name, got := range map[string][]byte{"time": fields.time, "specversion": fields.specVersion} {
			want, has := obj[name]
			if has != (got != nil) || has && !bytes.Equal(got, want) {
				t.Fatalf("%q: member %s = %q, want %q (present %v)", b, name, got, want, has)
			}
		}
	})
}

// dupOrFolded reports whether the top-level object b has duplicate member names, or names that differ from
// "time" or "specversion" only in case.
func dupOrFolded(b []byte) bool {
	dec := json.NewDecoder(bytes.NewReader(b))
	if _, err := dec.Token(); err != nil {
		return true
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return true
		}
		name, _ := tok.(string)
		if seen[name] {
			return true
		}
		seen[name] = true
		for _, want := range []string{"time", "specversion"} {
			if name != want && bytes.EqualFold([]byte(name), []byte(want)) {
				return true
			}
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return true
		}
	}
	return false
}
