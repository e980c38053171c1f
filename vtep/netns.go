package vtep

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/vxnet/vxnet/internal/netnsutil"
)

// ErrNotNetNS says that a path exists and is verifiably something other
// than a network namespace: a plain file, a mount of another filesystem,
// or a namespace of another type. Only this, or the path not existing, is
// evidence enough to replace what is there.
var ErrNotNetNS = errors.New("not a network namespace")

// CheckNetNS returns nil if path is a network namespace (a bind mount of
// one, or a /proc/PID/ns/net link); an error wrapping fs.ErrNotExist if
// the path does not exist; one wrapping ErrNotNetNS if it is verifiably
// something else; and otherwise the failure itself (EMFILE, EACCES, ...),
// which says nothing about what is there: a caller must then leave the
// path alone and try again later.
func CheckNetNS(path string) error {
	ns, err := openNetNS(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	ns.Close()
	return nil
}

// openNetNS opens path as a network namespace, with CheckNetNS's
// classification of failures. The type is asked of the descriptor that is
// returned, so a path swapped between the check and the open cannot slip
// through. The filesystem magic alone would also accept other namespace
// types, hence the ioctl.
func openNetNS(path string) (netns.NsHandle, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return -1, fmt.Errorf("statfs: %w", err) // ENOENT is fs.ErrNotExist
	}
	if st.Type != unix.NSFS_MAGIC {
		return -1, fmt.Errorf("%w (filesystem magic %#x)", ErrNotNetNS, st.Type)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open: %w", err)
	}
	t, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("namespace type: %w", err)
	}
	if t != unix.CLONE_NEWNET {
		unix.Close(fd)
		return -1, fmt.Errorf("%w (namespace type %#x)", ErrNotNetNS, t)
	}
	return netns.NsHandle(fd), nil
}

// isAbsentNetNS reports whether err from openNetNS or CheckNetNS proves
// that there is no network namespace at the path.
func isAbsentNetNS(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, ErrNotNetNS)
}

// unmountAll removes every mount stacked on path. A crash, or two racing
// creators, can leave more than one, and MNT_DETACH only takes the top.
func unmountAll(path string) error {
	for range 16 {
		err := unix.Unmount(path, unix.MNT_DETACH)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil // not a mount point (any more), or no file
		}
		if err != nil {
			return err
		}
	}
	return fmt.Errorf("%s: still mounted after 16 unmounts", path)
}

// CreateNetNS makes a new network namespace and bind-mounts it on path. An
// existing namespace there is kept; a plain file left by a crash between
// creating the file and mounting on it, or a mount of something else, is
// replaced. When what is there cannot be told (CheckNetNS failed for any
// other reason) it is an error and nothing is touched: unmounting a live
// namespace would cut off every interface in it.
func CreateNetNS(path string) error {
	switch err := CheckNetNS(path); {
	case err == nil:
		return nil
	case !isAbsentNetNS(err):
		return fmt.Errorf("create netns: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create netns %s: %w", path, err)
	}
	if err := unmountAll(path); err != nil {
		return fmt.Errorf("create netns %s: unmount stale mount: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o444)
	if err != nil {
		return fmt.Errorf("create netns %s: %w", path, err)
	}
	f.Close()
	err = netnsutil.OnThread(
		func() error { return unix.Unshare(unix.CLONE_NEWNET) },
		func() error {
			src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
			if err := unix.Mount(src, path, "none", unix.MS_BIND, ""); err != nil {
				return fmt.Errorf("bind mount %s: %w", src, err)
			}
			return nil
		})
	if err != nil {
		unmountAll(path)
		os.Remove(path)
		return fmt.Errorf("create netns %s: %w", path, err)
	}
	return nil
}

// DeleteNetNS unmounts and removes a namespace made by CreateNetNS; a
// missing one is fine. The namespace itself goes away with its last user.
func DeleteNetNS(path string) error {
	if err := unmountAll(path); err != nil {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

// WithNetNS runs fn on a locked OS thread inside the namespace at path. The
// calling goroutine's thread is untouched, and goroutines that fn starts
// run in the caller's namespace, not in path's. The path is opened with
// openNetNS, so anything but a network namespace is refused before any
// thread is switched.
func WithNetNS(path string, fn func() error) error {
	target, err := openNetNS(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	if err := netnsutil.WithNetNS(target, fn); err != nil {
		return fmt.Errorf("in netns %s: %w", path, err)
	}
	return nil
}

// CheckNetNS is the package's CheckNetNS, as a method: callers that take
// the Manager behind an interface check namespaces through it too.
func (m *Manager) CheckNetNS(path string) error { return CheckNetNS(path) }
