package dataplane

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/tc"
)

// Pin names of the TC accounting.
const (
	PinTCDevices = "tc_devices"
	PinTCUsers   = "tc_users"
	DirTC        = "tc"
)

// DefaultTCDevice is lo, the device most often given to --tc-dev (TC
// accounting is off unless devices are named).
var DefaultTCDevice = TCDevice{Name: "lo"}

// TCDevice names an interface whose egress TCP traffic is accounted.
type TCDevice struct {
	// NetnsPath is the network namespace's path (/run/netns/NAME,
	// /proc/PID/ns/net); "" is the namespace of this process.
	NetnsPath string `json:"netns,omitempty"`
	// Name is the interface name.
	Name string `json:"name"`
}

// String returns the device in the form ParseTCDevice reads.
func (d TCDevice) String() string {
	if d.NetnsPath == "" {
		return d.Name
	}
	return d.NetnsPath + ":" + d.Name
}

// ParseTCDevice parses "[NETNS_PATH:]DEV", for example "lo", "eth0" or
// "/run/netns/pod-a:lo".
func ParseTCDevice(s string) (TCDevice, error) {
	d := TCDevice{Name: s}
	if i := strings.LastIndexByte(s, ':'); i >= 0 {
		d.NetnsPath, d.Name = s[:i], s[i+1:]
		if !filepath.IsAbs(d.NetnsPath) {
			return TCDevice{}, fmt.Errorf("tc device %q: the network namespace must be an absolute path such as /run/netns/NAME:%s", s, d.Name)
		}
	}
	if d.Name == "" || len(d.Name) >= unix.IFNAMSIZ || strings.ContainsAny(d.Name, "/ ") {
		return TCDevice{}, fmt.Errorf("tc device %q: %q is not an interface name (see ip link)", s, d.Name)
	}
	return d, nil
}

// The TC registry's structs, as bpf2go generates them: struct
// tc_device_key, tc_device and tc_user_key.
type (
	tcDeviceKey   = tc.DeviceKey
	tcDeviceValue = tc.Device
	tcUserKey     = tc.UserKey
)

const (
	tcAttachTCX    = 1
	tcAttachClsact = 2
)

// resolvedDevice is a TCDevice found in its namespace.
type resolvedDevice struct {
	TCDevice
	key   tcDeviceKey
	l2Len uint32
}

// inNetns runs fn in the network namespace at path ("" for this one) on a
// locked OS thread.
func inNetns(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	netns, err := ns.GetNS(path)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer netns.Close()
	return netns.Do(func(ns.NetNS) error { return fn() })
}

