package tc

// The structs of the TC attachment registry (bpf/sockbypass.h), as bpf2go
// generates them (tc_bpfel.go). internal/dataplane's layout test compares
// each with the BTF of its map.
type (
	// DeviceKey is struct tc_device_key: {netns inode, ifindex}, the key
	// of tc_devices.
	DeviceKey = tcTcDeviceKey
	// Device is struct tc_device: how the program is attached to a device
	// and the names it was asked for with.
	Device = tcTcDevice
	// UserKey is struct tc_user_key: {cgroup id, device}, the key of
	// tc_users.
	UserKey = tcTcUserKey
)
