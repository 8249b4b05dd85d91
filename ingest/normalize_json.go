package ingest

import (
	"encoding/json"
	"unicode/utf8"
)

// objectFields are the raw values of the top-level members of a JSON object the normalizer reads; nil when
// absent.
type objectFields struct {
	time        []byte
	specVersion []byte
}

// maxJSONDepth is the deepest nesting accepted, as encoding/json.
const maxJSONDepth = 10000

// scanJSON reports whether b is exactly one JSON value in UTF-8 (RFC 8259; the same answer as json.Valid(b) &&
// utf8.Valid(b)) and, when it is an object, returns its top-level members named timeField ("" for none) and
// "specversion". The first of duplicate members wins. It does not allocate for nesting up to 32 levels.
func scanJSON(b []byte, timeField string) (objectFields, bool) {
	const (
		stValue = iota // a value is expected
		stAfter        // a value just ended
		stKey          // a member name is expected
	)
	var (
		f        objectFields
		stackBuf [32]byte
		stack    = stackBuf[:0] // '{' or '[' per open container
		capture  *[]byte        // where the top-level member value being read goes
		vstart   int
		ok       bool
		i        int
		state    = stValue
	)
	for {
		switch state {
		case stValue:
			i = skipSpace(b, i)
			if i >= len(b) {
				return f, false
			}
			switch c := b[i]; c {
			case '{', '[':
				j := skipSpace(b, i+1)
				if j < len(b) && b[j] == c+2 { // '}' and ']' are '{'+2 and '['+2
					i, state = j+1, stAfter
					break
				}
				stack = append(stack, c)
				if len(stack) > maxJSONDepth {
					return f, false
				}
				i = j
				if c == '{' {
					state = stKey
				}
			case '"':
				if i, ok = scanString(b, i); !ok {
					return f, false
				}
				state = stAfter
			case 't', 'f', 'n':
				lit := "null"
				switch c {
				case 't':
					lit = "true"
				case 'f':
					lit = "false"
				}
				if len(b)-i < len(lit) || string(b[i:i+len(lit)]) != lit {
					return f, false
				}
				i, state = i+len(lit), stAfter
			default:
				if i, ok = scanNumber(b, i); !ok {
					return f, false
				}
				state = stAfter
			}
		case stAfter:
			if capture != nil && len(stack) == 1 {
				*capture, capture = b[vstart:i], nil
			}
			i = skipSpace(b, i)
			if len(stack) == 0 {
				return f, i == len(b)
			}
			if i >= len(b) {
				return f, false
			}
			top := stack[len(stack)-1]
			switch b[i] {
			case ',':
				state = stValue
				if top == '{' {
					state = stKey
				}
			case top + 2: // the matching '}' or ']'
				stack = stack[:len(stack)-1]
			default:
				return f, false
			}
			i++
		case stKey:
			i = skipSpace(b, i)
			if i >= len(b) || b[i] != '"' {
				return f, false
			}
			ks := i
			if i, ok = scanString(b, i); !ok {
				return f, false
			}
			key := b[ks:i]
			i = skipSpace(b, i)
			if i >= len(b) || b[i] != ':' {
				return f, false
			}
			i++
			if len(stack) == 1 {
				switch {
				case timeField != "" && f.time == nil && keyIs(key, timeField):
					capture = &f.time
				case f.specVersion == nil && keyIs(key, "specversion"):
					capture = &f.specVersion
				}
				vstart = skipSpace(b, i)
			}
			state = stValue
		}
	}
}

// plainByte marks the bytes a JSON string holds as they are: ASCII, not a control character, '"' or '\\'.
var plainByte = func() (t [256]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// scanString returns the index after the JSON string starting at b[i] == '"', and whether it is valid.
func scanString(b []byte, i int) (int, bool) {
	for i++; i < len(b); {
		for i < len(b) && plainByte[b[i]] {
			i++
		}
		if i >= len(b) {
			break
		}
		c := b[i]
		switch {
		case c == '"':
			return i + 1, true
		case c == '\\':
			if i+1 >= len(b) {
				return i, false
			}
			switch b[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if len(b)-i < 6 || !isHex(b[i+2]) || !isHex(b[i+3]) || !isHex(b[i+4]) || !isHex(b[i+5]) {
					return i, false
				}
				i += 6
			default:
				return i, false
			}
		case c < 0x20:
			return i, false
		case c < utf8.RuneSelf:
			i++
		default:
			r, size := utf8.DecodeRune(b[i:])
			if r == utf8.RuneError && size == 1 {
				return i, false
			}
			i += size
		}
	}
	return i, false
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

// scanNumber returns the index after the JSON number starting at b[i], and whether it is valid.
func scanNumber(b []byte, i int) (int, bool) {
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i >= len(b):
		return i, false
	case b[i] == '0':
		i++
	case b[i] >= '1' && b[i] <= '9':
		i = skipDigits(b, i+1)
	default:
		return i, false
	}
	if i < len(b) && b[i] == '.' {
		j := skipDigits(b, i+1)
		if j == i+1 {
			return j, false
		}
		i = j
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		j := skipDigits(b, i)
		if j == i {
			return j, false
		}
		i = j
	}
	return i, true
}

func skipDigits(b []byte, i int) int {
	for i < len(b) && b[i] >= '0' && b[i] <= '9' {
		i++
	}
	return i
}

func skipSpace(b []byte, i int) int {
	for i < len(b) {
		switch b[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

// keyIs reports whether the JSON string token key (with its quotes) is name.
func keyIs(key []byte, name string) bool {
	switch n := len(key) - 2; {
	case n == len(name):
		if string(key[1:len(key)-1]) == name {
			return true
		}
	case n < len(name) || n > 6*len(name): // escapes only lengthen, by at most 6 times
		return false
	}
	if !hasEscape(key) {
		return false
	}
	var s string
	return json.Unmarshal(key, &s) == nil && s == name
}

// hasEscape reports whether a JSON string token contains a backslash escape.
func hasEscape(tok []byte) bool {
	for _, c := range tok {
		if c == '\\' {
			return true
		}
	}
	return false
}
