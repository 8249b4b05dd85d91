//go:build linux

package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	bolt "go.etcd.io/bbolt"
)

// LogCheck is what CheckLog found in a stopped gateway's durable log.
type LogCheck struct {
	// Events is the number of records exported; every one parsed as a valid CloudEvent.
	Events int
	// Stats is the output of `edgegate backlog stats`.
	Stats string
	// Keys are the Client events among the records (of every kind).
	Keys []Key
	// Cursors are the persisted cursor positions (log sequence numbers) by name, from the stats.
	Cursors map[string]uint64
}

// CheckLog checks the durable log of a stopped (or killed) gateway: bbolt's own consistency check of every page,
// `edgegate backlog stats` exiting 0, and `edgegate backlog export` writing records that each parse and validate
// as a CloudEvent with a unique id. It returns the first problem found.
func (g *Gateway) CheckLog() (LogCheck, error) {
	var res LogCheck
	if g.Running() {
		return res, errors.New("check log: the gateway is running")
	}
	path := filepath.Join(g.DataDir, "events.db")
	if err := boltCheck(path); err != nil {
		return res, err
	}
	out, errOut, code, err := g.Tool("backlog", "stats")
	if err != nil {
		return res, err
	}
	if code != 0 {
		return res, fmt.Errorf("check log: edgegate backlog stats exited %d: %s", code, errOut)
	}
	res.Stats = out
	var st struct {
		Cursors []struct {
			Name     string `json:"name"`
			Position uint64 `json:"position"`
		} `json:"cursors"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return res, fmt.Errorf("check log: edgegate backlog stats printed no JSON: %w", err)
	}
	res.Cursors = map[string]uint64{}
	for _, c := range st.Cursors {
		res.Cursors[c.Name] = c.Position
	}
	exp := filepath.Join(g.Dir, "export.jsonl")
	defer os.Remove(exp)
	if _, errOut, code, err = g.Tool("backlog", "export", "--out", exp); err != nil {
		return res, err
	} else if code != 0 {
		return res, fmt.Errorf("check log: edgegate backlog export exited %d: %s", code, errOut)
	}
	f, err := os.Open(exp)
	if err != nil {
		return res, fmt.Errorf("check log: %w", err)
	}
	defer f.Close()
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 1<<16), 16<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var ev event.Event
		if err := json.Unmarshal(line, &ev); err != nil {
			return res, fmt.Errorf("check log: record %d does not parse: %w: %.200s", res.Events+1, err, line)
		}
		if err := ev.Validate(); err != nil {
			return res, fmt.Errorf("check log: record %d is not a valid CloudEvent: %w", res.Events+1, err)
		}
		if seen[ev.ID()] {
			return res, fmt.Errorf("check log: record %d repeats id %s", res.Events+1, ev.ID())
		}
		seen[ev.ID()] = true
		res.Events++
		if k, ok := clientKey(ev.Type(), ev.Subject(), ev.Data()); ok {
			res.Keys = append(res.Keys, k)
		}
	}
	if err := sc.Err(); err != nil {
		return res, fmt.Errorf("check log: read export: %w", err)
	}
	return res, nil
}

// boltCheck opens the file read-only and runs bbolt's consistency check over every page.
func boltCheck(path string) (err error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 2 * time.Second})
	if err != nil {
		return fmt.Errorf("check log: open %s: %w", path, err)
	}
	defer db.Close()
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("check log: bbolt check of %s panicked: %v", path, r)
		}
	}()
	return db.View(func(tx *bolt.Tx) error {
		var errs []error
		for e := range tx.Check() { // drained to the end: the check runs in a goroutine of its own
			if len(errs) < 10 {
				errs = append(errs, e)
			}
		}
		if len(errs) > 0 {
			return fmt.Errorf("check log: bbolt check of %s: %w", path, errors.Join(errs...))
		}
		return nil
	})
}
