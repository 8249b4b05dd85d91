package ingest

import (
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/packets"
)

func TestCloseReason(t *testing.T) {
	cases := []struct {
		err  error
		want string
	}{
		{fmt.Errorf("read connection: %w", packets.ErrPacketTooLarge), "too_large"},
		{fmt.Errorf("read connection: %w", packets.ErrMalformedVariableByteInteger), "malformed"},
		{packets.ErrProtocolViolationQosOutOfRange, "malformed"},
		{packets.ErrMalformedFlags, "malformed"},
		{fmt.Errorf("invalid packet type; %v", 0), "malformed"},
		{fmt.Errorf("read connection: %w", os.ErrDeadlineExceeded), "timeout"},
		{&net.OpError{Op: "read", Err: os.ErrDeadlineExceeded}, "timeout"},
		{packets.ErrBadUsernameOrPassword, ""}, // counted as an auth failure
		{packets.ErrNotAuthorized, ""},         // counted as an ACL denial
		{packets.CodeDisconnect, ""},
		{packets.CodeSuccess, ""},
		{&net.OpError{Op: "read", Err: syscall.ECONNRESET}, ""},
		{fmt.Errorf("read connection: %w", io.ErrUnexpectedEOF), ""}, // the connection was lost in a packet
		{&websocket.CloseError{Code: websocket.CloseNormalClosure}, ""},
	}
	for _, tc := range cases {
		if got := closeReason(tc.err); got != tc.want {
			t.Errorf("closeReason(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}
