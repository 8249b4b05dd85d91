package ingest_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/crypto/bcrypt"

	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/ingest"
	"github.com/edgegate/edgegate/internal/metricstest"
	"github.com/edgegate/edgegate/internal/mqttraw"
	"github.com/edgegate/edgegate/internal/testpki"
)

// waitTimeout bounds every wait for something the broker does in response to a client.
const waitTimeout = 5 * time.Second

// ---- test parts: consumer, dead letters, registry, broker ----

// consumer is an in-memory Consumer that records every event. It can be told to refuse events (ErrFull) or to
// hold device events until released.
type consumer struct {
	mu      sync.Mutex
	results []ingest.Result
	durable []bool
	full    atomic.Bool
	gate    chan struct{} // when non-nil, Consume of a non-presence event waits for it to close
	entered chan struct{} // when non-nil, receives once per gated Consume call
	// probe, when set before the broker starts, is asked about the subject of every presence event as the event
	// is consumed; the answers are in probed, in order ("device.connected true", ...).
	probe  func(device string) bool
	probed []string
}

func (c *consumer) Consume(ctx context.Context, r ingest.Result, durable bool) error {
	presence := strings.HasPrefix(r.Event.Type(), "device.")
	if !presence && c.full.Load() {
		return fmt.Errorf("test consumer: %w", ingest.ErrFull)
	}
	if !presence && c.gate != nil {
		if c.entered != nil {
			c.entered <- struct{}{}
		}
		select {
		case <-c.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	var probed string
	if presence && c.probe != nil {
		probed = fmt.Sprintf("%s %v", r.Event.Type(), c.probe(r.Event.Subject()))
	}
	c.mu.Lock()
	c.results = append(c.results, r)
	c.durable = append(c.durable, durable)
	if probed != "" {
		c.probed = append(c.probed, probed)
	}
	c.mu.Unlock()
	return nil
}

// ofType returns the recorded events of type typ.
func (c *consumer) ofType(typ string) []ingest.Result {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []ingest.Result
	for _, r := range c.results {
		if r.Event.Type() == typ {
			out = append(out, r)
		}
	}
	return out
}

// count returns the number of recorded events of type typ about subject (any subject when it is "").
func (c *consumer) count(typ, subject string) int {
	n := 0
	for _, r := range c.ofType(typ) {
		if subject == "" || r.Event.Subject() == subject {
			n++
		}
	}
	return n
}

// waitCount waits until at least n events of type typ about subject were recorded.
func (c *consumer) waitCount(t testing.TB, typ, subject string, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d %s event(s) about %q", n, typ, subject), func() bool { return c.count(typ, subject) >= n })
}

// disconnectReasons returns the reasons of the device.disconnected events about device, in order.
func (c *consumer) disconnectReasons(device string) []string {
	var out []string
	for _, r := range c.ofType("device.disconnected") {
		if r.Event.Subject() != device {
			continue
		}
		var d struct{ Reason string }
		_ = json.Unmarshal(r.Event.Data(), &d)
		out = append(out, d.Reason)
	}
	return out
}

type deadLetter struct{ reason, detail, device, topic, payload string }

// deadLetters is an in-memory DeadLetterer.
type deadLetters struct {
	mu      sync.Mutex
	letters []deadLetter
}

func (d *deadLetters) DeadLetter(reason, detail, device, topic string, payload []byte) {
	d.mu.Lock()
	d.letters = append(d.letters, deadLetter{reason, detail, device, topic, string(payload)})
	d.mu.Unlock()
}

func (d *deadLetters) all() []deadLetter {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]deadLetter(nil), d.letters...)
}

// dev describes a registered test device; its password is "{id}-pw" unless noPassword is set.
type dev struct {
	id         string
	noPassword bool
	certCN     string
	publish    []string
	subscribe  []string
}

func password(id string) string { return id + "-pw" }

// defaultDevices are registered when a test names none.
var defaultDevices = []dev{{id: "sensor-1"}, {id: "sensor-2"}, {id: "light-1"}}

