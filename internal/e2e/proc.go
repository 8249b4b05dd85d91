//go:build linux

package e2e

import (
	"errors"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// MountTmpfs mounts a tmpfs of the given size ("8m") on a new directory under t.TempDir() and unmounts it in the
// test's cleanup. The test is skipped with a clear message when mounting is not permitted (not root, or no
// CAP_SYS_ADMIN in a container).
func MountTmpfs(t testing.TB, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size+",mode=0700"); err != nil {
		t.Fatalf("cannot mount a %s tmpfs on %s (%v): the disk-full test needs root with CAP_SYS_ADMIN, as in CI", size, dir, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			// Something still holds it (a process the test did not stop); detach it so the directory goes.
			_ = exec.Command("umount", "-l", dir).Run()
		}
	})
	return dir
}

// Fill writes a file of zeros at path until it is size bytes long or the filesystem is full, and returns how
// many bytes it wrote.
func Fill(path string, size int64) (int64, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	var n int64
	for n < size {
		chunk := buf
		if rest := size - n; rest < int64(len(chunk)) {
			chunk = chunk[:rest]
		}
		w, err := f.Write(chunk)
		n += int64(w)
		if errors.Is(err, syscall.ENOSPC) {
			_ = f.Sync()
			return n, nil // the filesystem is full: that is what the caller asked for
		}
		if err != nil {
			return n, err
		}
	}
	return n, f.Sync()
}

// WaitFor polls cond every 10ms until it is true or timeout passes, then fails the test naming what.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
