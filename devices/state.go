package devices

import (
	"bytes"
	"container/list"
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
)

// Bounds of the StateView, so a flood of events cannot grow its memory without limit.
const (
	// MaxStateDevices is the number of devices tracked; when another one arrives, the one updated least recently is
	// forgotten (counted in StateStats.EvictedDevices).
	MaxStateDevices = 10000
	// MaxStateKeys is the number of keys kept per device: the top-level keys (last_seen, last_event, online,
	// reported and those set by Set) plus the fields under reported. New keys beyond it are dropped (counted in
	// StateStats.DroppedKeys); existing keys still update.
	MaxStateKeys = 256
	// MaxReportedBytes bounds the JSON size (field names plus values) of a device's reported fields; a field that
	// would exceed it is dropped (counted in StateStats.DroppedKeys).
	MaxReportedBytes = 16 << 10
)

// Keys the StateView maintains in each device's state.
const (
	// KeyLastSeen holds the time (time.Time) of the newest event seen from the device.
	KeyLastSeen = "last_seen"
	// KeyLastEvent holds the type (string) of the event applied last.
	KeyLastEvent = "last_event"
	// KeyOnline holds whether the device is connected (bool), once a presence event was seen.
	KeyOnline = "online"
	// KeyReported holds the merged top-level fields of the device's JSON object payloads (map[string]any).
	KeyReported = "reported"
)

// Event types that set KeyOnline. A type ending in "."+PresenceConnected (a configured type prefix) counts too.
const (
	PresenceConnected    = "device.connected"
	PresenceDisconnected = "device.disconnected"
)

// StateView is the live, in-memory state of each device, built from its events and from explicit Set calls. It is
// safe for concurrent use.
//
// A device's state is a map with the keys last_seen, last_event, online (once known), reported (the top-level
// fields of its JSON object payloads, merged: a later value replaces an earlier one and null removes the field) and
// any key given to Set. Set may overwrite the maintained keys; the next event updates them again.
type StateView struct {
	mu      sync.Mutex
	devices map[string]*list.Element // of *deviceState
	lru     list.List                // front: updated most recently
	evicted uint64
	dropped uint64
	changes uint64 // events applied and Set calls
}

type deviceState struct {
	id       string
	fields   map[string]any       // every top-level key but reported
	reported map[string]*repField // nil until the device reports a field (or Set gives reported a map)
	repBytes int
}

// repField is one reported field: kept as the device sent it (raw JSON) and decoded when first read, so that
// applying an event costs a scan of its payload, not a decoding of every value in it.
type repField struct {
	raw     []byte // the field's JSON value; nil when set from a decoded value
	val     any    // the decoded value, once decoded
	decoded bool
	size    int // name plus value, as JSON
}

// value returns the field's decoded value (decoding it on first use). s.mu is held.
func (f *repField) value() any {
	if !f.decoded {
		long, err := decodeJSON(f.raw, &f.val)
		if err == nil && long {
			f.val, err = exactNumber(f.val)
		}
		if err != nil {
			f.val = string(f.raw) // not reached unless ApplyChecked was given data that is not JSON
		}
		f.decoded = true
	}
	return f.val
}

// StateStats counts what the StateView had to drop to stay within its bounds.
type StateStats struct {
	Devices        int    // devices tracked now
	EvictedDevices uint64 // devices forgotten to make room for others
	DroppedKeys    uint64 // keys or fields not stored because a device was at MaxStateKeys or MaxReportedBytes
}

// NewStateView returns an empty state view.
func NewStateView() *StateView {
	return &StateView{devices: make(map[string]*list.Element)}
}

// Apply records the event for its subject (the device id): last_seen becomes the event time if it is newer
// (receipt time when the event has none), last_event the event type; device.connected and device.disconnected set
// online (their data, which describes the connection, is not merged); the top-level fields of other events' JSON
// object data are merged into reported. Events without a subject are ignored.
func (s *StateView) Apply(ev *event.Event) {
	s.apply(ev, false, false)
}

// ApplyChecked is Apply for an event whose data the caller has already checked: when the event's content type is
// JSON, its data must be valid JSON (as json.Valid reports), and ApplyChecked does not check it again. Data that
// breaks this promise may be merged as members other than a JSON decoder would find.
func (s *StateView) ApplyChecked(ev *event.Event) {
	s.apply(ev, true, false)
}

// Replay is Apply for an event of the past, replayed from the log when the gateway starts: a presence event
// leaves online as it is (no device is connected to a gateway that is starting).
func (s *StateView) Replay(ev *event.Event) {
	s.apply(ev, false, true)
}