// newRegistry returns a real device registry; passwords are bcrypt hashes of the lowest cost, so tests stay fast.
func newRegistry(t testing.TB, devs []dev) *devices.Registry {
	t.Helper()
	list := make([]devices.Device, 0, len(devs))
	for _, d := range devs {
		x := devices.Device{ID: d.id, CertCN: d.certCN, Publish: d.publish, Subscribe: d.subscribe}
		if !d.noPassword {
			h, err := bcrypt.GenerateFromPassword([]byte(password(d.id)), bcrypt.MinCost)
			if err != nil {
				t.Fatal(err)
			}
			x.PasswordHash = string(h)
		}
		list = append(list, x)
	}
	r, err := devices.NewRegistry(list)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

type brokerOpts struct {
	devices  []dev                                        // default: defaultDevices
	cfg      func(*ingest.BrokerConfig)                   // adjusts the configuration (listeners are on 127.0.0.1:0)
	norm     ingest.NormalizeConfig                       // normalizer configuration
	auth     func(*devices.Registry) ingest.Authenticator // default: the registry
	consumer func(*consumer) ingest.Consumer              // wraps the recording consumer
	logger   *slog.Logger                                 // default: discard
}

type testBroker struct {
	*ingest.Broker
	reg      *prometheus.Registry
	cons     *consumer
	dl       *deadLetters
	registry *devices.Registry
	addr     string // the plain TCP listener
}

// startBroker runs a broker with real parts on loopback ports until the test ends.
func startBroker(t testing.TB, o brokerOpts) *testBroker {
	t.Helper()
	if o.devices == nil {
		o.devices = defaultDevices
	}
	cfg := ingest.DefaultBrokerConfig()
	cfg.Listen = "127.0.0.1:0"
	if o.cfg != nil {
		o.cfg(&cfg)
	}
	n, err := ingest.NewNormalizer("gw-test", o.norm)
	if err != nil {
		t.Fatal(err)
	}
	registry := newRegistry(t, o.devices)
	var auth ingest.Authenticator = registry
	if o.auth != nil {
		auth = o.auth(registry)
	}
	logger := o.logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	tb := &testBroker{reg: prometheus.NewRegistry(), cons: &consumer{}, dl: &deadLetters{}, registry: registry}
	var cons ingest.Consumer = tb.cons
	if o.consumer != nil {
		cons = o.consumer(tb.cons)
	}
	b, err := ingest.NewBroker(cfg, ingest.Deps{Normalizer: n, Auth: auth, ACL: registry, Consumer: cons,
		DeadLetters: tb.dl}, logger, tb.reg)
	if err != nil {
		t.Fatal(err)
	}
	tb.Broker, tb.addr = b, b.Addr("tcp")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("broker run: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Errorf("broker did not stop")
		}
	})
	return tb
}

// runBroker runs a broker with real parts and cfg until stop, which ends it and returns what Run returned; the
// test fails if Run does not return within 10s of the stop. The test's cleanup stops it too.
func runBroker(t testing.TB, cfg ingest.BrokerConfig) (b *ingest.Broker, stop func() error) {
	t.Helper()
	n, err := ingest.NewNormalizer("gw-test", ingest.NormalizeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	registry := newRegistry(t, defaultDevices)
	b, err = ingest.NewBroker(cfg, ingest.Deps{Normalizer: n, Auth: registry, ACL: registry, Consumer: &consumer{},
		DeadLetters: &deadLetters{}}, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(10 * time.Second):
				runErr = errors.New("Run did not return within 10s of the stop")
			}
		})
		return runErr
	}
	t.Cleanup(func() { _ = stop() })
	return b, stop
}

// metric returns the value of the counter or gauge name with the given label pairs (0 when absent).
func (tb *testBroker) metric(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	return gatherValue(t, tb.reg, name, labels...)
}

func gatherValue(t testing.TB, g prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	return metricstest.Value(t, g, name, labels...)
}

// waitFor polls cond until it holds, failing the test after waitTimeout.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ---- paho clients (MQTT 3.1.1) ----

type pahoOpts struct {
	clientID string // default: user
	user     string
	pass     string
	tls      *tls.Config
	mod      func(*paho.ClientOptions)
}

// pahoConnect connects a paho client to url; the client is disconnected when the test ends.
func pahoConnect(t testing.TB, url string, o pahoOpts) (paho.Client, error) {
	t.Helper()
	if o.clientID == "" {
		o.clientID = o.user
	}
	opts := paho.NewClientOptions().AddBroker(url).SetClientID(o.clientID).SetUsername(o.user).
		SetPassword(o.pass).SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(waitTimeout).
		SetProtocolVersion(4).SetCleanSession(true).SetWriteTimeout(waitTimeout)
	if o.tls != nil {
		opts.SetTLSConfig(o.tls)
	}
	if o.mod != nil {
		o.mod(opts)
	}
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(2 * waitTimeout) {
		return nil, errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c, nil
}

// mustPaho connects device id with its password over plain TCP.
func mustPaho(t testing.TB, tb *testBroker, id string) paho.Client {
	t.Helper()
	c, err := pahoConnect(t, "tcp://"+tb.addr, pahoOpts{user: id, pass: password(id)})
	if err != nil {
		t.Fatalf("connect %s: %v", id, err)
	}
	return c
}

func publish(t testing.TB, c paho.Client, topic string, qos byte, payload string) {
	t.Helper()
	tok := c.Publish(topic, qos, false, payload)
	if !tok.WaitTimeout(waitTimeout) {
		t.Fatalf("publish %s: no acknowledgement", topic)
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("publish %s: %v", topic, err)
	}
}

// ---- raw MQTT client (MQTT 5 and 3.1.1, packets encoded with mochi's packets package) ----

type rawConn struct {
	t       testing.TB
	c       net.Conn
	r       *bufio.Reader
	version byte
	nextID  uint16
}

func dialRaw(t testing.TB, addr string, version byte) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &rawConn{t: t, c: c, r: newReader(c), version: version}
}

func newReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }

func (rc *rawConn) write(b []byte) error {
	_ = rc.c.SetWriteDeadline(time.Now().Add(waitTimeout))
	_, err := rc.c.Write(b)
	return err
}

func encode(t testing.TB, pk packets.Packet) []byte {
	t.Helper()
	b, err := mqttraw.Encode(pk)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (rc *rawConn) send(pk packets.Packet) {
	rc.t.Helper()
	pk.ProtocolVersion = rc.version
	if err := rc.write(encode(rc.t, pk)); err != nil {
		rc.t.Fatalf("send packet type %d: %v", pk.FixedHeader.Type, err)
	}
}

// read reads the next packet within timeout.
func (rc *rawConn) read(timeout time.Duration) (packets.Packet, error) {
	_ = rc.c.SetReadDeadline(time.Now().Add(timeout))
	var pk packets.Packet
	b, err := rc.r.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(b); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(rc.r)
	if err != nil {
		return pk, err
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(rc.r, body); err != nil {
		return pk, err
	}
	pk.ProtocolVersion = rc.version
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Pubrec:
		err = pk.PubrecDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	}
	return pk, err
}

// expect reads packets until one of type typ arrives, skipping PUBLISH deliveries (acknowledged if QoS 1).
func (rc *rawConn) expect(typ byte) packets.Packet {
	rc.t.Helper()
	for {
		pk, err := rc.read(waitTimeout)
		if err != nil {
			rc.t.Fatalf("waiting for packet type %d: %v", typ, err)
		}
		if pk.FixedHeader.Type == typ {
			return pk
		}
		if pk.FixedHeader.Type == packets.Publish && pk.FixedHeader.Qos == 1 {
			rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
		}
	}
}

// expectClosed waits until the broker closes the connection, skipping whatever it sends before.
func (rc *rawConn) expectClosed(within time.Duration) {
	rc.t.Helper()
	deadline := time.Now().Add(within)
	_ = rc.c.SetReadDeadline(deadline)
	_, err := io.Copy(io.Discard, rc.r)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		rc.t.Fatalf("connection still open after %s", within)
	}
}

type connectOpts struct {
	clientID   string // default: user
	user, pass string // pass default: password(user) when user is set
	noPass     bool
	keepalive  uint16
	will       *packets.Packet // topic, payload and QoS of the will
	keep       bool            // clean session off: the broker keeps the session
}

// connect sends CONNECT and returns the CONNACK reason code.
func (rc *rawConn) connect(o connectOpts) byte {
	rc.t.Helper()
	if o.clientID == "" {
		o.clientID = o.user
	}
	if o.user != "" && o.pass == "" && !o.noPass {
		o.pass = password(o.user)
	}
	name := []byte("MQTT")
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		ProtocolName: name, Clean: !o.keep, Keepalive: o.keepalive, ClientIdentifier: o.clientID,
		UsernameFlag: o.user != "", Username: []byte(o.user), PasswordFlag: o.pass != "", Password: []byte(o.pass)}}
	if o.will != nil {
		pk.Connect.WillFlag, pk.Connect.WillTopic, pk.Connect.WillPayload = true, o.will.TopicName, o.will.Payload
		pk.Connect.WillQos = o.will.FixedHeader.Qos
	}
	rc.send(pk)
	ack := rc.expect(packets.Connack)
	return ack.ReasonCode
}

// mustConnect connects device id with its password and fails the test unless the broker accepts it.
func (rc *rawConn) mustConnect(id string) {
	rc.t.Helper()
	if code := rc.connect(connectOpts{user: id}); code != 0 {
		rc.t.Fatalf("connect %s: CONNACK reason 0x%02x", id, code)
	}
}

