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
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
