package ingest

import (
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// newTestGuard is the guard of a broker with the default configuration.
func newTestGuard(t *testing.T) *guard {
	t.Helper()
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	return newGuard(DefaultBrokerConfig(), slog.New(slog.DiscardHandler), m)
}

// serveConn runs g.serve for one end of a pipe with establish, as a listener does, and returns the other end and a
// channel closed when serve returns.
func serveConn(g *guard, establish func(string, net.Conn) error) (peer net.Conn, done <-chan struct{}) {
	c, peer := net.Pipe()
	ended := make(chan struct{})
	g.wg.Add(1)
	go func() {
		defer close(ended)
		g.serve("test", c, func() {}, establish)
	}()
	return peer, ended
}

// TestGuardShutdownKeepsNewConnectionsFromMochi: once the broker stops, a connection still arriving is closed without
// reaching mochi. mochi's server counts a connection inside its goroutine, and a count that starts while its Close
// waits for the clients panics ("WaitGroup is reused before previous Wait has returned").
func TestGuardShutdownKeepsNewConnectionsFromMochi(t *testing.T) {
	g := newTestGuard(t)
	g.closePending(time.Second)
	reached := make(chan struct{}, 1)
	peer, done := serveConn(g, func(string, net.Conn) error {
		reached <- struct{}{}
		return nil
	})
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("serve did not return")
	}
	select {
	case <-reached:
		t.Error("a connection arriving after shutdown began was handed to mochi")
	default:
	}
	if _, err := peer.Read(make([]byte, 1)); err == nil {
		t.Error("the connection was left open")
	}
	g.wg.Wait()
}

// TestGuardShutdownWaitsForPendingConnections: closePending closes the connections still reading their CONNECT and
// returns only once each of them has left mochi (or got its session), so that mochi's Close never waits while a
// connection is still being counted.
func TestGuardShutdownWaitsForPendingConnections(t *testing.T) {
	g := newTestGuard(t)
	entered, leave := make(chan struct{}), make(chan struct{})
	readErr := make(chan error, 1)
	_, done := serveConn(g, func(_ string, c net.Conn) error {
		close(entered)
		_, err := c.Read(make([]byte, 1)) // mochi reading CONNECT: ends when the shutdown closes the connection
		readErr <- err
		<-leave // what mochi still does before the connection's goroutine ends
		return err
	})
	<-entered
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		g.closePending(10 * time.Second)
	}()
	select {
	case err := <-readErr:
		if err == nil {
			t.Fatal("the pending connection's read succeeded; want it closed by the shutdown")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("closePending did not close the pending connection")
	}
	select {
	case <-returned:
		t.Fatal("closePending returned while a connection was still inside mochi")
	case <-time.After(50 * time.Millisecond):
	}
	close(leave)
	select {
	case <-returned:
	case <-time.After(5 * time.Second):
		t.Fatal("closePending did not return once the connection ended")
	}
	<-done
	g.wg.Wait()
}

// TestGuardShutdownWaitIsBounded: a connection that does not leave mochi holds the shutdown only for the limit.
func TestGuardShutdownWaitIsBounded(t *testing.T) {
	g := newTestGuard(t)
	entered, leave := make(chan struct{}), make(chan struct{})
	_, done := serveConn(g, func(string, net.Conn) error {
		close(entered)
		<-leave
		return nil
	})
	<-entered
	start := time.Now()
	g.closePending(100 * time.Millisecond)
	if d := time.Since(start); d < 100*time.Millisecond || d > 5*time.Second {
		t.Errorf("closePending returned after %s; want the 100ms limit", d)
	}
	close(leave)
	<-done
	g.wg.Wait()
}
