package forward

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// backlogSink starts a sink (window 8) on a hand-acknowledged upstream with a backlog of n events of "hall" and
// waits until the sink has scanned that backlog and sends ahead of it; it returns the first connection.
func backlogSink(t *testing.T, log *memLog, n int) (*running, *handTransport, *handConn) {
	t.Helper()
	for i := 1; i <= n; i++ {
		log.add("sensor.reading", "hall", i)
	}
	r, ht, c := startHandSink(t, log, 8, time.Hour)
	ahead := r.f.metrics.ahead.WithLabelValues("up")
	waitFor(t, 5*time.Second, "the backlog scanned", func() bool { return testutil.ToFloat64(ahead) == 1 })
	return r, ht, c
}

// addAhead appends an event of "porch" after a backlog of n events and waits until the sink has seen the log grow
// past the backlog (with the window full, the sink has nothing else to do meanwhile).
func addAhead(t *testing.T, log *memLog, n int) uint64 { return addAheadFor(t, log, "porch", n) }

// addAheadFor is addAhead for an event of subject.
func addAheadFor(t *testing.T, log *memLog, subject string, n int) uint64 {
	t.Helper()
	seq := log.add("sensor.reading", subject, 1)
	// Woken from its wait at the backlog's end, or it had not gone to wait yet and read the event straight away.
	waitFor(t, 5*time.Second, "the sink woken past the backlog", func() bool {
		log.mu.Lock()
		read := log.maxRead >= seq
		log.mu.Unlock()
		return read || log.wokeAfter(uint64(n)) > 0
	})
	return seq
}

// ackAll acknowledges every unit it takes from c until one holds seq stop (acknowledged too); it returns the
// Seqs in the order they were sent.
func ackAll(t *testing.T, c *handConn, stop uint64) []uint64 {
	t.Helper()
	var order []uint64
	for {
		u := c.next(t)
		for _, r := range u {
			order = append(order, r.Seq)
		}
		c.ack(u[len(u)-1].Seq)
		if slices.Contains(order, stop) {
			return order
		}
	}
}

// TestEventsOfDevicesNotInTheBacklogGoAhead: after a reconnect with a backlog of "hall" events, a new event of
// "porch", which has nothing in the backlog, goes upstream at once instead of after the backlog; a new event of
// "hall" waits for the backlog, in order. Every event goes once, and the cursor ends at the log's end.
func TestEventsOfDevicesNotInTheBacklogGoAhead(t *testing.T) {
	const backlog = 100
	log := newMemLog(t)
	r, _, c := backlogSink(t, log, backlog)
	porch := addAhead(t, log, backlog)
	hall := log.add("sensor.reading", "hall", backlog+1)

	order := ackAll(t, c, hall)
	if want := append(seqs(1, backlog), porch, hall); len(order) != len(want) {
		t.Fatalf("sent %v; want each of 1..%d once", order, hall)
	}
	at := slices.Index(order, porch)
	if at < 0 || at > 16 {
		t.Errorf("porch's event was sent %dth of %v; want it ahead of the backlog, within two windows", at+1, order)
	}
	if got := order[len(order)-1]; got != hall {
		t.Errorf("hall's new event was not sent after its backlog: %v", order)
	}
	waitFor(t, 5*time.Second, "the cursor at the log's end", func() bool { return log.Cursor(CursorName("up")) == hall })
	if v := testutil.ToFloat64(r.f.metrics.sentAhead.WithLabelValues("up")); v != 1 {
		t.Errorf("sent_ahead_total = %v, want 1", v)
	}
	if v := testutil.ToFloat64(r.f.metrics.acked.WithLabelValues("up")); v != float64(hall) {
		t.Errorf("acked_total = %v, want %d", v, hall)
	}
}

