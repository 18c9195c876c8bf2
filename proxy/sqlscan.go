package proxy

// This file finds the statements in a query text that create or drop
// session state, so that transaction pooling pins a client to its server
// connection instead of silently breaking it. It lexes SQL just enough to
// skip strings, quoted identifiers, dollar quotes and comments, without
// allocating.

import "bytes"

// pinKind is a bit set of kinds of session state.
type pinKind uint16

const (
	pinListen   pinKind = 1 << iota // LISTEN
	pinGUC                          // SET (session) of an unreported parameter, set_config(…, false)
	pinAdvisory                     // session-level advisory locks
	pinTemp                         // temporary tables, views, sequences
	pinPrepare                      // SQL PREPARE
	pinCursor                       // DECLARE … WITH HOLD
	pinLoad                         // LOAD of a library: never undone
	pinRole                         // SET ROLE / SET SESSION AUTHORIZATION
	pinProtocol                     // a protocol-level named prepared statement (until issue-3 tracking)
)

var pinNames = [...]string{"LISTEN", "SET", "advisory lock", "temporary table", "PREPARE", "cursor WITH HOLD", "LOAD", "SET ROLE", "named prepared statement"}

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
	pin         pinKind // state created
	unpin       pinKind // state entirely dropped (UNLISTEN *, RESET ALL, DISCARD ALL, …)
	advisory    int     // session advisory locks taken (+) or released (−)
	discardAll  bool    // DISCARD ALL: every kind of state gone, prepared statements too
	deallocAll  bool    // DEALLOCATE ALL
	dealloc     bool    // a DEALLOCATE of one statement
	listen      bool    // a LISTEN or UNLISTEN
	databaseDDL bool    // DROP DATABASE, ALTER DATABASE … RENAME, CREATE DATABASE
	transaction bool    // the text contains BEGIN/START/COMMIT/… (not used for pinning)
}

// addPin records state created by a statement: an earlier unpin of the
// same kind in the text no longer holds.
func (e *sqlEffects) addPin(k pinKind) {
	e.pin |= k
	e.unpin &^= k
}

// addUnpin records state dropped by a statement.
func (e *sqlEffects) addUnpin(k pinKind) { e.unpin |= k }

// reportedParam reports whether Postgres announces changes of a parameter
// with ParameterStatus, so that the governor can follow it without pinning.
func isRoleParam(name []byte) bool {
	return equalFold(name, "role") || equalFold(name, "session_authorization")
}

func reportedParam(name []byte) bool {
	for _, p := range [...]string{"application_name", "client_encoding", "datestyle", "intervalstyle", "timezone", "standard_conforming_strings", "default_transaction_read_only"} {
		if equalFold(name, p) {
			return true
		}
	}
	return false
}

// scanSQL returns the session-state effects of a query text.
func scanSQL(q []byte) sqlEffects {
	var eff sqlEffects
	lx := lexer{src: q}
	var words [4]token // first words of the current statement
	nw := 0
	var prev token
	inStmt := false
	var stmtStart token
	flags := stmtFlags{}
	endStmt := func() {
		if inStmt {
			analyzeStatement(&eff, words[:nw], flags)
		}
		nw, inStmt, flags = 0, false, stmtFlags{}
	}
	for {
		t := lx.next()
		if t.kind == tokEOF {
			endStmt()
			return eff
		}
		if t.kind == tokPunct && t.text(q)[0] == ';' {
			endStmt()
			prev = token{}
			continue
		}
		if !inStmt {
			inStmt, stmtStart = true, t
			_ = stmtStart
		}
		if nw < len(words) && (t.kind == tokWord || t.kind == tokQuotedIdent || (nw > 0 && t.kind == tokPunct && t.text(q)[0] == '*')) {
			words[nw] = t
			nw++
		} else if nw < len(words) {
			nw = len(words) // stop collecting at the first non-word
		}
		w := t.text(q)
		if t.kind == tokWord {
			switch {
			case equalFold(w, "hold") && prev.kind == tokWord && equalFold(prev.text(q), "with"):
				flags.withHold = true
			case equalFold(w, "drop") && prev.kind == tokWord && equalFold(prev.text(q), "commit"):
				flags.onCommitDrop = true
			case (equalFold(w, "temp") || equalFold(w, "temporary")) && prev.kind == tokWord && equalFold(prev.text(q), "into"):
				flags.intoTemp = true
			}
		}
		if t.kind == tokPunct && w[0] == '(' && (prev.kind == tokWord || prev.kind == tokQuotedIdent) {
			analyzeCall(&eff, prev.text(q), &lx)
		}
		prev = t
	}
}

