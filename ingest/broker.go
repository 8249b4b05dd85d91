package ingest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
)

// ErrFull is returned by a Consumer that cannot take an event now (back-pressure). The device gets no PUBACK
// on MQTT 3.1.1 and PUBACK reason 0x97 (quota exceeded) on MQTT 5, and retries later.
var ErrFull = errors.New("ingest: consumer full")

// ErrNotConnected is returned by Command when the device has no live connection.
var ErrNotConnected = errors.New("ingest: device not connected")

// ErrNotSubscribed is returned by Command when the device is connected but none of its connections subscribes to
// the command's topic (it has just connected and not subscribed yet): the command would reach no one. It wraps
// ErrNotConnected, as the device cannot take the command yet either way.
var ErrNotSubscribed = fmt.Errorf("%w: no subscription to its command topic", ErrNotConnected)

// ErrNotAcknowledged is returned by Command when the device did not acknowledge the command in time.
var ErrNotAcknowledged = errors.New("ingest: command not acknowledged")

// Consumer takes each normalized event. With durable set (QoS 1 and 2) it returns only once the event is durably
// stored, and the device's acknowledgement waits for it; without, it returns once the event is queued.
type Consumer interface {
	Consume(ctx context.Context, r Result, durable bool) error
}

// Authenticator checks device credentials.
type Authenticator interface {
	Authenticate(id string, password []byte) bool
	DeviceForCN(cn string) (string, bool)
}

// Authorizer decides what a device may publish and subscribe to.
type Authorizer interface {
	CanPublish(id, topic string) bool
	CanSubscribe(id, filter string) bool
}

// DeadLetterer keeps what could not become an event, with its original bytes.
type DeadLetterer interface {
	DeadLetter(reason, detail, device, topic string, payload []byte)
}

// Deps are the parts the broker works with.
type Deps struct {
	Normalizer  *Normalizer
	Auth        Authenticator
	ACL         Authorizer
	Consumer    Consumer
	DeadLetters DeadLetterer
}

// Broker is the embedded MQTT broker.
type Broker struct {
	cfg    BrokerConfig
	deps   Deps
	log    *slog.Logger
	m      *metrics
	srv    *mqtt.Server
	guard  *guard
	hook   *hook
	addrs  map[string]string
	ctx    atomic.Pointer[context.Context]
	closed atomic.Bool
	tls    atomic.Pointer[tls.Config] // the TLS listener's certificate and client CAs, replaced by ReloadTLS
}

