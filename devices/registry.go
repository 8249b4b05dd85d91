package devices

import (
	"cmp"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// dummyBcrypt is a bcrypt hash (cost 10) of a random password nobody knows. Authenticate verifies against it when
// the registry holds no password hash to stand in for an unknown device.
const dummyBcrypt = "$2a$10$QQBijcKZ7O9dhP4vfK1hMerXvYJJ4vYDJmXtDDIiFO6i7XZRRZtnC"

// Registry is the set of known devices: it authenticates them and decides what each may publish and subscribe to.
// It is safe for concurrent use. Replace swaps in a new device set atomically, so the gateway can hand the same
// *Registry to every part and reload the file in place.
type Registry struct {
	set atomic.Pointer[deviceSet]

	// Successful password checks, by device id, so reconnecting devices do not pay for bcrypt or argon2id again.
	// The cache holds an HMAC-SHA-256 (keyed by a random per-process key) of the password, never the password, and
	// at most one entry per registered device.
	macKey  [32]byte
	cacheMu sync.RWMutex
	cache   map[string]cachedLogin

	// slow bounds the number of concurrent bcrypt/argon2id verifications (CPU and, for argon2id, memory).
	slow chan struct{}

	// unlisted: made by ParseRegistry from a document without a device list (see Listed).
	unlisted bool
}

type cachedLogin struct {
	hash string // the password hash the login was verified against
	mac  [sha256.Size]byte
}

type deviceSet struct {
	byID   map[string]*entry
	sorted []*entry
	byCN   map[string]string
	// dummyHash is verified for unknown devices, so that probing ids costs the same time as a wrong password.
	dummyHash string
}

type entry struct {
	dev    Device
	ownSub string // devices/{id}/commands/#
}

// NewRegistry checks the devices (id format and uniqueness, a credential each, hash format, grant filters,
// certificate name uniqueness) and returns a registry of copies of them. Every problem is reported at once, each
// naming its devices[i] field, in an error wrapping ErrInvalidRegistry.
func NewRegistry(devs []Device) (*Registry, error) {
	if probs := check(devs); len(probs) > 0 {
		return nil, joinProblems("", probs, nil)
	}
	r := &Registry{cache: make(map[string]cachedLogin), slow: make(chan struct{}, max(1, runtime.GOMAXPROCS(0)))}
	_, _ = rand.Read(r.macKey[:]) // crypto/rand.Read never fails
	r.set.Store(newDeviceSet(devs))
	return r, nil
}

func newDeviceSet(devs []Device) *deviceSet {
	s := &deviceSet{byID: make(map[string]*entry, len(devs)), sorted: make([]*entry, 0, len(devs)),
		byCN: make(map[string]string), dummyHash: dummyBcrypt}
	for _, d := range devs {
		e := &entry{dev: d.clone(), ownSub: "devices/" + d.ID + "/commands/#"}
		s.byID[d.ID] = e
		s.sorted = append(s.sorted, e)
		if d.CertCN != "" {
			s.byCN[d.CertCN] = d.ID
		}
	}
	slices.SortFunc(s.sorted, func(a, b *entry) int { return cmp.Compare(a.dev.ID, b.dev.ID) })
	for _, e := range s.sorted {
		if e.dev.PasswordHash != "" {
			s.dummyHash = e.dev.PasswordHash
			break
		}
	}
	return s
}

// Listed reports whether the registry's devices were given as a list, even an empty one (`devices: []`). A
// registry parsed from a file without one (empty, only comments, or `devices:` with nothing under it) is not
// listed: a reload can tell such a file, which may be one caught while being written, from one that means to
// remove every device.
func (r *Registry) Listed() bool { return !r.unlisted }

// Replace makes r hold other's devices, atomically: checks already running finish against the old set. Remembered
// logins of devices whose password hash changed or that are gone are forgotten. other must not be nil. It returns,
// sorted, the ids of the devices whose access changed: gone, or with another password hash, certificate name or
// publish or subscribe grants. Their open connections were let in, and their subscriptions granted, by the old
// entry.
func (r *Registry) Replace(other *Registry) (changed []string) {
	s := other.set.Load()
	old := r.set.Swap(s)
	for _, e := range old.sorted {
		if n, ok := s.byID[e.dev.ID]; !ok || !sameAccess(e.dev, n.dev) {
			changed = append(changed, e.dev.ID)
		}
	}
	r.cacheMu.Lock()
	defer r.cacheMu.Unlock()
	for id, c := range r.cache {
		if e, ok := s.byID[id]; !ok || e.dev.PasswordHash != c.hash {
			delete(r.cache, id)
		}
	}
	return changed
}

// sameAccess reports whether two entries of a device let in the same credentials and grant the same topics.
func sameAccess(a, b Device) bool {
	return a.PasswordHash == b.PasswordHash && a.CertCN == b.CertCN && slices.Equal(a.Publish, b.Publish) &&
		slices.Equal(a.Subscribe, b.Subscribe)
}

// Len returns the number of devices.
func (r *Registry) Len() int { return len(r.set.Load().sorted) }

// Get returns a copy of the device with the id.
func (r *Registry) Get(id string) (Device, bool) {
	e, ok := r.set.Load().byID[id]
	if !ok {
		return Device{}, false
	}
	return e.dev.clone(), true
}

// All returns copies of every device, sorted by id.
func (r *Registry) All() []Device {
	s := r.set.Load()
	out := make([]Device, len(s.sorted))
	for i, e := range s.sorted {
		out[i] = e.dev.clone()
	}
	return out
}

// Select returns copies of the devices whose metadata equals every entry of sel, sorted by id. Keys are id, name,
// room, kind and labels.<label>; an unknown key matches no device, an empty sel matches every device.
func (r *Registry) Select(sel map[string]string) []Device {
	s := r.set.Load()
	if id, ok := sel["id"]; ok {
		e, ok := s.byID[id]
		if !ok || !selected(e.dev, sel) {
			return nil
		}
		return []Device{e.dev.clone()}
	}
	var out []Device
	for _, e := range s.sorted {
		if selected(e.dev, sel) {
			out = append(out, e.dev.clone())
		}
	}
	return out
}

func selected(d Device, sel map[string]string) bool {
	for k, want := range sel {
		var got string
		switch k {
		case "id":
			got = d.ID
		case "name":
			got = d.Name
		case "room":
			got = d.Room
		case "kind":
			got = d.Kind
		default:
			label, ok := strings.CutPrefix(k, "labels.")
			if !ok {
				return false
			}
			v, ok := d.Labels[label]
			if !ok {
				return false
			}
			got = v
		}
		if got != want {
			return false
		}
	}
	return true
}

// DeviceForCN returns the id of the device that accepts client certificates with the common name cn.
func (r *Registry) DeviceForCN(cn string) (string, bool) {
	if cn == "" {
		return "", false
	}
	id, ok := r.set.Load().byCN[cn]
	return id, ok
}

// Authenticate reports whether password is the device's password. A successful check is remembered (as an HMAC of
// the password) so that reconnecting devices are checked in microseconds; otherwise the stored bcrypt or argon2id
// hash is verified, with at most GOMAXPROCS verifications running at once. An unknown id, or a device without a
// password, costs a verification against another hash too, so response times do not reveal which ids exist.
//
// The answer is that of the registry in force when Authenticate returns: a check that ran while Replace removed
// the device or changed its password hash is made again against the new entry, so that a login with the old
// password cannot slip in after the reload closed the device's connections.
func (r *Registry) Authenticate(id string, password []byte) bool {
	s := r.set.Load()
	for range 4 { // a registry replaced during each of these checks in turn: refuse
		ok := r.authenticate(s, id, password)
		cur := r.set.Load()
		if cur == s || !ok {
			return ok
		}
		if e, found := cur.byID[id]; found && e.dev.PasswordHash == s.byID[id].dev.PasswordHash {
			return true // replaced, but this device's password hash is the one just verified
		}
		s = cur
	}
	return false
}

// authenticate checks the password against the device's entry in s.
func (r *Registry) authenticate(s *deviceSet, id string, password []byte) bool {
	e, ok := s.byID[id]
	if !ok || e.dev.PasswordHash == "" {
		r.verify(s.dummyHash, password)
		return false
	}
	hash := e.dev.PasswordHash
	mac := r.mac(id, password)
	r.cacheMu.RLock()
	c, cached := r.cache[id]
	r.cacheMu.RUnlock()
	if cached && c.hash == hash && hmac.Equal(c.mac[:], mac[:]) {
		return true
	}
	if !r.verify(hash, password) {
		return false
	}
	r.cacheMu.Lock()
	// Only devices still in the registry with the same hash are remembered, keeping the cache bounded.
	if cur, ok := r.set.Load().byID[id]; ok && cur.dev.PasswordHash == hash {
		r.cache[id] = cachedLogin{hash: hash, mac: mac}
	}
	r.cacheMu.Unlock()
	return true
}

func (r *Registry) verify(hash string, password []byte) bool {
	r.slow <- struct{}{}
	defer func() { <-r.slow }()
	ok, err := VerifyPassword(hash, password)
	return ok && err == nil
}

func (r *Registry) mac(id string, password []byte) [sha256.Size]byte {
	h := hmac.New(sha256.New, r.macKey[:])
	var n [4]byte
	n[0], n[1], n[2], n[3] = byte(len(id)>>24), byte(len(id)>>16), byte(len(id)>>8), byte(len(id))
	h.Write(n[:])
	h.Write([]byte(id))
	h.Write(password)
	var out [sha256.Size]byte
	h.Sum(out[:0])
	return out
}

// CanPublish reports whether the device may publish to topic: its own devices/{id} and everything under it, plus
// the topics its publish grants match. Unknown devices and invalid topics are denied.
func (r *Registry) CanPublish(id, topic string) bool {
	e, ok := r.set.Load().byID[id]
	if !ok || ValidTopic(topic) != nil {
		return false
	}
	if own(id, topic) {
		return true
	}
	for _, g := range e.dev.Publish {
		if match(g, topic) {
			return true
		}
	}
	return false
}

// own reports whether topic is devices/{id} or below it.
func own(id, topic string) bool {
	const prefix = "devices/"
	rest, ok := strings.CutPrefix(topic, prefix)
	if !ok {
		return false
	}
	rest, ok = strings.CutPrefix(rest, id)
	return ok && (rest == "" || rest[0] == '/')
}

// CanSubscribe reports whether the device may subscribe to filter: only if every topic the filter can match is
// matched by its own devices/{id}/commands/# or by one of its subscribe grants. So "#", "+/#" and
// "devices/+/commands/#" are denied, and a $ filter such as "$SYS/#" needs a grant starting with the same $ level.
// Unknown devices and invalid filters are denied.
func (r *Registry) CanSubscribe(id, filter string) bool {
	e, ok := r.set.Load().byID[id]
	if !ok || ValidFilter(filter) != nil {
		return false
	}
	if covers(e.ownSub, filter) {
		return true
	}
	for _, g := range e.dev.Subscribe {
		if covers(g, filter) {
			return true
		}
	}
	return false
}

// joinProblems builds the error listing every problem, each prefixed by name:line when known.
func joinProblems(name string, probs []problem, line func(problem) int) error {
	var b strings.Builder
	for i, p := range probs {
		if i > 0 {
			b.WriteByte('\n')
		}
		switch {
		case name != "" && line != nil && line(p) > 0:
			fmt.Fprintf(&b, "%s:%d: ", name, line(p))
		case name != "":
			fmt.Fprintf(&b, "%s: ", name)
		}
		fmt.Fprintf(&b, "%s: %v", p.path(), p.err)
		if p.first > 0 {
			first := problem{index: p.first - 1, field: p.field}
			fmt.Fprintf(&b, " (first at %s", first.path())
			if line != nil && line(first) > 0 {
				fmt.Fprintf(&b, ", line %d", line(first))
			}
			b.WriteString(")")
		}
	}
	return &registryError{msg: b.String(), errs: probs}
}

type registryError struct {
	msg  string
	errs []problem
}

func (e *registryError) Error() string {
	plural := "s"
	if len(e.errs) == 1 {
		plural = ""
	}
	return fmt.Sprintf("%s (%d problem%s):\n%s", ErrInvalidRegistry.Error(), len(e.errs), plural, e.msg)
}

func (e *registryError) Unwrap() []error {
	out := []error{ErrInvalidRegistry}
	for _, p := range e.errs {
		out = append(out, p.err)
	}
	return out
}