// publish sends a PUBLISH; for QoS 1 it returns the packet id to wait for.
func (rc *rawConn) publish(topic string, qos byte, payload []byte) uint16 {
	rc.t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, TopicName: topic,
		Payload: payload}
	if qos > 0 {
		rc.nextID++
		pk.PacketID = rc.nextID
	}
	rc.send(pk)
	return pk.PacketID
}

// publishAck publishes with QoS 1 and returns the PUBACK reason code.
func (rc *rawConn) publishAck(topic string, payload []byte) byte {
	rc.t.Helper()
	id := rc.publish(topic, 1, payload)
	ack := rc.expect(packets.Puback)
	if ack.PacketID != id {
		rc.t.Fatalf("PUBACK for packet %d, want %d", ack.PacketID, id)
	}
	return ack.ReasonCode
}

// publishFenced publishes with QoS 1 and a PINGREQ after it; it returns the PUBACK reason code, if a PUBACK came
// before the PINGRESP (the broker handles a connection's packets in order).
func (rc *rawConn) publishFenced(topic string, payload []byte) (code byte, acked bool) {
	rc.t.Helper()
	id := rc.publish(topic, 1, payload)
	rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
	for {
		pk, err := rc.read(waitTimeout)
		if err != nil {
			rc.t.Fatalf("publish %s: %v", topic, err)
		}
		switch pk.FixedHeader.Type {
		case packets.Puback:
			if pk.PacketID != id {
				rc.t.Fatalf("PUBACK for packet %d, want %d", pk.PacketID, id)
			}
			code, acked = pk.ReasonCode, true
		case packets.Pingresp:
			return code, acked
		}
	}
}

// subscribe subscribes to filters with QoS 1 and returns the SUBACK reason codes.
func (rc *rawConn) subscribe(filters ...string) []byte {
	rc.t.Helper()
	rc.nextID++
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: rc.nextID}
	for _, f := range filters {
		pk.Filters = append(pk.Filters, packets.Subscription{Filter: f, Qos: 1})
	}
	rc.send(pk)
	return rc.expect(packets.Suback).ReasonCodes
}

func (rc *rawConn) disconnect() {
	rc.t.Helper()
	rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	_ = rc.c.Close()
}

// ---- authentication ----

func TestAuthPassword(t *testing.T) {
	tb := startBroker(t, brokerOpts{})
	url := "tcp://" + tb.addr
	cases := []struct {
		name   string
		o      pahoOpts
		ok     bool
		reason string // auth failure metric label
	}{
		{"good password", pahoOpts{user: "sensor-1", pass: "sensor-1-pw"}, true, ""},
		{"bad password", pahoOpts{user: "sensor-1", pass: "sensor-2-pw"}, false, "bad_credentials"},
		{"empty password", pahoOpts{user: "sensor-1"}, false, "bad_credentials"},
		{"unknown device", pahoOpts{user: "ghost", pass: "ghost-pw"}, false, "bad_credentials"},
		{"anonymous", pahoOpts{clientID: "sensor-1"}, false, "anonymous"},
		{"client id of another device", pahoOpts{user: "sensor-1", pass: "sensor-1-pw", clientID: "sensor-2"}, false,
			"client_id_mismatch"},
		{"client id with suffix", pahoOpts{user: "sensor-1", pass: "sensor-1-pw", clientID: "sensor-1:probe"}, true, ""},
		{"client id extending the device id", pahoOpts{user: "sensor-1", pass: "sensor-1-pw", clientID: "sensor-10"},
			false, "client_id_mismatch"},
		{"client id with another separator", pahoOpts{user: "sensor-1", pass: "sensor-1-pw", clientID: "sensor-1/x"},
			false, "client_id_mismatch"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var before float64
			if c.reason != "" {
				before = tb.metric(t, "edgegate_ingest_auth_failures_total", "reason", c.reason)
			}
			cl, err := pahoConnect(t, url, c.o)
			if c.ok {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				publish(t, cl, "devices/"+c.o.user+"/events/auth.checked", 1, `{}`)
				tb.cons.waitCount(t, "auth.checked", c.o.user, 1)
				return
			}
			if err == nil {
				t.Fatal("connection accepted")
			}
			if got := tb.metric(t, "edgegate_ingest_auth_failures_total", "reason", c.reason); got != before+1 {
				t.Errorf("auth failures{reason=%s} = %v, want %v", c.reason, got, before+1)
			}
		})
	}
	// Refused clients never count as connected devices.
	for _, id := range []string{"sensor-2", "ghost"} {
		if n := tb.cons.count("device.connected", id); n != 0 {
			t.Errorf("%d device.connected events for refused %s", n, id)
		}
	}
}

