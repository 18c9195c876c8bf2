package proxy

// This file finds what a query text does to session state, so that
// transaction pooling pins a client to its server connection, verifies the
// connection at release, or restores the client's startup settings,
// instead of silently handing one client's state to another. It lexes SQL
// as the server does (strings under the session's
// standard_conforming_strings, quoted identifiers, dollar quotes, nested
// comments), without allocating, and reads just enough of each statement:
// its first words, the names it qualifies with pg_temp, and the functions
// it calls. What it cannot see into (DO, CALL, EXECUTE, functions that are
// not known built-ins) it reports as needing verification (verify.go).

import (
	"bytes"
	"sort"
)

// pinKind is a bit set of kinds of session state.
type pinKind uint16

const (
	pinListen     pinKind = 1 << iota // LISTEN
	pinGUC                            // SET (session) of an unreported parameter, set_config(…, false)
	pinAdvisory                       // session-level advisory locks
	pinTemp                           // temporary tables, views, sequences, functions
	pinPrepare                        // SQL PREPARE
	pinCursor                         // DECLARE … WITH HOLD
	pinLoad                           // LOAD of a library: never undone
	pinRole                           // SET ROLE / SET SESSION AUTHORIZATION
	pinProtocol                       // a protocol-level named prepared statement (until issue-3 tracking)
	pinCustom                         // a custom parameter (a name with a dot): invisible to pg_settings
	pinUnverified                     // a verification failed: the state is unknown
)

var pinNames = [...]string{"LISTEN", "SET", "advisory lock", "temporary table", "PREPARE", "cursor WITH HOLD", "LOAD", "SET ROLE", "named prepared statement", "custom parameter", "unverified state"}

// verifiable are the kinds of state the verification query sees (and so
// may find gone): a client pinned only by these is verified again at the
// end of its transactions when something may have dropped them. LOAD and
// custom parameters cannot be seen; only the client's leaving (DISCARD
// ALL), RESET ALL or DISCARD ALL ends those pins.
const verifiable = pinListen | pinGUC | pinAdvisory | pinTemp | pinPrepare | pinCursor | pinRole | pinUnverified

func (k pinKind) String() string {
	s := ""
	for i, n := range pinNames {
		if k&(1<<i) != 0 {
			if s != "" {
				s += ", "
			}
			s += n
		}
	}
	return s
}

// sqlEffects is what a query text does to session state.
type sqlEffects struct {
	pin   pinKind // state created
	unpin pinKind // state entirely dropped (UNLISTEN *, RESET ALL, DISCARD ALL, …)
	// recheck are kinds of state the text may have dropped (an unlock, a
	// DROP, CLOSE, RESET ROLE): a client pinned by them is verified at
	// the end of its transaction, and unpinned if they are gone.
	recheck pinKind
	// verify says the text runs code the scanner cannot see into (DO,
	// CALL, EXECUTE, functions that are not known built-ins, set_config
	// whose scope is an expression) or resets one startup setting: the
	// connection is verified before it is released.
	verify bool
	// opaque says that code may also have set custom parameters, which no
	// query can list: the connection is RESET before another client uses
	// it (verify.go).
	opaque bool
	// resetAll: RESET ALL or DISCARD ALL, which take the client's startup
	// settings away with the rest (the governor applies them with
	// set_config, so the server's RESET default is not the startup value).
	resetAll bool
	// resetReported are the reportedParams (bit i: reportedParams[i]) a
	// RESET x or SET x TO DEFAULT resets: a startup value among them is
	// restored. Other parameters' RESETs are verified instead.
	resetReported uint8
	// scs says the text may change standard_conforming_strings, so that a
	// text pipelined behind it may be lexed otherwise.
	scs bool
	// creates: a CREATE or SELECT … INTO, which creates a temporary
	// object when the search_path names pg_temp.
	creates     bool
	discardAll  bool // DISCARD ALL: every kind of state gone, prepared statements too
	deallocAll  bool // DEALLOCATE ALL
	dealloc     bool // a DEALLOCATE of one statement
	listen      bool // a LISTEN or UNLISTEN
	databaseDDL bool // DROP DATABASE, ALTER DATABASE … RENAME, CREATE DATABASE
	transaction bool // the text contains BEGIN/START/COMMIT/… (not used for pinning)
}

// addPin records state created by a statement: an earlier unpin of the
// same kind in the text no longer holds.
func (e *sqlEffects) addPin(k pinKind) {
	e.pin |= k
	e.unpin &^= k
}

// addUnpin records state dropped by a statement.
func (e *sqlEffects) addUnpin(k pinKind) { e.unpin |= k }

// setOpaque records code the scanner cannot see into.
func (e *sqlEffects) setOpaque() { e.verify, e.opaque, e.scs = true, true, true }

