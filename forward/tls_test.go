package forward

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	stdlog "log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/edgegate/edgegate/internal/eventually"
	"github.com/edgegate/edgegate/internal/freeport"
	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/testpki"
)

// Names in the test certificates.
const (
	testServerCN = "edgegate-test-server"
	testClientCN = "edgegate-test-client"
)

// testPKI is a certificate authority made at test time with a server certificate for 127.0.0.1 and localhost
// and a client certificate, written as PEM files to a directory of the test.
type testPKI struct {
	caFile                string
	serverCert, serverKey string
	clientCert, clientKey string
	pool                  *x509.CertPool
	server                tls.Certificate
	// renewClient replaces the client certificate and key files with a new certificate for cn.
	renewClient func(cn string)
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatalf("write %s: %v", name, err)
		}
		return path
	}
	ca := testpki.NewCA(t, "edgegate test CA")
	server, srvCert, srvKey := ca.Issue(t, testServerCN, true)
	_, cliCert, cliKey := ca.Issue(t, testClientCN, false)
	return &testPKI{
		caFile:     write("ca.pem", ca.PEM),
		serverCert: write("server.pem", srvCert),
		serverKey:  write("server-key.pem", srvKey),
		clientCert: write("client.pem", cliCert),
		clientKey:  write("client-key.pem", cliKey),
		pool:       ca.Pool(),
		server:     server,
		renewClient: func(cn string) {
			_, c, k := ca.Issue(t, cn, false)
			write("client.pem", c)
			write("client-key.pem", k)
		},
	}
}

// tlsListener is the configuration of a mosquitto listener on 127.0.0.1 that speaks TLS with the PKI's server
// certificate and verifies client certificates against its CA.
func (p *testPKI) tlsListener(port int, requireCert bool) []string {
	lines := []string{
		fmt.Sprintf("listener %d 127.0.0.1", port),
		"cafile " + p.caFile,
		"certfile " + p.serverCert,
		"keyfile " + p.serverKey,
	}
	if requireCert {
		lines = append(lines, "require_certificate true")
	}
	return lines
}

// startBrokerWith starts a mosquitto with a second listener on a free port that lines (given the port)
// configure, and waits until that listener accepts connections. Each start uses a fresh port, so a port taken
// in the meantime is retried; the error of the last attempt is returned when the broker never starts.
func startBrokerWith(t *testing.T, lines func(port int) []string) (*mosquittotest.Broker, int, error) {
	t.Helper()
	var last error
	for range 3 {
		port, err := freeport.Get()
		if err != nil {
			t.Fatalf("free port: %v", err)
		}
		b, err := mosquittotest.TryStart(t, lines(port)...)
		if err != nil {
			last = err
			continue
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		accepting := false
		var dialErr error
		settled := eventually.Within(10*time.Second, func() bool {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				_ = c.Close()
				accepting = true
				return true
			}
			dialErr = err
			return !b.Running()
		})
		switch {
		case accepting:
			return b, port, nil
		case !settled:
			t.Fatalf("the listener on %s does not accept connections: %v\n%s", addr, dialErr, b.Log())
		}
		last = fmt.Errorf("mosquitto exited before %s accepted connections: %w\n%s", addr, dialErr, b.Log())
	}
	return nil, 0, last
}

// tlsMQTTSink is an MQTT sink towards url with the TLS settings tc. The connect timeout leaves room for
// handshakes on a busy machine: the tests that deliver expect the first attempt to connect.
func tlsMQTTSink(url string, tc TLSConfig) SinkConfig {
	sc := mqttSink("up", url)
	sc.MQTT.ConnectTimeout = 5 * time.Second
	sc.MQTT.TLS = tc
	return sc
}

const tlsTestEvents = 20

// waitSink is waitFor that also shows the sink's health when the condition does not come true.
func waitSink(t *testing.T, r *running, name string, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	defer func() {
		if t.Failed() {
			t.Logf("health of %s: %+v", name, sinkHealth(r, name))
		}
	}()
	waitFor(t, timeout, what, cond)
}

