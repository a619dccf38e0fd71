// Package cgroup finds the cgroup v2 hierarchy and resolves the cgroups that
// users name on the command line.
//
// The cgroup v2 mount point differs between machines (/sys/fs/cgroup on a
// unified layout, /sys/fs/cgroup/unified on a hybrid one), so it is always
// read from /proc/self/mountinfo, never assumed.
package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrNoCgroup2 is returned when no cgroup v2 hierarchy is mounted.
var ErrNoCgroup2 = errors.New("no cgroup v2 hierarchy is mounted (mount one with: mount -t cgroup2 none /sys/fs/cgroup)")

// ErrNotExist is wrapped by Resolve when the named cgroup does not exist.
var ErrNotExist = errors.New("cgroup does not exist")

// Mounts describes where the cgroup hierarchies are mounted.
type Mounts struct {
	// V2 is the mount point of the cgroup v2 hierarchy, "" when none.
	V2 string
	// V1 maps each cgroup v1 mount point to its options (the controllers).
	V1 map[string]string
}

// Cgroup is a resolved cgroup v2 directory.
type Cgroup struct {
	// Path is the absolute, cleaned path of the cgroup directory.
	Path string
	// Rel is the path relative to the cgroup v2 mount ("/" for the root).
	Rel string
	// ID is the cgroup id: the inode number of its directory, the value
	// that bpf_get_current_cgroup_id and link info report.
	ID uint64
}

// String returns the cgroup's absolute path.
func (c Cgroup) String() string { return c.Path }

// ReadMounts parses /proc/self/mountinfo.
func ReadMounts() (Mounts, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return Mounts{}, fmt.Errorf("read mount table: %w", err)
	}
	defer f.Close()
	return ParseMountinfo(f)
}