func netnsIno(path string) (uint64, error) {
	if path == "" {
		path = "/proc/thread-self/ns/net"
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// resolveTCDevice finds d's interface and namespace, with errors that name
// d and say how to fix it.
// CheckTCDevice returns an error naming d and the fix when d cannot be
// accounted: its network namespace or interface does not exist, or its
// link type is not supported. Enable checks the same before it attaches.
func CheckTCDevice(d TCDevice) error {
	_, err := resolveTCDevice(d)
	return err
}

func resolveTCDevice(d TCDevice) (resolvedDevice, error) {
	r := resolvedDevice{TCDevice: d}
	if d.NetnsPath != "" {
		if len(d.NetnsPath) >= len(tcDeviceValue{}.NetnsPath) {
			return r, fmt.Errorf("tc device %s: network namespace path longer than %d bytes: bind-mount it somewhere shorter", d, len(tcDeviceValue{}.NetnsPath)-1)
		}
		if _, err := os.Stat(d.NetnsPath); err != nil {
			return r, fmt.Errorf("tc device %s: network namespace %s: %w (list named ones with: ip netns list)", d, d.NetnsPath, err)
		}
	}
	err := inNetns(d.NetnsPath, func() error {
		ino, err := netnsIno("")
		if err != nil {
			return err
		}
		lnk, err := netlink.LinkByName(d.Name)
		if err != nil {
			return fmt.Errorf("tc device %s: no interface %q in that network namespace (see ip link): %w", d, d.Name, err)
		}
		switch enc := lnk.Attrs().EncapType; enc {
		case "ether", "loopback":
			r.l2Len = 14
		case "none":
			r.l2Len = 0
		default:
			return fmt.Errorf("tc device %s: link type %q is not supported (use an Ethernet, veth, loopback or layer-3 device)", d, enc)
		}
		r.key = tcDeviceKey{NetnsIno: ino, Ifindex: uint32(lnk.Attrs().Index)}
		return nil
	})
	return r, err
}

// cString returns the NUL-terminated string in a C char array.
func cString(c []int8) string {
	b := make([]byte, 0, len(c))
	for _, ch := range c {
		if ch == 0 {
			break
		}
		b = append(b, byte(ch))
	}
	return string(b)
}

// putCString copies s into the C char array c, NUL-terminated (s is
// checked to fit before).
func putCString(c []int8, s string) {
	for i := 0; i < len(s) && i < len(c)-1; i++ {
		c[i] = int8(s[i])
	}
}

// attachTC attaches the TC program to dev unless sockbypass already did.
// It reports whether it attached it now.
func (d *Dataplane) attachTC(dev resolvedDevice) (bool, error) {
	var existing tcDeviceValue
	if err := d.maps[PinTCDevices].Lookup(dev.key, &existing); err == nil {
		return false, nil
	}
	if err := os.MkdirAll(d.pin(DirTC), 0o700); err != nil {
		return false, err
	}
	prog, err := loadTC(dev.l2Len, d.maps)
	if err != nil {
		return false, err
	}
	defer prog.Close()
	pin := d.tcPin(dev.key)
	value := tcDeviceValue{Mode: tcAttachTCX}
	putCString(value.NetnsPath[:], dev.NetnsPath)
	putCString(value.Ifname[:], dev.Name)

	err = inNetns(dev.NetnsPath, func() error {
		if !d.legacyTC {
			err := tc.AttachTCX(prog, int(dev.key.Ifindex), pin)
			if err == nil || !errors.Is(err, ebpf.ErrNotSupported) {
				return err
			}
		}
		value.Mode = tcAttachClsact
		created, err := tc.AttachClsact(prog, int(dev.key.Ifindex))
		if err != nil {
			return err
		}
		if created {
			value.CreatedQdisc = 1
		}
		if err := prog.Pin(pin); err != nil {
			tc.DetachClsact(int(dev.key.Ifindex), created)
			return fmt.Errorf("pin tc program: %w", err)
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("account egress of %s: %w", dev, err)
	}
	if err := d.maps[PinTCDevices].Put(dev.key, value); err != nil {
		d.detachTC(dev.key, value)
		return false, fmt.Errorf("record tc device %s: %w", dev, err)
	}
	d.log.Info("attached tc egress accounting", zap.String("device", dev.String()), zap.String("mode", tcModeName(value.Mode)))
	return true, nil
}

// detachTC removes the TC program from a device and forgets the device.
func (d *Dataplane) detachTC(key tcDeviceKey, value tcDeviceValue) error {
	pin := d.tcPin(key)
	switch value.Mode {
	case tcAttachTCX:
		l, err := link.LoadPinnedLink(pin, nil)
		if err == nil {
			err = l.Unpin()
			l.Close()
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("detach tcx link %s: %w", pin, err)
		}
	case tcAttachClsact:
		netnsPath := cString(value.NetnsPath[:])
		err := inNetns(netnsPath, func() error {
			if ino, err := netnsIno(""); err != nil || ino != key.NetnsIno {
				return nil // namespace gone: nothing left to detach
			}
			return tc.DetachClsact(int(key.Ifindex), value.CreatedQdisc == 1)
		})
		if err != nil && !errors.Is(err, os.ErrNotExist) && !isNetnsGone(err) {
			return fmt.Errorf("detach tc filter from %s: %w", deviceOf(value), err)
		}
		if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if err := d.maps[PinTCDevices].Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	d.log.Info("detached tc egress accounting", zap.String("device", deviceOf(value).String()))
	return nil
}

func isNetnsGone(err error) bool {
	var nsErr ns.NSPathNotExistErr
	return errors.As(err, &nsErr)
}

func tcModeName(mode uint32) string {
	switch mode {
	case tcAttachTCX:
		return "tcx"
	case tcAttachClsact:
		return "clsact"
	}
	return "unknown"
}

// addTCUser records that cgroupID uses dev.
func (d *Dataplane) addTCUser(cgroupID uint64, dev tcDeviceKey) error {
	return d.maps[PinTCUsers].Put(tcUserKey{CgroupId: cgroupID, Dev: dev}, uint32(1))
}

// releaseTCUsers forgets the tc_users entries drop selects and detaches
// every device that no remaining entry uses: a device stays attached while
// any enabled cgroup asks for it. It returns the devices it detached.
func (d *Dataplane) releaseTCUsers(drop func(tcUserKey) bool) ([]TCDevice, error) {
	users := d.maps[PinTCUsers]
	inUse := map[tcDeviceKey]bool{}
	var dropped []tcUserKey
	var key tcUserKey
	var v uint32
	it := users.Iterate()
	for it.Next(&key, &v) {
		if drop(key) {
			dropped = append(dropped, key)
		} else {
			inUse[key.Dev] = true
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read tc users: %w", err)
	}
	for _, k := range dropped {
		if err := users.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, err
		}
	}
	devices, err := d.tcDevices()
	if err != nil {
		return nil, err
	}
	var detached []TCDevice
	for k, v := range devices {
		if inUse[k] {
			continue
		}
		if err := d.detachTC(k, v); err != nil {
			return detached, err
		}
		detached = append(detached, deviceOf(v))
	}
	return detached, nil
}

// isTCUser reports whether cgroupID asked for dev.
func (d *Dataplane) isTCUser(cgroupID uint64, dev tcDeviceKey) bool {
	var v uint32
	return d.maps[PinTCUsers].Lookup(tcUserKey{CgroupId: cgroupID, Dev: dev}, &v) == nil
}

// deviceOf returns the device spec v was attached for ([NETNS_PATH:]DEV).
func deviceOf(v tcDeviceValue) TCDevice {
	return TCDevice{NetnsPath: cString(v.NetnsPath[:]), Name: cString(v.Ifname[:])}
}

func (d *Dataplane) tcDevices() (map[tcDeviceKey]tcDeviceValue, error) {
	return readMap[tcDeviceKey, tcDeviceValue](d.maps[PinTCDevices], PinTCDevices)
}

// TCDeviceStatus describes one interface with TC accounting attached.
type TCDeviceStatus struct {
	TCDevice
	// Ifindex is the interface index in its namespace.
	Ifindex uint32 `json:"ifindex"`
	// NetnsInode identifies the network namespace.
	NetnsInode uint64 `json:"netns_inode"`
	// Mode is "tcx" (tcx link) or "clsact" (clsact qdisc + cls_bpf).
	Mode string `json:"mode"`
	// ProgramID is the kernel id of the attached TC program.
	ProgramID uint32 `json:"program_id"`
	// Cost is what the program has cost so far: it runs for every packet
	// leaving the device, of every process.
	Cost *ProgramCost `json:"cost,omitempty"`
}

func (d *Dataplane) tcDeviceStatus() ([]TCDeviceStatus, error) {
	devices, err := d.tcDevices()
	if err != nil {
		return nil, err
	}
	out := []TCDeviceStatus{}
	for k, v := range devices {
		st := TCDeviceStatus{
			TCDevice:   deviceOf(v),
			Ifindex:    k.Ifindex,
			NetnsInode: k.NetnsIno,
			Mode:       tcModeName(v.Mode),
		}
		pin := d.tcPin(k)
		if v.Mode == tcAttachTCX {
			if l, err := link.LoadPinnedLink(pin, nil); err == nil {
				if info, err := l.Info(); err == nil {
					st.ProgramID = uint32(info.Program)
				}
				l.Close()
			}
		} else if p, err := ebpf.LoadPinnedProgram(pin, nil); err == nil {
			if info, err := p.Info(); err == nil {
				if id, ok := info.ID(); ok {
					st.ProgramID = uint32(id)
				}
			}
			p.Close()
		}
		if st.ProgramID != 0 {
			st.Cost = programCost(ebpf.ProgramID(st.ProgramID))
		}
		out = append(out, st)
	}
	return out, nil
}
