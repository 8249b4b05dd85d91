package ingest_test

import (
	"errors"
	"net"
	"sync"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/ingest"
)

// gatedAuth holds the first password check until the test releases it.
type gatedAuth struct {
	*devices.Registry
	first   *sync.Once
	entered chan struct{}
	release chan struct{}
}

func (a gatedAuth) Authenticate(id string, pw []byte) bool {
	a.first.Do(func() {
		close(a.entered)
		<-a.release
	})
	return a.Registry.Authenticate(id, pw)
}

// A connection that ends while its credentials are checked — so that its CONNACK cannot be written and mochi
// never reads from it — leaves nothing behind: the device is not connected, commands to it fail at once, no
// presence event says it is online, and it can connect again.
func TestConnectionEndingBeforeSessionIsForgotten(t *testing.T) {
	auth := gatedAuth{first: new(sync.Once), entered: make(chan struct{}), release: make(chan struct{})}
	tb := startBroker(t, brokerOpts{auth: func(r *devices.Registry) ingest.Authenticator {
		auth.Registry = r
		return auth
	}})
	c, err := net.Dial("tcp", tb.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: "sensor-1",
			UsernameFlag: true, Username: []byte("sensor-1"), PasswordFlag: true, Password: []byte(password("sensor-1"))}}
	if _, err := c.Write(encode(t, pk)); err != nil {
		t.Fatal(err)
	}
	<-auth.entered
	// The client gives up: a reset, so that the broker's CONNACK write fails.
	if err := c.(*net.TCPConn).SetLinger(0); err != nil {
		t.Fatal(err)
	}
	_ = c.Close()
	close(auth.release)
	waitFor(t, "the connection to end", func() bool { return tb.Clients() == 0 })

	if tb.Connected("sensor-1") {
		t.Error("Connected(sensor-1) = true for a device without connection")
	}
	if _, err := tb.SendCommand("sensor-1", "x", nil); !errors.Is(err, ingest.ErrNotConnected) {
		t.Errorf("SendCommand to a device without connection: %v, want ErrNotConnected", err)
	}
	// The session never started, so there is no presence event (were the CONNACK written after all, mochi would
	// read from the connection and end it as any other: then a device.disconnected follows its device.connected).
	n, m := tb.cons.count("device.connected", "sensor-1"), tb.cons.count("device.disconnected", "sensor-1")
	if n != m {
		t.Errorf("%d device.connected and %d device.disconnected events", n, m)
	}

	rc := dialRaw(t, tb.addr, 4)
	rc.mustConnect("sensor-1")
	tb.cons.waitCount(t, "device.connected", "sensor-1", n+1)
	if !tb.Connected("sensor-1") {
		t.Error("Connected(sensor-1) = false after it connected again")
	}
	rc.disconnect()
	waitFor(t, "the disconnect", func() bool { return !tb.Connected("sensor-1") })
}
