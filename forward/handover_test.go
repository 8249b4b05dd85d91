package forward

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

// handTransport is an upstream that acknowledges only when the test says so: each connection it dials is
// passed to the test, and every unit sent waits there for an outcome the test writes.
type handTransport struct{ conns chan *handConn }

func (t *handTransport) dial(_ context.Context, gen uint64) (conn, error) {
	c := &handConn{gen: gen, sent: make(chan []Record, 1024), out: make(chan outcome, 1024), gone: make(chan struct{})}
	t.conns <- c
	return c, nil
}
func (t *handTransport) unitSize() int     { return 1 }
func (t *handTransport) target() string    { return "hand" }
func (t *handTransport) wait()             {}
func (t *handTransport) dialReaches() bool { return true }

type handConn struct {
	gen  uint64
	sent chan []Record
	out  chan outcome
	once sync.Once
	gone chan struct{}
}

func (c *handConn) send(recs []Record) error { c.sent <- slices.Clone(recs); return nil }
func (c *handConn) outcomes() <-chan outcome { return c.out }
func (c *handConn) lost() <-chan struct{}    { return c.gone }
func (c *handConn) cause() error             { return context.Canceled }
func (c *handConn) close()                   { c.once.Do(func() { close(c.gone) }) }
func (c *handConn) ack(seq uint64)           { c.out <- outcome{gen: c.gen, last: seq} }
func (c *handConn) next(t *testing.T) []Record {
	t.Helper()
	select {
	case u := <-c.sent:
		return u
	case <-time.After(10 * time.Second):
		t.Fatal("nothing sent within 10s")
		return nil
	}
}

// TestCursorHandedPerQuarterWindow: while events are in flight, the sink hands its cursor to the log once a
// quarter of its window is acknowledged, not on every acknowledgement (each hand is a commit with two fsyncs when
// no append carries it); with nothing in flight, at the stall check's tick and when a connection ends, it hands
// what is acknowledged at once. No event is skipped, none sent twice.
func TestCursorHandedPerQuarterWindow(t *testing.T) {
	const window, backlog = 16, 200
	log := newMemLog(t)
	for i := 1; i <= backlog; i++ {
		log.add("sensor.reading", "hall", i)
	}
	ht := &handTransport{conns: make(chan *handConn, 4)}
	sc := mqttSink("up", "tcp://127.0.0.1:1")
	sc.Window = window
	sc.AckTimeout = 4 * time.Second // the stall check ticks every second
	r := startForwarderWith(t, Config{Sinks: []SinkConfig{sc}}, log, nil, func(f *Forwarder) { f.sinks[0].tr = ht })
	name := CursorName("up")
	c := <-ht.conns

	// Acknowledge the backlog one event at a time, each taken in before the next arrives.
	var sent []uint64
	for seq := uint64(1); seq <= backlog; seq++ {
		for uint64(len(sent)) < seq {
			sent = append(sent, c.next(t)[0].Seq)
		}
		c.ack(seq)
		waitFor(t, 5*time.Second, "the acknowledgement taken in", func() bool { return sinkHealth(r, "up").Cursor >= seq })
	}
	if want := seqs(1, backlog); !slices.Equal(sent, want) {
		t.Fatalf("sent %v, want 1..%d once each, in order", sent, backlog)
	}
	waitFor(t, 5*time.Second, "the cursor stored at the end of the backlog", func() bool { return log.Cursor(name) == backlog })
	log.mu.Lock()
	hands := log.acks
	log.mu.Unlock()
	if most := backlog/(window/4) + 1; hands > most {
		t.Errorf("the cursor was handed to the log %d times for %d events acknowledged one by one, want at most %d (one per quarter window)",
			hands, backlog, most)
	}
	t.Logf("%d events acknowledged one by one, cursor handed %d times", backlog, hands)

	// One acknowledged among events in flight: stored by the stall check's tick, without more acknowledgements.
	for i := 1; i <= 4; i++ {
		log.add("sensor.reading", "hall", backlog+i)
	}
	for range 4 {
		c.next(t)
	}
	c.ack(backlog + 1)
	waitFor(t, 3*time.Second, "the cursor stored by the tick", func() bool { return log.Cursor(name) == backlog+1 })

	// One more acknowledged, then the connection fails: stored when the connection ends, and the next one
	// sends the rest again, not the acknowledged ones.
	c.ack(backlog + 2)
	waitFor(t, 5*time.Second, "the acknowledgement taken in", func() bool { return sinkHealth(r, "up").Cursor == backlog+2 })
	c.close()
	waitFor(t, 5*time.Second, "the cursor stored when the connection ended", func() bool { return log.Cursor(name) == backlog+2 })
	c = <-ht.conns
	for _, want := range []uint64{backlog + 3, backlog + 4} {
		if got := c.next(t)[0].Seq; got != want {
			t.Fatalf("the new connection sent seq %d, want %d", got, want)
		}
	}
	c.ack(backlog + 3)
	c.ack(backlog + 4)
	waitFor(t, 5*time.Second, "the cursor stored at the end", func() bool { return log.Cursor(name) == backlog+4 })
}

func seqs(from, to uint64) []uint64 {
	var s []uint64
	for i := from; i <= to; i++ {
		s = append(s, i)
	}
	return s
}
