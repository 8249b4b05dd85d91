// Package eventually waits, in tests, for a condition that something running concurrently will make true.
package eventually

import (
	"testing"
	"time"
)

// True polls cond every few milliseconds until it holds and fails the test when it does not within timeout; what
// names the condition in the failure.
func True(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if !Within(timeout, cond) {
		t.Fatalf("timed out after %s waiting for %s", timeout, what)
	}
}

// Within polls cond every few milliseconds until it holds (true) or timeout passes (false), for a caller that
// has more to do than fail the test when it does not hold.
func Within(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(2 * time.Millisecond)
	}
	return true
}
