// Package mqttraw encodes MQTT packets for tests that speak the protocol byte by byte, below any client
// library (malformed input, MQTT 5 reason codes a client would hide).
package mqttraw

import (
	"bytes"
	"fmt"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Encode encodes pk, of a type a client sends, in its pk.ProtocolVersion.
func Encode(pk packets.Packet) ([]byte, error) {
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(&buf)
	default:
		return nil, fmt.Errorf("mqttraw: packet type %d not supported", pk.FixedHeader.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("mqttraw: encode packet type %d: %w", pk.FixedHeader.Type, err)
	}
	return buf.Bytes(), nil
}
