// Command vxnet is the command line client of the vxnet agent.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/atomicfile"
)

type cli struct {
	host   string
	output string
	out    io.Writer
}

func main() {
	root := newRoot(os.Stdout)
	if err := root.Execute(); err != nil {
		if f := root.PersistentFlags().Lookup("output"); f != nil && (f.Value.String() == "json" || unknownCommand(err) && outputArg(os.Args[1:]) == "json") {
			// With -o json, errors are JSON too, as the API sends them.
			data, _ := json.Marshal(api.Error{Message: err.Error(), Code: errorCode(err)})
			fmt.Fprintln(os.Stderr, string(data))
		} else {
			fmt.Fprintln(os.Stderr, "Error:", err)
		}
		os.Exit(1)
	}
}

// unknownCommand reports cobra's own error, untyped, for a command it
// lacks, which it gives before it parses any flag.
func unknownCommand(err error) bool { return strings.HasPrefix(err.Error(), "unknown command ") }

// outputArg is the -o/--output value in args, for an error cobra gives
// before it parses flags (an unknown command).
func outputArg(args []string) string {
	out := ""
	for i, a := range args {
		switch {
		case a == "--":
			return out
		case (a == "-o" || a == "--output") && i+1 < len(args):
			out = args[i+1]
		case strings.HasPrefix(a, "--output="):
			out = strings.TrimPrefix(a, "--output=")
		case strings.HasPrefix(a, "-o") && !strings.HasPrefix(a, "--"):
			out = strings.TrimPrefix(strings.TrimPrefix(a, "-o"), "=")
		}
	}
	return out
}

// usageError is the CLI refusing its own input: a flag or an argument.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

// errorCode is the code of err in -o json: the agent's own, or the CLI's
// for what the agent did not answer.
func errorCode(err error) string {
	var ae *api.Error
	var uo *api.UnknownOutcomeError
	var ue usageError
	switch {
	case errors.As(err, &ae):
		return ae.Code
	case errors.As(err, &uo):
		return api.CodeUnknownOutcome
	case errors.Is(err, api.ErrAgentUnavailable):
		return api.CodeAgentUnavailable
	case errors.Is(err, api.ErrPermissionDenied):
		return api.CodePermissionDenied
	case errors.As(err, &ue), unknownCommand(err):
		return api.CodeInvalid
	}
	return api.CodeInternal
}

// markUsage makes the errors of cmd's and its subcommands' flag and
// argument checks usage errors.
func markUsage(cmd *cobra.Command) {
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	if check := cmd.Args; check != nil {
		cmd.Args = func(c *cobra.Command, args []string) error {
			if err := check(c, args); err != nil {
				return usageError{err}
			}
			return nil
		}
	}
	for _, sub := range cmd.Commands() {
		markUsage(sub)
	}
}

// timeoutCompletion bounds a completion's question to the agent.
const timeoutCompletion = 2 * time.Second

func newRoot(out io.Writer) *cobra.Command {
	c := &cli{out: out}
	root := &cobra.Command{
		Use:           "vxnet",
		Short:         "Manage vxnet overlay networks through the local agent",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if c.output != "table" && c.output != "json" {
				return usageError{fmt.Errorf("--output %q: use table or json", c.output)}
			}
			return nil
		},
	}
	defHost := os.Getenv("VXNET_HOST")
	if defHost == "" {
		defHost = "unix://" + api.DefaultSocket
	}
	root.PersistentFlags().StringVarP(&c.host, "host", "H", defHost, "agent socket (env VXNET_HOST)")
	root.PersistentFlags().StringVarP(&c.output, "output", "o", "table", "output format: table or json")
	root.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json"}, cobra.ShellCompDirectiveNoFileComp))

	network := &cobra.Command{Use: "network", Aliases: []string{"net"}, Short: "Manage networks"}
	network.AddCommand(c.networkCreate(), c.networkList(), c.networkInspect(), c.networkRemove(), c.networkPrune())
	endpoint := &cobra.Command{Use: "endpoint", Aliases: []string{"ep"}, Short: "Show endpoints"}
	endpoint.AddCommand(c.endpointList(), c.endpointInspect())
	node := &cobra.Command{Use: "node", Short: "Show nodes"}
	node.AddCommand(c.nodeList(), c.nodeRemove())
	root.AddCommand(network, endpoint, node, c.attach(), c.detach(), c.status(), c.events(), c.doctor(), c.version())
	markUsage(root)
	return root
}

