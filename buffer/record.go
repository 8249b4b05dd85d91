package buffer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"
)

// On-disk layout (format 1). Every key is an 8-byte big-endian number.
//
//	meta      "format" → 1 byte; "last_seq" → 8 bytes (the highest sequence number ever assigned);
//	          "segment_size" → 8 bytes (sequence numbers per segment, fixed when the file is created)
//	segments  segment base seq → encoded segMeta (count, bytes, seq and time bounds, count per priority)
//	events    segment base seq → nested bucket: seq → record (header + CloudEvent JSON)
//	cursors   cursor name → 8 bytes (the position: every seq <= it is acknowledged)
var (
	bucketMeta     = []byte("meta")
	bucketSegments = []byte("segments")
	bucketEvents   = []byte("events")
	bucketCursors  = []byte("cursors")
	keyFormat      = []byte("format")
	keyLastSeq     = []byte("last_seq")
	keySegmentSize = []byte("segment_size")
)

const (
	formatVersion = 1
	recordVersion = 1
	// maxPriority is the highest Entry.Priority.
	maxPriority = 9
	// recordHeaderMin is the fixed part of a record: version, priority, time.
	recordHeaderMin = 1 + 1 + 8
	// keySize is the size of a record key, counted in the stored bytes.
	keySize = 8
)

var errBadRecord = errors.New("malformed record")

// The event times a record can hold: Unix nanoseconds in an int64, the years 1678 to 2262.
var minRecordTime, maxRecordTime = time.Unix(0, math.MinInt64), time.Unix(0, math.MaxInt64)

// unixNano is t in Unix nanoseconds, clamped to the times a record can hold: a device clock far off (year 1 or
// 9999) gives the nearest bound, not a time that wrapped around to another century.
func unixNano(t time.Time) int64 {
	switch {
	case t.Before(minRecordTime):
		return math.MinInt64
	case t.After(maxRecordTime):
		return math.MaxInt64
	}
	return t.UnixNano()
}

// seqKey encodes a sequence number as a bbolt key.
func seqKey(seq uint64) []byte {
	var k [8]byte
	binary.BigEndian.PutUint64(k[:], seq)
	return k[:]
}

// decodeSeqKey decodes an 8-byte big-endian key.
func decodeSeqKey(k []byte) (uint64, error) {
	if len(k) != 8 {
		return 0, fmt.Errorf("%w: key of %d bytes, want 8", errBadRecord, len(k))
	}
	return binary.BigEndian.Uint64(k), nil
}

// recordHeader is the part of a record stored before the CloudEvent JSON.
type recordHeader struct {
	Priority uint8
	Time     int64 // unix nanoseconds
	Type     string
	Subject  string
}

// encodeRecord appends the stored form of e (time in unix nanoseconds) to dst.
func encodeRecord(dst []byte, e *Entry, unixNano int64) []byte {
	dst = append(dst, recordVersion, e.Priority)
	dst = binary.BigEndian.AppendUint64(dst, uint64(unixNano))
	dst = binary.AppendUvarint(dst, uint64(len(e.Type)))
	dst = append(dst, e.Type...)
	dst = binary.AppendUvarint(dst, uint64(len(e.Subject)))
	dst = append(dst, e.Subject...)
	return append(dst, e.Data...)
}

// encodedSize is len(encodeRecord(nil, e, t)).
func encodedSize(e *Entry) int {
	return recordHeaderMin + uvarintLen(uint64(len(e.Type))) + len(e.Type) +
		uvarintLen(uint64(len(e.Subject))) + len(e.Subject) + len(e.Data)
}

func uvarintLen(x uint64) int {
	n := 1
	for x >= 0x80 {
		x >>= 7
		n++
	}
	return n
}

// decodeRecord splits a stored record into its header and the CloudEvent JSON; data aliases v.
func decodeRecord(v []byte) (h recordHeader, data []byte, err error) {
	if len(v) < recordHeaderMin {
		return h, nil, fmt.Errorf("%w: %d bytes, shorter than the header", errBadRecord, len(v))
	}
	if v[0] != recordVersion {
		return h, nil, fmt.Errorf("%w: version %d", errBadRecord, v[0])
	}
	if v[1] > maxPriority {
		return h, nil, fmt.Errorf("%w: priority %d", errBadRecord, v[1])
	}
	h.Priority = v[1]
	h.Time = int64(binary.BigEndian.Uint64(v[2:10]))
	rest := v[recordHeaderMin:]
	var typ, subj []byte
	if typ, rest, err = takeString(rest); err != nil {
		return h, nil, fmt.Errorf("type: %w", err)
	}
	if subj, rest, err = takeString(rest); err != nil {
		return h, nil, fmt.Errorf("subject: %w", err)
	}
	h.Type, h.Subject = string(typ), string(subj)
	return h, rest, nil
}

// recordPriorityTime reads only the fixed header fields (for retention scans).
func recordPriorityTime(v []byte) (prio uint8, unixNano int64, ok bool) {
	if len(v) < recordHeaderMin || v[0] != recordVersion || v[1] > maxPriority {
		return 0, 0, false
	}
	return v[1], int64(binary.BigEndian.Uint64(v[2:10])), true
}

func takeString(b []byte) (s, rest []byte, err error) {
	n, k := binary.Uvarint(b)
	if k <= 0 {
		return nil, nil, fmt.Errorf("%w: bad length", errBadRecord)
	}
	b = b[k:]
	if n > uint64(len(b)) {
		return nil, nil, fmt.Errorf("%w: length %d past the end", errBadRecord, n)
	}
	return b[:n], b[n:], nil
}