// NewBroker validates the configuration and binds every listener; it starts nothing. A port that is already in
// use is reported with the config key to change.
func NewBroker(cfg BrokerConfig, deps Deps, logger *slog.Logger, reg prometheus.Registerer) (*Broker, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if deps.Normalizer == nil || deps.Auth == nil || deps.ACL == nil || deps.Consumer == nil || deps.DeadLetters == nil {
		return nil, errors.New("ingest: new broker: every dependency is required")
	}
	log := logger.With("component", "ingest")
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("ingest: metrics: %w", err)
	}
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = uint32(cfg.MaxPacketBytes)
	caps.MaximumClients = math.MaxInt64 // enforced by the listeners, before CONNECT is read
	caps.MaximumSessionExpiryInterval = uint32(cfg.SessionExpiry / time.Second)
	caps.MaximumMessageExpiryInterval = int64(cfg.SessionExpiry / time.Second)
	caps.MaximumInflight = 1024
	caps.MaximumClientWritesPending = 1024
	// No topic aliases from clients. Each one keeps its topic (up to 64 KiB) for the connection's life, so mochi's
	// default maximum of 65535 let one MQTT 5 device hold gigabytes. mochi announces no Topic Alias Maximum in its
	// CONNACK, which MQTT 5 reads as 0: a client that sends an alias anyway is disconnected (protocol error).
	caps.TopicAliasMaximum = 0
	caps.Compatibilities.ObscureNotAuthorized = false
	srv := mqtt.New(&mqtt.Options{
		Capabilities:           caps,
		InlineClient:           true,
		Logger:                 slog.New(filterHandler{log.With("subcomponent", "mochi").Handler()}),
		SysTopicResendInterval: 10,
	})
	b := &Broker{cfg: cfg, deps: deps, log: log, m: m, srv: srv, addrs: map[string]string{}}
	bg := context.Background()
	b.ctx.Store(&bg)
	b.guard = newGuard(cfg, log, m)
	b.hook = newHook(b)
	b.guard.onAbandon = b.hook.abandon
	b.guard.disconnect = b.disconnectListener
	if err := srv.AddHook(b.hook, nil); err != nil {
		return nil, fmt.Errorf("ingest: add hook: %w", err)
	}

	var bound []listeners.Listener
	fail := func(err error) (*Broker, error) {
		for _, l := range bound {
			l.Close(func(string) {})
		}
		return nil, err
	}
	if !listenerOff(cfg.Listen) {
		ln, err := bind("mqtt.listen", cfg.Listen)
		if err != nil {
			return fail(err)
		}
		bound = append(bound, &tcpListener{id: "tcp", proto: "tcp", ln: ln, g: b.guard})
	}
	if !listenerOff(cfg.TLS.Listen) {
		tc, err := serverTLS(cfg.TLS)
		if err != nil {
			return fail(err)
		}
		b.tls.Store(tc)
		ln, err := bind("mqtt.tls.listen", cfg.TLS.Listen)
		if err != nil {
			return fail(err)
		}
		// Each handshake takes the configuration in force, so that ReloadTLS applies to the next connection.
		current := &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return b.tls.Load(), nil }}
		bound = append(bound, &tcpListener{id: "tls", proto: "tls", ln: tls.NewListener(ln, current), g: b.guard})
	}
	if !listenerOff(cfg.WebSocket) {
		ln, err := bind("mqtt.websocket", cfg.WebSocket)
		if err != nil {
			return fail(err)
		}
		bound = append(bound, &wsListener{id: "ws", ln: ln, g: b.guard, maxBytes: int64(cfg.MaxPacketBytes) + 16})
	}
	for _, l := range bound {
		if err := srv.AddListener(l); err != nil {
			return fail(fmt.Errorf("ingest: add listener %s: %w", l.ID(), err))
		}
		b.addrs[l.ID()] = l.Address()
	}
	if b.tls.Load() != nil {
		expiry := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "edgegate_ingest_tls_cert_expiry_timestamp_seconds",
			Help: "When the certificate of the MQTT TLS listener expires (Unix time); SIGHUP loads a renewed one."}, b.certExpiry)
		if err := reg.Register(expiry); err != nil {
			return fail(fmt.Errorf("ingest: metrics: %w", err))
		}
	}
	return b, nil
}

func serverTLS(c TLSConfig) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("ingest: mqtt.tls: load certificate: %w", err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if c.ClientCAFile != "" {
		pem, err := os.ReadFile(c.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("ingest: mqtt.tls.client_ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ingest: mqtt.tls.client_ca_file: %s holds no PEM certificate", c.ClientCAFile)
		}
		tc.ClientCAs = pool
		tc.ClientAuth = tls.VerifyClientCertIfGiven
		if c.RequireClientCert {
			tc.ClientAuth = tls.RequireAndVerifyClientCert
		}
	}
	return tc, nil
}

// ReloadTLS reads the TLS listener's certificate, key and client CAs again (after a renewal): new connections get
// them, open ones keep theirs. If they do not load, the previous ones stay in use and the error says why. Without a
// TLS listener it does nothing. It returns when the new certificate expires.
func (b *Broker) ReloadTLS() (notAfter time.Time, err error) {
	if b.tls.Load() == nil {
		return time.Time{}, nil
	}
	tc, err := serverTLS(b.cfg.TLS)
	if err != nil {
		return time.Time{}, fmt.Errorf("%w (the previous certificate stays in use)", err)
	}
	b.tls.Store(tc)
	return leafOf(tc).NotAfter, nil
}

