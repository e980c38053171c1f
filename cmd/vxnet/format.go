package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"text/template"

	"github.com/spf13/cobra"

	"github.com/vxnet/vxnet/api"
)

// listOpts are the selection and formatting flags that ls and inspect take,
// with Docker's meaning: -q prints only what identifies each item,
// --format a Go template per item, --filter KEY=VALUE (repeatable; values
// of one key are alternatives, keys must all match).
type listOpts struct {
	quiet   bool
	format  string
	filters []string
	keys    []string // the filter keys the command knows
}

func (o *listOpts) register(cmd *cobra.Command, quiet bool, keys ...string) {
	o.keys = keys
	if quiet {
		cmd.Flags().BoolVarP(&o.quiet, "quiet", "q", false, "print only names (networks: ids)")
	}
	cmd.Flags().StringVar(&o.format, "format", "", "print each item with a Go template, e.g. '{{.Name}} {{.Subnet}}'")
	if len(keys) > 0 {
		cmd.Flags().StringArrayVarP(&o.filters, "filter", "f", nil, "only items matching KEY=VALUE ("+strings.Join(keys, ", ")+"); repeatable")
	}
}

// parse returns the filters by key, refusing unknown keys and malformed
// ones.
func (o *listOpts) parse() (map[string][]string, error) {
	out := map[string][]string{}
	for _, f := range o.filters {
		k, v, ok := strings.Cut(f, "=")
		if !ok || v == "" {
			return nil, usageError{fmt.Errorf("--filter %q: give KEY=VALUE", f)}
		}
		if !slices.Contains(o.keys, k) {
			return nil, usageError{fmt.Errorf("--filter %q: unknown key %q (known: %s)", f, k, strings.Join(o.keys, ", "))}
		}
		out[k] = append(out[k], v)
	}
	return out, nil
}

// matches reports whether an item's fields pass the filters: name matches
// a substring, id a prefix, the others exactly (as docker does).
func matches(filters map[string][]string, fields map[string]string) bool {
	for k, vs := range filters {
		ok := false
		for _, v := range vs {
			f := fields[k]
			switch k {
			case "name":
				ok = ok || strings.Contains(f, v)
			case "id":
				ok = ok || strings.HasPrefix(f, v)
			default:
				ok = ok || f == v
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

// emit prints items: -q, --format, -o json or the table, in that order of
// precedence.
func emit[T any](c *cli, o *listOpts, items []T, quiet func(T) string, table func([]T) error) error {
	switch {
	case o.quiet:
		for _, it := range items {
			fmt.Fprintln(c.out, quiet(it))
		}
		return nil
	case o.format != "":
		tmpl, err := template.New("format").Funcs(template.FuncMap{"join": strings.Join}).Parse(o.format)
		if err != nil {
			return usageError{fmt.Errorf("--format: %w", err)}
		}
		for _, it := range items {
			if err := tmpl.Execute(c.out, it); err != nil {
				return usageError{fmt.Errorf("--format: %w", err)}
			}
			fmt.Fprintln(c.out)
		}
		return nil
	case c.output == "json":
		return c.json(items)
	}
	return table(items)
}

// resolveNetwork turns a name or a unique id prefix into the network's
// name, as docker takes either: an exact name wins, then an id prefix
// that only one network has.
func resolveNetwork(ctx context.Context, cl *api.Client, arg string) (string, error) {
	ns, err := cl.Networks(ctx)
	if err != nil {
		return "", err
	}
	var hits []string
	for _, n := range ns {
		if n.Name == arg {
			return arg, nil
		}
		if n.ID != "" && strings.HasPrefix(n.ID, arg) {
			hits = append(hits, n.Name)
		}
	}
	switch len(hits) {
	case 0:
		return arg, nil // the agent says it is not found
	case 1:
		return hits[0], nil
	}
	return "", usageError{fmt.Errorf("network id prefix %q is ambiguous: %s", arg, strings.Join(hits, ", "))}
}

// notFound reports whether the agent said the thing does not exist.
func notFound(err error) bool {
	var ae *api.Error
	return errors.As(err, &ae) && ae.Code == api.CodeNotFound
}

// complete* answer shell completion from the agent: names of networks,
// of this host's endpoints of a network, of nodes.
func (c *cli) completeNetworks(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	return c.completeWith(cmd, func(ctx context.Context, cl *api.Client) ([]string, error) {
		ns, err := cl.Networks(ctx)
		var out []string
		for _, n := range ns {
			out = append(out, n.Name)
		}
		return out, err
	})
}

func (c *cli) completeNodes(cmd *cobra.Command, _ []string, _ string) ([]string, cobra.ShellCompDirective) {
	return c.completeWith(cmd, func(ctx context.Context, cl *api.Client) ([]string, error) {
		ns, err := cl.Nodes(ctx)
		var out []string
		for _, n := range ns {
			out = append(out, n.Name)
		}
		return out, err
	})
}

// completeEndpoints completes a network's endpoints, the network being the
// first argument.
func (c *cli) completeEndpoints(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) == 0 {
		return c.completeNetworks(cmd, args, "")
	}
	return c.completeWith(cmd, func(ctx context.Context, cl *api.Client) ([]string, error) {
		eps, err := cl.Endpoints(ctx, args[0])
		var out []string
		for _, e := range eps {
			out = append(out, e.Name)
		}
		return out, err
	})
}

func (c *cli) completeWith(cmd *cobra.Command, list func(context.Context, *api.Client) ([]string, error)) ([]string, cobra.ShellCompDirective) {
	cl, err := c.client()
	if err != nil {
		return nil, cobra.ShellCompDirectiveError
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), timeoutCompletion)
	defer cancel()
	out, err := list(ctx, cl)
	if err != nil {
		return nil, cobra.ShellCompDirectiveError
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}
