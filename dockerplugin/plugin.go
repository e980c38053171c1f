// Package dockerplugin serves Docker's network and IPAM plugin protocol on
// top of the local agent's API, so that `docker network create -d vxnet
// --ipam-driver vxnet` and `docker run --net` use vxnet networks.
package dockerplugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"
	"github.com/docker/go-plugins-helpers/network"
	"github.com/docker/go-plugins-helpers/sdk"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/atomicfile"
)

// Agent is what the plugin needs of the local agent; *api.Client is one.
type Agent interface {
	Networks(ctx context.Context) ([]api.Network, error)
	InspectNetwork(ctx context.Context, name string) (*api.NetworkDetail, error)
	CreateNetwork(ctx context.Context, r api.CreateNetworkRequest) (*api.Network, error)
	RemoveNetwork(ctx context.Context, name string) error
	PlanNetwork(ctx context.Context, r api.CreateNetworkRequest) (*api.NetworkPlan, error)
	Endpoints(ctx context.Context, network string) ([]api.Endpoint, error)
	Attach(ctx context.Context, network string, r api.AttachRequest) (*api.Endpoint, error)
	Detach(ctx context.Context, network, endpoint string) error
	SetNetns(ctx context.Context, network, endpoint, netns string) error
	SetAliases(ctx context.Context, network, endpoint string, aliases []string) error
	Reserve(ctx context.Context, network string, r api.ReserveRequest) (*api.Reservation, error)
	ReleaseReservation(ctx context.Context, network, ip string) error
}

var _ Agent = (*api.Client)(nil)

// AddressSpace is the plugin's IPAM address space. The vxnet driver
// refuses a network whose pool comes from another one: Docker's default
// IPAM hands out addresses per host, which would collide across hosts.
const AddressSpace = "vxnet"

// Docker's option keys the driver reads.
const (
	optGeneric = "com.docker.network.generic"
	optPortMap = "com.docker.network.portmap"
	optMTU     = "com.docker.network.driver.mtu"
	optVNI     = "vxnet.vni"
)

// bindTimeout bounds the wait for Docker to show a network it is
// creating; Docker waits for the driver meanwhile only in CreateEndpoint.
const bindTimeout = 30 * time.Second

// Plugin answers Docker's NetworkDriver and IpamDriver calls.
type Plugin struct {
	agent  Agent
	docker Docker
	log    *slog.Logger
	life   context.Context

	mu sync.Mutex
	// nets: Docker network id -> its vxnet network, bound once Docker
	// shows the network's name (the protocol never passes it).
	nets  map[string]*binding
	state string
}

type binding struct {
	done   chan struct{}
	name   string
	subnet string // Docker's, once known
	// created: this plugin made the vxnet network, which Docker's
	// network rm may then remove; one made with vxnet network create,
	// or by another host, is not its to remove.
	created bool
	err     error
	opts    netOpts
}

// netOpts are the vxnet settings of CreateNetwork's -o options.
type netOpts struct {
	vni *uint32
	mtu *int
}

// New makes a plugin; life bounds what it does in the background. state
// is a file where it keeps which vxnet network each Docker network is
// ("" keeps it in memory only): Docker hides a network it is deleting
// from its API, so a plugin restarted since the network was bound would
// not learn it again at DeleteNetwork.
func New(life context.Context, agent Agent, docker Docker, log *slog.Logger, state string) *Plugin {
	p := &Plugin{agent: agent, docker: docker, log: log, life: life, nets: map[string]*binding{}, state: state}
	if state == "" {
		return p
	}
	data, err := os.ReadFile(state)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Warn("docker plugin state", "path", state, "err", err)
	}
	var saved map[string]savedBinding
	if len(data) > 0 {
		if err := json.Unmarshal(data, &saved); err != nil {
			log.Warn("docker plugin state unreadable; networks are learned from Docker again", "path", state, "err", err)
		}
	}
	for id, sb := range saved {
		b := &binding{done: make(chan struct{}), name: sb.Name, subnet: sb.Subnet, created: sb.Created}
		close(b.done)
		p.nets[id] = b
	}
	return p
}

