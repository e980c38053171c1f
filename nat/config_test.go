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
		"filter -A VXNET-FORWARD -j VXNET-PUBLISH",
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
		"nat -A PREROUTING -m addrtype --dst-type LOCAL -j VXNET-DNAT",
		"nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j VXNET-DNAT",
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
		"filter -A T1-FORWARD -j T1-PUBLISH",
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
		if _, ok := pos[j.Spec[len(j.Spec)-1]]; !ok {
			t.Fatalf("jump %q to undeclared chain", j.String())
		}
	}
}

// Published ports: written in the form iptables -S prints them, so that an
// unchanged set is recognised and never rewritten.
func TestPublishRules(t *testing.T) {
	c := Config{Bridge: "gwb0", ChainPrefix: "T1"}
	ps := []Publish{
		{Proto: "udp", HostPort: 5353, Addr: netip.MustParseAddr("10.200.3.9"), ContainerPort: 53},
		{Proto: "tcp", HostPort: 8080, Addr: netip.MustParseAddr("10.200.3.2"), ContainerPort: 80},
	}
	SortPublished(ps)
	got := ruleStrings(c.PublishRules(ps))
	want := []string{
		"nat -A T1-DNAT ! -i gwb0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.200.3.2:80",
		"nat -A T1-DNAT ! -i gwb0 -p udp -m udp --dport 5353 -j DNAT --to-destination 10.200.3.9:53",
		"filter -A T1-PUBLISH -d 10.200.3.2/32 ! -i gwb0 -o gwb0 -p tcp -m tcp --dport 80 -j ACCEPT",
		"filter -A T1-PUBLISH -d 10.200.3.9/32 ! -i gwb0 -o gwb0 -p udp -m udp --dport 53 -j ACCEPT",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("PublishRules():\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if len(c.PublishRules(nil)) != 0 {
		t.Fatal("rules without published ports")
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

// A whole table's -S listing gives which chains exist and each one's
// rules as a chain's listing would: counters dropped wherever iptables
// puts them (after the rule with -v, before it in 1.8.0 with nft).
func TestTableListing(t *testing.T) {
	tl := &tableListing{chains: map[Chain]bool{}, rules: map[Chain][]string{}}
	tl.add("filter", `-P INPUT ACCEPT
-P FORWARD DROP
-N VXNET-FORWARD
-N EMPTY
-A FORWARD -j VXNET-FORWARD
[0:0] -A FORWARD -s 10.99.0.0/16  -j ACCEPT
-A VXNET-FORWARD -i br -o br -j DROP -c 5 420
`)
	for _, ch := range []string{"INPUT", "FORWARD", "VXNET-FORWARD", "EMPTY"} {
		if !tl.has(Chain{"filter", ch}) {
			t.Errorf("chain %s missing", ch)
		}
	}
	if tl.has(Chain{"nat", "FORWARD"}) || tl.has(Chain{"filter", "OUTPUT"}) {
		t.Error("a chain of no listing")
	}
	want := map[string][]string{
		"FORWARD":       {"-A FORWARD -j VXNET-FORWARD", "-A FORWARD -s 10.99.0.0/16 -j ACCEPT"},
		"VXNET-FORWARD": {"-A VXNET-FORWARD -i br -o br -j DROP"},
		"EMPTY":         nil,
	}
	for ch, w := range want {
		if got := tl.rules[Chain{"filter", ch}]; !slices.Equal(got, w) {
			t.Errorf("%s: %q, want %q", ch, got, w)
		}
	}
	if !waitSupported(1, 4, 20) || !waitSupported(1, 8, 9) || waitSupported(1, 4, 19) {
		t.Error("waitSupported")
	}
}
