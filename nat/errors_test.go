package nat

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/vxnet/vxnet/internal/testnet"
)

// linkIndex is the ifindex of name in the namespace at path.
func linkIndex(t *testing.T, path, name string) int {
	t.Helper()
	return testnet.Link(t, path, name).Attrs().Index
}

// TestEMFILEIsNotGatewayGone: an agent out of file descriptors must get
// errors from CheckGateway, AddGateway and HasOwnDefaultRoute, never
// ErrGatewayGone (on which the agent deletes and recreates the gateway),
// and the gateway, its address and the container's routes stay as they
// were.
func TestEMFILEIsNotGatewayGone(t *testing.T) {
	requireRoot(t)
	ctx := testCtx(t)
	host, m := routeWorld(t)
	c, cPath := newNS(t, "emfile")
	own := withOwnDefault(t, c)
	spec := GatewaySpec{ContainerNS: cPath, HostVeth: "gw" + randHex(7), Addr: netip.MustParsePrefix("172.18.0.5/16")}
	if _, _, err := m.AddGateway(ctx, spec); err != nil {
		t.Fatal(err)
	}
	hostPath := "/run/netns/" + host
	hostIdx, peerIdx, brIdx := linkIndex(t, hostPath, spec.HostVeth), linkIndex(t, cPath, "eth1"), linkIndex(t, hostPath, m.Config().Bridge)
	addrs := mustInNS(t, c, "ip", "-4", "-o", "addr")

	const maxFree = 12
	for free := 0; free <= maxFree; free++ {
		var checkErr, addErr, ownErr error
		var changes []string
		var ifn string
		var has bool
		testnet.WithFDLimit(t, free, func() {
			changes, checkErr = m.CheckGateway(ctx, spec)
			ifn, _, addErr = m.AddGateway(ctx, spec)
			has, ownErr = m.HasOwnDefaultRoute(ctx, cPath)
		})
		t.Logf("free %d: CheckGateway %q %v; AddGateway %q %v; HasOwnDefaultRoute %v %v", free, changes, checkErr, ifn, addErr, has, ownErr)
		if free == 0 && (checkErr == nil || addErr == nil || ownErr == nil) {
			t.Errorf("no descriptor left: %v, %v, %v; want errors", checkErr, addErr, ownErr)
		}
		if errors.Is(checkErr, ErrGatewayGone) || errors.Is(addErr, ErrGatewayGone) {
			t.Fatalf("free %d: a failed syscall taken for a gone gateway: %v, %v", free, checkErr, addErr)
		}
		if len(changes) > 0 || (addErr == nil && ifn != "eth1") || (ownErr == nil && !has) {
			t.Errorf("free %d: changes %q, interface %q, own route %v on an intact gateway", free, changes, ifn, has)
		}
		if h, p, b := linkIndex(t, hostPath, spec.HostVeth), linkIndex(t, cPath, "eth1"), linkIndex(t, hostPath, m.Config().Bridge); h != hostIdx || p != peerIdx || b != brIdx {
			t.Fatalf("free %d: gateway recreated: ifindexes %d/%d/%d, were %d/%d/%d", free, h, p, b, hostIdx, peerIdx, brIdx)
		}
		if got := mustInNS(t, c, "ip", "-4", "-o", "addr"); got != addrs {
			t.Fatalf("free %d: container addresses changed:\n%s\nwere:\n%s", free, got, addrs)
		}
		if got := defaults(t, c); got != own {
			t.Fatalf("free %d: container default routes changed:\n%s\nwere:\n%s", free, got, own)
		}
		if free == maxFree && (checkErr != nil || addErr != nil || ownErr != nil) {
			t.Errorf("%d descriptors should be enough: %v, %v, %v", maxFree, checkErr, addErr, ownErr)
		}
	}
}
