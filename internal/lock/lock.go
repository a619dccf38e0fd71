// Package lock serialises changes to the pinned state with flock(2) on the
// pin directory: exclusive to change it, shared to read it. The CLI and the
// daemon can therefore run side by side.
package lock

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Dir is a held lock on a directory.
type Dir struct {
	f *os.File
}

// Exclusive blocks until it holds an exclusive lock on dir.
func Exclusive(dir string) (*Dir, error) { return lockDir(dir, unix.LOCK_EX) }

// Shared blocks until it holds a shared lock on dir.
func Shared(dir string) (*Dir, error) { return lockDir(dir, unix.LOCK_SH) }

func lockDir(dir string, how int) (*Dir, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	for {
		err = unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return &Dir{f: f}, nil
}

// Unlock releases the lock. It is safe to call on nil.
func (d *Dir) Unlock() error {
	if d == nil || d.f == nil {
		return nil
	}
	err := d.f.Close() // closing the last fd releases the flock
	d.f = nil
	return err
}
