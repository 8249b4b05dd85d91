package forward

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// natsPingsOut is how many pings may go unanswered: at the next ping after them the connection is dropped.
const natsPingsOut = 2

// natsTransport publishes events to NATS JetStream asynchronously, a window at a time, and counts an event
// carried only on its PubAck. The CloudEvent id goes in Nats-Msg-Id, so the stream stores an event sent twice
// (after a reconnect) once, within its duplicate window.
//
// The NATS client's own reconnect, buffering and publish retries are off: like the other transports, a failed
// connection (or publish) is replaced by a new connection and the events not acknowledged are sent again from the
// cursor, in order. An event the server or the stream can never take for its size is refused instead: the sink
// dead-letters it and goes on.
type natsTransport struct {
	cfg        NATSConfig
	window     int
	ackTimeout time.Duration
	name       string
	subject    *template
	tls        *tls.Config
	log        *slog.Logger
	where      string
}

func newNATSTransport(cfg SinkConfig, gatewayID string, log *slog.Logger) (*natsTransport, error) {
	nc := *cfg.NATS
	t := &natsTransport{
		cfg:        nc,
		window:     cfg.Window,
		ackTimeout: cfg.AckTimeout,
		name:       "edgegate-" + gatewayID + "-" + cfg.Name,
		log:        log,
	}
	var where []string
	for u := range strings.SplitSeq(nc.URL, ",") {
		where = append(where, redactURL(strings.TrimSpace(u)))
	}
	t.where = strings.Join(where, ",")
	subj, err := parseTemplate(nc.Subject, eventFields, natsSubjectCheck)
	if err != nil {
		return nil, fmt.Errorf("nats.subject: %w", err)
	}
	t.subject = subj.bind(map[string]string{fieldGateway: natsTokens(gatewayID), fieldSink: natsTokens(cfg.Name)})
	if t.tls, err = tlsConfig(nc.TLS, log); err != nil {
		return nil, fmt.Errorf("nats.%w", err)
	}
	return t, nil
}

func (t *natsTransport) unitSize() int  { return 1 }
func (t *natsTransport) target() string { return t.where }
func (t *natsTransport) wait()          {}
func (t *natsTransport) dialReaches() bool {
	return true // the server's INFO and PONG
}

func (t *natsTransport) dial(ctx context.Context, gen uint64) (conn, error) {
	c := &natsConn{
		t:    t,
		gen:  gen,
		out:  make(chan outcome, t.window),
		pend: make(chan natsPending, t.window),
		loss: loss{ch: make(chan struct{})},
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	opts := []nats.Option{
		nats.Name(t.name),
		nats.NoReconnect(),
		nats.Timeout(t.cfg.ConnectTimeout),
		// An idle connection that died (a NAT entry expired, a cable pulled) is found by the pings alone: with
		// nats.go's defaults (every 2 minutes, two outstanding) it looked connected for up to 6 minutes.
		nats.PingInterval(t.cfg.KeepAlive / 2),
		nats.MaxPingsOutstanding(natsPingsOut),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err == nil {
				err = errors.New("disconnected")
			}
			c.markLost(fmt.Errorf("forward: nats connection to %s lost: %w", t.where, err))
		}),
		nats.ClosedHandler(func(*nats.Conn) {
			c.markLost(fmt.Errorf("forward: nats connection to %s closed", t.where))
		}),
	}
	if t.cfg.Username != "" {
		opts = append(opts, nats.UserInfo(t.cfg.Username, string(t.cfg.Password)))
	}
	if t.cfg.Token != "" {
		opts = append(opts, nats.Token(string(t.cfg.Token)))
	}
	if t.cfg.CredsFile != "" {
		opts = append(opts, nats.UserCredentials(t.cfg.CredsFile))
	}
	if t.tls != nil {
		opts = append(opts, nats.Secure(t.tls))
	}
	if err := ctx.Err(); err != nil {
		c.cancel()
		return nil, err
	}
	nc, err := nats.Connect(t.cfg.URL, opts...) // bounded by connect_timeout
	if err != nil {
		c.cancel()
		return nil, fmt.Errorf("forward: nats connect to %s: %w", t.where, err)
	}
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(t.window))
	if err != nil {
		nc.Close()
		c.cancel()
		return nil, fmt.Errorf("forward: nats jetstream: %w", err)
	}
	c.nc, c.js = nc, js
	c.wg.Add(1)
	go c.waitAcks()
	return c, nil
}

// natsConn is one NATS connection, used once.
type natsConn struct {
	t      *natsTransport
	gen    uint64
	nc     *nats.Conn
	js     jetstream.JetStream
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	out  chan outcome
	pend chan natsPending

	loss
	closeOnce sync.Once

	// The connection's first event goes alone: until the stream acknowledges one, the others wait (held). While
	// no stream captures the subject, the first is answered "no responders"; were the next events already out,
	// one could reach a stream created meanwhile before the first, which the sink sends again only after them.
	mu        sync.Mutex
	confirmed bool     // a PubAck arrived on this connection
	probing   bool     // an event was published before any PubAck and waits for its answer
	held      []Record // events waiting for the probe's answer, in log order
}

