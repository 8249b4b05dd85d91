package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestStrayArguments checks every command: an argument that is not a flag is a usage error naming it, instead of
// being ignored while the command runs with its defaults.
func TestStrayArguments(t *testing.T) {
	t.Chdir(t.TempDir()) // no default configuration here: nothing may be run with it by mistake
	bad, _ := writeConfig(t, "log:\n  level: loud\n")
	cases := [][]string{
		{"run", bad},
		{"run", "--config", bad, "extra"},
		{"check-config", bad},
		{"check-config", "--config", bad, "extra"},
		{"passwd", "hunter2"},
		{"status", "127.0.0.1:8080"},
		{"status", "--json", "extra"},
		{"deadletter", "list", "extra"},
		{"deadletter", "list", "--limit", "3", "extra", "--json"},
		{"backlog", "stats", "extra"},
		{"backlog", "export", "extra"},
		{"backlog", "import", "events.jsonl"},
		{"backlog", "purge", "--before", "1h", "--yes", "extra"},
		{"backlog", "recover", "extra"},
		{"rules", "test", "--events", "events.jsonl", "extra"},
		{"rules", "replay", "extra"},
		{"version", "extra"},
	}
	for _, args := range cases {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			stray := args[len(args)-1]
			if stray == "--json" {
				stray = "extra"
			}
			code, out, errOut := runCmd(t, args...)
			if code != 2 {
				t.Errorf("exit code %d, want 2 (usage)\nstdout: %s\nstderr: %s", code, out, errOut)
			}
			if want := "unexpected argument \"" + stray + "\""; !strings.Contains(errOut, want) {
				t.Errorf("stderr does not say %s:\n%s", want, errOut)
			}
			if !strings.Contains(errOut, "Usage: edgegate "+args[0]) {
				t.Errorf("stderr shows no usage:\n%s", errOut)
			}
			if strings.Contains(out, "ok") {
				t.Errorf("the command ran: %s", out)
			}
		})
	}
	// A file given without --config gets a hint.
	_, _, errOut := runCmd(t, "check-config", bad)
	if !strings.Contains(errOut, "--config FILE") {
		t.Errorf("no hint at --config:\n%s", errOut)
	}
}

// TestAdminAddress checks which admin API status and deadletter list ask: the one the configuration sets, none
// when it is off or the configuration does not load, and the default only for a default path that does not exist.
func TestAdminAddress(t *testing.T) {
	off, offData := writeConfig(t, "")
	data, err := os.ReadFile(off)
	if err != nil {
		t.Fatal(err)
	}
	data = []byte(strings.Replace(string(data), "http:\n  listen: 127.0.0.1:0\n", "http:\n  listen: \"off\"\n", 1))
	if err := os.WriteFile(off, data, 0o600); err != nil {
		t.Fatal(err)
	}
	broken, _ := writeConfig(t, "buffer:\n  maxage: 1h\n")
	port, _ := writeConfig(t, "")
	data, _ = os.ReadFile(port)
	data = []byte(strings.Replace(string(data), "http:\n  listen: 127.0.0.1:0\n", "http:\n  listen: \":9\"\n", 1))
	if err := os.WriteFile(port, data, 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "nope.yaml")

	t.Run("adminAPI", func(t *testing.T) {
		t.Chdir(t.TempDir())
		cases := []struct {
			path    string
			given   bool
			want    string
			wantErr string
		}{
			{port, true, "127.0.0.1:9", ""},
			{off, true, "", "the admin API is off"},
			{broken, true, "", `unknown field "maxage"`},
			{missing, true, "", "nope.yaml"},
			{defaultConfig, false, "127.0.0.1:8080", ""}, // not in this directory: the documented default
			{defaultConfig, true, "", defaultConfig},     // named on purpose: it must exist
		}
		for _, c := range cases {
			got, err := adminAPI(c.path, c.given)
			if got != c.want || (c.wantErr == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.wantErr)) {
				t.Errorf("adminAPI(%s, %v) = %q, %v; want %q, error with %q", c.path, c.given, got, err, c.want, c.wantErr)
			}
		}
	})

	t.Run("status", func(t *testing.T) {
		for _, c := range []struct{ path, want string }{
			{off, "the admin API is off in " + off + " (http.listen: off)"},
			{broken, `unknown field "maxage"`},
			{missing, "nope.yaml"},
		} {
			code, out, errOut := runCmd(t, "status", "--config", c.path)
			if code != 1 || !strings.Contains(errOut, c.want) {
				t.Errorf("status --config %s: exit %d, stderr %q; want 1 and %q\nstdout: %s", c.path, code, errOut, c.want, out)
			}
			if strings.Contains(errOut, "is edgegate running?") {
				t.Errorf("status --config %s asked an admin API: %s", c.path, errOut)
			}
		}
	})

	t.Run("deadletter list", func(t *testing.T) {
		// With the admin API off, the store is read directly (the gateway does not run).
		code, out, errOut := runCmd(t, "deadletter", "list", "--config", off)
		if code != 0 || !strings.Contains(out, "REASON") {
			t.Errorf("deadletter list with http.listen off: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
		}
		if _, err := os.Stat(filepath.Join(offData, "deadletter.db")); err != nil {
			t.Errorf("the store was not read: %v", err)
		}
		code, out, errOut = runCmd(t, "deadletter", "list", "--config", broken)
		if code != 1 || !strings.Contains(errOut, `unknown field "maxage"`) || strings.Contains(errOut, "is edgegate running?") {
			t.Errorf("deadletter list with a broken config: exit %d, stderr %q; want 1 and its error\nstdout: %s", code, errOut, out)
		}
	})
}
