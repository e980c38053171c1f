package nat

import (
	"fmt"

	"github.com/vishvananda/netns"

	"github.com/vxnet/vxnet/internal/netnsutil"
)

// withNetNS runs fn on an OS thread that has joined the network namespace at
// path. It exists because iptables (an external binary inheriting the
// calling thread's namespace) and /proc/sys/net (resolved against the
// opening thread's namespace) cannot be pointed at a namespace any other
// way.
func withNetNS(path string, fn func() error) error {
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer target.Close()
	return withNetNSHandle(target, fn)
}

// withNetNSHandle is withNetNS for an already opened namespace. The thread
// switch, and retiring a thread that cannot be switched back, is
// netnsutil's, shared with vtep.
func withNetNSHandle(target netns.NsHandle, fn func() error) error {
	return netnsutil.WithNetNS(target, fn)
}

// retryDump repeats a netlink dump interrupted by a concurrent change, whose
// partial result must not be mistaken for "the link is not there". It is
// the package's short name for netnsutil.RetryDump, shared with vtep.
func retryDump[T any](fn func() (T, error)) (T, error) { return netnsutil.RetryDump(fn) }

// isNotFound reports whether err says a link does not exist, by the typed
// answers only (see netnsutil.IsLinkNotFound); vtep decides absence by the
// same shared rule.
func isNotFound(err error) bool { return netnsutil.IsLinkNotFound(err) }
