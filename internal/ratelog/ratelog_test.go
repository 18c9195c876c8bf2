package ratelog

import (
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// clock is a manual clock for the tests.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func TestRepeatedWarningsAreCountedNotWritten(t *testing.T) {
	obs, logs := observer.New(zapcore.DebugLevel)
	clk := &clock{t: time.Unix(1000, 0)}
	log := zap.New(NewCore(obs, 10*time.Second, clk.now)).With(zap.String("component", "test"))
	for i := 0; i < 5; i++ {
		log.Warn("no server connection for the client", zap.Int("i", i))
	}
	log.Info("client session ended") // below Warn: never limited
	log.Info("client session ended")
	log.Error("no server connection for the client") // another level: its own count
	clk.t = clk.t.Add(11 * time.Second)
	log.Warn("no server connection for the client", zap.Int("i", 5))

	warns := logs.FilterMessage("no server connection for the client").FilterLevelExact(zapcore.WarnLevel).All()
	if len(warns) != 2 {
		t.Fatalf("warnings written: want = 2 (the first, then one after the interval), got = %d", len(warns))
	}
	if _, ok := warns[0].ContextMap()["skipped"]; ok {
		t.Fatalf("the first warning must not carry a skipped count: %v", warns[0].ContextMap())
	}
	ctx := warns[1].ContextMap()
	if got := ctx["skipped"]; got != int64(4) {
		t.Fatalf("skipped on the warning after the interval: want = 4, got = %v", got)
	}
	if ctx["component"] != "test" || ctx["i"] != int64(5) {
		t.Fatalf("the written warning lost its fields: %v", ctx)
	}
	if n := logs.FilterMessage("client session ended").Len(); n != 2 {
		t.Fatalf("info lines: want = 2, got = %d", n)
	}
	if n := logs.FilterLevelExact(zapcore.ErrorLevel).Len(); n != 1 {
		t.Fatalf("error lines: want = 1, got = %d", n)
	}
}

func TestZeroIntervalWritesEverything(t *testing.T) {
	obs, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(NewCore(obs, 0, nil))
	for i := 0; i < 3; i++ {
		log.Warn("same")
	}
	if logs.Len() != 3 {
		t.Fatalf("with no interval: want = 3 lines, got = %d", logs.Len())
	}
}
