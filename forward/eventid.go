package forward

import (
	"encoding/json"
	"errors"
	"unicode/utf8"
)

// errNoID is returned by eventID when the JSON has no top-level string "id".
var errNoID = errors.New("no top-level string \"id\"")

// eventID returns the "id" attribute of a CloudEvent in structured JSON without decoding the rest: it scans the
// top-level object and stops at the first "id" key. It does not validate the parts it skips.
func eventID(data []byte) (string, error) {
	s := scanner{b: data}
	s.space()
	if !s.consume('{') {
		return "", errors.New("not a JSON object")
	}
	for {
		s.space()
		if s.consume('}') {
			return "", errNoID
		}
		kstart := s.i
		raw, escaped, ok := s.str()
		if !ok {
			return "", errors.New("bad object key")
		}
		key := string(raw)
		if escaped || !utf8.Valid(raw) {
			if err := json.Unmarshal(s.b[kstart:s.i], &key); err != nil {
				return "", err
			}
		}
		s.space()
		if !s.consume(':') {
			return "", errors.New("missing ':'")
		}
		s.space()
		if key == "id" {
			start := s.i
			val, vEscaped, ok := s.str()
			if !ok {
				return "", errNoID
			}
			if !vEscaped && utf8.Valid(val) {
				return string(val), nil
			}
			var id string
			if err := json.Unmarshal(s.b[start:s.i], &id); err != nil {
				return "", err
			}
			return id, nil
		}
		if !s.skipValue(0) {
			return "", errors.New("bad value")
		}
		s.space()
		if s.consume(',') {
			continue
		}
		if s.consume('}') {
			return "", errNoID
		}
		return "", errors.New("missing ',' or '}'")
	}
}

// scanner walks JSON bytes just far enough for eventID.
type scanner struct {
	b []byte
	i int
}

func (s *scanner) space() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\r', '\n':
			s.i++
		default:
			return
		}
	}
}

func (s *scanner) consume(c byte) bool {
	if s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

// str reads a string and returns its raw contents (between the quotes) and whether it holds escapes.
func (s *scanner) str() (raw []byte, escaped, ok bool) {
	if !s.consume('"') {
		return nil, false, false
	}
	start := s.i
	for s.i < len(s.b) {
		switch c := s.b[s.i]; {
		case c == '\\':
			escaped = true
			s.i += 2
		case c == '"':
			raw = s.b[start:s.i]
			s.i++
			return raw, escaped, true
		case c < 0x20:
			return nil, false, false
		default:
			s.i++
		}
	}
	return nil, false, false
}

// maxDepth bounds the nesting skipValue follows.
const maxDepth = 1000

// skipValue steps over one value of any kind.
func (s *scanner) skipValue(depth int) bool {
	if depth > maxDepth || s.i >= len(s.b) {
		return false
	}
	switch s.b[s.i] {
	case '"':
		_, _, ok := s.str()
		return ok
	case '{', '[':
		open := s.b[s.i]
		closer := byte('}')
		if open == '[' {
			closer = ']'
		}
		s.i++
		s.space()
		if s.consume(closer) {
			return true
		}
		for {
			s.space()
			if open == '{' {
				if _, _, ok := s.str(); !ok {
					return false
				}
				s.space()
				if !s.consume(':') {
					return false
				}
				s.space()
			}
			if !s.skipValue(depth + 1) {
				return false
			}
			s.space()
			if s.consume(',') {
				continue
			}
			return s.consume(closer)
		}
	default:
		// number, true, false, null: up to the next delimiter.
		start := s.i
		for s.i < len(s.b) {
			switch s.b[s.i] {
			case ',', '}', ']', ' ', '\t', '\r', '\n':
				return s.i > start
			}
			s.i++
		}
		return s.i > start
	}
}
