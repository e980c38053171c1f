package vtep

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// IsNetNS reports whether path is a network namespace (a bind mount of one,
// or a /proc/PID/ns/net link). The filesystem magic alone would also accept
// other namespace types, hence the ioctl.
func IsNetNS(path string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil || st.Type != unix.NSFS_MAGIC {
		return false
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	t, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	return err == nil && t == unix.CLONE_NEWNET
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
// replaced.
func CreateNetNS(path string) error {
	if IsNetNS(path) {
		return nil
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
	err = onThread(
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
// run in the caller's namespace, not in path's.
func WithNetNS(path string, fn func() error) error {
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	if !IsNetNS(path) {
		return fmt.Errorf("open netns %s: not a network namespace", path)
	}
	if err := onThread(func() error { return netns.Set(target) }, fn); err != nil {
		return fmt.Errorf("in netns %s: %w", path, err)
	}
	return nil
}

// onThread runs fn on a locked OS thread whose network namespace enter
// changed, then puts the thread back in its namespace. The calling
// goroutine's thread is never touched. A thread that cannot be put back is
// left locked, so that it dies with its goroutine instead of running other
// goroutines in the wrong namespace.
func onThread(enter, fn func() error) error {
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
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return to the original netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
