package tc

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// FilterPriority and FilterName identify sockbypass's cls_bpf filter on a
// clsact egress hook.
const (
	FilterPriority = 0x5b5b
	FilterHandle   = 1
	FilterName     = "sockbypass"
)

// AttachTCX attaches prog to the egress of ifindex in the current network
// namespace with a tcx link, after any programs already there, and pins
// the link at pin.
func AttachTCX(prog *ebpf.Program, ifindex int, pin string) error {
	l, err := link.AttachTCX(link.TCXOptions{
		Interface: ifindex,
		Program:   prog,
		Attach:    ebpf.AttachTCXEgress,
		Anchor:    link.Tail(),
	})
	if err != nil {
		return fmt.Errorf("attach tcx egress to ifindex %d: %w", ifindex, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin tcx link: %w", err)
	}
	return nil
}

// AttachClsact attaches prog as a direct-action cls_bpf filter on the
// clsact egress hook of the interface ifindex in the current network
// namespace, adding the clsact qdisc when there is none. It reports whether
// it added the qdisc.
func AttachClsact(prog *ebpf.Program, ifindex int) (createdQdisc bool, err error) {
	lnk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return false, fmt.Errorf("interface %d: %w", ifindex, err)
	}
	has, err := hasClsact(lnk)
	if err != nil {
		return false, err
	}
	if !has {
		if err := netlink.QdiscAdd(clsact(ifindex)); err != nil && !errors.Is(err, unix.EEXIST) {
			return false, fmt.Errorf("add clsact qdisc to %s: %w", lnk.Attrs().Name, err)
		}
		createdQdisc = true
	}
	filter := &netlink.BpfFilter{
		FilterAttrs:  filterAttrs(ifindex),
		Fd:           prog.FD(),
		Name:         FilterName,
		DirectAction: true,
	}
	if err := netlink.FilterReplace(filter); err != nil {
		if createdQdisc {
			netlink.QdiscDel(clsact(ifindex))
		}
		return false, fmt.Errorf("add cls_bpf egress filter to %s: %w", lnk.Attrs().Name, err)
	}
	return createdQdisc, nil
}

// DetachClsact removes sockbypass's filter from the egress hook of ifindex
// in the current network namespace, and the clsact qdisc too when
// removeQdisc is set and no other filter is left on it. A missing
// interface or filter is not an error.
func DetachClsact(ifindex int, removeQdisc bool) error {
	lnk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) || errors.Is(err, unix.ENODEV) {
			return nil
		}
		return fmt.Errorf("interface %d: %w", ifindex, err)
	}
	filter := &netlink.BpfFilter{FilterAttrs: filterAttrs(ifindex)}
	if err := netlink.FilterDel(filter); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("remove cls_bpf filter from %s: %w", lnk.Attrs().Name, err)
	}
	if !removeQdisc {
		return nil
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_EGRESS, netlink.HANDLE_MIN_INGRESS} {
		filters, err := netlink.FilterList(lnk, parent)
		if err != nil {
			return fmt.Errorf("list filters of %s: %w", lnk.Attrs().Name, err)
		}
		if len(filters) > 0 {
			return nil // someone else uses the qdisc
		}
	}
	if err := netlink.QdiscDel(clsact(ifindex)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("remove clsact qdisc from %s: %w", lnk.Attrs().Name, err)
	}
	return nil
}

// HasFilter reports whether sockbypass's cls_bpf filter is on the egress
// hook of ifindex in the current network namespace.
func HasFilter(ifindex int) (bool, error) {
	lnk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return false, err
	}
	if has, err := hasClsact(lnk); err != nil || !has {
		return false, err
	}
	filters, err := netlink.FilterList(lnk, netlink.HANDLE_MIN_EGRESS)
	if err != nil {
		return false, err
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Priority == FilterPriority {
			return true, nil
		}
	}
	return false, nil
}

func hasClsact(lnk netlink.Link) (bool, error) {
	qdiscs, err := netlink.QdiscList(lnk)
	if err != nil {
		return false, fmt.Errorf("list qdiscs of %s: %w", lnk.Attrs().Name, err)
	}
	for _, q := range qdiscs {
		if q.Type() == "clsact" {
			return true, nil
		}
	}
	return false, nil
}

func clsact(ifindex int) *netlink.GenericQdisc {
	return &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
}

func filterAttrs(ifindex int) netlink.FilterAttrs {
	return netlink.FilterAttrs{
		LinkIndex: ifindex,
		Parent:    netlink.HANDLE_MIN_EGRESS,
		Handle:    FilterHandle,
		Protocol:  unix.ETH_P_ALL,
		Priority:  FilterPriority,
	}
}
