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

// natsTransport publishes events to NATS JetStream asynchronously, a window at a time, and counts an event
// carried only on its PubAck. The CloudEvent id goes in Nats-Msg-Id, so the stream stores an event sent twice
// (after a reconnect) once, within its duplicate window.
//
// The NATS client's own reconnect and buffering are off: like the other transports, a failed connection is
// replaced by a new one and the events not acknowledged are sent again from the cursor.
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
}

type natsPending struct {
	f    jetstream.PubAckFuture
	last uint64
}

func (c *natsConn) send(recs []Record) error {
	r := recs[0]
	m := nats.NewMsg(c.t.subject.event(r.Subject, r.Type, natsTokens))
	m.Data = r.Data
	m.Header.Set("Content-Type", "application/cloudevents+json")
	if id, err := eventID(r.Data); err == nil && id != "" {
		m.Header.Set(jetstream.MsgIDHeader, id)
	}
	var opts []jetstream.PublishOpt
	if c.t.cfg.Stream != "" {
		opts = append(opts, jetstream.WithExpectStream(c.t.cfg.Stream))
	}
	f, err := c.js.PublishMsgAsync(m, opts...)
	if err != nil {
		return fmt.Errorf("forward: nats publish to %s: %w", c.t.where, err)
	}
	select {
	case c.pend <- natsPending{f: f, last: r.Seq}:
		return nil
	default:
		return errors.New("forward: nats: more events in flight than the window")
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
			select {
			case <-c.ctx.Done():
				return
			case <-p.f.Ok():
			case err := <-p.f.Err():
				o.err = fmt.Errorf("forward: nats publish to %s: %w", c.t.where, err)
			}
			c.out <- o
		}
	}
}
