package nat

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Defaults mirror Docker's docker_gwbridge, with names of our own so the two
// can coexist on one host.
const (
	DefaultBridge      = "vxnet_gwbridge"
	DefaultChainPrefix = "VXNET"
)

// DefaultSubnet is the gateway subnet used when Config.Subnet is zero.
var DefaultSubnet = netip.MustParsePrefix("172.18.0.0/16")

// maxIfName is IFNAMSIZ-1: the kernel rejects longer interface names.
const maxIfName = 15

// maxChainName is the iptables limit (XT_EXTENSION_MAXNAMELEN-1).
const maxChainName = 28

// Config describes the gateway bridge and chains of one Manager.
type Config struct {
	// Bridge is the gateway bridge's name.
	Bridge string
	// Subnet is the gateway subnet; the bridge holds its first host address,
	// which is every container's default gateway.
	Subnet netip.Prefix
	// ChainPrefix names the chains: <prefix>-POSTROUTING (nat),
	// <prefix>-FORWARD and <prefix>-ISOLATION (filter).
	ChainPrefix string
	// NetNS is the path of the network namespace the manager works in (the
	// "host"). Empty means the namespace of the thread that calls New, which
	// for the agent is the root namespace. Tests use it to run a whole host
	// inside a throwaway namespace.
	NetNS string
	// IPTables is the iptables program to drive: "iptables-nft" or
	// "iptables-legacy" (a name on PATH or a path). Empty: "iptables", the
	// distribution's choice, which is also what other tools on the host
	// use; rules of the two backends must not be mixed.
	IPTables string
	// ForwardingMark is a file where the manager notes that it turned
	// net.ipv4.ip_forward on, so that Cleanup turns it off again; empty:
	// Cleanup leaves it on (other software may rely on it).
	ForwardingMark string
	Logger         *slog.Logger
}

// Rule is one iptables rule: Spec is what follows "-A <Chain>".
type Rule struct {
	Table, Chain string
	Spec         []string
}

// String renders the rule the way "iptables -S" prints it, which is also the
// form Ensure compares against.
func (r Rule) String() string {
	return "-A " + r.Chain + " " + strings.Join(r.Spec, " ")
}

// Chain is one of the manager's own chains.
type Chain struct {
	Table, Name string
}