// savedBinding is a binding as the state file keeps it.
type savedBinding struct {
	Name    string `json:"name"`
	Subnet  string `json:"subnet"`
	Created bool   `json:"created,omitempty"`
}

// save writes the successful bindings. Called with mu held.
func (p *Plugin) saveLocked() {
	if p.state == "" {
		return
	}
	out := map[string]savedBinding{}
	for id, b := range p.nets {
		if b.name != "" && b.err == nil {
			out[id] = savedBinding{Name: b.name, Subnet: b.subnet, Created: b.created}
		}
	}
	data, _ := json.MarshalIndent(out, "", "  ")
	if err := atomicfile.Write(p.state, data, 0o600); err != nil {
		p.log.Warn("docker plugin state", "path", p.state, "err", err)
	}
}

// Handler serves the protocol: Plugin.Activate and every call of both
// drivers. The helpers library's handlers each answer Activate with one
// driver, and Docker wants both from one socket, so only its types and
// encoding are used here.
func (p *Plugin) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/Plugin.Activate", func(w http.ResponseWriter, r *http.Request) {
		sdk.EncodeResponse(w, map[string][]string{"Implements": {"NetworkDriver", "IpamDriver"}}, false)
	})
	handle(mux, p.log, "/NetworkDriver.GetCapabilities", func(ctx context.Context, _ *struct{}) (any, error) {
		return &network.CapabilitiesResponse{Scope: "local", ConnectivityScope: "global"}, nil
	})
	handle(mux, p.log, "/NetworkDriver.CreateNetwork", p.createNetwork)
	handle(mux, p.log, "/NetworkDriver.DeleteNetwork", p.deleteNetwork)
	handle(mux, p.log, "/NetworkDriver.AllocateNetwork", func(context.Context, *network.AllocateNetworkRequest) (any, error) {
		return nil, errors.New("swarm-scoped networks are not supported: vxnet networks are local to each Docker daemon and shared through vxnet's store")
	})
	handle(mux, p.log, "/NetworkDriver.FreeNetwork", func(context.Context, *network.FreeNetworkRequest) (any, error) { return nil, nil })
	handle(mux, p.log, "/NetworkDriver.CreateEndpoint", p.createEndpoint)
	handle(mux, p.log, "/NetworkDriver.DeleteEndpoint", p.deleteEndpoint)
	handle(mux, p.log, "/NetworkDriver.EndpointOperInfo", p.endpointInfo)
	handle(mux, p.log, "/NetworkDriver.Join", p.join)
	handle(mux, p.log, "/NetworkDriver.Leave", func(context.Context, *network.LeaveRequest) (any, error) {
		// Docker has moved the interface back to the host by now; it
		// goes with DeleteEndpoint, which always follows.
		return nil, nil
	})
	handle(mux, p.log, "/NetworkDriver.DiscoverNew", func(context.Context, *network.DiscoveryNotification) (any, error) { return nil, nil })
	handle(mux, p.log, "/NetworkDriver.DiscoverDelete", func(context.Context, *network.DiscoveryNotification) (any, error) { return nil, nil })
	handle(mux, p.log, "/NetworkDriver.ProgramExternalConnectivity", p.programExternal)
	handle(mux, p.log, "/NetworkDriver.RevokeExternalConnectivity", func(context.Context, *network.RevokeExternalConnectivityRequest) (any, error) {
		// The published ports go with the endpoint (DeleteEndpoint).
		return nil, nil
	})
	handle(mux, p.log, "/IpamDriver.GetCapabilities", func(context.Context, *struct{}) (any, error) {
		return &ipam.CapabilitiesResponse{RequiresMACAddress: false}, nil
	})
	handle(mux, p.log, "/IpamDriver.GetDefaultAddressSpaces", func(context.Context, *struct{}) (any, error) {
		return &ipam.AddressSpacesResponse{LocalDefaultAddressSpace: AddressSpace, GlobalDefaultAddressSpace: AddressSpace}, nil
	})
	handle(mux, p.log, "/IpamDriver.RequestPool", p.requestPool)
	handle(mux, p.log, "/IpamDriver.ReleasePool", func(context.Context, *ipam.ReleasePoolRequest) (any, error) {
		return nil, nil // the subnet is the vxnet network's, which DeleteNetwork deals with
	})
	handle(mux, p.log, "/IpamDriver.RequestAddress", p.requestAddress)
	handle(mux, p.log, "/IpamDriver.ReleaseAddress", p.releaseAddress)
	return mux
}