// checkMQTTDelivers runs an MQTT sink with sc against a broker whose plain listener is plainURL and checks
// that every event arrives, in order, on a connection that never failed.
func checkMQTTDelivers(t *testing.T, plainURL string, sc SinkConfig) {
	t.Helper()
	col := collect(t, plainURL, "edgegate/gw1/events/#")
	log := newMemLog(t)
	for i := range tlsTestEvents {
		log.add("sensor.reading", []string{"hall", "kitchen"}[i%2], i/2+1)
	}
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitSink(t, r, "up", 15*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:up") == tlsTestEvents })
	waitSink(t, r, "up", 10*time.Second, "every event upstream", func() bool { return col.unique() == tlsTestEvents })
	if dups := checkDelivery(t, col.all(), tlsTestEvents); dups != 0 {
		t.Errorf("%d duplicates without any reconnect", dups)
	}
	h := sinkHealth(r, "up")
	if !h.Healthy || !h.Connected || h.LastError != "" || h.Cursor != tlsTestEvents {
		t.Errorf("health = %+v, want connected and healthy without an error", h)
	}
	if h.Target != sc.MQTT.URL {
		t.Errorf("health target = %s, want %s", h.Target, sc.MQTT.URL)
	}
}

// checkSinkRefused runs a sink with sc that cannot get through and waits until its health shows the failure:
// the last error must contain every string of want, nothing is delivered, the cursor stays at 0. It returns
// the last error.
func checkSinkRefused(t *testing.T, sc SinkConfig, delivered func() int, want ...string) string {
	t.Helper()
	log := newMemLog(t)
	for i := range tlsTestEvents {
		log.add("sensor.reading", "hall", i+1)
	}
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	// Two failed attempts: the sink keeps failing the same way, it is not a first attempt going astray.
	waitSink(t, r, sc.Name, 15*time.Second, "two failed connection attempts", func() bool {
		return testutil.ToFloat64(r.f.metrics.errors.WithLabelValues(sc.Name)) >= 2
	})
	h := sinkHealth(r, sc.Name)
	t.Logf("last error: %s", h.LastError)
	for _, w := range want {
		if !strings.Contains(h.LastError, w) {
			t.Errorf("health last error = %q, want it to contain %q", h.LastError, w)
		}
	}
	if h.LastErrorTime.IsZero() || h.Cursor != 0 {
		t.Errorf("health = %+v, want the error and the cursor at 0", h)
	}
	// An HTTP sink counts as connected from the start of a request to its failure; an MQTT sink never is.
	if sc.Type == TypeMQTT && (h.Connected || h.Healthy) {
		t.Errorf("health = %+v, want not connected", h)
	}
	if c := log.Cursor(CursorName(sc.Name)); c != 0 {
		t.Errorf("cursor = %d, want 0: nothing can have been acknowledged", c)
	}
	if n := delivered(); n != 0 {
		t.Errorf("%d events arrived upstream, want none", n)
	}
	return h.LastError
}

// TestMQTTTLS: an MQTT sink connects over TLS (ssl://, tls://, mqtts://) to a mosquitto listener with a
// certificate of a test CA when ca_file names that CA, when server_name names a host the certificate is for,
// or when verification is off; it is refused, with the certificate problem in its health, when the system
// roots verify the broker or server_name names a host the certificate is not for.
func TestMQTTTLS(t *testing.T) {
	pki := newTestPKI(t)
	start := func(t *testing.T) (*mosquittotest.Broker, int) {
		t.Helper()
		b, port, err := startBrokerWith(t, func(port int) []string { return pki.tlsListener(port, false) })
		if err != nil {
			t.Fatalf("mosquitto with a TLS listener: %v", err)
		}
		return b, port
	}
	url := func(scheme string, port int) string { return scheme + "://127.0.0.1:" + strconv.Itoa(port) }

	delivers := []struct {
		name   string
		scheme string
		tls    TLSConfig
	}{
		{"ssl with ca_file", "ssl", TLSConfig{CAFile: pki.caFile}},
		{"tls with ca_file", "tls", TLSConfig{CAFile: pki.caFile}},
		{"mqtts with ca_file", "mqtts", TLSConfig{CAFile: pki.caFile}},
		{"server_name localhost", "ssl", TLSConfig{CAFile: pki.caFile, ServerName: "localhost"}},
		{"insecure_skip_verify", "ssl", TLSConfig{InsecureSkipVerify: true}},
	}
	for _, tc := range delivers {
		t.Run(tc.name, func(t *testing.T) {
			b, port := start(t)
			checkMQTTDelivers(t, b.URL(), tlsMQTTSink(url(tc.scheme, port), tc.tls))
		})
	}

	refused := []struct {
		name string
		tls  TLSConfig
		want []string
	}{
		{"system roots", TLSConfig{}, []string{"x509: certificate signed by unknown authority"}},
		{"server_name mismatch", TLSConfig{CAFile: pki.caFile, ServerName: "wrong.example"},
			[]string{"x509: certificate is valid for localhost, not wrong.example"}},
	}
	for _, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			b, port := start(t)
			col := collect(t, b.URL(), "edgegate/gw1/events/#")
			checkSinkRefused(t, tlsMQTTSink(url("ssl", port), tc.tls), col.unique, tc.want...)
		})
	}
}

