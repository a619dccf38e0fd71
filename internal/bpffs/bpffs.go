// Package bpffs makes sure a pin directory lives on a BPF filesystem,
// mounting bpffs at its usual place when it is absent.
package bpffs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// DefaultRoot is where bpffs is usually mounted.
const DefaultRoot = "/sys/fs/bpf"

// DefaultPinDir is the pin directory used unless --bpffs-dir or the
// SOCKBYPASS_BPFFS_DIR environment variable names another.
const DefaultPinDir = DefaultRoot + "/sockbypass"

// EnvPinDir names the environment variable that overrides DefaultPinDir.
const EnvPinDir = "SOCKBYPASS_BPFFS_DIR"

// PinDir returns flagValue if set, else $SOCKBYPASS_BPFFS_DIR if set, else
// DefaultPinDir.
func PinDir(flagValue string) string {
	if flagValue != "" {
		return filepath.Clean(flagValue)
	}
	if v := os.Getenv(EnvPinDir); v != "" {
		return filepath.Clean(v)
	}
	return DefaultPinDir
}

// IsBPFFS reports whether path is on a BPF filesystem.
func IsBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, err
	}
	return st.Type == unix.BPF_FS_MAGIC, nil
}

// Ensure makes sure dir can hold pins: the nearest existing ancestor of dir
// must be on bpffs. When that ancestor is DefaultRoot and nothing is mounted
// there, bpffs is mounted on it. Ensure does not create dir itself. Errors
// name dir and say how to fix it.
func Ensure(dir string) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("pin directory %q must be an absolute path under a bpf filesystem such as %s", dir, DefaultRoot)
	}
	existing := dir
	for {
		if _, err := os.Stat(existing); err == nil {
			break
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("pin directory %s: %w", dir, err)
		}
		parent := filepath.Dir(existing)
		if parent == existing {
			break
		}
		existing = parent
	}
	ok, err := IsBPFFS(existing)
	if err != nil {
		return fmt.Errorf("pin directory %s: %w", dir, err)
	}
	if ok {
		return nil
	}
	if existing != DefaultRoot {
		return fmt.Errorf("pin directory %s is not on a bpf filesystem (%s is not bpffs): choose a --bpffs-dir under %s, or mount one with: mount -t bpf bpf %s", dir, existing, DefaultRoot, existing)
	}
	if err := unix.Mount("bpf", DefaultRoot, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("bpffs is not mounted at %s and mounting it failed: %w; mount it with: mount -t bpf bpf %s (needs CAP_SYS_ADMIN)", DefaultRoot, err, DefaultRoot)
	}
	return nil
}
