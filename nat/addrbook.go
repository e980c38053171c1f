package nat

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"sync"

	"github.com/vxnet/vxnet/internal/atomicfile"
)

// ErrAddrExhausted says every usable address of the subnet is taken.
var ErrAddrExhausted = errors.New("gateway subnet exhausted")

// AddrBook hands out gateway addresses on one host. Gateway addresses only
// need to be unique per host (each host has its own bridge and NATs them
// away), so they are allocated locally instead of through the cluster store,
// and persisted so that a restarted agent neither reuses an address still
// held by a running container nor forgets one it handed out.
//
// One process owns a book file; concurrent use within the process is safe.
type AddrBook struct {
	path     string
	subnet   netip.Prefix
	reserved netip.Addr

	mu     sync.Mutex
	owners map[string]netip.Addr
	// routes are the default routes AddGateway replaced in an owner's
	// container, kept until RemoveGateway has put them back.
	routes map[string][]Route
}

// addrBookFile is the book on disk. Routes came later: a file without it
// is a book without routes, and an older agent ignores it.
type addrBookFile struct {
	Subnet string             `json:"subnet"`
	Owners map[string]string  `json:"owners"`
	Routes map[string][]Route `json:"routes,omitempty"`
}

// OpenAddrBook loads the book at path, or starts an empty one if the file
// does not exist yet. Any other failure to read it is an error: an empty
// book would hand out addresses running containers hold and forget the
// routes to restore. reserved (normally the gateway address) is never
// handed out, nor are the subnet's network and broadcast addresses.
func OpenAddrBook(path string, subnet netip.Prefix, reserved netip.Addr) (*AddrBook, error) {
	if !subnet.IsValid() || !subnet.Addr().Is4() {
		return nil, fmt.Errorf("nat: open address book %s: subnet %s is not a valid IPv4 prefix", path, subnet)
	}
	subnet = subnet.Masked()
	b := &AddrBook{path: path, subnet: subnet, reserved: reserved, owners: map[string]netip.Addr{}, routes: map[string][]Route{}}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return b, nil
	}
	if err != nil {
		return nil, fmt.Errorf("nat: open address book: %w", err)
	}
	var f addrBookFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("nat: parse address book %s: %w", path, err)
	}
	// A book written for another subnet holds addresses containers of the
	// new subnet could not use; refuse rather than silently forget them.
	if f.Subnet != "" && f.Subnet != subnet.String() {
		return nil, fmt.Errorf("nat: address book %s is for subnet %s, not %s", path, f.Subnet, subnet)
	}
	seen := map[netip.Addr]string{}
	for owner, s := range f.Owners {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("nat: address book %s: owner %q: %w", path, owner, err)
		}
		if !b.usable(a) {
			return nil, fmt.Errorf("nat: address book %s: owner %q holds unusable address %s", path, owner, a)
		}
		if prev, dup := seen[a]; dup {
			return nil, fmt.Errorf("nat: address book %s: %s held by both %q and %q", path, a, prev, owner)
		}
		seen[a] = owner
		b.owners[owner] = a
	}
	for owner, rs := range f.Routes {
		if len(rs) > 0 {
			b.routes[owner] = rs
		}
	}
	return b, nil
}

func (b *AddrBook) usable(a netip.Addr) bool {
	return b.subnet.Contains(a) && a != b.subnet.Addr() && a != lastAddr(b.subnet) && a != b.reserved
}

// Allocate returns owner's address, allocating the lowest free one if it has
// none. The allocation is on disk before it is returned.
func (b *AddrBook) Allocate(owner string) (netip.Addr, error) {
	if owner == "" {
		return netip.Addr{}, errors.New("nat: allocate gateway address: empty owner")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if a, ok := b.owners[owner]; ok {
		return a, nil
	}
	used := make(map[netip.Addr]bool, len(b.owners))
	for _, a := range b.owners {
		used[a] = true
	}
	for a := b.subnet.Addr().Next(); b.subnet.Contains(a); a = a.Next() {
		if !b.usable(a) || used[a] {
			continue
		}
		b.owners[owner] = a
		if err := b.save(); err != nil {
			delete(b.owners, owner)
			return netip.Addr{}, fmt.Errorf("nat: allocate gateway address for %q: %w", owner, err)
		}
		return a, nil
	}
	return netip.Addr{}, fmt.Errorf("nat: allocate gateway address for %q in %s: %w", owner, b.subnet, ErrAddrExhausted)
}

// Release frees owner's address and forgets its routes; an unknown owner
// is fine.
func (b *AddrBook) Release(owner string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	a, ok := b.owners[owner]
	rs, hasRoutes := b.routes[owner]
	if !ok && !hasRoutes {
		return nil
	}
	delete(b.owners, owner)
	delete(b.routes, owner)
	if err := b.save(); err != nil {
		if ok {
			b.owners[owner] = a
		}
		if hasRoutes {
			b.routes[owner] = rs
		}
		return fmt.Errorf("nat: release gateway address of %q: %w", owner, err)
	}
	return nil
}

// SetRoutes records the default routes to restore in owner's container
// when its gateway goes (nil forgets them). Duplicates are dropped. They
// are on disk before it returns.
func (b *AddrBook) SetRoutes(owner string, rs []Route) error {
	if owner == "" {
		return errors.New("nat: set gateway routes: empty owner")
	}
	var uniq []Route
	for _, r := range rs {
		if !slices.ContainsFunc(uniq, func(u Route) bool { return reflect.DeepEqual(u, r) }) {
			uniq = append(uniq, r)
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	prev, had := b.routes[owner]
	if len(uniq) == 0 {
		delete(b.routes, owner)
	} else {
		b.routes[owner] = uniq
	}
	if err := b.save(); err != nil {
		if had {
			b.routes[owner] = prev
		} else {
			delete(b.routes, owner)
		}
		return fmt.Errorf("nat: record default routes of %q: %w", owner, err)
	}
	return nil
}

// Routes returns a copy of the default routes recorded for owner.
func (b *AddrBook) Routes(owner string) []Route {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.routes[owner])
}

// Owners returns a copy of the allocations.
func (b *AddrBook) Owners() map[string]netip.Addr {
	b.mu.Lock()
	defer b.mu.Unlock()
	return maps.Clone(b.owners)
}

// save writes the book atomically: a crash leaves either the old or the new
// file, never a truncated one that would make the agent forget addresses.
func (b *AddrBook) save() error {
	f := addrBookFile{Subnet: b.subnet.String(), Owners: make(map[string]string, len(b.owners))}
	for o, a := range b.owners {
		f.Owners[o] = a.String()
	}
	if len(b.routes) > 0 {
		f.Routes = b.routes
	}
	data, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("encode address book: %w", err)
	}
	if err := atomicfile.Write(b.path, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("address book: %w", err)
	}
	return nil
}
