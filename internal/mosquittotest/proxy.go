package mosquittotest

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Proxy forwards TCP connections from a free 127.0.0.1 port to a target address. A test uses it to break the
// path between a client and a broker: ResetAll drops every connection, Blackhole keeps the connections open but
// swallows what the broker sends back (acknowledgements never arrive: a stall). The test's cleanup closes it.
type Proxy struct {
	t      testing.TB
	ln     net.Listener
	target string

	blackhole atomic.Bool
	accepted  atomic.Int64

	mu     sync.Mutex
	conns  map[*proxyConn]struct{}
	closed bool
	wg     sync.WaitGroup
}

type proxyConn struct {
	client, upstream net.Conn
	once             sync.Once
}

// close drops both sides at once (RST, no lingering), which a peer sees as a broken connection.
func (c *proxyConn) close() {
	c.once.Do(func() {
		for _, nc := range []net.Conn{c.client, c.upstream} {
			if tc, ok := nc.(*net.TCPConn); ok {
				_ = tc.SetLinger(0)
			}
			_ = nc.Close()
		}
	})
}

// NewProxy starts a proxy on a free 127.0.0.1 port that forwards every connection to target (host:port).
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("mosquittotest: proxy: %v", err)
	}
	p := &Proxy{t: t, ln: ln, target: target, conns: make(map[*proxyConn]struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// Addr is the proxy's host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// URL is the proxy's address as an MQTT URL for paho: tcp://127.0.0.1:PORT.
func (p *Proxy) URL() string { return "tcp://" + p.Addr() }

// Accepted counts the connections accepted so far.
func (p *Proxy) Accepted() int { return int(p.accepted.Load()) }

// Conns counts the connections open now.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// ResetAll drops every open connection (both sides see a reset) and returns how many there were. New
// connections are accepted as before.
func (p *Proxy) ResetAll() int {
	p.mu.Lock()
	conns := make([]*proxyConn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
		delete(p.conns, c)
	}
	p.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
	return len(conns)
}

// Blackhole, when on, keeps accepting and forwarding client bytes to the target but discards every byte the
// target sends back, on open and new connections alike; off restores forwarding (bytes discarded meanwhile are
// gone, as on a lossy path).
func (p *Proxy) Blackhole(on bool) { p.blackhole.Store(on) }

// Close stops accepting, drops every connection and waits for the proxy's goroutines.
func (p *Proxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.mu.Unlock()
	_ = p.ln.Close()
	p.ResetAll()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			p.t.Logf("mosquittotest: proxy accept: %v", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		p.accepted.Add(1)
		upstream, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			// The target is down: the client sees its connection refused, as it would without the proxy.
			if tc, ok := client.(*net.TCPConn); ok {
				_ = tc.SetLinger(0)
			}
			_ = client.Close()
			continue
		}
		c := &proxyConn{client: client, upstream: upstream}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.close()
			return
		}
		p.conns[c] = struct{}{}
		p.wg.Add(2)
		p.mu.Unlock()
		go p.pipe(c, upstream, client, false)
		go p.pipe(c, client, upstream, true)
	}
}

// pipe copies src to dst until either side fails; bytes from the target are discarded while the blackhole is on.
func (p *Proxy) pipe(c *proxyConn, dst, src net.Conn, fromTarget bool) {
	defer p.wg.Done()
	defer func() {
		c.close()
		p.mu.Lock()
		delete(p.conns, c)
		p.mu.Unlock()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !(fromTarget && p.blackhole.Load()) {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