// merge adds the effects of a later statement of the same text.
func (e *sqlEffects) merge(s sqlEffects) {
	e.unpin |= s.unpin
	e.pin |= s.pin
	e.unpin &^= s.pin
	e.recheck |= s.recheck
	e.verify = e.verify || s.verify
	e.opaque = e.opaque || s.opaque
	e.resetAll = e.resetAll || s.resetAll
	e.resetReported |= s.resetReported
	e.scs = e.scs || s.scs
	e.creates = e.creates || s.creates
	e.discardAll = e.discardAll || s.discardAll
	e.deallocAll = e.deallocAll || s.deallocAll
	e.dealloc = e.dealloc || s.dealloc
	e.listen = e.listen || s.listen
	e.databaseDDL = e.databaseDDL || s.databaseDDL
	e.transaction = e.transaction || s.transaction
}

// either combines the effects of a text lexed both ways, when the session
// cannot tell how the server will lex it (a change of
// standard_conforming_strings is in flight): state either reading creates,
// unpins both agree on, and a verification if they differ.
func either(a, b sqlEffects) sqlEffects {
	if a == b {
		return a
	}
	out := a
	out.pin |= b.pin
	out.unpin &= b.unpin
	out.unpin &^= out.pin
	out.recheck |= b.recheck | a.pin | b.pin | a.unpin | b.unpin
	out.verify = true
	out.opaque = a.opaque || b.opaque
	out.resetAll = a.resetAll || b.resetAll
	out.resetReported |= b.resetReported
	out.scs = true
	out.creates = a.creates || b.creates
	return out
}

func isRoleParam(name []byte) bool {
	return equalFold(name, "role") || equalFold(name, "session_authorization")
}

// reportedParams are the parameters Postgres announces with
// ParameterStatus that a client can change, so that the governor can
// follow them without pinning.
var reportedParams = [...]string{"application_name", "client_encoding", "datestyle", "intervalstyle", "timezone", "standard_conforming_strings", "default_transaction_read_only"}

// reportedIndex returns the index of a parameter in reportedParams, or -1.
func reportedIndex(name []byte) int {
	for i, p := range reportedParams {
		if equalFold(name, p) {
			return i
		}
	}
	return -1
}

// reportedParam reports whether a parameter is one of reportedParams.
func reportedParam(name []byte) bool { return reportedIndex(name) >= 0 }

// isCustomParam reports whether a parameter name is a custom one
// (extension.name): unless a loaded extension defines it, pg_settings does
// not list it, so verification cannot see it.
func isCustomParam(name []byte) bool { return bytes.IndexByte(name, '.') >= 0 }

// scanMode says how the server lexes a text.
type scanMode uint8

const (
	// scanBackslashQuotes: standard_conforming_strings is off, so a
	// backslash escapes the next character in every '…' string, as in
	// E'…'.
	scanBackslashQuotes scanMode = 1 << iota
)

// maxStmtTokens is how many leading tokens of a statement are kept.
const maxStmtTokens = 8

// stmtState is what the scanner keeps of the statement it is in.
type stmtState struct {
	toks [maxStmtTokens]token // its first tokens (after EXPLAIN and its options)
	n    int
	// explain: the statement is EXPLAIN of the one in toks; analyze: with
	// ANALYZE (it runs); options: with a parenthesised option list (it
	// may run).
	explain, analyze, options bool
	withHold, onCommitDrop    bool
	intoTemp                  bool // SELECT … INTO TEMP or INTO pg_temp.x
	into                      bool // INTO seen
	tempRef                   bool // a name qualified with pg_temp
	se                        sqlEffects
}

// scanSQL returns the session-state effects of a query text, lexed as the
// server would under mode.
func scanSQL(q []byte, mode scanMode) sqlEffects {
	var eff sqlEffects
	lx := lexer{src: q, backslashes: mode&scanBackslashQuotes != 0}
	var st stmtState
	var hist [4]token // the tokens before the current one, most recent first
	for {
		t := lx.next()
		if t.kind == tokEOF {
			st.end(&eff, q)
			return eff
		}
		if t.is(q, ';') {
			st.end(&eff, q)
			st, hist = stmtState{}, [4]token{}
			continue
		}
		if st.n == 0 && st.explainPrefix(t, q, &lx) {
			continue
		}
		if st.n < len(st.toks) {
			st.toks[st.n] = t
			st.n++
		}
		st.observe(t, q, &hist, &lx)
		hist[3], hist[2], hist[1], hist[0] = hist[2], hist[1], hist[0], t
	}
}

