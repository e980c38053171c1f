// Package api holds the agent's HTTP/JSON API: request and response types and
// a client that speaks it over the agent's unix socket.
//
// Routes (all JSON; errors are {"error": "...", "code": "..."} with a 4xx or
// 5xx status):
//
//	GET    /v1/version
//	GET    /v1/status
//	GET    /v1/networks
//	POST   /v1/networks                           CreateNetworkRequest -> Network
//	GET    /v1/networks/{name}                    -> NetworkDetail
//	DELETE /v1/networks/{name}
//	POST   /v1/networks/{name}/endpoints          AttachRequest -> Endpoint
//	DELETE /v1/networks/{name}/endpoints/{endpoint}
//	PUT    /v1/networks/{name}/endpoints/{endpoint}/netns    NetnsRequest: where a handed-off interface went
//	PUT    /v1/networks/{name}/endpoints/{endpoint}/aliases  AliasesRequest: its other DNS names
//	POST   /v1/networks/{name}/addresses          ReserveRequest -> Reservation
//	DELETE /v1/networks/{name}/addresses/{ip}     release a reservation (not an endpoint's address)
//	POST   /v1/network-plans                      CreateNetworkRequest -> NetworkPlan (creates nothing)
//	GET    /v1/endpoints[?network=NAME]           -> []Endpoint
//	GET    /v1/nodes                              -> []Node
//	DELETE /v1/nodes/{name}                       forget a gone host, release its addresses
package api

import "time"

// Version is the agent and CLI version.
var Version = "0.1.0"

// Network is an overlay network as users see it.
type Network struct {
	Name     string    `json:"name"`
	ID       string    `json:"id"`
	VNI      uint32    `json:"vni"`
	Subnet   string    `json:"subnet"`
	Gateway  string    `json:"gateway"`
	MTU      int       `json:"mtu"`
	Internal bool      `json:"internal"`
	Created  time.Time `json:"created"`
	// Error is set, and only Name, when the store holds a record under
	// the name that does not decode: the name is taken, rm removes it.
	Error string `json:"error,omitempty"`
}

// NetworkDetail is what inspect returns: the network and its endpoints on
// every host.
type NetworkDetail struct {
	Network
	// Namespace is the network's namespace on this host, empty when this
	// host has no endpoint of the network.
	Namespace string     `json:"namespace,omitempty"`
	Endpoints []Endpoint `json:"endpoints"`
}

// Endpoint is one container's attachment to a network.
type Endpoint struct {
	Name      string   `json:"name"`
	ID        string   `json:"id"`
	Network   string   `json:"network"`
	Node      string   `json:"node"`
	IP        string   `json:"ip"`
	MAC       string   `json:"mac"`
	Interface string   `json:"interface"`
	VTEP      string   `json:"vtep"`
	Ports     []string `json:"ports,omitempty"` // published: HOSTPORT:CONTAINERPORT/PROTO
	Netns     string   `json:"netns,omitempty"`
	// Egress, in an attach's answer: the container's gateway interface
	// on the host's gateway bridge, its address, and what its default
	// route is.
	Egress *Egress `json:"egress,omitempty"`
	// DNS, in an attach's answer: the network's DNS server (its gateway
	// address) and search domain, when the agent runs DNS.
	DNS *DNS `json:"dns,omitempty"`
	// Aliases are DNS names of the endpoint besides its name.
	Aliases []string  `json:"aliases,omitempty"`
	Created time.Time `json:"created"`
}

// DNS is how a container resolves its network's names.
type DNS struct {
	Server string   `json:"server"`
	Search []string `json:"search"`
}

// Node is one host running an agent.
type Node struct {
	Name     string    `json:"name"`
	Address  string    `json:"address"`
	Version  string    `json:"version"`
	Started  time.Time `json:"started"`
	LastSeen time.Time `json:"last_seen"`
	State    string    `json:"state"`
	// Liveness is how the node's death is noticed: "gossip+ttl" (through
	// a Consul client agent on the node) or "ttl" (its session's TTL).
	Liveness string `json:"liveness,omitempty"`
	// ConsulNode is the Consul node its session belongs to, when it has
	// one of its own.
	ConsulNode string `json:"consul_node,omitempty"`
}

// Status describes the local agent.
type Status struct {
	Node           string    `json:"node"`
	Address        string    `json:"address"`
	Version        string    `json:"version"`
	Store          string    `json:"store"`
	StoreReachable bool      `json:"store_reachable"`
	StoreError     string    `json:"store_error,omitempty"`
	StoreDownSince time.Time `json:"store_down_since,omitzero"`
	Networks       int       `json:"networks"`
	LocalEndpoints int       `json:"local_endpoints"`
	LastReconcile  time.Time `json:"last_reconcile,omitzero"`
	// Ready: the agent has reconciled once with a complete view of the
	// store (what systemd is told with READY=1).
	Ready   bool      `json:"ready"`
	Started time.Time `json:"started"`
	// Liveness and ConsulNode: as in Node, once the store has said.
	Liveness   string `json:"liveness,omitempty"`
	ConsulNode string `json:"consul_node,omitempty"`
	// SessionError says why the store refuses this node a session.
	SessionError string `json:"session_error,omitempty"`
	// DNS says whether the networks' DNS servers run, and where other
	// names go: "off", or "on, ...".
	DNS string `json:"dns,omitempty"`
}

