package forward

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
)

// commandQueue bounds the cloud-to-device commands received and not yet delivered on one connection. When it
// is full the MQTT client stops reading (acknowledgements of our publishes wait too), so delivery must be quick.
const commandQueue = 64

// disconnectQuiesce is how long a DISCONNECT may take when a connection is dropped on purpose.
const disconnectQuiesce = 100 // milliseconds

// mqttTransport publishes events to an MQTT broker with QoS 1 and takes cloud-to-device commands from it.
//
// Every connection is a new paho client with an in-memory store, no automatic reconnect and no resume: paho
// never resends on its own, and a publish token can only complete without error by a PUBACK received on the
// connection that sent it. The session is persistent (clean session off) so commands published while the
// gateway is away wait at the broker.
type mqttTransport struct {
	cfg        MQTTConfig
	window     int
	ackTimeout time.Duration
	clientID   string
	topic      *template
	batch      int           // the most events in one message: 1, or batch_size in batch mode
	batchTopic string        // the topic of batches; "" unless in batch mode (the sink bounds a batch's bytes)
	cmd        *commandTopic // nil: no command subscription
	unsub      []string      // command filters an earlier configuration may have left in the session
	hold       time.Duration // how long a command waits for its device (commandHold)
	cmds       CommandSink
	dl         DeadLetterer
	tls        *tls.Config
	log        *slog.Logger
	where      string
	sinkName   string

	bg sync.WaitGroup // publishers of closed connections that are still inside paho's Publish
}

// mqttClientID is the client id of a sink that does not set one: stable, so its persistent session survives
// restarts.
func mqttClientID(gatewayID, sink string) string { return "edgegate-" + gatewayID + "-" + sink }

func newMQTTTransport(cfg SinkConfig, gatewayID string, cmds CommandSink, dl DeadLetterer, log *slog.Logger) (*mqttTransport, error) {
	mc := *cfg.MQTT
	t := &mqttTransport{
		cfg:        mc,
		window:     cfg.Window,
		ackTimeout: cfg.AckTimeout,
		clientID:   mc.ClientID,
		cmds:       cmds,
		dl:         dl,
		log:        log,
		where:      redactURL(mc.URL),
		sinkName:   cfg.Name,
		hold:       commandHold,
	}
	if t.clientID == "" {
		t.clientID = mqttClientID(gatewayID, cfg.Name)
	}
	topic, err := parseTemplate(mc.Topic, eventFields, mqttTopicCheck)
	if err != nil {
		return nil, fmt.Errorf("mqtt.topic: %w", err)
	}
	static := map[string]string{fieldGateway: mqttLevel(gatewayID), fieldSink: mqttLevel(cfg.Name)}
	t.topic = topic.bind(static)
	t.batch = 1
	if mc.Mode == ModeBatch {
		bt, err := parseTemplate(mc.BatchTopic, batchFields, mqttTopicCheck)
		if err != nil {
			return nil, fmt.Errorf("mqtt.batch_topic: %w", err)
		}
		t.batch = cfg.BatchSize
		t.batchTopic = bt.bind(static).render(func(string) string { return "" })
	}
	if cmds != nil && !mc.DisableCommands {
		if t.cmd, err = parseCommandTopic(mc.CommandTopic); err != nil {
			return nil, fmt.Errorf("mqtt.command_topic: %w", err)
		}
		t.cmd.bind(gatewayID, cfg.Name)
	}
	if cmds != nil {
		t.unsub = staleCommandFilters(t.cmd, mc.CommandTopic, gatewayID, cfg.Name)
	}
	if t.tls, err = tlsConfig(mc.TLS, log); err != nil {
		return nil, fmt.Errorf("mqtt.%w", err)
	}
	return t, nil
}

func (t *mqttTransport) unitSize() int  { return t.batch }
func (t *mqttTransport) target() string { return t.where }
func (t *mqttTransport) wait()          { t.bg.Wait() }
func (t *mqttTransport) dialReaches() bool {
	return true // CONNACK
}