// explainPrefix consumes EXPLAIN and its options before a statement's
// first word, so that the explained statement is analysed as if it stood
// alone.
func (st *stmtState) explainPrefix(t token, q []byte, lx *lexer) bool {
	if t.kind == tokWord {
		switch w := t.text(q); {
		case equalFold(w, "explain"):
			st.explain = true
			return true
		case st.explain && (equalFold(w, "analyze") || equalFold(w, "analyse")):
			st.analyze = true
			return true
		case st.explain && equalFold(w, "verbose"):
			return true
		}
	}
	if st.explain && t.is(q, '(') {
		st.options = true
		for depth := 1; depth > 0; {
			t := lx.next()
			switch {
			case t.kind == tokEOF:
				return true
			case t.is(q, '('):
				depth++
			case t.is(q, ')'):
				depth--
			}
		}
		return true
	}
	return false
}

// observe looks at one token of the statement: word pairs that change its
// meaning, pg_temp qualification, function calls.
func (st *stmtState) observe(t token, q []byte, hist *[4]token, lx *lexer) {
	prev := hist[0]
	pw := prev.kind == tokWord
	if t.kind == tokWord {
		w := t.text(q)
		switch {
		case pw && equalFold(w, "hold") && equalFold(prev.text(q), "with"):
			st.withHold = true
		case pw && equalFold(w, "drop") && equalFold(prev.text(q), "commit"):
			st.onCommitDrop = true
		case pw && (equalFold(w, "temp") || equalFold(w, "temporary")) && equalFold(prev.text(q), "into"):
			st.intoTemp = true
		case equalFold(w, "into"):
			st.into = true
		}
		if i := bytes.IndexByte(w, '.'); i >= 0 && isTempSchema(w[:i]) {
			st.tempRef = true
			if pw && equalFold(prev.text(q), "into") {
				st.intoTemp = true
			}
		}
	}
	if t.is(q, '.') && (prev.kind == tokWord || prev.kind == tokQuotedIdent) && isTempSchema(prev.text(q)) {
		// pg_temp . t, "pg_temp".t
		st.tempRef = true
		if before := hist[1]; before.kind == tokWord && equalFold(before.text(q), "into") {
			st.intoTemp = true
		}
	}
	if t.is(q, '(') && (prev.kind == tokWord || prev.kind == tokQuotedIdent) {
		st.call(q, hist, lx)
	}
}

