package dockerplugin

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/vxnet/vxnet/api"
)

// fakeAgent keeps networks and endpoints in memory, as the agent's API
// would answer.
type fakeAgent struct {
	mu       sync.Mutex
	nets     map[string]*api.NetworkDetail
	attached map[string]api.AttachRequest // network/endpoint
	created  int
}

func newFakeAgent() *fakeAgent {
	return &fakeAgent{nets: map[string]*api.NetworkDetail{}, attached: map[string]api.AttachRequest{}}
}

func notFound(what string) error {
	return &api.Error{Message: what + " not found", Code: api.CodeNotFound}
}

func (f *fakeAgent) Networks(context.Context) ([]api.Network, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []api.Network
	for _, n := range f.nets {
		out = append(out, n.Network)
	}
	return out, nil
}
func (f *fakeAgent) InspectNetwork(_ context.Context, name string) (*api.NetworkDetail, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if n := f.nets[name]; n != nil {
		c := *n
		return &c, nil
	}
	return nil, notFound("network " + name)
}
func (f *fakeAgent) CreateNetwork(_ context.Context, r api.CreateNetworkRequest) (*api.Network, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.nets[r.Name] != nil {
		return nil, &api.Error{Message: "exists", Code: api.CodeConflict}
	}
	f.created++
	f.nets[r.Name] = &api.NetworkDetail{Network: api.Network{Name: r.Name, Subnet: r.Subnet}}
	return &f.nets[r.Name].Network, nil
}
func (f *fakeAgent) RemoveNetwork(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.nets, name)
	return nil
}
func (f *fakeAgent) PlanNetwork(_ context.Context, r api.CreateNetworkRequest) (*api.NetworkPlan, error) {
	return &api.NetworkPlan{Subnet: r.Subnet, Gateway: "10.9.0.1"}, nil
}
func (f *fakeAgent) Endpoints(context.Context, string) ([]api.Endpoint, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []api.Endpoint
	for k := range f.attached {
		net, name, _ := strings.Cut(k, "/")
		out = append(out, api.Endpoint{Network: net, Name: name})
	}
	return out, nil
}
func (f *fakeAgent) Attach(_ context.Context, network string, r api.AttachRequest) (*api.Endpoint, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.nets[network] == nil {
		return nil, notFound("network " + network)
	}
	f.attached[network+"/"+r.Name] = r
	return &api.Endpoint{Name: r.Name, Network: network, IP: r.IP, MAC: "02:42:0a:09:00:05"}, nil
}
func (f *fakeAgent) Detach(_ context.Context, network, ep string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.attached[network+"/"+ep]; !ok {
		return notFound("endpoint " + ep)
	}
	delete(f.attached, network+"/"+ep)
	return nil
}
func (f *fakeAgent) SetNetns(context.Context, string, string, string) error     { return nil }
func (f *fakeAgent) SetAliases(context.Context, string, string, []string) error { return nil }
func (f *fakeAgent) ReleaseReservation(context.Context, string, string) error   { return nil }
func (f *fakeAgent) Reserve(context.Context, string, api.ReserveRequest) (*api.Reservation, error) {
	return &api.Reservation{IP: "10.9.0.5"}, nil
}

// fakeDocker shows the networks it was told of.
type fakeDocker struct {
	mu   sync.Mutex
	nets map[string]*DockerNetwork
}

func (d *fakeDocker) Network(_ context.Context, id string) (*DockerNetwork, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if n := d.nets[id]; n != nil {
		return n, nil
	}
	return nil, ErrNoSuchNetwork
}
func (d *fakeDocker) EndpointNames(context.Context, string, string) ([]string, bool, error) {
	return nil, false, nil
}

const (
	dockerNet = "d0d0d0d0d0d0d0d0"
	dockerEP  = "e1e1e1e1e1e1e1e1e1e1"
)

func endpointReq() *network.CreateEndpointRequest {
	return &network.CreateEndpointRequest{NetworkID: dockerNet, EndpointID: dockerEP, Interface: &network.EndpointInterface{Address: "10.9.0.5/24"}}
}

// A Docker network binds to the vxnet network of its name: made when
// missing, refused with what to do when its subnet differs, made again
// when another host's network rm removed it, and remembered across a
// restart of the plugin (Docker hides a network it is deleting).
func TestBindings(t *testing.T) {
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	state := filepath.Join(t.TempDir(), "docker-networks.json")
	ag := newFakeAgent()
	dk := &fakeDocker{nets: map[string]*DockerNetwork{dockerNet: {Name: "net1", Subnet: "10.9.0.0/24"}}}
	p := New(ctx, ag, dk, log, state)

	if _, err := p.createEndpoint(ctx, endpointReq()); err != nil {
		t.Fatalf("first endpoint: %v", err)
	}
	if ag.nets["net1"] == nil || ag.created != 1 {
		t.Fatalf("vxnet network not made: %+v", ag.nets)
	}
	ep, _ := endpointName(dockerEP)
	if r := ag.attached["net1/"+ep]; r.Handoff != handoffName(ep) || r.IP != "10.9.0.5" {
		t.Errorf("attach request %+v", r)
	}

	// Another host's docker network rm removed the vxnet network: the
	// next endpoint makes it again.
	ag.RemoveNetwork(ctx, "net1")
	ag.attached = map[string]api.AttachRequest{}
	if _, err := p.createEndpoint(ctx, endpointReq()); err != nil || ag.nets["net1"] == nil {
		t.Fatalf("after the vxnet network went: %v", err)
	}

	// A restarted plugin deletes the endpoint and the network without
	// Docker, which no longer shows it.
	dk.nets = map[string]*DockerNetwork{}
	p2 := New(ctx, ag, dk, log, state)
	if _, err := p2.deleteEndpoint(ctx, &network.DeleteEndpointRequest{NetworkID: dockerNet, EndpointID: dockerEP}); err != nil || len(ag.attached) != 0 {
		t.Fatalf("delete endpoint after a restart: %v, %v left", err, ag.attached)
	}
	if _, err := p2.deleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: dockerNet}); err != nil || ag.nets["net1"] != nil {
		t.Fatalf("delete network after a restart: %v, %+v left", err, ag.nets)
	}

	// A network the plugin joined (made with vxnet network create) is not
	// its to remove: Docker's network rm leaves it.
	ag.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "made", Subnet: "10.9.0.0/24"})
	dk.nets = map[string]*DockerNetwork{dockerNet: {Name: "made", Subnet: "10.9.0.0/24"}}
	pj := New(ctx, ag, dk, log, "")
	if _, err := pj.createEndpoint(ctx, endpointReq()); err != nil {
		t.Fatalf("join: %v", err)
	}
	pj.deleteEndpoint(ctx, &network.DeleteEndpointRequest{NetworkID: dockerNet, EndpointID: dockerEP})
	if _, err := pj.deleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: dockerNet}); err != nil || ag.nets["made"] == nil {
		t.Errorf("network rm of a joined network: %v, removed: %v", err, ag.nets["made"] == nil)
	}

	// A vxnet network of that name with another subnet: refused, saying
	// which subnet to give.
	ag.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "net1", Subnet: "10.8.0.0/24"})
	dk.nets = map[string]*DockerNetwork{dockerNet: {Name: "net1", Subnet: "10.9.0.0/24"}}
	p3 := New(ctx, ag, dk, log, "")
	_, err := p3.createEndpoint(ctx, endpointReq())
	if err == nil || !strings.Contains(err.Error(), "--subnet 10.8.0.0/24") {
		t.Errorf("subnet mismatch: %v", err)
	}
}
