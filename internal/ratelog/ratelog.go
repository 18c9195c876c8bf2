// Package ratelog limits repeated warnings and errors in zap logs: a
// message logged again at the same level within an interval is dropped and
// counted, and the next one that is written carries the count in a
// "skipped" field. A storm of identical failures (clients that cannot get
// a server connection while the upstream is down, a flood of bad logins)
// so costs a few lines, not millions, and loses no information about how
// many there were.
package ratelog

import (
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// maxTracked bounds the distinct messages followed at once; beyond it,
// entries are written without limit until old ones expire.
const maxTracked = 1024

// NewCore wraps core so that entries at Warn level and above with the same
// level and message are written at most once per every. Fields do not take
// part in the comparison. now is the clock (time.Now when nil). every <= 0
// returns core unchanged.
func NewCore(core zapcore.Core, every time.Duration, now func() time.Time) zapcore.Core {
	if every <= 0 {
		return core
	}
	if now == nil {
		now = time.Now
	}
	return &limitedCore{Core: core, l: &limiter{every: every, now: now, seen: map[key]*seen{}}}
}

type key struct {
	level   zapcore.Level
	message string
}

type seen struct {
	last    time.Time
	skipped int
}

// limiter is shared by a core and every core derived from it with With.
type limiter struct {
	every time.Duration
	now   func() time.Time

	mu   sync.Mutex
	seen map[key]*seen
}

// allow reports whether an entry may be written now and how many like it
// were dropped since the last one written.
func (l *limiter) allow(k key) (skipped int, ok bool) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.seen[k]
	if s == nil {
		if len(l.seen) >= maxTracked {
			for k, old := range l.seen {
				if now.Sub(old.last) >= l.every && old.skipped == 0 {
					delete(l.seen, k)
				}
			}
			if len(l.seen) >= maxTracked {
				return 0, true
			}
		}
		l.seen[k] = &seen{last: now}
		return 0, true
	}
	if now.Sub(s.last) < l.every {
		s.skipped++
		return 0, false
	}
	skipped, s.skipped, s.last = s.skipped, 0, now
	return skipped, true
}

type limitedCore struct {
	zapcore.Core
	l *limiter
}

func (c *limitedCore) With(fields []zapcore.Field) zapcore.Core {
	return &limitedCore{Core: c.Core.With(fields), l: c.l}
}

func (c *limitedCore) Check(ent zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(ent.Level) {
		return ce.AddCore(ent, c)
	}
	return ce
}

func (c *limitedCore) Write(ent zapcore.Entry, fields []zapcore.Field) error {
	if ent.Level < zapcore.WarnLevel {
		return c.Core.Write(ent, fields)
	}
	skipped, ok := c.l.allow(key{level: ent.Level, message: ent.Message})
	if !ok {
		return nil
	}
	if skipped > 0 {
		fields = append(fields[:len(fields):len(fields)], zap.Int("skipped", skipped))
	}
	return c.Core.Write(ent, fields)
}
