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
	"net/http/httptrace"
	"net/url"
	"strconv"
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
	// OnWarning, if set, gets the warnings an answer carries (a listing
	// answered from the agent's own view while the store is down).
	OnWarning func(string)
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
	// Whether the whole request went out decides what a broken connection
	// means: before that the agent cannot have acted on it, after it the
	// agent may have.
	sent := false
	req = req.WithContext(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		WroteRequest: func(i httptrace.WroteRequestInfo) { sent = i.Err == nil },
	}))
	resp, err := c.http.Do(req)
	if err != nil {
		// Do waits for the transport's writer to finish before it
		// returns an error, so sent is settled here.
		return explain(c.socket, method, path, sent, err)
	}
	defer resp.Body.Close()
	if c.OnWarning != nil {
		for _, w := range resp.Header.Values("Warning") {
			// 199 vxnetd "text"
			if i := strings.IndexByte(w, '"'); i >= 0 {
				if s, err := strconv.Unquote(w[i:]); err == nil {
					w = s
				}
			}
			c.OnWarning(w)
		}
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return explain(c.socket, method, path, true, err)
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

// UnknownOutcomeError is a mutating request (POST, DELETE) that reached the
// agent but got no answer: the agent may have carried it out or not, e.g.
// when it was killed mid-request; only a look at the state tells.
type UnknownOutcomeError struct {
	Method, Path string
	// Reason says in words what happened to the connection.
	Reason string
	Err    error
}

func (e *UnknownOutcomeError) Error() string {
	return fmt.Sprintf("%s %s: %s: it may or may not have been carried out", e.Method, e.Path, e.Reason)
}

func (e *UnknownOutcomeError) Unwrap() error { return e.Err }

// ErrAgentUnavailable is matched (errors.Is) by the error of a request
// the agent did not answer and that changed nothing: the agent could not
// be reached, or a read broke off. A change whose answer was lost is an
// UnknownOutcomeError instead.
var ErrAgentUnavailable = errors.New("agent unavailable")

// ErrPermissionDenied is matched by the error of a request this user may
// not make: the agent's socket refused the connection.
var ErrPermissionDenied = errors.New("permission denied")

// marked is err that also matches the sentinel as, keeping err's text.
type marked struct {
	error
	as error
}

func (e marked) Unwrap() error         { return e.error }
func (e marked) Is(target error) bool  { return target == e.as }
func unavailable(err error) error      { return marked{err, ErrAgentUnavailable} }
func permissionDenied(err error) error { return marked{err, ErrPermissionDenied} }

// explain turns a failed round trip to the agent at socket into an error a
// user can act on. sent says whether the whole request had been written.
func explain(socket, method, path string, sent bool, err error) error {
	// The url.Error around err repeats the made-up URL http://vxnetd/...,
	// which tells a user nothing; the method and path say it better.
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	if !sent {
		switch {
		case errors.Is(err, syscall.ENOENT):
			return unavailable(fmt.Errorf("cannot reach vxnetd: no socket %s: is vxnetd running? (-H or VXNET_HOST name another socket)", socket))
		case errors.Is(err, syscall.ECONNREFUSED):
			return unavailable(fmt.Errorf("cannot reach vxnetd: connection refused on %s: is vxnetd running? (the socket file is left from one that stopped)", socket))
		case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
			return permissionDenied(fmt.Errorf("permission denied on %s: run as root, or as a member of the group given to vxnetd --socket-group", socket))
		}
		return unavailable(fmt.Errorf("cannot reach vxnetd at %s: %w", socket, err))
	}
	var reason string
	var ne net.Error
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		reason = "the agent closed the connection before answering (EOF)"
	case errors.Is(err, syscall.ECONNRESET):
		reason = "the agent closed the connection before answering (connection reset)"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		reason = "the agent did not answer in time"
	case errors.Is(err, context.Canceled):
		reason = "the request was interrupted before the agent answered"
	default:
		reason = fmt.Sprintf("the connection to the agent broke before it answered (%v)", err)
	}
	if method == http.MethodGet {
		return unavailable(fmt.Errorf("vxnetd at %s: %s; it may have stopped or be restarting", socket, reason))
	}
	return &UnknownOutcomeError{Method: method, Path: path, Reason: reason, Err: err}
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

// PlanNetwork says what creating r would give, creating nothing.
func (c *Client) PlanNetwork(ctx context.Context, r CreateNetworkRequest) (*NetworkPlan, error) {
	var out NetworkPlan
	return &out, c.do(ctx, http.MethodPost, "/v1/network-plans", r, &out)
}

// SetNetns says where a handed-off interface went (AttachRequest.Handoff).
func (c *Client) SetNetns(ctx context.Context, network, endpoint, netns string) error {
	return c.do(ctx, http.MethodPut, "/v1/networks/"+url.PathEscape(network)+"/endpoints/"+url.PathEscape(endpoint)+"/netns", NetnsRequest{Netns: netns}, nil)
}

// SetAliases replaces an endpoint's other DNS names.
func (c *Client) SetAliases(ctx context.Context, network, endpoint string, aliases []string) error {
	return c.do(ctx, http.MethodPut, "/v1/networks/"+url.PathEscape(network)+"/endpoints/"+url.PathEscape(endpoint)+"/aliases", AliasesRequest{Aliases: aliases}, nil)
}

// Reserve reserves an address of a network for this host.
func (c *Client) Reserve(ctx context.Context, network string, r ReserveRequest) (*Reservation, error) {
	var out Reservation
	return &out, c.do(ctx, http.MethodPost, "/v1/networks/"+url.PathEscape(network)+"/addresses", r, &out)
}

// ReleaseReservation releases an address this host reserved; one that an
// endpoint holds, or nobody, is left alone.
func (c *Client) ReleaseReservation(ctx context.Context, network, ip string) error {
	return c.do(ctx, http.MethodDelete, "/v1/networks/"+url.PathEscape(network)+"/addresses/"+url.PathEscape(ip), nil, nil)
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

// Events streams the agent's events, from those it kept since since (zero:
// only new ones), calling f for each until ctx is done, the stream ends or
// f returns an error.
func (c *Client) Events(ctx context.Context, since string, f func(Event) error) error {
	p := "/v1/events"
	if since != "" {
		p += "?since=" + url.QueryEscape(since)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://vxnetd"+p, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req) // no client timeout: only the headers are bounded
	if err != nil {
		return explain(c.socket, http.MethodGet, p, false, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e Error
		data, _ := io.ReadAll(resp.Body)
		if json.Unmarshal(data, &e) == nil && e.Message != "" {
			return &e
		}
		return fmt.Errorf("vxnetd: %s: %s", resp.Status, strings.TrimSpace(string(data)))
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var ev Event
		if err := dec.Decode(&ev); err != nil {
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("events: %w", err)
		}
		if err := f(ev); err != nil {
			return err
		}
	}
}

// Doctor runs the agent's checks of its host.
func (c *Client) Doctor(ctx context.Context) ([]Finding, error) {
	var f []Finding
	return f, c.do(ctx, http.MethodGet, "/v1/doctor", nil, &f)
}
