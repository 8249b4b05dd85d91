package ingest

import (
	"encoding/base64"
	"strings"
	"time"
)

// appendEvent appends the CloudEvents JSON (structured mode) of an event the normalizer built: the same bytes
// as event.Event.MarshalJSON, which the tests and the fuzz targets check, in one allocation instead of many.
// It covers only what newEvent sets: no extensions, no dataschema.
func appendEvent(b []byte, id, source, typ, subject, dct string, at time.Time, data []byte, isBase64 bool) []byte {
	b = append(b, `{"specversion":"1.0","id":`...)
	b = appendSDKString(b, id)
	b = append(b, `,"source":`...)
	b = appendSDKString(b, source)
	b = append(b, `,"type":`...)
	b = appendSDKString(b, typ)
	if subject != "" {
		b = append(b, `,"subject":`...)
		b = appendSDKString(b, subject)
	}
	if dct != "" {
		b = append(b, `,"datacontenttype":`...)
		b = appendSDKString(b, dct)
	}
	b = append(b, `,"time":"`...)
	b = at.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, '"')
	if data != nil {
		switch {
		case isBase64:
			b = append(b, `,"data_base64":"`...)
			b = base64.StdEncoding.AppendEncode(b, data)
			b = append(b, '"')
		case sdkIsJSON(dct):
			b = append(b, `,"data":`...)
			b = append(b, data...)
		default:
			b = append(b, `,"data":`...)
			b = appendSDKString(b, string(data))
		}
	}
	return append(b, '}')
}

// eventSize is what appendEvent appends when no string needs escaping, to allocate once in the common case.
func eventSize(id, source, typ, subject, dct string, data []byte, isBase64 bool) int {
	// Member names, quotes and separators take at most 113 bytes, the longest time 30.
	n := 113 + 30 + len(id) + len(source) + len(typ) + len(subject) + len(dct)
	if isBase64 {
		n += base64.StdEncoding.EncodedLen(len(data))
	} else {
		n += len(data)
	}
	return n
}

// sdkIsJSON reports whether the sdk embeds data of content type dct as JSON (its isJSON on the media type).
func sdkIsJSON(dct string) bool {
	mt := dct
	if i := strings.IndexByte(mt, ';'); i >= 0 {
		mt = mt[:i]
	}
	mt = strings.TrimSpace(mt)
	switch strings.ToLower(mt) {
	case "", "application/json", "text/json", "application/cloudevents+json", "application/cloudevents-batch+json":
		return true
	}
	return false
}

// appendSDKString appends s as a JSON string escaped as the sdk's encoder (json-iterator, fastest config)
// does: '"' and '\\' and control characters are escaped, everything else is copied as is.
func appendSDKString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' {
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		}
		start = i + 1
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