func TestAuthAnonymousAllowedOnlyWhenConfigured(t *testing.T) {
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.AllowAnonymous = true }})
	cl, err := pahoConnect(t, "tcp://"+tb.addr, pahoOpts{clientID: "sensor-1"})
	if err != nil {
		t.Fatalf("anonymous client refused with allow_anonymous: %v", err)
	}
	// It acts as the device named by its client id, with that device's ACL.
	publish(t, cl, "devices/sensor-2/events/anon.other", 0, `{}`)
	publish(t, cl, "devices/sensor-1/events/anon.own", 1, `{}`)
	tb.cons.waitCount(t, "anon.own", "sensor-1", 1)
	if n := tb.cons.count("anon.other", ""); n != 0 {
		t.Errorf("anonymous client published for another device: %d events", n)
	}
	// Credentials are still checked when given.
	if _, err := pahoConnect(t, "tcp://"+tb.addr, pahoOpts{user: "sensor-2", pass: "wrong"}); err == nil {
		t.Error("bad password accepted with allow_anonymous")
	}
}

// ---- mutual TLS ----

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAuthMutualTLS(t *testing.T) {
	ca, other := testpki.NewCA(t, "edgegate test CA"), testpki.NewCA(t, "another CA")
	_, srvCert, srvKey := ca.Issue(t, "gateway", true)
	dir := t.TempDir()
	tlsCfg := ingest.TLSConfig{Listen: "127.0.0.1:0", CertFile: writeFile(t, dir, "server.pem", srvCert),
		KeyFile: writeFile(t, dir, "server.key", srvKey), ClientCAFile: writeFile(t, dir, "ca.pem", ca.PEM),
		RequireClientCert: true}
	tb := startBroker(t, brokerOpts{
		devices: []dev{{id: "cam-1", noPassword: true, certCN: "cam-1"}, {id: "sensor-1"}},
		cfg:     func(c *ingest.BrokerConfig) { c.TLS = tlsCfg },
	})
	url := "ssl://" + tb.Addr("tls")
	roots := ca.Pool()
	good, _, _ := ca.Issue(t, "cam-1", false)
	unknown, _, _ := ca.Issue(t, "cam-9", false)
	foreign, _, _ := other.Issue(t, "cam-1", false)
	clientTLS := func(certs ...tls.Certificate) *tls.Config {
		return &tls.Config{RootCAs: roots, Certificates: certs, MinVersion: tls.VersionTLS12}
	}

	cases := []struct {
		name string
		o    pahoOpts
		ok   bool
	}{
		{"certificate CN is the device, no password", pahoOpts{clientID: "cam-1", tls: clientTLS(good)}, true},
		{"certificate and matching username", pahoOpts{clientID: "cam-1", user: "cam-1", tls: clientTLS(good)}, true},
		{"certificate and another device's username", pahoOpts{clientID: "sensor-1", user: "sensor-1",
			pass: "sensor-1-pw", tls: clientTLS(good)}, false},
		{"no certificate", pahoOpts{clientID: "sensor-1", user: "sensor-1", pass: "sensor-1-pw", tls: clientTLS()}, false},
		{"certificate from another CA", pahoOpts{clientID: "cam-1", tls: clientTLS(foreign)}, false},
		{"certificate CN not registered", pahoOpts{clientID: "cam-9", tls: clientTLS(unknown)}, false},
		{"certificate of one device, client id of another", pahoOpts{clientID: "sensor-1", tls: clientTLS(good)}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cl, err := pahoConnect(t, url, c.o)
			if !c.ok {
				if err == nil {
					t.Fatal("connection accepted")
				}
				return
			}
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			publish(t, cl, "devices/cam-1/events/tls.checked", 1, `{"ok":true}`)
			tb.cons.waitCount(t, "tls.checked", "cam-1", 1)
			cl.Disconnect(0)
			waitFor(t, "cam-1 disconnected", func() bool { return !tb.Connected("cam-1") })
			tb.cons.mu.Lock()
			tb.cons.results = nil
			tb.cons.mu.Unlock()
		})
	}
	if got := tb.metric(t, "edgegate_ingest_auth_failures_total", "reason", "unknown_certificate"); got != 1 {
		t.Errorf("auth failures{unknown_certificate} = %v, want 1", got)
	}
	if got := tb.metric(t, "edgegate_ingest_auth_failures_total", "reason", "certificate_username_mismatch"); got != 1 {
		t.Errorf("auth failures{certificate_username_mismatch} = %v, want 1", got)
	}
}

