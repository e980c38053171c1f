package main

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// lockName is the lock file that --run-dir and --state-dir each hold.
const lockName = "vxnetd.lock"

// dirLock is an exclusive flock on DIR/vxnetd.lock, held for the life of
// the process: two agents on one run dir would remove each other's
// namespaces as leaks, and two on one state dir would undo each other's
// journal.
type dirLock struct {
	f *os.File
}

// lockDir takes the lock without waiting: a second agent must refuse to
// start, not queue behind the first. flag names the option for the error.
// The file holds the holder's pid so that the refusal can name it; the
// lock itself is the flock, never the file's presence, so a crash leaves
// nothing to clean up.
func lockDir(flag, dir string) (*dirLock, error) {
	path := filepath.Join(dir, lockName)
	// os.OpenFile sets O_CLOEXEC: the iptables and ip commands the agent
	// runs must not inherit (and so prolong) the lock.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("%s %s: open lock file: %w", flag, dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder := lockHolder(f)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s %s is in use by another vxnetd (pid %s; lock file %s): %w", flag, dir, holder, path, err)
		}
		return nil, fmt.Errorf("%s %s: lock %s: %w", flag, dir, path, err)
	}
	pid := []byte(strconv.Itoa(os.Getpid()) + "\n")
	if err := f.Truncate(0); err == nil {
		_, err = f.WriteAt(pid, 0)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s %s: write pid to %s: %w", flag, dir, path, err)
	}
	return &dirLock{f: f}, nil
}

// lockHolder reads the pid the holder wrote. The holder truncates before
// it writes, so an empty file may be a holder that has just locked: read
// again briefly before giving up.
func lockHolder(f *os.File) string {
	buf := make([]byte, 32)
	for range 5 {
		n, _ := f.ReadAt(buf, 0)
		if s := string(bytes.TrimSpace(buf[:n])); s != "" {
			if _, err := strconv.Atoi(s); err == nil {
				return s
			}
			return "unknown: " + strconv.Quote(s)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return "unknown"
}

// release drops the lock. The pid is left in the file: a stale pid is
// harmless because only the flock counts.
func (l *dirLock) release() {
	if l != nil && l.f != nil {
		l.f.Close()
	}
}

// lockDirs locks every directory in order; on failure the ones already
// taken are released.
func lockDirs(dirs ...[2]string) (release func(), err error) {
	var held []*dirLock
	release = func() {
		for _, l := range held {
			l.release()
		}
	}
	seen := map[string]bool{}
	for _, d := range dirs {
		// One directory given for both (--run-dir = --state-dir) is
		// locked once: a second flock of the same file would fail
		// against ourselves.
		if abs, err := filepath.Abs(d[1]); err == nil {
			if seen[abs] {
				continue
			}
			seen[abs] = true
		}
		l, err := lockDir(d[0], d[1])
		if err != nil {
			release()
			return nil, err
		}
		held = append(held, l)
	}
	return release, nil
}

// fileLimit makes sure the soft RLIMIT_NOFILE is as high as it can be and
// returns it.
//
// Go (1.19 and later) already raises the soft limit to the hard limit
// minus one when the process starts, and restores the original soft limit
// in the processes it execs (iptables, ip), which may still use select.
// Calling syscall.Setrlimit ourselves would switch that restoring off, so
// it is done only when Go's own raise did not happen; otherwise the limit
// is only read.
func fileLimit(log *slog.Logger) (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("read RLIMIT_NOFILE: %w", err)
	}
	if lim.Max > 0 && lim.Cur < lim.Max-1 {
		raised := syscall.Rlimit{Cur: lim.Max, Max: lim.Max}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
			log.Warn("cannot raise the open file limit to the hard limit", "soft", lim.Cur, "hard", lim.Max, "err", err)
		} else {
			lim = raised
		}
	}
	log.Debug("open file limit", "soft", lim.Cur, "hard", lim.Max)
	return lim.Cur, nil
}

// maxAPIConns caps the API's concurrent connections.
const maxAPIConns = 256

// apiConnLimit is the cap for a given open file limit: at most a quarter
// of it, so that API clients can never take the descriptors the datapath
// (netlink sockets, namespace files), the store's connections and the
// journal need, however many of them connect.
func apiConnLimit(nofile uint64) int {
	n := min(uint64(maxAPIConns), nofile/4)
	return int(max(n, 1))
}