// isTempSchema reports whether a schema name is the session's temporary
// schema: pg_temp, or its real name pg_temp_N.
func isTempSchema(b []byte) bool {
	if len(b) < 7 || !equalFold(b[:7], "pg_temp") {
		return false
	}
	if len(b) == 7 {
		return true
	}
	if b[7] != '_' || len(b) == 8 {
		return false
	}
	for _, c := range b[8:] {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// end analyses the statement at its end and adds its effects to eff.
func (st *stmtState) end(eff *sqlEffects, q []byte) {
	if st.n > 0 {
		st.classify(q)
	}
	se := st.se
	if st.explain && !st.analyze {
		// EXPLAIN without ANALYZE plans its statement without running it
		// (though planning may evaluate functions); with an option list it
		// may or may not run. Either way the server knows: verify.
		if se.pin != 0 || se.opaque || se.verify || se.creates {
			se.verify = true
		}
		if !st.options {
			se.pin, se.unpin, se.resetAll = 0, 0, false
		}
	}
	eff.merge(se)
}

// tok returns the statement's i-th token, or the zero token.
func (st *stmtState) tok(i int) token {
	if i < st.n {
		return st.toks[i]
	}
	return token{}
}

// word returns the text of the statement's i-th token when it is a word or
// a quoted identifier (or * after the first), else nil.
func (st *stmtState) word(q []byte, i int) []byte {
	t := st.tok(i)
	switch {
	case t.kind == tokWord || t.kind == tokQuotedIdent:
		return t.text(q)
	case i > 0 && t.kind == tokPunct && t.text(q)[0] == '*':
		return t.text(q)
	}
	return nil
}

// classify classifies the statement by its first words.
func (st *stmtState) classify(q []byte) {
	eff := &st.se
	w := func(i int) []byte { return st.word(q, i) }
	first := w(0)
	if first == nil {
		return
	}
	switch {
	case equalFold(first, "set"):
		st.analyzeSet(q)
	case equalFold(first, "reset"):
		switch name := w(1); {
		case equalFold(name, "all"):
			eff.addUnpin(pinGUC | pinCustom)
			eff.resetAll, eff.scs = true, true
		case equalFold(name, "role"), equalFold(name, "session") && equalFold(w(2), "authorization"), equalFold(name, "session_authorization"):
			eff.recheck |= pinRole
		case equalFold(name, "time") && equalFold(w(2), "zone"):
			eff.resetReported |= 1 << reportedIndex([]byte("timezone"))
		case reportedParam(name):
			eff.resetReported |= 1 << reportedIndex(name)
			eff.scs = eff.scs || equalFold(name, "standard_conforming_strings")
		default:
			// The parameter may be one of the client's startup settings,
			// whose value must then be restored: verification tells.
			eff.recheck |= pinGUC
			eff.verify = true
			if equalFold(name, "standard_conforming_strings") {
				eff.scs = true
			}
		}
	case equalFold(first, "listen"):
		eff.addPin(pinListen)
		eff.listen = true
	case equalFold(first, "unlisten"):
		eff.listen = true
		if len(w(1)) == 1 && w(1)[0] == '*' {
			eff.addUnpin(pinListen)
		} else {
			eff.recheck |= pinListen
		}
	case (equalFold(first, "drop") || equalFold(first, "alter") || equalFold(first, "create")) && equalFold(w(1), "database"):
		eff.databaseDDL = true
	case equalFold(first, "prepare"):
		if !equalFold(w(1), "transaction") {
			eff.addPin(pinPrepare)
		}
	case equalFold(first, "deallocate"):
		if equalFold(w(1), "all") || (equalFold(w(1), "prepare") && equalFold(w(2), "all")) {
			eff.addUnpin(pinPrepare)
			eff.deallocAll = true
		} else {
			eff.dealloc = true
			eff.recheck |= pinPrepare
		}
	case equalFold(first, "declare"):
		if st.withHold {
			eff.addPin(pinCursor)
		}
	case equalFold(first, "close"):
		if equalFold(w(1), "all") {
			eff.addUnpin(pinCursor)
		} else {
			eff.recheck |= pinCursor
		}
	case equalFold(first, "create"):
		eff.creates = true
		i := 1
		if equalFold(w(i), "or") && equalFold(w(i+1), "replace") {
			i += 2
		}
		if equalFold(w(i), "global") || equalFold(w(i), "local") {
			i++
		}
		if (equalFold(w(i), "temp") || equalFold(w(i), "temporary")) && !st.onCommitDrop {
			eff.addPin(pinTemp)
		}
		if st.tempRef {
			eff.addPin(pinTemp)
		}
		if equalFold(w(i), "extension") {
			eff.setOpaque() // its script runs
		}
	case equalFold(first, "alter") && equalFold(w(1), "extension"):
		eff.setOpaque()
	case equalFold(first, "refresh"):
		eff.setOpaque() // the view's query runs
	case equalFold(first, "select"), equalFold(first, "with"), equalFold(first, "table"), equalFold(first, "values"):
		if st.into {
			eff.creates = true
		}
		if st.intoTemp {
			eff.addPin(pinTemp)
		}
	case equalFold(first, "drop"):
		eff.recheck |= pinTemp
	case equalFold(first, "discard"):
		switch {
		case equalFold(w(1), "all"):
			eff.addUnpin(pinListen | pinGUC | pinAdvisory | pinTemp | pinPrepare | pinCursor | pinRole | pinCustom)
			eff.discardAll, eff.resetAll, eff.scs = true, true, true
		case equalFold(w(1), "temp"), equalFold(w(1), "temporary"):
			eff.addUnpin(pinTemp)
		}
	case equalFold(first, "load"):
		eff.addPin(pinLoad)
	case equalFold(first, "do"), equalFold(first, "call"), equalFold(first, "execute"):
		eff.setOpaque()
	case equalFold(first, "begin"), equalFold(first, "start"), equalFold(first, "commit"),
		equalFold(first, "end"), equalFold(first, "rollback"), equalFold(first, "abort"):
		eff.transaction = true
	}
}

// analyzeSet classifies a SET statement.
func (st *stmtState) analyzeSet(q []byte) {
	eff := &st.se
	w := func(i int) []byte { return st.word(q, i) }
	if equalFold(w(1), "local") || equalFold(w(1), "transaction") || equalFold(w(1), "constraints") {
		return // transaction-scoped
	}
	i := 1
	if equalFold(w(1), "session") { // SET SESSION x is SET x
		i = 2
	}
	name := w(i)
	// The value: after TO or =, or right after the name (SET ROLE bob).
	v := i + 1
	if t := st.tok(v); (t.kind == tokWord && equalFold(t.text(q), "to")) || t.is(q, '=') {
		v++
	}
	toDefault := st.tok(v).kind == tokWord && equalFold(st.tok(v).text(q), "default")
	switch {
	case name == nil:
		eff.addPin(pinGUC)
	case equalFold(name, "characteristics"):
		eff.addPin(pinGUC)
	case equalFold(name, "time") && equalFold(w(i+1), "zone"), equalFold(name, "names"):
		// TimeZone and client_encoding are reported parameters.
	case equalFold(name, "session") && equalFold(w(i+1), "authorization"), equalFold(name, "authorization") && i == 2:
		// SET [SESSION] SESSION AUTHORIZATION x
		j := i + 2
		if i == 2 {
			j = i + 1
		}
		if equalFold(w(j), "default") {
			eff.recheck |= pinRole
		} else {
			eff.addPin(pinRole)
		}
	case isRoleParam(name):
		// RESET ALL does not reset these (GUC_NO_RESET_ALL): only DISCARD
		// ALL (or the client leaving) ends this pin, or a verification
		// after RESET ROLE / SET ROLE NONE.
		if toDefault || (equalFold(name, "role") && st.tok(v).kind == tokWord && equalFold(st.tok(v).text(q), "none")) {
			eff.recheck |= pinRole
		} else {
			eff.addPin(pinRole)
		}
	case toDefault && reportedParam(name):
		eff.resetReported |= 1 << reportedIndex(name)
		eff.scs = eff.scs || equalFold(name, "standard_conforming_strings")
	case toDefault:
		// SET x TO DEFAULT is RESET x.
		eff.recheck |= pinGUC | pinCustom
		eff.verify = true
	case equalFold(name, "standard_conforming_strings"):
		eff.scs = true
	case isCustomParam(name):
		eff.addPin(pinCustom)
	case !reportedParam(name):
		eff.addPin(pinGUC)
	}
}

// exemptBefore are the words after which "name(" is not a function call
// but a relation, a type or a signature: INSERT INTO t (a), CREATE TABLE
// t (…), REFERENCES t (a), COPY t (a), CREATE VIEW v (a), DROP FUNCTION
// f(int), CAST(x AS numeric(10,2)), WITH q (a) AS, IF NOT EXISTS t (…),
// TABLE t OF type (…), CREATE STATISTICS s (…).
var exemptBefore = [...]string{"aggregate", "as", "copy", "exists", "function", "into", "of", "prepare", "procedure", "recursive", "references", "routine", "statistics", "table", "view", "with"}

// exemptInCreate are more such words in CREATE statements: CREATE INDEX
// i ON t USING btree (a).
var exemptInCreate = [...]string{"on", "using"}

// sqlKeywords are words of the grammar that take a parenthesis without
// being functions (VALUES (…), IN (…), OVER (…), numeric(10,2), …).
// Sorted, lower case.
var sqlKeywords = [...]string{
	"all", "analyse", "analyze", "and", "any", "array", "as", "asc", "at", "bernoulli", "between", "bit",
	"both", "by", "case", "cast", "char", "character", "check", "cluster", "coalesce", "collate",
	"collation", "columns", "conflict", "constraint", "copy", "cross", "cube", "current", "dec", "decimal",
	"default", "delete", "desc", "distinct", "else", "enum", "escape", "except", "exclude", "exists",
	"extract", "fetch", "filter", "first", "float", "following", "for", "foreign", "from", "full",
	"greatest", "group", "grouping", "having", "ilike", "in", "include", "inner", "inout", "insert",
	"intersect", "interval", "into", "is", "join", "key", "lateral", "least", "left", "like", "limit",
	"list", "local", "match", "matched", "materialized", "merge", "national", "natural", "nchar",
	"next", "normalize", "not", "nullif", "nulls", "numeric", "of", "offset", "on", "only", "operator",
	"or", "order", "ordinality", "out", "outer", "over", "overlay", "partition", "passing", "path",
	"position", "preceding", "primary", "range", "recursive", "reindex", "repeatable", "returning",
	"returns", "right", "rollup", "row", "rows", "select", "set", "setof", "sets", "similar", "some",
	"substring", "system", "table", "tablesample", "then", "time", "timestamp", "to", "trailing",
	"treat", "trim", "uescape", "unbounded", "union", "unique", "update", "using", "vacuum", "values",
	"varchar", "variadic", "varying", "verbose", "when", "where", "window", "with", "within",
	"xmlattributes", "xmlconcat", "xmlelement", "xmlexists", "xmlforest", "xmlnamespaces", "xmlparse",
	"xmlpi", "xmlroot", "xmlserialize", "xmltable", "zone",
}

// maxNameLen bounds the names looked up (Postgres' NAMEDATALEN − 1).
const maxNameLen = 63

// inSorted reports whether the lower-cased name is in list (sorted),
// without allocating.
func inSorted(list []string, name []byte) bool {
	if len(name) > maxNameLen {
		return false
	}
	var buf [maxNameLen]byte
	n := copy(buf[:], name)
	for i := 0; i < n; i++ {
		if 'A' <= buf[i] && buf[i] <= 'Z' {
			buf[i] += 'a' - 'A'
		}
	}
	key := buf[:n]
	i := sort.Search(len(list), func(i int) bool { return string(key) <= list[i] })
	return i < len(list) && list[i] == string(key)
}

// call looks at "name(" (the lexer just after the parenthesis): a
// function call, unless the context makes it a relation, type or
// signature. A call of a known built-in without session effects is
// nothing; advisory locks and set_config are read; anything else is
// opaque.
func (st *stmtState) call(q []byte, hist *[4]token, lx *lexer) {
	fn := hist[0]
	name := fn.text(q)
	quoted := fn.kind == tokQuotedIdent
	var schema []byte
	hasSchema := false
	ctx := hist[1]
	switch {
	case !quoted && lastDot(name) >= 0: // pg_catalog.set_config
		i := lastDot(name)
		schema, name, hasSchema = name[:i], name[i+1:], true
	case hist[1].is(q, '.'): // "pg_catalog".set_config, pg_catalog ."x"
		schema, hasSchema, ctx = hist[2].text(q), true, hist[3]
	case hist[1].kind == tokWord && len(hist[1].text(q)) > 0 && hist[1].text(q)[len(hist[1].text(q))-1] == '.': // pg_catalog."set_config"
		s := hist[1].text(q)
		schema, hasSchema, ctx = s[:len(s)-1], true, hist[2]
	}
	if ctx.kind == tokWord {
		c := ctx.text(q)
		for _, e := range exemptBefore {
			if equalFold(c, e) {
				return
			}
		}
		if equalFold(st.word(q, 0), "create") {
			for _, e := range exemptInCreate {
				if equalFold(c, e) {
					return
				}
			}
		}
	}
	if hasSchema && !equalFold(schema, "pg_catalog") {
		st.se.setOpaque() // another schema's function, whatever its name
		return
	}
	if quoted && bytes.ContainsAny(name, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") {
		st.se.setOpaque() // "Lower" is not lower
		return
	}
	eff := &st.se
	switch {
	case equalFold(name, "pg_advisory_lock"), equalFold(name, "pg_advisory_lock_shared"):
		eff.addPin(pinAdvisory)
	case equalFold(name, "pg_try_advisory_lock"), equalFold(name, "pg_try_advisory_lock_shared"):
		// Pinned; verified at release in case it was not acquired.
		eff.addPin(pinAdvisory)
		eff.recheck |= pinAdvisory
	case equalFold(name, "pg_advisory_unlock"), equalFold(name, "pg_advisory_unlock_shared"), equalFold(name, "pg_advisory_unlock_all"):
		// Counting calls cannot tell what is still held (another key, a
		// call that does not run): the server tells at release.
		eff.recheck |= pinAdvisory
	case equalFold(name, "set_config"):
		analyzeSetConfig(eff, lx)
	case quoted && !hasSchema && inSorted(sqlKeywords[:], name):
		eff.setOpaque() // "left"(…) is a function named left, not the keyword
	case inSorted(sqlKeywords[:], name), inSorted(builtinFunctions[:], name):
	default:
		eff.setOpaque()
	}
}

// analyzeSetConfig reads the arguments of set_config(name, value,
// is_local), the lexer positioned after its parenthesis (a copy of it, so
// the outer scan is not moved): is_local literally true is
// transaction-scoped; literally false creates state; anything else (an
// expression, a parameter) is left to verification. A name that is not a
// literal may be anything, role or custom parameter.
func analyzeSetConfig(eff *sqlEffects, lx *lexer) {
	peek := *lx
	depth, arg, argToks := 1, 0, 0
	var nameTok token
	nameKnown := false
	var local token
	localToks := 0
	for depth > 0 {
		t := peek.next()
		if t.kind == tokEOF {
			break
		}
		switch {
		case t.is(peek.src, '('):
			depth++
		case t.is(peek.src, ')'):
			depth--
			if depth == 0 {
				continue
			}
		case t.is(peek.src, ',') && depth == 1:
			arg++
			argToks = 0
			continue
		}
		argToks++
		switch arg {
		case 0:
			nameKnown = argToks == 1 && t.kind == tokString
			nameTok = t
		case 2:
			local = t
			localToks++
		}
	}
	var name []byte
	if nameKnown {
		name = stringValue(nameTok.text(peek.src))
	}
	if nameKnown && equalFold(name, "standard_conforming_strings") || !nameKnown {
		eff.scs = true
	}
	isLocal, isSession := false, false
	if localToks == 1 {
		lv := local.text(peek.src)
		switch local.kind {
		case tokWord:
			isLocal = equalFold(lv, "true") || equalFold(lv, "on")
			isSession = equalFold(lv, "false") || equalFold(lv, "off")
		case tokString:
			v := stringValue(lv)
			isLocal = equalFold(v, "true") || equalFold(v, "t") || equalFold(v, "on") || equalFold(v, "yes") || equalFold(v, "y") || equalFold(v, "1")
			isSession = equalFold(v, "false") || equalFold(v, "f") || equalFold(v, "off") || equalFold(v, "no") || equalFold(v, "n") || equalFold(v, "0")
		}
	}
	switch {
	case isLocal:
	case !isSession:
		// Its scope is known only when it runs; a custom parameter set
		// for the session would be invisible to the check.
		eff.verify, eff.opaque = true, true
	case !nameKnown:
		eff.addPin(pinGUC | pinCustom)
		eff.verify = true
	case isRoleParam(name):
		eff.addPin(pinRole)
	case isCustomParam(name):
		eff.addPin(pinCustom)
	default:
		eff.addPin(pinGUC)
	}
}

// stringValue returns the characters of a simple string literal token
// ('…' or E'…' without escapes that matter for a parameter name), or the
// token itself if it is none.
func stringValue(b []byte) []byte {
	if len(b) >= 3 && (b[0] == 'E' || b[0] == 'e') && b[1] == '\'' {
		b = b[1:]
	}
	if len(b) >= 2 && b[0] == '\'' && b[len(b)-1] == '\'' {
		return b[1 : len(b)-1]
	}
	return b
}

func lastDot(b []byte) int {
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == '.' {
			return i
		}
	}
	return -1
}

// equalFold compares ASCII case-insensitively without allocating.
func equalFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		d := s[i]
		if 'A' <= d && d <= 'Z' {
			d += 'a' - 'A'
		}
		if c != d {
			return false
		}
	}
	return true
}

