package buffer

import (
	"fmt"
	"os"
	"time"
)

// lockSuffix names the file next to the log that a process holds locked while it has the log open.
const lockSuffix = ".lock"

// lockLog takes the lock that keeps a gateway and the tools from opening the log at path at the same time: an
// exclusive lock on <path>.lock, created if missing, waiting up to openTimeout for a holder to let go. It returns
// the open lock file; closing it releases the lock.
//
// bbolt locks the log file itself, but compaction replaces that file by a rename and then opens the new one.
// In between the file at the path is locked by nobody, and a process that opened the old file just before the
// rename gets its lock once the old file is closed: either could then work on the log beside the gateway, or on a
// file no longer at the path. The lock file is never replaced, so its lock holds across the swap.
func lockLog(path string) (*os.File, error) {
	name := path + lockSuffix
	// Readable by all: a tool run as another user (root) must not create it in a way the gateway cannot open.
	f, err := os.OpenFile(name, os.O_RDONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock file: %w", err)
	}
	deadline := time.Now().Add(openTimeout)
	for {
		err := lockFile(f.Fd())
		if err == nil {
			return f, nil
		}
		if !lockHeld(err) {
			_ = f.Close()
			return nil, fmt.Errorf("lock %s: %w", name, err)
		}
		if time.Now().After(deadline) {
			_ = f.Close()
			return nil, ErrLocked
		}
		time.Sleep(50 * time.Millisecond)
	}
}
