package daemon

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// FallbackReporter is a Source that also reports the datapath's fallback
// events on what owns the cgroup (the Kubernetes source writes an Event on
// the pod). The daemon calls it from its event goroutine.
type FallbackReporter interface {
	Fallback(t Target, e dataplane.FallbackEvent)
}

// logBurst is how many fallback events of one reason are logged per
// second; the rest are counted and summed up in the next line logged.
const logBurst = 20

// watchEvents logs every fallback event of the datapath (a connection that
// left the fast path after it was accelerated, a listener whose new
// connections stay plain) with the socket's addresses, cgroup and owner,
// and passes it to the source when it is a FallbackReporter, until ctx is
// done.
func (d *Daemon) watchEvents(ctx context.Context) {
	r, err := d.dp.ReadEvents()
	if err != nil {
		d.log.Warn("fallback events unavailable: connections that leave the fast path are counted only", zap.Error(err))
		return
	}
	go func() {
		<-ctx.Done()
		r.Close()
	}()
	type window struct {
		start           time.Time
		logged, dropped int
	}
	windows := map[string]*window{}
	for {
		e, err := r.Read()
		if err != nil {
			if !errors.Is(err, dataplane.ErrEventsClosed) {
				d.log.Warn("read fallback events", zap.Error(err))
			}
			return
		}
		t := d.owner(e.CgroupID)
		if rep, ok := d.source.(FallbackReporter); ok {
			rep.Fallback(t, e)
		}
		w := windows[e.Reason]
		if now := time.Now(); w == nil || now.Sub(w.start) >= time.Second {
			if w != nil && w.dropped > 0 {
				d.log.Warn("fallback events not logged (rate limit)", zap.String("reason", e.Reason), zap.Int("count", w.dropped))
			}
			w = &window{start: now}
			windows[e.Reason] = w
		}
		if w.logged >= logBurst {
			w.dropped++
			continue
		}
		w.logged++
		fields := []zap.Field{zap.String("reason", e.Reason), zap.Stringer("local", e.Local), zap.Uint64("cgroup_id", e.CgroupID)}
		if e.Remote.IsValid() {
			fields = append(fields, zap.Stringer("remote", e.Remote))
		}
		if e.Option != "" {
			fields = append(fields, zap.String("option", e.Option))
		}
		if t.Cgroup.Path != "" {
			fields = append(fields, zap.String("cgroup", t.Cgroup.Path))
		}
		if t.Owner != "" {
			fields = append(fields, zap.String("owner", t.Owner))
		}
		d.log.Warn(e.String(), fields...)
	}
}

// owner returns the target the last reconcile enabled for the cgroup id
// (zero when none).
func (d *Daemon) owner(id uint64) Target {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.owners[id]
}
