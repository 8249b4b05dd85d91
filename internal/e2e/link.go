//go:build linux

package e2e

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Link is a TCP forwarder from a free 127.0.0.1 port to a target that can be taken down and brought back up on
// the same port: down, it drops every connection and closes each new one at once (a client sees the upstream
// refuse), while the target itself keeps running. A scenario uses it for an upstream outage that does not
// kill the broker, which would lose the broker's own deliveries in transit to other subscribers.
type Link struct {
	ln     net.Listener
	target string
	down   atomic.Bool

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// NewLink starts a link to target (host:port); the test's cleanup closes it.
func NewLink(t testing.TB, target string) *Link {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("e2e: link: %v", err)
	}
	l := &Link{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	l.wg.Add(1)
	go l.accept()
	t.Cleanup(l.Close)
	return l
}

// URL is the link's address as an MQTT URL: tcp://127.0.0.1:PORT.
func (l *Link) URL() string { return "tcp://" + l.ln.Addr().String() }

// Down drops every connection and refuses new ones until Up.
func (l *Link) Down() {
	l.down.Store(true)
	l.dropAll()
}

// Up accepts and forwards connections again.
func (l *Link) Up() { l.down.Store(false) }

// Conns counts the forwarded connections open now.
func (l *Link) Conns() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns) / 2
}

// Close stops the link and waits for its goroutines.
func (l *Link) Close() {
	_ = l.ln.Close()
	l.dropAll()
	l.wg.Wait()
}

func (l *Link) dropAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for c := range l.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		_ = c.Close()
	}
}

func (l *Link) accept() {
	defer l.wg.Done()
	for {
		c, err := l.ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			continue
		}
		if l.down.Load() {
			_ = c.Close()
			continue
		}
		up, err := net.Dial("tcp", l.target)
		if err != nil {
			_ = c.Close()
			continue
		}
		l.mu.Lock()
		l.conns[c], l.conns[up] = struct{}{}, struct{}{}
		l.mu.Unlock()
		if l.down.Load() { // Down ran while this one was being dialled
			l.dropAll()
		}
		l.wg.Add(2)
		go l.pipe(c, up)
		go l.pipe(up, c)
	}
}

func (l *Link) pipe(dst, src net.Conn) {
	defer l.wg.Done()
	_, _ = io.Copy(dst, src)
	_ = dst.Close()
	_ = src.Close()
	l.mu.Lock()
	delete(l.conns, dst)
	delete(l.conns, src)
	l.mu.Unlock()
}
