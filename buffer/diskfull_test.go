package buffer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDiskFull starts itself again in a private mount namespace on a 4 MiB tmpfs (root and unshare(1)
// needed), where it runs diskFullChild, and checks that it passed: a full filesystem makes appends fail with
// ErrFull, the process stays up, appends succeed again once space returns, and the file stays consistent.
func TestDiskFull(t *testing.T) {
	if dir := os.Getenv("EDGEGATE_DISKFULL_DIR"); dir != "" {
		diskFullChild(t, dir)
		return
	}
	dir := t.TempDir()
	// A tmpfs that cannot be mounted ends the namespace's process before the child starts: its output says why.
	runUnshared(t, 50*time.Second, []string{"EDGEGATE_DISKFULL_DIR=" + dir},
		[]string{"sh", "-c", `mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"`, dir}, 1)
}

// diskFullChild is TestDiskFull in the mount namespace; dir must be on a small, otherwise empty filesystem.
func diskFullChild(t *testing.T, dir string) {
	tests := []struct {
		name     string
		minFree  int64
		wantNoSp bool // the filesystem itself refused (not the guard)
	}{
		{"no guard: the filesystem refuses", 0, true},
		{"min_free guard fires first", 1 << 20, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sub := filepath.Join(dir, fmt.Sprintf("case%d", tt.minFree))
			if err := os.MkdirAll(sub, 0o700); err != nil {
				t.Fatal(err)
			}
			defer os.RemoveAll(sub)
			filler := filepath.Join(sub, "filler")
			if err := os.WriteFile(filler, make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg := Config{Path: filepath.Join(sub, "events.db"), MinFreeBytes: tt.minFree, MaxBytes: 64 << 20,
				Cursors: []string{"sink"}}
			l := openTest(t, cfg, 64)
			stop := run(t, l.Log)
			mk := func(i int) Entry {
				return Entry{Data: fmt.Appendf(nil, `{"id":"%d","pad":"%01000d"}`, i, i), Type: "fill", Subject: "d"}
			}
			acked := map[uint64]string{}
			var full error
			for i := range 20000 {
				seq, err := l.Append(context.Background(), mk(i))
				if err != nil {
					full = err
					break
				}
				acked[seq] = fmt.Sprintf(`{"id":"%d"`, i)
			}
			if full == nil {
				t.Fatal("20000 appends of 1 KiB fitted in a 4 MiB filesystem")
			}
			if !errors.Is(full, ErrFull) {
				t.Fatalf("append on a full filesystem = %v, want ErrFull", full)
			}
			if tt.wantNoSp && !errors.Is(full, syscall.ENOSPC) {
				t.Fatalf("append on a full filesystem = %v, want ENOSPC", full)
			}
			t.Logf("%d appends acknowledged, then: %v", len(acked), full)
			// Still running and, while nothing frees space, refusing: near the limit a freed page may still
			// take an event or two, so wait for five refusals in a row.
			for i, refused := 0, 0; refused < 5; i++ {
				if i == 500 {
					t.Fatal("no five refusals in a row within 500 appends on a full filesystem")
				}
				seq, err := l.Append(context.Background(), mk(100000+i))
				switch {
				case err == nil:
					acked[seq] = fmt.Sprintf(`{"id":"%d"`, 100000+i)
					refused = 0
				case errors.Is(err, ErrFull):
					refused++
				default:
					t.Fatalf("append %d on a full filesystem = %v", i, err)
				}
			}
			if err := os.Remove(filler); err != nil {
				t.Fatal(err)
			}
			var seq uint64
			waitFor(t, 10*time.Second, "appends to succeed again", func() bool {
				var err error
				seq, err = l.Append(context.Background(), mk(200000))
				return err == nil
			})
			acked[seq] = `{"id":"200000"`
			stop()

			l2 := openTest(t, cfg, 0)
			checkDB(t, l2.Log)
			stored := map[uint64][]byte{}
			for _, r := range readAll(t, l2.Log) {
				stored[r.Seq] = r.Data
			}
			for seq, prefix := range acked {
				if !strings.HasPrefix(string(stored[seq]), prefix) {
					t.Fatalf("acknowledged seq %d lost or changed: %.40q", seq, stored[seq])
				}
			}
			_ = l2.Close()
		})
	}
}

// runUnshared runs the calling test again in a process of its own (verbose, within timeout) in a private mount
// namespace, with env added to its environment, which chooses the role it plays there.
// A non-empty before is a command run first in the namespace, given the test binary and its arguments to exec.
// It fails the calling test unless the process passed and its output holds passes lines "--- PASS: <test> ("
// (the test in that process, and in any it starts in turn); and without root or unshare(1): .ci/run checks both.
func runUnshared(t *testing.T, timeout time.Duration, env, before []string, passes int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root to mount a filesystem in a private mount namespace: run the tests as root")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Fatalf("unshare(1) (util-linux) is needed for a private mount namespace: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout+10*time.Second)
	defer cancel()
	args := append(append([]string{"-m"}, before...), os.Args[0], "-test.run=^"+t.Name()+"$", "-test.count=1",
		"-test.v", "-test.timeout="+timeout.String())
	cmd := exec.CommandContext(ctx, unshare, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil || strings.Count(string(out), "--- PASS: "+t.Name()+" (") != passes {
		t.Fatalf("%s in a private mount namespace failed (%v):\n%s", t.Name(), err, out)
	}
	t.Logf("in the namespace:\n%s", out)
}
