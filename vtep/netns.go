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
	errc := make(chan error, 1)
	go func() {
		// unshare changes the namespace of this thread only, so the
		// goroutine must stay on it until it is back where it started.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		merr := unix.Mount(src, path, "none", unix.MS_BIND, "")
		if merr != nil {
			merr = fmt.Errorf("bind mount %s: %w", src, merr)
		}
		if err := netns.Set(orig); err != nil {
			// Left locked, the thread exits with the goroutine instead
			// of running other goroutines in the new namespace.
			errc <- errors.Join(merr, fmt.Errorf("return to original netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- merr
	}()
	if err := <-errc; err != nil {
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
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// The thread cannot be trusted any more: keep it locked so
			// that it dies with this goroutine.
			errc <- errors.Join(ferr, fmt.Errorf("return from netns %s: %w", path, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
