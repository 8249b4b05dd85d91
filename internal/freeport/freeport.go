// Package freeport finds loopback ports for the processes that tests and benchmarks start.
package freeport

import (
	"fmt"
	"math/rand/v2"
	"net"
)

// The ports handed out lie below the kernel's usual ephemeral range (32768–60999 on Linux): a port the kernel
// gave to a listener on :0 and that was closed again may at once become the source port of any outgoing
// connection, and the process meant to bind it would then fail with "address already in use".
const (
	low  = 20000
	high = 32768
)

// Get returns a loopback TCP port that was free a moment ago, outside the ephemeral range.
func Get() (int, error) {
	var last error
	for range 64 {
		port := low + rand.IntN(high-low)
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			last = err
			continue
		}
		ln.Close()
		return port, nil
	}
	return 0, fmt.Errorf("find a free port: %w", last)
}
