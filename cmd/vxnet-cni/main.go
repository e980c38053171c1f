// Command vxnet-cni is a CNI plugin (spec 1.0.0, and 1.1's STATUS) that
// attaches containers to vxnet networks through the local vxnetd: podman,
// containerd, Kubernetes and Nomad call it; the agent does the work.
//
//	{"cniVersion":"1.0.0","name":"net1","type":"vxnet-cni","network":"net1","socket":"/run/vxnet/vxnet.sock"}
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/netnsutil"
)

// conf is the plugin's network configuration.
type conf struct {
	types.PluginConf
	// Network is the vxnet network; default: the configuration's name.
	Network string `json:"network"`
	// Socket is the agent's API socket; default api.DefaultSocket.
	Socket string `json:"socket"`
	// RuntimeConfig carries the "ips" capability: a static address.
	RuntimeConfig struct {
		IPs []string `json:"ips"`
	} `json:"runtimeConfig"`
}

// timeout bounds each call to the agent; an attach is bounded at 8 s
// there, plus its rollback.
const timeout = 15 * time.Second

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck, Status: cmdStatus},
		version.PluginSupports("0.4.0", "1.0.0", "1.1.0"), "CNI plugin vxnet-cni "+api.Version)
}

func load(stdin []byte) (*conf, *api.Client, error) {
	var c conf
	if err := json.Unmarshal(stdin, &c); err != nil {
		return nil, nil, types.NewError(types.ErrDecodingFailure, "vxnet-cni: cannot parse the network configuration", err.Error())
	}
	if c.Network == "" {
		c.Network = c.Name
	}
	if c.Network == "" {
		return nil, nil, types.NewError(types.ErrInvalidNetworkConfig, `vxnet-cni: the configuration names no network: set "network" (or "name")`, "")
	}
	cl, err := api.NewClient(c.Socket)
	if err != nil {
		return nil, nil, types.NewError(types.ErrInvalidNetworkConfig, "vxnet-cni: socket", err.Error())
	}
	return &c, cl, nil
}

// endpointName is the vxnet endpoint of one (container, interface): the
// same for ADD, CHECK and DEL, and readable in `vxnet endpoint ls`.
func endpointName(containerID, ifName string) string {
	id := badChars.ReplaceAllString(containerID, "-")
	if len(id) > 40 {
		id = id[:40]
	}
	name := strings.TrimLeft(id+"-"+badChars.ReplaceAllString(ifName, "-"), "-_.")
	if name == "" {
		name = "cni"
	}
	return name
}

var badChars = regexp.MustCompile(`[^A-Za-z0-9_.-]`)

// staticIP is the address asked for through the "ips" capability or
// CNI_ARGS IP=, if any.
func staticIP(c *conf, cniArgs string) (string, error) {
	var want []string
	want = append(want, c.RuntimeConfig.IPs...)
	for _, kv := range strings.Split(cniArgs, ";") {
		if k, v, ok := strings.Cut(kv, "="); ok && k == "IP" {
			want = append(want, strings.Split(v, ",")...)
		}
	}
	switch len(want) {
	case 0:
		return "", nil
	case 1:
	default:
		return "", types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("vxnet-cni: %d addresses asked for; an endpoint has one", len(want)), "")
	}
	s := want[0]
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Addr().String(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return a.String(), nil
	}
	return "", types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("vxnet-cni: address %q is not an IPv4 address", s), "")
}

// agentError maps the agent's answer to a CNI error with the agent's
// message, so that the runtime shows what is wrong.
func agentError(what string, err error) error {
	var ae *api.Error
	code := types.ErrInternal
	if errors.As(err, &ae) {
		switch ae.Code {
		case api.CodeInvalid, api.CodeNotFound, api.CodeConflict:
			code = types.ErrInvalidNetworkConfig
		case api.CodeUnavailable:
			code = types.ErrTryAgainLater
		}
	} else if !errors.Is(err, context.Canceled) {
		// The agent did not answer: not running, or a socket elsewhere.
		code = types.ErrTryAgainLater
	}
	return types.NewError(code, "vxnet-cni: "+what+": "+err.Error(), "")
}

