package ingest_test

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/edgegate/edgegate/ingest"
)

// FuzzConnBytes sends arbitrary bytes over a real TCP connection to a real broker listener, then checks that the
// broker did not panic and still accepts a well-behaved device. The seed corpus (testdata/fuzz/FuzzConnBytes)
// holds truncated packets, bad lengths, bad UTF-8, invalid flags, MQTT 5 properties out of place and a valid
// CONNECT followed by garbage; sensor-1's password is "sensor-1-pw".
func FuzzConnBytes(f *testing.F) {
	f.Add([]byte{0x10, 0x00})
	tb := startBroker(f, brokerOpts{cfg: func(c *ingest.BrokerConfig) {
		c.ConnectTimeout = 200 * time.Millisecond
		c.MaxPacketBytes = 4096
		c.MaxConnectionsPerIP = 1 << 20
	}})
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := net.DialTimeout("tcp", tb.addr, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(300 * time.Millisecond))
		_, _ = c.Write(data)
		// Half-close: the broker reads everything, then EOF, and ends the connection; whatever it answered is read.
		_ = c.(*net.TCPConn).CloseWrite()
		_, _ = io.Copy(io.Discard, c)
		_ = c.Close()

		if n := tb.metric(t, "edgegate_ingest_panics_recovered_total"); n != 0 {
			t.Fatalf("%v panics while serving %q", n, data)
		}
		rc := dialRaw(t, tb.addr, 4)
		if code := rc.connect(connectOpts{user: "sensor-1", clientID: "sensor-1:check"}); code != 0 {
			t.Fatalf("good client refused (0x%02x) after %q", code, data)
		}
		rc.disconnect()
	})
}
