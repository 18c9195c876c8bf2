package proxy

// This file makes protocol-level prepared statements work in transaction
// mode. A client's named statements are kept per session (name → query
// text and parameter types); on the server side each connection keeps the
// statements it has prepared under governor-owned names derived from a hash
// of text and types, in an LRU bounded by pool.max_prepared_statements. A
// client's Parse, Bind, Describe and Close are rewritten so that its
// statement exists on whichever connection serves it, prepared at most once
// per connection, and shared by every client that prepared the same text.

import (
	"container/list"
	"encoding/hex"
	"hash/maphash"

	"github.com/pggovernor/pggovernor/pool"
)

// stmtKey identifies a statement by its query text and parameter types:
// 128 bits from two independent seeds, so that a collision (which would run
// another statement) is out of reach.
type stmtKey [2]uint64

// stmtHasher derives keys; one per Server, its seeds fixed for the process.
type stmtHasher struct{ a, b maphash.Seed }

func newStmtHasher() stmtHasher {
	return stmtHasher{a: maphash.MakeSeed(), b: maphash.MakeSeed()}
}

// key hashes a Parse body after its name: the query, its NUL and the
// parameter types, as the client sent them.
func (h stmtHasher) key(textAndTypes []byte) stmtKey {
	return stmtKey{maphash.Bytes(h.a, textAndTypes), maphash.Bytes(h.b, textAndTypes)}
}

// serverName is the governor-owned statement name for a key:
// "pgg_" and 32 hex digits, under NAMEDATALEN.
func serverName(k stmtKey) []byte {
	var raw [16]byte
	for i := 0; i < 8; i++ {
		raw[i] = byte(k[0] >> (56 - 8*i))
		raw[8+i] = byte(k[1] >> (56 - 8*i))
	}
	out := make([]byte, 4+32)
	copy(out, "pgg_")
	hex.Encode(out[4:], raw[:])
	return out
}

// stmtShape is what a statement looks like to a client: the parameter
// types and the result columns (names, types, type modifiers) the server
// described for it. Two parses of one text are the same statement only if
// their shapes are equal: after a schema change they may not be, and
// Postgres then refuses the older one ("cached plan must not change result
// type", or a lookup of a type that is gone). The source table of a column
// is not part of it, as it is not part of Postgres' own check.
type stmtShape struct {
	sum uint64
	ok  bool // known: the server described it
}

// clientStmt is a named statement as one client prepared it.
type clientStmt struct {
	name   string // the client's name
	key    stmtKey
	server []byte     // the governor-owned name on server connections
	parse  []byte     // the Parse body after the name: query, NUL, parameter types
	eff    sqlEffects // what executing it does to session state
	// shape is the statement as the server described it when the client
	// prepared it; a copy on another connection serves the client only if
	// its shape is the same.
	shape stmtShape
	// paramTypes is the ParameterDescription body of that description:
	// the parameter types as the server resolved them, with which a copy
	// is prepared again (as Postgres re-analyses a cached statement with
	// its fixed parameter types).
	paramTypes []byte
}

// reparseBody returns the Parse body (after the name) that prepares cs
// again with its resolved parameter types, or its own Parse body while
// those are not known.
func (cs *clientStmt) reparseBody() []byte {
	return reparseBody(cs.parse, cs.paramTypes)
}

// reparseBody replaces the parameter types of a Parse body (query, NUL,
// int16 count, OIDs) with those of a ParameterDescription body (int16
// count, OIDs); without those it returns parse unchanged.
func reparseBody(parse, paramTypes []byte) []byte {
	if len(paramTypes) < 2 {
		return parse
	}
	end := indexNUL(parse)
	if end < 0 {
		return parse
	}
	out := make([]byte, 0, end+1+len(paramTypes))
	out = append(out, parse[:end+1]...)
	return append(out, paramTypes...)
}

func indexNUL(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}

// serverState is what the proxy keeps with one server connection, in
// pool.Server.State, touched only by the client holding the connection
// (under that session's mu): the statements it has prepared, and the
// client settings it was last brought to.
type serverState struct {
	max     int
	byKey   map[stmtKey]*list.Element // → *serverStmt
	lru     *list.List                // front: most recently used
	unnamed stmtKey                   // the statement its unnamed slot holds
	// unnamedOK says whether unnamed is known to be what the server's
	// unnamed statement holds.
	unnamedOK bool
	// unnamedOwner and unnamedSeq say whose Parse put the statement in
	// the unnamed slot (the session and its count of unnamed Parses):
	// until a Describe says its shape, it serves that Parse only.
	unnamedOwner *session
	unnamedSeq   uint64
	// unnamedShape is the shape of the statement in the unnamed slot, when
	// a Describe said it.
	unnamedShape stmtShape
	// pendingClose are names to Close before anything else is prepared:
	// statements the server may still hold though the governor dropped
	// them (stale plans, a DISCARD ALL that may have failed).
	pendingClose [][]byte

	// gen counts changes of the connection's parameters and settings;
	// fittedTo and fittedGen say which clients' settings it matched at
	// which gen, so that their next attach skips the comparison.
	gen       uint64
	fittedTo  *welcomeEntry
	fittedGen uint64

	// check is what session-state verification keeps (verify.go).
	check connCheck
}