func (t *mqttTransport) dial(ctx context.Context, gen uint64) (conn, error) {
	c := &mqttConn{
		t:     t,
		gen:   gen,
		out:   make(chan outcome, t.window),
		sendq: make(chan []Record, t.window),
		pend:  make(chan mqttPending, t.window),
		cmdq:  make(chan paho.Message, commandQueue),
		loss:  loss{ch: make(chan struct{})},
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	opts := paho.NewClientOptions().
		AddBroker(t.cfg.URL).
		SetClientID(t.clientID).
		SetUsername(t.cfg.Username).
		SetPassword(string(t.cfg.Password)).
		SetProtocolVersion(4).
		SetCleanSession(false).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetResumeSubs(false).
		SetStore(discardStore{}).
		SetOrderMatters(true).
		SetAutoAckDisabled(true).
		SetKeepAlive(t.cfg.KeepAlive).
		SetPingTimeout(min(t.cfg.KeepAlive, 10*time.Second)).
		SetConnectTimeout(t.cfg.ConnectTimeout).
		SetWriteTimeout(t.ackTimeout).
		SetDefaultPublishHandler(c.onMessage).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			c.markLost(fmt.Errorf("forward: mqtt connection to %s lost: %w", t.where, err))
		})
	if t.tls != nil {
		opts.SetTLSConfig(t.tls)
	}
	if u, err := url.Parse(t.cfg.URL); err == nil {
		if open := gatheredDialer(u.Scheme); open != nil {
			opts.SetCustomOpenConnectionFn(open)
		}
	}
	cl := paho.NewClient(opts)
	tok := cl.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		<-tok.Done() // bounded by connect_timeout
		cl.Disconnect(0)
		c.cancel()
		return nil, ctx.Err()
	}
	if err := tok.Error(); err != nil {
		c.cancel()
		return nil, fmt.Errorf("forward: mqtt connect to %s: %w", t.where, err)
	}
	c.cl = cl
	c.wg.Add(2)
	go c.waitAcks()
	go c.deliverCommands()
	// The publisher is waited for by the transport, not by close: a Publish that began just before the
	// connection broke blocks in paho until the write timeout, and the next connection should not wait for it.
	t.bg.Add(1)
	go c.publish()
	if ct, ok := tok.(*paho.ConnectToken); ok {
		t.log.Debug("mqtt session", "client_id", t.clientID, "session_present", ct.SessionPresent())
	}
	if t.cmd != nil {
		st := cl.Subscribe(t.cmd.filter, 1, c.onMessage)
		if err := c.await(ctx, st, "subscribe "+t.cmd.filter); err != nil {
			return nil, err
		}
		if sub, ok := st.(*paho.SubscribeToken); ok && sub.Result()[t.cmd.filter] == 0x80 {
			// Events still go up; only commands are missing. Refusing to forward over it would be worse.
			t.log.Warn("the broker refused the command subscription; cloud-to-device commands are not received",
				"filter", t.cmd.filter)
		}
	}
	if len(t.unsub) > 0 {
		// The session is persistent: a subscription of an earlier configuration would still bring commands.
		if err := c.await(ctx, cl.Unsubscribe(t.unsub...), fmt.Sprintf("unsubscribe %v", t.unsub)); err != nil {
			return nil, err
		}
		t.log.Debug("earlier command subscriptions removed", "filters", t.unsub)
	}
	return c, nil
}

// mqttConn is one paho client, used for one connection only.
type mqttConn struct {
	t      *mqttTransport
	gen    uint64
	cl     paho.Client
	ctx    context.Context // ends when the connection is closed
	cancel context.CancelFunc
	wg     sync.WaitGroup

	out   chan outcome
	sendq chan []Record
	pend  chan mqttPending
	cmdq  chan paho.Message

	loss
	closeOnce sync.Once
	offLogged bool // a command left at the broker because commands are disabled was logged (deliverCommands)
}

// await waits for a subscribe or unsubscribe token of a connection being set up, for at most the ack timeout;
// on failure it closes the connection.
func (c *mqttConn) await(ctx context.Context, tok paho.Token, what string) error {
	timer := time.NewTimer(c.t.ackTimeout)
	defer timer.Stop()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		c.close()
		return ctx.Err()
	case <-timer.C:
		c.close()
		return fmt.Errorf("forward: mqtt %s: no acknowledgement within %s", what, c.t.ackTimeout)
	}
	if err := tok.Error(); err != nil {
		c.close()
		return fmt.Errorf("forward: mqtt %s: %w", what, err)
	}
	return nil
}

