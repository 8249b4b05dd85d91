package forward

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestWindowCountsFromPersistedCursor: on the real log, every event reaching the upstream finds at most window
// events received past the cursor as the log has durably stored it — what a crash at that moment would send
// again. It holds while a backlog drains with nothing appended (the cursor is stored by commits of its own) and
// while appends flow (it rides along with theirs), and the stored cursor reaches the end with no append after
// the last acknowledgement.
func TestWindowCountsFromPersistedCursor(t *testing.T) {
	const window, backlog, live = 4, 300, 300
	log := openBufferLog(t, "sink:web")
	var mu sync.Mutex
	var got []uint64 // seqs received, in arrival order
	worst := 0       // the most events received past the stored cursor, seen on an arrival
	up := newUpstream(t, func(_ int, r request) (int, map[string]string) {
		var ev struct {
			Data struct{ N uint64 } `json:"data"`
		}
		if err := json.Unmarshal([]byte(r.body), &ev); err != nil {
			t.Errorf("upstream: %v", err)
			return 400, nil
		}
		mu.Lock()
		defer mu.Unlock()
		got = append(got, ev.Data.N)
		persisted, past := log.Persisted("sink:web"), 0
		seen := map[uint64]bool{}
		for _, seq := range got {
			if seq > persisted && !seen[seq] {
				seen[seq] = true
				past++
			}
		}
		worst = max(worst, past)
		if past > window {
			t.Errorf("seq %d arrived with %d events received past the stored cursor %d, window %d",
				ev.Data.N, past, persisted, window)
		}
		return 204, nil
	})
	add := func(i int) {
		if seq := log.add(t, fmt.Sprintf("ev-%06d", i), "sensor.reading", "hall", i); seq != uint64(i) {
			t.Fatalf("event %d stored as seq %d", i, seq)
		}
	}
	for i := 1; i <= backlog; i++ {
		add(i)
	}
	sc := httpSink(up.srv.URL, ModeStructured)
	sc.Window = window
	startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitFor(t, 20*time.Second, "half the backlog sent", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) >= backlog/2
	})
	for i := backlog + 1; i <= backlog+live; i++ {
		add(i)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := log.WaitPersisted(ctx, "sink:web", backlog+live-1); err != nil {
		t.Fatalf("the stored cursor did not reach the end: %v (persisted %d, acknowledged %d)",
			err, log.Persisted("sink:web"), log.Cursor("sink:web"))
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != backlog+live {
		t.Errorf("%d events received, want %d (none twice)", len(got), backlog+live)
	}
	t.Logf("at most %d events received past the stored cursor (window %d)", worst, window)
}
