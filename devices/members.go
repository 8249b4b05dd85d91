package devices

import (
	"bytes"
	"encoding/json"
	"unicode/utf8"
)

// member is one top-level member of a JSON object: its name (unescaped) and its value, raw (as JSON) or already
// decoded.
type member struct {
	key     []byte
	raw     []byte
	val     any
	decoded bool
}

func (m member) isNull() bool {
	if m.decoded {
		return m.val == nil
	}
	return string(m.raw) == "null"
}

// objectMembers appends the top-level members of the JSON object b to dst, in document order, their values
// raw. b must be valid JSON (json.Valid) whose first byte is '{'; the values alias b. Given anything else that
// starts with '{' it returns some members (or none) without panicking.
func objectMembers(b []byte, dst []member) []member {
	i := skipWS(b, 1)
	if i < len(b) && b[i] == '}' {
		return dst
	}
	for i < len(b) {
		end := skipString(b, i)
		if end < i+2 {
			return dst // not JSON: an unterminated name
		}
		key := b[i+1 : end-1]
		if bytes.IndexByte(key, '\\') >= 0 || !utf8.Valid(key) {
			// As encoding/json: escapes decoded, invalid UTF-8 replaced by U+FFFD.
			var k string
			if json.Unmarshal(b[i:end], &k) != nil {
				return dst
			}
			key = []byte(k)
		}
		if i = skipWS(b, end); i >= len(b) {
			return dst // not JSON: a name without a value
		}
		i = skipWS(b, i+1) // past ':'
		vend := skipValue(b, i)
		dst = append(dst, member{key: key, raw: b[i:vend]})
		i = skipWS(b, vend)
		if i >= len(b) || b[i] == '}' {
			break
		}
		i = skipWS(b, i+1) // past ','
	}
	return dst
}

func skipWS(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index just past the string that starts (with its quote) at i.
func skipString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(b)
}

// skipValue returns the index just past the JSON value that starts at i.
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return i
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				i = skipString(b, i)
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return i
	default: // number, true, false, null
		for i < len(b) {
			switch b[i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				return i
			}
			i++
		}
		return i
	}
}