func (c *cli) client() (*api.Client, error) {
	cl, err := api.NewClient(c.host)
	if cl != nil {
		cl.OnWarning = func(w string) { fmt.Fprintln(os.Stderr, "Warning:", w) }
	}
	return cl, err
}

// withClient runs fn with a client of the agent and a bounded context: the
// agent answers in time or the command says why not.
func (c *cli) withClient(cmd *cobra.Command, fn func(context.Context, *api.Client) error) error {
	cl, err := c.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 60*time.Second)
	defer cancel()
	return c.explain(cmd, cmd.Flags().Args(), fn(ctx, cl))
}

// outcomeChecks names, for each mutating command, what it does and the
// read-only command that shows whether it happened (%s: its first argument).
var outcomeChecks = map[string]struct{ what, check string }{
	"attach":         {"the attach", "endpoint ls --network %s"},
	"detach":         {"the detach", "endpoint ls --network %s"},
	"network create": {"the creation", "network ls"},
	"network rm":     {"the removal", "network ls"},
	"node rm":        {"the removal", "node ls"},
}

// explain is where an *api.UnknownOutcomeError becomes words: a request the
// agent got but never answered (it was killed or restarted) may have been
// carried out, so the user must look before retrying, and is told how.
// Other errors pass unchanged.
func (c *cli) explain(cmd *cobra.Command, args []string, err error) error {
	var uo *api.UnknownOutcomeError
	if !errors.As(err, &uo) {
		return err
	}
	name := strings.TrimPrefix(cmd.CommandPath(), cmd.Root().Name()+" ")
	oc, ok := outcomeChecks[name]
	if !ok || len(args) == 0 {
		return err
	}
	check := "vxnet "
	if cmd.Flags().Changed("host") {
		check += "-H " + c.host + " "
	}
	if strings.Contains(oc.check, "%s") {
		check += fmt.Sprintf(oc.check, args[0])
	} else {
		check += oc.check
	}
	return &outcomeError{fmt.Sprintf("%s %s: %s: %s may or may not have happened; check with %q once the agent is back",
		name, strings.Join(args, " "), uo.Reason, oc.what, check), uo}
}

// outcomeError is an unknown outcome told in the CLI's words.
type outcomeError struct {
	msg string
	err *api.UnknownOutcomeError
}

func (e *outcomeError) Error() string { return e.msg }
func (e *outcomeError) Unwrap() error { return e.err }

