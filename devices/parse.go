package devices

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
)

// MaxRegistryBytes is the largest registry file LoadRegistry reads.
const MaxRegistryBytes = 16 << 20

// registryFile is the YAML layout of a registry file.
type registryFile struct {
	Devices []deviceYAML `yaml:"devices"`
}

type deviceYAML struct {
	ID           string            `yaml:"id"`
	Name         string            `yaml:"name"`
	Room         string            `yaml:"room"`
	Kind         string            `yaml:"kind"`
	Labels       map[string]string `yaml:"labels"`
	PasswordHash string            `yaml:"password_hash"`
	CertCN       *string           `yaml:"cert_cn"` // present but "": the id
	Publish      []string          `yaml:"publish"`
	Subscribe    []string          `yaml:"subscribe"`
}

// LoadRegistry reads and checks a registry file (see ParseRegistry).
func LoadRegistry(path string) (*Registry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("devices: load registry: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxRegistryBytes+1))
	if err != nil {
		return nil, fmt.Errorf("devices: load registry: %w", err)
	}
	if len(data) > MaxRegistryBytes {
		return nil, fmt.Errorf("%w: %s: larger than %d bytes", ErrInvalidRegistry, path, MaxRegistryBytes)
	}
	return ParseRegistry(path, data)
}

// ParseRegistry decodes a registry file's contents strictly (unknown keys are errors) and checks every device as
// NewRegistry does. name is the file name used in error messages; problems carry its line numbers, e.g.
// "devices.yaml:12: devices[3].password_hash: ...". An empty document is a registry without devices, one that is
// not Listed. In the file, cert_cn: "" stands for the device's id.
func ParseRegistry(name string, data []byte) (*Registry, error) {
	var rf registryFile
	if err := decodeYAML(data, &rf); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrInvalidRegistry, name, err)
	}
	devs := make([]Device, len(rf.Devices))
	for i, y := range rf.Devices {
		devs[i] = Device{ID: y.ID, Name: y.Name, Room: y.Room, Kind: y.Kind, Labels: y.Labels,
			PasswordHash: y.PasswordHash, Publish: y.Publish, Subscribe: y.Subscribe}
		if y.CertCN != nil {
			devs[i].CertCN = *y.CertCN
			if *y.CertCN == "" {
				devs[i].CertCN = y.ID
			}
		}
	}
	probs := check(devs)
	if len(probs) == 0 {
		r, err := NewRegistry(devs)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		r.unlisted = rf.Devices == nil
		return r, nil
	}
	lines := newLineFinder(data)
	return nil, joinProblems(name, probs, lines.line)
}

// decodeYAML decodes strictly. The YAML library has been seen to panic on some malformed input (e.g. a tag
// without a value where a list is expected); that is turned into an error.
func decodeYAML(data []byte, v any) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("malformed YAML (the decoder failed: %v)", p)
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data), yaml.Strict())
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return &yamlError{err: err}
	}
	var more any
	if err := dec.Decode(&more); !errors.Is(err, io.EOF) {
		return errors.New("more than one YAML document (---): a registry is one document")
	}
	return nil
}

// yamlError keeps the YAML library's error, told by its line, column and message. The library's own text quotes
// the lines around the mistake, and those may hold a credential (a password hash) that must not reach a log.
type yamlError struct{ err error }

func (e *yamlError) Error() string {
	var ye yaml.Error
	if errors.As(e.err, &ye) {
		if tk := ye.GetToken(); tk != nil && tk.Position != nil {
			return fmt.Sprintf("[%d:%d] %s", tk.Position.Line, tk.Position.Column, ye.GetMessage())
		}
		return ye.GetMessage()
	}
	msg, _, _ := strings.Cut(e.err.Error(), "\n")
	return msg
}
func (e *yamlError) Unwrap() error { return e.err }

// YAMLError returns err, an error of the YAML library, told by its line, column and message only (see yamlError):
// for other YAML files whose neighbouring lines may hold a secret too, such as the gateway's configuration.
func YAMLError(err error) error { return &yamlError{err: err} }

// lineFinder looks up the line of a device's field in the parsed document.
type lineFinder struct{ file *ast.File }

func newLineFinder(data []byte) (l lineFinder) {
	defer func() {
		if recover() != nil {
			l = lineFinder{}
		}
	}()
	f, err := parser.ParseBytes(data, 0)
	if err != nil {
		return lineFinder{}
	}
	return lineFinder{file: f}
}

// line returns the line of the problem's field, or of its device when the field is absent, or 0.
func (l lineFinder) line(p problem) (line int) {
	if l.file == nil {
		return 0
	}
	defer func() {
		if recover() != nil {
			line = 0
		}
	}()
	for _, path := range []string{p.path(), fmt.Sprintf("devices[%d]", p.index)} {
		yp, err := yaml.PathString("$." + path)
		if err != nil {
			continue
		}
		node, err := yp.FilterFile(l.file)
		if err != nil || node == nil {
			continue
		}
		if tk := node.GetToken(); tk != nil && tk.Position != nil {
			return tk.Position.Line
		}
	}
	return 0
}
