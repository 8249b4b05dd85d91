package devices

import (
	"errors"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

// cheapBcrypt and cheapArgon2 make hashes fast enough for tests (the registry accepts them).
func cheapBcrypt(t testing.TB, pw string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

func cheapArgon2(pw string) string {
	return hashArgon2id([]byte(pw), argon2Params{memory: 64, time: 1, threads: 1, keyLen: 32})
}

func TestHashPassword(t *testing.T) {
	tests := []struct {
		algo, prefix string
	}{
		{"bcrypt", "$2a$10$"},
		{"", "$2a$10$"}, // bcrypt is the default
		{"argon2id", "$argon2id$v=19$m=19456,t=2,p=1$"},
	}
	for _, tt := range tests {
		t.Run(tt.algo, func(t *testing.T) {
			t.Parallel() // bcrypt at cost 10 takes a second under -race
			h, err := HashPassword([]byte("s3cret"), tt.algo)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(h, tt.prefix) {
				t.Errorf("hash %q does not start with %q", h, tt.prefix)
			}
			if err := CheckHash(h); err != nil {
				t.Errorf("CheckHash(own hash) = %v", err)
			}
			if tt.algo == "" {
				return // the same code as bcrypt: spare the verifications
			}
			for _, c := range []struct {
				pw   string
				want bool
			}{{"s3cret", true}, {"s3cret\x00", false}} {
				ok, err := VerifyPassword(h, []byte(c.pw))
				if err != nil || ok != c.want {
					t.Errorf("VerifyPassword(%q) = %v, %v; want %v", c.pw, ok, err, c.want)
				}
			}
		})
	}
}

func TestHashPasswordSalted(t *testing.T) {
	a, b := cheapArgon2("same"), cheapArgon2("same")
	if a == b {
		t.Fatalf("two argon2id hashes of one password are equal (%q): salt not random", a)
	}
	for pw, want := range map[string]bool{"same": true, "Same": false, "": false} {
		if ok, err := VerifyPassword(a, []byte(pw)); ok != want || err != nil {
			t.Errorf("VerifyPassword(argon2id, %q) = %v, %v; want %v", pw, ok, err, want)
		}
	}
}

func TestHashPasswordErrors(t *testing.T) {
	if _, err := HashPassword([]byte("x"), "md5"); !errors.Is(err, ErrUnknownAlgorithm) {
		t.Errorf("HashPassword(md5) = %v, want ErrUnknownAlgorithm", err)
	}
	if _, err := HashPassword(make([]byte, 73), "bcrypt"); err == nil {
		t.Error("HashPassword(73 bytes, bcrypt) succeeded; bcrypt ignores bytes past 72")
	}
	if _, err := HashPassword(make([]byte, 73), "argon2id"); err != nil {
		t.Errorf("HashPassword(73 bytes, argon2id) = %v", err)
	}
}

func TestVerifyPasswordLongBcrypt(t *testing.T) {
	pw72 := strings.Repeat("p", 72)
	h := cheapBcrypt(t, pw72)
	if ok, err := VerifyPassword(h, []byte(pw72)); !ok || err != nil {
		t.Fatalf("72-byte password: %v, %v", ok, err)
	}
	// bcrypt itself would accept this (it reads 72 bytes); we do not.
	if ok, err := VerifyPassword(h, []byte(pw72+"extra")); ok || err != nil {
		t.Fatalf("longer password with the same first 72 bytes: %v, %v; want false, nil", ok, err)
	}
}

func TestCheckHash(t *testing.T) {
	good := cheapBcrypt(t, "pw")
	argon := cheapArgon2("pw")
	tests := []struct {
		name, hash string
		ok         bool
	}{
		{"bcrypt", good, true},
		{"bcrypt 2b", "$2b$" + good[4:], true},
		{"bcrypt 2y", "$2y$" + good[4:], true},
		{"bcrypt 2x", "$2x$" + good[4:], false},
		{"bcrypt short", good[:59], false},
		{"bcrypt long", good + "A", false},
		{"bcrypt cost 03", "$2a$03$" + good[7:], false},
		{"bcrypt cost 17", "$2a$17$" + good[7:], false},
		{"bcrypt cost letters", "$2a$xx$" + good[7:], false},
		{"bcrypt bad alphabet", good[:10] + "!" + good[11:], false},
		{"argon2id", argon, true},
		{"argon2id version", strings.Replace(argon, "v=19", "v=16", 1), false},
		{"argon2id m too big", strings.Replace(argon, "m=64,", "m=2000000,", 1), false},
		{"argon2id m below 8p", strings.Replace(argon, "m=64,", "m=7,", 1), false},
		{"argon2id t=0", strings.Replace(argon, "t=1,", "t=0,", 1), false},
		{"argon2id t huge", strings.Replace(argon, "t=1,", "t=65,", 1), false},
		{"argon2id p=0", strings.Replace(argon, "p=1$", "p=0$", 1), false},
		{"argon2id p=256", strings.Replace(argon, "p=1$", "p=256$", 1), false},
		{"argon2id params order", strings.Replace(argon, "m=64,t=1", "t=1,m=64", 1), false},
		{"argon2id missing part", argon[:strings.LastIndexByte(argon, '$')], false},
		{"argon2id padded base64", argon + "=", false},
		{"argon2id short salt", "$argon2id$v=19$m=64,t=1,p=1$c2FsdA$" + strings.Repeat("A", 43), false},
		{"argon2id short key", "$argon2id$v=19$m=64,t=1,p=1$c29tZXNhbHQ$QUFBQQ", false},
		{"argon2i", strings.Replace(argon, "$argon2id$", "$argon2i$", 1), false},
		{"plain text", "hunter2", false},
		{"empty", "", false},
		{"md5 crypt", "$1$abc$def", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckHash(tt.hash)
			if (err == nil) != tt.ok {
				t.Fatalf("CheckHash(%q) = %v, want ok=%v", tt.hash, err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrMalformedHash) {
				t.Fatalf("CheckHash(%q) = %v, not ErrMalformedHash", tt.hash, err)
			}
			_, verr := VerifyPassword(tt.hash, []byte("pw"))
			if (verr == nil) != tt.ok {
				t.Fatalf("VerifyPassword(%q) error = %v, want ok=%v", tt.hash, verr, tt.ok)
			}
		})
	}
}
