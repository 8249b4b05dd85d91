package devices

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"regexp"
	"slices"
)

// Device is one registered device: its identity, metadata, credentials and extra topic grants.
type Device struct {
	// ID names the device: 1 to 64 characters of [A-Za-z0-9._-], unique in a registry. Its own topics are
	// devices/{id}/...
	ID string
	// Name, Room and Kind are free-form metadata rules can select on.
	Name, Room, Kind string
	// Labels are further metadata (selected as "labels.<key>").
	Labels map[string]string
	// PasswordHash is a bcrypt or argon2id hash of the MQTT password ("" = no password login).
	PasswordHash string
	// CertCN is the common name of the client certificates accepted for this device ("" = none).
	CertCN string
	// Publish lists MQTT filters the device may publish to beyond devices/{id}/#.
	Publish []string
	// Subscribe lists MQTT filters the device may subscribe within beyond devices/{id}/commands/#.
	Subscribe []string
}

// LogValue shows the device in logs without its password hash.
func (d Device) LogValue() slog.Value {
	attrs := []slog.Attr{slog.String("device_id", d.ID)}
	if d.Name != "" {
		attrs = append(attrs, slog.String("name", d.Name))
	}
	if d.Room != "" {
		attrs = append(attrs, slog.String("room", d.Room))
	}
	if d.Kind != "" {
		attrs = append(attrs, slog.String("kind", d.Kind))
	}
	if d.PasswordHash != "" {
		attrs = append(attrs, slog.String("password_hash", "[redacted]"))
	}
	if d.CertCN != "" {
		attrs = append(attrs, slog.String("cert_cn", d.CertCN))
	}
	return slog.GroupValue(attrs...)
}

// clone returns a copy that shares no maps or slices with d.
func (d Device) clone() Device {
	if d.Labels != nil {
		d.Labels = maps.Clone(d.Labels)
	}
	d.Publish = slices.Clone(d.Publish)
	d.Subscribe = slices.Clone(d.Subscribe)
	return d
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

// ValidID reports whether id is a well-formed device id: 1 to 64 characters of [A-Za-z0-9._-].
func ValidID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("%q does not match [A-Za-z0-9._-]{1,64}", id)
	}
	return nil
}

// problem is one thing wrong with a registry: the device's index, the field (or "" for the device as a whole) and
// the error.
type problem struct {
	index int
	field string
	err   error
	first int // for duplicates: 1 + the index of the device that has the value first (0: not a duplicate)
}

func (p problem) path() string {
	if p.field == "" {
		return fmt.Sprintf("devices[%d]", p.index)
	}
	return fmt.Sprintf("devices[%d].%s", p.index, p.field)
}

// check validates every device and the uniqueness of ids and certificate names, returning every problem found.
func check(devs []Device) []problem {
	var probs []problem
	add := func(i int, field string, format string, args ...any) {
		probs = append(probs, problem{index: i, field: field, err: fmt.Errorf(format, args...)})
	}
	firstID := make(map[string]int, len(devs))
	firstCN := make(map[string]int)
	for i, d := range devs {
		if err := ValidID(d.ID); err != nil {
			add(i, "id", "%w", err)
		} else if j, dup := firstID[d.ID]; dup {
			add(i, "id", "duplicate id %q", d.ID)
			probs[len(probs)-1].first = j + 1
		} else {
			firstID[d.ID] = i
		}
		if d.PasswordHash == "" && d.CertCN == "" {
			add(i, "", "needs password_hash or cert_cn")
		}
		if d.PasswordHash != "" {
			if err := CheckHash(d.PasswordHash); err != nil {
				add(i, "password_hash", "%w", err)
			}
		}
		if d.CertCN != "" {
			if j, dup := firstCN[d.CertCN]; dup {
				add(i, "cert_cn", "duplicate certificate name %q", d.CertCN)
				probs[len(probs)-1].first = j + 1
			} else {
				firstCN[d.CertCN] = i
			}
		}
		for _, k := range slices.Sorted(maps.Keys(d.Labels)) {
			if k == "" {
				add(i, "labels", "empty label name")
			}
		}
		for j, f := range d.Publish {
			if err := ValidFilter(f); err != nil {
				add(i, fmt.Sprintf("publish[%d]", j), "%q: %w", f, err)
			}
		}
		for j, f := range d.Subscribe {
			if err := ValidFilter(f); err != nil {
				add(i, fmt.Sprintf("subscribe[%d]", j), "%q: %w", f, err)
			}
		}
	}
	return probs
}

// ErrInvalidRegistry is wrapped by LoadRegistry, ParseRegistry and NewRegistry when the registry cannot be used;
// the error lists every problem found.
var ErrInvalidRegistry = errors.New("devices: invalid registry")
