package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// repo is the repository root, relative to this package.
const repo = "../.."

// runCmd runs the command line in-process and returns its exit code, stdout and stderr.
func runCmd(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := runMain(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// writeConfig writes a gateway configuration whose data lives in a temporary directory and whose paths point into
// the repository, with extra YAML appended.
func writeConfig(t *testing.T, extra string) (path, dataDir string) {
	t.Helper()
	dir := t.TempDir()
	dataDir = filepath.Join(dir, "data")
	abs := func(p string) string {
		a, err := filepath.Abs(filepath.Join(repo, p))
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	cfg := fmt.Sprintf("id: test-gw\ndata_dir: %s\nmqtt:\n  listen: 127.0.0.1:0\nhttp:\n  listen: 127.0.0.1:0\n"+
		"devices:\n  registry: %s\nrules:\n  dir: %s\n%s",
		dataDir, abs("configs/devices.yaml"), abs("configs/rules.d"), extra)
	path = filepath.Join(dir, "edgegate.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, dataDir
}

func TestUsageAndExitCodes(t *testing.T) {
	cases := []struct {
		args []string
		code int
		want string // in stdout or stderr
	}{
		{nil, 2, "Usage: edgegate <command>"},
		{[]string{"--help"}, 0, "check-config"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"version"}, 0, "edgegate dev"},
		{[]string{"run", "--help"}, 0, "Usage: edgegate run [--config FILE]"},
		{[]string{"run", "--no-such-flag"}, 2, "flag provided but not defined"},
		{[]string{"check-config", "--help"}, 0, "Usage: edgegate check-config"},
		{[]string{"passwd", "--help"}, 0, "--algo"},
		{[]string{"status", "--help"}, 0, "--addr"},
		{[]string{"deadletter", "list", "--help"}, 0, "--limit"},
		{[]string{"backlog"}, 2, "edgegate backlog purge"},
		{[]string{"backlog", "export", "--help"}, 0, "--since"},
		{[]string{"backlog", "purge", "--help"}, 0, "--before T --yes"},
		{[]string{"rules", "test", "--help"}, 0, "--events"},
		{[]string{"rules", "replay", "--help"}, 0, "--since"},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			code, out, errOut := runCmd(t, c.args...)
			if code != c.code {
				t.Errorf("exit code %d, want %d\nstdout: %s\nstderr: %s", code, c.code, out, errOut)
			}
			if !strings.Contains(out+errOut, c.want) {
				t.Errorf("output does not contain %q\nstdout: %s\nstderr: %s", c.want, out, errOut)
			}
		})
	}
}

func TestCheckConfig(t *testing.T) {
	t.Run("shipped", func(t *testing.T) {
		t.Chdir(repo) // the shipped config's paths are relative to the repository root
		code, out, errOut := runCmd(t, "check-config", "--config", "configs/edgegate.yaml")
		if code != 0 || !strings.Contains(out, "ok") {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
		}
	})
	t.Run("unknown key names its line", func(t *testing.T) {
		path, _ := writeConfig(t, "buffer:\n  max_bytes: 1000000\n  maxage: 1h\n")
		code, _, errOut := runCmd(t, "check-config", "--config", path)
		if code != 1 {
			t.Fatalf("exit %d, want 1; stderr: %s", code, errOut)
		}
		if !strings.Contains(errOut, "maxage") || !strings.Contains(errOut, "[13:") {
			t.Fatalf("error does not name the key and its line 13:\n%s", errOut)
		}
	})
	t.Run("every problem with its key", func(t *testing.T) {
		path, _ := writeConfig(t, "buffer:\n  when_full: discard\n  max_bytes: -1\nlog:\n  level: loud\n")
		code, _, errOut := runCmd(t, "check-config", "--config", path)
		if code != 1 {
			t.Fatalf("exit %d, want 1; stderr: %s", code, errOut)
		}
		for _, key := range []string{"buffer.when_full", "buffer.max_bytes", "log.level"} {
			if !strings.Contains(errOut, key) {
				t.Errorf("error does not name %s:\n%s", key, errOut)
			}
		}
	})
	t.Run("missing file", func(t *testing.T) {
		code, _, errOut := runCmd(t, "check-config", "--config", filepath.Join(t.TempDir(), "nope.yaml"))
		if code != 1 || !strings.Contains(errOut, "nope.yaml") {
			t.Fatalf("exit %d, stderr: %s", code, errOut)
		}
	})
}

// events writes n CloudEvents as JSON lines and returns the file and their ids.
func events(t *testing.T, n int) (string, []string) {
	t.Helper()
	var b strings.Builder
	var ids []string
	for i := range n {
		id := fmt.Sprintf("ev-%03d", i)
		ids = append(ids, id)
		fmt.Fprintf(&b, `{"specversion":"1.0","id":%q,"source":"/gateways/test-gw/devices/thermo-1","type":"telemetry.temperature",`+
			`"subject":"thermo-1","time":"2026-01-02T03:04:%02dZ","datacontenttype":"application/json","data":{"celsius":%d}}`+"\n",
			id, i%60, 20+i)
	}
	path := filepath.Join(t.TempDir(), "events.jsonl")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, ids
}

func backlogEvents(t *testing.T, cfg string) float64 {
	t.Helper()
	code, out, errOut := runCmd(t, "backlog", "stats", "--config", cfg)
	if code != 0 {
		t.Fatalf("backlog stats: exit %d: %s", code, errOut)
	}
	var st map[string]any
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("backlog stats output is not JSON: %v\n%s", err, out)
	}
	n, ok := st["events"].(float64)
	if !ok {
		t.Fatalf("backlog stats has no events count: %s", out)
	}
	return n
}

