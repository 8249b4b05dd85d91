package rules

import (
	"strings"
	"testing"
	"time"
)

func TestTemplates(t *testing.T) {
	ev := newEvent("room.entered", "kitchen-motion", t0, map[string]any{
		"room": "kitchen", "n": 2, "f": 1.5, "q": `say "hi"`, "list": []any{1, "a"}, "obj": map[string]any{"k": true},
	})
	m := &machine{dir: homeDevices}
	e := m.newCtx(ev, t0.Add(time.Second)).prepare(needData | needDevice | needState)
	tests := []struct {
		tmpl    string
		render  string
		value   any
		wantErr string
	}{
		{tmpl: "plain", render: "plain", value: "plain"},
		{tmpl: "{{ data.room }}", render: "kitchen", value: "kitchen"},
		{tmpl: "{{ data.n }}", render: "2", value: float64(2)},
		{tmpl: "{{ data.n * 2 }}", render: "4", value: float64(4)},
		{tmpl: "{{ data.f }}", render: "1.5", value: 1.5},
		{tmpl: "{{ data.missing }}", render: "", value: nil},
		{tmpl: "{{ data.list }}", render: `[1,"a"]`},
		{tmpl: "{{ data.obj }}", render: `{"k":true}`},
		{tmpl: "{{ now }}", render: "2024-05-01T10:00:01Z"},
		{tmpl: "{{ device.room }}/{{ device.kind }}/{{ device.known }}", render: "kitchen/motion-sensor/true"},
		{tmpl: "{{ coalesce(data.missing, '', device.labels.floor) }}", render: "0"},
		{tmpl: "{{data.room}}-{{ event.type }}", render: "kitchen-room.entered"},
		{tmpl: "{{ data.room + 1 }}", wantErr: "{{ data.room + 1 }}: invalid operation"},
		{tmpl: "{{ 1 }", wantErr: `"{{" without "}}"`},
		{tmpl: "a }} b", wantErr: `"}}" without "{{"`},
	}
	for _, tt := range tests {
		t.Run(tt.tmpl, func(t *testing.T) {
			tm, err := compileTemplate(tt.tmpl)
			if err == nil {
				var s string
				s, err = tm.render(e)
				if err == nil {
					if s != tt.render {
						t.Errorf("render = %q, want %q", s, tt.render)
					}
					if tt.value != nil || tt.render == "" {
						v, _ := tm.valueOf(e)
						if v != tt.value {
							t.Errorf("valueOf = %#v, want %#v", v, tt.value)
						}
					}
				}
			}
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestPayloads(t *testing.T) {
	ev := newEvent("x", "kitchen-motion", t0, map[string]any{"q": `say "hi" <b>`, "n": 3})
	e := (&machine{}).newCtx(ev, t0).prepare(needData)
	tests := []struct {
		yaml, want string
		isJSON     bool
	}{
		// structured data is encoded as JSON: quotes in values cannot break it, single segments keep their type
		{`{text: '{{ data.q }}', n: '{{ data.n }}', s: 'n={{ data.n }}', lit: [1, true, null]}`,
			`{"lit":[1,true,null],"n":3,"s":"n=3","text":"say \"hi\" <b>"}`, true},
		// a string is sent as it renders
		{`'{"on":true}'`, `{"on":true}`, true},
		{`'on {{ data.n }}'`, `on 3`, false},
	}
	for _, tt := range tests {
		src := "rules:\n  - name: p\n    on: x\n    actions: [{emit: {type: y, data: " + tt.yaml + "}}]\n"
		rules, _, err := parseRules("p.yaml", []byte(src), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, isJSON, err := rules[0].actions[0].payload.render(e)
		if err != nil || string(b) != tt.want || isJSON != tt.isJSON {
			t.Errorf("%s: got %s (json %v, %v), want %s", tt.yaml, b, isJSON, err, tt.want)
		}
	}
}

func TestKeyLimit(t *testing.T) {
	const src = `
rules:
  - name: a
    absence: {after: x, missing: y, within: 1h}
    actions: [{emit: {type: z}}]
`
	m, r := newMachine(t, src, nil)
	for i := range maxKeysPerRule + 5 {
		m.handle(newEvent("x", "d-"+itoa(i), t0, nil), t0)
	}
	if got := len(m.states["a"].pending); got != maxKeysPerRule {
		t.Fatalf("%d keys tracked", got)
	}
	if len(r.errs) != 5 || !strings.Contains(r.errs[0], "more than 10000 keys") {
		t.Fatalf("%d errors: %q", len(r.errs), r.errs[:min(1, len(r.errs))])
	}
}

func itoa(i int) string { return formatValue(i) }
