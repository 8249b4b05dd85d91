package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSystemdUnit checks the shipped unit: readiness by sd_notify, restart on failure, a state directory, a
// dedicated user and the usual hardening; and, where systemd-analyze exists, that systemd accepts it.
func TestSystemdUnit(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(repo, "systemd/edgegate.service"))
	if err != nil {
		t.Fatal(err)
	}
	unit := string(raw)
	for _, want := range []string{"Type=notify", "Restart=on-failure", "StateDirectory=edgegate", "User=edgegate",
		"NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
		"ExecStart=/usr/local/bin/edgegate run --config /etc/edgegate/edgegate.yaml", "ExecReload=/bin/kill -HUP $MAINPID"} {
		if !strings.Contains(unit, "\n"+want+"\n") {
			t.Errorf("unit lacks %q", want)
		}
	}
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze not installed (scripts/test.sh installs systemd): %v", err)
	}
	// Verify a copy whose ExecStart names the binary built here (verify checks that it is executable).
	path := filepath.Join(t.TempDir(), "edgegate.service")
	unit = strings.Replace(unit, "/usr/local/bin/edgegate", binary(t), 1)
	if err := os.WriteFile(path, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, analyze, "verify", path).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	// verify exits 0 on directives it ignores; it names the file in every complaint about it.
	if strings.Contains(string(out), path) {
		t.Fatalf("systemd-analyze verify complains:\n%s", out)
	}
}
