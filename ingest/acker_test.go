package ingest

import (
	"bytes"
	"context"
	"net"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

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

// A refusal carries its reason code, and its reason string unless the client asked for no problem information or
// its maximum packet size leaves no room for it.
func TestAppendRefusal(t *testing.T) {
	cases := []struct {
		name       string
		mods       packets.Mods
		wantReason string
	}{
		{"reason string", packets.Mods{}, packets.ErrQuotaExceeded.Reason},
		{"no problem information", packets.Mods{DisallowProblemInfo: true}, ""},
		{"small maximum packet size", packets.Mods{MaxSize: 8}, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := appendRefusal(puback(1), 7, packets.ErrQuotaExceeded, c.mods)
			if !bytes.Equal(b[:4], puback(1)) {
				t.Fatalf("the batch before the refusal changed: %x", b[:4])
			}
			b = b[4:]
			var pk packets.Packet
			if err := pk.FixedHeader.Decode(b[0]); err != nil {
				t.Fatal(err)
			}
			pk.ProtocolVersion = 5
			if int(b[1]) != len(b)-2 {
				t.Fatalf("remaining length %d for %d bytes", b[1], len(b)-2)
			}
			pk.FixedHeader.Remaining = int(b[1])
			if err := pk.PubackDecode(b[2:]); err != nil {
				t.Fatal(err)
			}
			if pk.FixedHeader.Type != packets.Puback || pk.PacketID != 7 || pk.ReasonCode != packets.ErrQuotaExceeded.Code ||
				pk.Properties.ReasonString != c.wantReason {
				t.Errorf("got type %d id %d reason 0x%02x %q, want PUBACK 7 0x97 %q", pk.FixedHeader.Type, pk.PacketID,
					pk.ReasonCode, pk.Properties.ReasonString, c.wantReason)
			}
			if c.mods.MaxSize > 0 && uint32(len(b)) > c.mods.MaxSize {
				t.Errorf("%d bytes, more than the maximum packet size %d", len(b), c.mods.MaxSize)
			}
		})
	}
}
