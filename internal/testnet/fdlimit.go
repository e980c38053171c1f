package testnet

import (
	"os"
	"slices"
	"strconv"
	"syscall"
	"testing"
)

// WithFDLimit runs fn with RLIMIT_NOFILE lowered so that exactly free more
// file descriptors can be opened: the (free+1)th open, socket or pipe fails
// with EMFILE, as in an agent that hit its limit. The limit is the whole
// process's and the test binary's other goroutines share it, so the window
// is fn alone and tests using it must not run in parallel.
func WithFDLimit(t testing.TB, free int, fn func()) {
	t.Helper()
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	restore := func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
			t.Errorf("restore RLIMIT_NOFILE: %v", err)
		}
	}
	t.Cleanup(restore) // also if fn fails the test half-way
	// The listing shows the descriptor ReadDir reads it with, closed again
	// afterwards: the lowest free number, found first.
	probe, err := syscall.Open("/dev/null", syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	syscall.Close(probe)
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var open []int
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil && n != probe {
			open = append(open, n)
		}
	}
	// A new descriptor takes the lowest free number, which the limit
	// bounds: the smallest limit with exactly free unused numbers below.
	// Descriptors at or above it stay usable: the limit refuses new ones.
	lim, below := 0, 0
	for ; lim-below < free || slices.Contains(open, lim); lim++ {
		if slices.Contains(open, lim) {
			below++
		}
	}
	cur := orig
	cur.Cur = uint64(lim)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &cur); err != nil {
		t.Fatal(err)
	}
	defer restore()
	fn()
}
