package logrepeat

import (
	"errors"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestWarnerSaysEachFailureOnce: a failure that repeats at every rescan is
// a warning once, then debug; a different error, another subject, or the
// same failure after a success warn again.
func TestWarnerSaysEachFailureOnce(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(core)
	var w Warner
	denied := errors.New("open /proc/42/fd: permission denied")
	gone := errors.New("open /proc/42/fd: no such file or directory")
	steps := []struct {
		subject string
		err     error // nil: the step succeeded
		want    zapcore.Level
	}{
		{"pod-a", denied, zapcore.WarnLevel},
		{"pod-a", denied, zapcore.DebugLevel},
		{"pod-a", denied, zapcore.DebugLevel},
		{"pod-b", denied, zapcore.WarnLevel},
		{"pod-a", gone, zapcore.WarnLevel},
		{"pod-a", gone, zapcore.DebugLevel},
		{"pod-a", nil, 0},
		{"pod-a", gone, zapcore.WarnLevel},
	}
	for i, s := range steps {
		before := logs.Len()
		if s.err == nil {
			w.Clear(s.subject)
			continue
		}
		w.Warn(log, s.subject, "cannot read the listeners", s.err, zap.String("cgroup", s.subject))
		entries := logs.All()[before:]
		if len(entries) != 1 {
			t.Fatalf("step %d: %d log entries, want 1", i, len(entries))
		}
		e := entries[0]
		if e.Level != s.want {
			t.Errorf("step %d (%s, %v): logged at %v, want %v", i, s.subject, s.err, e.Level, s.want)
		}
		if got := e.ContextMap()["error"]; got != s.err.Error() {
			t.Errorf("step %d: error field %v, want %q", i, got, s.err)
		}
	}
}
