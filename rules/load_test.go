package rules

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadProblems(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want []string // every problem, in order, as file:line: key: message prefixes
	}{
		{"unknown keys", `
rules:
  - name: a
    on: {type: x, colour: red}
    actions: [{emit: {type: y, colour: z}}]
    extra: 1
`, []string{
			"t.yaml:4: rules[0].on.colour: unknown key (allowed: type, source, subject, device)",
			"t.yaml:5: rules[0].actions[0].emit.colour: unknown key",
			"t.yaml:6: rules[0].extra: unknown key",
		}},
		{"expressions and templates", `
rules:
  - name: a
    on: x
    when: 'data.temp >'
    key: 'nosuch.field'
    actions:
      - emit: {type: y, data: '{{ data.x'}
      - emit: {type: y, subject: '{{ event.nope }}'}
      - state: {key: k, value: '{{ 1 + }}'}
`, []string{
			`t.yaml:5: rules[0].when: expression "data.temp >": unexpected token EOF`,
			`t.yaml:6: rules[0].key: expression "nosuch.field": unknown name nosuch`,
			`t.yaml:8: rules[0].actions[0].emit.data: template: "{{" without "}}"`,
			`t.yaml:9: rules[0].actions[1].emit.subject: template: {{ event.nope }}: type rules.eventEnv has no field nope`,
			`t.yaml:10: rules[0].actions[2].state.value: {{ 1 + }}: unexpected token EOF`,
		}},
		{"durations", `
rules:
  - name: a
    on: x
    debounce: 30x
    throttle: -1s
    actions: [{emit: {type: y}}]
  - name: b
    absence: {after: x, missing: y, within: 9999h}
    actions: [{emit: {type: y}}]
`, []string{
			`t.yaml:5: rules[0].debounce: "30x" is not a duration`,
			`t.yaml:6: rules[0].throttle: must be > 0, got -1s`,
			`t.yaml:9: rules[1].absence.within: must be at most 8784h0m0s`,
		}},
		{"actions", `
rules:
  - name: a
    on: x
    actions:
      - shout: {x: 1}
      - {emit: {type: y}, state: {key: k, value: 1}}
      - command: {device: nobody, command: lights.on}
      - command: {device: hall-light, to: {kind: light}, command: x}
      - command: {to: {flavour: x}, command: "a/b"}
      - command: {to: {}, command: x}
      - command: {device: '{{ data.target }}'}
  - name: b
    on: x
    actions: []
  - name: c
    on: x
`, []string{
			"t.yaml:6: rules[0].actions[0].shout: unknown key (allowed: command, emit, state)",
			"t.yaml:7: rules[0].actions[1]: an action is exactly one of command, emit, state",
			`t.yaml:8: rules[0].actions[2].command.device: unknown device "nobody"`,
			"t.yaml:9: rules[0].actions[3].command: use device (one named device) or to (a selector), not both",
			"t.yaml:10: rules[0].actions[4].command.to.flavour: unknown selector key",
			`t.yaml:10: rules[0].actions[4].command.command: "a/b" must be`,
			"t.yaml:11: rules[0].actions[5].command.to: an empty selector would pick every device",
			"t.yaml:12: rules[0].actions[6].command.command: missing",
			"t.yaml:15: rules[1].actions: a rule needs at least one action",
			"t.yaml:16: rules[2].actions: missing",
		}},
		{"patterns", `
rules:
  - name: a
    window: {size: 5m, slide: 2m, agg: median}
    sequence: {first: x, then: y, within: 1m}
    actions: [{emit: {type: y}}]
  - name: b
    on: {type: room.entered}
    absence: {after: room.left, missing: room.entered, within: 1m}
    actions: [{emit: {type: y}}]
  - name: c
    window: {size: 1m, emit: crossing}
    actions: [{emit: {type: y}}]
`, []string{
			"t.yaml:3: rules[0]: a rule has at most one of window, sequence, absence; this one has window, sequence",
			"t.yaml:4: rules[0].window.slide: size (5m0s) must be a whole multiple of slide (2m0s)",
			`t.yaml:4: rules[0].window.agg: "median" is not count, sum, avg, min or max`,
			"t.yaml:4: rules[0].window.value: missing",
			"t.yaml:8: rules[1].on.type: room.entered excludes every event of absence.after (room.left)",
			"t.yaml:12: rules[2].window.threshold: missing: emit crossing needs a threshold",
		}},
		{"names", `
rules:
  - on: x
    actions: [{emit: {type: y}}]
  - name: "bad name!"
    on: x
    actions: [{emit: {type: y}}]
  - name: dup
    on: x
    actions: [{emit: {type: y}}]
  - name: dup
    on: x
    actions: [{emit: {type: y}}]
`, []string{
			"t.yaml:3: rules[0].name: missing: every rule needs a name",
			`t.yaml:5: rules[1].name: "bad name!" must be 1-64`,
			`t.yaml:11: rules[3].name: rule "dup" is already defined at t.yaml:8`,
		}},
		{"shape", "- name: a\n", []string{"t.yaml:1: a rule file is a mapping with a rules: list, got a list"}},
		{"rules not a list", "rules: {name: a}\n", []string{"t.yaml:1: rules: must be a list of rules, got a mapping"}},
		{"yaml syntax", "rules:\n  - name: a\n    on: {type: x\n", []string{"t.yaml:3: YAML: could not find flow mapping end token"}},
		{"tab", "rules:\n\t- name: a\n", []string{"t.yaml:2: YAML: found character"}},
		{"two documents", "rules: []\n---\nrules: []\n", []string{"t.yaml:3: only one YAML document per file"}},
		{"alias", "rules:\n  - &r\n    name: a\n    on: x\n    actions: [{emit: {type: y}}]\n  - *r\n", []string{"t.yaml:6: rules[1]: must be a mapping, got an alias"}},
		{"device keys", `
rules:
  - name: a
    on: {device: {colour: red, room: [a]}}
    actions: [{emit: {type: y}}]
`, []string{
			"t.yaml:4: rules[0].on.device.colour: unknown device key",
			"t.yaml:4: rules[0].on.device.room: must be a string, got a list",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := parseRules("t.yaml", []byte(tt.src), homeDevices)
			var le *LoadError
			if !errors.As(err, &le) || !errors.Is(err, ErrInvalidRules) {
				t.Fatalf("err = %v, want a *LoadError", err)
			}
			var got []string
			for _, p := range le.Problems {
				got = append(got, p.String())
			}
			if len(got) != len(tt.want) {
				t.Fatalf("%d problems, want %d:\n%s", len(got), len(tt.want), strings.Join(got, "\n"))
			}
			for i := range got {
				if !strings.HasPrefix(got[i], tt.want[i]) {
					t.Errorf("problem %d\n got %s\nwant %s...", i, got[i], tt.want[i])
				}
			}
		})
	}
}

