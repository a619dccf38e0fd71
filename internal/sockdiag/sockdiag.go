// Package sockdiag lists the TCP sockets of a network namespace through the
// kernel's socket diagnostics (NETLINK_SOCK_DIAG, the inet_diag interface
// that ss(8) uses): for each socket its addresses, TCP state, inode, cookie,
// cgroup v2 id and, on request, its values in BPF socket-storage maps.
//
// It is a small, self-contained request/parse of the inet_diag dump, written
// here because the netlink library in go.mod (vishvananda/netlink) neither
// asks for BPF socket storage (INET_DIAG_REQ_SK_BPF_STORAGES) nor returns
// the cgroup id (INET_DIAG_CGROUP_ID). The wire format is that of
// include/uapi/linux/inet_diag.h and include/uapi/linux/sock_diag.h:
//
//	request:  nlmsghdr (SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST|NLM_F_DUMP)
//	          struct inet_diag_req_v2 (56 bytes)
//	          [INET_DIAG_REQ_SK_BPF_STORAGES, nested:
//	              SK_DIAG_BPF_STORAGE_REQ_MAP_FD u32, one per map]
//	reply:    one nlmsghdr per socket, then NLMSG_DONE:
//	          struct inet_diag_msg (72 bytes), then attributes:
//	          INET_DIAG_CGROUP_ID u64,
//	          INET_DIAG_SK_BPF_STORAGES, nested: SK_DIAG_BPF_STORAGE, nested:
//	              SK_DIAG_BPF_STORAGE_MAP_ID u32, SK_DIAG_BPF_STORAGE_MAP_VALUE
//
// Dumping BPF socket storage needs CAP_BPF (or CAP_SYS_ADMIN); the rest
// needs no privilege.
package sockdiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TCP states as the kernel numbers them (include/net/tcp_states.h).
const (
	StateEstablished uint8 = 1
	StateSynSent     uint8 = 2
	StateSynRecv     uint8 = 3
	StateFinWait1    uint8 = 4
	StateFinWait2    uint8 = 5
	StateTimeWait    uint8 = 6
	StateClose       uint8 = 7
	StateCloseWait   uint8 = 8
	StateLastAck     uint8 = 9
	StateListen      uint8 = 10
	StateClosing     uint8 = 11
)

var stateNames = map[uint8]string{
	StateEstablished: "ESTABLISHED", StateSynSent: "SYN-SENT", StateSynRecv: "SYN-RECV",
	StateFinWait1: "FIN-WAIT-1", StateFinWait2: "FIN-WAIT-2", StateTimeWait: "TIME-WAIT",
	StateClose: "CLOSE", StateCloseWait: "CLOSE-WAIT", StateLastAck: "LAST-ACK",
	StateListen: "LISTEN", StateClosing: "CLOSING",
}

// StateName returns the name ss(8) gives a TCP state ("ESTABLISHED").
func StateName(s uint8) string {
	if n, ok := stateNames[s]; ok {
		return n
	}
	return fmt.Sprintf("STATE-%d", s)
}

// ConnectedStates is the state mask of sockets that have a peer: every
// state from ESTABLISHED until the socket closes, without TIME-WAIT (a
// time-wait socket has no owner, cgroup or storage left) and without
// SYN-SENT, SYN-RECV and LISTEN.
const ConnectedStates = 1<<StateEstablished | 1<<StateFinWait1 | 1<<StateFinWait2 |
	1<<StateCloseWait | 1<<StateLastAck | 1<<StateClosing

// Socket is one TCP socket as the kernel reports it.
type Socket struct {
	// Family is unix.AF_INET or unix.AF_INET6 (a dual-stack IPv6 socket
	// talking IPv4 is AF_INET6; its addresses are unmapped below).
	Family uint8
	// State is the TCP state (StateEstablished, ...).
	State uint8
	// Local and Remote are the socket's addresses, IPv4-mapped IPv6
	// addresses as IPv4.
	Local, Remote netip.AddrPort
	// Inode is the inode number of the socket's file (what
	// /proc/PID/fd/N links to as socket:[INODE]); 0 for a socket no
	// file holds (orphaned, or not accepted yet).
	Inode uint64
	// Cookie is the socket cookie (SO_COOKIE, bpf_get_socket_cookie).
	Cookie uint64
	// UID is the socket's owner uid.
	UID uint32
	// CgroupID is the id of the socket's cgroup v2 (the inode number of
	// its directory), 0 when the kernel did not report one.
	CgroupID uint64
	// Storages are the socket's values in the BPF socket-storage maps
	// of the request that hold one for it.
	Storages []Storage
	// TCPInfo is the socket's struct tcp_info (INET_DIAG_INFO), when the
	// request asked for it (Request.TCPInfo) and the kernel sent it (the
	// fields the kernel's version lacks read 0).
	TCPInfo *unix.TCPInfo
}

// Storage is a socket's value in one BPF socket-storage map.
type Storage struct {
	// MapID is the kernel id of the map.
	MapID uint32
	// Value is the raw value, as the map's value type lays it out.
	Value []byte
}

