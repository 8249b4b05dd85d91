package ingest

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"math"
	"mime"
	"net/url"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/cloudevents/sdk-go/v2/types"
)

// Message is one accepted PUBLISH.
type Message struct {
	DeviceID    string // the authenticated device (username or certificate CN)
	Topic       string
	Payload     []byte // shared with the event's data: not modified after Normalize
	QoS         byte
	Retain      bool
	ContentType string    // MQTT 5 content type property, "" if none
	Received    time.Time // the time of receipt; zero means now
}

// Result is one normalized event.
type Result struct {
	// Event is the CloudEvent. It shares memory with Message.Payload and JSON: treat it as read-only.
	Event *event.Event
	// Priority is the priority of the mapping that matched (0 lowest .. 9 highest), for the log's retention.
	Priority uint8
	// JSON is Event in CloudEvents JSON structured mode, encoded once with Event.MarshalJSON; the log stores it.
	JSON []byte
	// DataJSON reports that Event's data is JSON that the normalizer checked (valid JSON in UTF-8) and that its
	// content type says JSON, so consumers need not validate it again. It is false for events without data,
	// for other data (text, binary, JSON under a non-JSON content type) and for CloudEvents published as is.
	DataJSON bool
}

// Dead-letter reasons: the values of DeadLetterError.Reason. The set is fixed, so the broker may use it as a
// metric label.
const (
	// ReasonTooLarge: the payload is larger than NormalizeConfig.MaxPayloadBytes.
	ReasonTooLarge = "too_large"
	// ReasonInvalidTopic: the topic is empty, not UTF-8, or contains U+0000, '+' or '#'.
	ReasonInvalidTopic = "invalid_topic"
	// ReasonUnknownTopic: no mapping matches the topic.
	ReasonUnknownTopic = "unknown_topic"
	// ReasonNotJSON: the mapping's format or the MQTT 5 content type says JSON, and the payload is not JSON.
	ReasonNotJSON = "not_json"
	// ReasonNotText: the mapping's format is text, and the payload is not UTF-8.
	ReasonNotText = "not_text"
	// ReasonInvalidCloudEvent: the payload claims to be a CloudEvent (a JSON object with a top-level
	// "specversion", or content type application/cloudevents+json) and is not a valid CloudEvents 1.0 event.
	ReasonInvalidCloudEvent = "invalid_cloudevent"
	// ReasonEmptyType: the rendered event type (without the prefix) is blank.
	ReasonEmptyType = "empty_type"
	// ReasonInvalidDevice: the device the event is about is blank or not UTF-8, or the publishing device is not
	// UTF-8.
	ReasonInvalidDevice = "invalid_device"
)

// DeadLetterError says why a message could not become an event. Normalize returns it as *DeadLetterError;
// the message is then kept as a dead letter with its original bytes.
type DeadLetterError struct {
	Reason string // one of the Reason constants
	Detail string // a short explanation for operators, one line of at most maxDetail bytes
}

// Error implements error: "ingest: dead letter: {reason}: {detail}".
func (e *DeadLetterError) Error() string {
	return "ingest: dead letter: " + e.Reason + ": " + e.Detail
}

// maxDetail bounds DeadLetterError.Detail: decoder errors may quote the payload at length.
const maxDetail = 256

func deadLetter(reason, format string, args ...any) (Result, error) {
	d := fmt.Sprintf(format, args...)
	if len(d) > maxDetail {
		cut := maxDetail - len("...")
		for cut > 0 && !utf8.RuneStart(d[cut]) {
			cut--
		}
		d = d[:cut] + "..."
	}
	return Result{}, &DeadLetterError{Reason: reason, Detail: d}
}

// Content types the normalizer sets.
const (
	contentTypeJSON   = event.ApplicationJSON
	contentTypeText   = "text/plain; charset=utf-8"
	contentTypeBinary = "application/octet-stream"
	contentTypeCE     = event.ApplicationCloudEventsJSON
)