// handle decodes a call, runs f and encodes its answer or error the way
// Docker reads them ({"Err": ...} with a 500).
func handle[Req any](mux *http.ServeMux, log *slog.Logger, path string, f func(context.Context, *Req) (any, error)) {
	mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if r.ContentLength != 0 {
			if err := sdk.DecodeRequest(w, r, &req); err != nil {
				return
			}
		}
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		out, err := f(ctx, &req)
		if err != nil {
			log.Warn("docker plugin call refused", "call", strings.TrimPrefix(path, "/"), "err", err)
			sdk.EncodeResponse(w, network.NewErrorResponse("vxnet: "+err.Error()), true)
			return
		}
		if out == nil {
			out = struct{}{}
		}
		sdk.EncodeResponse(w, out, false)
	})
}

// Serve answers on ln until ctx is done.
func (p *Plugin) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{Handler: p.Handler(), ReadHeaderTimeout: 5 * time.Second,
		BaseContext: func(net.Listener) context.Context { return ctx }}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("docker plugin: %w", err)
	}
	return nil
}

// --- IPAM ---

// requestPool answers with the subnet the network will have: the one
// given (--subnet), or the one a vxnet network create would choose. Its
// name is not known yet: Docker passes the IPAM driver none.
func (p *Plugin) requestPool(ctx context.Context, r *ipam.RequestPoolRequest) (any, error) {
	switch {
	case r.V6:
		return nil, errors.New("vxnet networks are IPv4 only: leave out --ipv6")
	case r.AddressSpace != "" && r.AddressSpace != AddressSpace:
		return nil, fmt.Errorf("address space %q: vxnet has one, %q", r.AddressSpace, AddressSpace)
	case r.SubPool != "":
		return nil, errors.New("--ip-range is not supported: vxnet hands out addresses from the whole subnet")
	}
	if r.Pool != "" {
		pfx, err := netip.ParsePrefix(r.Pool)
		if err != nil || pfx.Masked() != pfx {
			return nil, fmt.Errorf("subnet %q is not a network address with its length, such as 10.1.0.0/24", r.Pool)
		}
	}
	plan, err := p.agent.PlanNetwork(ctx, api.CreateNetworkRequest{Subnet: r.Pool})
	if err != nil {
		return nil, err
	}
	return &ipam.RequestPoolResponse{PoolID: plan.Subnet, Pool: plan.Subnet}, nil
}

// requestAddress gives the gateway the vxnet network has or will have,
// and reserves an endpoint's address in vxnet's IPAM: the endpoint does
// not exist yet, and CreateEndpoint's attach takes the reservation over.
func (p *Plugin) requestAddress(ctx context.Context, r *ipam.RequestAddressRequest) (any, error) {
	pool, err := netip.ParsePrefix(r.PoolID)
	if err != nil {
		return nil, fmt.Errorf("pool %q is not one of vxnet's", r.PoolID)
	}
	if r.Options["RequestAddressType"] == "com.docker.network.gateway" {
		plan, err := p.agent.PlanNetwork(ctx, api.CreateNetworkRequest{Subnet: r.PoolID, Gateway: r.Address})
		if err != nil {
			return nil, err
		}
		return &ipam.RequestAddressResponse{Address: plan.Gateway + "/" + strconv.Itoa(pool.Bits())}, nil
	}
	name, err := p.networkForPool(ctx, r.PoolID)
	if err != nil {
		return nil, err
	}
	res, err := p.agent.Reserve(ctx, name, api.ReserveRequest{IP: r.Address})
	if err != nil {
		return nil, err
	}
	return &ipam.RequestAddressResponse{Address: res.IP + "/" + strconv.Itoa(pool.Bits())}, nil
}

func (p *Plugin) releaseAddress(ctx context.Context, r *ipam.ReleaseAddressRequest) (any, error) {
	name, err := p.networkForPool(ctx, r.PoolID)
	if err != nil {
		// No network any more: nothing of it is held.
		p.log.Debug("release address of an unknown pool", "pool", r.PoolID, "err", err)
		return nil, nil
	}
	return nil, p.agent.ReleaseReservation(ctx, name, r.Address)
}

