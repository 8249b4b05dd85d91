package forward

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// handTransport is an upstream that acknowledges only when the test says so: each connection it dials is
// passed to the test, and every unit sent waits there for an outcome the test writes.
type handTransport struct {
	conns  chan *handConn
	down   atomic.Bool // dials fail
	onDial func()      // when set, called at every dial
}

func (t *handTransport) dial(_ context.Context, gen uint64) (conn, error) {
	if t.onDial != nil {
		t.onDial()
	}
	if t.down.Load() {
		return nil, errors.New("hand: upstream down")
	}
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

// startHandSink runs a forwarder whose one sink (window events) sends to a handTransport and checks for a
// stall every tick; it returns the transport and the sink's first connection.
func startHandSink(t *testing.T, log *memLog, window int, tick time.Duration, opts ...func(*SinkConfig)) (*running, *handTransport, *handConn) {
	t.Helper()
	ht := &handTransport{conns: make(chan *handConn, 4)}
	sc := mqttSink("up", "tcp://127.0.0.1:1")
	sc.Window = window
	sc.AckTimeout = time.Hour
	for _, o := range opts {
		o(&sc)
	}
	r := startForwarderWith(t, Config{Sinks: []SinkConfig{sc}}, log, nil, func(f *Forwarder) {
		f.sinks[0].tr, f.sinks[0].tick = ht, tick
	})
	return r, ht, <-ht.conns
}

func (l *memLog) ackCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.acks
}

// TestFullWindowStoredAtOnce: a log may group the cursor positions handed with Ack and store them later (the
// buffer spaces its commits of cursors alone). With the window full the sink can send nothing until its cursor
// is stored, so it hands it with AckNow, which is not grouped, also when the position was handed with Ack before
// the window filled. Here Ack never stores: the sink still sends on as acknowledgements come.
func TestFullWindowStoredAtOnce(t *testing.T) {
	const window = 8
	log := newMemLog(t)
	log.spaced = true
	for i := 1; i <= 4; i++ {
		log.add("sensor.reading", "hall", i)
	}
	_, _, c := startHandSink(t, log, window, time.Hour)
	name := CursorName("up")
	expect := func(from, to uint64) {
		t.Helper()
		for seq := from; seq <= to; seq++ {
			if got := c.next(t)[0].Seq; got != seq {
				t.Fatalf("sent seq %d, want %d", got, seq)
			}
		}
	}
	expect(1, 4)
	// A quarter of the window acknowledged, with room in it: handed with Ack, which this log leaves waiting.
	c.ack(1)
	c.ack(2)
	waitFor(t, 5*time.Second, "the cursor handed", func() bool { return log.ackCount() == 1 })
	// The window fills with events in flight: the position handed before is handed again with AckNow.
	for i := 5; i <= 3*window; i++ {
		log.add("sensor.reading", "hall", i)
	}
	expect(5, 2+window)
	if got := log.Persisted(name); got != 2 {
		t.Fatalf("persisted %d, want 2", got)
	}
	// Each acknowledgement with the window full is stored at once and lets one more event go.
	for seq := uint64(3); seq <= 2*window; seq++ {
		c.ack(seq)
		expect(seq+window, seq+window)
		if got := log.Persisted(name); got != seq {
			t.Fatalf("persisted %d after acknowledging %d with the window full", got, seq)
		}
	}
	log.mu.Lock()
	defer log.mu.Unlock()
	if want := 1 + 2*window - 2; log.nowAcks != want {
		t.Errorf("%d AckNow calls, want %d (one re-hand, then one per acknowledgement)", log.nowAcks, want)
	}
}