// staleCommandFilters returns the command filters to remove from the sink's persistent session: the default
// one unless the sink subscribes to exactly it, and, with commands disabled, the configured one. (A filter of an
// earlier command_topic that was neither is not known here; see the package documentation.)
func staleCommandFilters(cur *commandTopic, configured, gatewayID, sink string) []string {
	tmpls := []string{DefaultCommandTopic}
	if cur == nil {
		tmpls = append(tmpls, configured)
	}
	var out []string
	for _, tmpl := range tmpls {
		ct, err := parseCommandTopic(tmpl)
		if err != nil {
			continue
		}
		ct.bind(gatewayID, sink)
		if (cur != nil && ct.filter == cur.filter) || slices.Contains(out, ct.filter) {
			continue
		}
		out = append(out, ct.filter)
	}
	return out
}

type mqttPending struct {
	tok  paho.Token
	last uint64
}

func (c *mqttConn) send(recs []Record) error {
	select {
	case c.sendq <- recs:
		return nil
	default:
		return errors.New("forward: mqtt: more events in flight than the window")
	}
}

// publish hands the queued events to paho in order. paho's Publish can block (until the write timeout) when
// the connection breaks under it, so it runs here and not on the sink's goroutine.
func (c *mqttConn) publish() {
	defer c.t.bg.Done()
	for {
		select {
		case <-c.ctx.Done():
			return
		case u := <-c.sendq:
			var tok paho.Token
			if c.t.batchTopic != "" {
				tok = c.cl.Publish(c.t.batchTopic, 1, false, batchPayload(u))
			} else {
				tok = c.cl.Publish(c.t.topic.event(u[0].Subject, u[0].Type, mqttLevel), 1, false, u[0].Data)
			}
			select {
			case c.pend <- mqttPending{tok: tok, last: u[len(u)-1].Seq}:
			default: // cannot happen: no more than a window is sent
			}
		}
	}
}

// discardStore is paho's message store for a client that is used for one connection only: paho keeps every
// QoS 1 message there until its PUBACK, to send it again on a reconnect, which such a client never makes (the
// sink resends from its cursor on a new client). Keeping nothing saves a map insert and delete per event.
type discardStore struct{}

func (discardStore) Open()                             {}
func (discardStore) Put(string, packets.ControlPacket) {}
func (discardStore) Get(string) packets.ControlPacket  { return nil }
func (discardStore) All() []string                     { return nil }
func (discardStore) Del(string)                        {}
func (discardStore) Close()                            {}
func (discardStore) Reset()                            {}

// batchPayload is the JSON array of the events of u (each stored as a CloudEvent's JSON).
func batchPayload(u []Record) []byte {
	n := 1 + len(u)
	for _, r := range u {
		n += len(r.Data)
	}
	b := make([]byte, 0, n)
	b = append(b, '[')
	for i, r := range u {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, r.Data...)
	}
	return append(b, ']')
}

func (c *mqttConn) outcomes() <-chan outcome { return c.out }

func (c *mqttConn) close() {
	c.closeOnce.Do(func() {
		c.cancel()
		c.markLost(errors.New("forward: mqtt connection closed"))
		c.cl.Disconnect(disconnectQuiesce)
		c.wg.Wait()
	})
}

// waitAcks turns completed publish tokens into outcomes, in publish order. Tokens that never complete (paho
// leaves them open when a persistent-session connection is lost) are abandoned when the connection closes.
func (c *mqttConn) waitAcks() {
	defer c.wg.Done()
	for {
		select {
		case <-c.ctx.Done():
			return
		case p := <-c.pend:
			select {
			case <-c.ctx.Done():
				return
			case <-p.tok.Done():
				o := outcome{gen: c.gen, last: p.last}
				if err := p.tok.Error(); err != nil {
					o.err = fmt.Errorf("forward: mqtt publish to %s: %w", c.t.where, err)
				}
				c.out <- o // room for a window of outcomes
			}
		}
	}
}

// redactURL drops the password from a URL for logs and health.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable url)"
	}
	return u.Redacted()
}