// Request says what to dump.
type Request struct {
	// States is the mask of TCP states to list (bit 1<<StateEstablished,
	// ...); 0 lists every state.
	States uint32
	// StorageMapFDs are file descriptors of BPF_MAP_TYPE_SK_STORAGE maps
	// whose values to return with each socket (needs CAP_BPF).
	StorageMapFDs []int
	// TCPInfo asks for each socket's struct tcp_info (INET_DIAG_INFO):
	// its byte and segment counters, as getsockopt(TCP_INFO) reads them.
	TCPInfo bool
}

// Dump lists the TCP sockets (IPv4 and IPv6) of the calling thread's
// network namespace.
func Dump(req Request) ([]Socket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("open sock_diag netlink socket: %w", err)
	}
	defer unix.Close(fd)
	return dump(fd, req)
}

// DumpNetns lists the TCP sockets of the network namespace at path (a
// /proc/PID/ns/net or a bind mount such as /run/netns/NAME). It opens the
// netlink socket in that namespace on a locked thread, which it returns
// to its own namespace; the dump itself runs from any thread (a netlink
// socket stays in the namespace it was created in). Its errors wrap the
// errno: os.ErrNotExist for a namespace that went away.
func DumpNetns(path string, req Request) ([]Socket, error) {
	fd, err := socketIn(path)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return dump(fd, req)
}

// socketIn creates a NETLINK_SOCK_DIAG socket in the network namespace at
// path. A thread that cannot return to its namespace stays locked, so the
// runtime ends it with its goroutine.
func socketIn(path string) (int, error) {
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(target)
	type result struct {
		fd  int
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{-1, &os.PathError{Op: "open", Path: "/proc/thread-self/ns/net", Err: err}}
			return
		}
		defer unix.Close(self)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- result{-1, &os.PathError{Op: "setns", Path: path, Err: err}}
			return
		}
		fd, serr := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
		if serr != nil {
			serr = fmt.Errorf("open sock_diag netlink socket in %s: %w", path, serr)
		}
		if err := unix.Setns(self, unix.CLONE_NEWNET); err != nil {
			if fd >= 0 {
				unix.Close(fd)
			}
			done <- result{-1, errors.Join(serr, fmt.Errorf("return from network namespace %s: %w", path, err))}
			return // the thread stays locked and ends with this goroutine
		}
		runtime.UnlockOSThread()
		done <- result{fd, serr}
	}()
	r := <-done
	return r.fd, r.err
}

// Wire constants of include/uapi/linux/inet_diag.h and sock_diag.h.
const (
	inetDiagReqSkBPFStorages = 2  // INET_DIAG_REQ_SK_BPF_STORAGES
	inetDiagInfo             = 2  // INET_DIAG_INFO
	inetDiagSkBPFStorages    = 20 // INET_DIAG_SK_BPF_STORAGES
	inetDiagCgroupID         = 21 // INET_DIAG_CGROUP_ID

	sizeofReqV2   = 56 // struct inet_diag_req_v2
	sizeofDiagMsg = 72 // struct inet_diag_msg
	noCookie      = ^uint64(0)
	recvBufSize   = 64 << 10
)

// dump runs one dump per address family on the sock_diag socket fd.
func dump(fd int, req Request) ([]Socket, error) {
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("bind sock_diag netlink socket: %w", err)
	}
	buf := make([]byte, recvBufSize)
	var out []Socket
	for i, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		seq := uint32(i + 1)
		if err := unix.Sendto(fd, encodeRequest(family, seq, req), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			return nil, fmt.Errorf("send inet_diag request: %w", err)
		}
		var err error
		if out, err = receive(fd, seq, buf, out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// encodeRequest builds the dump request for one address family.
func encodeRequest(family uint8, seq uint32, req Request) []byte {
	states := req.States
	if states == 0 {
		states = ^uint32(0)
	}
	var attrs []byte
	if len(req.StorageMapFDs) > 0 {
		var fds []byte
		for _, fd := range req.StorageMapFDs {
			fds = appendAttr(fds, unix.SK_DIAG_BPF_STORAGE_REQ_MAP_FD, binary.NativeEndian.AppendUint32(nil, uint32(fd)))
		}
		attrs = appendAttr(attrs, inetDiagReqSkBPFStorages|unix.NLA_F_NESTED, fds)
	}
	b := make([]byte, unix.NLMSG_HDRLEN+sizeofReqV2, unix.NLMSG_HDRLEN+sizeofReqV2+len(attrs))
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(unix.NLMSG_HDRLEN+sizeofReqV2+len(attrs)))
	ne.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(b[8:], seq)
	r := b[unix.NLMSG_HDRLEN:]
	r[0] = family
	r[1] = unix.IPPROTO_TCP
	// r[2] ext: INET_DIAG_INFO on request; the cgroup id comes unasked.
	if req.TCPInfo {
		r[2] = 1 << (inetDiagInfo - 1)
	}
	ne.PutUint32(r[4:], states)
	// inet_diag_sockid (r[8:56]) zero: every socket; cookie "none".
	ne.PutUint32(r[48:], ^uint32(0))
	ne.PutUint32(r[52:], ^uint32(0))
	return append(b, attrs...)
}