// TestMQTTMTLS: a mosquitto TLS listener that requires a client certificate refuses a sink without one (its
// health shows it) and takes the events of a sink with cert_file and key_file.
func TestMQTTMTLS(t *testing.T) {
	pki := newTestPKI(t)
	start := func(t *testing.T) (*mosquittotest.Broker, string) {
		t.Helper()
		b, port, err := startBrokerWith(t, func(port int) []string { return pki.tlsListener(port, true) })
		if err != nil {
			t.Fatalf("mosquitto with a TLS listener: %v", err)
		}
		return b, "ssl://127.0.0.1:" + strconv.Itoa(port)
	}

	t.Run("without client certificate", func(t *testing.T) {
		b, url := start(t)
		col := collect(t, b.URL(), "edgegate/gw1/events/#")
		got := checkSinkRefused(t, tlsMQTTSink(url, TLSConfig{CAFile: pki.caFile}), col.unique)
		// With TLS 1.3 the client's handshake ends before the server has checked the client: the refusal
		// arrives as an alert on the first read (certificate required) or as the connection's end.
		if !strings.Contains(got, "certificate required") && !strings.Contains(got, "EOF") &&
			!strings.Contains(got, "connection reset") {
			t.Errorf("last error %q does not show the connection refused", got)
		}
		waitFor(t, 5*time.Second, "the broker's refusal in its log", func() bool {
			return strings.Contains(b.Log(), "peer did not return a certificate")
		})
	})
	t.Run("with client certificate", func(t *testing.T) {
		b, url := start(t)
		checkMQTTDelivers(t, b.URL(), tlsMQTTSink(url, TLSConfig{CAFile: pki.caFile,
			CertFile: pki.clientCert, KeyFile: pki.clientKey}))
	})
}

// TestMQTTWebSocket: an MQTT sink delivers over ws:// and wss:// to mosquitto's websockets listener.
func TestMQTTWebSocket(t *testing.T) {
	pki := newTestPKI(t)
	tests := []struct {
		scheme string
		tls    bool
	}{{"ws", false}, {"wss", true}}
	for _, tc := range tests {
		t.Run(tc.scheme, func(t *testing.T) {
			b, port, err := startBrokerWith(t, func(port int) []string {
				// socket_domain ipv4 keeps the websockets listener on 127.0.0.1: without it mosquitto 2.0 binds
				// it to every address.
				lines := []string{fmt.Sprintf("listener %d 127.0.0.1", port), "socket_domain ipv4", "protocol websockets"}
				if tc.tls {
					lines = append(lines, "cafile "+pki.caFile, "certfile "+pki.serverCert, "keyfile "+pki.serverKey)
				}
				return lines
			})
			if err != nil {
				t.Fatalf("mosquitto does not start with a websockets listener (Debian's mosquitto package has them): %v", err)
			}
			sc := tlsMQTTSink(fmt.Sprintf("%s://127.0.0.1:%d/mqtt", tc.scheme, port), TLSConfig{})
			if tc.tls {
				sc.MQTT.TLS.CAFile = pki.caFile
			}
			checkMQTTDelivers(t, b.URL(), sc)
		})
	}
}

// lockedBuffer collects what a server logs.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// mtlsUpstream is an HTTPS server on 127.0.0.1 with the PKI's server certificate that requires a client
// certificate of the PKI's CA; it records the common name of the client of every request.
type mtlsUpstream struct {
	srv    *httptest.Server
	errLog lockedBuffer
	mu     sync.Mutex
	bodies []string
	peers  []string
}

func newMTLSUpstream(t *testing.T, pki *testPKI) *mtlsUpstream {
	t.Helper()
	u := &mtlsUpstream{}
	u.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		peer := ""
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			peer = r.TLS.PeerCertificates[0].Subject.CommonName
		}
		u.mu.Lock()
		u.bodies = append(u.bodies, string(body))
		u.peers = append(u.peers, peer)
		u.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	u.srv.TLS = &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{pki.server},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pki.pool,
	}
	u.srv.Config.ErrorLog = stdlog.New(&u.errLog, "", 0)
	u.srv.StartTLS()
	t.Cleanup(u.srv.Close)
	if host, _, err := net.SplitHostPort(u.srv.Listener.Addr().String()); err != nil || host != "127.0.0.1" {
		t.Fatalf("the test server listens on %s, want 127.0.0.1", u.srv.Listener.Addr())
	}
	return u
}

func (u *mtlsUpstream) requests() (bodies, peers []string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.bodies...), append([]string(nil), u.peers...)
}

