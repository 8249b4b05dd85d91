package ingest

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// ErrAddrInUse is returned (wrapped) when a listener's port is already taken.
var ErrAddrInUse = errors.New("address already in use")

// bind opens a TCP listener and turns "address in use" into an error that says what to do.
func bind(key, addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, fmt.Errorf("ingest: listen %s: port %s is already in use (another MQTT broker such as a system Mosquitto?): stop it or change %s in the config: %w",
				key, portOf(addr), key, ErrAddrInUse)
		}
		return nil, fmt.Errorf("ingest: listen %s on %s: %w", key, addr, err)
	}
	return ln, nil
}

func portOf(addr string) string {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return p
}

// guard holds what every listener shares: connection caps, the CONNECT deadline and panic containment.
type guard struct {
	log            *slog.Logger
	m              *metrics
	connectTimeout time.Duration
	maxPacket      int
	maxConns       int64
	maxPerIP       int

	open  atomic.Int64
	mu    sync.Mutex
	perIP map[string]int
	// pending holds the connections whose MQTT session is not established yet: at shutdown mochi waits for
	// them to finish reading their CONNECT, so they are closed first.
	pending map[net.Conn]struct{}
	// drained is made when closePending is first called (the broker is stopping: connections still arriving
	// are closed at once) and closed once pending is empty.
	drained chan struct{}
	wg      sync.WaitGroup // every connection goroutine

	// onAbandon is called with the connection once serving it ended, normally or by a panic (panicked), to end
	// what mochi left of its client: mochi ends a client's session only once it has read from the connection.
	onAbandon func(conn net.Conn, panicked bool)
	// disconnect ends the sessions of a closing listener's clients, in place of the CloseFn mochi passes to the
	// listener's Close (see Broker.disconnectListener).
	disconnect func(listener string)
}

func newGuard(cfg BrokerConfig, log *slog.Logger, m *metrics) *guard {
	return &guard{
		log:            log,
		m:              m,
		connectTimeout: cfg.ConnectTimeout,
		maxPacket:      cfg.MaxPacketBytes,
		maxConns:       int64(cfg.MaxConnections),
		maxPerIP:       cfg.MaxConnectionsPerIP,
		perIP:          make(map[string]int),
		pending:        make(map[net.Conn]struct{}),
	}
}

// closePending closes every connection whose session is not established (shutdown), and waits (up to limit) until
// each of them has either ended or got its session; connections arriving from now on are closed without reaching
// mochi. Then mochi's Close can wait for its clients safely: its server counts a connection (a WaitGroup Add)
// inside the connection's own goroutine, and a count that starts while Close is waiting panics ("WaitGroup is
// reused before previous Wait has returned").
func (g *guard) closePending(limit time.Duration) {
	g.mu.Lock()
	if g.drained == nil {
		g.drained = make(chan struct{})
		if len(g.pending) == 0 {
			close(g.drained)
		}
	}
	open := make([]net.Conn, 0, len(g.pending))
	for c := range g.pending {
		open = append(open, c)
	}
	drained := g.drained
	g.mu.Unlock()
	for _, c := range open { // outside the lock: closing a connection may release its place under the caps
		_ = c.Close()
	}
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-drained:
	case <-t.C:
		g.log.Warn("connections still reading their CONNECT after the shutdown closed them", "waited", limit)
	}
}

// established records that conn carries an MQTT session now, or has ended.
func (g *guard) established(conn net.Conn) {
	g.mu.Lock()
	if _, ok := g.pending[conn]; ok {
		delete(g.pending, conn)
		if g.drained != nil && len(g.pending) == 0 {
			close(g.drained)
		}
	}
	g.mu.Unlock()
}

// admit counts a new connection against the caps; it returns a release func, or "" and a refusal reason.
func (g *guard) admit(remote net.Addr) (release func(), reason string) {
	ip := hostOf(remote)
	if g.open.Add(1) > g.maxConns {
		g.open.Add(-1)
		return nil, "max_connections"
	}
	g.mu.Lock()
	if g.perIP[ip] >= g.maxPerIP {
		g.mu.Unlock()
		g.open.Add(-1)
		return nil, "max_connections_per_ip"
	}
	g.perIP[ip]++
	g.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			g.open.Add(-1)
			g.mu.Lock()
			if g.perIP[ip]--; g.perIP[ip] <= 0 {
				delete(g.perIP, ip)
			}
			g.mu.Unlock()
		})
	}, ""
}