type stmtFlags struct{ withHold, onCommitDrop, intoTemp bool }

func (lx *lexer) word(t token) []byte { return t.text(lx.src) }

func analyzeStatement(eff *sqlEffects, words []token, f stmtFlags) {
	if len(words) == 0 {
		return
	}
	src := words[0].src
	w := func(i int) []byte {
		if i < len(words) {
			return words[i].text(src)
		}
		return nil
	}
	first := w(0)
	switch {
	case equalFold(first, "set"):
		switch {
		case equalFold(w(1), "local"), equalFold(w(1), "transaction"):
			// Transaction-scoped.
		default:
			i := 1
			if equalFold(w(1), "session") { // SET SESSION x is SET x
				i = 2
			}
			switch name := w(i); {
			case equalFold(name, "characteristics"):
				eff.addPin(pinGUC)
			case equalFold(name, "time") && equalFold(w(i+1), "zone"), equalFold(name, "names"):
				// TimeZone and client_encoding are reported parameters.
			case isRoleParam(name), i == 2 && equalFold(name, "authorization"),
				equalFold(name, "session") && equalFold(w(i+1), "authorization"):
				// RESET ALL does not reset these (GUC_NO_RESET_ALL): only
				// DISCARD ALL (or the client leaving) ends this pin.
				eff.addPin(pinRole)
			case !reportedParam(name):
				eff.addPin(pinGUC)
			}
		}
	case equalFold(first, "reset"):
		if equalFold(w(1), "all") {
			eff.addUnpin(pinGUC)
		}
	case equalFold(first, "listen"):
		eff.addPin(pinListen)
		eff.listen = true
	case equalFold(first, "unlisten"):
		eff.listen = true
		if len(w(1)) == 1 && w(1)[0] == '*' {
			eff.addUnpin(pinListen)
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
		}
	case equalFold(first, "declare"):
		if f.withHold {
			eff.addPin(pinCursor)
		}
	case equalFold(first, "close"):
		if equalFold(w(1), "all") {
			eff.addUnpin(pinCursor)
		}
	case equalFold(first, "create"):
		i := 1
		if equalFold(w(i), "or") && equalFold(w(i+1), "replace") {
			i += 2
		}
		if equalFold(w(i), "global") || equalFold(w(i), "local") {
			i++
		}
		if (equalFold(w(i), "temp") || equalFold(w(i), "temporary")) && !f.onCommitDrop {
			eff.addPin(pinTemp)
		}
	case equalFold(first, "select"), equalFold(first, "with"):
		if f.intoTemp {
			eff.addPin(pinTemp)
		}
	case equalFold(first, "discard"):
		switch {
		case equalFold(w(1), "all"):
			eff.addUnpin(pinListen | pinGUC | pinAdvisory | pinTemp | pinPrepare | pinCursor | pinRole)
			eff.discardAll = true
		case equalFold(w(1), "temp"), equalFold(w(1), "temporary"):
			eff.addUnpin(pinTemp)
		}
	case equalFold(first, "load"):
		eff.addPin(pinLoad)
	case equalFold(first, "begin"), equalFold(first, "start"), equalFold(first, "commit"),
		equalFold(first, "end"), equalFold(first, "rollback"), equalFold(first, "abort"):
		eff.transaction = true
	}
}

