package lock

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// OwnerDir holds the ownership markers of running daemons: bpffs holds
// only pins and directories, so the marker of a pin directory lives here,
// named after it (DaemonMarker).
const OwnerDir = "/run/sockbypass"

// DaemonInfo is what a daemon's marker says about it.
type DaemonInfo struct {
	// Pid is the daemon's process id.
	Pid int
	// PinDir is the pin directory it manages.
	PinDir string
	// Config is its configuration: a file, or its --cgroup flags.
	Config string
	// Marker is the marker file.
	Marker string
}

// Owner is a running daemon's claim on a pin directory: its marker file,
// held under an exclusive flock for as long as the daemon runs, so a
// daemon killed with SIGKILL leaves no claim (a marker nobody holds is
// stale).
type Owner struct {
	f    *os.File
	path string
}

// DaemonMarker returns the marker file of the daemon that manages pinDir.
func DaemonMarker(pinDir string) string {
	sum := sha256.Sum256([]byte(filepath.Clean(pinDir)))
	return filepath.Join(OwnerDir, "daemon-"+hex.EncodeToString(sum[:8])+".pid")
}

// ClaimDaemon records this process as the daemon that manages pinDir
// with config (written into the marker for the CLI to name). It fails,
// naming the other daemon, while another live daemon holds the claim.
func ClaimDaemon(pinDir, config string) (*Owner, error) {
	if err := os.MkdirAll(OwnerDir, 0o755); err != nil {
		return nil, fmt.Errorf("create %s for the daemon's ownership marker: %w", OwnerDir, err)
	}
	path := DaemonMarker(pinDir)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open the daemon's ownership marker %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			if info, ok, _ := DaemonOwner(pinDir); ok {
				return nil, fmt.Errorf("another sockbypass daemon (pid %d, %s) already manages %s: stop it first, or give this one another --bpffs-dir", info.Pid, info.Config, pinDir)
			}
			return nil, fmt.Errorf("another sockbypass daemon already manages %s (it holds %s): stop it first", pinDir, path)
		}
		return nil, fmt.Errorf("lock the daemon's ownership marker %s: %w", path, err)
	}
	content := fmt.Sprintf("%d\n%s\n%s\n", os.Getpid(), filepath.Clean(pinDir), config)
	if err := f.Truncate(0); err == nil {
		_, err = f.WriteAt([]byte(content), 0)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("write the daemon's ownership marker %s: %w", path, err)
	}
	return &Owner{f: f, path: path}, nil
}

// Release removes the marker and releases the claim. It is safe to call
// on nil.
func (o *Owner) Release() error {
	if o == nil || o.f == nil {
		return nil
	}
	err := os.Remove(o.path)
	if cerr := o.f.Close(); err == nil {
		err = cerr
	}
	o.f = nil
	return err
}

// DaemonOwner returns the live daemon that manages pinDir, and false when
// none does (no marker, or a stale one nobody holds).
func DaemonOwner(pinDir string) (DaemonInfo, bool, error) {
	path := DaemonMarker(pinDir)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return DaemonInfo{}, false, nil
	}
	if err != nil {
		return DaemonInfo{}, false, fmt.Errorf("read the daemon's ownership marker %s: %w", path, err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err == nil {
		return DaemonInfo{}, false, nil // stale: its daemon is gone
	} else if !errors.Is(err, unix.EWOULDBLOCK) {
		return DaemonInfo{}, false, fmt.Errorf("check the daemon's ownership marker %s: %w", path, err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return DaemonInfo{}, false, fmt.Errorf("read the daemon's ownership marker %s: %w", path, err)
	}
	lines := strings.SplitN(string(data), "\n", 4)
	info := DaemonInfo{Marker: path, PinDir: pinDir}
	if len(lines) > 0 {
		info.Pid, _ = strconv.Atoi(lines[0])
	}
	if len(lines) > 2 {
		info.Config = lines[2]
	}
	return info, true, nil
}
