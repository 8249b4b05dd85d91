package main

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"

	"golang.org/x/crypto/bcrypt"

	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/internal/passwordfile"
)

// loadDevices reads the simulated devices from a registry file: ids, kinds and rooms from the registry, the
// passwords from passwordFile (lines "id password") or, without one, by the demo convention "<id>-pw". Devices of
// kinds devsim does not simulate are left out.
func loadDevices(registry, passwordFile string) ([]simDevice, error) {
	reg, err := devices.LoadRegistry(registry)
	if err != nil {
		return nil, err
	}
	var pw map[string]string
	if passwordFile != "" {
		if pw, err = passwordfile.Read(passwordFile); err != nil {
			return nil, err
		}
	}
	var out []simDevice
	for _, d := range reg.All() {
		switch d.Kind {
		case kindSensor, kindLight, kindThermometer:
		default:
			continue
		}
		p := d.ID + "-pw"
		if pw != nil {
			var ok bool
			if p, ok = pw[d.ID]; !ok {
				return nil, fmt.Errorf("%s: no password for device %s", passwordFile, d.ID)
			}
		}
		out = append(out, simDevice{ID: d.ID, Kind: d.Kind, Room: d.Room, Password: p})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no motion-sensor, light or thermometer devices", registry)
	}
	return out, nil
}

// generatedDevices returns n devices of the given kinds with generated ids, in rooms of one of each kind,
// and passwords by the demo convention; for brokers that allow anonymous clients or test registries.
func generatedDevices(prefix string, sensors, lights, thermometers int) []simDevice {
	var out []simDevice
	add := func(kind, short string, n int) {
		for i := range n {
			id := fmt.Sprintf("%s-%s-%d", prefix, short, i+1)
			out = append(out, simDevice{ID: id, Kind: kind, Room: fmt.Sprintf("%s-room-%d", prefix, i+1), Password: id + "-pw"})
		}
	}
	add(kindSensor, "motion", sensors)
	add(kindLight, "light", lights)
	add(kindThermometer, "thermo", thermometers)
	return out
}

// genOptions configures gen-devices.
type genOptions struct {
	N          int
	Prefix     string
	Kinds      []string // cycled through; a room holds one cycle
	Algo       string   // bcrypt or argon2id
	BcryptCost int      // devices.BcryptCost: devices.HashPassword; lower (≥ 4): a cheaper hash for load tests
}

// genDevice is one generated device with its clear-text password.
type genDevice struct {
	ID, Kind, Room, Password, Hash string
}

// shortKind names a kind in generated ids.
func shortKind(kind string) string {
	switch kind {
	case kindSensor:
		return "motion"
	case kindThermometer:
		return "thermo"
	}
	return kind
}

// genDevices makes n devices: kinds cycle through o.Kinds and every cycle shares a room, so with the default
// kinds a room has a motion sensor, two lights and a thermometer. Passwords are random; hashes are computed on
// every CPU.
func genDevices(o genOptions) ([]genDevice, error) {
	if o.N <= 0 {
		return nil, fmt.Errorf("device count: must be > 0, got %d", o.N)
	}
	if len(o.Kinds) == 0 {
		return nil, errors.New("--kinds: at least one kind")
	}
	if o.Algo != "bcrypt" && o.Algo != "argon2id" {
		return nil, fmt.Errorf("--algo: %q is not bcrypt or argon2id", o.Algo)
	}
	if o.BcryptCost < bcrypt.MinCost || o.BcryptCost > devices.BcryptCost {
		return nil, fmt.Errorf("--bcrypt-cost: must be between %d and %d, got %d", bcrypt.MinCost, devices.BcryptCost, o.BcryptCost)
	}
	width := len(strconv.Itoa((o.N-1)/len(o.Kinds) + 1))
	seen := map[string]int{}
	out := make([]genDevice, o.N)
	for i := range out {
		kind := o.Kinds[i%len(o.Kinds)]
		room := i / len(o.Kinds)
		seen[fmt.Sprint(room, kind)]++
		id := fmt.Sprintf("%s-%0*d-%s", o.Prefix, width, room+1, shortKind(kind))
		if k := seen[fmt.Sprint(room, kind)]; k > 1 || countKind(o.Kinds, kind) > 1 {
			id = fmt.Sprintf("%s-%d", id, k)
		}
		if err := devices.ValidID(id); err != nil {
			return nil, fmt.Errorf("--prefix: %w", err)
		}
		var secret [12]byte
		_, _ = rand.Read(secret[:]) // crypto/rand.Read never fails
		out[i] = genDevice{ID: id, Kind: kind, Room: fmt.Sprintf("%s-room-%0*d", o.Prefix, width, room+1),
			Password: base64.RawURLEncoding.EncodeToString(secret[:])}
	}
	errs := make([]error, len(out))
	next := make(chan int)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			for i := range next {
				out[i].Hash, errs[i] = hash(o, out[i].Password)
			}
		})
	}
	for i := range out {
		next <- i
	}
	close(next)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

func countKind(kinds []string, kind string) (n int) {
	for _, k := range kinds {
		if k == kind {
			n++
		}
	}
	return n
}

// hash uses the registry's own hashing; a bcrypt cost below the default is available for large load-test
// registries, where hashing thousands of passwords at the default cost takes minutes.
func hash(o genOptions, password string) (string, error) {
	if o.Algo == "bcrypt" && o.BcryptCost != devices.BcryptCost {
		h, err := bcrypt.GenerateFromPassword([]byte(password), o.BcryptCost)
		if err != nil {
			return "", fmt.Errorf("hash password: %w", err)
		}
		return string(h), devices.CheckHash(string(h))
	}
	return devices.HashPassword([]byte(password), o.Algo)
}

// writeRegistry writes the devices as a registry file (YAML) and their passwords as a password file.
func writeRegistry(devs []genDevice, registryPath, passwordPath string) error {
	var reg, pw bytes.Buffer
	fmt.Fprintf(&reg, "# Generated by devsim gen-devices: %d simulated devices. Passwords are in %s.\ndevices:\n",
		len(devs), passwordPath)
	fmt.Fprintf(&pw, "# devsim password file for %s: id password\n", registryPath)
	for _, d := range devs {
		fmt.Fprintf(&reg, "  - id: %s\n    room: %s\n    kind: %s\n    password_hash: %q\n", d.ID, d.Room, d.Kind, d.Hash)
		fmt.Fprintf(&pw, "%s %s\n", d.ID, d.Password)
	}
	if err := os.WriteFile(registryPath, reg.Bytes(), 0o600); err != nil {
		return fmt.Errorf("write registry: %w", err)
	}
	if err := os.WriteFile(passwordPath, pw.Bytes(), 0o600); err != nil {
		return fmt.Errorf("write password file: %w", err)
	}
	return nil
}
