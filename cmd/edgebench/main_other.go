//go:build !linux

// Command edgebench runs on Linux only: it reads /proc for the memory and CPU of the processes it starts.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "edgebench: runs on Linux only (it measures processes through /proc)")
	os.Exit(2)
}