func TestWebSocketListener(t *testing.T) {
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.WebSocket = "127.0.0.1:0" }})
	url := "ws://" + tb.Addr("ws") + "/mqtt"
	cl, err := pahoConnect(t, url, pahoOpts{user: "sensor-1", pass: "sensor-1-pw"})
	if err != nil {
		t.Fatalf("websocket connect: %v", err)
	}
	got := make(chan string, 1)
	light, err := pahoConnect(t, url, pahoOpts{user: "light-1", pass: "light-1-pw"})
	if err != nil {
		t.Fatal(err)
	}
	if tok := light.Subscribe("devices/light-1/commands/#", 1, func(_ paho.Client, m paho.Message) {
		got <- string(m.Payload())
	}); !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	publish(t, cl, "devices/sensor-1/events/ws.checked", 1, `{"via":"ws"}`)
	tb.cons.waitCount(t, "ws.checked", "sensor-1", 1)
	if _, err := pahoConnect(t, url, pahoOpts{user: "sensor-2", pass: "nope"}); err == nil {
		t.Error("bad password accepted over websocket")
	}
	// Commands reach a device connected over WebSocket and complete on its PUBACK.
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := tb.Command(ctx, "light-1", "lights.on", []byte(`{}`)); err != nil {
		t.Fatalf("command over websocket: %v", err)
	}
	select {
	case p := <-got:
		if p != `{}` {
			t.Errorf("command payload %q", p)
		}
	case <-time.After(waitTimeout):
		t.Fatal("command not delivered")
	}
}

// ---- presence ----

func TestPresenceEvents(t *testing.T) {
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) { c.MaxPacketBytes = 1024 }})

	t.Run("clean disconnect", func(t *testing.T) {
		rc := dialRaw(t, tb.addr, 4)
		rc.mustConnect("sensor-1")
		tb.cons.waitCount(t, "device.connected", "sensor-1", 1)
		rc.disconnect()
		waitFor(t, "disconnect", func() bool { return len(tb.cons.disconnectReasons("sensor-1")) == 1 })
		if r := tb.cons.disconnectReasons("sensor-1"); r[0] != ingest.PresenceCleanDisconnect {
			t.Errorf("reason %q, want %q", r[0], ingest.PresenceCleanDisconnect)
		}
	})
	t.Run("lost connection", func(t *testing.T) {
		rc := dialRaw(t, tb.addr, 5)
		rc.mustConnect("sensor-2")
		tb.cons.waitCount(t, "device.connected", "sensor-2", 1)
		_ = rc.c.Close()
		waitFor(t, "disconnect", func() bool { return len(tb.cons.disconnectReasons("sensor-2")) == 1 })
		if r := tb.cons.disconnectReasons("sensor-2"); r[0] != ingest.PresenceConnectionLost {
			t.Errorf("reason %q, want %q", r[0], ingest.PresenceConnectionLost)
		}
	})
	t.Run("will published", func(t *testing.T) {
		rc := dialRaw(t, tb.addr, 4)
		will := &packets.Packet{TopicName: "devices/light-1/events/went.offline", Payload: []byte(`{"bye":1}`)}
		if code := rc.connect(connectOpts{user: "light-1", will: will}); code != 0 {
			t.Fatalf("CONNACK 0x%02x", code)
		}
		tb.cons.waitCount(t, "device.connected", "light-1", 1)
		_ = rc.c.Close()
		tb.cons.waitCount(t, "went.offline", "light-1", 1)
		waitFor(t, "disconnect", func() bool { return len(tb.cons.disconnectReasons("light-1")) == 1 })
		if r := tb.cons.disconnectReasons("light-1"); r[0] != ingest.PresenceWillPublished {
			t.Errorf("reason %q, want %q", r[0], ingest.PresenceWillPublished)
		}
	})
	t.Run("kicked for a limit", func(t *testing.T) {
		rc := dialRaw(t, tb.addr, 5)
		rc.mustConnect("sensor-1")
		tb.cons.waitCount(t, "device.connected", "sensor-1", 2)
		rc.publish("devices/sensor-1/events/big", 0, bytes.Repeat([]byte("x"), 2048))
		rc.expectClosed(waitTimeout)
		waitFor(t, "disconnect", func() bool { return len(tb.cons.disconnectReasons("sensor-1")) == 2 })
		if r := tb.cons.disconnectReasons("sensor-1"); r[1] != ingest.PresenceKickedLimit {
			t.Errorf("reason %q, want %q", r[1], ingest.PresenceKickedLimit)
		}
	})
	for _, r := range tb.cons.ofType("device.connected") {
		if r.Event.Source() != "/gateways/gw-test/devices/"+r.Event.Subject() {
			t.Errorf("presence source %q", r.Event.Source())
		}
	}
}

