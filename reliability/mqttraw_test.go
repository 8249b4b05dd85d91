//go:build linux

package reliability

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// This file builds MQTT packets byte by byte, so the abuse tests can send what no client library would: broken
// lengths, invalid flags, bad UTF-8, properties in the wrong packet, unknown protocol levels.

// MQTT control packet types (the high nibble of the first byte).
const (
	pktConnect     = 1
	pktConnack     = 2
	pktPublish     = 3
	pktPuback      = 4
	pktSubscribe   = 8
	pktSuback      = 9
	pktPingreq     = 12
	pktPingresp    = 13
	pktDisconnect  = 14
	pktUnsubscribe = 10
)

// MQTT 5 property identifiers used by the tests.
const (
	propContentType    = 0x03 // PUBLISH, will properties
	propSessionExpiry  = 0x11 // CONNECT, CONNACK, DISCONNECT
	propTopicAlias     = 0x23 // PUBLISH
	propMaxPacketSize  = 0x27 // CONNECT, CONNACK
	propSubscriptionID = 0x0B // PUBLISH from the server, SUBSCRIBE
)

// varInt encodes n as an MQTT variable byte integer (1 to 4 bytes).
func varInt(n int) []byte {
	var out []byte
	for {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		out = append(out, b)
		if n == 0 {
			return out
		}
	}
}

// mqttStr encodes s as a two-byte length followed by its bytes (no UTF-8 check: the tests send broken ones).
func mqttStr(s string) []byte {
	out := binary.BigEndian.AppendUint16(nil, uint16(len(s)))
	return append(out, s...)
}