// Normalizer turns messages into CloudEvents. It is safe for concurrent use; its configuration does not change
// after NewNormalizer.
//
// For a message on a topic that a mapping matches:
//   - id is a UUIDv7 (unique, time-ordered), assigned here once;
//   - source is /gateways/{gateway}/devices/{publisher}, the device that published (path segments escaped);
//   - subject is the device the event is about: the topic's {device} (the broker checked that the publisher
//     may publish there), or the publisher, or the mapping's Device template;
//   - type is the type prefix and the rendered type template;
//   - time is the payload's time field when it is valid, else the time of receipt, in UTC;
//   - data is the payload, unchanged: JSON is embedded as is, without the white space around it
//     (application/json), UTF-8 text as a string (text/plain; charset=utf-8), anything else base64
//     (data_base64, application/octet-stream). An MQTT 5 content type, when valid, becomes datacontenttype
//     instead; a payload it does not embed as JSON (text/plain, application/vnd.x+json, ...) keeps every
//     byte, white space included. An empty payload gives an event without data.
//
// The event carries no extensions: the MQTT topic is not recorded (it is transport detail; rules match on
// type and subject), and the dead-letter store keeps the topic of what failed.
//
// A payload that is a JSON object with a top-level "specversion" (or whose content type is
// application/cloudevents+json) is a CloudEvent published as is: it must be a valid CloudEvents 1.0 event,
// and is kept with its own id, source, type, time, data and extensions. Its subject is set to the device as
// above: the subject is the stream key downstream, so a device cannot speak for a device the ACL did not let
// it publish for. Without a time it gets the time of receipt. The type prefix is not applied to it.
type Normalizer struct {
	mappings  []*mapping
	timeField string // "" when off
	maxBytes  int
	srcPrefix string // "/gateways/{gateway}/devices/"
	srcRaw    string // srcPrefix with the gateway escaped, "" when escaping changes nothing
	connected string // presence types, with the prefix
	discon    string
	newID     func(*[36]byte) // writes a new id; replaced by tests
	ids       idGen
	sources   sourceCache
}

// NewNormalizer validates cfg and returns a Normalizer for the gateway named gatewayID.
func NewNormalizer(gatewayID string, cfg NormalizeConfig) (*Normalizer, error) {
	if gatewayID == "" {
		return nil, fmt.Errorf("ingest: normalizer: gateway id is empty")
	}
	cfg = cfg.withDefaults()
	ms, err := cfg.compile()
	if err != nil {
		return nil, fmt.Errorf("ingest: normalizer: %w", err)
	}
	n := &Normalizer{
		mappings:  ms,
		timeField: cfg.TimeField,
		maxBytes:  cfg.MaxPayloadBytes,
		srcPrefix: "/gateways/" + gatewayID + "/devices/",
		connected: cfg.TypePrefix + "device.connected",
		discon:    cfg.TypePrefix + "device.disconnected",
		sources:   sourceCache{max: maxCachedSources},
	}
	n.newID = n.ids.next
	if n.timeField == "-" {
		n.timeField = ""
	}
	if esc := url.PathEscape(gatewayID); esc != gatewayID {
		n.srcRaw = "/gateways/" + esc + "/devices/"
	}
	return n, nil
}

// idGen makes UUIDv7 event ids (RFC 9562): a millisecond timestamp, a 12-bit counter that keeps the ids of one
// generator strictly increasing (within a millisecond too), and 62 random bits from crypto/rand, which does not
// fail. It needs no lock and no allocation.
type idGen struct {
	last atomic.Uint64 // ms<<12 | counter, of the last id made
}

// next writes a new id in its canonical string form (as uuid.UUID.String).
func (g *idGen) next(dst *[36]byte) {
	now := uint64(time.Now().UnixMilli()) << 12
	var v uint64
	for {
		last := g.last.Load()
		v = max(now, last+1) // more than 4096 ids in a millisecond borrow from the next one
		if g.last.CompareAndSwap(last, v) {
			break
		}
	}
	var u [16]byte
	_, _ = rand.Read(u[8:])
	ms := v >> 12
	u[0], u[1], u[2], u[3], u[4], u[5] = byte(ms>>40), byte(ms>>32), byte(ms>>24), byte(ms>>16), byte(ms>>8), byte(ms)
	u[6] = 0x70 | byte(v>>8)&0x0f // version 7, counter high bits
	u[7] = byte(v)
	u[8] = 0x80 | u[8]&0x3f // variant 10
	const hex = "0123456789abcdef"
	j := 0
	for i, c := range u {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			dst[j] = '-'
			j++
		}
		dst[j], dst[j+1] = hex[c>>4], hex[c&0xf]
		j += 2
	}
}