func (c *cli) json(v any) error {
	enc := json.NewEncoder(c.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (c *cli) table(header string, rows [][]string) {
	w := tabwriter.NewWriter(c.out, 0, 0, 3, ' ', 0)
	fmt.Fprintln(w, header)
	for _, r := range rows {
		fmt.Fprintln(w, strings.Join(r, "\t"))
	}
	w.Flush()
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func (c *cli) networkCreate() *cobra.Command {
	var req api.CreateNetworkRequest
	var vni uint32
	var mtu int
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create an overlay network (visible on every host)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				req.Name = args[0]
				// Only a flag that was given is sent: an explicit 0 is
				// the agent's to refuse, not a request for a default.
				if cmd.Flags().Changed("vni") {
					req.VNI = &vni
				}
				if cmd.Flags().Changed("mtu") {
					req.MTU = &mtu
				}
				n, err := cl.CreateNetwork(ctx, req)
				if err != nil {
					return err
				}
				if c.output == "json" {
					return c.json(n)
				}
				fmt.Fprintln(c.out, n.ID)
				return nil
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.Subnet, "subnet", "", "subnet in CIDR form (default: the next free /24 of the pool)")
	f.StringVar(&req.Gateway, "gateway", "", "gateway address, held by br0 (default: the first address of the subnet)")
	f.Uint32Var(&vni, "vni", 0, "VXLAN network identifier, 1..16777215 (default: the lowest free from 256)")
	f.IntVar(&mtu, "mtu", 0, "MTU of the containers' interfaces (default: underlay MTU - 50)")
	f.BoolVar(&req.Internal, "internal", false, "no egress to outside the overlay")
	return cmd
}

func (c *cli) printNetworks(ns []api.Network) error {
	if c.output == "json" {
		return c.json(ns)
	}
	rows := make([][]string, 0, len(ns))
	for _, n := range ns {
		if n.Error != "" {
			// A record that does not decode: its name is taken, and
			// "network rm" removes it.
			rows = append(rows, []string{"-", n.Name, "unreadable record: " + n.Error, "", "", "", ""})
			continue
		}
		rows = append(rows, []string{short(n.ID), n.Name, n.Subnet, n.Gateway, fmt.Sprint(n.VNI), fmt.Sprint(n.MTU), fmt.Sprint(n.Internal)})
	}
	c.table("NETWORK ID\tNAME\tSUBNET\tGATEWAY\tVNI\tMTU\tINTERNAL", rows)
	return nil
}

func (c *cli) networkList() *cobra.Command {
	var o listOpts
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List networks",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			filters, err := o.parse()
			if err != nil {
				return err
			}
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				ns, err := cl.Networks(ctx)
				if err != nil {
					return err
				}
				ns = slices.DeleteFunc(ns, func(n api.Network) bool { return !matches(filters, map[string]string{"name": n.Name, "id": n.ID}) })
				return emit(c, &o, ns, func(n api.Network) string { return n.ID }, c.printNetworks)
			})
		},
	}
	o.register(cmd, true, "name", "id")
	return cmd
}

func (c *cli) networkInspect() *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:               "inspect NAME...",
		Short:             "Show networks (by name or id prefix) in detail, with their endpoints (JSON; -o table for a summary)",
		Args:              cobra.MinimumNArgs(1),
		ValidArgsFunction: c.completeNetworks,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				// As docker does: what was found is printed, each name
				// not found is an error, and the command fails if any was.
				out := []*api.NetworkDetail{}
				failed := 0
				for _, name := range args {
					d, err := cl.InspectNetwork(ctx, name)
					if notFound(err) {
						if full, rerr := resolveNetwork(ctx, cl, name); rerr == nil && full != name {
							d, err = cl.InspectNetwork(ctx, full)
						}
					}
					if err != nil {
						fmt.Fprintln(os.Stderr, "Error:", err)
						failed++
						continue
					}
					out = append(out, d)
				}
				var err error
				if format != "" {
					err = emit(c, &listOpts{format: format}, out, nil, nil)
				} else if f := cmd.Flag("output"); f != nil && f.Changed && c.output == "table" {
					c.inspectTable(out)
				} else {
					// Inspect is for detail: JSON by default, as users of docker expect.
					err = c.json(out)
				}
				if failed > 0 {
					return fmt.Errorf("%d of %d networks not found", failed, len(args))
				}
				return err
			})
		},
	}
	cmd.Flags().StringVar(&format, "format", "", "print each network with a Go template, e.g. '{{.Subnet}}'")
	return cmd
}

// inspectTable prints each network's facts and its endpoints.
func (c *cli) inspectTable(nets []*api.NetworkDetail) {
	for i, d := range nets {
		if i > 0 {
			fmt.Fprintln(c.out)
		}
		fmt.Fprintf(c.out, "Network %s (%s): subnet %s, gateway %s, VNI %d, MTU %d, internal %v", d.Name, short(d.ID), d.Subnet, d.Gateway, d.VNI, d.MTU, d.Internal)
		if d.Namespace != "" {
			fmt.Fprintf(c.out, ", namespace %s here", d.Namespace)
		}
		fmt.Fprintln(c.out)
		rows := make([][]string, 0, len(d.Endpoints))
		for _, e := range d.Endpoints {
			rows = append(rows, []string{e.Name, e.Node, e.IP, e.MAC, e.Interface, e.VTEP})
		}
		c.table("ENDPOINT\tNODE\tIP\tMAC\tINTERFACE\tVTEP", rows)
	}
}

