package forward

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// TestMQTTBatches: in batch mode a backlog goes upstream as JSON arrays of consecutive events on the batch topic,
// each within batch_size events and batch_max_bytes, every event once and in log order; a live event that comes
// alone goes at once, as an array of one. With batch_size 1 every message is an array of one.
func TestMQTTBatches(t *testing.T) {
	tests := []struct {
		name     string
		batch    int
		maxBytes int // 0: the default
	}{
		{name: "by count", batch: 32},
		{name: "by bytes", batch: 32, maxBytes: 1000},
		{name: "one event per batch", batch: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := mosquittotest.Start(t)
			col := collect(t, b.URL(), "site/#")
			log := newMemLog(t)
			const n = 300
			batch := tc.batch
			for i := range n {
				log.add("sensor.reading", []string{"hall", "kitchen", "porch"}[i%3], i+1)
			}
			sc := mqttSink("up", b.URL())
			sc.Window, sc.BatchSize = 64, batch
			sc.MQTT.Mode, sc.MQTT.BatchTopic, sc.MQTT.BatchMaxBytes = ModeBatch, "site/{gateway}/{sink}", tc.maxBytes
			r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)

			waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:up") == n })
			waitFor(t, 10*time.Second, "every event upstream", func() bool { return col.unique() == n })
			live := log.add("sensor.reading", "porch", n+1)
			waitFor(t, 10*time.Second, "the live event upstream", func() bool { return col.unique() == n+1 })

			got := col.all()
			if dups := checkDelivery(t, got, n+1); dups != 0 {
				t.Errorf("%d duplicates without any reconnect", dups)
			}
			ids := make([]string, len(got))
			perMsg := map[int]int{}
			for i, g := range got {
				ids[i] = g.id
				perMsg[g.msg]++
				if g.topic != "site/gw1/up" || !g.inArray {
					t.Fatalf("event %s on topic %s (in an array: %v), want an array on site/gw1/up", g.id, g.topic, g.inArray)
				}
				limit := DefaultBatchMaxBytes
				if tc.maxBytes > 0 {
					limit = tc.maxBytes
				}
				if g.size > limit {
					t.Errorf("message %d: %d bytes, above batch_max_bytes %d", g.msg, g.size, limit)
				}
			}
			var want []string
			for i := uint64(1); i <= live; i++ {
				want = append(want, fmt.Sprintf("ev-%06d", i))
			}
			if !slices.Equal(ids, want) {
				t.Errorf("events in the order %v; want the log's order", ids)
			}
			for msg, k := range perMsg {
				if k > batch {
					t.Errorf("message %d holds %d events, above batch_size %d", msg, k, batch)
				}
			}
			if msgs := len(perMsg); batch > 1 && msgs > n/4 {
				t.Errorf("%d messages for %d events: the backlog did not go in batches", msgs, n)
			}
			if last := got[len(got)-1]; perMsg[last.msg] != 1 {
				t.Errorf("the live event went in a message of %d events, want one", perMsg[last.msg])
			}
			if v := testutil.ToFloat64(r.f.metrics.acked.WithLabelValues("up")); v != n+1 {
				t.Errorf("acked_total = %v, want %d", v, n+1)
			}
		})
	}
}
