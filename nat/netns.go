package nat

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
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

// withNetNSHandle is withNetNS for an already opened namespace. fn runs on
// a fresh goroutine so that, if the thread cannot be switched back, that
// goroutine can exit still locked: the runtime then destroys the thread
// instead of reusing one stuck in the wrong namespace.
func withNetNSHandle(target netns.NsHandle, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("get current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		err = fn()
		if serr := netns.Set(orig); serr != nil {
			// Deliberately stay locked: see above.
			done <- errors.Join(err, fmt.Errorf("restore network namespace (thread retired): %w", serr))
			return
		}
		runtime.UnlockOSThread()
		done <- err
	}()
	return <-done
}

// retryDump repeats a netlink dump interrupted by a concurrent change: since
// netlink v1.2 such dumps return partial results with ErrDumpInterrupted,
// which must not be mistaken for "the link is not there".
func retryDump[T any](fn func() (T, error)) (T, error) {
	var (
		v   T
		err error
	)
	for range 5 {
		v, err = fn()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
	}
	return v, err
}

// isNotFound reports whether err says a link does not exist: the typed
// answers only. ENOENT (which anything opening a file can return) and
// matching "no such device" in a message (which any wrapped text can
// contain) would make other failures look like absence.
func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV)
}