// ---- dead letters, acknowledgements and back-pressure ----

func TestDeadLettersKeepDeviceConnected(t *testing.T) {
	tb := startBroker(t, brokerOpts{norm: ingest.NormalizeConfig{
		MaxPayloadBytes: 512,
		Mappings:        []ingest.Mapping{{Name: "strict", Topic: "devices/{device}/json/{type}", Type: "{type}", Format: "json"}},
	}})
	cl := mustPaho(t, tb, "sensor-1")
	cases := []struct {
		reason, topic, payload string
	}{
		{ingest.ReasonNotJSON, "devices/sensor-1/json/reading", `{"temp": 21.5`},
		{ingest.ReasonTooLarge, "devices/sensor-1/events/reading", `"` + strings.Repeat("a", 600) + `"`},
		{ingest.ReasonUnknownTopic, "devices/sensor-1/somewhere/else", `{}`},
	}
	for i, c := range cases {
		publish(t, cl, c.topic, 1, c.payload) // acknowledged: kept as a dead letter
		waitFor(t, "dead letter "+c.reason, func() bool { return len(tb.dl.all()) == i+1 })
		got := tb.dl.all()[i]
		if got.reason != c.reason || got.device != "sensor-1" || got.topic != c.topic || got.payload != c.payload {
			t.Errorf("dead letter %+v, want reason %s topic %s with the original payload", got, c.reason, c.topic)
		}
		if got.detail == "" {
			t.Errorf("dead letter %s without detail", c.reason)
		}
		if m := tb.metric(t, "edgegate_ingest_dead_letters_total", "reason", c.reason); m != 1 {
			t.Errorf("dead letters{%s} = %v, want 1", c.reason, m)
		}
		if !cl.IsConnectionOpen() {
			t.Fatalf("device disconnected after a %s message", c.reason)
		}
	}
	publish(t, cl, "devices/sensor-1/json/reading", 1, `{"temp":21.5}`)
	tb.cons.waitCount(t, "reading", "sensor-1", 1)
	if n := len(tb.cons.ofType("reading")); n != 1 {
		t.Errorf("%d reading events, want 1 (dead letters must not become events)", n)
	}
	if r := tb.cons.disconnectReasons("sensor-1"); len(r) != 0 {
		t.Errorf("device disconnected: %v", r)
	}
}

func TestQoS1AckedOnlyAfterConsume(t *testing.T) {
	for _, version := range []byte{4, 5} {
		t.Run(fmt.Sprintf("v%d", version), func(t *testing.T) {
			tb := startBroker(t, brokerOpts{})
			tb.cons.gate, tb.cons.entered = make(chan struct{}), make(chan struct{}, 1)
			rc := dialRaw(t, tb.addr, version)
			rc.mustConnect("sensor-1")
			id := rc.publish("devices/sensor-1/events/held", 1, []byte(`{"n":1}`))
			select {
			case <-tb.cons.entered:
			case <-time.After(waitTimeout):
				t.Fatal("Consume not called")
			}
			// Consume has not returned: no PUBACK may arrive while it is held.
			if pk, err := rc.read(200 * time.Millisecond); err == nil {
				t.Fatalf("packet type %d (id %d) before Consume returned", pk.FixedHeader.Type, pk.PacketID)
			}
			close(tb.cons.gate)
			ack := rc.expect(packets.Puback)
			if ack.PacketID != id || ack.ReasonCode >= 0x80 {
				t.Fatalf("PUBACK id %d reason 0x%02x, want id %d success", ack.PacketID, ack.ReasonCode, id)
			}
			res := tb.cons.ofType("held")
			if len(res) != 1 {
				t.Fatalf("%d events", len(res))
			}
			tb.cons.mu.Lock()
			durable := tb.cons.durable[len(tb.cons.durable)-1]
			tb.cons.mu.Unlock()
			if !durable {
				t.Error("QoS 1 event not consumed as durable")
			}
		})
	}
}

