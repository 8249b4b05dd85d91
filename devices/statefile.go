package devices

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Changes counts the changes of the view: it grows with every event applied and every Set. A saver compares it
// with its value at the last save.
func (s *StateView) Changes() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changes
}

// Save writes the state of every device to path, as JSON, replacing the file atomically: a crash leaves either
// the previous file or the new one.
func (s *StateView) Save(path string) error { return s.SaveAt(path, 0) }

// SaveAt is Save for a view that holds every event of the log up to logSeq (and maybe some after it): LoadAt
// returns logSeq, from where the events after it can be replayed (Replay). 0: no position.
func (s *StateView) SaveAt(path string, logSeq uint64) error {
	data, err := json.Marshal(stateFile{Version: stateFileVersion, Saved: time.Now().UTC(), LogSeq: logSeq,
		Devices: s.Snapshot()})
	if err != nil {
		return fmt.Errorf("devices: save state: encode: %w", err)
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err == nil {
		_, err = f.Write(data)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("devices: save state: %w", err)
	}
	if dir, err := os.Open(filepath.Dir(path)); err == nil {
		_ = dir.Sync() // makes the rename durable where the filesystem needs it
		_ = dir.Close()
	}
	return nil
}

// Load reads a file written by Save into the view and returns the number of devices it held. Every saved key comes
// back as saved (numbers as float64 or, beyond ±2^53, int64; last_seen as a time), except online, which is false:
// no device is connected to a gateway that is starting. A file that does not exist is no error (0 devices); one that cannot be read as a
// saved state is an error naming it, and the view is left unchanged.
func (s *StateView) Load(path string) (int, error) {
	n, _, err := s.LoadAt(path)
	return n, err
}

// LoadAt is Load that also returns the log position the file was saved at (SaveAt; 0 when none).
func (s *StateView) LoadAt(path string) (devices int, logSeq uint64, err error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("devices: load state: %w", err)
	}
	var sf stateFile
	long, err := decodeJSON(data, &sf)
	for _, st := range sf.Devices {
		if err != nil || !long {
			break
		}
		_, err = exactNumber(st) // replaces the numbers of the map in place
	}
	if err != nil {
		return 0, 0, fmt.Errorf("devices: load state %s: %w", path, err)
	}
	if sf.Version != stateFileVersion {
		return 0, 0, fmt.Errorf("devices: load state %s: format version %d, want %d", path, sf.Version, stateFileVersion)
	}
	type saved struct {
		id       string
		lastSeen time.Time
		state    map[string]any
	}
	list := make([]saved, 0, len(sf.Devices))
	for id, st := range sf.Devices {
		if id == "" || st == nil {
			return 0, 0, fmt.Errorf("devices: load state %s: an entry without a device id or state", path)
		}
		sv := saved{id: id, state: st}
		if v, ok := st[KeyLastSeen]; ok {
			// A rule may have set it to anything: what is not a time is left out, the rest of the state is kept.
			str, _ := v.(string)
			if sv.lastSeen, err = time.Parse(time.RFC3339Nano, str); err != nil {
				delete(st, KeyLastSeen)
				sv.lastSeen, err = time.Time{}, nil
			} else {
				st[KeyLastSeen] = sv.lastSeen
			}
		}
		if _, ok := st[KeyOnline]; ok {
			st[KeyOnline] = false
		}
		list = append(list, sv)
	}
	// The device seen most recently ends up in front, as if its events had just been applied.
	slices.SortFunc(list, func(a, b saved) int {
		return cmp.Or(a.lastSeen.Compare(b.lastSeen), cmp.Compare(a.id, b.id))
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sv := range list {
		d := s.touch(sv.id)
		for _, k := range slices.Sorted(maps.Keys(sv.state)) {
			s.setField(d, k, sv.state[k])
		}
	}
	return len(list), sf.LogSeq, nil
}

// stateFile is what Save writes: the format version (stateFileVersion), when, the log position and each device's
// state by id.
type stateFile struct {
	Version int       `json:"version"`
	Saved   time.Time `json:"saved"`
	// LogSeq is the log position the view held every event up to (0: none, as in files of earlier versions).
	LogSeq  uint64                    `json:"log_seq,omitempty"`
	Devices map[string]map[string]any `json:"devices"`
}

const stateFileVersion = 1
