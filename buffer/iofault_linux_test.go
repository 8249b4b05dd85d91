//go:build linux && !(386 || arm || mips || mipsle)

package buffer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// TestIOFailure checks that real write and fsync failures in bbolt's commit fail the commit cleanly. The test
// plays three roles, each in a process of its own. Run normally, it starts itself again in a private mount
// namespace (root, unshare(1) and /dev/fuse needed) as the server: that mounts a FUSE filesystem that passes
// every operation through to a directory and fails writes or an fsync when told to, and starts itself once more
// as the client, which keeps the log on that filesystem (ioFailureClient). A process that serves FUSE must not
// fault on the mapped pages of a file it serves (bbolt maps its file), or it can deadlock. The file builds on
// 64-bit Linux only, as the FUSE library does.
func TestIOFailure(t *testing.T) {
	if mnt := os.Getenv("EDGEGATE_IOFAULT_MOUNT"); mnt != "" {
		ioFailureClient(t, mnt, os.Getenv("EDGEGATE_IOFAULT_BACK"))
		return
	}
	if dir := os.Getenv("EDGEGATE_IOFAULT_DIR"); dir != "" {
		ioFailureServer(t, dir)
		return
	}
	// The server's output holds the client's: both must pass.
	runUnshared(t, 90*time.Second, []string{"EDGEGATE_IOFAULT_DIR=" + t.TempDir()}, nil, 2)
}

// ioFailureServer serves the faulty filesystem under dir while the client role of TestIOFailure runs on it.
func ioFailureServer(t *testing.T, dir string) {
	back, mnt := filepath.Join(dir, "back"), filepath.Join(dir, "mnt")
	for _, d := range []string{back, mnt} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	mountFaulty(t, back, mnt, &ioFaults{})
	ctx, cancel := context.WithTimeout(context.Background(), 80*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestIOFailure$", "-test.count=1", "-test.v",
		"-test.timeout=75s")
	cmd.Env = append(os.Environ(), "EDGEGATE_IOFAULT_MOUNT="+mnt, "EDGEGATE_IOFAULT_BACK="+back)
	out, err := cmd.CombinedOutput()
	fmt.Printf("%s", out)
	if err != nil {
		t.Fatalf("client: %v", err)
	}
}

