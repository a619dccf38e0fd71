package dataplane

import (
	"os"
	"regexp"
	"strconv"
	"testing"
)

// TestSockFlagsMirrorTheHeader compares the Go copies of the per-socket,
// pair and listener constants (sockets.go) with their #defines in
// bpf/sockbypass.h, so that `sockbypass conns` cannot read a flag the
// datapath moved.
func TestSockFlagsMirrorTheHeader(t *testing.T) {
	src, err := os.ReadFile("../../bpf/sockbypass.h")
	if err != nil {
		t.Fatal(err)
	}
	defines := map[string]uint64{}
	re := regexp.MustCompile(`(?m)^#define\s+(\w+)\s+\(?(\d+)U?L{0,2}(?:\s*<<\s*(\d+)\))?`)
	for _, m := range re.FindAllStringSubmatch(string(src), -1) {
		v, _ := strconv.ParseUint(m[2], 10, 64)
		if m[3] != "" {
			shift, _ := strconv.ParseUint(m[3], 10, 64)
			v <<= shift
		}
		defines[m[1]] = v
	}
	for name, goValue := range map[string]uint64{
		"SOCK_FLAG_HANDLED": SockFlagHandled, "SOCK_FLAG_INSERTED": SockFlagInserted, "SOCK_FLAG_REDIRECTING": SockFlagRedirecting,
		"SOCK_FLAG_STACK_READER": SockFlagStackReader, "SOCK_FLAG_EXPLICIT_PEER": SockFlagExplicitPeer, "SOCK_FLAG_INTERCEPTED": SockFlagIntercepted,
		"SOCK_FLAG_SYN_REDIRECTED": SockFlagSynRedirected, "SOCK_FLAG_MESH_APP": SockFlagMeshApp, "SOCK_FLAG_AMBIGUOUS": SockFlagAmbiguous,
		"SOCK_FLAG_PAIRED": SockFlagPaired, "SOCK_FLAG_PAIR_CLIENT": SockFlagPairClient, "SOCK_FLAG_LISTENER": SockFlagListener,
		"SOCK_FLAG_LATE_OPTION": SockFlagLateOption, "SOCK_FLAG_LOCAL_PEER": SockFlagLocalPeer, "SOCK_FLAG_REMOTE_PEER": SockFlagRemotePeer,
		"SOCK_FLAG_PASSED": SockFlagPassed, "SOCK_FLAG_ORIG_DST": SockFlagOrigDst, "SOCK_FLAG_ENDPOINT_COUNTED": SockFlagEndpointCounted,
		"SOCK_FLAG_WOULD_PAIR": SockFlagWouldPair, "SOCK_FLAG_ACCEPTED": SockFlagAccepted, "SOCK_FLAG_LEAVING": SockFlagLeaving,
		"SOCK_FLAG_PEER_REMOVED": SockFlagPeerRemoved, "SOCK_FLAG_STACK_PROCESS": SockFlagStackProcess,
		"PAIR_OFFERED": PairOffered, "PAIR_CLIENT_JOINED": PairClientJoined, "PAIR_JOINED": PairJoined, "PAIR_DECLINED": PairDeclined,
		"PAIR_ABANDONED": PairAbandoned, "PAIR_DRY_OFFERED": PairDryOffered, "PAIR_DRY_CLIENT": PairDryClient, "PAIR_DRY_JOINED": PairDryJoined,
		"LISTENER_NONBLOCK": ListenerNonblock, "LISTENER_STACK_READER": ListenerStackReader, "LISTENER_BLOCKING_CHILDREN": ListenerBlockingChildren,
		"LISTENER_SHORT_ONE": ListenerShortOne, "SHORT_STREAK": ShortStreak,
	} {
		c, ok := defines[name]
		if !ok {
			t.Errorf("%s is not #defined in bpf/sockbypass.h any more: update internal/dataplane/sockets.go", name)
			continue
		}
		if c != goValue {
			t.Errorf("%s is %#x in bpf/sockbypass.h, %#x in internal/dataplane/sockets.go", name, c, goValue)
		}
	}
	if want := uint64(0xff) << 8; ListenerShortMask != want {
		t.Errorf("ListenerShortMask %#x, LISTENER_SHORT_MASK is %#x", ListenerShortMask, want)
	}
}
