// Package netnsutil holds the helpers that vtep and nat share for working
// in network namespaces and with netlink. Each existed once in each
// package; keeping one copy keeps the two from drifting apart on points
// where a difference would be a bug (a thread left in the wrong namespace,
// a partial dump taken for absence).
package netnsutil

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// WithNetNS runs fn on a locked OS thread inside the already opened
// namespace target, then returns the thread to where it was. The calling
// goroutine's thread is untouched, and goroutines that fn starts run in
// the caller's namespace, not in target's. target stays open; closing it
// is the caller's.
func WithNetNS(target netns.NsHandle, fn func() error) error {
	return OnThread(func() error { return netns.Set(target) }, fn)
}

// OnThread runs fn on a locked OS thread whose network namespace enter
// changed (by setns, or by unshare for a new namespace), then puts the
// thread back in its original namespace. fn runs on a fresh goroutine so
// that the calling goroutine's thread is never touched, and so that a
// thread which cannot be put back can be left locked: its goroutine then
// exits still locked and the runtime destroys the thread instead of
// running other goroutines on it in the wrong namespace.
func OnThread(enter, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := enter(); err != nil {
			// A failed setns or unshare leaves the thread where it
			// was, so it can go back to the pool.
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// Deliberately stay locked: see above.
			errc <- errors.Join(ferr, fmt.Errorf("return to the original netns (thread retired): %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// dumpTries bounds RetryDump: interruptions come from concurrent changes,
// which settle, so a few tries suffice and a stuck loop is avoided.
const dumpTries = 10

// RetryDump repeats a netlink dump interrupted by a concurrent change.
// Since netlink v1.2 such dumps return partial results with
// ErrDumpInterrupted, and a partial result may lack entries that exist:
// taken as is, it would make a present link, address or route look
// absent. After the last try the interrupted error is returned, not the
// partial result as if it were whole.
func RetryDump[T any](fn func() (T, error)) (T, error) {
	var (
		v   T
		err error
	)
	for range dumpTries {
		v, err = fn()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
	}
	return v, err
}

// NextEth returns the lowest name ethN, N >= from, that no link in links
// has. from exists because callers differ on eth0: vtep hands it out
// first, nat never does (it is the overlay's place).
func NextEth(links []netlink.Link, from int) string {
	used := make(map[string]bool, len(links))
	for _, l := range links {
		used[l.Attrs().Name] = true
	}
	for i := from; ; i++ {
		if n := "eth" + strconv.Itoa(i); !used[n] {
			return n
		}
	}
}

// IsLinkNotFound reports whether err says a link does not exist: the
// typed answers only. ENOENT (which anything opening a file can return)
// and matching "no such device" in a message (which any wrapped text can
// contain) would make other failures look like absence, and callers
// delete or recreate on absence.
func IsLinkNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV)
}

// PrivateMounts reports whether this process runs in a mount namespace
// other than the host's, and both namespaces' names. PID 1's is the
// host's; where it cannot be read (a sandbox), the parent's tells at least
// whether this process was given one of its own on the way (ip netns exec,
// unshare).
func PrivateMounts() (private bool, self, host string, err error) {
	if self, err = os.Readlink("/proc/self/ns/mnt"); err != nil {
		return false, "", "", err
	}
	if host, err = os.Readlink("/proc/1/ns/mnt"); err != nil {
		if host, err = os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", os.Getppid())); err != nil {
			return false, self, "", err
		}
	}
	return self != host, self, host, nil
}

// ID is a namespace's device and inode: what tells two namespaces mounted
// on one path apart (one deleted and made again is another), and a
// namespace from the plain file it is mounted on before it exists.
type ID struct {
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

// IDOf is the identity of what is at path.
func IDOf(path string) (ID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return ID{}, err
	}
	return ID{Dev: st.Dev, Ino: st.Ino}, nil
}

// IDOfHandle is the identity of an open namespace.
func IDOfHandle(ns netns.NsHandle) (ID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(ns), &st); err != nil {
		return ID{}, fmt.Errorf("stat namespace: %w", err)
	}
	return ID{Dev: st.Dev, Ino: st.Ino}, nil
}

// Handle opens a netlink handle in ns for rtnetlink alone, the only
// family the agent speaks: netlink.NewHandleAt with no family opens a
// socket for each of three, each with two setns of the thread, which on a
// full pass over many endpoints is most of the pass's time.
func Handle(ns netns.NsHandle) (*netlink.Handle, error) {
	return netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
}