// TestStrictOrderSendsInLogOrder: with strict_order, a sink never scans a backlog, and the event of a device
// with nothing in the backlog waits behind it: everything goes upstream in log order.
func TestStrictOrderSendsInLogOrder(t *testing.T) {
	const backlog = 100
	log := newMemLog(t)
	for i := 1; i <= backlog; i++ {
		log.add("sensor.reading", "hall", i)
	}
	_, _, c := startHandSink(t, log, 8, time.Hour, func(sc *SinkConfig) { sc.StrictOrder = true })
	first := c.next(t)
	log.add("sensor.reading", "porch", 1) // nothing of porch in the backlog
	hall := log.add("sensor.reading", "hall", backlog+1)
	c.ack(first[len(first)-1].Seq)
	order := append([]uint64{first[0].Seq}, ackAll(t, c, hall)...)
	if want := seqs(1, hall); !slices.Equal(order, want) {
		t.Errorf("sent %v; want log order %v", order, want)
	}
	if scans := log.headerScans(); len(scans) > 0 {
		t.Errorf("ReadHeaders after %v: a strict-order sink scanned its backlog", scans)
	}
}

// TestCursorWaitsForAnEventSentAhead: when the sink's reader reaches an event that went ahead and is still in
// flight, it does not send it again, and the cursor stops before it until it is acknowledged.
func TestCursorWaitsForAnEventSentAhead(t *testing.T) {
	const backlog = 60
	log := newMemLog(t)
	r, _, c := backlogSink(t, log, backlog)
	porch := addAhead(t, log, backlog)
	var order []uint64
	for !slices.Contains(order, uint64(backlog)) {
		u := c.next(t)
		order = append(order, u[0].Seq)
		if u[0].Seq != porch {
			c.ack(u[0].Seq) // porch's event stays in flight
		}
	}
	if !slices.Contains(order, porch) {
		t.Fatalf("sent %v: porch's event did not go ahead of the backlog", order)
	}
	waitFor(t, 5*time.Second, "the cursor at the end of the backlog", func() bool { return sinkHealth(r, "up").Cursor == backlog })
	select {
	case u := <-c.sent:
		t.Fatalf("sent seq %d after the backlog; want nothing until porch's event is acknowledged", u[0].Seq)
	case <-time.After(50 * time.Millisecond):
	}
	if got := sinkHealth(r, "up").Cursor; got != backlog {
		t.Fatalf("cursor at %d with porch's event (seq %d) in flight; want %d", got, porch, backlog)
	}
	c.ack(porch)
	waitFor(t, 5*time.Second, "the cursor past porch's event", func() bool { return log.Cursor(CursorName("up")) == porch })
}

// TestEventsSentAheadAreSentAgainAfterAReconnect: an event that went ahead and was acknowledged is not under the
// cursor until the reader passes it, so when the connection ends first, the next connection sends it again
// (counted as resent): a duplicate, never a loss.
func TestEventsSentAheadAreSentAgainAfterAReconnect(t *testing.T) {
	const backlog = 100
	log := newMemLog(t)
	r, ht, c := backlogSink(t, log, backlog)
	porch := addAhead(t, log, backlog)
	var maxHall uint64 // the last event of the backlog sent on the first connection
	for sent := false; !sent; {
		u := c.next(t)
		if sent = u[0].Seq == porch; !sent {
			maxHall = u[0].Seq
		}
		c.ack(u[0].Seq)
	}
	// The backlog's events count as acknowledged as the cursor passes them, porch's when it is.
	waitFor(t, 5*time.Second, "porch's acknowledgement taken in", func() bool {
		return testutil.ToFloat64(r.f.metrics.acked.WithLabelValues("up")) == float64(sinkHealth(r, "up").Cursor+1)
	})
	c.close()
	waitFor(t, 5*time.Second, "the connection gone", func() bool { return !sinkHealth(r, "up").Connected })
	for len(c.sent) > 0 { // sent, and not looked at above
		maxHall = max(maxHall, (<-c.sent)[0].Seq)
	}
	cursor := log.Cursor(CursorName("up"))
	if cursor >= backlog {
		t.Fatalf("cursor stored at %d: the backlog was through before porch's event went ahead", cursor)
	}
	c = <-ht.conns
	// porch's event is among the new backlog's last events: it may go ahead again.
	var order []uint64
	for len(order) < int(porch-cursor) {
		u := c.next(t)
		order = append(order, u[0].Seq)
		c.ack(u[0].Seq)
	}
	hall := slices.DeleteFunc(slices.Clone(order), func(seq uint64) bool { return seq == porch })
	if want := seqs(cursor+1, porch-1); !slices.Equal(hall, want) || len(order) != len(want)+1 {
		t.Fatalf("the next connection sent %v, want %v in order and %d", order, want, porch)
	}
	waitFor(t, 5*time.Second, "the cursor at the log's end", func() bool { return log.Cursor(CursorName("up")) == porch })
	// Sent again: the backlog's events past the cursor, and porch's.
	if v, want := testutil.ToFloat64(r.f.metrics.resent.WithLabelValues("up")), float64(maxHall-cursor+1); v != want {
		t.Errorf("resent_total = %v, want %v: %d of the backlog and porch's event", v, want, maxHall-cursor)
	}
}