// paramsChanged records that the connection's parameters changed.
func (ss *serverState) paramsChanged() { ss.gen++ }

// serverStmt is a statement prepared on one server connection.
type serverStmt struct {
	key  stmtKey
	name []byte
	// shape is how the server described it when it was prepared (unknown
	// until the Describe that follows every governor Parse is answered).
	shape stmtShape
	// origin is the client statement whose Parse prepared it: until its
	// shape is known, it serves that client statement only.
	origin *clientStmt
}

// servesClient reports whether the copy is the client's statement: the
// same shape, or (shape not known yet) prepared by the client's own Parse.
func (st *serverStmt) servesClient(cs *clientStmt) bool {
	if st.shape.ok && cs.shape.ok {
		return st.shape == cs.shape
	}
	return st.origin == cs
}

func stmtsOf(srv *pool.Server, max int) *serverState {
	if ss, ok := srv.State.(*serverState); ok {
		return ss
	}
	ss := &serverState{max: max, byKey: map[stmtKey]*list.Element{}, lru: list.New()}
	srv.State = ss
	return ss
}

// lookup returns the copy of k on the connection, marking it recently
// used; nil if there is none.
func (ss *serverState) lookup(k stmtKey) *serverStmt {
	el, ok := ss.byKey[k]
	if !ok {
		return nil
	}
	ss.lru.MoveToFront(el)
	return el.Value.(*serverStmt)
}

// add records k as prepared under name by origin's Parse and returns the
// copy, and the name of a statement to close first when the LRU is full
// (nil otherwise). A copy of k already recorded is replaced (the caller
// closes it on the server first).
func (ss *serverState) add(k stmtKey, name []byte, origin *clientStmt) (st *serverStmt, evict []byte) {
	if el, ok := ss.byKey[k]; ok {
		ss.lru.Remove(el)
		delete(ss.byKey, k)
	}
	if len(ss.byKey) >= ss.max {
		if back := ss.lru.Back(); back != nil {
			old := back.Value.(*serverStmt)
			ss.lru.Remove(back)
			delete(ss.byKey, old.key)
			evict = old.name
		}
	}
	st = &serverStmt{key: k, name: name, origin: origin}
	ss.byKey[k] = ss.lru.PushFront(st)
	return st, evict
}

// drop forgets k; when the server may still hold it, its name is queued
// for a Close.
func (ss *serverState) drop(k stmtKey, mayExist bool) {
	el, ok := ss.byKey[k]
	if !ok {
		return
	}
	st := el.Value.(*serverStmt)
	ss.lru.Remove(el)
	delete(ss.byKey, k)
	if mayExist {
		ss.pendingClose = append(ss.pendingClose, st.name)
	}
}

// dropCopy forgets st if it is still the connection's copy of its key.
func (ss *serverState) dropCopy(st *serverStmt, mayExist bool) {
	if el, ok := ss.byKey[st.key]; ok && el.Value.(*serverStmt) == st {
		ss.drop(st.key, mayExist)
	}
}

// dropAll forgets every statement (DISCARD ALL, DEALLOCATE ALL); they are
// queued for a Close in case the command did not run.
func (ss *serverState) dropAll() {
	for el := ss.lru.Front(); el != nil; el = el.Next() {
		ss.pendingClose = append(ss.pendingClose, el.Value.(*serverStmt).name)
	}
	ss.byKey = map[stmtKey]*list.Element{}
	ss.lru.Init()
	ss.unnamedOK = false
}

// reset forgets every statement after the connection was reset with
// DISCARD ALL successfully: nothing is left to close.
func (ss *serverState) reset() {
	ss.gen++
	ss.byKey = map[stmtKey]*list.Element{}
	ss.lru.Init()
	ss.unnamedOK = false
	ss.pendingClose = nil
}

// len is the number of prepared statements.
func (ss *serverState) len() int { return len(ss.byKey) }