// analyzeCall looks at a function call whose name is fn, with the lexer
// positioned just after its opening parenthesis.
func analyzeCall(eff *sqlEffects, fn []byte, lx *lexer) {
	name := fn
	if i := lastDot(name); i >= 0 { // pg_catalog.pg_advisory_lock
		name = name[i+1:]
	}
	switch {
	case equalFold(name, "pg_advisory_lock"), equalFold(name, "pg_advisory_lock_shared"),
		equalFold(name, "pg_try_advisory_lock"), equalFold(name, "pg_try_advisory_lock_shared"):
		eff.addPin(pinAdvisory)
		eff.advisory++
	case equalFold(name, "pg_advisory_unlock"), equalFold(name, "pg_advisory_unlock_shared"):
		eff.advisory--
	case equalFold(name, "pg_advisory_unlock_all"):
		eff.addUnpin(pinAdvisory)
	case equalFold(name, "set_config"):
		// set_config(name, value, is_local): only is_local = true is
		// transaction-scoped. Peek at the third argument without consuming
		// the tokens (nested calls in the arguments are rare; a copy of the
		// lexer keeps the outer scan intact).
		peek := *lx
		depth, arg := 1, 0
		local, role := false, false
		for depth > 0 {
			t := peek.next()
			if t.kind == tokEOF {
				break
			}
			tx := t.text(peek.src)
			switch {
			case t.kind == tokPunct && tx[0] == '(':
				depth++
			case t.kind == tokPunct && tx[0] == ')':
				depth--
			case t.kind == tokPunct && tx[0] == ',' && depth == 1:
				arg++
			case arg == 0 && depth == 1 && t.kind == tokString && isRoleParam(stripQuotes(tx)):
				role = true
			case arg == 2 && depth == 1 && t.kind == tokWord && (equalFold(tx, "true") || equalFold(tx, "on")):
				local = true
			case arg == 2 && depth == 1 && t.kind == tokString && (equalFold(stripQuotes(tx), "true") || equalFold(stripQuotes(tx), "t") || equalFold(stripQuotes(tx), "on")):
				local = true
			}
		}
		switch {
		case local:
		case role:
			eff.addPin(pinRole)
		default:
			eff.addPin(pinGUC)
		}
	}
}

func stripQuotes(b []byte) []byte {
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

type token struct {
	kind       tokKind
	src        []byte
	start, end int
}

func (t token) text(src []byte) []byte { return src[t.start:t.end] }

type lexer struct {
	src []byte
	pos int
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
	return token{kind: tokEOF, src: s}
}

func (lx *lexer) lexToken() token {
	s := lx.src
	start := lx.pos
	c := s[start]
	switch {
	case (c == 'E' || c == 'e') && start+1 < len(s) && s[start+1] == '\'':
		lx.pos++
		lx.skipQuoted('\'', true)
		return token{kind: tokString, src: s, start: start, end: lx.pos}
	case isIdentStart(c):
		for lx.pos < len(s) && (isIdentChar(s[lx.pos]) || s[lx.pos] == '.') {
			lx.pos++
		}
		return token{kind: tokWord, src: s, start: start, end: lx.pos}
	case c == '\'':
		lx.skipQuoted('\'', false)
		return token{kind: tokString, src: s, start: start, end: lx.pos}
	case c == '"':
		lx.skipQuoted('"', false)
		return token{kind: tokQuotedIdent, src: s, start: start + 1, end: max(start+1, lx.pos-1)}
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
					return token{kind: tokString, src: s, start: start, end: lx.pos}
				}
				lx.pos++
			}
			return token{kind: tokString, src: s, start: start, end: lx.pos}
		}
		lx.pos = j
		return token{kind: tokParam, src: s, start: start, end: lx.pos}
	case '0' <= c && c <= '9':
		for lx.pos < len(s) && (('0' <= s[lx.pos] && s[lx.pos] <= '9') || s[lx.pos] == '.' || s[lx.pos] == 'e' || s[lx.pos] == 'E') {
			lx.pos++
		}
		return token{kind: tokNumber, src: s, start: start, end: lx.pos}
	}
	lx.pos++
	return token{kind: tokPunct, src: s, start: start, end: lx.pos}
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