// TestDevicesOnlyAtTheBacklogsEndGoAhead: a device whose events in the backlog are all among its last four windows
// of events (it came online near the end of the outage) goes ahead with those events and its new ones, in its own
// order; a device with older events in the backlog waits for the reader.
func TestDevicesOnlyAtTheBacklogsEndGoAhead(t *testing.T) {
	log := newMemLog(t)
	for i := 1; i <= 100; i++ {
		log.add("sensor.reading", "hall", i)
	}
	porch := []uint64{log.add("sensor.reading", "porch", 1)}
	log.add("sensor.reading", "hall", 101)
	porch = append(porch, log.add("sensor.reading", "porch", 2))
	end := log.last()
	r, _, c := startHandSink(t, log, 8, time.Hour)
	waitFor(t, 5*time.Second, "the backlog scanned", func() bool {
		return testutil.ToFloat64(r.f.metrics.ahead.WithLabelValues("up")) == 1
	})
	// Appended before anything is acknowledged: the window is full, the sink reads it once it has room.
	porch = append(porch, log.add("sensor.reading", "porch", 3))

	var order []uint64
	for len(order) < int(end)+1 {
		u := c.next(t)
		order = append(order, u[0].Seq)
		c.ack(u[0].Seq)
	}
	var gotPorch, gotHall []uint64
	for _, seq := range order {
		if slices.Contains(porch, seq) {
			gotPorch = append(gotPorch, seq)
		} else {
			gotHall = append(gotHall, seq)
		}
	}
	if !slices.Equal(gotPorch, porch) || !slices.Equal(gotHall, slices.DeleteFunc(seqs(1, end), func(s uint64) bool {
		return slices.Contains(porch, s)
	})) {
		t.Fatalf("sent %v: want each once, porch's %v and hall's in order", order, porch)
	}
	if at := slices.Index(order, porch[2]); at > 16 {
		t.Errorf("porch's events went %dth at the latest in %v; want them ahead of the backlog", at+1, order)
	}
	waitFor(t, 5*time.Second, "the cursor at the log's end", func() bool { return log.Cursor(CursorName("up")) == porch[2] })
}

