package rules

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
)

// stateFileVersion is the format of the state file; a file of another version is ignored (with a warning).
const stateFileVersion = 1

// stateFile is what survives a restart: per rule, its gates, pending sequences/absences and windows.
type stateFile struct {
	Version int                  `json:"version"`
	Saved   time.Time            `json:"saved"`
	Rules   map[string]*ruleSnap `json:"rules"`
}

type ruleSnap struct {
	Fingerprint string                 `json:"fingerprint"`
	Gates       map[string]time.Time   `json:"gates,omitempty"`
	Pending     map[string]pendingSnap `json:"pending,omitempty"`
	Groups      map[string]groupSnap   `json:"groups,omitempty"`
	NextClose   *time.Time             `json:"next_close,omitempty"`
}

type pendingSnap struct {
	At    time.Time       `json:"at"`
	Due   time.Time       `json:"due"`
	Event json.RawMessage `json:"event"`
}

type groupSnap struct {
	Buckets []bucket        `json:"buckets"`
	Above   bool            `json:"above,omitempty"`
	Last    json.RawMessage `json:"last,omitempty"`
}

// snapshot captures the machine's state (gates still closed at now only).
func (m *machine) snapshot(now time.Time) (*stateFile, error) {
	sf := &stateFile{Version: stateFileVersion, Saved: now.UTC(), Rules: map[string]*ruleSnap{}}
	for name, st := range m.states {
		rs := &ruleSnap{Fingerprint: st.rule.fingerprint}
		for k, until := range st.gate {
			if until.After(now) {
				if rs.Gates == nil {
					rs.Gates = map[string]time.Time{}
				}
				rs.Gates[k] = until
			}
		}
		for k, p := range st.pending {
			b, err := p.ev.MarshalJSON()
			if err != nil {
				return nil, fmt.Errorf("rule %s: pending %q: %w", name, k, err)
			}
			if rs.Pending == nil {
				rs.Pending = map[string]pendingSnap{}
			}
			rs.Pending[k] = pendingSnap{At: p.at, Due: p.timer.at, Event: b}
		}
		for k, g := range st.groups {
			gs := groupSnap{Buckets: slices.Clone(g.buckets), Above: g.above} // written after mu is released
			if g.last != nil {
				b, err := g.last.MarshalJSON()
				if err != nil {
					return nil, fmt.Errorf("rule %s: window group %q: %w", name, k, err)
				}
				gs.Last = b
			}
			if rs.Groups == nil {
				rs.Groups = map[string]groupSnap{}
			}
			rs.Groups[k] = gs
		}
		if st.closeAt != nil && st.closeAt.idx >= 0 {
			t := st.closeAt.at
			rs.NextClose = &t
		}
		if rs.Gates != nil || rs.Pending != nil || rs.Groups != nil || rs.NextClose != nil {
			sf.Rules[name] = rs
		}
	}
	return sf, nil
}

// restore loads saved state into the rules that still exist with the same fingerprint. It returns how many rules
// got state back and the problems met (a bad entry is skipped, the rest is kept).
func (m *machine) restore(sf *stateFile) (int, []error) {
	var errs []error
	n := 0
	for name, rs := range sf.Rules {
		st, ok := m.states[name]
		if rs == nil || !ok || st.rule.fingerprint != rs.Fingerprint {
			continue
		}
		n++
		for k, until := range rs.Gates {
			st.gate[k] = until
		}
		kind := timerSequence
		if st.rule.kind == kindAbsence {
			kind = timerAbsence
		}
		if st.pending != nil {
			for k, ps := range rs.Pending {
				ev := event.New()
				if err := json.Unmarshal(ps.Event, &ev); err != nil {
					errs = append(errs, fmt.Errorf("rule %s: pending %q: %w", name, k, err))
					continue
				}
				p := &pendingItem{at: ps.At, ev: &ev, timer: &timerItem{kind: kind, st: st, key: k, idx: -1}}
				st.pending[k] = p
				m.timers.set(p.timer, ps.Due)
			}
		}
		if st.groups != nil {
			for k, gs := range rs.Groups {
				g := &windowGroup{buckets: gs.Buckets, above: gs.Above}
				if len(gs.Last) > 0 {
					ev := event.New()
					if err := json.Unmarshal(gs.Last, &ev); err != nil {
						errs = append(errs, fmt.Errorf("rule %s: window group %q: %w", name, k, err))
						continue
					}
					g.last = &ev
				}
				g.buckets = sortBuckets(g.buckets)
				st.groups[k] = g
			}
			if rs.NextClose != nil && st.rule.window.emit == "close" {
				st.closeAt = &timerItem{kind: timerWindowClose, st: st, idx: -1}
				m.timers.set(st.closeAt, *rs.NextClose)
			}
		}
	}
	return n, errs
}

// readStateFile reads path; a missing file is no state and no error.
func readStateFile(path string) (*stateFile, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var sf stateFile
	if err := json.Unmarshal(b, &sf); err != nil {
		return nil, fmt.Errorf("decode %s: %w", path, err)
	}
	if sf.Version != stateFileVersion {
		return nil, fmt.Errorf("%s: version %d, this gateway reads version %d", path, sf.Version, stateFileVersion)
	}
	return &sf, nil
}

// writeStateFile writes sf to path atomically: a temporary file in the same directory, fsync, rename, fsync of
// the directory.
func writeStateFile(path string, sf *stateFile) error {
	b, err := json.Marshal(sf)
	if err != nil {
		return fmt.Errorf("encode: %w", err)
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // best effort: the rename is durable on most filesystems without it
		d.Close()
	}
	return nil
}