// networkForPool finds the vxnet network of a subnet, waiting for the
// binding of a network Docker is creating.
func (p *Plugin) networkForPool(ctx context.Context, subnet string) (string, error) {
	p.mu.Lock()
	var waits []*binding
	for _, b := range p.nets {
		waits = append(waits, b)
	}
	p.mu.Unlock()
	for {
		nets, err := p.agent.Networks(ctx)
		if err != nil {
			return "", err
		}
		for _, n := range nets {
			if n.Subnet == subnet {
				return n.Name, nil
			}
		}
		if len(waits) == 0 {
			// Say why, if a Docker network of that subnet failed to bind.
			p.mu.Lock()
			defer p.mu.Unlock()
			for _, b := range p.nets {
				if isDone(b) && b.err != nil && b.subnet == subnet {
					return "", b.err
				}
			}
			return "", fmt.Errorf("no vxnet network has subnet %s", subnet)
		}
		// A network of that subnet may be on its way: wait for the
		// bindings under way, then look once more.
		for _, b := range waits {
			select {
			case <-b.done:
			case <-ctx.Done():
				return "", fmt.Errorf("waiting for the network of subnet %s: %w", subnet, ctx.Err())
			}
		}
		waits = nil
	}
}

// --- networks ---

func (p *Plugin) createNetwork(ctx context.Context, r *network.CreateNetworkRequest) (any, error) {
	switch {
	case len(r.IPv6Data) > 0:
		return nil, errors.New("vxnet networks are IPv4 only: leave out --ipv6")
	case len(r.IPv4Data) != 1:
		return nil, fmt.Errorf("a vxnet network has one subnet, not %d", len(r.IPv4Data))
	case r.IPv4Data[0].AddressSpace != AddressSpace:
		return nil, errors.New("the vxnet driver needs --ipam-driver vxnet: another IPAM driver hands out addresses per host, which collide across hosts")
	}
	opts, err := parseOptions(r.Options)
	if err != nil {
		return nil, err
	}
	// Docker shows the network, and so its name, only once this call
	// has returned: the vxnet network is made or joined in the
	// background, and CreateEndpoint waits for that.
	p.bindingFor(r.NetworkID, opts)
	return nil, nil
}

func parseOptions(o map[string]any) (netOpts, error) {
	var out netOpts
	g, _ := o[optGeneric].(map[string]any)
	for k, v := range g {
		s, _ := v.(string)
		switch k {
		case optMTU:
			n, err := strconv.Atoi(s)
			if err != nil {
				return out, fmt.Errorf("-o %s=%v: not a number", k, v)
			}
			out.mtu = &n
		case optVNI:
			n, err := strconv.ParseUint(s, 10, 32)
			if err != nil {
				return out, fmt.Errorf("-o %s=%v: not a number", k, v)
			}
			vni := uint32(n)
			out.vni = &vni
		default:
			return out, fmt.Errorf("-o %s: unknown option (vxnet knows %s and %s)", k, optMTU, optVNI)
		}
	}
	return out, nil
}

func isDone(b *binding) bool {
	select {
	case <-b.done:
		return true
	default:
		return false
	}
}

// bindingFor returns the network's binding, starting it if there is none
// or the last one failed (which is tried again, to say why again or to
// find it fixed).
func (p *Plugin) bindingFor(id string, opts netOpts) *binding {
	p.mu.Lock()
	defer p.mu.Unlock()
	if b := p.nets[id]; b != nil && !(isDone(b) && b.err != nil) {
		return b
	} else if b != nil && opts == (netOpts{}) {
		opts = b.opts
	}
	b := &binding{done: make(chan struct{}), opts: opts}
	p.nets[id] = b
	go p.bind(id, b)
	return b
}