// CreateNetworkRequest creates a network; absent fields are chosen by the
// agent. VNI and MTU are pointers so that an explicit 0 is refused rather
// than taken for "choose one".
type CreateNetworkRequest struct {
	Name     string  `json:"name"`
	Subnet   string  `json:"subnet,omitempty"`
	Gateway  string  `json:"gateway,omitempty"`
	VNI      *uint32 `json:"vni,omitempty"`
	MTU      *int    `json:"mtu,omitempty"`
	Internal bool    `json:"internal,omitempty"`
}

// AttachRequest attaches a network namespace to a network.
type AttachRequest struct {
	// Netns is a path to a network namespace or a name under /var/run/netns.
	Netns string `json:"netns"`
	// Name of the endpoint; default: derived from the namespace.
	Name string `json:"name,omitempty"`
	// IP requested inside the network's subnet; default: the next free one.
	IP string `json:"ip,omitempty"`
	// Interface is the name of the interface in the namespace (CNI's
	// CNI_IFNAME); default: the first free ethN.
	Interface string `json:"interface,omitempty"`
	// Publish forwards ports of the host's addresses to the container:
	// "HOSTPORT:CONTAINERPORT[/tcp|udp]" (tcp by default). Needs a network
	// that is not internal.
	Publish []string `json:"publish,omitempty"`
	// ReplaceDefaultRoute replaces a default route the container has of
	// its own with one through the host's gateway bridge (NAT); detach
	// restores it. Without it such a container keeps its default route
	// and gets only the gateway interface.
	ReplaceDefaultRoute bool `json:"replace_default_route,omitempty"`
	// Handoff hands the container side to a container runtime that
	// moves and configures it itself (Docker's Join): the agent makes it
	// in its own namespace under this name, down and without address,
	// and Netns stays empty. The runtime's namespace is given later
	// (PUT .../endpoints/{endpoint}/netns); egress and published ports
	// follow once the interface is seen there.
	Handoff string `json:"handoff,omitempty"`
	// Aliases are more DNS names of the endpoint on its network.
	Aliases []string `json:"aliases,omitempty"`
}

// NetnsRequest says where a handed-off interface went.
type NetnsRequest struct {
	Netns string `json:"netns"`
}

// AliasesRequest replaces an endpoint's other DNS names.
type AliasesRequest struct {
	Aliases []string `json:"aliases"`
}

// ReserveRequest reserves an address of a network for this host before
// the endpoint that will use it exists (Docker's IPAM asks first); an
// attach on this host with that address takes the reservation over.
type ReserveRequest struct {
	IP string `json:"ip,omitempty"` // default: the next free one
}

// NetworkPlan is what a network create would get (POST /v1/network-plans
// with a CreateNetworkRequest's subnet and gateway): Network names the
// network that has that subnet already.
type NetworkPlan struct {
	Subnet  string `json:"subnet"`
	Gateway string `json:"gateway"`
	Network string `json:"network,omitempty"`
}

// Reservation is a reserved address.
type Reservation struct {
	IP string `json:"ip"`
}

// Error is the body of every non-2xx response.
type Error struct {
	Message string `json:"error"`
	Code    string `json:"code"`
}

// Error codes.
const (
	CodeInvalid     = "invalid"
	CodeNotFound    = "not_found"
	CodeConflict    = "conflict"
	CodeUnavailable = "store_unavailable"
	CodeInternal    = "internal"
	// The CLI's own codes, for errors that are not the agent's answer.
	CodeAgentUnavailable = "agent_unavailable" // the agent did not answer; nothing changed
	CodeUnknownOutcome   = "unknown_outcome"   // a change was sent and its answer lost
	CodePermissionDenied = "permission_denied" // the agent's socket refused this user
)

func (e *Error) Error() string { return e.Message }

// Event is one thing the agent did or saw, as `vxnet events` streams it.
type Event struct {
	Time time.Time `json:"time"`
	// Kind: attach, detach, peer_added, peer_removed, peers_synced,
	// namespace_created, namespace_removed, drift_repaired, leak_removed,
	// store_down, store_up, node_up, node_down; overflow ends a stream
	// whose reader fell behind.
	Kind     string `json:"kind"`
	Network  string `json:"network,omitempty"`
	Node     string `json:"node,omitempty"`
	Endpoint string `json:"endpoint,omitempty"`
	IP       string `json:"ip,omitempty"`
	Detail   string `json:"detail,omitempty"`
}

// Finding is one of vxnet doctor's checks: what was checked, whether it is
// as it should be, and if not what to do.
type Finding struct {
	// Check: kernel, mtu, underlay, store, session, datapath, egress,
	// dns, mounts, room.
	Check   string `json:"check"`
	OK      bool   `json:"ok"`
	Network string `json:"network,omitempty"`
	Message string `json:"message"`
	Fix     string `json:"fix,omitempty"`
}

// Egress is how an attached container reaches outside the overlay.
type Egress struct {
	Interface    string `json:"interface,omitempty"` // in the container; empty if it had one already
	Address      string `json:"address"`
	DefaultRoute string `json:"default_route"` // "via ADDR", or "own" when the container keeps its own
}
