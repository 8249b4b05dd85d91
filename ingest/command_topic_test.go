package ingest

import (
	"strings"
	"testing"
)

func TestCommandTopic(t *testing.T) {
	for _, tc := range []struct{ tpl, device, command, want string }{
		{"devices/{device}/commands/{command}", "light-1", "lights.on", "devices/light-1/commands/lights.on"},
		{"{command}/{device}/{device}", "d", "c", "c/d/d"},
		{"cmd/{dev}/{device}{command}", "d{command}", "c", "cmd/{dev}/d{command}c"}, // filled values stay as they are
		{"{", "d", "c", "{"},
	} {
		if got := commandTopic(tc.tpl, tc.device, tc.command); got != tc.want {
			t.Errorf("commandTopic(%q, %q, %q) = %q, want %q", tc.tpl, tc.device, tc.command, got, tc.want)
		}
		if want := strings.NewReplacer("{device}", tc.device, "{command}", tc.command).Replace(tc.tpl); tc.want != want {
			t.Errorf("%q: want %q differs from strings.Replacer's %q", tc.tpl, tc.want, want)
		}
	}
}