// leafOf is the parsed server certificate of a configuration made by serverTLS.
func leafOf(tc *tls.Config) *x509.Certificate {
	if leaf := tc.Certificates[0].Leaf; leaf != nil {
		return leaf
	}
	leaf, err := x509.ParseCertificate(tc.Certificates[0].Certificate[0])
	if err != nil { // not reached: tls.LoadX509KeyPair parsed it
		return &x509.Certificate{}
	}
	return leaf
}

// certExpiry is when the TLS listener's certificate expires, in Unix seconds.
func (b *Broker) certExpiry() float64 {
	if tc := b.tls.Load(); tc != nil {
		return float64(leafOf(tc).NotAfter.Unix())
	}
	return 0
}

// Addr returns the bound address of a listener ("tcp", "tls" or "ws"), or "" if it is not enabled.
func (b *Broker) Addr(listener string) string { return b.addrs[listener] }

// Run serves devices until ctx ends, then disconnects every client and waits (bounded) for their connections to
// finish.
func (b *Broker) Run(ctx context.Context) error {
	b.ctx.Store(&ctx)
	if b.cfg.AllowAnonymous {
		b.log.Warn("anonymous clients are allowed (mqtt.allow_anonymous: true): for development only")
	}
	if err := b.srv.Serve(); err != nil {
		return fmt.Errorf("ingest: serve: %w", err)
	}
	for id, a := range b.addrs {
		b.log.Info("mqtt listener ready", "listener", id, "addr", a)
	}
	<-ctx.Done()
	b.closed.Store(true)
	// mochi's Close would wait for connections that never sent CONNECT until their deadline.
	b.guard.closePending(5 * time.Second)
	_ = b.srv.Close()
	done := make(chan struct{})
	go func() { b.guard.wg.Wait(); b.hook.ackers.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		b.log.Warn("some connections did not close within 10s")
	}
	b.log.Info("mqtt broker stopped")
	return nil
}

