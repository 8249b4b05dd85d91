package devices

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// golden compares got with testdata/<name>, rewriting it with -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (run with -update to accept):\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

func TestLoadRegistryErrors(t *testing.T) {
	for _, name := range []string{"syntax", "unknown-key", "wrong-type", "top-level", "two-documents", "invalid"} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join("testdata", "registry", name+".yaml")
			r, err := LoadRegistry(path)
			if err == nil {
				t.Fatalf("LoadRegistry(%s) = %d devices, want an error", path, r.Len())
			}
			if !errors.Is(err, ErrInvalidRegistry) {
				t.Errorf("error does not wrap ErrInvalidRegistry: %v", err)
			}
			golden(t, filepath.Join("registry", name+".golden"), []byte(err.Error()+"\n"))
		})
	}
}

func TestLoadRegistryMissingFile(t *testing.T) {
	_, err := LoadRegistry(filepath.Join(t.TempDir(), "nope.yaml"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("LoadRegistry(missing) = %v, want os.ErrNotExist", err)
	}
}

func TestLoadRegistryTooLarge(t *testing.T) {
	path := filepath.Join(t.TempDir(), "big.yaml")
	if err := os.WriteFile(path, bytes.Repeat([]byte("#\n"), MaxRegistryBytes/2+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadRegistry(path); !errors.Is(err, ErrInvalidRegistry) || !strings.Contains(err.Error(), "larger") {
		t.Fatalf("LoadRegistry(big) = %v", err)
	}
}

func TestParseRegistryEmpty(t *testing.T) {
	for doc, listed := range map[string]bool{"": false, "# nothing\n": false, "devices:\n": false, "devices: []\n": true} {
		r, err := ParseRegistry("empty.yaml", []byte(doc))
		if err != nil || r.Len() != 0 {
			t.Fatalf("ParseRegistry(%q) = %v, %v; want an empty registry", doc, r, err)
		}
		if r.Listed() != listed {
			t.Errorf("ParseRegistry(%q).Listed() = %v, want %v", doc, r.Listed(), listed)
		}
	}
	if r := parseTest(t); !r.Listed() {
		t.Error("a registry with devices is not Listed")
	}
	if r, err := NewRegistry(nil); err != nil || !r.Listed() {
		t.Errorf("NewRegistry(nil) = %v, Listed %v; want a listed empty registry", err, r != nil && r.Listed())
	}
}

const testRegistry = `
devices:
  - id: b-light
    name: B light
    room: hall
    kind: light
    labels: {floor: "1", color: "yes"}
    password_hash: "%[1]s"
  - id: a-motion
    name: A motion
    room: hall
    kind: motion-sensor
    labels: {floor: "0"}
    password_hash: "%[1]s"
    cert_cn: ""
  - id: c-light
    room: kitchen
    kind: light
    labels: {floor: "1"}
    cert_cn: c-light.example
`

func parseTest(t testing.TB) *Registry {
	t.Helper()
	data := strings.ReplaceAll(testRegistry, "%[1]s", cheapBcrypt(t, "pw"))
	r, err := ParseRegistry("test.yaml", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func ids(devs []Device) []string {
	out := []string{}
	for _, d := range devs {
		out = append(out, d.ID)
	}
	return out
}

func TestRegistryLookups(t *testing.T) {
	r := parseTest(t)
	if r.Len() != 3 {
		t.Fatalf("Len = %d, want 3", r.Len())
	}
	if got := ids(r.All()); !slices.Equal(got, []string{"a-motion", "b-light", "c-light"}) {
		t.Errorf("All = %v, want sorted by id", got)
	}
	d, ok := r.Get("b-light")
	if !ok || d.Name != "B light" || d.Room != "hall" || d.Kind != "light" || d.Labels["floor"] != "1" {
		t.Fatalf("Get(b-light) = %+v, %v", d, ok)
	}
	// Get returns a copy.
	d.Labels["floor"] = "9"
	if d2, _ := r.Get("b-light"); d2.Labels["floor"] != "1" {
		t.Error("changing a returned device's labels changed the registry")
	}
	if _, ok := r.Get("nope"); ok {
		t.Error("Get(nope) found a device")
	}
	for cn, want := range map[string]string{"a-motion": "a-motion", "c-light.example": "c-light", "c-light": "",
		"b-light": "", "": ""} {
		got, ok := r.DeviceForCN(cn)
		if got != want || ok != (want != "") {
			t.Errorf("DeviceForCN(%q) = %q, %v; want %q", cn, got, ok, want)
		}
	}
}

func TestRegistrySelect(t *testing.T) {
	r := parseTest(t)
	tests := []struct {
		sel  map[string]string
		want []string
	}{
		{nil, []string{"a-motion", "b-light", "c-light"}},
		{map[string]string{"kind": "light"}, []string{"b-light", "c-light"}},
		{map[string]string{"kind": "light", "room": "hall"}, []string{"b-light"}},
		{map[string]string{"room": "hall"}, []string{"a-motion", "b-light"}},
		{map[string]string{"labels.floor": "1"}, []string{"b-light", "c-light"}},
		{map[string]string{"labels.floor": "1", "labels.color": "yes"}, []string{"b-light"}},
		{map[string]string{"labels.missing": ""}, []string{}},
		{map[string]string{"id": "c-light"}, []string{"c-light"}},
		{map[string]string{"id": "c-light", "room": "hall"}, []string{}},
		{map[string]string{"id": "nope"}, []string{}},
		{map[string]string{"name": "A motion"}, []string{"a-motion"}},
		{map[string]string{"name": ""}, []string{"c-light"}},
		{map[string]string{"color": "yes"}, []string{}}, // unknown key
	}
	for _, tt := range tests {
		if got := ids(r.Select(tt.sel)); !slices.Equal(got, tt.want) {
			t.Errorf("Select(%v) = %v, want %v", tt.sel, got, tt.want)
		}
	}
}

func TestNewRegistryErrors(t *testing.T) {
	h := cheapBcrypt(t, "pw")
	_, err := NewRegistry([]Device{
		{ID: "ok", PasswordHash: h},
		{ID: "", PasswordHash: h},
		{ID: "ok", CertCN: "x"},
		{ID: "nocred"},
		{ID: "grant", PasswordHash: h, Publish: []string{"a/#/b"}},
	})
	if !errors.Is(err, ErrInvalidRegistry) {
		t.Fatalf("NewRegistry = %v, want ErrInvalidRegistry", err)
	}
	want := `devices: invalid registry (4 problems):
devices[1].id: "" does not match [A-Za-z0-9._-]{1,64}
devices[2].id: duplicate id "ok" (first at devices[0].id)
devices[3]: needs password_hash or cert_cn
devices[4].publish[0]: "a/#/b": invalid topic filter: # must be the last level`
	if err.Error() != want {
		t.Errorf("NewRegistry error:\n%s\nwant:\n%s", err, want)
	}
}

func TestNewRegistryCopies(t *testing.T) {
	devs := []Device{{ID: "a", CertCN: "a", Publish: []string{"x/#"}, Labels: map[string]string{"k": "v"}}}
	r, err := NewRegistry(devs)
	if err != nil {
		t.Fatal(err)
	}
	devs[0].Publish[0] = "#"
	devs[0].Labels["k"] = "changed"
	if r.CanPublish("a", "other") {
		t.Error("changing the caller's slice changed the registry's grants")
	}
	if d, _ := r.Get("a"); d.Labels["k"] != "v" {
		t.Error("changing the caller's map changed the registry's labels")
	}
}

func TestAuthenticate(t *testing.T) {
	h := cheapBcrypt(t, "pw")
	r, err := NewRegistry([]Device{
		{ID: "bc", PasswordHash: h},
		{ID: "ar", PasswordHash: cheapArgon2("pw2")},
		{ID: "cert-only", CertCN: "cert-only"},
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		id, pw string
		want   bool
	}{
		{"bc", "pw", true},
		{"bc", "pw", true}, // cached
		{"bc", "PW", false},
		{"bc", "", false},
		{"ar", "pw2", true},
		{"ar", "pw2", true},
		{"ar", "pw", false},
		{"cert-only", "", false},
		{"cert-only", "pw", false},
		{"unknown", "pw", false},
		{"", "", false},
	}
	for _, tt := range tests {
		if got := r.Authenticate(tt.id, []byte(tt.pw)); got != tt.want {
			t.Errorf("Authenticate(%q, %q) = %v, want %v", tt.id, tt.pw, got, tt.want)
		}
	}
	r.cacheMu.RLock()
	n := len(r.cache)
	r.cacheMu.RUnlock()
	if n != 2 {
		t.Errorf("cache holds %d logins, want 2 (bc, ar)", n)
	}
}

func TestReplace(t *testing.T) {
	old, err := NewRegistry([]Device{{ID: "a", PasswordHash: cheapBcrypt(t, "old")}, {ID: "b", PasswordHash: cheapBcrypt(t, "b")}})
	if err != nil {
		t.Fatal(err)
	}
	if !old.Authenticate("a", []byte("old")) || !old.Authenticate("b", []byte("b")) {
		t.Fatal("login before Replace failed")
	}
	next, err := NewRegistry([]Device{{ID: "a", PasswordHash: cheapBcrypt(t, "new")}, {ID: "c", CertCN: "c"}})
	if err != nil {
		t.Fatal(err)
	}
	if changed := old.Replace(next); !slices.Equal(changed, []string{"a", "b"}) {
		t.Errorf("Replace reported %v changed, want [a b] (a new password, b gone)", changed)
	}
	if old.Len() != 2 || !slices.Equal(ids(old.All()), []string{"a", "c"}) {
		t.Fatalf("after Replace: %v", ids(old.All()))
	}
	if old.Authenticate("a", []byte("old")) {
		t.Error("the old password (remembered before Replace) still works")
	}
	if !old.Authenticate("a", []byte("new")) {
		t.Error("the new password does not work")
	}
	if old.Authenticate("b", []byte("b")) {
		t.Error("a removed device still logs in")
	}
	if _, ok := old.DeviceForCN("c"); !ok {
		t.Error("DeviceForCN misses the new device")
	}
}

// TestRegistryConcurrent exercises every method at once with Replace, for -race.
func TestRegistryConcurrent(t *testing.T) {
	h := cheapBcrypt(t, "pw")
	mk := func(extra string) *Registry {
		r, err := NewRegistry([]Device{{ID: "a", PasswordHash: h, Publish: []string{extra}}, {ID: "b", CertCN: "b"}})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	r := mk("x/#")
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 50 {
				switch (g + i) % 4 {
				case 0:
					r.Authenticate("a", []byte("pw"))
				case 1:
					r.CanPublish("a", "x/y")
					r.CanSubscribe("a", "devices/a/commands/#")
				case 2:
					r.Select(map[string]string{"id": "a"})
					r.All()
					r.DeviceForCN("b")
				case 3:
					r.Replace(mk("y/#"))
				}
			}
		})
	}
	wg.Wait()
}

func TestDeviceLogValue(t *testing.T) {
	h := cheapBcrypt(t, "pw")
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	log.Info("device", "device", Device{ID: "a", Name: "A", PasswordHash: h, CertCN: "a"})
	if strings.Contains(buf.String(), h) || strings.Contains(buf.String(), h[7:20]) {
		t.Fatalf("log line shows the hash: %s", buf.String())
	}
	var line struct {
		Device map[string]string `json:"device"`
	}
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"device_id": "a", "name": "A", "password_hash": "[redacted]", "cert_cn": "a"}
	for k, v := range want {
		if line.Device[k] != v {
			t.Errorf("logged %s = %q, want %q (line %s)", k, line.Device[k], v, buf.String())
		}
	}
}

// TestDemoRegistry loads configs/devices.yaml and checks the documented demo passwords and grants.
func TestDemoRegistry(t *testing.T) {
	r, err := LoadRegistry(filepath.Join("..", "configs", "devices.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct{ kind, room string }{
		"kitchen-motion": {"motion-sensor", "kitchen"}, "kitchen-light-1": {"light", "kitchen"},
		"kitchen-light-2": {"light", "kitchen"}, "hall-motion": {"motion-sensor", "hall"},
		"hall-light": {"light", "hall"}, "thermo-1": {"thermometer", "living-room"},
		"zigbee-bridge": {"bridge", ""}, "tasmota-plug-1": {"plug", ""}, "observer": {"observer", ""},
	}
	if r.Len() != len(want) {
		t.Errorf("demo registry has %d devices, want %d", r.Len(), len(want))
	}
	for id, w := range want {
		t.Run(id, func(t *testing.T) {
			t.Parallel() // cost-10 bcrypt is slow under -race
			d, ok := r.Get(id)
			if !ok || d.Kind != w.kind || d.Room != w.room {
				t.Fatalf("Get(%s) = %+v, %v; want kind %q room %q", id, d, ok, w.kind, w.room)
			}
			if !r.Authenticate(id, []byte(id+"-pw")) {
				t.Errorf("the documented password %q does not log in", id+"-pw")
			}
		})
	}
	t.Run("grants", func(t *testing.T) {
		for _, c := range []struct {
			id, topic string
			pub, sub  bool
		}{
			{"zigbee-bridge", "zigbee2mqtt/kitchen-light-1/set", true, true},
			{"tasmota-plug-1", "tele/tasmota-plug-1/SENSOR", true, false},
			{"tasmota-plug-1", "stat/tasmota-plug-1/POWER", true, false},
			{"tasmota-plug-1", "cmnd/tasmota-plug-1/POWER", false, true},
			{"tasmota-plug-1", "tele/other/SENSOR", false, false},
			{"observer", "devices/#", false, true},
			{"observer", "devices/kitchen-light-1/commands/lights.on", false, true},
			{"observer", "#", false, false},
		} {
			if got := r.CanPublish(c.id, c.topic); got != c.pub {
				t.Errorf("CanPublish(%s, %s) = %v", c.id, c.topic, got)
			}
			if got := r.CanSubscribe(c.id, c.topic); got != c.sub {
				t.Errorf("CanSubscribe(%s, %s) = %v", c.id, c.topic, got)
			}
		}
	})
}

// TestReplaceReportsAccessChanges: a device counts as changed when it is gone or its credentials or grants differ;
// new devices and changed metadata do not count.
func TestReplaceReportsAccessChanges(t *testing.T) {
	h, h2 := cheapBcrypt(t, "pw"), cheapBcrypt(t, "pw2")
	base := []Device{
		{ID: "same", PasswordHash: h, Room: "hall"},
		{ID: "moved", PasswordHash: h, Room: "hall"},
		{ID: "password", PasswordHash: h},
		{ID: "cert", CertCN: "cert-1"},
		{ID: "publish", PasswordHash: h, Publish: []string{"a/#"}},
		{ID: "subscribe", PasswordHash: h, Subscribe: []string{"b/#"}},
		{ID: "gone", PasswordHash: h},
	}
	next := []Device{
		{ID: "same", PasswordHash: h, Room: "hall"},
		{ID: "moved", PasswordHash: h, Room: "kitchen", Kind: "light", Labels: map[string]string{"floor": "1"}},
		{ID: "password", PasswordHash: h2},
		{ID: "cert", CertCN: "cert-2"},
		{ID: "publish", PasswordHash: h, Publish: []string{"a/#", "c/#"}},
		{ID: "subscribe", PasswordHash: h},
		{ID: "new", PasswordHash: h},
	}
	r, err := NewRegistry(base)
	if err != nil {
		t.Fatal(err)
	}
	n, err := NewRegistry(next)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"cert", "gone", "password", "publish", "subscribe"}
	if got := r.Replace(n); !slices.Equal(got, want) {
		t.Fatalf("Replace reported %v changed, want %v", got, want)
	}
	if d, _ := r.Get("moved"); d.Room != "kitchen" {
		t.Errorf("after Replace the moved device is in %q", d.Room)
	}
	if got := r.Replace(n); len(got) != 0 {
		t.Errorf("replacing a registry by an equal one reported %v changed", got)
	}
}
