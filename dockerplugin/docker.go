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

// errDockerNotFound: Docker answered 404.
var errDockerNotFound = errors.New("not found")

// get asks Docker's API for path and decodes its JSON answer into v; what
// names the thing asked for in errors.
func (d *dockerAPI) get(ctx context.Context, path, what string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker"+path, nil)
	if err != nil {
		return err
	}
	resp, err := d.http.Do(req)
	if err != nil {
		return fmt.Errorf("ask Docker for %s: %w", what, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return fmt.Errorf("%s: %w", what, errDockerNotFound)
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("ask Docker for %s: %s", what, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("%s from Docker: %w", what, err)
	}
	return nil
}

func (d *dockerAPI) Network(ctx context.Context, id string) (*DockerNetwork, error) {
	var v struct {
		Name     string
		Internal bool
		IPAM     struct {
			Config []struct{ Subnet, Gateway string }
		}
	}
	what := fmt.Sprintf("network %.12s", id)
	if err := d.get(ctx, "/networks/"+url.PathEscape(id), what, &v); errors.Is(err, errDockerNotFound) {
		return nil, fmt.Errorf("%s: %w", what, ErrNoSuchNetwork)
	} else if err != nil {
		return nil, err
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
	var list []struct {
		Names           []string
		NetworkSettings struct {
			Networks map[string]struct {
				EndpointID string
				Aliases    []string
			}
		}
	}
	if err := d.get(ctx, "/containers/json?filters="+filter, "containers", &list); err != nil {
		return nil, false, err
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