func (c *cli) networkRemove() *cobra.Command {
	return &cobra.Command{
		Use:               "rm NAME...",
		Aliases:           []string{"remove"},
		Short:             "Remove networks (by name or id prefix) that have no endpoints",
		Args:              cobra.MinimumNArgs(1),
		ValidArgsFunction: c.completeNetworks,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				return c.removeNetworks(ctx, cmd, cl, args)
			})
		},
	}
}

// removeNetworks removes each network, naming it as it goes (a JSON list
// with -o json), and fails for those it could not remove.
func (c *cli) removeNetworks(ctx context.Context, cmd *cobra.Command, cl *api.Client, names []string) error {
	failed := 0
	removed := []string{}
	for _, name := range names {
		err := cl.RemoveNetwork(ctx, name)
		if notFound(err) {
			if full, rerr := resolveNetwork(ctx, cl, name); rerr == nil && full != name {
				name, err = full, cl.RemoveNetwork(ctx, full)
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "Error:", c.explain(cmd, []string{name}, err))
			failed++
			continue
		}
		removed = append(removed, name)
		if c.output != "json" {
			fmt.Fprintln(c.out, name)
		}
	}
	if c.output == "json" {
		c.json(removed)
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d networks not removed", failed, len(names))
	}
	return nil
}

func (c *cli) networkPrune() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Remove every network that has no endpoints",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if !force {
				fmt.Fprint(os.Stderr, "WARNING! This removes every vxnet network without endpoints, on every host.\nAre you sure you want to continue? [y/N] ")
				var answer string
				fmt.Fscanln(cmd.InOrStdin(), &answer)
				if a := strings.ToLower(strings.TrimSpace(answer)); a != "y" && a != "yes" {
					return errors.New("not pruned (give -f to skip the question)")
				}
			}
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				ns, err := cl.Networks(ctx)
				if err != nil {
					return err
				}
				var idle []string
				for _, n := range ns {
					if n.Error != "" {
						continue // an unreadable record is removed by name, deliberately
					}
					d, err := cl.InspectNetwork(ctx, n.Name)
					if err != nil {
						return err
					}
					if len(d.Endpoints) == 0 {
						idle = append(idle, n.Name)
					}
				}
				if len(idle) == 0 {
					if c.output == "json" {
						return c.json([]string{})
					}
					return nil
				}
				return c.removeNetworks(ctx, cmd, cl, idle)
			})
		},
	}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "do not ask")
	return cmd
}

func (c *cli) printEndpoints(eps []api.Endpoint) error {
	if c.output == "json" {
		return c.json(eps)
	}
	rows := make([][]string, 0, len(eps))
	for _, e := range eps {
		ports := strings.Join(e.Ports, ",")
		if ports == "" {
			ports = "-"
		}
		aliases := strings.Join(e.Aliases, ",")
		if aliases == "" {
			aliases = "-"
		}
		ifName := e.Interface
		if ifName == "" {
			ifName = "-" // handed to a runtime that has not named it yet
		}
		rows = append(rows, []string{e.Name, e.Network, e.Node, e.IP, e.MAC, ifName, e.VTEP, ports, aliases})
	}
	c.table("NAME\tNETWORK\tNODE\tIP\tMAC\tINTERFACE\tVTEP\tPORTS\tALIASES", rows)
	return nil
}