type tokKind uint8

const (
	tokEOF tokKind = iota
	tokWord
	tokQuotedIdent
	tokString
	tokNumber
	tokPunct
	tokParam
)

// token is a span of the lexer's text; it holds no pointer, so that
// copying tokens is cheap.
type token struct {
	kind       tokKind
	start, end int
}

func (t token) text(src []byte) []byte { return src[t.start:t.end] }

type lexer struct {
	src []byte
	pos int
	// backslashes: standard_conforming_strings is off, so '…' strings
	// take backslash escapes.
	backslashes bool
}

// is reports whether t is the punctuation c.
func (t token) is(src []byte, c byte) bool {
	return t.kind == tokPunct && t.end == t.start+1 && src[t.start] == c
}

func isIdentStart(c byte) bool {
	return c == '_' || ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || c >= 0x80
}

func isIdentChar(c byte) bool { return isIdentStart(c) || ('0' <= c && c <= '9') || c == '$' }

// next returns the next token, skipping whitespace and comments.
func (lx *lexer) next() token {
	s := lx.src
	for lx.pos < len(s) {
		c := s[lx.pos]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f':
			lx.pos++
		case c == '-' && lx.pos+1 < len(s) && s[lx.pos+1] == '-':
			for lx.pos < len(s) && s[lx.pos] != '\n' {
				lx.pos++
			}
		case c == '/' && lx.pos+1 < len(s) && s[lx.pos+1] == '*':
			depth := 0
			for lx.pos < len(s) {
				if s[lx.pos] == '/' && lx.pos+1 < len(s) && s[lx.pos+1] == '*' {
					depth++
					lx.pos += 2
				} else if s[lx.pos] == '*' && lx.pos+1 < len(s) && s[lx.pos+1] == '/' {
					depth--
					lx.pos += 2
					if depth == 0 {
						break
					}
				} else {
					lx.pos++
				}
			}
		default:
			return lx.lexToken()
		}
	}
	return token{kind: tokEOF}
}