func hostOf(a net.Addr) string {
	if a == nil {
		return ""
	}
	if t, ok := a.(*net.TCPAddr); ok {
		return t.IP.String()
	}
	h, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return h
}

// serve runs one admitted connection through mochi, containing any panic to this connection.
func (g *guard) serve(listener string, c net.Conn, release func(), establish listeners.EstablishFn) {
	defer g.wg.Done()
	defer release()
	defer c.Close()
	// mochi allocates a packet's announced length as soon as it read the fixed header: the CONNECT, which anyone
	// may send, is held back until all of it arrived, so that it costs only the bytes that did.
	var conn net.Conn = &connectConn{Conn: c, max: g.maxPacket}
	g.mu.Lock()
	if g.drained != nil {
		g.mu.Unlock()
		return // the broker is stopping: the connection never reaches mochi (see closePending)
	}
	g.pending[conn] = struct{}{}
	g.mu.Unlock()
	defer g.established(conn) // forgotten when it ends, whether or not it got a session
	defer func() {
		if r := recover(); r != nil {
			g.m.panics.Inc()
			g.log.Error("panic while serving a connection; connection closed", "listener", listener,
				"remote", conn.RemoteAddr().String(), "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			g.abandon(conn, true)
		}
	}()
	// CONNECT (and the TLS handshake) must complete before this deadline; mochi replaces it with the
	// keep-alive deadline once the client is connected.
	_ = conn.SetDeadline(time.Now().Add(g.connectTimeout))
	g.m.connections.Inc()
	defer g.m.connections.Dec()
	if err := establish(listener, conn); err != nil && !isClosing(err) {
		if reason := closeReason(err); reason != "" {
			g.m.closed.WithLabelValues(reason).Inc()
		}
		g.log.Debug("connection ended", "listener", listener, "remote", conn.RemoteAddr().String(), "error", err)
	}
	// A connection that ended before mochi read from it after the CONNACK (the CONNACK could not be written, the
	// client left while its credentials were checked) has a client that mochi never ends.
	g.abandon(conn, false)
}

// abandon forgets the client of a connection whose serving ended without mochi ending its session: after a
// panic, or before mochi read from the connection.
func (g *guard) abandon(conn net.Conn, panicked bool) {
	if g.onAbandon == nil {
		return
	}
	defer func() {
		if r := recover(); r != nil {
			g.log.Error("panic while forgetting the client of a failed connection", "panic", fmt.Sprint(r))
		}
	}()
	g.onAbandon(conn, panicked)
}

func isClosing(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)
}

// closeReason says why the broker ended a connection on the client's fault, as a label of
// edgegate_ingest_connections_closed_total: "too_large", "timeout" or "malformed"; "" for ordinary ends (a
// DISCONNECT, a reset by the peer, a connection lost in the middle of a packet, a WebSocket close frame) and for
// refusals other metrics count (logins: edgegate_ingest_auth_failures_total; publishes: edgegate_ingest_acl_denied_total).
func closeReason(err error) string {
	var code packets.Code
	var ne net.Error
	var wsClose *websocket.CloseError
	switch {
	case errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.As(err, &wsClose):
		return ""
	case errors.As(err, &code):
		switch code.Code {
		case packets.ErrPacketTooLarge.Code:
			return "too_large"
		case packets.ErrBadUsernameOrPassword.Code, packets.ErrNotAuthorized.Code:
			return ""
		}
		if code.Code < packets.ErrUnspecifiedError.Code {
			return "" // success and normal disconnection codes
		}
		return "malformed"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return "malformed"
}

// tcpListener is a mochi listener over an already bound net.Listener (plain or TLS).
type tcpListener struct {
	id    string
	proto string
	ln    net.Listener
	g     *guard
	done  atomic.Bool
}

var _ listeners.Listener = (*tcpListener)(nil)

func (l *tcpListener) ID() string                { return l.id }
func (l *tcpListener) Address() string           { return l.ln.Addr().String() }
func (l *tcpListener) Protocol() string          { return l.proto }
func (l *tcpListener) Init(_ *slog.Logger) error { return nil }

func (l *tcpListener) Serve(establish listeners.EstablishFn) {
	var tempDelay time.Duration
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if l.done.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Accept errors such as EMFILE are temporary: back off instead of spinning.
			if tempDelay == 0 {
				tempDelay = 5 * time.Millisecond
			} else if tempDelay *= 2; tempDelay > time.Second {
				tempDelay = time.Second
			}
			l.g.log.Warn("accept failed", "listener", l.id, "error", err, "retry_in", tempDelay)
			time.Sleep(tempDelay)
			continue
		}
		tempDelay = 0
		release, ok := l.g.admitConn(l.id, conn)
		if !ok {
			continue
		}
		l.g.wg.Add(1)
		go l.g.serve(l.id, conn, release, establish)
	}
}