func (c *cli) attach() *cobra.Command {
	var req api.AttachRequest
	var resolvConf string
	cmd := &cobra.Command{
		Use:   "attach NETWORK NETNS",
		Short: "Attach a network namespace (a path, or a name under /var/run/netns) to a network",
		Args:  cobra.ExactArgs(2),
		ValidArgsFunction: func(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
			if len(args) == 0 {
				return c.completeNetworks(cmd, args, toComplete)
			}
			return nil, cobra.ShellCompDirectiveDefault // a namespace path
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				// The agent resolves a relative path against its own
				// working directory, not the user's: send it absolute. A
				// bare name (no '/') is a name under /var/run/netns.
				req.Netns = args[1]
				if strings.Contains(req.Netns, "/") && !filepath.IsAbs(req.Netns) {
					abs, err := filepath.Abs(req.Netns)
					if err != nil {
						return fmt.Errorf("netns %q: %w", req.Netns, err)
					}
					req.Netns = abs
				}
				if resolvConf != "" {
					// Refused before anything is attached, not after.
					if st, err := cl.Status(ctx); err == nil && st.DNS == "off" {
						return errors.New("--resolv-conf: the agent runs without DNS (vxnetd --dns=false)")
					}
				}
				e, err := cl.Attach(ctx, args[0], req)
				if err != nil {
					return err
				}
				if resolvConf != "" {
					if err := writeResolvConf(resolvConf, e.DNS); err != nil {
						return fmt.Errorf("attached, but --resolv-conf: %w", err)
					}
				}
				if c.output == "json" {
					return c.json(e)
				}
				if err := c.printEndpoints([]api.Endpoint{*e}); err != nil {
					return err
				}
				if g := e.Egress; g != nil {
					ifName := g.Interface
					if ifName == "" {
						ifName = "its gateway interface"
					}
					route := "default route " + g.DefaultRoute
					if g.DefaultRoute == "own" {
						route = "its own default route kept (--default-route replaces it)"
					}
					fmt.Fprintf(c.out, "egress: %s %s on the host's gateway bridge; %s\n", ifName, g.Address, route)
				}
				if d := e.DNS; d != nil {
					fmt.Fprintf(c.out, "dns: nameserver %s, search %s\n", d.Server, strings.Join(d.Search, " "))
				}
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&req.Name, "name", "", "endpoint name (default: the namespace's name)")
	cmd.Flags().StringVar(&req.IP, "ip", "", "address inside the network's subnet (default: the next free one)")
	cmd.Flags().StringArrayVarP(&req.Publish, "publish", "p", nil,
		"forward HOSTPORT:CONTAINERPORT[/tcp|udp] of the host's addresses to the container (repeatable)")
	cmd.Flags().BoolVar(&req.ReplaceDefaultRoute, "default-route", false,
		"replace the container's own default route with one through the gateway bridge; detach restores it")
	cmd.Flags().StringArrayVar(&req.Aliases, "alias", nil, "another DNS name of the endpoint on the network (repeatable)")
	cmd.Flags().StringVar(&resolvConf, "resolv-conf", "",
		"write a resolv.conf naming the network's DNS server and search domain to this path (for ip netns users: /etc/netns/NAME/resolv.conf)")
	return cmd
}

// writeResolvConf points a namespace's resolver at its network's DNS
// server; `ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf over
// /etc/resolv.conf.
func writeResolvConf(path string, d *api.DNS) error {
	if d == nil {
		return errors.New("the agent runs without DNS (vxnetd --dns=false)")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	body := fmt.Sprintf("# written by vxnet attach\nnameserver %s\nsearch %s\n", d.Server, strings.Join(d.Search, " "))
	return atomicfile.Write(path, []byte(body), 0o644)
}

func (c *cli) detach() *cobra.Command {
	return &cobra.Command{
		Use:               "detach NETWORK ENDPOINT",
		Short:             "Detach an endpoint of this host from a network",
		Args:              cobra.ExactArgs(2),
		ValidArgsFunction: c.completeEndpoints,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				if err := cl.Detach(ctx, args[0], args[1]); err != nil {
					return err
				}
				if c.output == "json" {
					return c.json(map[string]string{"network": args[0], "endpoint": args[1], "detached": "true"})
				}
				return nil
			})
		},
	}
}

func (c *cli) endpointList() *cobra.Command {
	var network string
	var o listOpts
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List endpoints on every host",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			filters, err := o.parse()
			if err != nil {
				return err
			}
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				eps, err := cl.Endpoints(ctx, network)
				if err != nil {
					return err
				}
				eps = slices.DeleteFunc(eps, func(e api.Endpoint) bool {
					return !matches(filters, map[string]string{"name": e.Name, "id": e.ID, "node": e.Node, "network": e.Network})
				})
				return emit(c, &o, eps, func(e api.Endpoint) string { return e.Name }, c.printEndpoints)
			})
		},
	}
	cmd.Flags().StringVar(&network, "network", "", "only this network's endpoints")
	cmd.RegisterFlagCompletionFunc("network", c.completeNetworks)
	o.register(cmd, true, "name", "id", "node", "network")
	return cmd
}