func cmdAdd(args *skel.CmdArgs) error {
	c, cl, err := load(args.StdinData)
	if err != nil {
		return err
	}
	ip, err := staticIP(c, args.Args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	n, err := cl.InspectNetwork(ctx, c.Network)
	if err != nil {
		return agentError("network "+c.Network, err)
	}
	ep, err := cl.Attach(ctx, c.Network, api.AttachRequest{Netns: args.Netns, Name: endpointName(args.ContainerID, args.IfName), IP: ip, Interface: args.IfName})
	if err != nil {
		return agentError("attach", err)
	}
	res, err := result(n, ep, args.Netns)
	if err != nil {
		return err
	}
	return types.PrintResult(res, c.CNIVersion)
}

// result is what ADD returns: the container's interface and its address
// on the network, with the network's gateway (br0).
func result(n *api.NetworkDetail, ep *api.Endpoint, netnsPath string) (*current.Result, error) {
	subnet, err := netip.ParsePrefix(n.Subnet)
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "vxnet-cni: the agent's subnet "+n.Subnet, err.Error())
	}
	addr, err := netip.ParseAddr(ep.IP)
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "vxnet-cni: the agent's address "+ep.IP, err.Error())
	}
	ipnet := net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(subnet.Bits(), 32)}
	res := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{{Name: ep.Interface, Mac: ep.MAC, Mtu: n.MTU, Sandbox: netnsPath}},
		IPs:        []*current.IPConfig{{Interface: current.Int(0), Address: ipnet, Gateway: net.ParseIP(n.Gateway)}},
	}
	if d := ep.DNS; d != nil {
		// The network's DNS server answers its endpoints' names and
		// forwards the rest; the runtime writes the container's
		// resolv.conf from this.
		res.DNS = types.DNS{Nameservers: []string{d.Server}, Domain: n.Name, Search: d.Search}
	}
	return res, nil
}

// cmdDel detaches; an endpoint, network or agent record already gone is
// success, as the spec asks, so that a runtime can always clean up.
func cmdDel(args *skel.CmdArgs) error {
	c, cl, err := load(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err = cl.Detach(ctx, c.Network, endpointName(args.ContainerID, args.IfName))
	var ae *api.Error
	if err == nil || errors.As(err, &ae) && ae.Code == api.CodeNotFound {
		return nil
	}
	return agentError("detach", err)
}

// cmdCheck verifies that the agent has the endpoint on this host, that the
// container's interface holds its address, and that the network's peers
// are programmed as the agent wants them (its doctor's datapath check).
func cmdCheck(args *skel.CmdArgs) error {
	c, cl, err := load(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	name := endpointName(args.ContainerID, args.IfName)
	eps, err := cl.Endpoints(ctx, c.Network)
	if err != nil {
		return agentError("list endpoints", err)
	}
	var ep *api.Endpoint
	for i := range eps {
		if eps[i].Name == name {
			ep = &eps[i]
		}
	}
	if ep == nil {
		return types.NewError(types.ErrUnknownContainer, fmt.Sprintf("vxnet-cni: endpoint %s is not on network %s", name, c.Network), "")
	}
	if ep.Interface != args.IfName {
		return types.NewError(types.ErrInternal, fmt.Sprintf("vxnet-cni: endpoint %s is on interface %s, not %s", name, ep.Interface, args.IfName), "")
	}
	if err := checkInterface(args.Netns, args.IfName, ep.IP); err != nil {
		return err
	}
	findings, err := cl.Doctor(ctx)
	if err != nil {
		return agentError("doctor", err)
	}
	for _, f := range findings {
		if f.Check == "datapath" && f.Network == c.Network && !f.OK {
			return types.NewError(types.ErrInternal, "vxnet-cni: network "+c.Network+": "+f.Message, f.Fix)
		}
	}
	return nil
}

// checkInterface looks into the container's namespace for the interface
// and its address.
func checkInterface(nsPath, ifName, ip string) error {
	h, err := netns.GetFromPath(nsPath)
	if err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "vxnet-cni: netns "+nsPath, err.Error())
	}
	defer h.Close()
	nl, err := netnsutil.Handle(h)
	if err != nil {
		return types.NewError(types.ErrInternal, "vxnet-cni: netlink in "+nsPath, err.Error())
	}
	defer nl.Close()
	link, err := nl.LinkByName(ifName)
	if err != nil {
		return types.NewError(types.ErrInternal, fmt.Sprintf("vxnet-cni: interface %s in %s", ifName, nsPath), err.Error())
	}
	if link.Attrs().OperState != netlink.OperUp && link.Attrs().Flags&net.FlagUp == 0 {
		return types.NewError(types.ErrInternal, fmt.Sprintf("vxnet-cni: interface %s is down", ifName), "")
	}
	addrs, err := nl.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return types.NewError(types.ErrInternal, fmt.Sprintf("vxnet-cni: addresses of %s", ifName), err.Error())
	}
	for _, a := range addrs {
		if a.IP.String() == ip {
			return nil
		}
	}
	return types.NewError(types.ErrInternal, fmt.Sprintf("vxnet-cni: interface %s lacks its address %s", ifName, ip), "")
}

// cmdStatus (CNI 1.1): ready while the agent answers and has its store.
func cmdStatus(args *skel.CmdArgs) error {
	_, cl, err := load(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	st, err := cl.Status(ctx)
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "vxnet-cni: the agent does not answer", err.Error())
	}
	if !st.StoreReachable {
		return types.NewError(types.ErrLimitedConnectivity, "vxnet-cni: the agent's store is unreachable: "+st.StoreError, "")
	}
	return nil
}
