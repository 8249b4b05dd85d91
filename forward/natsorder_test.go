package forward

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// natsTap is a TCP proxy in front of the shared NATS server that can hold back the server's first "no
// responders" answer (a JetStream publish to a subject no stream captures) until the test releases it, and can
// ask the client for a PONG: the client writes it after everything it published before, so once the PONG is
// through, the tap has seen every publish the client made until then.
type natsTap struct {
	t  *testing.T
	ln net.Listener

	mu    sync.Mutex
	conns []*tapConn
	armed bool // hold the next server data carrying a no-responders status

	held    chan struct{} // receives when data is held
	release chan struct{} // closed to let it through
	done    chan struct{}
	wg      sync.WaitGroup
}

// tapConn is one proxied client connection.
type tapConn struct {
	client, server net.Conn
	wmu            sync.Mutex // writes to the client: the server's data and injected PINGs

	mu     sync.Mutex
	up     bytes.Buffer // everything the client sent
	pings  int          // PINGs injected whose PONG is not through yet
	ponged chan struct{}
}

func newNATSTap(t *testing.T) *natsTap {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &natsTap{t: t, ln: ln, held: make(chan struct{}, 1), release: make(chan struct{}), done: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		close(p.done)
		_ = ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			_ = c.client.Close()
			_ = c.server.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *natsTap) url() string { return "nats://" + p.ln.Addr().String() }

// holdNoResponders arms the tap: the next server data carrying a no-responders status waits for releaseHeld.
func (p *natsTap) holdNoResponders() {
	p.mu.Lock()
	p.armed = true
	p.mu.Unlock()
}

func (p *natsTap) releaseHeld() { close(p.release) }

func (p *natsTap) conn(i int) *tapConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conns[i]
}

func (p *natsTap) accept() {
	defer p.wg.Done()
	for {
		cl, err := p.ln.Accept()
		if err != nil {
			return
		}
		srv, err := net.DialTimeout("tcp", "127.0.0.1:4222", 5*time.Second)
		if err != nil {
			_ = cl.Close()
			continue
		}
		c := &tapConn{client: cl, server: srv, ponged: make(chan struct{}, 1)}
		p.mu.Lock()
		p.conns = append(p.conns, c)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.toServer(c)
		go p.toClient(c)
	}
}

