package vtep

import (
	"context"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vxnet/vxnet/internal/testnet"
)

// TestWithFDLimit checks the helper itself: without it the EMFILE tests
// could pass by never hitting the limit.
func TestWithFDLimit(t *testing.T) {
	for free := range 3 {
		var opened int
		var last error
		testnet.WithFDLimit(t, free, func() {
			var fds []int
			for range free + 1 {
				fd, err := syscall.Open("/dev/null", syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
				if err != nil {
					last = err
					break
				}
				fds = append(fds, fd)
			}
			opened = len(fds)
			for _, fd := range fds {
				syscall.Close(fd)
			}
		})
		if opened != free || !errors.Is(last, syscall.EMFILE) {
			t.Fatalf("free %d: opened %d, then %v; want EMFILE after %d", free, opened, last, free)
		}
	}
}

// datapathState is what must not change when a syscall fails: the
// network namespace's mount (its inode), and the ifindexes of br0, vxlan1
// and the endpoint's two ends. Recreating any of them changes its number.
type datapathState struct {
	nsIno                 uint64
	br, vx, veth, eth, up int
}

func readDatapath(t *testing.T, nsPath, hostVeth, containerNS string) datapathState {
	t.Helper()
	var s datapathState
	s.nsIno = nsInode(t, nsPath)
	index := func(path, name string) int {
		l := testnet.Link(t, path, name)
		up := 0
		if l.Attrs().OperState == netlink.OperUp || l.Attrs().Flags&1 != 0 {
			up = 1
		}
		s.up = s.up<<1 | up
		return l.Attrs().Index
	}
	s.br = index(nsPath, BridgeName)
	s.vx = index(nsPath, VXLANName)
	s.veth = index(nsPath, hostVeth)
	s.eth = index(containerNS, "eth0")
	return s
}

// TestEMFILEIsNotAbsence reproduces the agent that ran out of file
// descriptors: every open failing (or only the second, third... one)
// must make EnsureNetwork and CheckEndpoint fail, never take the
// namespace for a missing or foreign one, unmount it, recreate it or its
// devices, or report the endpoint gone.
func TestEMFILEIsNotAbsence(t *testing.T) {
	tn, m := networkWorld(t)
	ctx := context.Background()
	c := tn.AddNS("c")
	ep := EndpointSpec{Network: spec.Name, ContainerNS: "/var/run/netns/" + c, HostVeth: "vethemfile0",
		Addr: netip.MustParsePrefix("10.0.0.2/24"), MAC: mac("10.0.0.2"), MTU: 1450}
	if _, err := m.AddEndpoint(ctx, ep); err != nil {
		t.Fatal(err)
	}
	nsPath := m.NetNSPath(spec.Name)
	before := readDatapath(t, nsPath, ep.HostVeth, ep.ContainerNS)

	// Enough headroom for every call to succeed at the top of the range:
	// each descriptor an operation opens is, at some level, the first to
	// fail.
	const maxFree = 12
	for free := 0; free <= maxFree; free++ {
		var ensureErr, checkErr error
		var ensureChanges, checkChanges []string
		var batch []EndpointCheck
		testnet.WithFDLimit(t, free, func() {
			ensureChanges, ensureErr = m.EnsureNetwork(ctx, spec)
			checkChanges, checkErr = m.CheckEndpoint(ctx, ep)
			batch = m.CheckEndpoints(ctx, spec.Name, []EndpointSpec{ep})
		})
		t.Logf("free %d: EnsureNetwork %q %v; CheckEndpoint %q %v; CheckEndpoints %+v", free, ensureChanges, ensureErr, checkChanges, checkErr, batch)
		if free == 0 && (ensureErr == nil || checkErr == nil || batch[0].Err == nil) {
			t.Errorf("no descriptor left: EnsureNetwork %v, CheckEndpoint %v, CheckEndpoints %v; want errors", ensureErr, checkErr, batch[0].Err)
		}
		if errors.Is(checkErr, ErrEndpointGone) || errors.Is(batch[0].Err, ErrEndpointGone) {
			t.Errorf("free %d: a failed syscall taken for a gone endpoint: CheckEndpoint %v, CheckEndpoints %v", free, checkErr, batch[0].Err)
		}
		if len(ensureChanges)+len(checkChanges)+len(batch[0].Changes) > 0 {
			t.Errorf("free %d: changes on an intact datapath: %q %q %q", free, ensureChanges, checkChanges, batch[0].Changes)
		}
		if ino := nsInode(t, nsPath); ino != before.nsIno {
			t.Fatalf("free %d: the network namespace mount was replaced (inode %d, was %d)", free, ino, before.nsIno)
		}
		if after := readDatapath(t, nsPath, ep.HostVeth, ep.ContainerNS); after != before {
			t.Fatalf("free %d: datapath changed: %+v, was %+v", free, after, before)
		}
		if free == maxFree && (ensureErr != nil || checkErr != nil) {
			t.Errorf("%d descriptors should be enough: %v, %v", maxFree, ensureErr, checkErr)
		}
	}
	// The same for RemoveEndpoint of a network whose namespace cannot be
	// opened: an error, not "already gone".
	testnet.WithFDLimit(t, 0, func() {
		if err := m.RemoveEndpoint(ctx, spec.Name, ep.HostVeth); err == nil {
			t.Error("RemoveEndpoint without descriptors reported success")
		}
	})
	for free := 1; free <= 4; free++ {
		var err error
		testnet.WithFDLimit(t, free, func() { err = m.RemoveEndpoint(ctx, spec.Name, "vethnotthere") })
		_ = err // may succeed (nothing to remove) or fail; must not touch the rest
	}
	if after := readDatapath(t, nsPath, ep.HostVeth, ep.ContainerNS); after != before {
		t.Fatalf("after RemoveEndpoint attempts: datapath changed: %+v, was %+v", after, before)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(nsPath), spec.Name)); err != nil {
		t.Fatal(err)
	}
}

