package daemon

import (
	"bytes"
	"context"
	"os"
	"time"
)

// WatchFile sends on changed (without blocking: one pending send is
// enough) whenever the content of the file at path differs from what it
// was at the last look, checked every interval. It follows symlinks, so
// it sees a Kubernetes ConfigMap update, which the kubelet makes by
// swapping the ..data symlink of the volume (the file's own path never
// changes, its inode and mtime may not either). Reading a small file every
// second costs nothing, and unlike inotify it cannot miss a swap made
// while the watch was being re-armed. A file that cannot be read counts
// as a change too (the reload reports why). WatchFile returns when ctx is
// done.
func WatchFile(ctx context.Context, path string, interval time.Duration, changed chan<- struct{}) {
	last, lastErr := os.ReadFile(path)
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		data, err := os.ReadFile(path)
		if (err == nil) == (lastErr == nil) && bytes.Equal(data, last) {
			continue
		}
		last, lastErr = data, err
		select {
		case changed <- struct{}{}:
		default:
		}
	}
}
