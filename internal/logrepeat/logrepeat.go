// Package logrepeat keeps repeated warnings out of the log: the daemon's
// rescan runs every few seconds, and a failure that persists must be said
// once, not at every rescan.
package logrepeat

import (
	"sync"

	"go.uber.org/zap"
)

// Warner logs a warning about a subject (a cgroup, a node-wide step)
// at Warn the first time and whenever its error changes, and at Debug
// while the same error repeats: the daemon's rescan runs every few
// seconds, and one pod whose listeners cannot be read must not flood the
// log with the same line. Clear forgets a subject once it succeeds, so a
// new failure warns again.
type Warner struct {
	mu   sync.Mutex
	last map[string]string
}

// Warn logs msg with err about subject: at Warn when it is new for the
// subject, else at Debug.
func (w *Warner) Warn(log *zap.Logger, subject, msg string, err error, fields ...zap.Field) {
	w.mu.Lock()
	if w.last == nil {
		w.last = map[string]string{}
	}
	repeated := w.last[subject] == err.Error()
	w.last[subject] = err.Error()
	w.mu.Unlock()
	fields = append(fields, zap.Error(err))
	if repeated {
		log.Debug(msg+" (repeated)", fields...)
		return
	}
	log.Warn(msg, fields...)
}

// Clear forgets subject's last warning.
func (w *Warner) Clear(subject string) {
	w.mu.Lock()
	delete(w.last, subject)
	w.mu.Unlock()
}
