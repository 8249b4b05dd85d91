package ingest

import (
	"time"
	"unicode/utf8"
)

// Presence reasons: why a device disconnected, the data of a device.disconnected event. The event is emitted when
// the device's last connection ends, with the reason that connection ended.
const (
	PresenceCleanDisconnect = "clean_disconnect" // the device sent DISCONNECT
	PresenceConnectionLost  = "connection_lost"  // the network connection ended without DISCONNECT
	PresenceWillPublished   = "will_published"   // the connection ended and the device's will was published
	PresenceKickedLimit     = "kicked_limit"     // the broker closed the connection (a limit was exceeded)
	PresenceTakenOver       = "taken_over"       // a new connection with the same client id replaced it (before the new one was up)
	PresenceServerShutdown  = "server_shutdown"  // the gateway is stopping
	PresenceRevoked         = "revoked"          // the device left the registry, or its credentials or grants changed
)

// Presence returns the event that a device connected (type device.connected) or disconnected
// (device.disconnected), with the type prefix. Its data is {"reason": reason} (application/json), or {} when
// reason is empty; its time is at; source and subject name the device, and its priority is 0. Presence cannot
// fail.
func (n *Normalizer) Presence(deviceID string, connected bool, reason string, at time.Time) Result {
	typ := n.discon
	if connected {
		typ = n.connected
	}
	data := []byte("{}")
	if reason != "" {
		data = make([]byte, 0, len(`{"reason":""}`)+len(reason)+8)
		data = append(data, `{"reason":`...)
		data = appendJSONString(data, reason)
		data = append(data, '}')
	}
	if at.IsZero() {
		at = time.Now()
	}
	return n.newResult(typ, deviceID, deviceID, contentTypeJSON, at.UTC(), data, false, 0)
}

// appendJSONString appends s as a JSON string; invalid UTF-8 becomes U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c < 0x20:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, `\ufffd`...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}
