package forward

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			acc <- nil
			return
		}
		acc <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-acc
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestGatheredConnKeepsOrder writes many small packets back to back and reads many small ones a byte at a
// time (as paho does): every byte arrives, in order, both ways.
func TestGatheredConnKeepsOrder(t *testing.T) {
	c, s := tcpPair(t)
	g := newGatheredConn(c, 5*time.Second)
	defer g.Close()

	var want bytes.Buffer
	for i := range 5000 {
		fmt.Fprintf(&want, "packet-%05d;", i)
	}
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(s, int64(want.Len())))
		got <- b
	}()
	for p := range bytes.SplitAfterSeq(want.Bytes(), []byte(";")) {
		if _, err := g.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case b := <-got:
		if !bytes.Equal(b, want.Bytes()) {
			t.Fatalf("the peer read %d bytes, not the %d written in order", len(b), want.Len())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the peer did not receive everything")
	}

	go func() {
		for i := range 3000 {
			_, _ = s.Write([]byte{0x40, 0x02, byte(i >> 8), byte(i)}) // PUBACK-sized packets
		}
	}()
	one := make([]byte, 1)
	for i := range 3000 {
		var pkt [4]byte
		for j := range pkt {
			if _, err := io.ReadFull(g, one); err != nil {
				t.Fatal(err)
			}
			pkt[j] = one[0]
		}
		if pkt != [4]byte{0x40, 0x02, byte(i >> 8), byte(i)} {
			t.Fatalf("packet %d read as % x", i, pkt)
		}
	}
}

// TestGatheredConnCloseSends shows that Close sends what is still queued (paho's DISCONNECT) before closing.
func TestGatheredConnCloseSends(t *testing.T) {
	c, s := tcpPair(t)
	g := newGatheredConn(c, 5*time.Second)
	msg := bytes.Repeat([]byte("d"), 100<<10)
	if _, err := g.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	_ = s.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(s)
	if err != nil || !bytes.Equal(b, msg) {
		t.Fatalf("after Close the peer read %d bytes (err %v), want %d then EOF", len(b), err, len(msg))
	}
	if _, err := g.Write([]byte("late")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write after Close = %v, want net.ErrClosed", err)
	}
}

// TestGatheredConnFailure shows that a connection the peer resets fails the next writes and the reader.
func TestGatheredConnFailure(t *testing.T) {
	c, s := tcpPair(t)
	g := newGatheredConn(c, 5*time.Second)
	defer g.Close()
	_ = s.(*net.TCPConn).SetLinger(0)
	_ = s.Close() // RST
	deadline := time.Now().Add(10 * time.Second)
	var err error
	for err == nil && time.Now().Before(deadline) {
		_, err = g.Write(make([]byte, 1024))
		time.Sleep(time.Millisecond)
	}
	if err == nil {
		t.Fatal("writes to a reset connection kept succeeding")
	}
	if _, rerr := g.Read(make([]byte, 1)); rerr == nil {
		t.Fatal("read from a failed connection succeeded")
	}
}

// TestGatheredConnStalledPeer shows that writes to a peer that stops reading fail after the write timeout
// instead of blocking for ever.
func TestGatheredConnStalledPeer(t *testing.T) {
	c, _ := tcpPair(t) // the server end never reads
	g := newGatheredConn(c, 200*time.Millisecond)
	defer g.Close()
	done := make(chan error, 1)
	go func() {
		chunk := make([]byte, 64<<10)
		for {
			if _, err := g.Write(chunk); err != nil {
				done <- err
				return
			}
		}
	}()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("write failed with %v, want the write timeout", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("writes to a stalled peer did not fail")
	}
}

// TestGatheredDialer dials a TLS server through the opener the MQTT sink gives paho: the server is verified
// by its name (the URL's host) and the connection carries bytes both ways. ws:// is left to paho.
func TestGatheredDialer(t *testing.T) {
	if gatheredDialer("ws") != nil || gatheredDialer("wss") != nil {
		t.Fatal("websocket URLs must be opened by paho")
	}
	srv := httptest.NewTLSServer(http.NotFoundHandler())
	defer srv.Close()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srv.TLS.Clone())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c) // echo
			}()
		}
	}()
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	opts := paho.NewClientOptions()
	opts.SetTLSConfig(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	opts.SetConnectTimeout(5 * time.Second)
	opts.SetWriteTimeout(5 * time.Second)

	u, _ := url.Parse("ssl://" + ln.Addr().String())
	conn, err := gatheredDialer(u.Scheme)(u, *opts)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("hello over tls")); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, len("hello over tls"))
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "hello over tls" {
		t.Fatalf("echo = %q, %v", buf, err)
	}

	// A server whose certificate does not verify is refused.
	opts.SetTLSConfig(&tls.Config{MinVersion: tls.VersionTLS12})
	if c, err := gatheredDialer(u.Scheme)(u, *opts); err == nil {
		c.Close()
		t.Fatal("connected to a server whose certificate is not trusted")
	}
}

// failingConn is a connection whose writes fail with werr and whose reads wait until it is closed.
type failingConn struct {
	net.Conn // nil: only the methods below are used
	werr     error
	closed   chan struct{}
}

func (f *failingConn) Write([]byte) (int, error) { return 0, f.werr }
func (f *failingConn) Read([]byte) (int, error) {
	<-f.closed
	return 0, &net.OpError{Op: "read", Net: "tcp", Err: net.ErrClosed}
}
func (f *failingConn) Close() error {
	select {
	case <-f.closed:
	default:
		close(f.closed)
	}
	return nil
}
func (f *failingConn) SetWriteDeadline(time.Time) error { return nil }

// TestGatheredConnReadTellsWhy: when a failed send closes the connection, the reader (paho, which reports the
// connection lost with the reader's error) gets the send's error, not "use of closed network connection".
func TestGatheredConnReadTellsWhy(t *testing.T) {
	why := errors.New("remote error: tls: certificate required")
	g := newGatheredConn(&failingConn{werr: why, closed: make(chan struct{})}, time.Second)
	defer g.Close()
	if _, err := g.Write([]byte("CONNECT")); err != nil {
		t.Fatalf("the first write only queues: %v", err)
	}
	_, err := g.Read(make([]byte, 1))
	if !errors.Is(err, why) {
		t.Fatalf("read after the failed send = %v, want the send's error (%v)", err, why)
	}
}
