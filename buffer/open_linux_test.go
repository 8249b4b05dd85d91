//go:build linux

package buffer

import (
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dropCache fsyncs the file and drops it from the page cache, and returns how many of its bytes are still
// cached (0 where that worked).
func dropCache(t testing.TB, path string) int64 {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	return cachedBytes(t, path)
}

// cachedBytes is how much of the file is in the page cache (mincore over a mapping that reads nothing).
func cachedBytes(t testing.TB, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() == 0 {
		return 0
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Munmap(m) }()
	ps := os.Getpagesize()
	vec := make([]byte, (len(m)+ps-1)/ps)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)),
		uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	var n int64
	for _, v := range vec {
		if v&1 != 0 {
			n++
		}
	}
	return n * int64(ps)
}

// copyFile copies src to dst (a reader's copy of a live file: what a crash at that moment leaves).
func copyFile(t testing.TB, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// coldOpen drops the file from the page cache, opens it and returns how long Open took, how it found the
// file and how much of the file the open brought into the page cache. The log is closed again.
func coldOpen(t testing.TB, cfg Config, events int64) (time.Duration, string, int64) {
	t.Helper()
	if left := dropCache(t, cfg.Path); left > 1<<20 {
		t.Skipf("the page cache keeps %d bytes of the file after FADV_DONTNEED (tmpfs?): cannot measure a cold open", left)
	}
	start := time.Now()
	l, err := Open(cfg, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	d := time.Since(start)
	read := cachedBytes(t, cfg.Path)
	if got := l.state.Load().events; got != events {
		t.Fatalf("%d events after open, want %d", got, events)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return d, l.opened, read
}

// prepareColdFiles fills a log with n events and leaves two copies of it in dir: clean.db, closed by Close,
// and crash.db, a copy taken while the log was open (as a crash leaves it).
func prepareColdFiles(t testing.TB, dir string, n int) (clean, crash string) {
	t.Helper()
	clean, crash = filepath.Join(dir, "clean.db"), filepath.Join(dir, "crash.db")
	cfg := Config{Path: clean, Durability: DurabilityInterval, MaxBytes: 4 << 30, Cursors: []string{"sink"}}
	l := openTest(t, cfg, 0)
	stop := run(t, l.Log)
	fill(t, l.Log, n)
	stop()
	l2, err := Open(cfg, nil, nil) // its first commit took the mark off: the file is as a crash leaves it
	if err != nil {
		t.Fatal(err)
	}
	copyFile(t, clean, crash)
	if err := l2.Close(); err != nil {
		t.Fatal(err)
	}
	return clean, crash
}

// TestColdOpenReadsLittle: with the file dropped from the page cache, opening a cleanly closed log of
// 200,000 events (about 50 MiB) brings only a small part of the file into memory, while opening the same log
// as a crash left it reads all of it (the full check and the free list rebuild). It asserts what was read,
// not how long it took; the times and their ratio are logged (BenchmarkOpenColdCache measures them).
func TestColdOpenReadsLittle(t *testing.T) {
	if testing.Short() {
		t.Skip("writes a 50 MiB log")
	}
	const n = 200_000
	clean, crash := prepareColdFiles(t, t.TempDir(), n)
	size := fileSize(clean)
	cfg := Config{Durability: DurabilityInterval, MaxBytes: 4 << 30, Cursors: []string{"sink"}}

	cfg.Path = crash
	crashTook, crashKind, crashRead := coldOpen(t, cfg, n)
	cfg.Path = clean
	cleanTook, cleanKind, cleanRead := coldOpen(t, cfg, n)
	t.Logf("file %.1f MiB; clean open %v, read %.2f MiB; open after a crash %v, read %.2f MiB; ratio %.1fx",
		float64(size)/(1<<20), cleanTook, float64(cleanRead)/(1<<20), crashTook, float64(crashRead)/(1<<20),
		crashTook.Seconds()/cleanTook.Seconds())
	if cleanKind != openClean || crashKind != openRebuilt {
		t.Fatalf("opened as %q and %q, want clean and rebuilt", cleanKind, crashKind)
	}
	if cleanRead > size/20 {
		t.Errorf("the clean open read %d of %d bytes: more than 5%% of the file", cleanRead, size)
	}
	if crashRead < size/2 {
		t.Errorf("the open after a crash read %d of %d bytes: less than half of the file", crashRead, size)
	}
	// The clean path is taken again after the rebuild's Close.
	cfg.Path = crash
	if _, kind, read := coldOpen(t, cfg, n); kind != openClean || read > size/20 {
		t.Errorf("reopen of the rebuilt file: %q, read %d bytes", kind, read)
	}
}

// BenchmarkOpenColdCache measures Open of a log holding EDGEGATE_BENCH_BACKLOG events (default 1,000,000 of
// 200 bytes) with the file dropped from the page cache first: closed cleanly (clean-ms) and as a crash left it
// (rebuild-ms, the full check and free list rebuild), in the same run, and their ratio. Each iteration makes
// the crash copy anew by clearing the mark from its newest meta page, as any commit does.
func BenchmarkOpenColdCache(b *testing.B) {
	n := 1_000_000
	if s := os.Getenv("EDGEGATE_BENCH_BACKLOG"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil {
			b.Fatal(err)
		}
	}
	clean, crash := prepareColdFiles(b, b.TempDir(), n)
	cfg := Config{Durability: DurabilityInterval, MaxBytes: 4 << 30, Cursors: []string{"sink"}}
	var cleanSum, crashSum time.Duration
	var cleanRead, crashRead int64
	iters := 0
	for b.Loop() {
		cfg.Path = clean
		d, kind, read := coldOpen(b, cfg, int64(n))
		if kind != openClean {
			b.Fatalf("clean copy opened as %q", kind)
		}
		cleanSum, cleanRead = cleanSum+d, read
		if iters > 0 {
			asAfterCrash(b, crash) // the previous iteration's Close marked it clean
		}
		cfg.Path = crash
		d, kind, read = coldOpen(b, cfg, int64(n))
		if kind != openRebuilt {
			b.Fatalf("crash copy opened as %q", kind)
		}
		crashSum, crashRead = crashSum+d, read
		iters++
	}
	cleanMs := cleanSum.Seconds() * 1e3 / float64(iters)
	crashMs := crashSum.Seconds() * 1e3 / float64(iters)
	b.ReportMetric(cleanMs, "clean-ms")
	b.ReportMetric(crashMs, "rebuild-ms")
	b.ReportMetric(crashMs/cleanMs, "rebuild/clean")
	b.ReportMetric(float64(cleanRead)/(1<<20), "clean-read-MiB")
	b.ReportMetric(float64(crashRead)/(1<<20), "rebuild-read-MiB")
	b.ReportMetric(float64(fileSize(clean))/(1<<20), "file-MiB")
}
