package buffer

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// TestReadPriority: ReadPriority returns exactly what Read returns filtered by priority, page by page, and its
// scanned position lets a reader pass over whole segments of other priorities, also after some records were
// deleted.
func TestReadPriority(t *testing.T) {
	l := openTest(t, Config{MaxBytes: 1 << 30, Cursors: []string{"sink"}}, 16)
	run(t, l.Log)
	rng := rand.New(rand.NewPCG(1, 2))
	// Segments 1-4: priority 0 only; then a mix; then priority 0 again.
	prios := make([]uint8, 0, 300)
	for range 64 {
		prios = append(prios, 0)
	}
	for range 200 {
		prios = append(prios, uint8(rng.IntN(10)))
	}
	for range 36 {
		prios = append(prios, 0)
	}
	appendN(t, l.Log, len(prios), func(i int) Entry {
		return Entry{Data: fmt.Appendf(nil, `{"i":%d}`, i), Type: "t", Subject: "s", Priority: prios[i]}
	})
	all, err := l.Read(0, 1000)
	if err != nil || len(all) != len(prios) {
		t.Fatalf("Read: %d records, %v", len(all), err)
	}

	check := func(lo, hi uint8, page int) {
		t.Helper()
		var want, got []uint64
		for _, r := range all {
			if r.Priority >= lo && r.Priority < hi {
				want = append(want, r.Seq)
			}
		}
		after, calls := uint64(0), 0
		for {
			calls++
			recs, scanned, err := l.ReadPriority(after, page, lo, hi)
			if err != nil {
				t.Fatalf("ReadPriority(%d, %d, %d, %d): %v", after, page, lo, hi, err)
			}
			if scanned < after || len(recs) > page {
				t.Fatalf("ReadPriority(%d, %d): %d records, scanned %d", after, page, len(recs), scanned)
			}
			for _, r := range recs {
				if r.Seq <= after || r.Seq > scanned || r.Priority < lo || r.Priority >= hi {
					t.Fatalf("record %d (priority %d) outside (%d, %d] or [%d, %d)", r.Seq, r.Priority, after, scanned, lo, hi)
				}
				if string(r.Data) != fmt.Sprintf(`{"i":%d}`, r.Seq-1) {
					t.Fatalf("record %d: data %s", r.Seq, r.Data)
				}
				got = append(got, r.Seq)
			}
			if scanned == after {
				break
			}
			after = scanned
		}
		if !slices.Equal(got, want) {
			t.Errorf("priorities [%d, %d), page %d: got %v, want %v", lo, hi, page, got, want)
		}
		if after != l.LastSeq() {
			t.Errorf("priorities [%d, %d): scanned up to %d, want the last seq %d", lo, hi, after, l.LastSeq())
		}
	}
	for _, page := range []int{1, 7, 1000} {
		check(0, 10, page)
		check(5, 10, page)
		check(9, 10, page)
		check(3, 4, page)
	}
	// A reader of priority 5 and up passes the first four segments (priority 0 only) in one call.
	recs, scanned, err := l.ReadPriority(0, 1, 5, 10)
	if err != nil || len(recs) != 1 || recs[0].Seq <= 64 || scanned != recs[0].Seq {
		t.Errorf("first record of priority >= 5: %v, scanned %d, %v", recs, scanned, err)
	}
	// Nothing of a priority that is not stored: one call scans to the end.
	if recs, scanned, err := l.ReadPriority(0, 10, 10, 10); err != nil || len(recs) != 0 || scanned != l.LastSeq() {
		t.Errorf("empty range: %d records, scanned %d, %v", len(recs), scanned, err)
	}

	// Deleted segments and records are passed over.
	if err := l.Ack("sink", 100); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the delivered segments deleted", func() bool { return l.Stats().Events <= int64(len(prios)-96) })
	if all, err = l.Read(0, 1000); err != nil || len(all) == 0 || all[0].Seq <= 96 {
		t.Fatalf("after the deletion Read gives %d records (the first segments should be gone): %v", len(all), err)
	}
	check(0, 10, 5)
	check(5, 10, 3)
}
