package proxy

// This file computes statement shapes (stmtShape) from the server's
// descriptions, without allocating: the relay computes one for every
// statement Describe it follows.

import (
	"encoding/binary"
	"hash/maphash"
)

// shape returns the shape of a statement from the body of its
// ParameterDescription and the body of its RowDescription (nil for
// NoData). Only what Postgres compares when it revalidates a cached
// statement counts: the parameter types, and each column's name, type and
// type modifier; not the table a column comes from.
func (h stmtHasher) shape(paramDesc, rowDesc []byte) stmtShape {
	var mh maphash.Hash
	mh.SetSeed(h.b)
	_, _ = mh.Write(paramDesc)
	if rowDesc == nil {
		_ = mh.WriteByte('n')
		return stmtShape{sum: mh.Sum64(), ok: true}
	}
	_ = mh.WriteByte('T')
	if len(rowDesc) < 2 {
		return stmtShape{sum: mh.Sum64(), ok: true}
	}
	n := int(binary.BigEndian.Uint16(rowDesc))
	b := rowDesc[2:]
	for i := 0; i < n; i++ {
		end := indexNUL(b)
		// name NUL, table OID (4), column number (2), type OID (4),
		// type length (2), type modifier (4), format (2).
		if end < 0 || len(b) < end+1+18 {
			return stmtShape{} // malformed: unknown, never equal
		}
		_, _ = mh.Write(b[:end+1])
		f := b[end+1:]
		_, _ = mh.Write(f[6:10])  // type OID
		_, _ = mh.Write(f[12:16]) // type modifier
		b = f[18:]
	}
	return stmtShape{sum: mh.Sum64(), ok: true}
}