// cat joins byte slices.
func cat(parts ...[]byte) []byte {
	var n int
	for _, p := range parts {
		n += len(p)
	}
	out := make([]byte, 0, n)
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// packet frames body behind the first byte and a correct remaining length.
func packet(first byte, body ...[]byte) []byte {
	b := cat(body...)
	return cat([]byte{first}, varInt(len(b)), b)
}

// prop is one MQTT 5 property: its identifier and its encoded value.
type prop struct {
	id  byte
	val []byte
}

// props encodes MQTT 5 properties: their total length as a variable byte integer, then each property.
func props(ps ...prop) []byte {
	var b []byte
	for _, p := range ps {
		b = append(b, p.id)
		b = append(b, p.val...)
	}
	return cat(varInt(len(b)), b)
}

func u16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func u32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// will is the last will carried in a CONNECT.
type will struct {
	topic   string
	payload []byte
	qos     byte
	retain  bool
}

// connectSpec describes a CONNECT packet. Level is the protocol level: 4 (MQTT 3.1.1) or 5; anything else goes on
// the wire as it is.
type connectSpec struct {
	level     byte
	name      string // protocol name; "" means "MQTT"
	clientID  string
	username  string // "" means no username flag
	password  string // "" means no password flag
	keepAlive uint16
	clean     bool
	will      *will
	props     []byte // MQTT 5 CONNECT properties, already encoded with their length; nil means none (level 5: empty)
}

// connectPacket encodes a CONNECT.
func connectPacket(c connectSpec) []byte {
	name := c.name
	if name == "" {
		name = "MQTT"
	}
	var flags byte
	if c.clean {
		flags |= 0x02
	}
	if c.will != nil {
		flags |= 0x04 | c.will.qos<<3
		if c.will.retain {
			flags |= 0x20
		}
	}
	if c.password != "" {
		flags |= 0x40
	}
	if c.username != "" {
		flags |= 0x80
	}
	v5 := c.level == 5
	body := cat(mqttStr(name), []byte{c.level, flags}, u16(c.keepAlive))
	if v5 {
		p := c.props
		if p == nil {
			p = props()
		}
		body = append(body, p...)
	}
	body = append(body, mqttStr(c.clientID)...)
	if c.will != nil {
		if v5 {
			body = append(body, props()...)
		}
		body = append(body, mqttStr(c.will.topic)...)
		body = append(body, mqttStr(string(c.will.payload))...)
	}
	if c.username != "" {
		body = append(body, mqttStr(c.username)...)
	}
	if c.password != "" {
		body = append(body, mqttStr(c.password)...)
	}
	return packet(pktConnect<<4, body)
}

// publishSpec describes a PUBLISH. For MQTT 5 (v5 set) props are its properties, nil meaning none.
type publishSpec struct {
	topic    string
	payload  []byte
	qos      byte
	packetID uint16
	retain   bool
	v5       bool
	props    []byte
}

// publishPacket encodes a PUBLISH.
func publishPacket(p publishSpec) []byte {
	first := byte(pktPublish<<4) | p.qos<<1
	if p.retain {
		first |= 1
	}
	body := mqttStr(p.topic)
	if p.qos > 0 {
		body = append(body, u16(p.packetID)...)
	}
	if p.v5 {
		pp := p.props
		if pp == nil {
			pp = props()
		}
		body = append(body, pp...)
	}
	return packet(first, body, p.payload)
}

// subscribePacket encodes a SUBSCRIBE (QoS 1 for every filter) with the given first byte's low nibble.
func subscribePacket(packetID uint16, v5 bool, flags byte, filters ...string) []byte {
	body := u16(packetID)
	if v5 {
		body = append(body, props()...)
	}
	for _, f := range filters {
		body = append(body, mqttStr(f)...)
		body = append(body, 1)
	}
	return packet(pktSubscribe<<4|flags, body)
}

// rawPacket is one packet read from the gateway.
type rawPacket struct {
	typ   byte
	flags byte
	body  []byte
}

func (p rawPacket) String() string {
	return fmt.Sprintf("type %d flags %#x body % x", p.typ, p.flags, p.body)
}

// reasonCodes returns the reason (or return) codes of a CONNACK, PUBACK, SUBACK or DISCONNECT for the protocol level.
func (p rawPacket) reasonCodes(v5 bool) []byte {
	switch p.typ {
	case pktConnack:
		if len(p.body) >= 2 {
			return p.body[1:2]
		}
	case pktPuback:
		if len(p.body) >= 3 {
			return p.body[2:3]
		}
		return []byte{0}
	case pktSuback:
		if len(p.body) < 2 {
			return nil
		}
		rest := p.body[2:]
		if v5 {
			n, used, err := readVarInt(rest)
			if err != nil || used+n > len(rest) {
				return nil
			}
			rest = rest[used+n:]
		}
		return rest
	case pktDisconnect:
		if len(p.body) >= 1 {
			return p.body[:1]
		}
		return []byte{0}
	}
	return nil
}

// code returns the first reason (or return) code of the packet; ok is false when it carries none.
func (p rawPacket) code(v5 bool) (c byte, ok bool) {
	codes := p.reasonCodes(v5)
	if len(codes) == 0 {
		return 0, false
	}
	return codes[0], true
}

// mustCode returns the first reason code of p and fails the test when it has none.
func mustCode(t testing.TB, p rawPacket, v5 bool) byte {
	t.Helper()
	c, ok := p.code(v5)
	if !ok {
		t.Fatalf("no reason code in %v", p)
	}
	return c
}

func readVarInt(b []byte) (n, used int, err error) {
	mult := 1
	for i := 0; i < 4; i++ {
		if i >= len(b) {
			return 0, 0, io.ErrUnexpectedEOF
		}
		n += int(b[i]&0x7f) * mult
		if b[i]&0x80 == 0 {
			return n, i + 1, nil
		}
		mult *= 128
	}
	return 0, 0, errors.New("variable byte integer longer than 4 bytes")
}

// rawConn is a TCP connection to the gateway's MQTT listener that speaks bytes.
type rawConn struct {
	t  testing.TB
	c  net.Conn
	br *bufio.Reader
}

// dialRaw opens a TCP connection to addr; the test's cleanup closes it.
func dialRaw(t testing.TB, addr string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &rawConn{t: t, c: c, br: bufio.NewReader(c)}
}

// send writes b; a write error is returned (the gateway may already have closed the connection).
func (r *rawConn) send(b []byte) error {
	_ = r.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := r.c.Write(b)
	return err
}

// mustSend writes b and fails the test on error.
func (r *rawConn) mustSend(b []byte) {
	r.t.Helper()
	if err := r.send(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// read reads one packet within timeout.
func (r *rawConn) read(timeout time.Duration) (rawPacket, error) {
	_ = r.c.SetReadDeadline(time.Now().Add(timeout))
	first, err := r.br.ReadByte()
	if err != nil {
		return rawPacket{}, err
	}
	var n, mult int = 0, 1
	for i := 0; ; i++ {
		if i == 4 {
			return rawPacket{}, errors.New("gateway sent a remaining length longer than 4 bytes")
		}
		b, err := r.br.ReadByte()
		if err != nil {
			return rawPacket{}, err
		}
		n += int(b&0x7f) * mult
		if b&0x80 == 0 {
			break
		}
		mult *= 128
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r.br, body); err != nil {
		return rawPacket{}, err
	}
	return rawPacket{typ: first >> 4, flags: first & 0x0f, body: body}, nil
}

// expect reads one packet and fails the test unless it has the type.
func (r *rawConn) expect(typ byte, timeout time.Duration) rawPacket {
	r.t.Helper()
	p, err := r.read(timeout)
	if err != nil {
		r.t.Fatalf("waiting for packet type %d: %v", typ, err)
	}
	if p.typ != typ {
		r.t.Fatalf("got %v, want packet type %d", p, typ)
	}
	return p
}

// connect sends a CONNECT and returns the CONNACK's return code (reason code on MQTT 5).
func (r *rawConn) connect(c connectSpec) byte {
	r.t.Helper()
	r.mustSend(connectPacket(c))
	p := r.expect(pktConnack, 5*time.Second)
	return mustCode(r.t, p, c.level == 5)
}

// closedWithin reads (and returns) whatever the gateway sends until it closes the connection. It returns an error
// if the connection is still open after timeout.
func (r *rawConn) closedWithin(timeout time.Duration) ([]rawPacket, error) {
	deadline := time.Now().Add(timeout)
	var got []rawPacket
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return got, fmt.Errorf("connection still open after %s (read %d packets)", timeout, len(got))
		}
		p, err := r.read(left)
		if err == nil {
			got = append(got, p)
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return got, fmt.Errorf("connection still open after %s (read %d packets)", timeout, len(got))
		}
		// EOF, a reset, or a half-read packet followed by either: the gateway closed the connection.
		return got, nil
	}
}