// apply implements Apply, ApplyChecked and Replay: checked skips the validation of JSON data; a replayed
// presence event does not set online.
func (s *StateView) apply(ev *event.Event, checked, replayed bool) {
	if ev == nil || ev.Subject() == "" {
		return
	}
	at := ev.Time()
	if at.IsZero() {
		at = time.Now()
	}
	typ := ev.Type()
	var membersBuf [16]member
	var members []member
	var size int
	if isJSON(ev.DataContentType()) {
		if data := bytes.TrimSpace(ev.Data()); len(data) > 0 && data[0] == '{' && (checked || json.Valid(data)) {
			members = objectMembers(data, membersBuf[:0])
			size = len(data)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.changes++
	d := s.touch(ev.Subject())
	if last, ok := d.fields[KeyLastSeen].(time.Time); !ok || at.After(last) {
		s.setField(d, KeyLastSeen, at)
	}
	if last, ok := d.fields[KeyLastEvent].(string); !ok || last != typ {
		s.setField(d, KeyLastEvent, typ) // boxing the type allocates: skipped when it is the same
	}
	switch {
	case isPresence(typ, PresenceConnected):
		if !replayed {
			s.setField(d, KeyOnline, true)
		}
		return // its data describes the connection, not the device
	case isPresence(typ, PresenceDisconnected):
		if !replayed {
			s.setField(d, KeyOnline, false)
		}
		return
	}
	if len(members) > 0 {
		s.merge(d, members, size)
	}
}

func isPresence(typ, want string) bool {
	return typ == want || (strings.HasSuffix(typ, want) && typ[len(typ)-len(want)-1] == '.')
}

// isJSON reports whether data of this content type is JSON; data without a content type is JSON in CloudEvents.
func isJSON(ct string) bool {
	if ct == "" {
		return true
	}
	mt, _, _ := strings.Cut(ct, ";")
	mt = strings.ToLower(strings.TrimSpace(mt))
	return mt == "application/json" || mt == "text/json" || strings.HasSuffix(mt, "+json")
}

// Set sets key in the device's state (an explicit state action from a rule). A value JSON cannot encode (NaN,
// ±Inf) is stored as null: the state file must always be writable.
func (s *StateView) Set(device, key string, value any) {
	if device == "" || key == "" {
		return
	}
	if _, err := json.Marshal(value); err != nil {
		value = nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.changes++
	s.setField(s.touch(device), key, deepCopy(value))
}

// Get returns a copy of the device's state; maps and slices inside it are copies too.
func (s *StateView) Get(device string) (map[string]any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	el, ok := s.devices[device]
	if !ok {
		return nil, false
	}
	return el.Value.(*deviceState).copy(), true
}

// Snapshot returns a copy of every device's state, by device id.
func (s *StateView) Snapshot() map[string]map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]map[string]any, len(s.devices))
	for id, el := range s.devices {
		out[id] = el.Value.(*deviceState).copy()
	}
	return out
}

// Stats returns the number of devices tracked and what was dropped to stay within bounds.
func (s *StateView) Stats() StateStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return StateStats{Devices: len(s.devices), EvictedDevices: s.evicted, DroppedKeys: s.dropped}
}

// touch returns the device's state, creating it (and evicting the least recently updated device when full), and
// marks it updated most recently. s.mu is held.
func (s *StateView) touch(id string) *deviceState {
	if el, ok := s.devices[id]; ok {
		s.lru.MoveToFront(el)
		return el.Value.(*deviceState)
	}
	if len(s.devices) >= MaxStateDevices {
		oldest := s.lru.Back()
		delete(s.devices, oldest.Value.(*deviceState).id)
		s.lru.Remove(oldest)
		s.evicted++
	}
	d := &deviceState{id: id, fields: make(map[string]any)}
	s.devices[id] = s.lru.PushFront(d)
	return d
}

// keys counts the device's keys: its top-level keys (reported among them once it exists) and its reported fields.
func (d *deviceState) keys() int {
	n := len(d.fields) + len(d.reported)
	if d.reported != nil {
		n++
	}
	return n
}

