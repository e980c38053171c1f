package vtep

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

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

// PortTakenByProgram says which program, if any, holds the UDP port in
// this namespace: its socket would take the VXLAN packets, or keep a VTEP
// from binding. The kernel's own VXLAN sockets are open in no process, and
// that is how they are told apart.
func PortTakenByProgram(port int) (string, error) {
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/net/udp", "/proc/net/udp6"} {
		data, err := os.ReadFile(f)
		if err != nil {
			if os.IsNotExist(err) {
				continue // no IPv6
			}
			return "", err
		}
		for _, line := range strings.Split(string(data), "\n")[1:] {
			fields := strings.Fields(line)
			if len(fields) < 10 {
				continue
			}
			_, hexPort, ok := strings.Cut(fields[1], ":")
			if p, err := strconv.ParseUint(hexPort, 16, 16); ok && err == nil && int(p) == port {
				inodes["socket:["+fields[9]+"]"] = true
			}
		}
	}
	if len(inodes) == 0 {
		return "", nil
	}
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, fd := range fds {
		if target, err := os.Readlink(fd); err == nil && inodes[target] {
			pid := strings.Split(fd, "/")[2]
			comm, _ := os.ReadFile("/proc/" + pid + "/comm")
			return fmt.Sprintf("%s (pid %s)", strings.TrimSpace(string(comm)), pid), nil
		}
	}
	return "", nil
}
