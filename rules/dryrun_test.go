package rules

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// TestDryRunGolden runs testdata/dryrun/NAME.jsonl through DryRun and compares the explanation with NAME.golden
// (go test -run TestDryRunGolden -update rewrites them).
func TestDryRunGolden(t *testing.T) {
	tests := []struct {
		name  string
		rules string
		dir   Directory
		opts  DryRunOptions
		err   string
	}{
		{name: "lights", rules: "../configs/rules.d"},
		{name: "lights_noflush", rules: "../configs/rules.d", opts: DryRunOptions{NoFlush: true, OnlyMatched: true}},
		{name: "lights_nodirectory", rules: "../configs/rules.d", dir: Directory(nil)},
		{name: "features", rules: "testdata/dryrun/features", err: "1 of 9 line(s) are not valid CloudEvents"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			events := strings.TrimSuffix(strings.TrimSuffix(tt.name, "_noflush"), "_nodirectory")
			in, err := os.Open(filepath.Join("testdata/dryrun", events+".jsonl"))
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			cfg := DefaultConfig()
			cfg.Dir = tt.rules
			dir := tt.dir
			if dir == nil && !strings.HasSuffix(tt.name, "_nodirectory") {
				dir = shippedDevices(t)
				dir = withDoor(dir.(testDirectory))
			}
			var out bytes.Buffer
			err = DryRun(cfg, dir, in, &out, tt.opts)
			if tt.err == "" && err != nil || tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)) {
				t.Fatalf("DryRun error = %v, want %q", err, tt.err)
			}
			golden := filepath.Join("testdata/dryrun", tt.name+".golden")
			if *update {
				if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(out.Bytes(), want) {
				t.Errorf("output differs from %s (run with -update to accept):\n%s", golden, out.String())
			}
		})
	}
}

// withDoor adds a door sensor to the shipped devices.
func withDoor(d testDirectory) testDirectory {
	d.devs = append(append([]Device(nil), d.devs...), Device{ID: "door-1", Name: "Front door", Room: "hall", Kind: "door"})
	return d
}

func TestDryRunRuleErrors(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"x.yaml": "rules:\n  - name: x\n    on: x\n    actions: [{command: {device: nobody, command: a}}]\n"})
	err := DryRun(cfg, homeDevices, strings.NewReader(""), &bytes.Buffer{}, DryRunOptions{})
	if err == nil || !strings.Contains(err.Error(), `x.yaml:4: rules[0].actions[0].command.device: unknown device "nobody"`) {
		t.Fatalf("DryRun = %v", err)
	}
}

// TestDryRunPairRuleSeesOnlyItsSteps: a sequence or absence rule's condition is evaluated only for an event that
// can be one of its steps, in a dry run as in the engine (whose index lets no other event through): an event of
// another type, whose data the condition cannot read, is no match, not an error.
func TestDryRunPairRuleSeesOnlyItsSteps(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = writeRules(t, map[string]string{"door.yaml": `rules:
  - name: door-left-open
    when: data.open == true
    absence: {after: door.opened, missing: door.closed, within: 5m}
    actions: [{emit: {type: door.left-open}}]
`})
	in := `{"specversion":"1.0","id":"e1","source":"/s","type":"sensor.temperature","subject":"thermo-1",` +
		`"time":"2024-05-01T10:00:00Z","datacontenttype":"text/plain","data":"21.5"}` + "\n"
	var out bytes.Buffer
	if err := DryRun(cfg, homeDevices, strings.NewReader(in), &out, DryRunOptions{}); err != nil {
		t.Fatalf("DryRun: %v", err)
	}
	want := "door-left-open: no match: after: type sensor.temperature ≠ door.opened; missing: type sensor.temperature ≠ door.closed"
	if !strings.Contains(out.String(), want) || strings.Contains(out.String(), "error") {
		t.Fatalf("output:\n%s\nwant the line %q and no error", out.String(), want)
	}
}
