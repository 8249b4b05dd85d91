package devices

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/bcrypt"
)

// Password hashing parameters used by HashPassword.
const (
	// BcryptCost is the bcrypt cost HashPassword uses (tens of milliseconds per verification on a desktop CPU,
	// several times that on a small ARM board).
	BcryptCost = 10
	// Argon2Memory is the argon2id memory in KiB HashPassword uses (19 MiB, t=2, p=1: the OWASP baseline, chosen
	// so that many devices connecting at once do not exhaust the memory of a small gateway).
	Argon2Memory = 19 * 1024
	// Argon2Time is the argon2id number of passes HashPassword uses.
	Argon2Time = 2
	// Argon2Threads is the argon2id parallelism HashPassword uses.
	Argon2Threads = 1
)

// Bounds on the cost of hashes accepted in a registry, so one entry cannot make every connection attempt take
// seconds of CPU or gigabytes of memory.
const (
	maxBcryptCost     = 16
	maxArgon2Memory   = 1 << 20 // KiB: 1 GiB
	maxArgon2Time     = 64
	minArgon2SaltLen  = 8
	minArgon2KeyLen   = 16
	maxArgon2KeyLen   = 128
	bcryptMaxPassword = 72
	bcryptHashLen     = 60
)

// ErrUnknownAlgorithm is returned by HashPassword for an algorithm other than bcrypt or argon2id.
var ErrUnknownAlgorithm = errors.New("devices: unknown password hash algorithm")

// ErrMalformedHash is wrapped by VerifyPassword and CheckHash when the stored hash is neither a bcrypt ($2a$, $2b$, $2y$) nor an
// argon2id ($argon2id$v=19$m=..,t=..,p=..$salt$hash) hash within the accepted cost bounds.
var ErrMalformedHash = errors.New("malformed password hash")

// HashPassword hashes password with algo "bcrypt" (cost BcryptCost; the default when algo is "") or "argon2id"
// (Argon2Memory, Argon2Time, Argon2Threads, 16-byte salt, 32-byte key) and returns the encoded hash for a registry's
// password_hash. bcrypt rejects passwords longer than 72 bytes.
func HashPassword(password []byte, algo string) (string, error) {
	switch algo {
	case "", "bcrypt":
		h, err := bcrypt.GenerateFromPassword(password, BcryptCost)
		if err != nil {
			return "", fmt.Errorf("devices: hash password: %w", err)
		}
		return string(h), nil
	case "argon2id":
		return hashArgon2id(password, argon2Params{memory: Argon2Memory, time: Argon2Time, threads: Argon2Threads,
			keyLen: 32}), nil
	default:
		return "", fmt.Errorf("%w: %q (want bcrypt or argon2id)", ErrUnknownAlgorithm, algo)
	}
}

type argon2Params struct {
	memory, time uint32
	threads      uint8
	keyLen       uint32
	salt, key    []byte
}

func hashArgon2id(password []byte, p argon2Params) string {
	salt := make([]byte, 16)
	_, _ = rand.Read(salt) // crypto/rand.Read never fails
	key := argon2.IDKey(password, salt, p.time, p.memory, p.threads, p.keyLen)
	b64 := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, p.memory, p.time, p.threads,
		b64.EncodeToString(salt), b64.EncodeToString(key))
}

// VerifyPassword reports whether password matches the bcrypt or argon2id hash. The comparison is constant-time.
// A malformed hash is an error wrapping ErrMalformedHash. A password longer than 72 bytes never matches a bcrypt
// hash (bcrypt would only look at its first 72 bytes).
func VerifyPassword(hash string, password []byte) (bool, error) {
	switch {
	case isBcrypt(hash):
		if err := checkBcrypt(hash); err != nil {
			return false, err
		}
		if len(password) > bcryptMaxPassword {
			return false, nil
		}
		err := bcrypt.CompareHashAndPassword([]byte(hash), password)
		if errors.Is(err, bcrypt.ErrMismatchedHashAndPassword) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("%w: %w", ErrMalformedHash, err)
		}
		return true, nil
	case strings.HasPrefix(hash, "$argon2id$"):
		p, err := parseArgon2id(hash)
		if err != nil {
			return false, err
		}
		key := argon2.IDKey(password, p.salt, p.time, p.memory, p.threads, p.keyLen)
		return subtle.ConstantTimeCompare(key, p.key) == 1, nil
	default:
		return false, fmt.Errorf("%w: not a bcrypt ($2a$, $2b$, $2y$) or argon2id ($argon2id$) hash", ErrMalformedHash)
	}
}