// ioFailureClient is the client role of TestIOFailure, on the faulty filesystem mounted at mnt (backed by
// back). For a failing data write, a failing fsync of the data pages and a failing fsync of the meta page
// (after which the page cache already holds the new meta page): every appender of the failed commit gets the
// error and none of its events is in the log, the events acknowledged before and after are all there, in
// order and intact, and bbolt's consistency check passes on the file — also after many commits that reuse
// freed pages.
func ioFailureClient(t *testing.T, mnt, back string) {
	for i, tt := range []struct {
		name, arm   string
		reopenFails int // how many times opening the file again fails at first
	}{
		{"data write fails", "writes", 0},
		{"fsync of the data pages fails", "fsync 1", 0},
		{"fsync of the meta page fails", "fsync 2", 0},
		// The commit that deletes the failed commit's events again fails the same way.
		{"fsync of the meta page fails, then that of the commit undoing it", "fsync 2 4", 0},
		// The commit that deletes them fails before its meta page: readers must not see them meanwhile.
		{"fsync of the meta page fails, then the data fsync of the commit undoing it", "fsync 2 3", 0},
		// The file cannot be opened again at first: reads fail meanwhile, the commits that follow open it.
		{"fsync of the meta page fails, then the file cannot be opened at once", "fsync 2", 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sub := fmt.Sprintf("case%d", i)
			if err := os.Mkdir(filepath.Join(mnt, sub), 0o700); err != nil {
				t.Fatal(err)
			}
			cfg := Config{Path: filepath.Join(mnt, sub, "events.db"), Cursors: []string{"sink"}}
			l := openTest(t, cfg, 64)
			var reopenFails atomic.Int32
			reopenFails.Store(int32(tt.reopenFails))
			l.beforeReopen = func() error {
				if reopenFails.Add(-1) >= 0 {
					return errInjected
				}
				return nil
			}
			stop := run(t, l.Log)

			content := map[uint64]string{}
			add := func(n, first int) {
				t.Helper()
				seqs, errs := appendConcurrently(l.Log, n, first)
				for i, err := range errs {
					if err != nil {
						t.Fatalf("append %d: %v", first+i, err)
					}
					content[seqs[i]] = string(ev(first + i).Data)
				}
			}
			add(50, 0)

			control(t, mnt, tt.arm)
			seqs, errs := appendConcurrently(l.Log, 20, 1000)
			state := control(t, mnt, "off")
			if strings.HasPrefix(state, "injected 0 ") {
				t.Fatalf("after the failed commit the filesystem reports %q, want a failure injected", state)
			}
			t.Logf("faults %q: %s", tt.arm, state)
			// The appenders that shared the failed commit get its error; any that came after it and got into a
			// commit of their own are acknowledged.
			failed := 0
			for i, err := range errs {
				switch {
				case err == nil:
					content[seqs[i]] = string(ev(1000 + i).Data)
				case errors.Is(err, syscall.EIO) && seqs[i] == 0:
					failed++
				case tt.reopenFails > 0 && errors.Is(err, errInjected) && seqs[i] == 0:
					failed++ // a later commit, which found the file not open again
				default:
					t.Fatalf("appender %d while the file fails: seq %d, err %v; want 0 and EIO", i, seqs[i], err)
				}
			}
			if failed == 0 {
				t.Fatal("no appender got the error of the failed commit")
			}
			t.Logf("%d appenders got the error, %d were acknowledged", failed, len(errs)-failed)
			if got := testutilCounter(t, l, "edgegate_buffer_commit_errors_total"); got == 0 {
				t.Fatal("commit_errors_total = 0 after a failed commit")
			}
			if tt.reopenFails > 0 {
				// Until the file opens again, reads find the log closed and appends get the open's error.
				for i := 0; reopenFails.Load() > 0; i++ {
					if i == 5 {
						t.Fatal("five appends did not use up the failures to open the file again")
					}
					if _, err := l.Read(0, 1); !errors.Is(err, ErrClosed) {
						t.Fatalf("read while the file is not open again = %v, want ErrClosed", err)
					}
					if seq, err := l.Append(context.Background(), ev(1500+i)); !errors.Is(err, errInjected) {
						t.Fatalf("append while the file cannot be opened = %d, %v; want the open's error", seq, err)
					}
				}
				add(1, 1600) // its commit opens the file and deletes the failed commit's events
				if reopenFails.Load() >= 0 {
					t.Fatal("the file was not opened again")
				}
			}
			checkContent(t, l.Log, content, "after the failed commit")

			// Many commits that reuse the pages freed meanwhile: a free list that took the failed commit's pages
			// back as free while the file's meta page names them would now overwrite live pages.
			for round := range 20 {
				add(50, 2000+round*50)
			}
			checkContent(t, l.Log, content, "after the commits that followed")
			checkDB(t, l.Log)
			stop()

			// The file as the disk holds it, without the FUSE layer: consistent, and holding exactly the
			// acknowledged events.
			again := openTest(t, Config{Path: filepath.Join(back, sub, "events.db"), Cursors: []string{"sink"}}, 64)
			checkDB(t, again.Log)
			checkContent(t, again.Log, content, "after opening the file again")
		})
	}
}

// control sends cmd to the faulty filesystem mounted at mnt through its control file and returns the state
// it reports then: "injected N fsyncs M".
func control(t *testing.T, mnt, cmd string) string {
	t.Helper()
	path := filepath.Join(mnt, controlFile)
	if err := os.WriteFile(path, []byte(cmd), 0o600); err != nil {
		t.Fatalf("fault control %q: %v", cmd, err)
	}
	state, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("fault state: %v", err)
	}
	return string(state)
}

// checkContent fails unless the log holds exactly the events of want (seq → data), in seq order.
func checkContent(t *testing.T, l *Log, want map[uint64]string, when string) {
	t.Helper()
	recs := readAll(t, l)
	var prev uint64
	for _, r := range recs {
		if r.Seq <= prev {
			t.Fatalf("%s: seq %d after %d", when, r.Seq, prev)
		}
		prev = r.Seq
		data, ok := want[r.Seq]
		if !ok {
			t.Fatalf("%s: seq %d (%.40s) is in the log but was never acknowledged", when, r.Seq, r.Data)
		}
		if string(r.Data) != data {
			t.Fatalf("%s: seq %d holds %.60s, want %.60s", when, r.Seq, r.Data, data)
		}
	}
	if len(recs) != len(want) {
		t.Fatalf("%s: %d events in the log, %d acknowledged", when, len(recs), len(want))
	}
	if st := l.Stats(); st.Events != int64(len(want)) {
		t.Fatalf("%s: stats count %d events, want %d", when, st.Events, len(want))
	}
}

// controlFile is the file at the root of the faulty filesystem that sets its faults: writing "writes" fails
// every data write, "fsync N [M ...]" the N-th (and M-th ...) fsync from then, "off" clears both. Reading it returns
// "injected N fsyncs M": the failures injected and the fsyncs seen since the faults were last set.
const controlFile = ".faults"

// ioFaults are the failures the faulty filesystem injects.
type ioFaults struct {
	mu         sync.Mutex
	failWrites bool
	failFsync  map[int]bool // the ordinals, counted from the command, of the fsyncs that fail
	injected   int
	fsyncs     int
}

