package nat

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func ruleStrings(rs []Rule) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.Table + " " + r.String()
	}
	return out
}

func TestRulesDefaults(t *testing.T) {
	got := ruleStrings(Config{}.Rules())
	want := []string{
		"nat -A VXNET-POSTROUTING -s 172.18.0.0/16 ! -o vxnet_gwbridge -j MASQUERADE",
		"filter -A VXNET-ISOLATION -j RETURN",
		"filter -A VXNET-FORWARD -j VXNET-ISOLATION",
		"filter -A VXNET-FORWARD -i vxnet_gwbridge -o vxnet_gwbridge -j DROP",
		"filter -A VXNET-FORWARD -i vxnet_gwbridge ! -o vxnet_gwbridge -j ACCEPT",
		"filter -A VXNET-FORWARD -o vxnet_gwbridge -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
		"filter -A VXNET-FORWARD -j RETURN",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Rules():\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	gotJ := ruleStrings(Config{}.Jumps())
	wantJ := []string{
		"nat -A POSTROUTING -j VXNET-POSTROUTING",
		"filter -A FORWARD -j VXNET-FORWARD",
	}
	if !slices.Equal(gotJ, wantJ) {
		t.Fatalf("Jumps() = %q, want %q", gotJ, wantJ)
	}
}

func TestRulesCustom(t *testing.T) {
	c := Config{Bridge: "gwb0", Subnet: netip.MustParsePrefix("10.200.3.7/24"), ChainPrefix: "T1"}
	got := ruleStrings(c.Rules())
	want := []string{
		"nat -A T1-POSTROUTING -s 10.200.3.0/24 ! -o gwb0 -j MASQUERADE",
		"filter -A T1-ISOLATION -j RETURN",
		"filter -A T1-FORWARD -j T1-ISOLATION",
		"filter -A T1-FORWARD -i gwb0 -o gwb0 -j DROP",
		"filter -A T1-FORWARD -i gwb0 ! -o gwb0 -j ACCEPT",
		"filter -A T1-FORWARD -o gwb0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
		"filter -A T1-FORWARD -j RETURN",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Rules():\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if g := c.GatewayAddr(); g != netip.MustParseAddr("10.200.3.1") {
		t.Fatalf("GatewayAddr() = %s", g)
	}
	// Every rule belongs to one of the declared chains, and every chain
	// jumped to is filled before the chain jumping to it.
	chains := c.Chains()
	pos := map[string]int{}
	for i, ch := range chains {
		pos[ch.Name] = i
	}
	for _, r := range c.Rules() {
		i, ok := pos[r.Chain]
		if !ok {
			t.Fatalf("rule %q in undeclared chain", r.String())
		}
		if target := r.Spec[len(r.Spec)-1]; strings.HasPrefix(target, "T1-") && pos[target] >= i {
			t.Fatalf("chain %s jumps to %s, which is filled later", r.Chain, target)
		}
	}
	for _, j := range c.Jumps() {
		if _, ok := pos[j.Spec[1]]; !ok {
			t.Fatalf("jump %q to undeclared chain", j.String())
		}
	}
}

func TestConfigValidate(t *testing.T) {
	bad := []Config{
		{Bridge: "a-very-long-bridge-name"},
		{Subnet: netip.MustParsePrefix("fd00::/64")},
		{Subnet: netip.MustParsePrefix("10.0.0.0/31")},
		{ChainPrefix: "THIS-PREFIX-IS-FAR-TOO-LONG-X"},
		{ChainPrefix: "A B"},
	}
	for _, c := range bad {
		if err := c.withDefaults().validate(); err == nil {
			t.Errorf("validate(%+v) = nil, want error", c)
		}
	}
	if err := (Config{}).withDefaults().validate(); err != nil {
		t.Errorf("defaults invalid: %v", err)
	}
}

func TestLastAddr(t *testing.T) {
	for p, want := range map[string]string{
		"172.18.0.0/16": "172.18.255.255",
		"10.0.0.0/30":   "10.0.0.3",
		"10.0.0.8/29":   "10.0.0.15",
		"10.1.2.3/32":   "10.1.2.3",
		"0.0.0.0/0":     "255.255.255.255",
	} {
		if got := lastAddr(netip.MustParsePrefix(p)); got.String() != want {
			t.Errorf("lastAddr(%s) = %s, want %s", p, got, want)
		}
	}
}
