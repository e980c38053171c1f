package overlay

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/ipam"
)

// Store key layout (relative to the store prefix, default "vxnet/"); every
// value is JSON with a "version" field so that a later release can tell old
// records from new ones:
//
//	networks/<name>              Network
//	endpoints/<network>/<name>   Endpoint (written last during attach)
//	nodes/<node>                 Node
//	ipam/...                     owned by package ipam
const (
	networksPrefix  = "networks/"
	endpointsPrefix = "endpoints/"
	nodesPrefix     = "nodes/"
	recordVersion   = 1
)

func networkKey(name string) string           { return networksPrefix + name }
func endpointKey(network, name string) string { return endpointsPrefix + network + "/" + name }
func nodeKey(name string) string              { return nodesPrefix + name }

// Network is the stored record of an overlay network.
type Network struct {
	Version  int          `json:"version"`
	ID       string       `json:"id"`
	Name     string       `json:"name"`
	VNI      uint32       `json:"vni"`
	Subnet   netip.Prefix `json:"subnet"`
	Gateway  netip.Addr   `json:"gateway"`
	MTU      int          `json:"mtu,omitempty"` // 0: underlay MTU - 50 on each host
	Internal bool         `json:"internal,omitempty"`
	Created  time.Time    `json:"created"`
	// Removing: network rm is under way; attaches are refused.
	Removing bool `json:"removing,omitempty"`
}

// Endpoint is the stored record of one attachment. It carries the VTEP
// address of its host so that peers can program it without another lookup.
type Endpoint struct {
	Version   int          `json:"version"`
	ID        string       `json:"id"`
	Name      string       `json:"name"`
	Network   string       `json:"network"`
	NetworkID string       `json:"network_id"`
	Node      string       `json:"node"`
	VTEP      netip.Addr   `json:"vtep"`
	IP        netip.Addr   `json:"ip"`
	MAC       HardwareAddr `json:"mac"`
	Interface string       `json:"interface"`
	// Ports published on the endpoint's host (HOSTPORT:CONTAINERPORT/PROTO).
	Ports []string `json:"ports,omitempty"`
	// Aliases are DNS names of the endpoint besides its name.
	Aliases []string  `json:"aliases,omitempty"`
	Created time.Time `json:"created"`
}

// Node is the stored record of a host.
type Node struct {
	Version int        `json:"version"`
	Name    string     `json:"name"`
	Address netip.Addr `json:"address"`
	// Underlay is the network of Address as its interface holds it:
	// overlays must stay out of every host's underlay.
	Underlay netip.Prefix `json:"underlay,omitzero"`
	Agent    string       `json:"agent_version"`
	Started  time.Time    `json:"started"`
	Seen     time.Time    `json:"last_seen"`
	// Liveness and ConsulNode: see api.Node. Peers read them when the
	// node's records vanish, to tell a Consul agent restarting from a
	// death (see hold-down in peerview.go).
	Liveness   string `json:"liveness,omitempty"`
	ConsulNode string `json:"consul_node,omitempty"`
}

// HardwareAddr marshals as the usual colon form.
type HardwareAddr net.HardwareAddr

func (h HardwareAddr) MarshalText() ([]byte, error) { return []byte(net.HardwareAddr(h).String()), nil }

func (h *HardwareAddr) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		*h = nil // not assigned yet (an attach journaled before allocation)
		return nil
	}
	m, err := net.ParseMAC(string(b))
	if err != nil {
		return err
	}
	*h = HardwareAddr(m)
	return nil
}

func (h HardwareAddr) String() string { return net.HardwareAddr(h).String() }

// decodeRecord decodes a stored value and rejects records this release does
// not understand, so a foreign or corrupted value is skipped, not trusted.
func decodeRecord(key string, data []byte, v interface{ check() error }) error {
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("decode %s: %w", key, err)
	}
	if err := v.check(); err != nil {
		return fmt.Errorf("decode %s: %w", key, err)
	}
	return nil
}

func (n *Network) check() error {
	switch {
	case n.Version != recordVersion:
		return fmt.Errorf("unsupported record version %d", n.Version)
	case n.Name == "":
		return errors.New("missing name")
	case !validID(n.ID):
		// Names of kernel objects are cut from the id (NamespaceName): a
		// foreign or truncated id must be refused here, not met there.
		return fmt.Errorf("id %q is not 64 lowercase hex characters", n.ID)
	case !n.Subnet.IsValid() || !n.Gateway.IsValid() || !n.Subnet.Contains(n.Gateway):
		return errors.New("bad subnet or gateway")
	case n.VNI == 0 || n.VNI > 1<<24-1:
		return fmt.Errorf("bad vni %d", n.VNI)
	}
	return nil
}