func (f *ioFaults) command(cmd string) syscall.Errno {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failWrites, f.failFsync = false, nil
	fields := strings.Fields(cmd)
	if len(fields) > 0 && fields[0] != "off" {
		f.injected, f.fsyncs = 0, 0
	}
	switch {
	case len(fields) == 1 && fields[0] == "off":
	case len(fields) == 1 && fields[0] == "writes":
		f.failWrites = true
	case len(fields) >= 2 && fields[0] == "fsync":
		f.failFsync = map[int]bool{}
		for _, field := range fields[1:] {
			var n int
			if _, err := fmt.Sscan(field, &n); err != nil || n < 1 {
				return syscall.EINVAL
			}
			f.failFsync[n] = true
		}
	default:
		return syscall.EINVAL
	}
	return 0
}

func (f *ioFaults) state() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return fmt.Sprintf("injected %d fsyncs %d", f.injected, f.fsyncs)
}

func (f *ioFaults) write() syscall.Errno {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWrites {
		f.injected++
		return syscall.EIO
	}
	return 0
}

func (f *ioFaults) fsync() syscall.Errno {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fsyncs++
	if f.failFsync[f.fsyncs] {
		f.injected++
		return syscall.EIO
	}
	return 0
}

// mountFaulty mounts at mnt a FUSE filesystem passing through to back, with faults, until the test ends.
func mountFaulty(t *testing.T, back, mnt string, faults *ioFaults) {
	t.Helper()
	root, err := fs.NewLoopbackRoot(back)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := fs.Mount(mnt, &faultNode{LoopbackNode: root.(*fs.LoopbackNode), f: faults}, &fs.Options{
		MountOptions: fuse.MountOptions{DirectMount: true, FsName: "edgegate-faults", Name: "faults"},
	})
	if err != nil {
		t.Fatalf("mount FUSE at %s: %v", mnt, err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
}

// faultNode is a loopback node whose files are faultFiles.
type faultNode struct {
	*fs.LoopbackNode
	f *ioFaults
}

var (
	_ fs.NodeWrapChilder = (*faultNode)(nil)
	_ fs.NodeOpener      = (*faultNode)(nil)
	_ fs.NodeCreater     = (*faultNode)(nil)
)

func (n *faultNode) WrapChild(_ context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	return &faultNode{LoopbackNode: ops.(*fs.LoopbackNode), f: n.f}
}

func (n *faultNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, fuseFlags, errno := n.LoopbackNode.Open(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return n.file(fh, fuseFlags)
}

// file wraps the loopback file of n; the control file is read and written around the page cache.
func (n *faultNode) file(fh fs.FileHandle, fuseFlags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	ctl := n.Path(nil) == controlFile
	if ctl {
		fuseFlags |= fuse.FOPEN_DIRECT_IO
	}
	return &faultFile{LoopbackFile: fh.(*fs.LoopbackFile), f: n.f, control: ctl}, fuseFlags, 0
}

func (n *faultNode) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	inode, fh, fuseFlags, errno := n.LoopbackNode.Create(ctx, name, flags, mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	ctl := n.Path(nil) == "" && name == controlFile
	if ctl {
		fuseFlags |= fuse.FOPEN_DIRECT_IO
	}
	return inode, &faultFile{LoopbackFile: fh.(*fs.LoopbackFile), f: n.f, control: ctl}, fuseFlags, 0
}

// faultFile passes through to its file, failing writes and fsyncs as its ioFaults say. It never hands its
// descriptor to the kernel (FUSE passthrough), which would bypass it.
type faultFile struct {
	*fs.LoopbackFile
	f       *ioFaults
	control bool // the control file
}

func (f *faultFile) PassthroughFd() (int, bool) { return -1, false }

func (f *faultFile) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	if f.control {
		if errno := f.f.command(string(data)); errno != 0 {
			return 0, errno
		}
		return uint32(len(data)), 0
	}
	if errno := f.f.write(); errno != 0 {
		return 0, errno
	}
	return f.LoopbackFile.Write(ctx, data, off)
}

func (f *faultFile) Writev(ctx context.Context, data [][]byte, off int64) (uint32, syscall.Errno) {
	if f.control {
		return 0, syscall.EINVAL
	}
	if errno := f.f.write(); errno != 0 {
		return 0, errno
	}
	return f.LoopbackFile.Writev(ctx, data, off)
}

func (f *faultFile) Read(ctx context.Context, buf []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if f.control {
		state := f.f.state()
		if off >= int64(len(state)) {
			return fuse.ReadResultData(nil), 0
		}
		return fuse.ReadResultData([]byte(state[off:])), 0
	}
	return f.LoopbackFile.Read(ctx, buf, off)
}

func (f *faultFile) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	if errno := f.f.fsync(); errno != 0 {
		return errno
	}
	return f.LoopbackFile.Fsync(ctx, flags)
}
