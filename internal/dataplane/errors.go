package dataplane

import "golang.org/x/sys/unix"

var (
	errNotEmpty error = unix.ENOTEMPTY
	errInvalid  error = unix.EINVAL
)
