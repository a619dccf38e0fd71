// Package listeners finds the TCP listening sockets of processes and
// whether each one blocks, from /proc: the socket inodes of a process's
// file descriptors (/proc/PID/fd), their file flags (/proc/PID/fdinfo) and
// the listening sockets of its network namespace (/proc/PID/net/tcp{,6}).
//
// sockbypass lets an accepted socket join the sockhash only when its
// listener is known to be non-blocking (a blocking recv on a sockhash
// member may return EAGAIN). The sock_ops program records a listener when
// it calls listen(); this package covers listeners that existed before
// `enable`, and servers that make their listener non-blocking after
// listen() (redis, Java NIO).
//
// What reading a process needs: the process in the caller's PID namespace
// (a DaemonSet needs hostPID: cgroup.procs shows other namespaces'
// processes as 0), and, for a process of another uid (a pod with
// runAsUser), CAP_DAC_READ_SEARCH to list /proc/PID/fd and CAP_SYS_PTRACE
// for what the kernel checks with ptrace_may_access: readlink of its fd
// entries, its fdinfo, its ns/net, and pidfd_getfd, by which the network
// namespace cookie is read from the listener itself (SO_NETNS_COOKIE), so
// no setns and no CAP_SYS_ADMIN is needed (measured by
// TestCollectCapabilities).
package listeners

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/nodeaddrs"
)

// Listener is one listening TCP socket.
type Listener struct {
	// NetnsCookie is the cookie of the socket's network namespace.
	NetnsCookie uint64
	// Addr is the local address (the unspecified address for a wildcard
	// listener); IPv4 as an IPv4 address.
	Addr netip.Addr
	// Port is the local port.
	Port uint16
	// NonBlocking reports whether the listener's file has O_NONBLOCK.
	NonBlocking bool
}

// Collect returns the listening TCP sockets held by the processes pids,
// one per endpoint (SO_REUSEPORT siblings: NonBlocking when all are).
// Processes that exit meanwhile are skipped; a process whose /proc entries
// cannot be read for lack of privileges makes Collect return an error that
// wraps os.ErrPermission, with what it found.
func Collect(pids []int) ([]Listener, error) {
	var out []Listener
	var permErr error
	cookies := map[uint64]uint64{}   // netns inode -> cookie
	tables := map[uint64]listenMap{} // netns inode -> listening sockets
	seen := map[string]int{}         // key -> index in out
	for _, pid := range pids {
		found, err := collectPID(pid, cookies, tables)
		if err != nil {
			if errors.Is(err, os.ErrPermission) {
				permErr = fmt.Errorf("read listening sockets of pid %d: %w", pid, err)
			}
			continue
		}
		for _, l := range found {
			k := fmt.Sprint(l.NetnsCookie, l.Addr, l.Port)
			i, dup := seen[k]
			if !dup {
				seen[k] = len(out)
				out = append(out, l)
				continue
			}
			// SO_REUSEPORT siblings share one entry: non-blocking
			// only when every one is.
			out[i].NonBlocking = out[i].NonBlocking && l.NonBlocking
		}
	}
	return out, permErr
}

// listenMap is socket inode -> local address of a listening socket.
type listenMap map[uint64]netip.AddrPort

func collectPID(pid int, cookies map[uint64]uint64, tables map[uint64]listenMap) ([]Listener, error) {
	proc := "/proc/" + strconv.Itoa(pid)
	fds, err := socketFDs(proc)
	if err != nil || len(fds) == 0 {
		return nil, err
	}
	// The threads of a process may be in several network namespaces (a
	// thread that entered a pod's namespace): read the listening sockets
	// of each, by thread.
	tasks, err := os.ReadDir(proc + "/task")
	if err != nil {
		return nil, err
	}
	owner := map[uint64]uint64{}  // socket inode -> netns inode
	nsPath := map[uint64]string{} // netns inode -> its /proc path
	addrs := map[uint64]netip.AddrPort{}
	for _, task := range tasks {
		tdir := proc + "/task/" + task.Name()
		var st unix.Stat_t
		if err := unix.Stat(tdir+"/ns/net", &st); err != nil {
			if errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
				// Another uid's namespace: CAP_SYS_PTRACE.
				return nil, &os.PathError{Op: "stat", Path: tdir + "/ns/net", Err: err}
			}
			continue // exited meanwhile
		}
		table, ok := tables[st.Ino]
		if !ok {
			table = listenMap{}
			for _, f := range []string{"/net/tcp", "/net/tcp6"} {
				if err := readListening(tdir+f, table); err != nil && !errors.Is(err, os.ErrNotExist) {
					return nil, err
				}
			}
			tables[st.Ino] = table
		}
		if _, ok := nsPath[st.Ino]; !ok {
			nsPath[st.Ino] = tdir + "/ns/net"
		}
		for ino, ap := range table {
			owner[ino], addrs[ino] = st.Ino, ap
		}
	}
	var out []Listener
	for fd, ino := range fds {
		ap, ok := addrs[ino]
		if !ok {
			continue
		}
		flags, err := fileFlags(proc + "/fdinfo/" + fd)
		if err != nil {
			if errors.Is(err, os.ErrPermission) {
				return nil, err
			}
			continue // closed meanwhile
		}
		netns := owner[ino]
		cookie, ok := cookies[netns]
		if !ok {
			if cookie, err = listenerNetnsCookie(pid, fd, nsPath[netns]); err != nil {
				if errors.Is(err, os.ErrPermission) {
					return nil, err
				}
				continue // closed meanwhile
			}
			cookies[netns] = cookie
		}
		out = append(out, Listener{NetnsCookie: cookie, Addr: ap.Addr(), Port: ap.Port(), NonBlocking: flags&unix.O_NONBLOCK != 0})
	}
	return out, nil
}

