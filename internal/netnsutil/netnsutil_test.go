package netnsutil

import (
	"errors"
	"fmt"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func links(names ...string) []netlink.Link {
	var out []netlink.Link
	for _, n := range names {
		out = append(out, &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: n}})
	}
	return out
}

func TestNextEth(t *testing.T) {
	for _, c := range []struct {
		have []string
		from int
		want string
	}{
		{nil, 0, "eth0"},
		{nil, 1, "eth1"},
		{[]string{"lo", "eth0", "eth2"}, 0, "eth1"},
		{[]string{"lo", "eth0", "eth1"}, 1, "eth2"},
		{[]string{"lo"}, 1, "eth1"}, // eth0 missing is still not handed out
		{[]string{"eth1", "eth10"}, 1, "eth2"},
	} {
		if got := NextEth(links(c.have...), c.from); got != c.want {
			t.Errorf("NextEth(%v, %d) = %s, want %s", c.have, c.from, got, c.want)
		}
	}
}

func TestRetryDump(t *testing.T) {
	calls := 0
	v, err := RetryDump(func() (int, error) {
		calls++
		if calls < 3 {
			return -1, netlink.ErrDumpInterrupted
		}
		return 42, nil
	})
	if v != 42 || err != nil || calls != 3 {
		t.Errorf("got %d, %v after %d calls; want 42, nil after 3", v, err, calls)
	}

	calls = 0
	_, err = RetryDump(func() ([]int, error) {
		calls++
		return nil, fmt.Errorf("list: %w", netlink.ErrDumpInterrupted)
	})
	if !errors.Is(err, netlink.ErrDumpInterrupted) || calls != dumpTries {
		t.Errorf("always interrupted: %v after %d calls; want ErrDumpInterrupted after %d", err, calls, dumpTries)
	}

	calls = 0
	other := errors.New("other")
	if _, err := RetryDump(func() (int, error) { calls++; return 0, other }); err != other || calls != 1 {
		t.Errorf("other error: %v after %d calls; want it after 1", err, calls)
	}
}

func TestIsLinkNotFound(t *testing.T) {
	// LinkNotFoundError cannot be given a message from outside netlink,
	// and its zero value panics when printed: the cases are named, and
	// wrapped with errors.Join, which formats nothing until asked.
	lnf := netlink.LinkNotFoundError{}
	for _, c := range []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"LinkNotFoundError", lnf, true},
		{"wrapped LinkNotFoundError", errors.Join(errors.New("look up"), lnf), true},
		{"wrapped ENODEV", fmt.Errorf("look up: %w", unix.ENODEV), true},
		{"ENOENT", unix.ENOENT, false},
		{"the text only", errors.New("no such device"), false},
		{"interrupted dump", netlink.ErrDumpInterrupted, false},
	} {
		if got := IsLinkNotFound(c.err); got != c.want {
			t.Errorf("IsLinkNotFound(%s) = %v, want %v", c.name, got, c.want)
		}
	}
}
