package gateway_test

import (
	"errors"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/rules"
)

// repoRoot is the directory the shipped configs' relative paths are relative to (edgegate is started there).
const repoRoot = ".."

// TestShippedConfigs loads every YAML file under configs/ with the loader that reads it in production and checks
// it: gateway configs strictly and with Validate, the device registry, and the rule directories against that
// registry. A YAML file no loader claims is an error, so a new file cannot slip past this test.
func TestShippedConfigs(t *testing.T) {
	t.Parallel()
	root := filepath.Join(repoRoot, "configs")
	var gatewayConfigs, registries []string
	ruleDirs := map[string][]string{} // dir → its rule files
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		ext := filepath.Ext(path)
		if ext != ".yaml" && ext != ".yml" {
			return nil
		}
		name := d.Name()
		switch {
		case strings.HasSuffix(filepath.Dir(path), ".d"):
			ruleDirs[filepath.Dir(path)] = append(ruleDirs[filepath.Dir(path)], name)
		case strings.HasPrefix(name, "edgegate"):
			gatewayConfigs = append(gatewayConfigs, path)
		case name == "devices.yaml":
			registries = append(registries, path)
		default:
			t.Errorf("%s: no loader for this file (gateway configs are edgegate*.yaml, rules live in *.d/)", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(gatewayConfigs, filepath.Join(root, "edgegate.yaml")) || len(registries) == 0 || len(ruleDirs) == 0 {
		t.Fatalf("configs/ lacks the default config, the registry or the rules: %v %v %v", gatewayConfigs, registries, ruleDirs)
	}

	registry, err := devices.LoadRegistry(filepath.Join(root, "devices.yaml"))
	if err != nil {
		t.Fatalf("devices.yaml: %v", err)
	}

	rel := func(path string) string { r, _ := filepath.Rel(root, path); return r }
	for _, path := range registries {
		t.Run(rel(path), func(t *testing.T) {
			reg, err := devices.LoadRegistry(path)
			if err != nil {
				t.Fatal(err)
			}
			if reg.Len() == 0 {
				t.Error("no devices")
			}
		})
	}

	for dir, files := range ruleDirs {
		t.Run(rel(dir), func(t *testing.T) {
			infos, err := rules.Check(dir, gateway.Directory(registry))
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range files {
				if !slices.ContainsFunc(infos, func(ri rules.RuleInfo) bool { return filepath.Base(ri.File) == f }) {
					t.Errorf("%s defines no rule", f)
				}
			}
		})
	}

	for _, path := range gatewayConfigs {
		t.Run(rel(path), func(t *testing.T) {
			cfg, err := gateway.LoadConfig(path)
			if err != nil {
				t.Fatal(err)
			}
			// Relative paths are relative to the directory edgegate is started from: the repository root.
			cfg.Devices.Registry = fromRoot(cfg.Devices.Registry)
			cfg.Rules.Dir = fromRoot(cfg.Rules.Dir)
			var unexpected []error
			for _, e := range leafErrors(cfg.Validate()) {
				// A deployment config names files on the target machine (/etc/edgegate/...); only their absence
				// here is expected.
				if errors.Is(e, fs.ErrNotExist) && deploymentPath(e.Error()) {
					t.Logf("expected on this machine: %v", e)
					continue
				}
				unexpected = append(unexpected, e)
			}
			if len(unexpected) > 0 {
				t.Errorf("Validate: %v", errors.Join(unexpected...))
			}
			if !filepath.IsAbs(cfg.Devices.Registry) {
				if _, err := devices.LoadRegistry(cfg.Devices.Registry); err != nil {
					t.Errorf("devices.registry: %v", err)
				}
			}
			if cfg.Rules.Dir != "" && !filepath.IsAbs(cfg.Rules.Dir) {
				if _, err := rules.Check(cfg.Rules.Dir, gateway.Directory(registry)); err != nil {
					t.Errorf("rules.dir: %v", err)
				}
			}
		})
	}
}

func fromRoot(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(repoRoot, p)
}

// deploymentPath reports whether msg names a file in the places a deployed gateway keeps its files.
func deploymentPath(msg string) bool {
	for _, dir := range []string{" /etc/", " /var/"} {
		if strings.Contains(msg, dir) {
			return true
		}
	}
	return false
}

// leafErrors flattens errors.Join trees into their leaves.
func leafErrors(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, leafErrors(e)...)
		}
		return out
	}
	return []error{err}
}