// eventBox holds an event and the attribute values its context points to, so that building one costs a
// single allocation.
type eventBox struct {
	ev      event.Event
	ctx     event.EventContextV1
	subject string
	dct     string
	ts      types.Timestamp
	id      [36]byte // the id's bytes; written once, before ctx.ID points at them
}

// source returns the event source naming the gateway and the device, and its string form.
func (n *Normalizer) source(device string) (types.URIRef, string) {
	if s, ok := n.sources.get(device); ok {
		return types.URIRef{URL: s.u}, s.s
	}
	u := url.URL{Path: n.srcPrefix + device}
	str := u.Path
	if esc := url.PathEscape(device); esc != device || n.srcRaw != "" {
		raw := n.srcRaw
		if raw == "" {
			raw = n.srcPrefix
		}
		u.RawPath = raw + esc
		str = u.RawPath
	}
	n.sources.put(device, &cachedSource{u: u, s: str})
	return types.URIRef{URL: u}, str
}

// newResult builds a CloudEvents 1.0 event and its JSON; dct "" means no datacontenttype.
func (n *Normalizer) newResult(typ, publisher, subject, dct string, at time.Time, data []byte, base64 bool, priority uint8) Result {
	b := &eventBox{subject: subject, dct: dct, ts: types.Timestamp{Time: at}}
	n.newID(&b.id)
	src, srcString := n.source(publisher)
	b.ctx = event.EventContextV1{
		ID:      unsafe.String(&b.id[0], len(b.id)), // b.id is not written again
		Source:  src,
		Type:    typ,
		Subject: &b.subject,
		Time:    &b.ts,
	}
	if subject == "" {
		b.ctx.Subject = nil
	}
	if dct != "" {
		b.ctx.DataContentType = &b.dct
	}
	b.ev.Context = &b.ctx
	b.ev.DataEncoded = data
	b.ev.DataBase64 = base64
	js := make([]byte, 0, eventSize(b.ctx.ID, srcString, typ, subject, dct, data, base64))
	js = appendEvent(js, b.ctx.ID, srcString, typ, subject, dct, at, data, base64)
	return Result{Event: &b.ev, Priority: priority, JSON: js}
}

// validTopic reports whether topic is a valid MQTT topic name to publish to.
func validTopic(topic string) bool {
	if topic == "" {
		return false
	}
	for i := 0; i < len(topic); i++ {
		switch c := topic[i]; {
		case c == 0, c == '+', c == '#':
			return false
		case c >= utf8.RuneSelf:
			return utf8.ValidString(topic[i:]) && !strings.ContainsAny(topic[i:], "\x00+#")
		}
	}
	return true
}

// maxLevels is how many topic levels are split without allocating.
const maxLevels = 16