func (c *cli) endpointInspect() *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "inspect [NETWORK/]NAME...",
		Short: "Show endpoints in detail (JSON)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				eps, err := cl.Endpoints(ctx, "")
				if err != nil {
					return err
				}
				out := []api.Endpoint{}
				failed := 0
				for _, arg := range args {
					network, name, scoped := strings.Cut(arg, "/")
					if !scoped {
						name = arg
					}
					var found []api.Endpoint
					for _, e := range eps {
						if e.Name == name && (!scoped || e.Network == network) {
							found = append(found, e)
						}
					}
					switch len(found) {
					case 0:
						fmt.Fprintf(os.Stderr, "Error: endpoint %q not found\n", arg)
						failed++
					case 1:
						out = append(out, found[0])
					default:
						fmt.Fprintf(os.Stderr, "Error: endpoint %q is on %d networks: give NETWORK/%s\n", arg, len(found), name)
						failed++
					}
				}
				if format != "" {
					err = emit(c, &listOpts{format: format}, out, nil, nil)
				} else {
					err = c.json(out)
				}
				if failed > 0 {
					return fmt.Errorf("%d of %d endpoints not found", failed, len(args))
				}
				return err
			})
		},
	}
	cmd.Flags().StringVar(&format, "format", "", "print each endpoint with a Go template, e.g. '{{.IP}}'")
	return cmd
}

func (c *cli) nodeList() *cobra.Command {
	var o listOpts
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List hosts running an agent",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			filters, err := o.parse()
			if err != nil {
				return err
			}
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				ns, err := cl.Nodes(ctx)
				if err != nil {
					return err
				}
				ns = slices.DeleteFunc(ns, func(n api.Node) bool { return !matches(filters, map[string]string{"name": n.Name, "state": n.State}) })
				return emit(c, &o, ns, func(n api.Node) string { return n.Name }, func(ns []api.Node) error {
					rows := make([][]string, 0, len(ns))
					for _, n := range ns {
						rows = append(rows, []string{n.Name, n.Address, n.State, livenessText(n.Liveness, n.ConsulNode, n.Name), n.LastSeen.Local().Format(time.DateTime), n.Version})
					}
					c.table("NAME\tADDRESS\tSTATE\tLIVENESS\tLAST SEEN\tVERSION", rows)
					return nil
				})
			})
		},
	}
	o.register(cmd, true, "name", "state")
	return cmd
}

func (c *cli) nodeRemove() *cobra.Command {
	return &cobra.Command{
		Use:               "rm NODE",
		Aliases:           []string{"remove"},
		Short:             "Forget a host that is gone and release the addresses its endpoints held",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: c.completeNodes,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				return cl.RemoveNode(ctx, args[0])
			})
		},
	}
}

func (c *cli) status() *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the local agent's state",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				s, err := cl.Status(ctx)
				if err != nil {
					return err
				}
				if c.output == "json" {
					return c.json(s)
				}
				store := "reachable"
				if !s.StoreReachable {
					store = "UNREACHABLE: " + s.StoreError
					if !s.StoreDownSince.IsZero() {
						store += fmt.Sprintf(" (since %s)", s.StoreDownSince.Local().Format(time.DateTime))
					}
				}
				w := tabwriter.NewWriter(c.out, 0, 0, 2, ' ', 0)
				fmt.Fprintf(w, "Node:\t%s\nAddress:\t%s\nVersion:\t%s\nStore:\t%s\nStore state:\t%s\nNetworks:\t%d\nLocal endpoints:\t%d\nStarted:\t%s\n",
					s.Node, s.Address, s.Version, s.Store, store, s.Networks, s.LocalEndpoints, s.Started.Local().Format(time.DateTime))
				if !s.LastReconcile.IsZero() {
					fmt.Fprintf(w, "Last reconcile:\t%s\n", s.LastReconcile.Local().Format(time.DateTime))
				}
				ready := "yes"
				if !s.Ready {
					ready = "no: not yet synced from the store and reconciled"
				}
				fmt.Fprintf(w, "Ready:\t%s\n", ready)
				if s.Liveness != "" {
					fmt.Fprintf(w, "Liveness:\t%s\n", livenessText(s.Liveness, s.ConsulNode, s.Node))
				}
				if s.SessionError != "" {
					fmt.Fprintf(w, "Session:\tREFUSED: %s\n", s.SessionError)
				}
				if s.DNS != "" {
					fmt.Fprintf(w, "DNS:\t%s\n", s.DNS)
				}
				return w.Flush()
			})
		},
	}
}

