package buffer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
)

// How an open found the file.
const (
	openNew     = "new"     // created, or empty
	openClean   = "clean"   // closed by Close: bbolt reads its free list, nothing is scanned
	openRebuilt = "rebuilt" // not closed by Close (a crash): every page was walked and the free list rebuilt
)

// The on-disk layout of a bbolt (format version 2) meta page, in the machine's byte order: a 16-byte page
// header (id uint64, flags uint16, count uint16, overflow uint32), then magic, version, page size and flags
// (uint32 each), the root bucket (root page and sequence, uint64 each), the free list page, the high-water
// mark, the transaction id and the FNV-64a checksum of everything in the meta before it (uint64 each).
const (
	boltMagic        = 0xED0CDAED
	boltVersion      = 2
	boltPageHeader   = 16
	boltMetaSize     = 64
	boltMetaSumOff   = 56
	boltFreelistFlag = 0x10
	boltNoFreelist   = ^uint64(0)
)

// boltMeta is what the open needs from a valid meta page.
type boltMeta struct {
	pageSize uint64
	freelist uint64 // page of the synced free list, boltNoFreelist when none was written
	pgid     uint64 // high-water mark: pages in use
	txid     uint64
}

// parseMeta decodes the meta in the page that starts b, reporting whether it is valid (magic, version,
// checksum), as bbolt decides.
func parseMeta(b []byte) (boltMeta, bool) {
	if len(b) < boltPageHeader+boltMetaSize {
		return boltMeta{}, false
	}
	m := b[boltPageHeader : boltPageHeader+boltMetaSize]
	ne := binary.NativeEndian
	if ne.Uint32(m[0:]) != boltMagic || ne.Uint32(m[4:]) != boltVersion {
		return boltMeta{}, false
	}
	h := fnv.New64a()
	_, _ = h.Write(m[:boltMetaSumOff])
	if h.Sum64() != ne.Uint64(m[boltMetaSumOff:]) {
		return boltMeta{}, false
	}
	return boltMeta{
		pageSize: uint64(ne.Uint32(m[8:])),
		freelist: ne.Uint64(m[32:]),
		pgid:     ne.Uint64(m[40:]),
		txid:     ne.Uint64(m[48:]),
	}, true
}

// openKind tells, from the file's meta pages and its free list page, whether the existing file at path was
// closed by Close: its newest valid meta page names a free list written at that close, which bbolt then
// reads instead of walking the file to rebuild it. It reads the meta pages and the free list, nothing else.
// A free list page that the newest valid meta names but that is not a sane free list is damage that bbolt
// would read as is: ErrCorrupt. Anything else unusual (an invalid meta page, a file shorter than its pages,
// a read error) answers openRebuilt, whose full check reports the damage.
func openKind(path string) (string, error) {
	f, err := os.Open(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return openNew, nil
	case err != nil:
		return "", fmt.Errorf("buffer: open %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return openRebuilt, nil
	}
	size := fi.Size()
	if size == 0 {
		return openNew, nil
	}
	m, both := newestValidMeta(f, size)
	if m.freelist == boltNoFreelist {
		return openRebuilt, nil
	}
	if err := checkFreelist(f, m); err != nil {
		return "", corruptError(path, fmt.Errorf("free list page %d: %w", m.freelist, err))
	}
	if !both || m.pgid > uint64(size)/m.pageSize {
		return openRebuilt, nil
	}
	return openClean, nil
}

// newestValidMeta returns the valid meta page with the higher transaction id, as bbolt picks it (a meta
// naming no free list when neither is valid), and whether both meta pages were valid. Like bbolt it takes
// the page size from the first meta page, or else looks for the second one at each possible page size.
func newestValidMeta(f io.ReaderAt, size int64) (m boltMeta, both bool) {
	var buf [boltPageHeader + boltMetaSize]byte
	read := func(off int64) (boltMeta, bool) {
		if _, err := f.ReadAt(buf[:], off); err != nil {
			return boltMeta{}, false
		}
		m, ok := parseMeta(buf[:])
		ok = ok && m.pageSize >= 1024 && m.pageSize <= 1<<24 && m.pageSize&(m.pageSize-1) == 0
		return m, ok
	}
	none := boltMeta{freelist: boltNoFreelist}
	if m0, ok := read(0); ok {
		m1, ok := read(int64(m0.pageSize))
		if ok && m1.txid > m0.txid {
			return m1, true
		}
		return m0, ok
	}
	for i := range 15 {
		pos := int64(1024) << i
		if pos >= size-1024 {
			break
		}
		if m1, ok := read(pos); ok && int64(m1.pageSize) == pos {
			return m1, false
		}
	}
	return none, false
}

// checkFreelist checks the free list page the meta m names: a free list page with that id inside the
// high-water mark, holding ascending page ids inside it. bbolt reads the page without such checks.
func checkFreelist(f io.ReaderAt, m boltMeta) error {
	pageSize := m.pageSize
	if m.freelist < 2 || m.freelist >= m.pgid {
		return fmt.Errorf("outside the %d pages in use", m.pgid)
	}
	var hdr [boltPageHeader + 8]byte
	if _, err := f.ReadAt(hdr[:], int64(m.freelist*pageSize)); err != nil {
		return err
	}
	ne := binary.NativeEndian
	id, flags, count, overflow := ne.Uint64(hdr[0:]), ne.Uint16(hdr[8:]), uint64(ne.Uint16(hdr[10:])), uint64(ne.Uint32(hdr[12:]))
	if id != m.freelist || flags != boltFreelistFlag || m.freelist+overflow >= m.pgid {
		return fmt.Errorf("header: id %d, flags %#x, overflow %d", id, flags, overflow)
	}
	off := uint64(boltPageHeader)
	if count == 0xFFFF { // the count is the first element
		count = ne.Uint64(hdr[boltPageHeader:])
		off += 8
	}
	if count > m.pgid || off+8*count > (overflow+1)*pageSize {
		return fmt.Errorf("%d ids do not fit", count)
	}
	ids := make([]byte, 8*count)
	if _, err := f.ReadAt(ids, int64(m.freelist*pageSize+off)); err != nil {
		return err
	}
	prev := uint64(1)
	for i := range count {
		id := ne.Uint64(ids[8*i:])
		if id <= prev || id >= m.pgid {
			return fmt.Errorf("page id %d after %d (%d pages in use)", id, prev, m.pgid)
		}
		prev = id
	}
	return nil
}
