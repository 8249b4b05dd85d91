package forward

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"golang.org/x/net/proxy"
)

// Sizes of a gatheredConn's buffers.
const (
	connReadBuffer = 32 << 10
	// connWriteQueue is how many bytes may wait to be sent; a Write beyond it waits (back-pressure).
	connWriteQueue = 256 << 10
	// connCloseFlush bounds how long Close waits for queued bytes (a DISCONNECT) to be sent.
	connCloseFlush = 250 * time.Millisecond
)

// gatheredConn is the connection an MQTT sink's paho client uses for tcp:// and ssl:// upstreams. paho reads
// every packet with several small reads (a byte of header, the length a byte at a time, then the body) and
// writes every packet with a write of its own: one system call or more per PUBLISH and per PUBACK, which bounds
// how fast a backlog drains. gatheredConn reads through a buffer, and queues writes for a goroutine of its own
// that sends what has gathered while the previous write was on its way: a run of publishes leaves in one write.
//
// Write returns once the bytes are queued. A failed send closes the connection (paho sees it lost) and is
// returned by the next Write. Writes are bounded by the client's write timeout (SetWriteDeadline is ignored:
// the sending goroutine sets the deadline of each write itself). Close sends what is queued, within
// connCloseFlush, then closes.
type gatheredConn struct {
	net.Conn
	r            *bufio.Reader
	writeTimeout time.Duration

	mu      sync.Mutex
	cond    *sync.Cond // signals queued bytes, sent bytes, an error and Close
	queue   []byte
	spare   []byte
	err     error
	closing bool
	done    chan struct{} // closed when the sending goroutine has returned
}

func newGatheredConn(c net.Conn, writeTimeout time.Duration) *gatheredConn {
	g := &gatheredConn{Conn: c, r: bufio.NewReaderSize(c, connReadBuffer), writeTimeout: writeTimeout,
		done: make(chan struct{})}
	g.cond = sync.NewCond(&g.mu)
	go g.send()
	return g
}

// Read reads through the buffer. Once a failed send has closed the connection, a read that fails because of that
// close returns the send's error instead, which says why the connection went (a refused certificate, a reset).
func (g *gatheredConn) Read(p []byte) (int, error) {
	n, err := g.r.Read(p)
	if err != nil && errors.Is(err, net.ErrClosed) {
		g.mu.Lock()
		werr := g.err
		g.mu.Unlock()
		if werr != nil {
			return n, werr
		}
	}
	return n, err
}

// Write queues p; it waits while connWriteQueue bytes are queued already.
func (g *gatheredConn) Write(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.err == nil && !g.closing && len(g.queue) >= connWriteQueue {
		g.cond.Wait()
	}
	switch {
	case g.err != nil:
		return 0, g.err
	case g.closing:
		return 0, net.ErrClosed
	}
	g.queue = append(g.queue, p...)
	g.cond.Broadcast()
	return len(p), nil
}

// send writes what is queued until the connection fails or is closed with nothing left to send.
func (g *gatheredConn) send() {
	defer close(g.done)
	g.mu.Lock()
	defer g.mu.Unlock()
	for {
		for len(g.queue) == 0 && !g.closing {
			g.cond.Wait()
		}
		if len(g.queue) == 0 {
			return
		}
		out := g.queue
		g.queue = g.spare[:0]
		g.mu.Unlock()
		if g.writeTimeout > 0 {
			_ = g.Conn.SetWriteDeadline(time.Now().Add(g.writeTimeout))
		}
		_, err := g.Conn.Write(out)
		g.mu.Lock()
		g.spare = out[:0]
		if cap(g.spare) > 4*connWriteQueue {
			g.spare = nil // a burst grew it; do not keep it
		}
		if err != nil {
			g.err = fmt.Errorf("write: %w", err)
			g.queue = nil
			g.cond.Broadcast()
			_ = g.Conn.Close() // the reader fails as well: the client sees the connection lost
			return
		}
		g.cond.Broadcast()
	}
}

// SetDeadline sets the read deadline; see SetWriteDeadline.
func (g *gatheredConn) SetDeadline(t time.Time) error { return g.Conn.SetReadDeadline(t) }

// SetWriteDeadline does nothing: every write is bounded by the write timeout given at creation.
func (g *gatheredConn) SetWriteDeadline(time.Time) error { return nil }

// Close sends what is queued (at most connCloseFlush long), closes the connection and waits for the sending
// goroutine.
func (g *gatheredConn) Close() error {
	g.mu.Lock()
	g.closing = true
	g.cond.Broadcast()
	g.mu.Unlock()
	t := time.NewTimer(connCloseFlush)
	defer t.Stop()
	select {
	case <-g.done:
	case <-t.C:
	}
	err := g.Conn.Close()
	<-g.done
	return err
}

// gatheredDialer returns paho's connection opener for tcp://, mqtt://, ssl://, tls:// and mqtts:// URLs (the
// connection is a gatheredConn), or nil for the other schemes (paho opens those itself). Like paho, it honours
// the proxy environment variables (all_proxy, no_proxy).
func gatheredDialer(scheme string) paho.OpenConnectionFunc {
	switch scheme {
	case "tcp", "mqtt", "ssl", "tls", "mqtts":
	default:
		return nil
	}
	return func(uri *url.URL, o paho.ClientOptions) (net.Conn, error) {
		d := &net.Dialer{Timeout: o.ConnectTimeout}
		c, err := proxy.FromEnvironmentUsing(d).Dial("tcp", mqttHostPort(uri)) // a URL may name no port
		if err != nil {
			return nil, err
		}
		if uri.Scheme == "ssl" || uri.Scheme == "tls" || uri.Scheme == "mqtts" {
			cfg := &tls.Config{}
			if o.TLSConfig != nil {
				cfg = o.TLSConfig.Clone()
			}
			if cfg.ServerName == "" {
				cfg.ServerName = uri.Hostname()
			}
			tc := tls.Client(c, cfg)
			ctx, cancel := context.WithTimeout(context.Background(), max(o.ConnectTimeout, time.Second))
			err := tc.HandshakeContext(ctx)
			cancel()
			if err != nil {
				_ = c.Close()
				return nil, err
			}
			c = tc
		}
		return newGatheredConn(c, o.WriteTimeout), nil
	}
}