func (lx *lexer) lexToken() token {
	s := lx.src
	start := lx.pos
	c := s[start]
	switch {
	case (c == 'E' || c == 'e') && start+1 < len(s) && s[start+1] == '\'':
		lx.pos++
		lx.skipQuoted('\'', true)
		return token{kind: tokString, start: start, end: lx.pos}
	case isIdentStart(c):
		for lx.pos < len(s) && (isIdentChar(s[lx.pos]) || s[lx.pos] == '.') {
			lx.pos++
		}
		return token{kind: tokWord, start: start, end: lx.pos}
	case c == '\'':
		lx.skipQuoted('\'', lx.backslashes)
		return token{kind: tokString, start: start, end: lx.pos}
	case c == '"':
		lx.skipQuoted('"', false)
		return token{kind: tokQuotedIdent, start: start + 1, end: max(start+1, lx.pos-1)}
	case c == '$':
		// $1 parameter, or $tag$ … $tag$ dollar quoting.
		j := start + 1
		for j < len(s) && isIdentChar(s[j]) && s[j] != '$' {
			j++
		}
		if j < len(s) && s[j] == '$' && (j == start+1 || !('0' <= s[start+1] && s[start+1] <= '9')) {
			tag := s[start : j+1]
			lx.pos = j + 1
			for lx.pos < len(s) {
				if s[lx.pos] == '$' && hasPrefix(s[lx.pos:], tag) {
					lx.pos += len(tag)
					return token{kind: tokString, start: start, end: lx.pos}
				}
				lx.pos++
			}
			return token{kind: tokString, start: start, end: lx.pos}
		}
		lx.pos = j
		return token{kind: tokParam, start: start, end: lx.pos}
	case '0' <= c && c <= '9':
		for lx.pos < len(s) && (('0' <= s[lx.pos] && s[lx.pos] <= '9') || s[lx.pos] == '.' || s[lx.pos] == 'e' || s[lx.pos] == 'E') {
			lx.pos++
		}
		return token{kind: tokNumber, start: start, end: lx.pos}
	}
	lx.pos++
	return token{kind: tokPunct, start: start, end: lx.pos}
}