func TestConsumerFull(t *testing.T) {
	tb := startBroker(t, brokerOpts{})
	tb.cons.full.Store(true)

	t.Run("v5 PUBACK 0x97", func(t *testing.T) {
		rc := dialRaw(t, tb.addr, 5)
		rc.mustConnect("sensor-1")
		if code := rc.publishAck("devices/sensor-1/events/refused", []byte(`{}`)); code != packets.ErrQuotaExceeded.Code {
			t.Fatalf("PUBACK reason 0x%02x, want 0x97", code)
		}
		// The connection stays usable.
		tb.cons.full.Store(false)
		if code := rc.publishAck("devices/sensor-1/events/accepted", []byte(`{}`)); code >= 0x80 {
			t.Fatalf("PUBACK reason 0x%02x after the consumer recovered", code)
		}
		tb.cons.full.Store(true)
	})
	t.Run("v3.1.1 no PUBACK", func(t *testing.T) {
		rc := dialRaw(t, tb.addr, 4)
		rc.mustConnect("sensor-2")
		rc.publish("devices/sensor-2/events/refused", 1, []byte(`{}`))
		rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
		// The PINGRESP is written after the PUBLISH was handled: nothing before it may be a PUBACK.
		for {
			pk, err := rc.read(waitTimeout)
			if err != nil {
				t.Fatal(err)
			}
			if pk.FixedHeader.Type == packets.Puback {
				t.Fatalf("PUBACK for a refused event")
			}
			if pk.FixedHeader.Type == packets.Pingresp {
				break
			}
		}
	})
	if n := tb.cons.count("refused", ""); n != 0 {
		t.Errorf("%d refused events recorded", n)
	}
	if got := tb.metric(t, "edgegate_ingest_rejected_total", "reason", "full"); got != 2 {
		t.Errorf("rejected{full} = %v, want 2", got)
	}
}

// TestReloadTLS: ReloadTLS puts a renewed server certificate in force for new connections, keeps open ones, keeps
// the previous certificate when the files do not load, and the expiry metric follows.
func TestReloadTLS(t *testing.T) {
	ca := testpki.NewCA(t, "edgegate test CA")
	first, firstCert, firstKey := ca.Issue(t, "gateway-first", true)
	dir := t.TempDir()
	certFile, keyFile := writeFile(t, dir, "server.pem", firstCert), writeFile(t, dir, "server.key", firstKey)
	tb := startBroker(t, brokerOpts{cfg: func(c *ingest.BrokerConfig) {
		c.TLS = ingest.TLSConfig{Listen: "127.0.0.1:0", CertFile: certFile, KeyFile: keyFile}
	}})
	roots := ca.Pool()
	served := func() string {
		t.Helper()
		c, err := tls.Dial("tcp", tb.Addr("tls"), &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12})
		if err != nil {
			t.Fatalf("TLS handshake: %v", err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	expiry := func() int64 { return int64(tb.metric(t, "edgegate_ingest_tls_cert_expiry_timestamp_seconds")) }
	if got := served(); got != "gateway-first" {
		t.Fatalf("served certificate %q", got)
	}
	if got, want := expiry(), first.Leaf.NotAfter.Unix(); got != want {
		t.Errorf("expiry metric %d, want %d", got, want)
	}
	open, err := pahoConnect(t, "ssl://"+tb.Addr("tls"), pahoOpts{user: "sensor-1", pass: password("sensor-1"),
		tls: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}})
	if err != nil {
		t.Fatal(err)
	}

	// A half-written renewal does not load: the first certificate stays.
	writeFile(t, dir, "server.pem", firstCert[:len(firstCert)/2])
	if _, err := tb.ReloadTLS(); err == nil || !strings.Contains(err.Error(), "previous certificate stays in use") {
		t.Fatalf("ReloadTLS of a truncated certificate: %v", err)
	}
	if got := served(); got != "gateway-first" {
		t.Fatalf("after a failed reload the served certificate is %q", got)
	}

	second, secondCert, secondKey := ca.Issue(t, "gateway-second", true)
	writeFile(t, dir, "server.pem", secondCert)
	writeFile(t, dir, "server.key", secondKey)
	notAfter, err := tb.ReloadTLS()
	if err != nil {
		t.Fatalf("ReloadTLS: %v", err)
	}
	if !notAfter.Equal(second.Leaf.NotAfter) {
		t.Errorf("ReloadTLS returned expiry %s, want %s", notAfter, second.Leaf.NotAfter)
	}
	if got := served(); got != "gateway-second" {
		t.Fatalf("after the reload the served certificate is %q", got)
	}
	if got, want := expiry(), second.Leaf.NotAfter.Unix(); got != want {
		t.Errorf("expiry metric %d, want %d", got, want)
	}
	publish(t, open, "devices/sensor-1/events/still.open", 1, `{}`)
	tb.cons.waitCount(t, "still.open", "sensor-1", 1)
}