// toServer copies what the client sends, keeping a copy, and keeps back the PONGs of injected PINGs.
func (p *natsTap) toServer(c *tapConn) {
	defer p.wg.Done()
	defer c.server.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := c.client.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			c.mu.Lock()
			c.up.Write(chunk)
			for c.pings > 0 && bytes.Contains(chunk, []byte("PONG\r\n")) {
				chunk = bytes.Replace(chunk, []byte("PONG\r\n"), nil, 1)
				c.pings--
				c.ponged <- struct{}{}
			}
			c.mu.Unlock()
			if _, err := c.server.Write(chunk); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// toClient copies what the server sends, holding the first no-responders answer while the tap is armed.
func (p *natsTap) toClient(c *tapConn) {
	defer p.wg.Done()
	defer c.client.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := c.server.Read(buf)
		if n > 0 {
			p.mu.Lock()
			hold := p.armed && bytes.Contains(buf[:n], []byte("NATS/1.0 503"))
			if hold {
				p.armed = false
			}
			p.mu.Unlock()
			if hold {
				if !bytes.HasPrefix(buf[:n], []byte("HMSG ")) {
					p.t.Errorf("tap: the no-responders answer does not start the server's data: %q", buf[:n])
				}
				p.held <- struct{}{}
				select {
				case <-p.release:
				case <-p.done:
					return
				}
			}
			c.wmu.Lock()
			_, werr := c.client.Write(buf[:n])
			c.wmu.Unlock()
			if werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// flush sends the client a PING and waits for its PONG: every publish the client made before is then in upstream().
func (c *tapConn) flush(t *testing.T) {
	t.Helper()
	c.mu.Lock()
	c.pings++
	c.mu.Unlock()
	c.wmu.Lock()
	_, err := c.client.Write([]byte("PING\r\n"))
	c.wmu.Unlock()
	if err != nil {
		t.Fatalf("tap: ping the client: %v", err)
	}
	select {
	case <-c.ponged:
	case <-time.After(5 * time.Second):
		t.Fatal("tap: no PONG from the client within 5s")
	}
}

// published reports whether the client published the event with this id on the connection.
func (c *tapConn) published(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Contains(c.up.Bytes(), []byte(jetstream.MsgIDHeader+": "+id+"\r\n"))
}

// natsNamedStream creates a stream capturing subjects on the shared server, deleted by the test's cleanup.
func natsNamedStream(t *testing.T, js jetstream.JetStream, cfg jetstream.StreamConfig) jetstream.Stream {
	t.Helper()
	cfg.Storage, cfg.Duplicates = jetstream.MemoryStorage, time.Minute
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.CreateStream(ctx, cfg)
	if err != nil {
		t.Fatalf("create stream %s: %v", cfg.Name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := js.DeleteStream(ctx, cfg.Name); err != nil {
			t.Errorf("delete stream %s: %v", cfg.Name, err)
		}
	})
	return s
}

// natsClient connects to the shared server for the test's own use (creating streams, reading them) and returns a
// prefix of subjects and stream names no other test uses.
func natsClient(t *testing.T) (jetstream.JetStream, *nats.Conn, string) {
	t.Helper()
	nc, err := nats.Connect(natsURL, nats.Timeout(5*time.Second))
	if err != nil {
		t.Fatalf("no NATS server on 127.0.0.1:4222 (start one with: nats-server -a 127.0.0.1 -p 4222 -js): %v", err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js, nc, "egtest" + strings.ReplaceAll(uuid.NewString(), "-", "")[:12]
}

// streamIDs returns the Nats-Msg-Id of every message of the stream, in stream order.
func streamIDs(t *testing.T, s jetstream.Stream) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for seq := info.State.FirstSeq; seq > 0 && seq <= info.State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.Header.Get(jetstream.MsgIDHeader))
	}
	return ids
}

// startHeldNATSSink starts the sink "js" with one event in its log, on the shared NATS server behind a tap that
// holds the "no responders" answer to it (no stream captures the subject yet); once the answer is held, it creates
// the stream. It returns the tap, the log, the running forwarder and the stream.
func startHeldNATSSink(t *testing.T) (*natsTap, *memLog, *running, jetstream.Stream) {
	t.Helper()
	js, _, prefix := natsClient(t)
	tap := newNATSTap(t)
	tap.holdNoResponders()

	log := newMemLog(t)
	log.add("sensor.reading", "hall", 1)
	sc := fastSink("js", TypeNATS)
	sc.AckTimeout = 5 * time.Second
	sc.NATS = &NATSConfig{URL: tap.url(), Subject: prefix + ".{subject}"}
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)

	select {
	case <-tap.held:
	case <-time.After(10 * time.Second):
		t.Fatal("no no-responders answer to the first event")
	}
	stream := natsNamedStream(t, js, jetstream.StreamConfig{Name: strings.ToUpper(prefix), Subjects: []string{prefix + ".>"}})
	return tap, log, r, stream
}

// TestNATSNoRespondersEndsConnection: a publish that no stream answers ("no responders") ends the connection at
// once, and the sink sends again from its cursor. The NATS client would otherwise publish the event again on
// its own 250 ms later, after the events the sink sent meanwhile: a stream created in between stores the
// device's events out of order. The tap holds the answer until the stream exists, so the client's own retry
// would succeed and no failure would ever show.
func TestNATSNoRespondersEndsConnection(t *testing.T) {
	tap, log, r, stream := startHeldNATSSink(t)
	tap.releaseHeld()
	waitForOrReport(t, 5*time.Second, "the no-responders answer to end the connection", func() bool {
		return strings.Contains(sinkHealth(r, "js").LastError, "no response from stream")
	})
	log.add("sensor.reading", "hall", 2)
	waitFor(t, 10*time.Second, "the cursor at 2", func() bool { return log.Cursor("sink:js") == 2 })
	if got := streamIDs(t, stream); strings.Join(got, ",") != "ev-000001,ev-000002" {
		t.Errorf("stream holds %v, want [ev-000001 ev-000002]", got)
	}
}

// TestNATSFirstEventGoesAlone: a connection's first event waits for its PubAck before the next goes. Here the
// stream appears while the first event's "no responders" answer is on its way: the second, sent at once, would
// be stored before the first, which the sink sends again only after reconnecting.
func TestNATSFirstEventGoesAlone(t *testing.T) {
	tap, log, r, stream := startHeldNATSSink(t)
	log.add("sensor.reading", "hall", 2)
	waitFor(t, 5*time.Second, "the sink to send event 2", func() bool {
		return testutil.ToFloat64(r.f.metrics.sent.WithLabelValues("js")) >= 2
	})
	first := tap.conn(0)
	first.flush(t) // whatever the client published until now has reached the server
	if first.published("ev-000002") {
		t.Error("event 2 was published before the connection's first event was acknowledged")
	}
	tap.releaseHeld()
	waitFor(t, 10*time.Second, "the cursor at 2", func() bool { return log.Cursor("sink:js") == 2 })
	if got := streamIDs(t, stream); strings.Join(got, ",") != "ev-000001,ev-000002" {
		t.Errorf("stream holds %v, want [ev-000001 ev-000002]: the device's events out of order", got)
	}
}

// TestNATSEventOverMaxPayloadDeadLettered: an event larger than the server's max_payload can never be published;
// it is dead-lettered (upstream_rejected) and the events after it go on, in order.
func TestNATSEventOverMaxPayloadDeadLettered(t *testing.T) {
	js, nc, prefix := natsClient(t)
	stream := natsNamedStream(t, js, jetstream.StreamConfig{Name: strings.ToUpper(prefix), Subjects: []string{prefix + ".>"}})
	log := newMemLog(t)
	log.add("sensor.reading", "hall", 1)
	big := log.addRaw("sensor.blob", "hall", bigEvent("ev-big", int(nc.MaxPayload())+1))
	log.add("sensor.reading", "hall", 3)

	sc := fastSink("js", TypeNATS)
	sc.NATS = &NATSConfig{URL: natsURL, Subject: prefix + ".{subject}"}
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitForOrReport(t, 10*time.Second, "the cursor past the oversized event", func() bool { return log.Cursor("sink:js") == 3 })
	checkRefusedEvent(t, r, big, "maximum payload exceeded")
	if got := streamIDs(t, stream); strings.Join(got, ",") != "ev-000001,ev-000003" {
		t.Errorf("stream holds %v, want [ev-000001 ev-000003]", got)
	}
}

// TestNATSEventOverStreamMaxMsgSizeDeadLettered: an event larger than the stream's max_msg_size is refused in
// its PubAck, on every connection; it is dead-lettered (upstream_rejected) and the sink moves on. The first
// event of the connection is the refused one: the events held behind it go once it is answered.
func TestNATSEventOverStreamMaxMsgSizeDeadLettered(t *testing.T) {
	js, _, prefix := natsClient(t)
	stream := natsNamedStream(t, js, jetstream.StreamConfig{Name: strings.ToUpper(prefix),
		Subjects: []string{prefix + ".>"}, MaxMsgSize: 4096})
	log := newMemLog(t)
	big := log.addRaw("sensor.blob", "hall", bigEvent("ev-big", 8192))
	log.add("sensor.reading", "hall", 2)
	log.add("sensor.reading", "hall", 3)

	sc := fastSink("js", TypeNATS)
	sc.NATS = &NATSConfig{URL: natsURL, Subject: prefix + ".{subject}"}
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitForOrReport(t, 10*time.Second, "the cursor past the oversized event", func() bool { return log.Cursor("sink:js") == 3 })
	checkRefusedEvent(t, r, big, "message size exceeds maximum")
	if got := streamIDs(t, stream); strings.Join(got, ",") != "ev-000002,ev-000003" {
		t.Errorf("stream holds %v, want [ev-000002 ev-000003]", got)
	}
	if n := testutil.ToFloat64(r.f.metrics.reconnects.WithLabelValues("js")); n != 0 {
		t.Errorf("%v reconnects: a refused event should not end the connection", n)
	}
}

// bigEvent is the structured JSON of a CloudEvent of at least size bytes.
func bigEvent(id string, size int) []byte {
	return []byte(`{"specversion":"1.0","id":"` + id + `","source":"edgegate/gw1/hall","type":"sensor.blob",` +
		`"subject":"hall","data":"` + strings.Repeat("x", size) + `"}`)
}

// checkRefusedEvent checks that the event at seq, and only it, was dead-lettered as refused by the upstream, and
// that the refusal is the sink's last error.
func checkRefusedEvent(t *testing.T, r *running, seq uint64, why string) {
	t.Helper()
	dl := r.dl.all()
	if len(dl) != 1 {
		t.Fatalf("%d dead letters, want 1 (the event at %d): %+v", len(dl), seq, dl)
	}
	if dl[0].reason != ReasonUpstreamRejected || dl[0].device != "hall" || !strings.Contains(dl[0].detail, why) ||
		!bytes.Contains(dl[0].payload, []byte(`"id":"ev-big"`)) {
		t.Errorf("dead letter = reason %s, device %s, detail %q; want %s for hall, the detail saying %q",
			dl[0].reason, dl[0].device, dl[0].detail, ReasonUpstreamRejected, why)
	}
	if h := sinkHealth(r, "js"); !strings.Contains(h.LastError, why) {
		t.Errorf("last error = %q, want the refusal", h.LastError)
	}
}
