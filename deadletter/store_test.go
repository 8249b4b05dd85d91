package deadletter

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func open(t *testing.T, path string, cfg Config) (*Store, *prometheus.Registry, *bytes.Buffer) {
	t.Helper()
	var logs bytes.Buffer
	reg := prometheus.NewRegistry()
	s, err := Open(path, cfg, slog.New(slog.NewTextHandler(&logs, nil)), reg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, reg, &logs
}

func mustAdd(t *testing.T, s *Store, r Record) {
	t.Helper()
	if err := s.Add(r); err != nil {
		t.Fatal(err)
	}
}

func ids(recs []Record) []uint64 {
	out := []uint64{}
	for _, r := range recs {
		out = append(out, r.ID)
	}
	return out
}

func TestAddListReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dl.db")
	s, _, _ := open(t, path, Config{})
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	binary := []byte{0xff, 0x00, 0xfe, 'x'}
	before := time.Now()
	mustAdd(t, s, Record{Reason: "not_json", Detail: "payload is not JSON", DeviceID: "a", Topic: "devices/a/events/x",
		Payload: binary})
	mustAdd(t, s, Record{Time: at, Reason: "command_undelivered", Detail: "timeout", DeviceID: "b"})
	mustAdd(t, s, Record{ID: 99, Reason: "too_large", Payload: []byte(`{"a":1}`)})
	if s.Count() != 3 {
		t.Fatalf("Count = %d, want 3", s.Count())
	}
	check := func(s *Store) {
		t.Helper()
		recs, err := s.List(0, 10)
		if err != nil {
			t.Fatal(err)
		}
		if got := ids(recs); fmt.Sprint(got) != "[1 2 3]" {
			t.Fatalf("ids = %v, want [1 2 3] (the store assigns ids)", got)
		}
		r := recs[0]
		if r.Reason != "not_json" || r.DeviceID != "a" || r.Topic != "devices/a/events/x" || !bytes.Equal(r.Payload, binary) {
			t.Errorf("record 1 = %+v", r)
		}
		if r.Time.Before(before.Add(-time.Second)) || r.Time.After(time.Now()) {
			t.Errorf("record 1 time = %v, want about now", r.Time)
		}
		if !recs[1].Time.Equal(at) {
			t.Errorf("record 2 time = %v, want %v (kept)", recs[1].Time, at)
		}
		if recs[1].Payload != nil || string(recs[2].Payload) != `{"a":1}` {
			t.Errorf("payloads = %q, %q", recs[1].Payload, recs[2].Payload)
		}
		tests := []struct {
			after uint64
			limit int
			want  string
		}{
			{0, 2, "[1 2]"},
			{1, 10, "[2 3]"},
			{3, 10, "[]"},
			{^uint64(0), 10, "[]"},
			{0, 0, "[1 2 3]"}, // default limit
		}
		for _, tt := range tests {
			recs, err := s.List(tt.after, tt.limit)
			if err != nil || fmt.Sprint(ids(recs)) != tt.want {
				t.Errorf("List(%d, %d) = %v, %v; want %s", tt.after, tt.limit, ids(recs), err, tt.want)
			}
		}
	}
	check(s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, _, _ := open(t, path, Config{})
	if s2.Count() != 3 {
		t.Fatalf("after reopen Count = %d, want 3", s2.Count())
	}
	check(s2)
	mustAdd(t, s2, Record{Reason: "unknown_topic"})
	if recs, _ := s2.List(3, 10); len(recs) != 1 || recs[0].ID != 4 {
		t.Fatalf("after reopen the next id is %v, want 4", ids(recs))
	}
}

func TestEvictionByCount(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dl.db")
	s, reg, logs := open(t, path, Config{MaxRecords: 5})
	for i := range 8 {
		mustAdd(t, s, Record{Reason: "not_json", Detail: fmt.Sprint(i)})
	}
	if s.Count() != 5 {
		t.Fatalf("Count = %d, want 5", s.Count())
	}
	recs, _ := s.List(0, 100)
	if fmt.Sprint(ids(recs)) != "[4 5 6 7 8]" {
		t.Fatalf("ids = %v, want the newest five", ids(recs))
	}
	if got := testutil.ToFloat64(s.evictedTotal); got != 3 {
		t.Errorf("evicted_total = %v, want 3", got)
	}
	if got := testutil.ToFloat64(s.records); got != 5 {
		t.Errorf("records = %v, want 5", got)
	}
	if !strings.Contains(logs.String(), "oldest dead letters removed") {
		t.Errorf("eviction not logged: %q", logs.String())
	}
	want := `
# HELP edgegate_deadletter_evicted_total Dead letters removed, oldest first, to stay within max_records and max_bytes.
# TYPE edgegate_deadletter_evicted_total counter
edgegate_deadletter_evicted_total 3
# HELP edgegate_deadletter_records Dead letters held in the store.
# TYPE edgegate_deadletter_records gauge
edgegate_deadletter_records 5
# HELP edgegate_deadletter_records_total Dead letters stored, by reason.
# TYPE edgegate_deadletter_records_total counter
edgegate_deadletter_records_total{reason="not_json"} 8
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
}

func TestEvictionByBytes(t *testing.T) {
	s, _, _ := open(t, filepath.Join(t.TempDir(), "dl.db"), Config{MaxBytes: 4096})
	payload := bytes.Repeat([]byte("p"), 1000) // about 1.4 KB stored (base64 in JSON)
	for range 5 {
		mustAdd(t, s, Record{Reason: "too_large", Payload: payload})
	}
	if s.Count() != 2 {
		t.Fatalf("Count = %d, want 2 (4096 bytes hold two)", s.Count())
	}
	if got := testutil.ToFloat64(s.evictedTotal); got != 3 {
		t.Errorf("evicted_total = %v, want 3", got)
	}
	err := s.Add(Record{Reason: "too_large", Payload: bytes.Repeat([]byte("p"), 4096)})
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Add(larger than max_bytes) = %v, want ErrTooLarge", err)
	}
	if s.Count() != 2 {
		t.Errorf("a rejected record changed the store: Count = %d", s.Count())
	}
	mustAdd(t, s, Record{Reason: "x"})
	if recs, _ := s.List(0, 10); fmt.Sprint(ids(recs)) != "[4 5 6]" {
		t.Errorf("ids = %v, want [4 5 6] (a rejected record uses no id)", ids(recs))
	}
}

func TestReopenWithSmallerBounds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dl.db")
	s, _, _ := open(t, path, Config{})
	for range 10 {
		mustAdd(t, s, Record{Reason: "not_json"})
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, _, logs := open(t, path, Config{MaxRecords: 4})
	if s2.Count() != 4 {
		t.Fatalf("Count = %d, want 4", s2.Count())
	}
	if got := testutil.ToFloat64(s2.evictedTotal); got != 6 {
		t.Errorf("evicted_total = %v, want 6", got)
	}
	if !strings.Contains(logs.String(), "evicted=6") {
		t.Errorf("trim at open not logged: %q", logs.String())
	}
	if recs, _ := s2.List(0, 10); fmt.Sprint(ids(recs)) != "[7 8 9 10]" {
		t.Errorf("ids = %v", ids(recs))
	}
}

func TestReasonLabels(t *testing.T) {
	s, _, _ := open(t, filepath.Join(t.TempDir(), "dl.db"), Config{})
	mustAdd(t, s, Record{Reason: "Not A Reason!"})
	mustAdd(t, s, Record{})
	for i := range maxReasonLabels + 3 {
		mustAdd(t, s, Record{Reason: fmt.Sprintf("reason_%d", i)})
	}
	recs, _ := s.List(0, 2)
	if recs[0].Reason != "Not A Reason!" || recs[1].Reason != ReasonUnspecified {
		t.Errorf("reasons stored = %q, %q", recs[0].Reason, recs[1].Reason)
	}
	if n := testutil.CollectAndCount(s.recordsTotal); n != maxReasonLabels+1 {
		t.Errorf("%d reason labels, want %d (bounded, plus %q)", n, maxReasonLabels+1, ReasonOther)
	}
	// "Not A Reason!" and the 4 reasons beyond the first 64 labels (unspecified took one).
	if got := testutil.ToFloat64(s.recordsTotal.WithLabelValues(ReasonOther)); got != 5 {
		t.Errorf("records_total{reason=other} = %v, want 5", got)
	}
}

func TestConcurrentAdds(t *testing.T) {
	s, _, _ := open(t, filepath.Join(t.TempDir(), "dl.db"), Config{MaxRecords: 150})
	const writers, each = 8, 25
	var wg sync.WaitGroup
	errs := make(chan error, writers*each)
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				if err := s.Add(Record{Reason: "not_json", DeviceID: fmt.Sprintf("d%d", w), Detail: fmt.Sprint(i)}); err != nil {
					errs <- err
				}
				if i%5 == 0 {
					if _, err := s.List(0, 10); err != nil {
						errs <- err
					}
					s.Count()
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	recs, err := s.List(0, MaxListLimit)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 150 || s.Count() != 150 {
		t.Fatalf("%d records listed, Count %d; want 150", len(recs), s.Count())
	}
	for i, r := range recs {
		if want := uint64(writers*each - 150 + 1 + i); r.ID != want {
			t.Fatalf("record %d has id %d, want %d (ids increase without gaps)", i, r.ID, want)
		}
	}
	if got := testutil.ToFloat64(s.evictedTotal); got != writers*each-150 {
		t.Errorf("evicted_total = %v", got)
	}
}

func TestClosed(t *testing.T) {
	s, _, _ := open(t, filepath.Join(t.TempDir(), "dl.db"), Config{})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if err := s.Add(Record{Reason: "x"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Add after Close = %v, want ErrClosed", err)
	}
	if _, err := s.List(0, 1); !errors.Is(err, ErrClosed) {
		t.Errorf("List after Close = %v, want ErrClosed", err)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	t.Run("corrupt", func(t *testing.T) {
		path := filepath.Join(dir, "garbage.db")
		if err := os.WriteFile(path, bytes.Repeat([]byte("not a bbolt file "), 1000), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Open(path, Config{}, nil, nil)
		if err == nil || !strings.Contains(err.Error(), path) {
			t.Fatalf("Open(garbage) = %v, want an error naming the file", err)
		}
	})
	t.Run("locked", func(t *testing.T) {
		path := filepath.Join(dir, "locked.db")
		s, err := Open(path, Config{}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		_, err = Open(path, Config{}, nil, nil) // waits for the 1 s lock timeout
		if err == nil || !strings.Contains(err.Error(), "locked") || !strings.Contains(err.Error(), path) {
			t.Fatalf("second Open = %v, want a lock error naming the file", err)
		}
	})
	t.Run("config", func(t *testing.T) {
		_, err := Open(filepath.Join(dir, "x.db"), Config{MaxRecords: -1}, nil, nil)
		if err == nil || !strings.Contains(err.Error(), "deadletter.max_records") {
			t.Fatalf("Open(bad config) = %v", err)
		}
	})
	t.Run("metrics twice", func(t *testing.T) {
		reg := prometheus.NewRegistry()
		s, err := Open(filepath.Join(dir, "m1.db"), Config{}, nil, reg)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if _, err := Open(filepath.Join(dir, "m2.db"), Config{}, nil, reg); err == nil {
			t.Fatal("registering the metrics twice succeeded")
		}
		// The failed Open released its file.
		s3, err := Open(filepath.Join(dir, "m2.db"), Config{}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		s3.Close()
	})
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		cfg  Config
		want []string
	}{
		{DefaultConfig(), nil},
		{Config{}, nil},
		{Config{MaxRecords: -1}, []string{"deadletter.max_records: must be > 0 (or 0 for 10000), got -1"}},
		{Config{MaxRecords: -1, MaxBytes: -5}, []string{"deadletter.max_records:", "deadletter.max_bytes: must be > 0 (or 0 for 67108864), got -5"}},
	}
	for _, tt := range tests {
		err := tt.cfg.Validate()
		if (err == nil) != (tt.want == nil) {
			t.Errorf("Validate(%+v) = %v", tt.cfg, err)
			continue
		}
		for _, w := range tt.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("Validate(%+v) = %v, want it to mention %q", tt.cfg, err, w)
			}
		}
	}
	if c := (Config{}).withDefaults(); c != DefaultConfig() {
		t.Errorf("zero config with defaults = %+v, want %+v", c, DefaultConfig())
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 1}, []byte(`{"id":1,"time":"2026-03-01T12:00:00Z","reason":"not_json","payload":"/wA="}`))
	f.Add([]byte{1}, []byte(`{"payload":"!"}`))
	f.Fuzz(func(t *testing.T, k, v []byte) {
		r := decodeRecord(k, v)
		if len(k) == 8 && r.ID == 0 && k[7] != 0 {
			t.Fatalf("id not taken from the key %x", k)
		}
		if r.Reason == ReasonCorrupt && !bytes.Equal(r.Payload, v) {
			t.Fatal("a corrupt record does not keep its raw bytes")
		}
	})
}

// BenchmarkAdd measures one durable record (one bbolt transaction with fsync) of 1 KiB.
func BenchmarkAdd(b *testing.B) {
	s, err := Open(filepath.Join(b.TempDir(), "dl.db"), Config{MaxRecords: 1000}, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	payload := bytes.Repeat([]byte("p"), 1024)
	b.ReportAllocs()
	for b.Loop() {
		if err := s.Add(Record{Reason: "not_json", DeviceID: "a", Topic: "devices/a/events/x", Payload: payload}); err != nil {
			b.Fatal(err)
		}
	}
}