// livenessText says how a node's death is noticed, with its Consul node
// where that is not named as the node is.
func livenessText(mode, consulNode, node string) string {
	switch {
	case mode == "":
		return "-" // an agent of before liveness was recorded
	case mode == "gossip+ttl" && consulNode != "" && consulNode != node:
		return mode + " (consul node " + consulNode + ")"
	}
	return mode
}

func (c *cli) events() *cobra.Command {
	var since string
	cmd := &cobra.Command{
		Use:   "events",
		Short: "Stream what the agent does (attach, detach, peers, namespaces, repairs, store and nodes) until interrupted",
		Long: `Stream what the local agent does, as docker events does: attach, detach,
peer_added, peer_removed, peers_synced, namespace_created, namespace_removed,
drift_repaired, leak_removed, store_down, store_up, node_up, node_down.
--since replays the recent events the agent keeps (the last 1000) first.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return cl.Events(ctx, since, func(ev api.Event) error {
				if c.output == "json" {
					// One line each, as a stream is read.
					data, _ := json.Marshal(ev)
					_, err := fmt.Fprintf(c.out, "%s\n", data)
					return err
				}
				_, err := fmt.Fprintf(c.out, "%s  %-17s %s\n", ev.Time.Local().Format("2006-01-02 15:04:05.000"), ev.Kind, eventText(ev))
				return err
			})
		},
	}
	cmd.Flags().StringVar(&since, "since", "", "first replay the kept events of this long ago (10m) or since this RFC 3339 time")
	return cmd
}

func (c *cli) doctor() *cobra.Command {
	return &cobra.Command{
		Use:   "doctor",
		Short: "Check this host's overlay and say what is wrong and what to do (exit code 1 if anything is)",
		Long: `Check this host: the kernel features (vxlan, bridge, veth, ip_forward for
egress), the agent's mount namespace, every local network's peer entries and
veths against what the agent programmed, the egress iptables chains, routes
to the peer VTEPs, MTUs against the underlay's, the store's round trip and
the node's session, and the free addresses of each network.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withClient(cmd, func(ctx context.Context, cl *api.Client) error {
				fs, err := cl.Doctor(ctx)
				if err != nil {
					return err
				}
				bad := 0
				rows := make([][]string, 0, len(fs))
				for _, f := range fs {
					status := "ok"
					if !f.OK {
						status, bad = "PROBLEM", bad+1
					}
					net := f.Network
					if net == "" {
						net = "-"
					}
					rows = append(rows, []string{f.Check, status, net, f.Message, f.Fix})
				}
				if c.output == "json" {
					if err := c.json(fs); err != nil {
						return err
					}
				} else {
					c.table("CHECK\tSTATUS\tNETWORK\tFINDING\tWHAT TO DO", rows)
				}
				if bad > 0 {
					return fmt.Errorf("%d of %d checks found a problem", bad, len(fs))
				}
				return nil
			})
		},
	}
}

// eventText is an event's fields as one line of a table.
func eventText(ev api.Event) string {
	var parts []string
	for _, f := range []struct{ k, v string }{{"network", ev.Network}, {"node", ev.Node}, {"endpoint", ev.Endpoint}, {"ip", ev.IP}} {
		if f.v != "" {
			parts = append(parts, f.k+"="+f.v)
		}
	}
	if ev.Detail != "" {
		parts = append(parts, ev.Detail)
	}
	return strings.Join(parts, " ")
}

func (c *cli) version() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the client and agent versions",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 3*time.Second)
			defer cancel()
			v, verr := cl.Version(ctx)
			if c.output == "json" {
				out := map[string]string{"client": api.Version}
				if verr == nil {
					out["agent"] = v
				}
				if err := c.json(out); err != nil {
					return err
				}
				return verr
			}
			fmt.Fprintln(c.out, "Client:", api.Version)
			if verr != nil {
				return verr
			}
			fmt.Fprintln(c.out, "Agent: ", v)
			return nil
		},
	}
}