// skipQuoted moves past a quoted string starting at lx.pos (the opening
// quote); a doubled quote is an escaped quote, and with backslashes so is
// \'.
func (lx *lexer) skipQuoted(q byte, backslashes bool) {
	s := lx.src
	lx.pos++
	for lx.pos < len(s) {
		c := s[lx.pos]
		if backslashes && c == '\\' {
			lx.pos += 2
			continue
		}
		if c == q {
			if lx.pos+1 < len(s) && s[lx.pos+1] == q {
				lx.pos += 2
				continue
			}
			lx.pos++
			return
		}
		lx.pos++
	}
	if lx.pos > len(s) {
		lx.pos = len(s)
	}
}

func hasPrefix(b, p []byte) bool {
	if len(b) < len(p) {
		return false
	}
	for i := range p {
		if b[i] != p[i] {
			return false
		}
	}
	return true
}

// parseDeallocate recognises a query text that is exactly one
// "DEALLOCATE [PREPARE] name" statement and returns the name as Postgres
// reads it (unquoted names fold to lower case).
func parseDeallocate(q []byte) (string, bool) {
	lx := lexer{src: q}
	t := lx.next()
	if t.kind != tokWord || !equalFold(t.text(q), "deallocate") {
		return "", false
	}
	t = lx.next()
	if t.kind == tokWord && equalFold(t.text(q), "prepare") {
		t = lx.next()
	}
	var name string
	switch t.kind {
	case tokWord:
		if equalFold(t.text(q), "all") {
			return "", false
		}
		name = lowerASCII(string(t.text(q)))
	case tokQuotedIdent:
		name = string(bytes.ReplaceAll(t.text(q), []byte(`""`), []byte(`"`)))
	default:
		return "", false
	}
	t = lx.next()
	if t.kind == tokPunct && t.text(q)[0] == ';' {
		t = lx.next()
	}
	return name, t.kind == tokEOF
}

