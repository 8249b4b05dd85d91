//go:build linux

package e2e

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Link is a TCP forwarder from a free 127.0.0.1 port to a target that can be taken down and brought back up on
// the same port: down, it drops every connection and closes each new one at once (a client sees the upstream
// refuse), while the target itself keeps running. A scenario uses it for an upstream outage that does not
// kill the broker, which would lose the broker's own deliveries in transit to other subscribers. Block refuses
// the connections of one MQTT client only (an outage of one of several connections of a gateway).
type Link struct {
	ln     net.Listener
	target string
	down   atomic.Bool
	closed atomic.Bool

	mu        sync.Mutex
	conns     map[net.Conn]struct{}
	screening map[net.Conn]struct{} // accepted, their CONNECT not read yet
	blocked   map[string]bool       // MQTT client ids refused
	wg        sync.WaitGroup
}

// NewLink starts a link to target (host:port); the test's cleanup closes it.
func NewLink(t testing.TB, target string) *Link {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("e2e: link: %v", err)
	}
	l := &Link{ln: ln, target: target, conns: map[net.Conn]struct{}{}, screening: map[net.Conn]struct{}{},
		blocked: map[string]bool{}}
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

// Block refuses the new connections of the MQTT client clientID until Unblock: while any client is blocked the
// link reads each new connection's CONNECT packet before it dials the target, and closes the connection when
// the packet names a blocked client id (or cannot be read). Connections open already are left alone.
func (l *Link) Block(clientID string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.blocked[clientID] = true
}

// Unblock lets the client clientID connect again.
func (l *Link) Unblock(clientID string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.blocked, clientID)
}

func (l *Link) isBlocked(clientID string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.blocked[clientID]
}

func (l *Link) blocking() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.blocked) > 0
}

// Conns counts the forwarded connections open now.
func (l *Link) Conns() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns) / 2
}

// Close stops the link and waits for its goroutines.
func (l *Link) Close() {
	l.closed.Store(true)
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
	for c := range l.screening {
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
		if !l.blocking() {
			l.forward(c, nil)
			continue
		}
		l.mu.Lock()
		l.screening[c] = struct{}{}
		l.mu.Unlock()
		if l.down.Load() || l.closed.Load() { // Down or Close ran meanwhile: screen's read fails at once
			_ = c.Close()
		}
		l.wg.Add(1)
		go l.screen(c)
	}
}

// screen reads the CONNECT of a new connection and forwards the connection unless its client is blocked.
func (l *Link) screen(c net.Conn) {
	defer l.wg.Done()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	packet, id, err := readConnect(c)
	_ = c.SetReadDeadline(time.Time{})
	l.mu.Lock()
	delete(l.screening, c)
	l.mu.Unlock()
	if err != nil || l.isBlocked(id) || l.down.Load() {
		_ = c.Close()
		return
	}
	l.forward(c, packet)
}

// forward dials the target, writes first (what was read from c already) to it and pipes the two connections
// into each other.
func (l *Link) forward(c net.Conn, first []byte) {
	up, err := net.Dial("tcp", l.target)
	if err != nil {
		_ = c.Close()
		return
	}
	if len(first) > 0 {
		if _, err := up.Write(first); err != nil {
			_ = up.Close()
			_ = c.Close()
			return
		}
	}
	l.mu.Lock()
	l.conns[c], l.conns[up] = struct{}{}, struct{}{}
	l.mu.Unlock()
	if l.down.Load() || l.closed.Load() { // Down or Close ran while this one was being dialled
		l.dropAll()
	}
	l.wg.Add(2)
	go l.pipe(c, up)
	go l.pipe(up, c)
}

// readConnect reads an MQTT CONNECT packet (3.1, 3.1.1 or 5) from r and returns its bytes and client id.
func readConnect(r io.Reader) (packet []byte, clientID string, err error) {
	// Byte by byte up to the body, so that nothing past the packet is read.
	one := make([]byte, 1)
	readByte := func() (byte, error) {
		_, err := io.ReadFull(r, one)
		return one[0], err
	}
	head, err := readByte()
	if err != nil {
		return nil, "", fmt.Errorf("read CONNECT: %w", err)
	}
	if head != 0x10 {
		return nil, "", fmt.Errorf("read CONNECT: first packet has header %#x", head)
	}
	packet = append(packet, head)
	size, mult := 0, 1
	for i := 0; ; i++ {
		b, err := readByte()
		if err != nil {
			return nil, "", fmt.Errorf("read CONNECT: %w", err)
		}
		packet = append(packet, b)
		size += int(b&0x7f) * mult
		mult <<= 7
		if b&0x80 == 0 {
			break
		}
		if i == 3 {
			return nil, "", errors.New("read CONNECT: bad remaining length")
		}
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, "", fmt.Errorf("read CONNECT: %w", err)
	}
	packet = append(packet, body...)
	// Variable header: protocol name, level, flags, keep-alive; MQTT 5 adds properties. Then the client id.
	str := func() (string, bool) {
		if len(body) < 2 {
			return "", false
		}
		n := int(binary.BigEndian.Uint16(body))
		if len(body) < 2+n {
			return "", false
		}
		v := string(body[2 : 2+n])
		body = body[2+n:]
		return v, true
	}
	if _, ok := str(); !ok || len(body) < 4 {
		return nil, "", errors.New("read CONNECT: short variable header")
	}
	level := body[0]
	body = body[4:]
	if level == 5 {
		n, used := binary.Uvarint(body) // MQTT's variable byte integer has the same encoding
		if used <= 0 || len(body) < used+int(n) {
			return nil, "", errors.New("read CONNECT: bad properties")
		}
		body = body[used+int(n):]
	}
	id, ok := str()
	if !ok {
		return nil, "", errors.New("read CONNECT: no client id")
	}
	return packet, id, nil
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
