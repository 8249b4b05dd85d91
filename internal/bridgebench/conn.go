//go:build unix

package bridgebench

import (
	"bufio"
	"net"
	"net/url"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// bufferedConn is a connection read through a buffer.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// openBuffered is the connection opener of the bench's own clients (devices and subscriber). paho reads every
// packet with several small reads (a byte of header, the length a byte at a time, then the body): a system call
// each. The load generator reads through a buffer instead, so that its cost per message, the same for both
// systems measured, takes less of the processors they share.
func openBuffered(uri *url.URL, o paho.ClientOptions) (net.Conn, error) {
	d := &net.Dialer{Timeout: o.ConnectTimeout}
	c, err := d.Dial("tcp", uri.Host)
	if err != nil {
		return nil, err
	}
	return &bufferedConn{Conn: c, r: bufio.NewReaderSize(c, 32<<10)}, nil
}
