package vtep

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// HostRoutes lists the destinations of the host namespace's IPv4 routes
// in its main table, default routes left out: an overlay subnet that
// overlaps one of them would make the host's own traffic there ambiguous.
func (m *Manager) HostRoutes() ([]netip.Prefix, error) {
	routes, err := dump(func() ([]netlink.Route, error) { return m.hostH.RouteList(nil, netlink.FAMILY_V4) })
	if err != nil {
		return nil, fmt.Errorf("list host routes: %w", err)
	}
	var out []netip.Prefix
	for _, r := range routes {
		if p := prefixOf(r.Dst); p.IsValid() && p.Bits() > 0 {
			out = append(out, p.Masked())
		}
	}
	return out, nil
}

// UnderlayPrefix is the network of the host's underlay address (Local),
// as its interface holds it: other hosts keep overlays out of it.
func (m *Manager) UnderlayPrefix() (netip.Prefix, error) {
	addrs, err := m.hostH.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("underlay prefix: %w", err)
	}
	for _, a := range addrs {
		if p := prefixOf(a.IPNet); p.IsValid() && p.Addr() == m.cfg.Local {
			return p.Masked(), nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("underlay prefix: no interface holds %s", m.cfg.Local)
}