// TestCheckNetNSClassifies pins down the three answers: a namespace, a
// verified absence (missing, or something else there), and "cannot tell",
// which is the only safe reading of every other failure.
func TestCheckNetNSClassifies(t *testing.T) {
	testnet.RequireRoot(t)
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	mounted := filepath.Join(dir, "ns")
	t.Cleanup(func() { DeleteNetNS(mounted) })
	if err := CreateNetNS(mounted); err != nil {
		t.Fatal(err)
	}
	type want int
	const (
		isNS want = iota
		missing
		notNS
		unknown
	)
	classify := func(err error) want {
		switch {
		case err == nil:
			return isNS
		case errors.Is(err, fs.ErrNotExist) && !errors.Is(err, ErrNotNetNS):
			return missing
		case errors.Is(err, ErrNotNetNS) && !errors.Is(err, fs.ErrNotExist):
			return notNS
		}
		return unknown
	}
	for _, c := range []struct {
		path string
		want want
	}{
		{mounted, isNS},
		{"/proc/self/ns/net", isNS},
		{filepath.Join(dir, "missing"), missing},
		{filepath.Join(dir, "missing", "deeper"), missing},
		{plain, notNS},                       // a crash remnant: statfs answers tmpfs or ext4
		{dir, notNS},                         // a directory
		{"/proc/self/ns/mnt", notNS},         // nsfs, but the ioctl answers CLONE_NEWNS
		{filepath.Join(plain, "x"), unknown}, // ENOTDIR: says nothing about a namespace
	} {
		if err := CheckNetNS(c.path); classify(err) != c.want {
			t.Errorf("CheckNetNS(%s) = %v: class %d, want %d", c.path, err, classify(err), c.want)
		}
	}

	// Out of descriptors, a live namespace is neither missing nor foreign,
	// and CreateNetNS leaves it mounted.
	ino := nsInode(t, mounted)
	var checkErr, createErr error
	testnet.WithFDLimit(t, 0, func() {
		checkErr = CheckNetNS(mounted)
		createErr = CreateNetNS(mounted)
	})
	if classify(checkErr) != unknown || !errors.Is(checkErr, syscall.EMFILE) {
		t.Errorf("CheckNetNS with no descriptor left = %v; want EMFILE, neither missing nor foreign", checkErr)
	}
	if createErr == nil || !errors.Is(createErr, syscall.EMFILE) {
		t.Errorf("CreateNetNS with no descriptor left = %v; want EMFILE", createErr)
	}
	if got := nsInode(t, mounted); got != ino || CheckNetNS(mounted) != nil {
		t.Errorf("CreateNetNS replaced a live namespace: inode %d, was %d", got, ino)
	}
}
