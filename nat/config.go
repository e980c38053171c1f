package nat

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
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
	NetNS  string
	Logger *slog.Logger
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

// Chains lists the manager's own chains in the order they must be filled:
// a chain is filled before any chain that jumps to it.
func (c Config) Chains() []Chain {
	c = c.withDefaults()
	return []Chain{
		{"nat", c.postroutingChain()},
		{"filter", c.isolationChain()},
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
		{"filter", fwd, []string{"-i", br, "-o", br, "-j", "DROP"}},
		{"filter", fwd, []string{"-i", br, "!", "-o", br, "-j", "ACCEPT"}},
		{"filter", fwd, []string{"-o", br, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"}},
		{"filter", fwd, []string{"-j", "RETURN"}},
	}
}

// Jumps returns the rules that hook the manager's chains into built-in
// chains. Each must exist exactly once.
func (c Config) Jumps() []Rule {
	c = c.withDefaults()
	return []Rule{
		{"nat", "POSTROUTING", []string{"-j", c.postroutingChain()}},
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