func TestLoadAccepts(t *testing.T) {
	src := `
# comments, flow and block styles, shorthands
rules:
  - name: all-the-things
    description: a bit of everything
    on:
      type: "sensor.*"
      source: "/gateways/*"
      subject: thermo-1
      device: {kind: thermometer, labels.floor: "1"}
    when: data.temp > 0 && now > event.time - duration("1h")
    key: device.room
    throttle: 1m
    actions:
      - command: {device: hall-light, command: lights.blink, payload: {times: 3, why: '{{ event.type }}', temp: '{{ data.temp }}'}}
      - command:
          to: {kind: light, room: '{{ device.room }}', labels.floor: "0"}
          command: lights.on
          payload: |
            {"on": true}
      - emit: {type: hot, subject: '{{ device.room }}', data: [1, two, '{{ 3 }}']}
      - state: {device: thermo-1, key: 'last_{{ event.type }}', value: {a: [1, 2]}}
  - name: disabled-one
    disabled: true
    on: x
    actions: [{emit: {type: y}}]
  - name: seq
    on: {source: "/gateways/*"}
    sequence:
      first: {type: a, subject: "d*", device: {room: hall}, when: 'data?.x == 1'}
      then: b
      within: 10s
    actions: [{emit: {type: c}}]
`
	rules, warnings, err := parseRules("ok.yaml", []byte(src), homeDevices)
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 0 {
		t.Fatalf("warnings %q", warnings)
	}
	if len(rules) != 2 || rules[0].name != "all-the-things" || rules[1].name != "seq" || rules[1].index != 1 {
		t.Fatalf("rules %+v", rules)
	}
	info := rules[1].info()
	if info.Kind != "sequence" || strings.Join(info.Types, ",") != "a,b" || info.Line != 27 {
		t.Fatalf("info %+v", info)
	}
	// without a directory named devices are warnings, not errors
	_, warnings, err = parseRules("ok.yaml", []byte(src), nil)
	if err != nil || len(warnings) != 1 || !strings.Contains(warnings[0], `ok.yaml:15: rules[0].actions[0].command.device: device "hall-light" not checked`) {
		t.Fatalf("err %v warnings %q", err, warnings)
	}
}

