package suite

import "errors"

// cleanups is a stack of undo functions, run last-in first-out.
type cleanups struct {
	fns []func() error
}

// push registers fn to run at close.
func (c *cleanups) push(fn func() error) { c.fns = append(c.fns, fn) }

// run runs every registered function once, newest first, and joins their
// errors.
func (c *cleanups) run() error {
	var errs []error
	for i := len(c.fns) - 1; i >= 0; i-- {
		if err := c.fns[i](); err != nil {
			errs = append(errs, err)
		}
	}
	c.fns = nil
	return errors.Join(errs...)
}