func (l *tcpListener) Close(listeners.CloseFn) {
	if l.done.CompareAndSwap(false, true) {
		_ = l.ln.Close()
	}
	l.g.disconnect(l.id)
}

// wsListener serves MQTT over WebSocket (subprotocol "mqtt") on an already bound net.Listener.
type wsListener struct {
	id       string
	ln       net.Listener
	g        *guard
	maxBytes int64
	srv      *http.Server
	done     atomic.Bool
}

var _ listeners.Listener = (*wsListener)(nil)

func (l *wsListener) ID() string                { return l.id }
func (l *wsListener) Address() string           { return l.ln.Addr().String() }
func (l *wsListener) Protocol() string          { return "ws" }
func (l *wsListener) Init(_ *slog.Logger) error { return nil }

func (l *wsListener) Serve(establish listeners.EstablishFn) {
	up := websocket.Upgrader{
		Subprotocols: []string{"mqtt"},
		CheckOrigin:  func(*http.Request) bool { return true },
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		raw := c.UnderlyingConn()
		ac, ok := raw.(*admittedConn)
		if !ok { // not reached: every connection comes through admitListener
			_ = c.Close()
			return
		}
		c.SetReadLimit(l.maxBytes)
		l.g.wg.Add(1)
		l.g.serve(l.id, &wsConn{Conn: raw, c: c}, ac.release, establish)
	})
	// A connection counts against the caps from its accept, and must upgrade within connect_timeout: the request
	// (headers and body), its answer and the wait for a next request are each bounded by it. Once upgraded, the
	// guard sets the CONNECT deadline.
	t := l.g.connectTimeout
	l.srv = &http.Server{Handler: mux, ReadHeaderTimeout: t, ReadTimeout: t, WriteTimeout: t, IdleTimeout: t,
		ErrorLog: slog.NewLogLogger(l.g.log.Handler(), slog.LevelDebug)}
	if err := l.srv.Serve(admitListener{Listener: l.ln, id: l.id, g: l.g}); err != nil && !errors.Is(err, http.ErrServerClosed) && !l.done.Load() {
		l.g.log.Error("websocket listener stopped", "listener", l.id, "error", err)
	}
}

func (l *wsListener) Close(listeners.CloseFn) {
	if l.done.CompareAndSwap(false, true) {
		if l.srv != nil {
			_ = l.srv.Close()
		}
		_ = l.ln.Close()
	}
	l.g.disconnect(l.id)
}

// admitListener counts each accepted connection against the caps, and closes those over them at once.
type admitListener struct {
	net.Listener
	id string
	g  *guard
}

func (a admitListener) Accept() (net.Conn, error) {
	for {
		c, err := a.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if release, ok := a.g.admitConn(a.id, c); ok {
			return &admittedConn{Conn: c, release: release}, nil
		}
	}
}

// admitConn counts conn, just accepted on listener id, against the caps; one over them is counted, logged and
// closed (ok false).
func (g *guard) admitConn(id string, conn net.Conn) (release func(), ok bool) {
	release, reason := g.admit(conn.RemoteAddr())
	if reason == "" {
		return release, true
	}
	g.m.refused.WithLabelValues(reason).Inc()
	g.log.Debug("connection refused", "listener", id, "remote", conn.RemoteAddr().String(), "reason", reason)
	_ = conn.Close()
	return nil, false
}

