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
	"sync"

	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
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
	id     uint64 // unique in the process: what a server copy records as its origin
	name   string // the client's name
	key    stmtKey
	server []byte // the governor-owned name on server connections
	// parse is the Parse body after the name: query, NUL, parameter
	// types; read-only, shared with every client that prepared the same
	// body (stmtTexts). kept says that this statement holds a reference
	// to it there (given back by session.forgetStmtLocked).
	parse []byte
	kept  bool
	eff   sqlEffects // what executing it does to session state
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
	// origin is the id of the client statement whose Parse prepared it:
	// until its shape is known, it serves that client statement only. An
	// id, not a pointer, so that a copy does not keep the statement's text
	// alive after the client forgot it.
	origin uint64
}

// servesClient reports whether the copy is the client's statement: the
// same shape, or (shape not known yet) prepared by the client's own Parse.
func (st *serverStmt) servesClient(cs *clientStmt) bool {
	if st.shape.ok && cs.shape.ok {
		return st.shape == cs.shape
	}
	return st.origin == cs.id
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
	st = &serverStmt{key: k, name: name, origin: origin.id}
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

// stmtTexts keeps the Parse bodies of clients' named statements
// (transaction mode), to prepare them again on other server connections:
// one copy per distinct body, shared by every client that prepared it and
// counted once in limits.max_buffered_bytes. Safe for concurrent use; no
// I/O and no copy of a body happens under its lock.
type stmtTexts struct {
	budget *wire.Budget
	mu     sync.Mutex
	m      map[stmtKey]*stmtText
}

type stmtText struct {
	body    []byte
	refs    int
	counted int // what the budget counts for it
}

func newStmtTexts(budget *wire.Budget) *stmtTexts {
	return &stmtTexts{budget: budget, m: map[stmtKey]*stmtText{}}
}

// hold returns the kept copy of body (whose key is k), taking a reference
// to it: the caller gives it back with release. ok is false when a new
// copy would take the budget over its limit.
func (t *stmtTexts) hold(k stmtKey, body []byte) (kept []byte, ok bool) {
	if kept, ok := t.ref(k); ok {
		return kept, true
	}
	if !t.budget.Reserve(len(body)) {
		return nil, false
	}
	own := append([]byte(nil), body...)
	t.mu.Lock()
	defer t.mu.Unlock()
	if st := t.m[k]; st != nil {
		// Another client kept it meanwhile.
		st.refs++
		t.budget.Return(len(body))
		return st.body, true
	}
	t.m[k] = &stmtText{body: own, refs: 1, counted: len(body)}
	return own, true
}

// holdOwned is hold for a body the caller hands over, with counted bytes
// the budget counts for it already (a reader's buffer taken whole): it is
// kept as it is, or given back if a copy is kept already.
func (t *stmtTexts) holdOwned(k stmtKey, body []byte, counted int) []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	if st := t.m[k]; st != nil {
		st.refs++
		t.budget.Return(counted)
		return st.body
	}
	t.m[k] = &stmtText{body: body, refs: 1, counted: counted}
	return body
}

// ref takes a reference to the kept copy of k, if there is one.
func (t *stmtTexts) ref(k stmtKey) ([]byte, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if st := t.m[k]; st != nil {
		st.refs++
		return st.body, true
	}
	return nil, false
}

// release gives back a reference taken by hold; the last one frees the
// copy (the bytes are the garbage collector's once no reader holds them).
func (t *stmtTexts) release(k stmtKey) {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.m[k]
	if st == nil {
		return
	}
	if st.refs--; st.refs == 0 {
		delete(t.m, k)
		t.budget.Return(st.counted)
	}
}

// len is the number of distinct bodies kept.
func (t *stmtTexts) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}