// setField sets a top-level key unless that would exceed MaxStateKeys. s.mu is held.
func (s *StateView) setField(d *deviceState, key string, v any) {
	if key == KeyReported {
		// Set replaces the reported fields wholesale; keep the size accounting in step.
		had := d.reported != nil
		d.reported, d.repBytes = nil, 0
		if rep, ok := v.(map[string]any); ok {
			delete(d.fields, KeyReported)
			members := make([]member, 0, len(rep))
			for k, e := range deepCopy(rep).(map[string]any) {
				members = append(members, member{key: []byte(k), val: e, decoded: true})
			}
			s.merge(d, members, jsonSize(rep))
			return
		}
		if had {
			d.fields[KeyReported] = v // takes the key the reported fields held
			return
		}
	}
	if _, ok := d.fields[key]; !ok && d.keys() >= MaxStateKeys {
		s.dropped++
		return
	}
	d.fields[key] = v
}

// merge merges object members into reported; a member whose value is null removes the field. s.mu is held.
// incoming is (an upper estimate of) the JSON size of the members.
func (s *StateView) merge(d *deviceState, members []member, incoming int) {
	if d.keys()+len(members)+1 > MaxStateKeys || d.repBytes+incoming > MaxReportedBytes {
		// Near a bound: go in name order, so which fields are dropped is predictable (a repeated name keeps its
		// last value, as in decoding).
		slices.SortStableFunc(members, func(a, b member) int { return bytes.Compare(a.key, b.key) })
	}
	for _, m := range members {
		old := d.reported[string(m.key)]
		if m.isNull() {
			if old != nil {
				delete(d.reported, string(m.key))
				d.repBytes -= old.size
			}
			continue
		}
		if old != nil && m.raw != nil && bytes.Equal(old.raw, m.raw) {
			continue // unchanged
		}
		size := len(m.key) + len(m.raw)
		if m.decoded {
			size = len(m.key) + jsonSize(m.val)
		}
		need, oldSize := 0, 0
		if old == nil {
			need++
		} else {
			oldSize = old.size
		}
		if d.reported == nil {
			need++ // the reported key itself
		}
		if d.keys()+need > MaxStateKeys || d.repBytes-oldSize+size > MaxReportedBytes {
			s.dropped++
			continue
		}
		if d.reported == nil {
			d.reported = make(map[string]*repField)
		}
		f := old
		if f == nil {
			f = &repField{}
			d.reported[string(m.key)] = f
		}
		// An existing field is updated in place: nothing outside the view holds its raw bytes or its decoded
		// value (copy decodes and deep-copies), so they may be overwritten.
		f.size = size
		if m.decoded {
			f.raw, f.val, f.decoded = nil, m.val, true
		} else {
			f.raw, f.val, f.decoded = reuseBytes(f.raw, m.raw), nil, false
		}
		d.repBytes += size - oldSize
	}
}

// reuseBytes returns a copy of src, in buf's memory when it fits. A buffer more than twice as large as needed
// (plus a little) is let go, so that the memory a device's fields hold stays near MaxReportedBytes even after a
// field shrinks.
func reuseBytes(buf, src []byte) []byte {
	if cap(buf) > 2*len(src)+64 {
		buf = nil
	}
	return append(buf[:0], src...)
}

// jsonSize estimates the size of v encoded as JSON (exact for ASCII strings without escapes, 8 bytes per number).
func jsonSize(v any) int {
	switch t := v.(type) {
	case string:
		return len(t) + 2
	case map[string]any:
		n := 2
		for k, e := range t {
			n += len(k) + 4 + jsonSize(e)
		}
		return n
	case []any:
		n := 2
		for _, e := range t {
			n += 1 + jsonSize(e)
		}
		return n
	case bool:
		return 5
	case nil:
		return 4
	default:
		return 8
	}
}

// copy returns the device's state as a map, reported fields decoded; nothing in it is shared. s.mu is held.
func (d *deviceState) copy() map[string]any {
	out := make(map[string]any, len(d.fields)+1)
	for k, v := range d.fields {
		out[k] = deepCopy(v)
	}
	if d.reported != nil {
		rep := make(map[string]any, len(d.reported))
		for k, f := range d.reported {
			rep[k] = deepCopy(f.value())
		}
		out[KeyReported] = rep
	}
	return out
}

// deepCopy copies the maps and slices JSON decoding produces (and those rules are likely to set).
func deepCopy(v any) any {
	switch t := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(t))
		for k, e := range t {
			out[k] = deepCopy(e)
		}
		return out
	case []any:
		out := make([]any, len(t))
		for i, e := range t {
			out[i] = deepCopy(e)
		}
		return out
	case map[string]string:
		return maps.Clone(t)
	case []string:
		return append([]string(nil), t...)
	default:
		return v
	}
}
