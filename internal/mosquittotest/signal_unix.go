//go:build unix

package mosquittotest

import (
	"os"
	"syscall"
)

// saveSignal is the signal that makes mosquitto write its persistence file.
func saveSignal() os.Signal { return syscall.SIGUSR1 }