// appendAttr appends a netlink attribute (struct nlattr, padded to 4 bytes).
func appendAttr(b []byte, typ uint16, data []byte) []byte {
	var h [4]byte
	binary.NativeEndian.PutUint16(h[0:], uint16(4+len(data)))
	binary.NativeEndian.PutUint16(h[2:], typ)
	b = append(b, h[:]...)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// receive reads the replies to request seq until NLMSG_DONE.
func receive(fd int, seq uint32, buf []byte, out []Socket) ([]Socket, error) {
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read inet_diag reply: %w", err)
		}
		b := buf[:n]
		for len(b) >= unix.NLMSG_HDRLEN {
			ne := binary.NativeEndian
			l := int(ne.Uint32(b[0:]))
			typ := ne.Uint16(b[4:])
			flags := ne.Uint16(b[6:])
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				return nil, fmt.Errorf("inet_diag reply: bad message length %d", l)
			}
			msg := b[unix.NLMSG_HDRLEN:l]
			b = b[min(nlmAlign(l), len(b)):]
			switch typ {
			case unix.NLMSG_DONE:
				if flags&unix.NLM_F_DUMP_INTR != 0 {
					return nil, errors.New("inet_diag dump interrupted (the socket table changed meanwhile): try again")
				}
				return out, nil
			case unix.NLMSG_ERROR:
				if len(msg) < 4 {
					return nil, errors.New("inet_diag reply: short error message")
				}
				if errno := -int32(ne.Uint32(msg)); errno != 0 {
					return nil, fmt.Errorf("inet_diag dump: %w", unix.Errno(errno))
				}
				return out, nil
			case unix.SOCK_DIAG_BY_FAMILY:
				s, err := parseMessage(msg)
				if err != nil {
					return nil, err
				}
				out = append(out, s)
			}
		}
	}
}

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// parseMessage decodes one struct inet_diag_msg and its attributes.
func parseMessage(msg []byte) (Socket, error) {
	if len(msg) < sizeofDiagMsg {
		return Socket{}, fmt.Errorf("inet_diag reply: message of %d bytes, want at least %d", len(msg), sizeofDiagMsg)
	}
	ne := binary.NativeEndian
	s := Socket{Family: msg[0], State: msg[1]}
	id := msg[4:52] // struct inet_diag_sockid
	sport := binary.BigEndian.Uint16(id[0:])
	dport := binary.BigEndian.Uint16(id[2:])
	s.Local = netip.AddrPortFrom(addrOf(s.Family, id[4:20]), sport)
	s.Remote = netip.AddrPortFrom(addrOf(s.Family, id[20:36]), dport)
	if c := uint64(ne.Uint32(id[40:])) | uint64(ne.Uint32(id[44:]))<<32; c != noCookie {
		s.Cookie = c
	}
	s.UID = ne.Uint32(msg[64:])
	s.Inode = uint64(ne.Uint32(msg[68:]))
	err := walkAttrs(msg[sizeofDiagMsg:], func(typ uint16, data []byte) error {
		switch typ {
		case inetDiagInfo:
			// The kernel's struct tcp_info, of its version's size:
			// what it lacks stays 0, what it adds is left out.
			info := new(unix.TCPInfo)
			copy(unsafe.Slice((*byte)(unsafe.Pointer(info)), unix.SizeofTCPInfo), data)
			s.TCPInfo = info
		case inetDiagCgroupID:
			if len(data) >= 8 {
				s.CgroupID = ne.Uint64(data)
			}
		case inetDiagSkBPFStorages:
			return walkAttrs(data, func(typ uint16, data []byte) error {
				if typ != unix.SK_DIAG_BPF_STORAGE {
					return nil
				}
				var st Storage
				err := walkAttrs(data, func(typ uint16, data []byte) error {
					switch typ {
					case unix.SK_DIAG_BPF_STORAGE_MAP_ID:
						if len(data) >= 4 {
							st.MapID = ne.Uint32(data)
						}
					case unix.SK_DIAG_BPF_STORAGE_MAP_VALUE:
						st.Value = append([]byte(nil), data...)
					}
					return nil
				})
				s.Storages = append(s.Storages, st)
				return err
			})
		}
		return nil
	})
	return s, err
}

// addrOf reads an address of inet_diag_sockid (network order, IPv4 in the
// first 4 bytes).
func addrOf(family uint8, b []byte) netip.Addr {
	if family == unix.AF_INET {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16([16]byte(b[:16])).Unmap()
}

// walkAttrs calls fn for each netlink attribute in b, with its type
// (without the nested and byte-order flags) and payload.
func walkAttrs(b []byte, fn func(typ uint16, data []byte) error) error {
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b[0:]))
		typ := binary.NativeEndian.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if l < 4 || l > len(b) {
			return fmt.Errorf("inet_diag reply: bad attribute length %d", l)
		}
		if err := fn(typ, b[4:l]); err != nil {
			return err
		}
		b = b[min((l+3)&^3, len(b)):]
	}
	return nil
}