func (e *Endpoint) check() error {
	switch {
	case e.Version != recordVersion:
		return fmt.Errorf("unsupported record version %d", e.Version)
	case e.Name == "" || e.Network == "" || e.Node == "":
		return errors.New("missing name, network or node")
	case !validID(e.ID):
		return fmt.Errorf("id %q is not 64 lowercase hex characters", e.ID)
	case !validID(e.NetworkID):
		return fmt.Errorf("network id %q is not 64 lowercase hex characters", e.NetworkID)
	case !IsUnicastIPv4(e.IP):
		return fmt.Errorf("ip %s is not a unicast IPv4 address", e.IP)
	case !IsUnicastIPv4(e.VTEP):
		// Peers send this endpoint's traffic there: 0.0.0.0 or a group
		// address would make the kernel refuse the whole peer list.
		return fmt.Errorf("vtep %s is not a unicast IPv4 address", e.VTEP)
	case len(e.MAC) != 6 || e.MAC[0]&1 != 0 || [6]byte(e.MAC) == [6]byte{}:
		return fmt.Errorf("mac %s is not a unicast ethernet address", e.MAC)
	case !bytes.Equal(e.MAC, ipam.MACFromIP(e.IP)):
		// Every host derives the MAC from the address (attach): a record
		// that disagrees was not written by an agent.
		return fmt.Errorf("mac %s is not %s, the mac of ip %s", e.MAC, ipam.MACFromIP(e.IP), e.IP)
	}
	return nil
}

// validID reports whether id is what newID makes: 32 bytes in lowercase
// hex.
func validID(id string) bool {
	if len(id) != 64 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// IsUnicastIPv4 reports whether a is an IPv4 address one host can have: not
// 0.0.0.0, a multicast group or the limited broadcast address.
func IsUnicastIPv4(a netip.Addr) bool {
	return a.Is4() && !a.IsUnspecified() && !a.IsMulticast() && a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

func (n *Node) check() error {
	if n.Version != recordVersion || n.Name == "" {
		return errors.New("bad node record")
	}
	return nil
}

// NamespaceName is the name of a network's namespace on every host, as in
// Docker's overlay ("1-" and the first ten characters of the id).
func (n *Network) NamespaceName() string { return "1-" + idPrefix(n.ID, 10) }

// HostVeth is the br0 side of an endpoint's veth pair.
func (e *Endpoint) HostVeth() string { return "veth" + idPrefix(e.ID, 7) }

// idPrefix is s cut to at most n bytes. check() refuses short ids in the
// store, but local records of an interrupted attach are not checked, and a
// name is no reason to crash the agent.
func idPrefix(s string, n int) string {
	if len(s) < n {
		return s
	}
	return s[:n]
}

var nameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`)

// ValidateName checks a network or endpoint name: it becomes part of store
// keys and file names, so it is kept short and free of separators.
func ValidateName(kind, name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%s name is empty", kind)
	case len(name) > 64:
		return fmt.Errorf("%s name %q is longer than 64 characters", kind, name)
	case !nameRE.MatchString(name):
		return fmt.Errorf("%s name %q: use letters, digits, '_', '.', '-', starting with a letter or digit", kind, name)
	}
	return nil
}

func (n *Network) apiView(localMTU int) api.Network {
	mtu := n.MTU
	if mtu == 0 {
		mtu = localMTU
	}
	return api.Network{
		Name: n.Name, ID: n.ID, VNI: n.VNI, Subnet: n.Subnet.String(), Gateway: n.Gateway.String(),
		MTU: mtu, Internal: n.Internal, Created: n.Created,
	}
}

func (e *Endpoint) apiView() api.Endpoint {
	return api.Endpoint{
		Name: e.Name, ID: e.ID, Network: e.Network, Node: e.Node, IP: e.IP.String(),
		MAC: e.MAC.String(), Interface: e.Interface, VTEP: e.VTEP.String(), Ports: e.Ports, Aliases: e.Aliases, Created: e.Created,
	}
}

// sanitizeNetnsName turns a namespace path into a candidate endpoint name.
func sanitizeNetnsName(path string) string {
	base := path[strings.LastIndex(path, "/")+1:]
	var b strings.Builder
	for _, r := range base {
		if r < 128 && (r == '_' || r == '.' || r == '-' || ('a' <= r && r <= 'z') || ('A' <= r && r <= 'Z') || ('0' <= r && r <= '9')) {
			b.WriteRune(r)
		}
	}
	s := strings.TrimLeft(b.String(), "_.-")
	if len(s) > 64 {
		s = s[:64]
	}
	return s
}