type natsPending struct {
	f    jetstream.PubAckFuture // nil when refused before it was sent (refused)
	last uint64
	// refused is why the event was refused for good without a PubAck to wait for (too large to publish).
	refused error
}

// send publishes one event, or holds it while the connection's first event waits for its answer (see answered).
func (c *natsConn) send(recs []Record) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.probing {
		c.held = append(c.held, recs[0])
		return nil
	}
	return c.publishLocked(recs[0])
}

// publishLocked publishes r and queues its outcome; c.mu is held. Until a PubAck arrives on the connection, the
// event published is the probe: the next events are held until it is answered (see answered).
func (c *natsConn) publishLocked(r Record) error {
	select {
	case <-c.lost():
		return c.cause()
	default:
	}
	m := nats.NewMsg(c.t.subject.event(r.Subject, r.Type, natsTokens))
	m.Data = r.Data
	m.Header.Set("Content-Type", "application/cloudevents+json")
	if id, err := eventID(r.Data); err == nil && id != "" {
		m.Header.Set(jetstream.MsgIDHeader, id)
	}
	// No retries by the client: on "no responders" it would publish the event again 250 ms later on its own,
	// after the events sent meanwhile, and the stream would store a device's events out of order. An error ends
	// the connection instead, and the sink sends again, in order, from its cursor.
	opts := []jetstream.PublishOpt{jetstream.WithRetryAttempts(0)}
	if c.t.cfg.Stream != "" {
		opts = append(opts, jetstream.WithExpectStream(c.t.cfg.Stream))
	}
	p := natsPending{last: r.Seq}
	f, err := c.js.PublishMsgAsync(m, opts...)
	switch {
	case errors.Is(err, nats.ErrMaxPayload):
		// Larger than the server's max_payload: the client refuses it before sending, whatever the connection.
		p.refused = fmt.Errorf("forward: nats publish to %s: %d bytes: %w", c.t.where, len(r.Data), err)
	case err != nil:
		return fmt.Errorf("forward: nats publish to %s: %w", c.t.where, err)
	default:
		p.f = f
		c.probing = !c.confirmed
	}
	select {
	case c.pend <- p:
		return nil
	default:
		return errors.New("forward: nats: more events in flight than the window")
	}
}

// answered records the answer to a published event: a PubAck confirms the connection and publishes the events
// held meanwhile; a refusal makes the next held event the probe.
func (c *natsConn) answered(acked bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.confirmed || !c.probing {
		return
	}
	c.probing = false
	c.confirmed = acked
	for len(c.held) > 0 && !c.probing {
		r := c.held[0]
		c.held = c.held[1:]
		if err := c.publishLocked(r); err != nil {
			c.markLost(err)
			return
		}
	}
}

func (c *natsConn) outcomes() <-chan outcome { return c.out }

func (c *natsConn) close() {
	c.closeOnce.Do(func() {
		c.cancel()
		c.markLost(errors.New("forward: nats connection closed"))
		c.nc.Close()
		c.wg.Wait()
	})
}

// waitAcks turns PubAcks (or their errors) into outcomes, in publish order.
func (c *natsConn) waitAcks() {
	defer c.wg.Done()
	for {
		select {
		case <-c.ctx.Done():
			return
		case p := <-c.pend:
			o := outcome{gen: c.gen, last: p.last}
			if p.refused != nil {
				o.err, o.reject = p.refused, true
				c.out <- o
				continue
			}
			select {
			case <-c.ctx.Done():
				return
			case <-p.f.Ok():
			case err := <-p.f.Err():
				o.err = fmt.Errorf("forward: nats publish to %s: %w", c.t.where, err)
				o.reject = refusedForGood(err)
			}
			if o.err != nil && !o.reject {
				// The connection ends (settle): nothing more is published on it, held events included, so
				// that none of them reaches the stream before this one, which the sink sends again first.
				c.markLost(o.err)
				c.out <- o
				continue
			}
			c.out <- o
			c.answered(o.err == nil)
		}
	}
}

// refusedForGood reports whether a PubAck error refuses the event itself, whatever the connection: it is larger
// than the stream takes (max_msg_size), or its headers are. The sink dead-letters such an event and moves on.
func refusedForGood(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	switch apiErr.ErrorCode {
	case jetstream.JSErrCodeStreamMessageExceedsMaximum, jsErrCodeStreamHeaderExceedsMaximum:
		return true
	}
	return false
}

// jsErrCodeStreamHeaderExceedsMaximum is the server's JSStreamHeaderExceedsMaximumErr ("header size exceeds
// maximum allowed of 64k"), which the client library has no name for.
const jsErrCodeStreamHeaderExceedsMaximum jetstream.ErrorCode = 10097
