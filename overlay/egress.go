package overlay

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/nat"
)

// A container (one network namespace) gets one gateway interface on the
// host's gateway bridge while it has at least one endpoint on a network
// that is not internal: its default route, NAT'd out of the host. The
// gateway is the container's, not an endpoint's, so it is keyed by the
// namespace's identity.

// gatewayOwner names a container in the gateway address book.
func gatewayOwner(id nsID) string { return fmt.Sprintf("netns:%d:%d", id.Dev, id.Ino) }

// gatewayVeth is the host side of a container's gateway veth; derived from
// the namespace's identity so that it is found again after a restart.
func gatewayVeth(id nsID) string {
	h := fnv.New32a()
	fmt.Fprintf(h, "%d:%d", id.Dev, id.Ino)
	return fmt.Sprintf("gw%07x", h.Sum32()&0xfffffff)
}

// gatewayIfName is the name of a container's gateway interface: the
// first free ethN (nat's default), except in a container whose interfaces
// a runtime names (Docker counts eth0, eth1... itself, and a second
// network's interface would find its name taken).
func gatewayIfName(l *localEndpoint) string {
	if l.Handoff != "" {
		return "vxgw0"
	}
	return ""
}

// wantGateways lists, per container, one local endpoint that needs egress:
// an attached one, or an attach under way (inflight), which made or is
// making the gateway. What an interrupted attach or detach left needs
// none: a gateway made for it would be the container's only interface,
// taking eth0 and the default route for an endpoint that does not exist.
func wantGateways(locals map[string]*localEndpoint, inflight map[string]bool) map[nsID]*localEndpoint {
	out := map[nsID]*localEndpoint{}
	keys := make([]string, 0, len(locals))
	for k := range locals {
		keys = append(keys, k)
	}
	sort.Strings(keys) // deterministic choice of the representative
	for _, k := range keys {
		l := locals[k]
		// An attach under way counts once its overlay interface exists:
		// made before it, the gateway would take eth0's place.
		if (l.Phase == phaseAttached || l.Phase == phaseAttaching && inflight[k] && l.Endpoint.Interface != "") && !l.Net.Internal && !l.pending() {
			if _, ok := out[l.NetnsID]; !ok {
				out[l.NetnsID] = l
			}
		}
	}
	return out
}

// ensureGateway gives the endpoint's container its gateway interface if it
// has none, and says what the container's egress is (nil without egress).
func (a *Agent) ensureGateway(ctx context.Context, l *localEndpoint) (*api.Egress, error) {
	created, ifName, err := a.addGateway(ctx, l)
	if err != nil || a.egress == nil || l.Net.Internal {
		return nil, err
	}
	eg := &api.Egress{Address: a.gwAddrs.Owners()[gatewayOwner(l.NetnsID)].String(), DefaultRoute: "via " + a.egress.GatewayAddr().String()}
	if created {
		eg.Interface = ifName
	}
	if own, err := a.egress.HasOwnDefaultRoute(ctx, l.Netns); err == nil && own {
		eg.DefaultRoute = "own"
	}
	return eg, nil
}

