//go:build unix

package buffer

import (
	"errors"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// diskFree returns the bytes available to unprivileged users on the filesystem holding path.
func diskFree(path string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(path), &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil //nolint:unconvert // field types differ between systems
}

// lockFile takes an exclusive, non-blocking lock on f's descriptor (the lock bbolt takes).
func lockFile(fd uintptr) error { return unix.Flock(int(fd), unix.LOCK_EX|unix.LOCK_NB) }

// lockHeld reports whether a lockFile error means another descriptor holds the lock.
func lockHeld(err error) bool { return errors.Is(err, unix.EWOULDBLOCK) }
