package freeport

import (
	"fmt"
	"net"
	"testing"
)

func TestGetIsBindableAndOutsideEphemeralRange(t *testing.T) {
	for range 20 {
		p, err := Get()
		if err != nil {
			t.Fatal(err)
		}
		if p < low || p >= high {
			t.Fatalf("port %d outside [%d, %d)", p, low, high)
		}
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			t.Fatalf("port %d from Get cannot be bound: %v", p, err)
		}
		ln.Close()
	}
}
