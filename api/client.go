package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"
)

// DefaultSocket is where vxnetd listens unless told otherwise.
const DefaultSocket = "/run/vxnet/vxnet.sock"

// Client talks to one agent.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient takes "unix:///path", a bare path, or "" for DefaultSocket.
func NewClient(host string) (*Client, error) {
	path, err := SocketPath(host)
	if err != nil {
		return nil, err
	}
	dialer := &net.Dialer{Timeout: 2 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, "unix", path)
		},
		ResponseHeaderTimeout: 60 * time.Second,
	}
	return &Client{socket: path, http: &http.Client{Transport: tr}}, nil
}

// SocketPath turns a -H value into a socket path.
func SocketPath(host string) (string, error) {
	switch {
	case host == "":
		return DefaultSocket, nil
	case strings.HasPrefix(host, "unix://"):
		p := strings.TrimPrefix(host, "unix://")
		if p == "" {
			return "", fmt.Errorf("host %q: empty socket path", host)
		}
		return p, nil
	case strings.Contains(host, "://"):
		return "", fmt.Errorf("host %q: only unix:// sockets are supported", host)
	default:
		return host, nil
	}
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://vxnetd"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("cannot reach vxnetd at %s (is the agent running?): %w", c.socket, err)
		}
		return fmt.Errorf("vxnetd at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("read response: %w", err)
	}
	if resp.StatusCode >= 300 {
		var e Error
		if json.Unmarshal(data, &e) == nil && e.Message != "" {
			return &e
		}
		return fmt.Errorf("vxnetd: %s: %s", resp.Status, strings.TrimSpace(string(data)))
	}
	if out == nil || resp.StatusCode == http.StatusNoContent {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decode response: %w", err)
	}
	return nil
}

// Version of the agent.
func (c *Client) Version(ctx context.Context) (string, error) {
	var v struct {
		Version string `json:"version"`
	}
	err := c.do(ctx, http.MethodGet, "/v1/version", nil, &v)
	return v.Version, err
}

// Status of the agent.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var s Status
	return &s, c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
}

// Networks lists every network.
func (c *Client) Networks(ctx context.Context) ([]Network, error) {
	var n []Network
	return n, c.do(ctx, http.MethodGet, "/v1/networks", nil, &n)
}

// CreateNetwork creates a network.
func (c *Client) CreateNetwork(ctx context.Context, r CreateNetworkRequest) (*Network, error) {
	var n Network
	return &n, c.do(ctx, http.MethodPost, "/v1/networks", r, &n)
}

// InspectNetwork returns a network with its endpoints.
func (c *Client) InspectNetwork(ctx context.Context, name string) (*NetworkDetail, error) {
	var n NetworkDetail
	return &n, c.do(ctx, http.MethodGet, "/v1/networks/"+url.PathEscape(name), nil, &n)
}

// RemoveNetwork removes a network that has no endpoints.
func (c *Client) RemoveNetwork(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/networks/"+url.PathEscape(name), nil, nil)
}

// Attach attaches a namespace to a network.
func (c *Client) Attach(ctx context.Context, network string, r AttachRequest) (*Endpoint, error) {
	var e Endpoint
	return &e, c.do(ctx, http.MethodPost, "/v1/networks/"+url.PathEscape(network)+"/endpoints", r, &e)
}

// Detach removes an endpoint of this host.
func (c *Client) Detach(ctx context.Context, network, endpoint string) error {
	return c.do(ctx, http.MethodDelete, "/v1/networks/"+url.PathEscape(network)+"/endpoints/"+url.PathEscape(endpoint), nil, nil)
}

// Endpoints lists endpoints on every host, of one network if network is set.
func (c *Client) Endpoints(ctx context.Context, network string) ([]Endpoint, error) {
	p := "/v1/endpoints"
	if network != "" {
		p += "?network=" + url.QueryEscape(network)
	}
	var e []Endpoint
	return e, c.do(ctx, http.MethodGet, p, nil, &e)
}

// Nodes lists every host.
func (c *Client) Nodes(ctx context.Context) ([]Node, error) {
	var n []Node
	return n, c.do(ctx, http.MethodGet, "/v1/nodes", nil, &n)
}

// RemoveNode forgets a host that is gone, releasing its addresses.
func (c *Client) RemoveNode(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/nodes/"+url.PathEscape(name), nil, nil)
}
