package rules

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// maxExactInt is the largest magnitude up to which every integer has an exact float64.
const maxExactInt = 1 << 53

// decodeJSON decodes the single JSON value in b (surrounding white space allowed) the way encoding/json decodes
// into an interface (objects as map[string]any, arrays as []any, numbers as float64), except that an integer
// beyond ±2^53, which a float64 cannot hold exactly, is an int64 when it fits one: a device's 64-bit counter,
// serial number or nanosecond timestamp keeps every digit in conditions and templates.
func decodeJSON(b []byte) (any, error) {
	var v any
	if !hasLongNumber(b) {
		err := json.Unmarshal(b, &v)
		return v, err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("invalid data after the top-level value")
	}
	return exactNumbers(v)
}

// hasLongNumber reports whether b holds a run of 16 or more digits: only such a number can be an integer
// beyond 2^53 (9007199254740992, 16 digits).
func hasLongNumber(b []byte) bool {
	run := 0
	for _, c := range b {
		if c >= '0' && c <= '9' {
			if run++; run >= 16 {
				return true
			}
		} else {
			run = 0
		}
	}
	return false
}

// exactNumbers replaces the json.Numbers in v: an integer beyond ±2^53 that fits an int64 by that int64, any other
// number by its float64 (what json.Unmarshal gives, and like it, an error when it is out of float64's range).
func exactNumbers(v any) (any, error) {
	var err error
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			if x[k], err = exactNumbers(e); err != nil {
				return nil, err
			}
		}
	case []any:
		for i, e := range x {
			if x[i], err = exactNumbers(e); err != nil {
				return nil, err
			}
		}
	case json.Number:
		if i, err := x.Int64(); err == nil && (i > maxExactInt || i < -maxExactInt) {
			return i, nil
		}
		f, err := x.Float64()
		if err != nil {
			return nil, fmt.Errorf("number %s: %w", x, err)
		}
		return f, nil
	}
	return v, nil
}