func (u *mtlsUpstream) count() int {
	b, _ := u.requests()
	return len(b)
}

func tlsHTTPSink(url string, tc TLSConfig) SinkConfig {
	sc := fastSink("web", TypeHTTP)
	sc.HTTP = &HTTPConfig{URL: url, TLS: tc}
	return sc
}

// TestHTTPMTLS: an HTTPS upstream that requires a client certificate gets no request from a sink without one
// (its health shows the refusal) and every event from a sink with cert_file and key_file; a sink that verifies
// the server with the system roots is refused with the certificate problem in its health.
func TestHTTPMTLS(t *testing.T) {
	pki := newTestPKI(t)

	t.Run("without client certificate", func(t *testing.T) {
		up := newMTLSUpstream(t, pki)
		got := checkSinkRefused(t, tlsHTTPSink(up.srv.URL, TLSConfig{CAFile: pki.caFile}), up.count)
		if !strings.Contains(got, "certificate required") && !strings.Contains(got, "EOF") &&
			!strings.Contains(got, "connection reset") {
			t.Errorf("last error %q does not show the request refused", got)
		}
		waitFor(t, 5*time.Second, "the server's refusal in its log", func() bool {
			return strings.Contains(up.errLog.String(), "client didn't provide a certificate")
		})
	})
	t.Run("system roots", func(t *testing.T) {
		up := newMTLSUpstream(t, pki)
		checkSinkRefused(t, tlsHTTPSink(up.srv.URL, TLSConfig{CertFile: pki.clientCert, KeyFile: pki.clientKey}),
			up.count, "x509: certificate signed by unknown authority")
	})
	t.Run("with client certificate", func(t *testing.T) {
		up := newMTLSUpstream(t, pki)
		log := newMemLog(t)
		for i := range tlsTestEvents {
			log.add("sensor.reading", "hall", i+1)
		}
		sc := tlsHTTPSink(up.srv.URL, TLSConfig{CAFile: pki.caFile, CertFile: pki.clientCert, KeyFile: pki.clientKey})
		r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
		waitSink(t, r, "web", 15*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:web") == tlsTestEvents })
		bodies, peers := up.requests()
		if len(bodies) != tlsTestEvents {
			t.Fatalf("%d requests, want %d", len(bodies), tlsTestEvents)
		}
		recs, _ := log.Read(0, tlsTestEvents)
		for i := range bodies {
			if bodies[i] != string(recs[i].Data) {
				t.Errorf("request %d carried %s, want %s", i, bodies[i], recs[i].Data)
			}
			if peers[i] != testClientCN {
				t.Errorf("request %d came from client %q, want %q", i, peers[i], testClientCN)
			}
		}
		if h := sinkHealth(r, "web"); !h.Healthy || h.LastError != "" || h.Cursor != tlsTestEvents {
			t.Errorf("health = %+v, want healthy without an error", h)
		}
		if l := up.errLog.String(); l != "" {
			t.Errorf("the server logged errors:\n%s", l)
		}
	})
}

// TestClientCertificateRenewal: a sink's new TLS connections use its client certificate as renewed on disk, with
// no restart; a renewal that does not load (a truncated file) keeps the previous certificate in use.
func TestClientCertificateRenewal(t *testing.T) {
	pki := newTestPKI(t)
	up := newMTLSUpstream(t, pki)
	log := newMemLog(t)
	sc := tlsHTTPSink(up.srv.URL, TLSConfig{CAFile: pki.caFile, CertFile: pki.clientCert, KeyFile: pki.clientKey})
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	deliver := func(n int, what string) string {
		t.Helper()
		up.srv.CloseClientConnections() // the next request makes a new TLS connection
		log.add("sensor.reading", "hall", n)
		waitSink(t, r, "web", 15*time.Second, what, func() bool { return log.Cursor("sink:web") == uint64(n) })
		_, peers := up.requests()
		return peers[len(peers)-1]
	}
	if got := deliver(1, "the first event"); got != testClientCN {
		t.Fatalf("first request from %q, want %q", got, testClientCN)
	}

	pki.renewClient("edgegate-renewed")
	if got := deliver(2, "an event after the renewal"); got != "edgegate-renewed" {
		t.Fatalf("request after the renewal from %q, want edgegate-renewed", got)
	}

	data, err := os.ReadFile(pki.clientCert)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pki.clientCert, data[:len(data)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	if got := deliver(3, "an event after a broken renewal"); got != "edgegate-renewed" {
		t.Fatalf("request after a broken renewal from %q, want the previous certificate's edgegate-renewed", got)
	}
}
