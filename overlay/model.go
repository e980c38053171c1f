package overlay

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"time"

	"github.com/vxnet/vxnet/api"
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
	Created   time.Time    `json:"created"`
}

// Node is the stored record of a host.
type Node struct {
	Version int        `json:"version"`
	Name    string     `json:"name"`
	Address netip.Addr `json:"address"`
	Agent   string     `json:"agent_version"`
	Started time.Time  `json:"started"`
	Seen    time.Time  `json:"last_seen"`
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
	case n.ID == "" || n.Name == "":
		return errors.New("missing id or name")
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
	case !e.IP.Is4() || !e.VTEP.Is4():
		return errors.New("bad ip or vtep address")
	case len(e.MAC) != 6:
		return errors.New("bad mac")
	}
	return nil
}

func (n *Node) check() error {
	if n.Version != recordVersion || n.Name == "" {
		return errors.New("bad node record")
	}
	return nil
}

// NamespaceName is the name of a network's namespace on every host, as in
// Docker's overlay ("1-" and the first ten characters of the id).
func (n *Network) NamespaceName() string { return "1-" + n.ID[:10] }

// HostVeth is the br0 side of an endpoint's veth pair.
func (e *Endpoint) HostVeth() string { return "veth" + e.ID[:7] }

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
		MAC: e.MAC.String(), Interface: e.Interface, VTEP: e.VTEP.String(), Created: e.Created,
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