// disconnectListener ends the sessions of the clients connected through the listener id, as mochi's Server.Close
// does for each listener, with reason "server shutting down". mochi's own way (Clients.GetByListener) takes the
// clients' read lock twice; a client that connects or disconnects between the two deadlocks the shutdown for good
// (mochi-mqtt/server#488). This takes it once.
func (b *Broker) disconnectListener(id string) {
	for _, cl := range b.srv.Clients.GetAll() {
		if cl.Net.Listener == id && !cl.Closed() {
			_ = b.srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
}

// Command publishes a command to a device's command topic with QoS 1 and returns once one of the device's
// connections acknowledged it. It returns ErrNotConnected when the device has no connection (ErrNotSubscribed,
// which wraps it, when none of its connections subscribed to the command's topic) and ErrNotAcknowledged when no
// acknowledgement arrives within the configured command timeout.
func (b *Broker) Command(ctx context.Context, device, command string, payload []byte) error {
	wait, err := b.SendCommand(device, command, payload)
	if err != nil {
		return err
	}
	return wait(ctx)
}

// SendCommand publishes a command as Command does and returns at once: wait returns once one of the device's
// connections acknowledged it (nil), after command_timeout (ErrNotAcknowledged) or when ctx ends. wait must be
// called exactly once: it also releases what the command holds.
func (b *Broker) SendCommand(device, command string, payload []byte) (wait func(context.Context) error, err error) {
	if strings.ContainsAny(device, "+#/") || device == "" || strings.ContainsAny(command, "+#") || command == "" {
		return nil, fmt.Errorf("ingest: command %q to %q: invalid device or command name", command, device)
	}
	topic := commandTopic(b.cfg.CommandTopic, device, command)
	w, err := b.hook.expectAck(device, topic, b.srv.Topics.Subscribers(topic))
	if err != nil {
		switch {
		case errors.Is(err, ErrNotSubscribed):
			b.m.commands.WithLabelValues("not_subscribed").Inc()
		case errors.Is(err, ErrNotConnected):
			b.m.commands.WithLabelValues("not_connected").Inc()
		}
		return nil, fmt.Errorf("ingest: command %s to %s: %w", command, device, err)
	}
	sent := time.Now()
	if err := b.srv.Publish(topic, payload, false, 1); err != nil {
		b.hook.dropWaiter(device, w)
		return nil, fmt.Errorf("ingest: command %s to %s: publish: %w", command, device, err)
	}
	return func(ctx context.Context) error {
		defer b.hook.dropWaiter(device, w)
		// An acknowledgement that came already counts, however late the wait starts (the timer below may have
		// fired by then, and select would pick either).
		select {
		case <-w.done:
			b.m.commands.WithLabelValues("acked").Inc()
			return nil
		default:
		}
		t := time.NewTimer(b.cfg.CommandTimeout - time.Since(sent))
		defer t.Stop()
		select {
		case <-w.done:
			b.m.commands.WithLabelValues("acked").Inc()
			return nil
		case <-t.C:
			b.m.commands.WithLabelValues("timeout").Inc()
			return fmt.Errorf("ingest: command %s to %s: %w within %s", command, device, ErrNotAcknowledged, b.cfg.CommandTimeout)
		case <-ctx.Done():
			b.m.commands.WithLabelValues("abandoned").Inc() // the sender's own deadline, or the gateway stopping
			return fmt.Errorf("ingest: command %s to %s: %w", command, device, ctx.Err())
		}
	}, nil
}

// Publish sends a message to local subscribers as the gateway itself (not normalized, not ACL-checked).
func (b *Broker) Publish(topic string, payload []byte, retain bool, qos byte) error {
	if err := b.srv.Publish(topic, payload, retain, qos); err != nil {
		return fmt.Errorf("ingest: publish %s: %w", topic, err)
	}
	return nil
}

// Connected reports whether the device has at least one live connection (session established). It turns true
// before the device's device.connected event is handed to the consumer, and false before its device.disconnected.
func (b *Broker) Connected(device string) bool { return b.hook.connected(device) }

// Revoke closes every connection of the device and forgets its stored sessions: call it when the device left the
// registry, or its credentials or grants changed. The device reconnects under its new entry, if it has one. It
// returns how many connections it closed.
func (b *Broker) Revoke(device string) int { return b.hook.revoke(device) }

// Clients returns the number of connected clients.
func (b *Broker) Clients() int { return int(b.guard.open.Load()) }

// filterHandler demotes mochi's per-packet warnings to debug: a misbehaving device must not flood the log.
type filterHandler struct{ slog.Handler }

func (h filterHandler) Enabled(ctx context.Context, l slog.Level) bool {
	if l < slog.LevelError {
		l = slog.LevelDebug
	}
	return h.Handler.Enabled(ctx, l)
}

func (h filterHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level < slog.LevelError {
		r.Level = slog.LevelDebug
	}
	return h.Handler.Handle(ctx, r)
}

func (h filterHandler) WithAttrs(a []slog.Attr) slog.Handler {
	return filterHandler{h.Handler.WithAttrs(a)}
}

func (h filterHandler) WithGroup(n string) slog.Handler { return filterHandler{h.Handler.WithGroup(n)} }

type metrics struct {
	connections     prometheus.Gauge
	refused         *prometheus.CounterVec
	closed          *prometheus.CounterVec
	sessionsDropped prometheus.Counter
	panics          prometheus.Counter
	authFail        *prometheus.CounterVec
	aclDenied       *prometheus.CounterVec
	messagesIn      *prometheus.CounterVec
	events          prometheus.Counter
	deadLetters     *prometheus.CounterVec
	rateLimited     *prometheus.CounterVec
	rejected        *prometheus.CounterVec
	normalize       prometheus.Histogram
	commands        *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		connections: prometheus.NewGauge(prometheus.GaugeOpts{Name: "edgegate_ingest_connections", Help: "Open MQTT connections."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_ingest_connections_refused_total",
			Help: "Connections refused before CONNECT, by reason."}, []string{"reason"}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_ingest_connections_closed_total",
			Help: "Connections closed on the client's fault, by reason: malformed (a packet breaking the protocol), " +
				"too_large (over mqtt.max_packet_bytes), timeout (no CONNECT within mqtt.connect_timeout, keep-alive expired)."},
			[]string{"reason"}),
		sessionsDropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "edgegate_ingest_sessions_dropped_total",
			Help: "Stored sessions of disconnected clients dropped because their device kept too many."}),
		panics: prometheus.NewCounter(prometheus.CounterOpts{Name: "edgegate_ingest_panics_recovered_total",
			Help: "Panics contained to a single connection."}),
		authFail: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_ingest_auth_failures_total",
			Help: "Refused CONNECTs, by reason."}, []string{"reason"}),
		aclDenied: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_ingest_acl_denied_total",
			Help: "Publishes, subscriptions and wills refused by the ACL, and subscriptions over the per-client limit (subscribe_limit)."},
			[]string{"action"}),
		messagesIn: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_ingest_messages_total",
			Help: "PUBLISH packets accepted from devices, by QoS."}, []string{"qos"}),
		events: prometheus.NewCounter(prometheus.CounterOpts{Name: "edgegate_ingest_events_total",
			Help: "CloudEvents produced from device messages."}),
		deadLetters: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_ingest_dead_letters_total",
			Help: "Messages that could not become events, by reason."}, []string{"reason"}),
		rateLimited: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_ingest_rate_limited_total",
			Help: "Publishes that hit the per-device rate limit: delayed or refused."}, []string{"outcome"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_ingest_rejected_total",
			Help: "Events the log could not take (no acknowledgement to the device), by reason."}, []string{"reason"}),
		normalize: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "edgegate_ingest_normalize_duration_seconds",
			Help: "Time to turn one message into a CloudEvent.", Buckets: prometheus.ExponentialBuckets(250e-9, 2, 14)}),
		commands: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_ingest_commands_total",
			Help: "Commands sent to devices, by outcome: acked, timeout (no PUBACK within mqtt.command_timeout), abandoned (the sender stopped waiting first), not_connected (not sent: the device had no connection), not_subscribed (not sent: connected, but no connection of the device subscribed to the command's topic)."}, []string{"outcome"}),
	}
	for _, c := range []prometheus.Collector{m.connections, m.refused, m.closed, m.sessionsDropped, m.panics, m.authFail, m.aclDenied, m.messagesIn,
		m.events, m.deadLetters, m.rateLimited, m.rejected, m.normalize, m.commands} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// waiter is one command waiting for the device's PUBACK.
type waiter struct {
	topic    string
	client   *mqtt.Client
	packetID uint16
	done     chan struct{}
	once     sync.Once
}

// commandTopic fills the placeholders {device} and {command} of the command topic template tpl, left to right
// (as a strings.Replacer would, without building one per command).
func commandTopic(tpl, device, command string) string {
	var sb strings.Builder
	sb.Grow(len(tpl) + len(device) + len(command))
	for {
		i := strings.IndexByte(tpl, '{')
		if i < 0 {
			sb.WriteString(tpl)
			return sb.String()
		}
		sb.WriteString(tpl[:i])
		switch rest := tpl[i:]; {
		case strings.HasPrefix(rest, "{device}"):
			sb.WriteString(device)
			tpl = rest[len("{device}"):]
		case strings.HasPrefix(rest, "{command}"):
			sb.WriteString(command)
			tpl = rest[len("{command}"):]
		default:
			sb.WriteByte('{')
			tpl = rest[1:]
		}
	}
}
