// Package passwordfile reads the clear-text password files that cmd/devsim gen-devices writes next to a generated
// registry, for the tools that connect as those devices (devsim, edgebench).
package passwordfile

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strings"
)

// Read reads a password file: one "id password" per line; blank lines and lines starting with # are skipped.
func Read(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("password file: %w", err)
	}
	pw := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		id, p, ok := strings.Cut(line, " ")
		p = strings.TrimSpace(p)
		if !ok || p == "" {
			return nil, fmt.Errorf("%s:%d: want \"id password\"", path, n)
		}
		pw[id] = p
	}
	return pw, sc.Err()
}
