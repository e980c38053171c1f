package overlay

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/vxnet/vxnet/nat"
)

// portMap is one published port: HOSTPORT:CONTAINERPORT/PROTO.
type portMap struct {
	Proto           string
	Host, Container uint16
}

func (p portMap) String() string { return fmt.Sprintf("%d:%d/%s", p.Host, p.Container, p.Proto) }

// parsePublish validates --publish values and returns them in canonical
// form (the protocol spelled out), refusing a host port given twice.
func parsePublish(specs []string, vxlanPort int) ([]portMap, error) {
	var out []portMap
	seen := map[string]bool{}
	for _, s := range specs {
		p, err := parsePort(s)
		if err != nil {
			return nil, err
		}
		key := fmt.Sprintf("%d/%s", p.Host, p.Proto)
		if p.Proto == "udp" && int(p.Host) == vxlanPort {
			// DNAT of every local address would take the overlay's own
			// VXLAN traffic away from this host.
			return nil, fmt.Errorf("publish %q: host port %s is this host's VXLAN port", s, key)
		}
		if seen[key] {
			return nil, fmt.Errorf("publish %q: host port %s given twice", s, key)
		}
		seen[key] = true
		out = append(out, p)
	}
	return out, nil
}

func parsePort(s string) (portMap, error) {
	bad := func(why string) (portMap, error) {
		return portMap{}, fmt.Errorf("publish %q: %s (want HOSTPORT:CONTAINERPORT[/tcp|udp])", s, why)
	}
	spec, proto, hasProto := strings.Cut(s, "/")
	if !hasProto {
		proto = "tcp"
	}
	if proto != "tcp" && proto != "udp" {
		return bad("protocol must be tcp or udp")
	}
	hp, cp, ok := strings.Cut(spec, ":")
	if !ok {
		return bad("no ':'")
	}
	host, err := strconv.ParseUint(hp, 10, 16)
	if err != nil || host == 0 {
		return bad("host port must be 1..65535")
	}
	cont, err := strconv.ParseUint(cp, 10, 16)
	if err != nil || cont == 0 {
		return bad("container port must be 1..65535")
	}
	return portMap{Proto: proto, Host: uint16(host), Container: uint16(cont)}, nil
}

// portsInUse maps each host port/proto published by a local endpoint to
// that endpoint. Called with mu held.
func (a *Agent) portsInUse() map[string]string {
	out := map[string]string{}
	for _, l := range a.locals {
		for _, s := range l.Endpoint.Ports {
			if p, err := parsePort(s); err == nil {
				out[fmt.Sprintf("%d/%s", p.Host, p.Proto)] = l.Endpoint.Name
			}
		}
	}
	return out
}

// published lists the forwards the local endpoints want: each to the
// address of its container's gateway interface. Called with mu held.
func (a *Agent) published() []nat.Publish {
	if a.egress == nil {
		return nil
	}
	owners := a.gwAddrs.Owners()
	var out []nat.Publish
	for _, l := range a.locals {
		if l.Phase == phaseDetaching || l.Net.Internal || l.pending() {
			continue
		}
		ip, ok := owners[gatewayOwner(l.NetnsID)]
		if !ok {
			continue // no gateway yet: it comes with the next pass
		}
		for _, s := range l.Endpoint.Ports {
			if p, err := parsePort(s); err == nil {
				out = append(out, nat.Publish{Proto: p.Proto, HostPort: p.Host, Addr: ip, ContainerPort: p.Container})
			}
		}
	}
	return out
}

// syncPublished writes the published ports' rules when they may differ
// from the kernel's. Called with mu held.
func (a *Agent) syncPublished(ctx context.Context) error {
	if a.egress == nil {
		return nil
	}
	want := a.published()
	if !a.egress.SetPublished(want) {
		return nil
	}
	var err error
	if len(want) > 0 {
		_, err = a.egress.Ensure(ctx) // the chains and their hooks must exist
	} else {
		_, err = a.egress.SyncPublished(ctx) // withdrawing creates nothing
	}
	if err != nil {
		return fmt.Errorf("published ports: %w", err)
	}
	return nil
}
