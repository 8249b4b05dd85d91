//go:build !unix

package mosquittotest

import "os"

// saveSignal is nil where mosquitto has no signal that makes it write its persistence file: Save fails the
// test there.
func saveSignal() os.Signal { return nil }