// ParseMountinfo parses a mountinfo table (proc(5)) and returns where the
// cgroup hierarchies are mounted. When cgroup2 is mounted more than once the
// first mount wins.
func ParseMountinfo(r io.Reader) (Mounts, error) {
	m := Mounts{V1: map[string]string{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || len(fields) < sep+3 {
			continue
		}
		mountPoint := unescapeMountinfo(fields[4])
		switch fields[sep+1] {
		case "cgroup2":
			if m.V2 == "" {
				m.V2 = mountPoint
			}
		case "cgroup":
			m.V1[mountPoint] = fields[sep+3]
		}
	}
	if err := sc.Err(); err != nil {
		return Mounts{}, fmt.Errorf("parse mount table: %w", err)
	}
	return m, nil
}

// unescapeMountinfo undoes the octal escapes (\040 for space, ...) that the
// kernel writes into mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Resolve resolves arg to a cgroup v2 directory using the mounts of this
// process. See Mounts.Resolve.
func Resolve(arg string) (Cgroup, error) {
	m, err := ReadMounts()
	if err != nil {
		return Cgroup{}, err
	}
	return m.Resolve(arg)
}

// Resolve resolves arg, an absolute path inside the cgroup v2 mount or a
// path relative to it, to an existing cgroup v2 directory. Paths in a cgroup
// v1 hierarchy, paths outside any cgroup hierarchy, paths that escape the
// mount with "..", and cgroups that do not exist are refused with an error
// that names arg and says what to do.
func (m Mounts) Resolve(arg string) (Cgroup, error) {
	if m.V2 == "" {
		return Cgroup{}, ErrNoCgroup2
	}
	if strings.TrimSpace(arg) == "" {
		return Cgroup{}, fmt.Errorf("empty cgroup path: give a cgroup v2 directory, absolute or relative to %s", m.V2)
	}
	var abs string
	if filepath.IsAbs(arg) {
		abs = filepath.Clean(arg)
	} else {
		rel := filepath.Clean(arg)
		if rel == ".." || strings.HasPrefix(rel, "../") {
			return Cgroup{}, fmt.Errorf("cgroup %q leaves the cgroup v2 hierarchy at %s: name a cgroup below it", arg, m.V2)
		}
		abs = filepath.Join(m.V2, rel)
	}

	rel, ok := within(m.V2, abs)
	if !ok {
		for mp, opts := range m.V1 {
			if _, in := within(mp, abs); in {
				return Cgroup{}, fmt.Errorf("cgroup %q is in a cgroup v1 hierarchy (%s mounted at %s); sockbypass needs cgroup v2: use the same cgroup under %s", arg, opts, mp, m.V2)
			}
		}
		return Cgroup{}, fmt.Errorf("cgroup %q is not inside the cgroup v2 hierarchy mounted at %s: give a path below it, or relative to it", arg, m.V2)
	}

	var st unix.Stat_t
	if err := unix.Stat(abs, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return Cgroup{}, fmt.Errorf("cgroup %q (%s): %w; create it with: mkdir %s", arg, abs, ErrNotExist, abs)
		}
		return Cgroup{}, fmt.Errorf("cgroup %q: %w", arg, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return Cgroup{}, fmt.Errorf("cgroup %q (%s) is not a directory: name a cgroup directory such as %s", arg, abs, filepath.Dir(abs))
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(abs, &sfs); err != nil {
		return Cgroup{}, fmt.Errorf("cgroup %q: %w", arg, err)
	}
	if sfs.Type != unix.CGROUP2_SUPER_MAGIC {
		return Cgroup{}, fmt.Errorf("cgroup %q (%s) is not on a cgroup2 filesystem: use a directory under %s", arg, abs, m.V2)
	}
	return Cgroup{Path: abs, Rel: rel, ID: st.Ino}, nil
}

// within reports whether path is mount or below it, and its path relative
// to mount ("/" for mount itself).
func within(mount, path string) (string, bool) {
	if path == mount {
		return "/", true
	}
	prefix := strings.TrimSuffix(mount, "/") + "/"
	if strings.HasPrefix(path, prefix) {
		return "/" + strings.TrimPrefix(path, prefix), true
	}
	return "", false
}

// PathByID finds the directory of the cgroup with the given id below the
// cgroup v2 mount. It returns "" and no error when no cgroup has that id
// (it was removed).
func (m Mounts) PathByID(id uint64) (string, error) {
	paths, err := m.PathsByID([]uint64{id})
	if err != nil {
		return "", err
	}
	return paths[id], nil
}

// RunIn runs fn with this process moved into c, then moves it back to the
// cgroup v2 group it was in. Sockets that fn creates belong to c for their
// whole life, and so do the sockets that listeners created in fn accept.
// The move applies to the whole process: do not create sockets elsewhere in
// the process while fn runs.
func (c Cgroup) RunIn(fn func()) (err error) {
	mounts, err := ReadMounts()
	if err != nil {
		return err
	}
	orig, err := mounts.selfPath()
	if err != nil {
		return err
	}
	if err := moveProcess(c.Path); err != nil {
		return fmt.Errorf("move this process into %s: %w", c.Path, err)
	}
	// Deferred so that the process moves back even when fn panics or
	// calls runtime.Goexit (t.Fatal).
	defer func() {
		if backErr := moveProcess(orig); backErr != nil && err == nil {
			err = fmt.Errorf("move this process back to %s: %w", orig, backErr)
		}
	}()
	fn()
	return nil
}

func (m Mounts) selfPath() (string, error) {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rel, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(m.V2, rel), nil
		}
	}
	return "", fmt.Errorf("this process has no cgroup v2 membership in /proc/self/cgroup")
}

func moveProcess(dir string) error {
	return os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
}

// PathsByID finds the directories of the cgroups with the given ids in one
// walk of the cgroup v2 hierarchy. Ids of removed cgroups are absent from
// the result.
func (m Mounts) PathsByID(ids []uint64) (map[uint64]string, error) {
	out := map[uint64]string{}
	if len(ids) == 0 {
		return out, nil
	}
	if m.V2 == "" {
		return nil, ErrNoCgroup2
	}
	want := map[uint64]bool{}
	for _, id := range ids {
		want[id] = true
	}
	errDone := errors.New("done")
	err := walkCgroups(m.V2, func(path string) error {
		var st unix.Stat_t
		if unix.Stat(path, &st) == nil && want[st.Ino] {
			out[st.Ino] = path
			if len(out) == len(want) {
				return errDone
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, errDone) {
		return nil, fmt.Errorf("look up cgroup ids: %w", err)
	}
	return out, nil
}

// Procs returns the pids of the processes in c and in the cgroups below it.
func (c Cgroup) Procs() ([]int, error) {
	var pids []int
	err := walkCgroups(c.Path, func(path string) error {
		data, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			return nil // removed meanwhile
		}
		for _, f := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids, err
}

// walkCgroups calls fn for root and every cgroup directory below it,
// skipping cgroups removed while it walks.
func walkCgroups(root string, fn func(path string) error) error {
	return filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		return fn(path)
	})
}