// addGateway makes the container's gateway interface if it has none;
// created tells whether it did, and ifName its name in the container.
func (a *Agent) addGateway(ctx context.Context, l *localEndpoint) (created bool, ifName string, err error) {
	if a.egress == nil || l.Net.Internal {
		return false, "", nil
	}
	// The container's representative endpoint says what becomes of the
	// container's own default route.
	rep := l
	if w := wantGateways(a.locals, a.inflight)[l.NetnsID]; w != nil {
		rep = w
	}
	veth := gatewayVeth(l.NetnsID)
	have, err := a.egress.Gateways(ctx)
	if err != nil {
		return false, "", fmt.Errorf("gateway: %w", err)
	}
	// An existing gateway is left as it is, unless the container's own
	// default route is to be replaced: adopting it does that.
	exists := slices.Contains(have, veth)
	if exists && !rep.ReplaceDefault {
		return false, "", nil
	}
	// The bridge and rules are checked once here and then by every full
	// reconcile: running iptables on every attach would cost more than the
	// rest of the attach.
	if !a.egressReady {
		if changes, err := a.egress.Ensure(ctx); err != nil {
			return false, "", fmt.Errorf("gateway bridge: %w", err)
		} else if len(changes) > 0 {
			a.log.Info("gateway bridge and NAT rules set up", "changes", changes)
		}
		a.egressReady = true
	}
	owner := gatewayOwner(l.NetnsID)
	ip, err := a.gwAddrs.Allocate(owner)
	if err != nil {
		return false, "", fmt.Errorf("gateway address: %w", err)
	}
	spec := nat.GatewaySpec{ContainerNS: l.Netns, HostVeth: veth, IfName: gatewayIfName(rep), Addr: prefixFor(ip, a.egress.Config().Subnet.Bits()),
		ReplaceDefault: rep.ReplaceDefault}
	if rep.ReplaceDefault {
		// On disk before they go: a crash between their removal and
		// their record would lose the container's own routes for good.
		own, err := a.egress.OwnDefaultRoutes(ctx, l.Netns)
		if err == nil && len(own) > 0 {
			err = a.gwAddrs.SetRoutes(owner, append(a.gwAddrs.Routes(owner), own...))
		}
		if err != nil {
			if !exists {
				a.gwAddrs.Release(owner)
			}
			return false, "", fmt.Errorf("gateway interface: record the container's default routes: %w", err)
		}
	}
	ifName, replaced, err := a.egress.AddGateway(ctx, spec)
	if err != nil {
		// The bridge may have gone since it was last checked: check it
		// now and try once more.
		if _, eerr := a.egress.Ensure(ctx); eerr == nil {
			ifName, replaced, err = a.egress.AddGateway(ctx, spec)
		}
	}
	if err != nil {
		if !exists {
			a.gwAddrs.Release(owner)
		}
		return false, "", fmt.Errorf("gateway interface: %w", err)
	}
	if len(replaced) > 0 {
		// Added to what earlier attaches replaced: detach restores all.
		if err := a.gwAddrs.SetRoutes(owner, append(a.gwAddrs.Routes(owner), replaced...)); err != nil {
			// Unrecorded, no detach could put them back: put them back
			// now, with the gateway, which the next pass makes again.
			if rerr := a.egress.RemoveGateway(ctx, veth, replaced); rerr != nil {
				err = errors.Join(err, rerr)
			}
			if !exists {
				a.gwAddrs.Release(owner)
			}
			return false, "", fmt.Errorf("gateway interface: %w", err)
		}
	}
	return !exists, ifName, nil
}

// removeGateway takes a container's gateway interface and address away.
func (a *Agent) removeGateway(ctx context.Context, id nsID) error {
	if a.egress == nil {
		return nil
	}
	owner := gatewayOwner(id)
	// The book keeps the routes until they are back: a failed restore is
	// tried again by the next reconcile, which removes gateways of
	// owners no endpoint wants.
	if err := a.egress.RemoveGateway(ctx, gatewayVeth(id), a.gwAddrs.Routes(owner)); err != nil {
		return fmt.Errorf("remove gateway: %w", err)
	}
	return a.gwAddrs.Release(owner)
}

// dropIdleGateway removes a container's gateway once no local endpoint of
// it needs egress any more.
func (a *Agent) dropIdleGateway(ctx context.Context, id nsID) {
	if _, needed := wantGateways(a.locals, a.inflight)[id]; needed {
		return
	}
	if err := a.removeGateway(ctx, id); err != nil {
		a.log.Warn("remove gateway interface", "err", err)
	}
}

