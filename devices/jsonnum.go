package devices

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// maxExactInt is the largest magnitude up to which every integer has an exact float64.
const maxExactInt = 1 << 53

// decodeJSON decodes the single JSON value in data into v as json.Unmarshal does, except when data holds a run of
// 16 digits (the shortest integer beyond 2^53, which a float64 cannot hold exactly): numbers in interface values
// then come out as json.Number, and long is true. The caller passes those values through exactNumber.
func decodeJSON(data []byte, v any) (long bool, err error) {
	if !hasLongDigitRun(data) {
		return false, json.Unmarshal(data, v)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return true, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return true, errors.New("invalid data after the top-level value")
	}
	return true, nil
}

// hasLongDigitRun reports whether b holds 16 or more digits in a row.
func hasLongDigitRun(b []byte) bool {
	run := 0
	for _, c := range b {
		if c < '0' || c > '9' {
			run = 0
			continue
		}
		if run++; run >= 16 {
			return true
		}
	}
	return false
}

// exactNumber replaces the json.Numbers in v: an integer beyond ±2^53 that fits an int64 by that int64 (a device's
// nanosecond timestamp or 64-bit counter keeps every digit in the state view, as it does in the rules), any other
// number by its float64 (out of float64's range is an error, as with json.Unmarshal).
func exactNumber(v any) (any, error) {
	var err error
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			if x[k], err = exactNumber(e); err != nil {
				return nil, err
			}
		}
	case []any:
		for i, e := range x {
			if x[i], err = exactNumber(e); err != nil {
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