// TestBacklogScannedDuringTheOutage: while the upstream is down, the sink scans the backlog between its connection
// attempts, each time only what was appended since; the connection that finally comes up scans only the latest
// events, and an event of a device that was quiet goes ahead at once.
func TestBacklogScannedDuringTheOutage(t *testing.T) {
	const backlog = 100
	log := newMemLog(t)
	for i := 1; i <= backlog; i++ {
		log.add("sensor.reading", "hall", i)
	}
	ht := &handTransport{conns: make(chan *handConn, 4)}
	ht.down.Store(true)
	sc := mqttSink("up", "tcp://127.0.0.1:1")
	sc.Window, sc.AckTimeout = 8, time.Hour
	sc.BackoffMin, sc.BackoffMax = time.Millisecond, 5*time.Millisecond
	r := startForwarderWith(t, Config{Sinks: []SinkConfig{sc}}, log, nil, func(f *Forwarder) {
		f.sinks[0].tr, f.sinks[0].tick = ht, time.Hour
	})
	scannedFrom := func(after uint64) func() bool {
		return func() bool { return slices.Contains(log.headerScans(), after) }
	}
	waitFor(t, 5*time.Second, "the backlog scanned during the outage", scannedFrom(0))
	porch := log.add("sensor.reading", "porch", 1)
	waitFor(t, 5*time.Second, "the new event scanned during the outage", scannedFrom(backlog))
	hall := log.add("sensor.reading", "hall", backlog+1)
	ht.down.Store(false)
	c := <-ht.conns
	waitFor(t, 5*time.Second, "sending ahead", func() bool {
		return testutil.ToFloat64(r.f.metrics.ahead.WithLabelValues("up")) == 1
	})
	if n := slices.Index(log.headerScans(), backlog); slices.Contains(log.headerScans()[n:], 0) {
		t.Errorf("ReadHeaders after %v: a scan started over from the cursor", log.headerScans())
	}
	order := ackAll(t, c, hall)
	if at := slices.Index(order, porch); at < 0 || at > 16 {
		t.Errorf("sent %v: want porch's event (seq %d) ahead of the backlog", order, porch)
	}
	waitFor(t, 5*time.Second, "the cursor at the log's end", func() bool { return log.Cursor(CursorName("up")) == hall })
}

// TestBacklogScanGoesOnAcrossConnections: a connection that ends after some progress does not make the next one
// read the backlog again from its cursor: the next scan goes on from where the last one ended.
func TestBacklogScanGoesOnAcrossConnections(t *testing.T) {
	const backlog = 100
	log := newMemLog(t)
	r, ht, c := backlogSink(t, log, backlog)
	for range 8 {
		c.ack(c.next(t)[0].Seq)
	}
	waitFor(t, 5*time.Second, "a quarter of the backlog acknowledged", func() bool { return log.Cursor(CursorName("up")) >= 6 })
	c.close()
	c = <-ht.conns
	waitFor(t, 5*time.Second, "the backlog scanned again", func() bool {
		return testutil.ToFloat64(r.f.metrics.ahead.WithLabelValues("up")) == 1
	})
	porch := addAhead(t, log, backlog)
	order := ackAll(t, c, porch)
	if at := slices.Index(order, porch); at > 16 {
		t.Errorf("sent %v on the second connection: want porch's event (seq %d) ahead of the backlog", order, porch)
	}
	for _, after := range log.headerScans()[1:] {
		if after < backlog {
			t.Fatalf("ReadHeaders after %v: the second connection read the backlog again", log.headerScans())
		}
	}
}

// TestDeviceBehindGoesAheadOnlyInOrder: a device with an event early in the backlog (x@10) is behind until the
// sink's reader has passed it, and then still until the reader has sent x@90, among the backlog's last events,
// which the sink read ahead while x was behind: x's new event, appended once the reader is past x@10, does not go
// before x@90.
func TestDeviceBehindGoesAheadOnlyInOrder(t *testing.T) {
	const backlog = 100
	log := newMemLog(t)
	for i := 1; i <= backlog; i++ {
		subject := "hall"
		if i == 10 || i == 90 {
			subject = "x"
		}
		log.add("sensor.reading", subject, i)
	}
	r, _, c := startHandSink(t, log, 8, time.Hour)
	waitFor(t, 5*time.Second, "the backlog scanned", func() bool {
		return testutil.ToFloat64(r.f.metrics.ahead.WithLabelValues("up")) == 1
	})
	var order []uint64
	take := func() {
		u := c.next(t)
		order = append(order, u[0].Seq)
		c.ack(u[0].Seq)
	}
	for !slices.Contains(order, 20) { // the reader is past x@10
		take()
	}
	x := addAheadFor(t, log, "x", backlog)
	for len(order) < backlog+1 {
		take()
	}
	var xs []uint64
	for _, seq := range order {
		if seq == 10 || seq == 90 || seq == x {
			xs = append(xs, seq)
		}
	}
	if want := []uint64{10, 90, x}; !slices.Equal(xs, want) {
		t.Fatalf("x's events went in the order %v, want %v (sent: %v)", xs, want, order)
	}
}

