package archtest

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/edgegate/edgegate"

// parts are the packages that do one job each. They do not import one another (nor gateway or cmd): where one needs
// another, it declares a small interface and gateway passes the concrete type in.
var parts = []string{"ingest", "rules", "buffer", "forward", "devices", "deadletter"}

// imports lists, for every package of the module, its non-test imports that belong to the module.
func imports(t *testing.T) map[string][]string {
	t.Helper()
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}}`, module+"/...").Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			t.Fatalf("go list: %v\n%s", err, ee.Stderr)
		}
		t.Fatalf("go list: %v", err)
	}
	m := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		pkg := strings.TrimPrefix(f[0], module+"/")
		m[pkg] = nil
		for _, imp := range f[1:] {
			if rel, ok := strings.CutPrefix(imp, module+"/"); ok {
				m[pkg] = append(m[pkg], rel)
			}
		}
	}
	return m
}

func topDir(pkg string) string {
	top, _, _ := strings.Cut(pkg, "/")
	return top
}

func TestPartsDoNotImportEachOther(t *testing.T) {
	all := imports(t)
	isPart := map[string]bool{}
	for _, p := range parts {
		isPart[p] = true
		if _, ok := all[p]; !ok {
			t.Errorf("package %s not found by go list", p)
		}
	}
	for pkg, imps := range all {
		if !isPart[topDir(pkg)] {
			continue
		}
		for _, imp := range imps {
			top := topDir(imp)
			if top == topDir(pkg) {
				continue // a part's own subpackages
			}
			switch {
			case isPart[top]:
				t.Errorf("%s imports %s: parts must not import each other; declare an interface where it is used and let gateway pass the concrete type", pkg, imp)
			case top == "gateway" || top == "cmd":
				t.Errorf("%s imports %s: parts must not import the assembly or the commands", pkg, imp)
			case top == "internal":
				t.Errorf("%s imports %s: internal test and benchmark helpers are not for production code", pkg, imp)
			}
		}
	}
}

func TestGatewayDoesNotImportCommands(t *testing.T) {
	for pkg, imps := range imports(t) {
		if topDir(pkg) == "cmd" {
			continue
		}
		for _, imp := range imps {
			if topDir(imp) == "cmd" {
				t.Errorf("%s imports %s: nothing imports a command", pkg, imp)
			}
		}
	}
}

// A test that cannot fail is no test: the checker must see an import that breaks the rule.
func TestCheckerSeesImports(t *testing.T) {
	all := imports(t)
	found := false
	for _, imp := range all["gateway"] {
		if imp == "buffer" {
			found = true
		}
	}
	if !found {
		t.Fatalf("gateway's imports as seen by the checker do not include buffer: %v", all["gateway"])
	}
}
