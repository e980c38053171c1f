package main

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// A second lock of the same directory is refused and names the holder's
// pid; once the first is released the directory can be taken again. flock
// locks belong to the open file description, so a second open in the same
// process conflicts just as a second agent would.
func TestLockDirRefusesSecondHolder(t *testing.T) {
	dir := t.TempDir()
	first, err := lockDir("--run-dir", dir)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, lockName))
	if err != nil || strings.TrimSpace(string(data)) != strconv.Itoa(os.Getpid()) {
		t.Fatalf("lock file holds %q (%v), want our pid %d", data, err, os.Getpid())
	}

	_, err = lockDir("--run-dir", dir)
	want := "--run-dir " + dir + " is in use by another vxnetd (pid " + strconv.Itoa(os.Getpid())
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("second lock: %v, want an error containing %q", err, want)
	}
	if !errors.Is(err, syscall.EWOULDBLOCK) {
		t.Errorf("second lock: %v does not wrap EWOULDBLOCK", err)
	}

	first.release()
	again, err := lockDir("--run-dir", dir)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	again.release()
}

// A stale pid left by a holder that died does not block the next agent:
// only the flock counts, and the new holder's pid replaces it.
func TestLockDirStalePidFile(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, lockName), []byte("99999999999\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := lockDir("--state-dir", dir)
	if err != nil {
		t.Fatal(err)
	}
	defer l.release()
	data, _ := os.ReadFile(filepath.Join(dir, lockName))
	if got := strings.TrimSpace(string(data)); got != strconv.Itoa(os.Getpid()) {
		t.Errorf("lock file holds %q, want our pid", got)
	}
}

// lockDirs releases what it took when a later directory is refused, so a
// refused agent holds nothing.
func TestLockDirsReleasesOnFailure(t *testing.T) {
	run, state := t.TempDir(), t.TempDir()
	holder, err := lockDir("--state-dir", state)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.release()
	if _, err := lockDirs([2]string{"--run-dir", run}, [2]string{"--state-dir", state}); err == nil || !strings.Contains(err.Error(), "--state-dir") {
		t.Fatalf("lockDirs: %v, want the state dir refused", err)
	}
	l, err := lockDir("--run-dir", run)
	if err != nil {
		t.Fatalf("run dir still locked after a refused lockDirs: %v", err)
	}
	l.release()
}

func TestLockDirUnwritable(t *testing.T) {
	_, err := lockDir("--run-dir", filepath.Join(t.TempDir(), "missing"))
	if err == nil || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "--run-dir") {
		t.Fatalf("lock in a missing dir: %v", err)
	}
}

func TestAPIConnLimit(t *testing.T) {
	for _, c := range []struct {
		nofile uint64
		want   int
	}{{1 << 20, 256}, {20000, 256}, {1024, 256}, {1023, 255}, {256, 64}, {2, 1}, {0, 1}} {
		if got := apiConnLimit(c.nofile); got != c.want {
			t.Errorf("apiConnLimit(%d) = %d, want %d", c.nofile, got, c.want)
		}
	}
}

// The soft limit is at least what Go left it at (hard - 1), and the
// connection cap keeps three quarters of it for everything else.
func TestFileLimit(t *testing.T) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	got, err := fileLimit(slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if got+1 < lim.Max {
		t.Errorf("soft limit %d, hard %d: not raised", got, lim.Max)
	}
	if c := apiConnLimit(got); uint64(c) > got/4 && got >= 4 {
		t.Errorf("cap %d leaves less than 3/4 of %d", c, got)
	}
}

// One directory given as both the run dir and the state dir is locked
// once, not refused against the agent itself.
func TestLockDirsSameDirOnce(t *testing.T) {
	dir := t.TempDir()
	release, err := lockDirs([2]string{"--run-dir", dir}, [2]string{"--state-dir", dir + "/."})
	if err != nil {
		t.Fatalf("same dir twice: %v", err)
	}
	release()
}
