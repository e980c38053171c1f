package dockerplugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/vxnet/vxnet/api"
)

// DockerNetwork is what the plugin needs of a Docker network: the plugin
// protocol passes its id and pool, never its name.
type DockerNetwork struct {
	Name     string
	Internal bool
	Subnet   string
	Gateway  string
}

// Docker is what the plugin asks of the Docker daemon.
type Docker interface {
	Network(ctx context.Context, id string) (*DockerNetwork, error)
	// EndpointNames are the DNS names Docker gives the container of an
	// endpoint of a network: its name and its aliases there; found is
	// false until the container runs with the endpoint.
	EndpointNames(ctx context.Context, networkID, endpointID string) (names []string, found bool, err error)
}

// ErrNoSuchNetwork: the daemon does not know the network (yet: it shows
// one only after the driver has created it).
var ErrNoSuchNetwork = errors.New("no such Docker network")

// dockerAPI reads networks from the Docker daemon's API on its socket:
// one GET, so no client library.
type dockerAPI struct {
	http *http.Client
}

// NewDocker talks to the daemon at host (unix:///path or a path).
func NewDocker(host string) (Docker, error) {
	path, err := api.SocketPath(host)
	if err != nil {
		return nil, fmt.Errorf("docker host: %w", err)
	}
	d := &net.Dialer{Timeout: 2 * time.Second}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return d.DialContext(ctx, "unix", path)
	}}
	return &dockerAPI{http: &http.Client{Transport: tr, Timeout: 10 * time.Second}}, nil
}

func (d *dockerAPI) Network(ctx context.Context, id string) (*DockerNetwork, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/networks/"+url.PathEscape(id), nil)
	if err != nil {
		return nil, err
	}
	resp, err := d.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("ask Docker for network %.12s: %w", id, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("network %.12s: %w", id, ErrNoSuchNetwork)
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("ask Docker for network %.12s: %s", id, resp.Status)
	}
	var v struct {
		Name     string
		Internal bool
		IPAM     struct {
			Config []struct{ Subnet, Gateway string }
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return nil, fmt.Errorf("network %.12s from Docker: %w", id, err)
	}
	n := &DockerNetwork{Name: v.Name, Internal: v.Internal}
	if len(v.IPAM.Config) > 0 {
		n.Subnet, n.Gateway = v.IPAM.Config[0].Subnet, v.IPAM.Config[0].Gateway
	}
	return n, nil
}

func (d *dockerAPI) EndpointNames(ctx context.Context, networkID, endpointID string) ([]string, bool, error) {
	// Only the network's containers: one is asked for per container
	// start, every 100 ms until it runs.
	filter := url.QueryEscape(`{"network":["` + networkID + `"]}`)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/containers/json?filters="+filter, nil)
	if err != nil {
		return nil, false, err
	}
	resp, err := d.http.Do(req)
	if err != nil {
		return nil, false, fmt.Errorf("ask Docker for containers: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, false, fmt.Errorf("ask Docker for containers: %s", resp.Status)
	}
	var list []struct {
		Names           []string
		NetworkSettings struct {
			Networks map[string]struct {
				EndpointID string
				Aliases    []string
			}
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		return nil, false, fmt.Errorf("containers from Docker: %w", err)
	}
	for _, c := range list {
		for _, n := range c.NetworkSettings.Networks {
			if n.EndpointID != endpointID {
				continue
			}
			var names []string
			for _, name := range append(c.Names, n.Aliases...) {
				if name = strings.TrimPrefix(name, "/"); name != "" && !slices.Contains(names, name) {
					names = append(names, name)
				}
			}
			return names, true, nil
		}
	}
	return nil, false, nil
}