// Normalize turns one message into one event, or returns a *DeadLetterError saying why it cannot; it returns
// no other error. Result.JSON is the event's CloudEvents JSON (byte for byte what Event.MarshalJSON gives).
func (n *Normalizer) Normalize(m Message) (Result, error) {
	if len(m.Payload) > n.maxBytes {
		return deadLetter(ReasonTooLarge, "payload is %d bytes, more than ingest.max_payload_bytes %d", len(m.Payload), n.maxBytes)
	}
	if !validTopic(m.Topic) {
		return deadLetter(ReasonInvalidTopic, "topic is empty, not UTF-8, or contains U+0000, '+' or '#'")
	}
	var buf [maxLevels]string
	levels := splitTopic(m.Topic, buf[:0])
	var c captures
	var mp *mapping
	for _, cand := range n.mappings {
		if cand.match(m.Topic, levels, m.DeviceID, &c) {
			mp = cand
			break
		}
	}
	if mp == nil {
		return deadLetter(ReasonUnknownTopic, "no mapping matches the topic")
	}
	subject := mp.device.render(&c)
	if strings.TrimSpace(subject) == "" || !utf8.ValidString(subject) || !utf8.ValidString(m.DeviceID) {
		return deadLetter(ReasonInvalidDevice, "mapping %s: the device is blank or not UTF-8", mp.name)
	}
	at := m.Received
	if at.IsZero() {
		at = time.Now()
	}
	at = at.UTC()

	// What the payload is: the content type, when valid, names it; else the mapping's format does.
	media := ""
	dct := ""
	if m.ContentType != "" {
		media, dct = mediaType(m.ContentType), m.ContentType
		if media == "" {
			dct = "" // not a valid content type: ignored
		}
	}
	if media == contentTypeCE {
		return n.passthrough(m, mp, subject, at)
	}
	jsonMedia := media != "" && (media == event.ApplicationJSON || media == event.TextJSON || strings.HasSuffix(media, "+json"))
	payload := m.Payload
	var (
		data   []byte
		base64 bool
		isJSON bool
		fields objectFields
	)
	switch {
	case len(payload) == 0:
		if mp.format == formatJSON || jsonMedia {
			return deadLetter(ReasonNotJSON, "mapping %s: the payload is empty, not JSON", mp.name)
		}
		dct = "" // no data, so nothing to describe
	case mp.format == formatJSON || mp.format == formatAuto || jsonMedia:
		fields, isJSON = scanJSON(payload, n.timeField)
		if !isJSON && (mp.format == formatJSON || jsonMedia) {
			return deadLetter(ReasonNotJSON, "mapping %s: the payload is not JSON (UTF-8)", mp.name)
		}
	}
	if media != "" && !jsonMedia {
		fields = objectFields{} // the content type says the data is not JSON: no CloudEvent, no time field
	}
	if fields.specVersion != nil {
		return n.passthrough(m, mp, subject, at)
	}
	if len(payload) > 0 {
		data = payload
		switch {
		case dct != "":
			// The content type names the data; the sdk embeds JSON types as is and other types as a string,
			// so what is neither JSON nor text goes base64.
			switch {
			case isJSON && (media == event.ApplicationJSON || media == event.TextJSON):
			case mp.format == formatText && !utf8.Valid(payload):
				return deadLetter(ReasonNotText, "mapping %s: the payload is not UTF-8 text", mp.name)
			default:
				base64 = media == contentTypeBinary || mp.format == formatBinary || !utf8.Valid(payload)
			}
		case isJSON:
			dct = contentTypeJSON
		case mp.format == formatBinary:
			dct, base64 = contentTypeBinary, true
		case utf8.Valid(payload):
			dct = contentTypeText
		case mp.format == formatText:
			return deadLetter(ReasonNotText, "mapping %s: the payload is not UTF-8 text", mp.name)
		default:
			dct, base64 = contentTypeBinary, true
		}
		if isJSON && !base64 && sdkIsJSON(dct) {
			data = trimJSONSpace(payload) // embedded as is, but without white space around it
		}
	}
	if fields.time != nil {
		if t, ok := parseEventTime(fields.time); ok {
			at = t
		}
	}
	typ := mp.typ.render(&c)
	if strings.TrimSpace(typ[mp.prefix:]) == "" {
		return deadLetter(ReasonEmptyType, "mapping %s: the event type is blank", mp.name)
	}
	r := n.newResult(typ, m.DeviceID, subject, dct, at, data, base64, mp.priority)
	// data is the payload scanJSON accepted (trimmed of JSON white space when it is embedded as JSON); its content
	// type is JSON unless one given with the message names another type.
	r.DataJSON = isJSON && (media == "" || jsonMedia)
	return r, nil
}

// mediaType returns the media type of an MQTT 5 content type, lower case without parameters, or "" when it
// is not a valid RFC 2045 content type.
func mediaType(ct string) string {
	switch ct {
	case contentTypeJSON, contentTypeCE, contentTypeBinary, event.TextPlain, event.TextJSON:
		return ct
	}
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return ""
	}
	return mt
}

