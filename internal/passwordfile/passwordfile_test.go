package passwordfile

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestRead(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	if err := os.WriteFile(good, []byte("# devsim password file\n\nsensor-1 s3cret\n  light-1   pw with spaces  \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := Read(good)
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]string{"sensor-1": "s3cret", "light-1": "pw with spaces"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("Read = %v, want %v", got, want)
	}
	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(bad, []byte("sensor-1 ok\nlonely\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(bad); err == nil || !strings.Contains(err.Error(), "bad:2") {
		t.Fatalf("Read of a line without a password: %v, want an error naming bad:2", err)
	}
	if _, err := Read(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("Read of a missing file: no error")
	}
}