// TestCursorHandedPerQuarterWindow: while events are in flight and the window has room, the sink hands its
// cursor to the log once a quarter of its window is acknowledged, not on every acknowledgement (each hand is a
// commit with two fsyncs when no append carries it). With the window full it hands every acknowledgement at once:
// nothing more is sent until the log stores the cursor, and an upstream may hold its acknowledgements back until
// it sees more traffic. When a connection ends it hands what that connection got acknowledged. No event is
// skipped, none sent twice. The stall check does not tick here: nothing else hands the cursor.
func TestCursorHandedPerQuarterWindow(t *testing.T) {
	const window, backlog = 64, 48
	log := newMemLog(t)
	for i := 1; i <= backlog; i++ {
		log.add("sensor.reading", "hall", i)
	}
	r, _, c := startHandSink(t, log, window, time.Hour)
	name := CursorName("up")

	// The window has room: acknowledged one at a time, each taken in before the next arrives.
	var sent []uint64
	for range backlog {
		sent = append(sent, c.next(t)[0].Seq)
	}
	if want := seqs(1, backlog); !slices.Equal(sent, want) {
		t.Fatalf("sent %v, want 1..%d once each, in order", sent, backlog)
	}
	for seq := uint64(1); seq <= backlog; seq++ {
		c.ack(seq)
		waitFor(t, 5*time.Second, "the acknowledgement taken in", func() bool { return sinkHealth(r, "up").Cursor >= seq })
	}
	waitFor(t, 5*time.Second, "the cursor stored at the end of the backlog", func() bool { return log.Cursor(name) == backlog })
	if hands, most := log.ackCount(), backlog/(window/4); hands > most {
		t.Errorf("the cursor was handed to the log %d times for %d events acknowledged one by one with room in the window %d, want at most %d (one per quarter window)",
			hands, backlog, window, most)
	}

	// The window full: each acknowledgement is stored at once and lets one more event go.
	for i := 1; i <= 2*window; i++ {
		log.add("sensor.reading", "hall", backlog+i)
	}
	for i := 1; i <= window; i++ {
		if got, want := c.next(t)[0].Seq, uint64(backlog+i); got != want {
			t.Fatalf("sent seq %d, want %d", got, want)
		}
	}
	for i := 1; i <= 4; i++ {
		c.ack(uint64(backlog + i))
		if got, want := c.next(t)[0].Seq, uint64(backlog+window+i); got != want {
			t.Fatalf("with the window full, acknowledging seq %d let seq %d go, want %d", backlog+i, got, want)
		}
	}
	if got := log.Cursor(name); got != backlog+4 {
		t.Errorf("cursor stored at %d, want %d", got, backlog+4)
	}

	for seq := uint64(backlog + 5); seq <= backlog+2*window; seq++ {
		if seq > backlog+window+4 {
			c.next(t)
		}
		c.ack(seq)
	}
	waitFor(t, 5*time.Second, "the cursor stored at the end", func() bool { return log.Cursor(name) == backlog+2*window })
}

// TestCursorHandedWhenConnectionEnds: an acknowledgement held back (events still in flight, the window has room)
// is handed to the log when the connection fails, and the next connection sends what was not acknowledged, not
// the acknowledged event. The stall check does not tick here.
func TestCursorHandedWhenConnectionEnds(t *testing.T) {
	log := newMemLog(t)
	for i := 1; i <= 8; i++ {
		log.add("sensor.reading", "hall", i)
	}
	r, ht, c := startHandSink(t, log, 64, time.Hour)
	for range 8 {
		c.next(t)
	}
	c.ack(1)
	waitFor(t, 5*time.Second, "the acknowledgement taken in", func() bool { return sinkHealth(r, "up").Cursor == 1 })
	if got := log.Cursor(CursorName("up")); got != 0 {
		t.Fatalf("cursor stored at %d with 7 events in flight and room in the window, want it held back", got)
	}
	c.close()
	waitFor(t, 5*time.Second, "the cursor stored when the connection ended", func() bool { return log.Cursor(CursorName("up")) == 1 })
	c = <-ht.conns
	for want := uint64(2); want <= 8; want++ {
		if got := c.next(t)[0].Seq; got != want {
			t.Fatalf("the new connection sent seq %d, want %d", got, want)
		}
		c.ack(want)
	}
	waitFor(t, 5*time.Second, "the cursor stored at the end", func() bool { return log.Cursor(CursorName("up")) == 8 })
}

// TestCursorHandedAtTick: an acknowledgement held back (events still in flight, the window has room) is handed
// to the log at the stall check's next tick, without waiting for more acknowledgements.
func TestCursorHandedAtTick(t *testing.T) {
	log := newMemLog(t)
	for i := 1; i <= 8; i++ {
		log.add("sensor.reading", "hall", i)
	}
	_, _, c := startHandSink(t, log, 64, 20*time.Millisecond)
	for range 8 {
		c.next(t)
	}
	c.ack(1)
	waitFor(t, 5*time.Second, "the cursor stored by the tick", func() bool { return log.Cursor(CursorName("up")) == 1 })
	for seq := uint64(2); seq <= 8; seq++ {
		c.ack(seq)
	}
	waitFor(t, 5*time.Second, "the cursor stored at the end", func() bool { return log.Cursor(CursorName("up")) == 8 })
}

// TestSendsWhatIsAppendedWhileInFlight: an event appended while the sink has events in flight, and room in its
// window, goes out at once, not after the next acknowledgement (a round trip to the upstream, long on a
// cellular or satellite link). The upstream here acknowledges nothing until the end, and the stall check does
// not tick.
func TestSendsWhatIsAppendedWhileInFlight(t *testing.T) {
	log := newMemLog(t)
	log.add("sensor.reading", "hall", 1)
	_, _, c := startHandSink(t, log, 64, time.Hour)
	for want := uint64(1); want <= 5; want++ {
		if want > 1 {
			log.add("sensor.reading", "hall", int(want))
		}
		if got := c.next(t)[0].Seq; got != want {
			t.Fatalf("sent seq %d, want %d", got, want)
		}
	}
	for seq := uint64(1); seq <= 5; seq++ {
		c.ack(seq)
	}
	waitFor(t, 5*time.Second, "the cursor stored at the end", func() bool { return log.Cursor(CursorName("up")) == 5 })
}

func seqs(from, to uint64) []uint64 {
	var s []uint64
	for i := from; i <= to; i++ {
		s = append(s, i)
	}
	return s
}