// socketFDs returns fd number -> socket inode for the sockets of a process.
func socketFDs(proc string) (map[string]uint64, error) {
	entries, err := os.ReadDir(proc + "/fd")
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	for _, e := range entries {
		target, err := os.Readlink(proc + "/fd/" + e.Name())
		if errors.Is(err, os.ErrPermission) {
			// Listing needs CAP_DAC_READ_SEARCH, readlink
			// CAP_SYS_PTRACE (another uid's process): without the
			// second, every entry is refused.
			return nil, err
		}
		if err != nil || !strings.HasPrefix(target, "socket:[") {
			continue
		}
		ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]"), 10, 64)
		if err == nil {
			out[e.Name()] = ino
		}
	}
	return out, nil
}

// fileFlags reads the "flags:" line (octal) of /proc/PID/fdinfo/FD.
func fileFlags(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			f, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
			return int(f), err
		}
	}
	return 0, fmt.Errorf("%s: no flags line", path)
}

// tcpListen is the st column of a listening socket in /proc/net/tcp.
const tcpListen = "0A"

// readListening adds the listening sockets of a /proc/net/tcp{,6} table.
func readListening(path string, out listenMap) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[3] != tcpListen {
			continue
		}
		ap, err := ParseProcAddr(fields[1])
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		ino, err := strconv.ParseUint(fields[9], 10, 64)
		if err != nil {
			return fmt.Errorf("%s: inode %q: %w", path, fields[9], err)
		}
		out[ino] = ap
	}
	return sc.Err()
}

// ParseProcAddr parses an address of /proc/net/tcp ("0100007F:1F90") or
// /proc/net/tcp6 (32 hex digits, four 32-bit words in host byte order).
// IPv4-mapped IPv6 addresses are returned as IPv4.
func ParseProcAddr(s string) (netip.AddrPort, error) {
	host, port, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("address %q: no port", s)
	}
	p, err := strconv.ParseUint(port, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("address %q: port: %w", s, err)
	}
	raw, err := hex.DecodeString(host)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("address %q: not 4 or 16 hex bytes", s)
	}
	// Each 32-bit word is printed in host byte order (little endian).
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr.Unmap(), uint16(p)), nil
}

// listenerNetnsCookie returns the cookie of the network namespace of the
// socket that process pid holds as fd: read from the socket itself
// (SO_NETNS_COOKIE on a copy taken with pidfd_getfd, which needs only
// CAP_SYS_PTRACE for another uid's process), else by entering the
// namespace at nsPath (setns, CAP_SYS_ADMIN). An error wraps
// os.ErrPermission when both were refused.
func listenerNetnsCookie(pid int, fd, nsPath string) (uint64, error) {
	cookie, err := socketNetnsCookie(pid, fd)
	if err == nil {
		return cookie, nil
	}
	cookie, nsErr := netnsCookie(nsPath)
	if nsErr == nil {
		return cookie, nil
	}
	if errors.Is(err, os.ErrPermission) && (errors.Is(nsErr, os.ErrPermission) || errors.Is(nsErr, unix.EPERM)) {
		return 0, fmt.Errorf("netns cookie of pid %d fd %s: %w (and %v)", pid, fd, err, nsErr)
	}
	return 0, errors.Join(err, nsErr)
}

// socketNetnsCookie reads SO_NETNS_COOKIE of the socket that process pid
// holds as fd, through a copy of it (pidfd_getfd), closed at once.
func socketNetnsCookie(pid int, fd string) (uint64, error) {
	target, err := strconv.Atoi(fd)
	if err != nil {
		return 0, err
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return 0, os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	sock, err := unix.PidfdGetfd(pidfd, target, 0)
	if err != nil {
		return 0, os.NewSyscallError("pidfd_getfd", err)
	}
	defer unix.Close(sock)
	cookie, err := unix.GetsockoptUint64(sock, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	return cookie, os.NewSyscallError("getsockopt SO_NETNS_COOKIE", err)
}

// netnsCookie returns the cookie of the network namespace at path.
func netnsCookie(path string) (uint64, error) {
	netns, err := ns.GetNS(path)
	if err != nil {
		return 0, err
	}
	defer netns.Close()
	var cookie uint64
	err = netns.Do(func(ns.NetNS) error {
		var err error
		cookie, err = nodeaddrs.NetnsCookie()
		return err
	})
	return cookie, err
}