// bind waits for Docker to show the network, then creates the vxnet
// network of its name or joins the existing one.
func (p *Plugin) bind(id string, b *binding) {
	ctx, cancel := context.WithTimeout(p.life, bindTimeout)
	defer cancel()
	name, subnet, created, err := p.ensureNetwork(ctx, id, b.opts)
	// Kept before the binding is done, so that a call it answers finds
	// it kept (written under mu: saveLocked reads every binding).
	p.mu.Lock()
	b.name, b.subnet, b.created, b.err = name, subnet, created, err
	if err == nil {
		p.saveLocked()
	}
	p.mu.Unlock()
	close(b.done)
	if err != nil {
		p.log.Error("docker network has no vxnet network", "docker_network", id[:min(12, len(id))], "err", err)
		return
	}
	p.log.Info("docker network bound", "network", name, "docker_network", id[:min(12, len(id))])
}

func (p *Plugin) ensureNetwork(ctx context.Context, id string, opts netOpts) (name, subnet string, created bool, err error) {
	var dn *DockerNetwork
	for {
		if dn, err = p.docker.Network(ctx, id); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return "", "", false, fmt.Errorf("Docker did not show network %.12s: %w", id, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	var createErr error
	for try := 0; ; try++ {
		have, err := p.agent.InspectNetwork(ctx, dn.Name)
		if err == nil {
			if have.Subnet != dn.Subnet {
				return "", dn.Subnet, false, fmt.Errorf("vxnet network %q has subnet %s, but Docker's network %q was given %s (Docker tells its IPAM driver no network name, so without --subnet a new one is chosen): "+
					"docker network rm %s && docker network create -d vxnet --ipam-driver vxnet --subnet %s %s",
					dn.Name, have.Subnet, dn.Name, dn.Subnet, dn.Name, have.Subnet, dn.Name)
			}
			return dn.Name, dn.Subnet, created, nil
		}
		switch {
		case !isNotFound(err):
			return "", dn.Subnet, false, err
		case createErr != nil:
			// Refused for another reason than the name (a subnet
			// another network has): that is the answer.
			return "", dn.Subnet, false, fmt.Errorf("create vxnet network %q for Docker's: %w", dn.Name, createErr)
		case try > 0:
			return "", dn.Subnet, false, err
		}
		_, err = p.agent.CreateNetwork(ctx, api.CreateNetworkRequest{Name: dn.Name, Subnet: dn.Subnet, Gateway: dn.Gateway,
			VNI: opts.vni, MTU: opts.mtu, Internal: dn.Internal})
		if ae := (*api.Error)(nil); err == nil || errors.As(err, &ae) && ae.Code == api.CodeConflict {
			created, createErr = err == nil, err // made, or a conflict (made by another host meanwhile?): look again
			continue
		}
		return "", dn.Subnet, false, err
	}
}

// forget drops a network's binding: its vxnet network was removed
// (docker network rm on another host), and the next call binds again.
func (p *Plugin) forget(id string, b *binding) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.nets[id] == b {
		delete(p.nets, id)
		p.saveLocked()
	}
}

// boundName is the network's vxnet network if a binding has found it,
// without asking anyone.
func (p *Plugin) boundName(id string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if b := p.nets[id]; b != nil && isDone(b) && b.err == nil {
		return b.name
	}
	return ""
}

// network is the vxnet network of a Docker network.
func (p *Plugin) network(ctx context.Context, id string) (string, error) {
	b := p.bindingFor(id, netOpts{})
	select {
	case <-b.done:
		return b.name, b.err
	case <-ctx.Done():
		return "", fmt.Errorf("waiting for Docker's network %.12s: %w", id, ctx.Err())
	}
}

// deleteNetwork removes the vxnet network with Docker's when this plugin
// made it and no host has an endpoint on it. One made with vxnet network
// create, or by another host's plugin, stays: Docker's network rm says
// that this host's Docker is done with it, not that every host is.
func (p *Plugin) deleteNetwork(ctx context.Context, r *network.DeleteNetworkRequest) (any, error) {
	p.mu.Lock()
	b := p.nets[r.NetworkID]
	delete(p.nets, r.NetworkID)
	p.saveLocked()
	p.mu.Unlock()
	if b == nil {
		return nil, nil
	}
	select {
	case <-b.done:
	case <-ctx.Done():
		return nil, nil
	}
	if !b.created || b.err != nil {
		return nil, nil
	}
	name := b.name
	n, err := p.agent.InspectNetwork(ctx, name)
	if err != nil || len(n.Endpoints) > 0 {
		return nil, nil
	}
	if err := p.agent.RemoveNetwork(ctx, name); err != nil {
		p.log.Warn("remove the vxnet network of a removed Docker network", "network", name, "err", err)
	} else {
		p.log.Info("vxnet network removed with Docker's", "network", name)
	}
	return nil, nil
}

// --- endpoints ---

// endpointName is the vxnet endpoint of a Docker endpoint: its short id,
// since Docker passes no container name; handoffName is the interface the
// plugin hands Docker (at most 15 characters).
func endpointName(id string) (string, error) {
	if len(id) < 12 {
		return "", fmt.Errorf("endpoint id %q is too short", id)
	}
	return strings.ToLower(id[:12]), nil
}

func handoffName(ep string) string { return "vxd" + ep }

func (p *Plugin) createEndpoint(ctx context.Context, r *network.CreateEndpointRequest) (any, error) {
	ep, err := endpointName(r.EndpointID)
	if err != nil {
		return nil, err
	}
	if r.Interface == nil || r.Interface.Address == "" {
		return nil, errors.New("no address for the endpoint: create the network with --ipam-driver vxnet")
	}
	if r.Interface.AddressIPv6 != "" {
		return nil, errors.New("vxnet networks are IPv4 only")
	}
	pfx, err := netip.ParsePrefix(r.Interface.Address)
	if err != nil {
		return nil, fmt.Errorf("address %q: %w", r.Interface.Address, err)
	}
	ports, err := publishSpecs(r.Options[optPortMap])
	if err != nil {
		return nil, err
	}
	name, err := p.network(ctx, r.NetworkID)
	if err != nil {
		return nil, err
	}
	req := api.AttachRequest{Name: ep, IP: pfx.Addr().String(), Handoff: handoffName(ep), Publish: ports}
	out, err := p.agent.Attach(ctx, name, req)
	if isNotFound(err) {
		// The vxnet network went (docker network rm on another host
		// removed it unused): made again from this Docker network.
		p.mu.Lock()
		b := p.nets[r.NetworkID]
		p.mu.Unlock()
		p.forget(r.NetworkID, b)
		if name, err = p.network(ctx, r.NetworkID); err == nil {
			out, err = p.agent.Attach(ctx, name, req)
		}
	}
	if err != nil {
		return nil, err
	}
	if r.Interface.MacAddress != "" {
		if !strings.EqualFold(r.Interface.MacAddress, out.MAC) {
			p.agent.Detach(context.WithoutCancel(ctx), name, ep)
			return nil, fmt.Errorf("mac address %s: vxnet derives an endpoint's from its address (%s): leave out --mac-address", r.Interface.MacAddress, out.MAC)
		}
		return &network.CreateEndpointResponse{}, nil
	}
	return &network.CreateEndpointResponse{Interface: &network.EndpointInterface{MacAddress: out.MAC}}, nil
}

// publishSpecs turns Docker's port map into vxnet's HOSTPORT:PORT/PROTO.
func publishSpecs(v any) ([]string, error) {
	if v == nil {
		return nil, nil
	}
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var pm []struct {
		Proto                 int
		IP                    string
		Port                  int
		HostIP                string
		HostPort, HostPortEnd int
	}
	if err := json.Unmarshal(raw, &pm); err != nil {
		return nil, fmt.Errorf("port map: %w", err)
	}
	var out []string
	for _, b := range pm {
		proto := map[int]string{6: "tcp", 17: "udp"}[b.Proto]
		switch {
		case proto == "":
			return nil, fmt.Errorf("-p %d: only tcp and udp can be published", b.Port)
		case b.HostIP != "" && b.HostIP != "0.0.0.0":
			return nil, fmt.Errorf("-p %s:%d:%d: vxnet publishes on all of the host's addresses; leave out the address", b.HostIP, b.HostPort, b.Port)
		case b.HostPort == 0:
			return nil, fmt.Errorf("-p %d: give the host port (-p HOSTPORT:%d); vxnet does not choose one", b.Port, b.Port)
		case b.HostPortEnd != 0 && b.HostPortEnd != b.HostPort:
			return nil, fmt.Errorf("-p %d-%d: give one host port per container port", b.HostPort, b.HostPortEnd)
		}
		out = append(out, fmt.Sprintf("%d:%d/%s", b.HostPort, b.Port, proto))
	}
	return out, nil
}

// deleteEndpoint detaches. Its network is found without Docker's API when
// the plugin has not bound it since it started: Docker removes stale
// endpoints when it starts, before its API answers.
func (p *Plugin) deleteEndpoint(ctx context.Context, r *network.DeleteEndpointRequest) (any, error) {
	ep, err := endpointName(r.EndpointID)
	if err != nil {
		return nil, err
	}
	name := p.boundName(r.NetworkID)
	if name == "" {
		eps, err := p.agent.Endpoints(ctx, "")
		if err != nil {
			return nil, err
		}
		for _, e := range eps {
			if e.Name == ep {
				name = e.Network
			}
		}
		if name == "" {
			return nil, nil // gone already
		}
	}
	if err := p.agent.Detach(ctx, name, ep); err != nil && !isNotFound(err) {
		return nil, err
	}
	return nil, nil
}

// join hands Docker the interface CreateEndpoint made and tells the agent
// where Docker will move it. No gateway: Docker then adds no default
// route, and the agent gives the container its own gateway interface
// once the interface has arrived (with DisableGatewayService, Docker
// adds no docker_gwbridge either).
func (p *Plugin) join(ctx context.Context, r *network.JoinRequest) (any, error) {
	ep, err := endpointName(r.EndpointID)
	if err != nil {
		return nil, err
	}
	name, err := p.network(ctx, r.NetworkID)
	if err != nil {
		return nil, err
	}
	if err := p.agent.SetNetns(ctx, name, ep, r.SandboxKey); err != nil {
		return nil, err
	}
	go p.learnNames(name, ep, r.NetworkID, r.EndpointID)
	return &network.JoinResponse{
		InterfaceName:         network.InterfaceName{SrcName: handoffName(ep), DstPrefix: "eth"},
		DisableGatewayService: true,
	}, nil
}

// learnNames gives the endpoint its container's names in vxnet's DNS,
// once the container runs: Docker shows them only then.
func (p *Plugin) learnNames(network, ep, networkID, endpointID string) {
	ctx, cancel := context.WithTimeout(p.life, bindTimeout)
	defer cancel()
	for {
		names, found, err := p.docker.EndpointNames(ctx, networkID, endpointID)
		if found {
			// Docker's names are vxnet's kind (letters, digits, '_',
			// '.', '-'), but for its legacy links' "container/alias"
			// and names too long for a DNS label, which are left out
			// rather than have the agent refuse them all.
			names = slices.DeleteFunc(names, func(n string) bool { return n == ep || strings.Contains(n, "/") || len(n) > 63 })
			if err := p.agent.SetAliases(ctx, network, ep, names); err != nil {
				p.log.Warn("give an endpoint its container's names", "network", network, "endpoint", ep, "err", err)
			}
			return
		}
		if err != nil {
			p.log.Debug("container names", "endpoint", ep, "err", err)
		}
		select {
		case <-ctx.Done():
			p.log.Debug("no running container for the endpoint; it keeps no other names", "endpoint", ep)
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (p *Plugin) endpointInfo(ctx context.Context, r *network.InfoRequest) (any, error) {
	ep, err := endpointName(r.EndpointID)
	if err != nil {
		return nil, err
	}
	v := map[string]string{"vxnet.endpoint": ep}
	if name := p.boundName(r.NetworkID); name != "" {
		v["vxnet.network"] = name
	}
	return &network.InfoResponse{Value: v}, nil
}

// programExternal has nothing to do: the published ports came with the
// endpoint (CreateEndpoint has Docker's port map), and the agent applies
// them once the container has its gateway interface.
func (p *Plugin) programExternal(ctx context.Context, r *network.ProgramExternalConnectivityRequest) (any, error) {
	_, err := endpointName(r.EndpointID)
	return nil, err
}

func isNotFound(err error) bool {
	var ae *api.Error
	return errors.As(err, &ae) && ae.Code == api.CodeNotFound
}