// TestShippedRules loads every file under configs/rules.d against the shipped device registry.
func TestShippedRules(t *testing.T) {
	rules, warnings, err := loadDir("../configs/rules.d", shippedDevices(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) > 0 {
		t.Fatalf("warnings %q", warnings)
	}
	names := map[string]bool{}
	for _, r := range rules {
		names[r.name] = true
	}
	if !names["lights-on-motion"] || !names["lights-off-when-empty"] {
		t.Fatalf("rules %v", names)
	}
}

func TestLoadDir(t *testing.T) {
	dir := writeRules(t, map[string]string{
		"b.yaml":       "rules:\n  - name: b\n    on: x\n    actions: [{emit: {type: y}}]\n",
		"a.yml":        "rules:\n  - name: a\n    on: x\n    actions: [{emit: {type: y}}]\n",
		"empty.yaml":   "# nothing yet\n",
		"notes.txt":    "not a rule file",
		".hidden.yaml": "garbage: [",
	})
	if err := os.Mkdir(filepath.Join(dir, "sub.yaml"), 0o755); err != nil {
		t.Fatal(err)
	}
	rules, _, err := loadDir(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) != 2 || rules[0].name != "a" || rules[1].name != "b" {
		t.Fatalf("rules in file-name order: %v, %v", rules[0].name, rules[1].name)
	}
	if _, _, err := loadDir(filepath.Join(dir, "missing"), nil); err == nil {
		t.Fatal("missing directory accepted")
	}
	// problems from several files are all reported
	bad := writeRules(t, map[string]string{
		"1.yaml": "rules:\n  - name: a\n    on: x\n",
		"2.yaml": "rules: 3\n",
	})
	_, _, err = loadDir(bad, nil)
	var le *LoadError
	if !errors.As(err, &le) || len(le.Problems) != 2 {
		t.Fatalf("err = %v", err)
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		mod  func(*Config)
		want []string
	}{
		{"defaults", func(*Config) {}, nil},
		{"zero values are defaults", func(c *Config) { *c = Config{} }, nil},
		{"everything wrong", func(c *Config) {
			c.Dir = "/nonexistent/rules"
			c.CommandTimeout = -1
			c.CommandRetries = -2
			c.CommandBackoff = -1
			c.CommandWorkers = -1
			c.CommandQueueSize = -1
			c.QueueSize = -1
			c.MaxChainDepth = -1
			c.PersistInterval = -1
		}, []string{"rules.dir:", "rules.command_timeout:", "rules.command_retries:", "rules.command_backoff:",
			"rules.command_workers:", "rules.command_queue_size:", "rules.queue_size:", "rules.max_chain_depth:",
			"rules.persist_interval:"}},
		{"dir is a file", func(c *Config) { c.Dir = "config.go" }, []string{`rules.dir: "config.go" is not a directory`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			tt.mod(&c)
			err := c.Validate()
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatal("no error")
			}
			lines := strings.Split(err.Error(), "\n")
			if len(lines) != len(tt.want) {
				t.Fatalf("%d problems, want %d: %v", len(lines), len(tt.want), err)
			}
			for i, w := range tt.want {
				if !strings.HasPrefix(lines[i], w) {
					t.Errorf("problem %d = %q, want prefix %q", i, lines[i], w)
				}
			}
		})
	}
	d := Config{CommandRetries: -1}.withDefaults()
	if d.CommandRetries != 0 || !*d.Watch || d.QueueSize != DefaultQueueSize || d.Source != DefaultSource {
		t.Fatalf("withDefaults = %+v", d)
	}
}