// reconcileEgress makes the gateway interfaces match the local endpoints:
// every container that needs one has it (repaired or recreated), and
// interfaces and addresses of containers that need none are removed.
func (a *Agent) reconcileEgress(ctx context.Context) {
	if a.egress == nil {
		return
	}
	want := wantGateways(a.locals, a.inflight)
	if dirty := a.egress.SetPublished(a.published()); dirty && len(want) == 0 {
		// No gateway to set up, but forwards to withdraw.
		if _, err := a.egress.SyncPublished(ctx); err != nil {
			a.log.Warn("withdraw published ports", "err", err)
		}
	}
	if len(want) > 0 {
		a.egressReady = false
		if changes, err := a.egress.Ensure(ctx); err != nil {
			a.log.Error("gateway bridge and NAT rules", "err", err)
			return
		} else if len(changes) > 0 {
			a.log.Warn("gateway bridge or NAT rules repaired", "changes", changes)
			a.repaired("nat", "", strings.Join(changes, "; "), 1)
		}
		a.egressReady = true
	}
	wantVeth := map[string]bool{}
	owners := map[string]bool{}
	book := a.gwAddrs.Owners()
	for id, l := range want {
		wantVeth[gatewayVeth(id)] = true
		owners[gatewayOwner(id)] = true
		ip, ok := book[gatewayOwner(id)]
		if !ok {
			if _, _, err := a.addGateway(ctx, l); err != nil {
				a.log.Error("gateway interface", "endpoint", l.Endpoint.Name, "err", err)
			}
			continue
		}
		spec := nat.GatewaySpec{ContainerNS: l.Netns, HostVeth: gatewayVeth(id), IfName: gatewayIfName(l), Addr: prefixFor(ip, a.egress.Config().Subnet.Bits()),
			ReplaceDefault: l.ReplaceDefault}
		changes, err := a.egress.CheckGateway(ctx, spec)
		if ctx.Err() != nil {
			return
		}
		switch {
		case errors.Is(err, nat.ErrGatewayGone) && localExists(l):
			// A half of it may remain. The routes the first attach
			// replaced stay recorded: this one replaces what is there now.
			a.egress.RemoveGateway(ctx, spec.HostVeth, nil)
			_, replaced, err := a.egress.AddGateway(ctx, spec)
			if err == nil && len(replaced) > 0 {
				if err = a.gwAddrs.SetRoutes(gatewayOwner(id), append(a.gwAddrs.Routes(gatewayOwner(id)), replaced...)); err != nil {
					err = fmt.Errorf("record replaced default routes %v (detach will not restore them): %w", replaced, err)
				}
			}
			if err != nil {
				a.log.Error("recreate gateway interface", "endpoint", l.Endpoint.Name, "err", err)
			} else {
				a.log.Warn("gateway interface was missing; recreated", "endpoint", l.Endpoint.Name)
				a.repaired("gateway_interface", l.Endpoint.Network, l.Endpoint.Name+": recreated", 1)
			}
		case errors.Is(err, nat.ErrGatewayGone):
			// The container is gone; its endpoints are removed by the
			// endpoint pass, and the gateway below once nothing wants it.
		case err != nil:
			a.log.Error("check gateway interface", "endpoint", l.Endpoint.Name, "err", err)
		case len(changes) > 0:
			a.log.Warn("gateway interface repaired", "endpoint", l.Endpoint.Name, "changes", changes)
			a.repaired("gateway_interface", l.Endpoint.Network, l.Endpoint.Name+": "+strings.Join(changes, "; "), 1)
		}
	}
	have, err := a.egress.Gateways(ctx)
	if err != nil {
		if ctx.Err() == nil {
			a.log.Warn("list gateway interfaces", "err", err)
		}
		return
	}
	if len(a.journalGaps) > 0 {
		return // a gateway of an unreadable journal record is no leak
	}
	for _, g := range have {
		if !wantVeth[g] {
			a.log.Warn("removing gateway interface of no container", "interface", g)
			a.leakRemoved("gateway_interface", "", g, 1)
			if err := a.egress.RemoveGateway(ctx, g, nil); err != nil {
				a.log.Warn("remove gateway interface", "interface", g, "err", err)
			}
		}
	}
	for owner := range a.gwAddrs.Owners() {
		if owners[owner] {
			continue
		}
		// Through removeGateway, so that the default routes its attach
		// replaced are put back (the veth is gone already, or goes now).
		var id nsID
		if _, err := fmt.Sscanf(owner, "netns:%d:%d", &id.Dev, &id.Ino); err != nil || gatewayOwner(id) != owner {
			a.gwAddrs.Release(owner)
			continue
		}
		if err := a.removeGateway(ctx, id); err != nil {
			a.log.Warn("remove gateway of no container", "owner", owner, "err", err)
		}
	}
}

func prefixFor(ip netip.Addr, bits int) netip.Prefix { return netip.PrefixFrom(ip, bits) }

// CheckGatewaySubnet refuses a gateway subnet that overlaps an overlay
// network: containers would have two routes to the same addresses.
func (a *Agent) CheckGatewaySubnet(ctx context.Context) error {
	if a.egress == nil {
		return nil
	}
	nets, err := a.Networks(ctx)
	if err != nil {
		return err
	}
	sub := a.egress.Config().Subnet
	for _, n := range nets {
		if p, err := netip.ParsePrefix(n.Subnet); err == nil && p.Overlaps(sub) {
			return fmt.Errorf("--gateway-subnet %s overlaps network %s (%s): choose another", sub, n.Name, n.Subnet)
		}
	}
	return nil
}