// trimJSONSpace returns b without the JSON white space around it.
func trimJSONSpace(b []byte) []byte {
	i, j := 0, len(b)
	for i < j && isJSONSpace(b[i]) {
		i++
	}
	for j > i && isJSONSpace(b[j-1]) {
		j--
	}
	return b[i:j]
}

func isJSONSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// passthrough keeps a payload that is a CloudEvent. The sdk's decoder panics on some malformed input (e.g.
// both data and data_base64): that, too, is an invalid CloudEvent, not a reason to stop.
func (n *Normalizer) passthrough(m Message, mp *mapping, subject string, at time.Time) (r Result, err error) {
	defer func() {
		if p := recover(); p != nil {
			r, err = deadLetter(ReasonInvalidCloudEvent, "mapping %s: malformed CloudEvent (%v)", mp.name, p)
		}
	}()
	ev := &event.Event{}
	if err := ev.UnmarshalJSON(m.Payload); err != nil {
		return deadLetter(ReasonInvalidCloudEvent, "mapping %s: %s", mp.name, oneLine(err))
	}
	if v := ev.SpecVersion(); v != event.CloudEventsVersionV1 {
		return deadLetter(ReasonInvalidCloudEvent, "mapping %s: specversion %q is not 1.0", mp.name, v)
	}
	if err := ev.Validate(); err != nil {
		return deadLetter(ReasonInvalidCloudEvent, "mapping %s: %s", mp.name, oneLine(err))
	}
	ev.SetSubject(subject)
	if ev.Time().IsZero() {
		ev.SetTime(at)
	}
	data, err := ev.MarshalJSON()
	if err != nil {
		return deadLetter(ReasonInvalidCloudEvent, "mapping %s: encode: %s", mp.name, oneLine(err))
	}
	return Result{Event: ev, Priority: mp.priority, JSON: data}, nil
}

// oneLine flattens an error message for a dead-letter detail.
func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}

// Time bounds of a payload timestamp: earlier values come from devices without a clock, later ones cannot be
// written as RFC 3339.
var (
	minEventTime = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
	maxEventTime = time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC)
)

// parseEventTime reads a JSON value as an event time: an RFC 3339 string, or a number of seconds since the Unix
// epoch, or of milliseconds when it is above 1e11. It reports false for anything else or a time out of bounds.
func parseEventTime(raw []byte) (time.Time, bool) {
	var t time.Time
	switch {
	case len(raw) == 0:
		return t, false
	case raw[0] == '"':
		var s string
		if !hasEscape(raw) {
			// No copy: the payload is not modified, and neither the time nor a discarded error keeps s.
			s = unsafe.String(&raw[1], len(raw)-2)
		} else if s = unquote(raw); s == "" {
			return t, false
		}
		var err error
		if t, err = time.Parse(time.RFC3339Nano, s); err != nil {
			return t, false
		}
	case raw[0] >= '0' && raw[0] <= '9': // negative numbers are before 2000 anyway
		v, ok := parseEpoch(raw)
		if !ok || v >= 1e15 {
			return t, false
		}
		if v > 1e11 {
			ms := math.Floor(v)
			t = time.UnixMilli(int64(ms)).Add(time.Duration((v - ms) * 1e6))
		} else {
			s := math.Floor(v)
			t = time.Unix(int64(s), int64((v-s)*1e9))
		}
	default:
		return t, false
	}
	t = t.UTC()
	if t.Before(minEventTime) || t.After(maxEventTime) {
		return time.Time{}, false
	}
	return t, true
}

// unquote decodes a JSON string token; "" when it is not one.
func unquote(raw []byte) string {
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return ""
	}
	return s
}

// parseEpoch parses a JSON number, without allocating for plain integers.
func parseEpoch(raw []byte) (float64, bool) {
	var v uint64
	for i, c := range raw {
		if c < '0' || c > '9' || i >= 18 {
			var f float64
			if err := json.Unmarshal(raw, &f); err != nil {
				return 0, false
			}
			return f, true
		}
		v = v*10 + uint64(c-'0')
	}
	return float64(v), true
}