// toRecord decodes a stored record into a Record whose fields own their memory; without withData, Data is nil.
func toRecord(seq uint64, v []byte, withData bool) (Record, error) {
	h, data, err := decodeRecord(v)
	if err != nil {
		return Record{}, err
	}
	if !withData {
		data = nil
	}
	return Record{Seq: seq, Entry: Entry{
		Data:     append([]byte(nil), data...),
		Type:     h.Type,
		Subject:  h.Subject,
		Time:     time.Unix(0, h.Time).UTC(),
		Priority: h.Priority,
	}}, nil
}

// segMeta summarises one segment so that Open reads no events. Time bounds may be wider than the events still
// stored (a partial removal narrows them only when it scans the whole segment); the rest is exact.
type segMeta struct {
	Base      uint64
	Count     int64
	Bytes     int64
	MinSeq    uint64
	MaxSeq    uint64
	MinTime   int64
	MaxTime   int64
	Prio      [maxPriority + 1]int64 // events per priority
	PrioBytes [maxPriority + 1]int64 // bytes per priority
}

const segMetaVersion = 1

func encodeSegMeta(m *segMeta) []byte {
	b := make([]byte, 0, 64)
	b = append(b, segMetaVersion)
	b = binary.AppendUvarint(b, uint64(m.Count))
	b = binary.AppendUvarint(b, uint64(m.Bytes))
	b = binary.AppendUvarint(b, m.MinSeq)
	b = binary.AppendUvarint(b, m.MaxSeq)
	b = binary.AppendVarint(b, m.MinTime)
	b = binary.AppendVarint(b, m.MaxTime)
	for _, n := range m.Prio {
		b = binary.AppendUvarint(b, uint64(n))
	}
	for _, n := range m.PrioBytes {
		b = binary.AppendUvarint(b, uint64(n))
	}
	return b
}

// decodeSegMeta decodes and checks the metadata of the segment whose key is k.
func decodeSegMeta(k, v []byte, segSize uint64) (segMeta, error) {
	var m segMeta
	base, err := decodeSeqKey(k)
	if err != nil {
		return m, err
	}
	m.Base = base
	if len(v) < 1 || v[0] != segMetaVersion {
		return m, fmt.Errorf("segment %d: %w: bad version", base, errBadRecord)
	}
	b := v[1:]
	var fields [6 + 2*(maxPriority+1)]uint64
	for i := range fields {
		var n int
		if i == 4 || i == 5 {
			var x int64
			x, n = binary.Varint(b)
			fields[i] = uint64(x)
		} else {
			fields[i], n = binary.Uvarint(b)
		}
		if n <= 0 {
			return m, fmt.Errorf("segment %d: %w: truncated", base, errBadRecord)
		}
		b = b[n:]
	}
	if len(b) != 0 {
		return m, fmt.Errorf("segment %d: %w: %d trailing bytes", base, errBadRecord, len(b))
	}
	const maxInt = 1<<63 - 1
	if fields[0] > maxInt || fields[1] > maxInt {
		return m, fmt.Errorf("segment %d: %w: count or size out of range", base, errBadRecord)
	}
	m.Count, m.Bytes = int64(fields[0]), int64(fields[1])
	m.MinSeq, m.MaxSeq = fields[2], fields[3]
	m.MinTime, m.MaxTime = int64(fields[4]), int64(fields[5])
	var sum, sumBytes int64
	for i := range m.Prio {
		n, nb := fields[6+i], fields[6+maxPriority+1+i]
		if n > uint64(m.Count) || nb > uint64(m.Bytes) || nb < n*(keySize+recordHeaderMin+2) || (n == 0) != (nb == 0) {
			return m, fmt.Errorf("segment %d: %w: priority %d: %d events, %d bytes", base, errBadRecord, i, n, nb)
		}
		m.Prio[i], m.PrioBytes[i] = int64(n), int64(nb)
		sum += m.Prio[i]
		sumBytes += m.PrioBytes[i]
	}
	switch {
	case base == 0 || (base-1)%segSize != 0:
		return m, fmt.Errorf("segment %d: %w: base not aligned to %d", base, errBadRecord, segSize)
	case m.Count == 0 || sum != m.Count || sumBytes != m.Bytes:
		return m, fmt.Errorf("segment %d: %w: %d events of %d bytes, per priority %d of %d", base, errBadRecord,
			m.Count, m.Bytes, sum, sumBytes)
	case m.MinSeq < base || m.MaxSeq < m.MinSeq || m.MaxSeq-base >= segSize:
		return m, fmt.Errorf("segment %d: %w: seqs %d..%d outside the segment", base, errBadRecord, m.MinSeq, m.MaxSeq)
	case uint64(m.Count) > m.MaxSeq-m.MinSeq+1:
		return m, fmt.Errorf("segment %d: %w: %d events in %d seqs", base, errBadRecord, m.Count, m.MaxSeq-m.MinSeq+1)
	case m.Bytes < m.Count*(keySize+recordHeaderMin+2):
		return m, fmt.Errorf("segment %d: %w: %d bytes for %d events", base, errBadRecord, m.Bytes, m.Count)
	case m.MinTime > m.MaxTime:
		return m, fmt.Errorf("segment %d: %w: time bounds reversed", base, errBadRecord)
	}
	return m, nil
}

// segBase is the first seq of the segment holding seq.
func segBase(seq, segSize uint64) uint64 {
	if seq == 0 {
		return 1
	}
	return (seq-1)/segSize*segSize + 1
}

func encodeUint64(x uint64) []byte { return seqKey(x) }
