package dataplane

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/sockbypass/sockbypass/sockops"
)

// Fallback event reasons (enum fallback_event_reason of bpf/sockbypass.h).
const (
	// EventLateBlocking: a member turned blocking after it joined; it and
	// its peer leave the sockhash (see "Leaving" in bpf/sockbypass.h).
	EventLateBlocking = "late_blocking"
	// EventLateStackOption: a member set SO_RCVLOWAT, TCP_INQ or
	// SO_OOBINLINE after it joined; it and its peer leave the sockhash.
	EventLateStackOption = "late_stack_option"
	// EventListenerBlockingChildren: an accepted socket turned blocking,
	// so its listener's later connections stay plain TCP.
	EventListenerBlockingChildren = "listener_blocking_children"
	// EventSpliceReader: a member was read with splice (or sendfile, or
	// io_uring) with nothing redirected unread: it and its peer leave the
	// sockhash, and its process's later connections stay plain.
	EventSpliceReader = "splice_reader"
	// EventSpliceStalled: a member was read with splice while redirected
	// bytes (Unread) were waiting: splice cannot read them, so the
	// connection stalls until the program reads with recvmsg.
	EventSpliceStalled = "splice_stalled"
	// EventListenerSpliced: an accepted socket was read with splice, so
	// its listener's later connections stay plain TCP.
	EventListenerSpliced = "listener_spliced"
	// EventListenerKernelTLS: an accepted socket asked for a ULP (TCP_ULP
	// "tls", kernel TLS), so its listener's later connections stay plain
	// TCP, where kernel TLS works.
	EventListenerKernelTLS = "listener_kernel_tls"
)

var eventReasons = map[uint32]string{1: EventLateBlocking, 2: EventLateStackOption, 3: EventListenerBlockingChildren,
	4: EventSpliceReader, 5: EventSpliceStalled, 6: EventListenerSpliced, 7: EventListenerKernelTLS}

// optionNames names the options of EventLateStackOption (their optname;
// SOL_SOCKET's and SOL_TCP's numbers do not collide for these three).
var optionNames = map[uint32]string{18: "SO_RCVLOWAT", 10: "SO_OOBINLINE", 36: "TCP_INQ", 31: "TCP_ULP"}

// FallbackEvent is a change of a connection's path after it was
// accelerated, as the datapath reports it (struct fallback_event).
type FallbackEvent struct {
	// CgroupID is the enabled cgroup of the socket.
	CgroupID uint64
	// Local and Remote are the socket's addresses (a listener's Remote is
	// the zero value).
	Local, Remote netip.AddrPort
	// Reason is one of the Event* constants.
	Reason string
	// Option names the option of an EventLateStackOption.
	Option string
	// Unread is the number of redirected bytes an EventSpliceStalled
	// socket cannot read with splice.
	Unread uint32
}

// String describes the event for a person.
func (e FallbackEvent) String() string {
	switch e.Reason {
	case EventLateBlocking:
		return fmt.Sprintf("connection %s -> %s turned blocking after it was accelerated: it and its peer left the fast path (plain TCP from now on)", e.Local, e.Remote)
	case EventLateStackOption:
		return fmt.Sprintf("connection %s -> %s set %s after it was accelerated: it and its peer left the fast path (plain TCP from now on)", e.Local, e.Remote, e.Option)
	case EventListenerBlockingChildren:
		return fmt.Sprintf("listener %s makes its accepted sockets blocking: its new connections stay plain TCP", e.Local)
	case EventSpliceReader:
		return fmt.Sprintf("connection %s -> %s is read with splice: it and its peer left the fast path (plain TCP from now on), and so do its process's new connections", e.Local, e.Remote)
	case EventSpliceStalled:
		return fmt.Sprintf("connection %s -> %s is read with splice while %d redirected bytes wait, which only recvmsg can read: it stalls until its program reads with recvmsg (its process's new connections stay plain TCP; list the server port in --stack-ports to keep such connections plain from the start)", e.Local, e.Remote, e.Unread)
	case EventListenerSpliced:
		return fmt.Sprintf("listener %s splices its accepted sockets: its new connections stay plain TCP", e.Local)
	case EventListenerKernelTLS:
		return fmt.Sprintf("listener %s sets up kernel TLS (TCP_ULP) on its accepted sockets: its new connections stay plain TCP, where kernel TLS works", e.Local)
	}
	return fmt.Sprintf("connection %s -> %s: %s", e.Local, e.Remote, e.Reason)
}

// EventReader reads the datapath's fallback events (the pinned events
// ring). Events are consumed: one reader at a time (the daemon).
type EventReader struct {
	r *ringbuf.Reader
}

// ErrEventsClosed is what Read returns once the reader is closed.
var ErrEventsClosed = errors.New("event reader closed")

// ReadEvents opens a reader of the fallback events. Close it when done.
func (d *Dataplane) ReadEvents() (*EventReader, error) {
	m, ok := d.maps[PinEvents]
	if !ok {
		return nil, fmt.Errorf("read events: no %s map in %s", PinEvents, d.pinDir)
	}
	r, err := ringbuf.NewReader(m)
	if err != nil {
		return nil, fmt.Errorf("read events: %w", err)
	}
	return &EventReader{r: r}, nil
}

// Read blocks until the next event (ErrEventsClosed after Close).
func (r *EventReader) Read() (FallbackEvent, error) {
	for {
		rec, err := r.r.Read()
		if errors.Is(err, ringbuf.ErrClosed) {
			return FallbackEvent{}, ErrEventsClosed
		}
		if err != nil {
			return FallbackEvent{}, fmt.Errorf("read events: %w", err)
		}
		var raw sockops.FallbackEvent
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &raw); err != nil {
			continue // a record of another layout: skip it
		}
		return fallbackEventFromC(raw), nil
	}
}

// Close stops the reader; a blocked Read returns ErrEventsClosed.
func (r *EventReader) Close() error { return r.r.Close() }

func fallbackEventFromC(raw sockops.FallbackEvent) FallbackEvent {
	e := FallbackEvent{CgroupID: raw.CgroupId, Local: raw.Key.Local(), Reason: eventReasons[raw.Reason]}
	if e.Reason == "" {
		e.Reason = fmt.Sprintf("reason %d", raw.Reason)
	}
	if e.Reason != EventListenerBlockingChildren && e.Reason != EventListenerSpliced && e.Reason != EventListenerKernelTLS {
		e.Remote = raw.Key.Remote()
	}
	if e.Reason == EventSpliceStalled {
		e.Unread = raw.Detail
	}
	if e.Reason == EventLateStackOption {
		e.Option = optionNames[raw.Detail]
		if e.Option == "" {
			e.Option = fmt.Sprintf("option %d", raw.Detail)
		}
	}
	return e
}
