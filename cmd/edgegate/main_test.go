package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/buffer"
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

	if code, out, errOut := runCmd(t, "backlog", "import", "--config", cfg, "--in", in); code != 0 || out != "imported 50 events\n" {
		t.Fatalf("import: exit %d: %q %s", code, out, errOut)
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
	if code == 0 || !strings.Contains(errOut, "line 2") || !strings.Contains(errOut, "(1 events imported)") {
		t.Fatalf("import of a bad file: exit %d: %s", code, errOut)
	}
	if n := backlogEvents(t, cfg); n != 21 {
		t.Fatalf("after the import stopped at line 2: %v events, want 21 (its line 1 stored)", n)
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

// TestRulesTestSeesDeviceState: in `rules test`, conditions see the device state the events build (reported
// fields, last_event), as in the gateway, where each event updates the state view before the rules see it.
func TestRulesTestSeesDeviceState(t *testing.T) {
	dir := t.TempDir()
	rule := `rules:
  - name: warm-again
    on: telemetry.temperature
    when: state.reported?.celsius != nil && state.reported.celsius > 20 && state.last_event == "telemetry.temperature"
    actions: [{emit: {type: room.warm}}]
`
	if err := os.WriteFile(filepath.Join(dir, "warm.yaml"), []byte(rule), 0o600); err != nil {
		t.Fatal(err)
	}
	evs, _ := events(t, 3) // thermo-1 reports celsius 20, 21, 22
	code, out, errOut := runCmd(t, "rules", "test", "--rules", dir, "--events", evs,
		"--devices", filepath.Join(repo, "configs/devices.yaml"))
	if code != 0 {
		t.Fatalf("exit %d\nstderr: %s", code, errOut)
	}
	if n := strings.Count(out, "-> emit room.warm"); n != 2 {
		t.Fatalf("%d room.warm derived, want 2 (celsius 21 and 22, seen in the state):\n%s", n, out)
	}
}

// TestRulesTestWithConfig: with --config, `rules test` runs the configuration's rules settings, rule directory and
// device registry, as the gateway would; --rules still overrides the directory.
func TestRulesTestWithConfig(t *testing.T) {
	rulesDir, err := filepath.Abs("testdata/replay/rules")
	if err != nil {
		t.Fatal(err)
	}
	evs, err := filepath.Abs("testdata/replay/events.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	const guard = "loop guard: the cause is 1 derivations deep (max_chain_depth 1)"
	cfg, _ := writeConfig(t, "")
	setRules(t, cfg, "  dir: "+rulesDir+"\n  max_chain_depth: 1\n")
	code, out, errOut := runCmd(t, "rules", "test", "--config", cfg, "--events", evs)
	if code != 0 {
		t.Fatalf("rules test --config: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	for _, want := range []string{"rules: 2 loaded from " + rulesDir, guard} {
		if !strings.Contains(out, want) {
			t.Errorf("rules test --config: output lacks %q:\n%s", want, out)
		}
	}

	// Without --config the built-in max_chain_depth (8) lets the second derivation through.
	code, out, errOut = runCmd(t, "rules", "test", "--rules", rulesDir, "--events", evs,
		"--devices", filepath.Join(repo, "configs/devices.yaml"))
	if code != 0 {
		t.Fatalf("rules test: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	if strings.Contains(out, guard) || !strings.Contains(out, "-> emit climate.alarm") {
		t.Errorf("rules test without --config stopped the chain at depth 1:\n%s", out)
	}

	// --rules overrides the configuration's directory.
	code, out, errOut = runCmd(t, "rules", "test", "--config", cfg, "--rules", filepath.Join(repo, "configs/rules.d"),
		"--events", filepath.Join(repo, "rules/testdata/dryrun/lights.jsonl"))
	if code != 0 || !strings.Contains(out, "-> command kitchen-light-1 lights.on") {
		t.Errorf("rules test --config --rules: exit %d, output lacks the kitchen light's command\nstdout: %s\nstderr: %s",
			code, out, errOut)
	}

	setRules(t, cfg, "  dir: "+rulesDir+"\n  max_chain_depth: -3\n")
	if code, _, errOut := runCmd(t, "rules", "test", "--config", cfg, "--events", evs); code == 0 || !strings.Contains(errOut, "max_chain_depth") {
		t.Errorf("rules test with max_chain_depth -3: exit %d, stderr %q; want an error naming it", code, errOut)
	}
}

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// setRules replaces the rules section of the configuration at path with body (indented YAML keys).
func setRules(t *testing.T, path, body string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`(?m)^rules:\n  dir: .*\n`)
	if !re.Match(data) {
		t.Fatalf("no rules section in %s:\n%s", path, data)
	}
	data = re.ReplaceAllLiteral(data, []byte("rules:\n"+body))
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// writeLog appends CloudEvents (JSON objects) to the log in dataDir through the buffer package, as the gateway
// stores them, with the named cursors (sinks' cursors: they hold events) moved to the given positions.
func writeLog(t *testing.T, dataDir string, cursors map[string]uint64, events ...string) {
	t.Helper()
	if err := os.MkdirAll(dataDir, 0o750); err != nil {
		t.Fatal(err)
	}
	bcfg := buffer.DefaultConfig()
	bcfg.Path = filepath.Join(dataDir, "events.db")
	for name := range cursors {
		bcfg.Cursors = append(bcfg.Cursors, name)
	}
	lg, err := buffer.Open(bcfg, discardLogger(), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- lg.Run(ctx) }()
	pending := make([]*buffer.Pending, 0, len(events))
	for i, data := range events {
		ev, err := validateEvent([]byte(data))
		if err != nil {
			t.Fatalf("event %d: %v", i+1, err)
		}
		p, err := lg.AppendAsync(ctx, buffer.Entry{Data: []byte(data), Type: ev.Type(), Subject: ev.Subject(), Time: ev.Time()})
		if err != nil {
			t.Fatalf("append event %d: %v", i+1, err)
		}
		pending = append(pending, p)
	}
	for i, p := range pending {
		if _, err := p.Wait(ctx); err != nil {
			t.Fatalf("append event %d: %v", i+1, err)
		}
	}
	for name, pos := range cursors {
		if pos > 0 {
			if err := lg.Ack(name, pos); err != nil {
				t.Fatal(err)
			}
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("log run: %v", err)
	}
}

func TestCheckConfigRules(t *testing.T) {
	rulesDir := t.TempDir()
	write := func(name, body string) {
		if err := os.WriteFile(filepath.Join(rulesDir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("a-good.yaml", "rules:\n  - name: fine\n    on: {type: a.b}\n    actions:\n      - state: {key: seen, value: '1'}\n")
	path, _ := writeConfig(t, "")
	setRules(t, path, "  dir: "+rulesDir+"\n")

	code, out, errOut := runCmd(t, "check-config", "--config", path)
	if code != 0 || !strings.Contains(out, "ok (1 rules)") {
		t.Fatalf("good rules: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}

	// Three mistakes in one file (the third names a device the registry does not know), and one in the
	// configuration itself: every one is reported, the rules' with file and line.
	write("b-bad.yaml", `rules:
  - name: first
    on: {type: a.b}
    actions:
      - explode: {}
  - name: second
    on: {type: a.b}
    actions:
      - command: {device: no-such-device, command: x}
      - state: {key: k}
`)
	bad := filepath.Join(rulesDir, "b-bad.yaml")
	for _, extra := range []string{"", "log:\n  level: loud\n"} {
		path, _ := writeConfig(t, extra)
		setRules(t, path, "  dir: "+rulesDir+"\n")
		code, out, errOut := runCmd(t, "check-config", "--config", path)
		if code != 1 || strings.Contains(out, "ok") {
			t.Fatalf("bad rules: exit %d, want 1\nstdout: %s\nstderr: %s", code, out, errOut)
		}
		for _, want := range []string{
			bad + ":5: rules[0].actions[0].explode",
			bad + `:9: rules[1].actions[0].command.device: unknown device "no-such-device"`,
			bad + ":10: rules[1].actions[1].state.value: missing",
		} {
			if !strings.Contains(errOut, want) {
				t.Errorf("error does not report %q:\n%s", want, errOut)
			}
		}
		if extra != "" && !strings.Contains(errOut, "log.level") {
			t.Errorf("a configuration problem is not reported next to the rules' ones:\n%s", errOut)
		}
	}
}

// TestBacklogStats checks the counts `backlog stats` shows offline: the events, each sink's backlog after its
// cursor (a priority lane's too, and that of a lane that has not acknowledged anything yet, whose cursor the log
// has not stored) and the age of its oldest waiting event.
// TestBacklogToolsKeepWhatASinkLacks: purge and import commit, and a commit removes what every sink's cursor
// passed; a configured sink that never acknowledged anything (it saved no position) still holds every event.
func TestBacklogToolsKeepWhatASinkLacks(t *testing.T) {
	cfg, dataDir := writeConfig(t, `forward:
  sinks:
    - name: cloud
      type: mqtt
      mqtt: {url: "tcp://127.0.0.1:1"}
    - name: archive
      type: http
      http: {url: "http://127.0.0.1:1/events"}
`)
	evPath, _ := events(t, 20)
	raw, err := os.ReadFile(evPath)
	if err != nil {
		t.Fatal(err)
	}
	writeLog(t, dataDir, map[string]uint64{"sink:cloud": 0, "sink:archive": 20}, strings.Split(strings.TrimSpace(string(raw)), "\n")...)
	if n := backlogEvents(t, cfg); n != 20 {
		t.Fatalf("before: %v events, want 20", n)
	}
	if code, _, errOut := runCmd(t, "backlog", "purge", "--config", cfg, "--before", "2001-01-01T00:00:00Z", "--yes"); code != 0 {
		t.Fatalf("purge: exit %d: %s", code, errOut)
	}
	if n := backlogEvents(t, cfg); n != 20 {
		t.Fatalf("after a purge of nothing: %v events, want the 20 that sink cloud has not received", n)
	}
	one, _ := events(t, 1)
	if code, _, errOut := runCmd(t, "backlog", "import", "--config", cfg, "--in", one); code != 0 {
		t.Fatalf("import: exit %d: %s", code, errOut)
	}
	if n := backlogEvents(t, cfg); n != 21 {
		t.Fatalf("after importing one: %v events, want 21", n)
	}
}

func TestBacklogStats(t *testing.T) {
	cfg, dataDir := writeConfig(t, `forward:
  sinks:
    - name: cloud
      type: mqtt
      priority_lanes: [5]
      mqtt: {url: "tcp://127.0.0.1:1"}
    - name: archive
      type: http
      http: {url: "http://127.0.0.1:1/events"}
`)
	base := time.Now().Add(-100 * time.Minute).Truncate(time.Second).UTC()
	at := func(i int) time.Time { return base.Add(time.Duration(i) * time.Minute) } // event i+1 (seq i+1)
	var evs []string
	for i := range 10 {
		evs = append(evs, fmt.Sprintf(`{"specversion":"1.0","id":"e%d","source":"/s","type":"telemetry.temperature",`+
			`"subject":"thermo-1","time":%q,"data":{"celsius":%d}}`, i, at(i).Format(time.RFC3339Nano), i))
	}
	writeLog(t, dataDir, map[string]uint64{"sink:cloud": 4, "sink:cloud@p5": 0, "sink:archive": 10}, evs...)

	start := time.Now()
	code, out, errOut := runCmd(t, "backlog", "stats", "--config", cfg)
	if code != 0 {
		t.Fatalf("backlog stats: exit %d: %s", code, errOut)
	}
	var st buffer.Stats
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("backlog stats output is not the log's stats: %v\n%s", err, out)
	}
	if st.Events != 10 || st.FirstSeq != 1 || st.LastSeq != 10 || !st.Oldest.Equal(at(0)) {
		t.Errorf("events %d seq %d-%d oldest %s; want 10, 1-10, %s", st.Events, st.FirstSeq, st.LastSeq, st.Oldest, at(0))
	}
	// The age is measured when the command runs: between the age before it and the age now.
	ageOK := func(age float64, of time.Time) bool {
		lo, hi := start.Sub(of).Seconds()-1, time.Since(of).Seconds()+1
		return age >= lo && age <= hi
	}
	want := map[string]struct {
		backlog int64
		oldest  time.Time // zero: nothing waits
	}{
		"sink:cloud":    {6, at(4)},
		"sink:cloud@p5": {10, at(0)},
		"sink:archive":  {0, time.Time{}},
	}
	if len(st.Cursors) != len(want) {
		t.Fatalf("cursors %+v, want %d", st.Cursors, len(want))
	}
	for _, c := range st.Cursors {
		w, ok := want[c.Name]
		if !ok {
			t.Errorf("unexpected cursor %q", c.Name)
			continue
		}
		if !c.Required || c.Backlog != w.backlog {
			t.Errorf("%s: required %v backlog %d; want required, backlog %d", c.Name, c.Required, c.Backlog, w.backlog)
		}
		if w.oldest.IsZero() {
			if !c.OldestUnacked.IsZero() || c.OldestUnackedAge != 0 {
				t.Errorf("%s: nothing waits, but oldest %s age %v", c.Name, c.OldestUnacked, c.OldestUnackedAge)
			}
			continue
		}
		if !c.OldestUnacked.Equal(w.oldest) || !ageOK(c.OldestUnackedAge, w.oldest) {
			t.Errorf("%s: oldest waiting %s, %.0fs old; want %s, %.0fs old", c.Name, c.OldestUnacked,
				c.OldestUnackedAge, w.oldest, time.Since(w.oldest).Seconds())
		}
	}
}

// TestBacklogRecover damages the log's file: the tools refuse it and name `backlog recover`, which moves it aside
// (kept as it was) so that a new log can be made and used.
func TestBacklogRecover(t *testing.T) {
	cfg, dataDir := writeConfig(t, "")
	in, _ := events(t, 20)
	if code, _, errOut := runCmd(t, "backlog", "import", "--config", cfg, "--in", in); code != 0 {
		t.Fatalf("import: exit %d: %s", code, errOut)
	}
	path := filepath.Join(dataDir, "events.db")
	// A sound log is not moved aside, unless forced.
	if code, _, errOut := runCmd(t, "backlog", "recover", "--config", cfg); code != 1 || !strings.Contains(errOut, "reads as sound") {
		t.Fatalf("recover of a sound log: exit %d, want 1 and a refusal: %s", code, errOut)
	}
	if n := backlogEvents(t, cfg); n != 20 {
		t.Fatalf("after a refused recover: %v events, want 20", n)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// Garbage over both meta pages (pages 0 and 1).
	for i := range min(len(data), 2*os.Getpagesize()) {
		data[i] = byte(i*7 + 3)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}

	code, _, errOut := runCmd(t, "backlog", "stats", "--config", cfg)
	if code != 1 || !strings.Contains(errOut, `"edgegate backlog recover"`) || !strings.Contains(errOut, path) {
		t.Fatalf("stats of a damaged log: exit %d, want 1 and a message naming the file and the recovery:\n%s", code, errOut)
	}

	code, out, errOut := runCmd(t, "backlog", "recover", "--config", cfg)
	if code != 0 {
		t.Fatalf("recover: exit %d: %s", code, errOut)
	}
	m := regexp.MustCompile(`moved the damaged log aside to (\S+);`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("recover does not say where the file went:\n%s", out)
	}
	moved := m[1]
	if filepath.Dir(moved) != dataDir || !strings.HasPrefix(filepath.Base(moved), "events.db.corrupt-") {
		t.Errorf("moved to %s, want %s/events.db.corrupt-<time>", moved, dataDir)
	}
	kept, err := os.ReadFile(moved)
	if err != nil || !bytes.Equal(kept, data) {
		t.Fatalf("the damaged file is not kept as it was at %s (err %v)", moved, err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("%s still exists after recover: %v", path, err)
	}

	// A new log is made and works.
	in, _ = events(t, 5)
	if code, _, errOut := runCmd(t, "backlog", "import", "--config", cfg, "--in", in); code != 0 {
		t.Fatalf("import into a new log: exit %d: %s", code, errOut)
	}
	if n := backlogEvents(t, cfg); n != 5 {
		t.Fatalf("the new log has %v events, want 5", n)
	}
	code, out, errOut = runCmd(t, "backlog", "export", "--config", cfg)
	if code != 0 || strings.Count(out, "\n") != 5 {
		t.Fatalf("export of the new log: exit %d, %d lines: %s", code, strings.Count(out, "\n"), errOut)
	}
}

// TestRulesReplay replays a log written as the gateway writes it, with the configuration's rules settings
// (max_chain_depth 1 stops the rules' second derivation) and without the stored events that rules derived (the
// dry run derives them again). testdata/replay.golden is the expected output (-update rewrites it).
func TestRulesReplay(t *testing.T) {
	rulesDir, err := filepath.Abs("testdata/replay/rules")
	if err != nil {
		t.Fatal(err)
	}
	cfg, dataDir := writeConfig(t, "")
	setRules(t, cfg, "  dir: "+rulesDir+"\n  max_chain_depth: 1\n")
	raw, err := os.ReadFile("testdata/replay/events.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	writeLog(t, dataDir, nil, strings.Split(strings.TrimSpace(string(raw)), "\n")...)

	// Events since 1990 are left out (the first one is of 1990); 200000h reaches back to about 2003 in 2026.
	code, out, errOut := runCmd(t, "rules", "replay", "--config", cfg, "--since", "200000h")
	if code != 0 {
		t.Fatalf("replay: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	out = strings.ReplaceAll(out, rulesDir, "testdata/replay/rules")
	const golden = "testdata/replay.golden"
	if *update {
		if err := os.WriteFile(golden, []byte(out), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if out != string(want) {
		t.Errorf("output differs from %s (run with -update to accept):\n%s", golden, out)
	}
}