// parseDatabaseDDL returns the database a statement needs free of other
// connections: the one DROP DATABASE drops, ALTER DATABASE renames, or
// CREATE DATABASE copies (its TEMPLATE, template1 by default).
func parseDatabaseDDL(q []byte) (string, bool) {
	lx := lexer{src: q}
	first := lx.next()
	if first.kind != tokWord || lx.next().kind != tokWord { // … DATABASE
		return "", false
	}
	name := func(t token) (string, bool) {
		switch t.kind {
		case tokWord:
			return lowerASCII(string(t.text(q))), true
		case tokQuotedIdent:
			return unquoteIdent(t.text(q)), true
		}
		return "", false
	}
	switch {
	case equalFold(first.text(q), "drop"):
		t := lx.next()
		if t.kind == tokWord && equalFold(t.text(q), "if") {
			lx.next() // EXISTS
			t = lx.next()
		}
		return name(t)
	case equalFold(first.text(q), "alter"):
		target, ok := name(lx.next())
		if t := lx.next(); !ok || t.kind != tokWord || !equalFold(t.text(q), "rename") {
			return "", false
		}
		return target, true
	case equalFold(first.text(q), "create"):
		for t := lx.next(); t.kind != tokEOF; t = lx.next() {
			if t.kind == tokWord && equalFold(t.text(q), "template") {
				t = lx.next()
				if t.kind == tokPunct && t.text(q)[0] == '=' {
					t = lx.next()
				}
				return name(t)
			}
		}
		return "template1", true
	}
	return "", false
}
