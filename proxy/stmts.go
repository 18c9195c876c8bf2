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

// clientStmt is a named statement as one client prepared it.
type clientStmt struct {
	name   string // the client's name
	key    stmtKey
	server []byte     // the governor-owned name on server connections
	parse  []byte     // the Parse body after the name: query, NUL, parameter types
	eff    sqlEffects // what executing it does to session state
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

type serverStmt struct {
	key  stmtKey
	name []byte
}

func stmtsOf(srv *pool.Server, max int) *serverState {
	if ss, ok := srv.State.(*serverState); ok {
		return ss
	}
	ss := &serverState{max: max, byKey: map[stmtKey]*list.Element{}, lru: list.New()}
	srv.State = ss
	return ss
}

// has reports whether k is prepared, marking it recently used.
func (ss *serverState) has(k stmtKey) bool {
	el, ok := ss.byKey[k]
	if ok {
		ss.lru.MoveToFront(el)
	}
	return ok
}

// add records k as prepared under name and returns the name of a statement
// to close first when the LRU is full (nil otherwise).
func (ss *serverState) add(k stmtKey, name []byte) (evict []byte) {
	if len(ss.byKey) >= ss.max {
		if back := ss.lru.Back(); back != nil {
			old := back.Value.(*serverStmt)
			ss.lru.Remove(back)
			delete(ss.byKey, old.key)
			evict = old.name
		}
	}
	ss.byKey[k] = ss.lru.PushFront(&serverStmt{key: k, name: name})
	return evict
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

// knownStatements remembers, per route, statements that parsed
// successfully, so that a client's Parse of one of them needs no server
// connection: it is answered at once and the statement is prepared on the
// connection that serves the client's first Bind or Describe. This keeps a
// client that prepares outside a transaction (pgbench -M prepared,
// libpq's PQprepare) from waiting for a connection its own other
// sessions hold. Bounded; safe for concurrent use.
type knownStatements struct {
	mu     sync.Mutex
	routes map[pool.Route]map[stmtKey]struct{}
}

// maxKnownPerRoute bounds the keys remembered per route (16 bytes each).
const maxKnownPerRoute = 50000

func (k *knownStatements) has(r pool.Route, key stmtKey) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	_, ok := k.routes[r][key]
	return ok
}

func (k *knownStatements) add(r pool.Route, key stmtKey) {
	k.mu.Lock()
	defer k.mu.Unlock()
	m := k.routes[r]
	if m == nil {
		if k.routes == nil {
			k.routes = map[pool.Route]map[stmtKey]struct{}{}
		}
		m = map[stmtKey]struct{}{}
		k.routes[r] = m
	}
	if len(m) >= maxKnownPerRoute {
		for old := range m { // forget an arbitrary one
			delete(m, old)
			break
		}
	}
	m[key] = struct{}{}
}

// forget drops a key that failed to prepare after all (a setting of the
// session it was tried in differs).
func (k *knownStatements) forget(r pool.Route, key stmtKey) {
	k.mu.Lock()
	defer k.mu.Unlock()
	delete(k.routes[r], key)
}
