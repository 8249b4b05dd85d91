//go:build linux

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Build builds cmd/edgegate once, on first use, into a temporary directory. The zero value builds a binary
// without the race detector; set Race before the first Path to build with it. It is safe for concurrent use.
// Call Remove (from TestMain) to delete the binary.
type Build struct {
	// Race builds the binary with -race.
	Race bool

	once sync.Once
	dir  string
	path string
	err  error
	took time.Duration
}

// Path returns the binary's path, building it on the first call. A build failure fails the test.
func (b *Build) Path(t testing.TB) string {
	t.Helper()
	p, err := b.Get()
	if err != nil {
		t.Fatalf("e2e: %v", err)
	}
	return p
}

// Get returns the binary's path, building it on the first call (for TestMain, which has no testing.TB).
func (b *Build) Get() (string, error) {
	b.once.Do(func() {
		start := time.Now()
		b.path, b.err = b.build()
		b.took = time.Since(start)
	})
	return b.path, b.err
}

// Took is how long the build took (0 before it ran).
func (b *Build) Took() time.Duration { return b.took }

// Remove deletes the built binary and its directory.
func (b *Build) Remove() {
	if b.dir != "" {
		_ = os.RemoveAll(b.dir)
	}
}

func (b *Build) build() (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	if b.dir, err = os.MkdirTemp("", "edgegate-e2e-"); err != nil {
		return "", fmt.Errorf("build: %w", err)
	}
	out := filepath.Join(b.dir, "edgegate")
	args := []string{"build", "-o", out}
	if b.Race {
		args = append(args, "-race")
	}
	args = append(args, "./cmd/edgegate")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool(), args...)
	cmd.Dir = root
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, msg)
	}
	return out, nil
}

// ModuleRoot returns the directory of the go.mod that holds the current directory.
func ModuleRoot() (string, error) {
	out, err := exec.Command(goTool(), "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("go env GOMOD: not inside a module")
	}
	return filepath.Dir(mod), nil
}

// goTool is the go command of the toolchain running the tests, else the one on PATH.
func goTool() string {
	if root := os.Getenv("GOROOT"); root != "" {
		if p := filepath.Join(root, "bin", "go"); fileExists(p) {
			return p
		}
	}
	return "go"
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}