// admittedConn releases its place under the caps when it is closed (release runs once).
type admittedConn struct {
	net.Conn
	release func()
}

func (c *admittedConn) Close() error {
	err := c.Conn.Close()
	c.release()
	return err
}

// connectConn hands the connection's first packet (CONNECT) on only once all of it has arrived, read into a
// buffer that grows with what arrives; after it, reads go straight to the connection. A first packet that is not
// a CONNECT, or larger than max, is handed on as it is, for mochi to refuse from its fixed header. Only mochi's
// reader calls Read.
type connectConn struct {
	net.Conn
	max  int
	done bool   // the first packet is read (or is not to be held back)
	buf  []byte // read and not yet handed on
	err  error  // the error that ended the reading of the first packet, returned once buf is handed on
}

// connectChunk is how much of a CONNECT is read at a time: the buffer grows with the bytes that arrive.
const connectChunk = 4 << 10

func (c *connectConn) Read(p []byte) (int, error) {
	if !c.done {
		c.fill()
	}
	if len(c.buf) > 0 {
		n := copy(p, c.buf)
		if c.buf = c.buf[n:]; len(c.buf) == 0 {
			c.buf = nil
		}
		return n, nil
	}
	if c.err != nil {
		err := c.err
		c.err = nil
		return 0, err
	}
	return c.Conn.Read(p)
}

// fill reads until buf holds the first packet whole, or the first packet is not to be held back, or the
// connection fails.
func (c *connectConn) fill() {
	defer func() { c.done = true }()
	for {
		if want, ok := c.firstPacketSize(); ok {
			if want < 0 || len(c.buf) >= want {
				return
			}
			c.buf = slices.Grow(c.buf, min(want-len(c.buf), connectChunk))
		} else {
			c.buf = slices.Grow(c.buf, 8)
		}
		n, err := c.Conn.Read(c.buf[len(c.buf):cap(c.buf)])
		c.buf = c.buf[:len(c.buf)+n]
		if err != nil {
			c.err = err
			return
		}
	}
}

// firstPacketSize returns the size of the first packet once its fixed header is in buf (ok), or -1 when it is not
// to be held back: not a CONNECT, a malformed length, or over max.
func (c *connectConn) firstPacketSize() (size int, ok bool) {
	if len(c.buf) == 0 {
		return 0, false
	}
	if c.buf[0]>>4 != packets.Connect {
		return -1, true
	}
	n, mul := 0, 1
	for i := 1; i < len(c.buf); i++ {
		n += int(c.buf[i]&0x7f) * mul
		if c.buf[i]&0x80 == 0 {
			if n+1 > c.max {
				return -1, true
			}
			return i + 1 + n, true
		}
		if mul *= 128; i == 4 {
			return -1, true // a fifth length byte: malformed
		}
	}
	return 0, false
}

// wsConn presents a WebSocket as a byte stream: binary messages in, one binary message per write out.
type wsConn struct {
	net.Conn
	c  *websocket.Conn
	r  io.Reader
	wm sync.Mutex
}

func (w *wsConn) Read(p []byte) (int, error) {
	for {
		if w.r == nil {
			op, r, err := w.c.NextReader()
			if err != nil {
				return 0, err
			}
			if op != websocket.BinaryMessage {
				return 0, errors.New("websocket: MQTT needs binary messages")
			}
			w.r = r
		}
		n, err := w.r.Read(p)
		if errors.Is(err, io.EOF) {
			w.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (w *wsConn) Write(p []byte) (int, error) {
	w.wm.Lock()
	defer w.wm.Unlock()
	if err := w.c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// tlsState returns the TLS connection state of conn, if it is a TLS connection.
func tlsState(conn net.Conn) (tls.ConnectionState, bool) {
	if cc, ok := conn.(*connectConn); ok {
		conn = cc.Conn
	}
	if tc, ok := conn.(*tls.Conn); ok {
		return tc.ConnectionState(), true
	}
	return tls.ConnectionState{}, false
}
