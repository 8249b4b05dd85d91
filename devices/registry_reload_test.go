package devices

import (
	"runtime"
	"strings"
	"testing"
	"time"
)

// holdVerifications takes every slot of r's verification limit, so that the next password check waits in verify
// until release is called.
func holdVerifications(r *Registry) (release func()) {
	for range cap(r.slow) {
		r.slow <- struct{}{}
	}
	return func() {
		for range cap(r.slow) {
			<-r.slow
		}
	}
}

// waitInVerify waits until a goroutine is blocked in (*Registry).verify, waiting for a verification slot.
func waitInVerify(t *testing.T) {
	t.Helper()
	buf := make([]byte, 1<<20)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		n := runtime.Stack(buf, true)
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			if strings.Contains(g, "[chan send") && strings.Contains(g, "devices.(*Registry).verify(") {
				return
			}
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatal("no password check waiting in verify after 10s")
}

// TestAuthenticateDuringReplace: a password check that was running while the registry was replaced answers for
// the registry in force when it returns. Otherwise a device whose password was changed (or that was removed) gets
// in with the old password after the reload has closed its connections, and keeps that connection.
func TestAuthenticateDuringReplace(t *testing.T) {
	oldHash, newHash := cheapBcrypt(t, "old"), cheapBcrypt(t, "new")
	tests := []struct {
		name string
		next []Device
		want bool // for the old password
	}{
		{"password changed", []Device{{ID: "a", PasswordHash: newHash}, {ID: "b", CertCN: "b"}}, false},
		{"device removed", []Device{{ID: "b", CertCN: "b"}}, false},
		{"password moved to a certificate", []Device{{ID: "a", CertCN: "a"}, {ID: "b", CertCN: "b"}}, false},
		{"metadata changed", []Device{{ID: "a", PasswordHash: oldHash, Room: "hall"}, {ID: "b", CertCN: "b"}}, true},
		{"another device changed", []Device{{ID: "a", PasswordHash: oldHash}}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := NewRegistry([]Device{{ID: "a", PasswordHash: oldHash}, {ID: "b", CertCN: "b"}})
			if err != nil {
				t.Fatal(err)
			}
			next, err := NewRegistry(tt.next)
			if err != nil {
				t.Fatal(err)
			}
			release := holdVerifications(r)
			got := make(chan bool, 1)
			go func() { got <- r.Authenticate("a", []byte("old")) }()
			waitInVerify(t)
			r.Replace(next)
			release()
			select {
			case ok := <-got:
				if ok != tt.want {
					t.Errorf("the old password, checked across the reload: Authenticate = %v, want %v", ok, tt.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Authenticate did not return within 10s")
			}
			// Whatever the answer, a later login with the old password agrees with the new registry.
			if ok := r.Authenticate("a", []byte("old")); ok != tt.want {
				t.Errorf("the old password after the reload: Authenticate = %v, want %v", ok, tt.want)
			}
		})
	}
}