func TestBacklogImportExportPurge(t *testing.T) {
	cfg, _ := writeConfig(t, "")
	in, ids := events(t, 50)

	if code, _, errOut := runCmd(t, "backlog", "import", "--config", cfg, "--in", in); code != 0 {
		t.Fatalf("import: exit %d: %s", code, errOut)
	}
	if n := backlogEvents(t, cfg); n != 50 {
		t.Fatalf("after import: %v events, want 50", n)
	}

	code, out, errOut := runCmd(t, "backlog", "export", "--config", cfg)
	if code != 0 {
		t.Fatalf("export: exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(ids) {
		t.Fatalf("export wrote %d lines, want %d", len(lines), len(ids))
	}
	for i, line := range lines {
		var ev struct {
			ID   string         `json:"id"`
			Data map[string]any `json:"data"`
		}
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("line %d is not a CloudEvent: %v: %s", i+1, err, line)
		}
		if ev.ID != ids[i] || ev.Data["celsius"] != float64(20+i) {
			t.Fatalf("line %d: id %s data %v, want id %s celsius %d (order and content kept)", i+1, ev.ID, ev.Data, ids[i], 20+i)
		}
	}

	// A window of time exports only its events.
	code, out, errOut = runCmd(t, "backlog", "export", "--config", cfg,
		"--since", "2026-01-02T03:04:10Z", "--until", "2026-01-02T03:04:20Z")
	if code != 0 {
		t.Fatalf("export window: exit %d: %s", code, errOut)
	}
	if n := strings.Count(out, "\n"); n != 10 {
		t.Fatalf("export of a 10 s window wrote %d events, want 10", n)
	}

	// Purge wants a confirmation and removes nothing without it.
	if code, _, errOut := runCmd(t, "backlog", "purge", "--config", cfg, "--before", "2026-01-02T03:05:00Z"); code == 0 {
		t.Fatalf("purge without --yes succeeded: %s", errOut)
	}
	if n := backlogEvents(t, cfg); n != 50 {
		t.Fatalf("purge without --yes removed events: %v left", n)
	}
	if code, _, errOut := runCmd(t, "backlog", "purge", "--config", cfg, "--before", "2026-01-02T03:04:30Z", "--yes"); code != 0 {
		t.Fatalf("purge: exit %d: %s", code, errOut)
	}
	if n := backlogEvents(t, cfg); n != 20 {
		t.Fatalf("after purging the first 30: %v events, want 20", n)
	}

	// A bad import line stops the import and is reported with its line number.
	bad := filepath.Join(t.TempDir(), "bad.jsonl")
	if err := os.WriteFile(bad, []byte(`{"specversion":"1.0","id":"x","source":"/s","type":"t"}`+"\nnot json\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut = runCmd(t, "backlog", "import", "--config", cfg, "--in", bad)
	if code == 0 || !strings.Contains(errOut, "line 2") {
		t.Fatalf("import of a bad file: exit %d: %s", code, errOut)
	}
}

func TestRulesTestCommand(t *testing.T) {
	code, out, errOut := runCmd(t, "rules", "test",
		"--rules", filepath.Join(repo, "configs/rules.d"),
		"--events", filepath.Join(repo, "rules/testdata/dryrun/lights.jsonl"),
		"--devices", filepath.Join(repo, "configs/devices.yaml"))
	if code != 0 {
		t.Fatalf("exit %d\nstderr: %s", code, errOut)
	}
	for _, want := range []string{"lights-on-motion", "lights.on", "kitchen-light-1", "kitchen-light-2"} {
		if !strings.Contains(out, want) {
			t.Errorf("output does not mention %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "hall-light") && strings.Contains(out, "command lights.on hall-light") {
		t.Errorf("a kitchen event turned on the hall light:\n%s", out)
	}

	code, _, errOut = runCmd(t, "rules", "test", "--rules", filepath.Join(repo, "configs/rules.d"))
	if code != 2 || !strings.Contains(errOut, "--events") {
		t.Fatalf("rules test without --events: exit %d: %s", code, errOut)
	}
}
