package overlay

import (
	"context"
	"net/netip"

	"github.com/vxnet/vxnet/nat"
	"github.com/vxnet/vxnet/vtep"
)

// datapath is what the agent needs of the kernel's overlay side; in the
// agent it is a *vtep.Manager, and a fake lets Attach, Detach and the
// reconciler run in unit tests without root.
type datapath interface {
	CheckNetNS(path string) error
	NetNSPath(name string) string
	Networks() ([]string, error)
	EnsureNetwork(ctx context.Context, s vtep.NetworkSpec) ([]string, error)
	DeleteNetwork(ctx context.Context, name string) error
	RemoveStrays(ctx context.Context) ([]string, error)
	AddEndpoint(ctx context.Context, s vtep.EndpointSpec) (string, error)
	CheckEndpoints(ctx context.Context, network string, specs []vtep.EndpointSpec) []vtep.EndpointCheck
	FindPeer(ctx context.Context, network, hostVeth, containerNS string, addr netip.Prefix) (name string, hasAddr, found bool, err error)
	RemoveEndpoint(ctx context.Context, network, hostVeth string) error
	Endpoints(ctx context.Context, network string) ([]string, error)
	SyncPeers(ctx context.Context, network string, peers []vtep.Peer) (added, removed int, err error)
	UpdatePeers(ctx context.Context, network string, prev, peers []vtep.Peer) (added, removed int, err error)
	ChangePeers(ctx context.Context, network string, add, remove []vtep.Peer) (added, removed int, err error)
	HostRoutes() ([]netip.Prefix, error)
	UnderlayPrefix() (netip.Prefix, error)
	DiffPeers(ctx context.Context, network string, peers []vtep.Peer) (vtep.PeerPlan, error)
}

// egress is what the agent needs of the gateway bridge and NAT side; in
// the agent it is a *nat.Manager.
type egress interface {
	Config() nat.Config
	GatewayAddr() netip.Addr
	Ensure(ctx context.Context) ([]string, error)
	Gateways(ctx context.Context) ([]string, error)
	AddGateway(ctx context.Context, s nat.GatewaySpec) (string, []nat.Route, error)
	CheckGateway(ctx context.Context, s nat.GatewaySpec) ([]string, error)
	RemoveGateway(ctx context.Context, hostVeth string, restore []nat.Route) error
	HasOwnDefaultRoute(ctx context.Context, containerNS string) (bool, error)
	OwnDefaultRoutes(ctx context.Context, containerNS string) ([]nat.Route, error)
	SetPublished(ps []nat.Publish) bool
	SyncPublished(ctx context.Context) ([]string, error)
	CheckRules(ctx context.Context) ([]string, error)
}

var (
	_ datapath = (*vtep.Manager)(nil)
	_ egress   = (*nat.Manager)(nil)
)