// TestDeviceGoesAheadOnceItsBacklogIsSent: a device with one event early in the backlog (y@5) is behind only until
// the sink's reader has sent it; its new events then go ahead of the rest of the backlog.
func TestDeviceGoesAheadOnceItsBacklogIsSent(t *testing.T) {
	const backlog = 100
	log := newMemLog(t)
	for i := 1; i <= backlog; i++ {
		subject := "hall"
		if i == 5 {
			subject = "y"
		}
		log.add("sensor.reading", subject, i)
	}
	r, _, c := startHandSink(t, log, 8, time.Hour)
	waitFor(t, 5*time.Second, "the backlog scanned", func() bool {
		return testutil.ToFloat64(r.f.metrics.ahead.WithLabelValues("up")) == 1
	})
	y := addAheadFor(t, log, "y", backlog)
	order := ackAll(t, c, y)
	if at := slices.Index(order, y); at > 24 {
		t.Errorf("y's new event went %dth (sent: %v); want it ahead of the backlog once y@5 was sent", at+1, order)
	}
}

// TestBacklogScanKeepsToTheBackoffPause: the scan between connection attempts stops when the pause ends and goes on
// in the next one, so a long backlog (here each read of its headers outlasts the pause) does not hold back the next
// attempt.
func TestBacklogScanKeepsToTheBackoffPause(t *testing.T) {
	log := newMemLog(t)
	for i := 1; i <= 3*scanChunk; i++ {
		log.add("sensor.reading", "hall", i)
	}
	var mu sync.Mutex
	var trace []string // "dial", or the after of a header read
	log.onHeaders = func(ctx context.Context, after uint64) error {
		mu.Lock()
		trace = append(trace, fmt.Sprint(after))
		mu.Unlock()
		<-ctx.Done() // a slow disk: the read outlasts the pause
		return nil   // and returns its records all the same
	}
	ht := &handTransport{conns: make(chan *handConn, 4), onDial: func() {
		mu.Lock()
		trace = append(trace, "dial")
		mu.Unlock()
	}}
	ht.down.Store(true)
	sc := mqttSink("up", "tcp://127.0.0.1:1")
	sc.Window, sc.AckTimeout = 8, time.Hour
	sc.BackoffMin, sc.BackoffMax = 2*time.Millisecond, 5*time.Millisecond
	startForwarderWith(t, Config{Sinks: []SinkConfig{sc}}, log, nil, func(f *Forwarder) {
		f.sinks[0].tr, f.sinks[0].tick = ht, time.Hour
	})
	want := []string{"0", fmt.Sprint(scanChunk), fmt.Sprint(2 * scanChunk)}
	var got []string
	waitFor(t, 10*time.Second, "the backlog scanned in three pauses", func() bool {
		mu.Lock()
		defer mu.Unlock()
		got = slices.Clone(trace)
		n := 0
		for _, e := range got {
			if e != "dial" {
				n++
			}
		}
		return n >= len(want)
	})
	var reads []string
	for i, e := range got {
		if e == "dial" {
			continue
		}
		reads = append(reads, e)
		if i > 0 && got[i-1] != "dial" {
			t.Fatalf("two header reads without a connection attempt between them: %v", got)
		}
	}
	if !slices.Equal(reads[:len(want)], want) {
		t.Errorf("header reads after %v, want %v: each pause goes on from the last", reads, want)
	}
}