// CheckHash reports whether hash is a well-formed bcrypt or argon2id hash within the accepted cost bounds (bcrypt
// cost 4–16; argon2id v=19, m ≤ 1 GiB, t ≤ 64, salt ≥ 8 bytes, key 16–128 bytes).
func CheckHash(hash string) error {
	switch {
	case isBcrypt(hash):
		return checkBcrypt(hash)
	case strings.HasPrefix(hash, "$argon2id$"):
		_, err := parseArgon2id(hash)
		return err
	default:
		return fmt.Errorf("%w: not a bcrypt ($2a$, $2b$, $2y$) or argon2id ($argon2id$) hash", ErrMalformedHash)
	}
}

func isBcrypt(h string) bool {
	return strings.HasPrefix(h, "$2a$") || strings.HasPrefix(h, "$2b$") || strings.HasPrefix(h, "$2y$")
}

const bcryptAlphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

func checkBcrypt(h string) error {
	if len(h) != bcryptHashLen {
		return fmt.Errorf("%w: bcrypt hash is %d characters, want %d", ErrMalformedHash, len(h), bcryptHashLen)
	}
	if h[6] != '$' {
		return fmt.Errorf("%w: bcrypt cost must be two digits", ErrMalformedHash)
	}
	cost, err := strconv.Atoi(h[4:6])
	if err != nil || cost < bcrypt.MinCost || cost > maxBcryptCost {
		return fmt.Errorf("%w: bcrypt cost %q is not between %d and %d", ErrMalformedHash, h[4:6], bcrypt.MinCost,
			maxBcryptCost)
	}
	for i := 7; i < len(h); i++ {
		if strings.IndexByte(bcryptAlphabet, h[i]) < 0 {
			return fmt.Errorf("%w: bcrypt salt and hash contain %q", ErrMalformedHash, h[i])
		}
	}
	return nil
}

func parseArgon2id(h string) (argon2Params, error) {
	var p argon2Params
	bad := func(format string, args ...any) (argon2Params, error) {
		return argon2Params{}, fmt.Errorf("%w: argon2id: %s", ErrMalformedHash, fmt.Sprintf(format, args...))
	}
	parts := strings.Split(h, "$")
	// "", "argon2id", "v=19", "m=..,t=..,p=..", salt, key
	if len(parts) != 6 {
		return bad("want $argon2id$v=19$m=..,t=..,p=..$salt$hash")
	}
	if parts[2] != fmt.Sprintf("v=%d", argon2.Version) {
		return bad("version %q is not v=%d", parts[2], argon2.Version)
	}
	params := strings.Split(parts[3], ",")
	if len(params) != 3 {
		return bad("parameters %q are not m=..,t=..,p=..", parts[3])
	}
	var vals [3]uint64
	for i, name := range []string{"m", "t", "p"} {
		v, ok := strings.CutPrefix(params[i], name+"=")
		if !ok {
			return bad("parameters %q are not m=..,t=..,p=..", parts[3])
		}
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return bad("parameter %s=%q is not a number", name, v)
		}
		vals[i] = n
	}
	m, t, threads := vals[0], vals[1], vals[2]
	switch {
	case threads < 1 || threads > 255:
		return bad("p=%d is not between 1 and 255", threads)
	case m < 8*threads || m > maxArgon2Memory:
		return bad("m=%d is not between 8*p and %d", m, maxArgon2Memory)
	case t < 1 || t > maxArgon2Time:
		return bad("t=%d is not between 1 and %d", t, maxArgon2Time)
	}
	b64 := base64.RawStdEncoding.Strict()
	salt, err := b64.DecodeString(parts[4])
	if err != nil || len(salt) < minArgon2SaltLen {
		return bad("salt is not unpadded base64 of at least %d bytes", minArgon2SaltLen)
	}
	key, err := b64.DecodeString(parts[5])
	if err != nil || len(key) < minArgon2KeyLen || len(key) > maxArgon2KeyLen {
		return bad("hash is not unpadded base64 of %d to %d bytes", minArgon2KeyLen, maxArgon2KeyLen)
	}
	p.memory, p.time, p.threads, p.keyLen = uint32(m), uint32(t), uint8(threads), uint32(len(key))
	p.salt, p.key = salt, key
	return p, nil
}
