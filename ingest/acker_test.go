package ingest

import (
	"bytes"
	"context"
	"net"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/edgegate/edgegate/internal/eventually"
)

// recordingConn records each Write as one slice.
type recordingConn struct {
	net.Conn
	mu     sync.Mutex
	writes [][]byte
}

func (c *recordingConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes = append(c.writes, bytes.Clone(b))
	return len(b), nil
}

func (c *recordingConn) got() [][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([][]byte(nil), c.writes...)
}

func puback(id byte) []byte { return []byte{0x40, 2, 0, id} }

// The PUBACKs of events that are already durable go out in one write, in order; a PUBACK whose event is not
// durable yet is not waited for with the others held back: they are written first.
func TestAckerWritesDurableAcksTogether(t *testing.T) {
	b := &Broker{}
	ctx := context.Background()
	b.ctx.Store(&ctx)
	h := &hook{b: b}
	conn := &recordingConn{}
	cl := &mqtt.Client{}
	cl.Net.Conn = conn
	a := &acker{jobs: make(chan ackJob, 8)}

	durable := make(chan struct{})
	close(durable)
	now := func(context.Context) error { return nil }
	later := make(chan struct{})
	for id := uint16(1); id <= 3; id++ {
		a.jobs <- ackJob{id: id, wait: now, done: durable}
	}
	a.jobs <- ackJob{id: 4, done: later, wait: func(ctx context.Context) error {
		select {
		case <-later:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}}
	h.ackers.Add(1)
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		h.runAcker(cl, 4, a)
	}()

	want := [][]byte{append(append(puback(1), puback(2)...), puback(3)...)}
	eventually.True(t, 5*time.Second, "the first write", func() bool { return len(conn.got()) >= 1 })
	if got := conn.got(); len(got) != 1 || !bytes.Equal(got[0], want[0]) {
		t.Fatalf("writes %x, want the three durable PUBACKs in one write %x", got, want)
	}
	close(later)
	close(a.jobs)
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the acker did not end after its jobs were closed")
	}
	want = append(want, puback(4))
	if got := conn.got(); len(got) != 2 || !bytes.Equal(got[1], want[1]) {
		t.Fatalf("writes %x, want %x", got, want)
	}
}