func (c Config) withDefaults() Config {
	if c.Bridge == "" {
		c.Bridge = DefaultBridge
	}
	if !c.Subnet.IsValid() {
		c.Subnet = DefaultSubnet
	}
	c.Subnet = c.Subnet.Masked()
	if c.ChainPrefix == "" {
		c.ChainPrefix = DefaultChainPrefix
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

func (c Config) validate() error {
	var errs []error
	if len(c.Bridge) > maxIfName {
		errs = append(errs, fmt.Errorf("bridge name %q longer than %d characters", c.Bridge, maxIfName))
	}
	if strings.ContainsAny(c.Bridge, " /\t\n") {
		errs = append(errs, fmt.Errorf("bridge name %q contains a space or slash", c.Bridge))
	}
	if !c.Subnet.Addr().Is4() {
		errs = append(errs, fmt.Errorf("subnet %s is not IPv4 (only iptables, not ip6tables, is managed)", c.Subnet))
	} else if c.Subnet.Bits() > 30 {
		errs = append(errs, fmt.Errorf("subnet %s too small: needs room for a gateway and containers", c.Subnet))
	}
	if strings.ContainsAny(c.ChainPrefix, " \t\n!") {
		errs = append(errs, fmt.Errorf("chain prefix %q contains whitespace or '!'", c.ChainPrefix))
	}
	if len(c.ChainPrefix)+len("-POSTROUTING") > maxChainName {
		errs = append(errs, fmt.Errorf("chain prefix %q too long: chain names are limited to %d characters", c.ChainPrefix, maxChainName))
	}
	return errors.Join(errs...)
}

// GatewayAddr is the bridge's address: the first host address of Subnet.
func (c Config) GatewayAddr() netip.Addr {
	return c.withDefaults().Subnet.Addr().Next()
}

func (c Config) postroutingChain() string { return c.ChainPrefix + "-POSTROUTING" }
func (c Config) forwardChain() string     { return c.ChainPrefix + "-FORWARD" }
func (c Config) isolationChain() string   { return c.ChainPrefix + "-ISOLATION" }
func (c Config) dnatChain() string        { return c.ChainPrefix + "-DNAT" }
func (c Config) publishChain() string     { return c.ChainPrefix + "-PUBLISH" }

// Publish is a port of the host's addresses forwarded to a container's
// gateway address (vxnet attach --publish).
type Publish struct {
	Proto         string // "tcp" or "udp"
	HostPort      uint16
	Addr          netip.Addr // the container's address on the gateway bridge
	ContainerPort uint16
}

func (p Publish) String() string {
	return fmt.Sprintf("%d->%s:%d/%s", p.HostPort, p.Addr, p.ContainerPort, p.Proto)
}

// SortPublished orders published ports the way their rules are written, so
// that the same set always makes the same chains.
func SortPublished(ps []Publish) {
	slices.SortFunc(ps, func(a, b Publish) int {
		return cmp.Or(cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.HostPort, b.HostPort),
			a.Addr.Compare(b.Addr), cmp.Compare(a.ContainerPort, b.ContainerPort))
	})
}

// Chains lists the manager's own chains in the order they must be filled:
// a chain is filled before any chain that jumps to it.
func (c Config) Chains() []Chain {
	c = c.withDefaults()
	return []Chain{
		{"nat", c.postroutingChain()},
		{"nat", c.dnatChain()},
		{"filter", c.isolationChain()},
		{"filter", c.publishChain()},
		{"filter", c.forwardChain()},
	}
}

// Rules returns the exact content of the manager's chains, in chain order
// (see Chains) and rule order. The reasons for each rule are in the package
// documentation.
func (c Config) Rules() []Rule {
	c = c.withDefaults()
	br, sub := c.Bridge, c.Subnet.String()
	fwd := c.forwardChain()
	return []Rule{
		{"nat", c.postroutingChain(), []string{"-s", sub, "!", "-o", br, "-j", "MASQUERADE"}},
		{"filter", c.isolationChain(), []string{"-j", "RETURN"}},
		{"filter", fwd, []string{"-j", c.isolationChain()}},
		{"filter", fwd, []string{"-j", c.publishChain()}},
		{"filter", fwd, []string{"-i", br, "-o", br, "-j", "DROP"}},
		{"filter", fwd, []string{"-i", br, "!", "-o", br, "-j", "ACCEPT"}},
		{"filter", fwd, []string{"-o", br, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"}},
		{"filter", fwd, []string{"-j", "RETURN"}},
	}
}

// PublishRules returns the content of the DNAT and PUBLISH chains for the
// given published ports (sorted with SortPublished): a DNAT of the host
// port to the container for traffic that did not come from the bridge,
// and a FORWARD exception for exactly that traffic, since the FORWARD chain
// otherwise lets only replies into the bridge.
func (c Config) PublishRules(ps []Publish) []Rule {
	c = c.withDefaults()
	br := c.Bridge
	var dnat, accept []Rule
	for _, p := range ps {
		dnat = append(dnat, Rule{"nat", c.dnatChain(), []string{"!", "-i", br, "-p", p.Proto, "-m", p.Proto,
			"--dport", strconv.Itoa(int(p.HostPort)), "-j", "DNAT", "--to-destination",
			netip.AddrPortFrom(p.Addr, p.ContainerPort).String()}})
		accept = append(accept, Rule{"filter", c.publishChain(), []string{"-d", p.Addr.String() + "/32", "!", "-i", br, "-o", br,
			"-p", p.Proto, "-m", p.Proto, "--dport", strconv.Itoa(int(p.ContainerPort)), "-j", "ACCEPT"}})
	}
	return append(dnat, accept...)
}

// Jumps returns the rules that hook the manager's chains into built-in
// chains. Each must exist exactly once. Published ports are reached on any
// local address, from outside (PREROUTING) and from the host itself
// (OUTPUT; not through 127.0.0.0/8, which the kernel does not route to
// another interface).
func (c Config) Jumps() []Rule {
	c = c.withDefaults()
	return []Rule{
		{"nat", "POSTROUTING", []string{"-j", c.postroutingChain()}},
		{"nat", "PREROUTING", []string{"-m", "addrtype", "--dst-type", "LOCAL", "-j", c.dnatChain()}},
		{"nat", "OUTPUT", []string{"!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL", "-j", c.dnatChain()}},
		{"filter", "FORWARD", []string{"-j", c.forwardChain()}},
	}
}

// rulesOf returns the wanted rules of one chain.
func rulesOf(rules []Rule, ch Chain) []Rule {
	var out []Rule
	for _, r := range rules {
		if r.Table == ch.Table && r.Chain == ch.Name {
			out = append(out, r)
		}
	}
	return out
}
