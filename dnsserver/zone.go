// Package dnsserver answers an overlay network's names on its gateway
// address inside the network's namespace, and forwards other names to the
// host's resolvers.
package dnsserver

import (
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
)

// Entry is one endpoint's address and names.
type Entry struct {
	IP    netip.Addr
	Names []string
}

// Zone is one network's names, per host. Hosts' entries change one host
// at a time (a peer record written again), so SetNode costs what that
// host's entries are, not what the network's are. Its lock is its own:
// queries read it while the agent's watch writes it.
type Zone struct {
	mu     sync.RWMutex
	nodes  map[string][]Entry
	byName map[string]map[netip.Addr]int // lower-case name -> address -> how many entries say so
	byAddr map[netip.Addr]map[string]int
	// canon is an address's endpoint name, which PTR answers first (an
	// endpoint's first name; its aliases follow).
	canon map[netip.Addr]string
	// complete: the other hosts' entries have been read once; before, a
	// name not found may exist.
	complete bool
}

// SetComplete says that the zone holds every host's entries.
func (z *Zone) SetComplete() {
	z.mu.Lock()
	z.complete = true
	z.mu.Unlock()
}

// Complete reports whether SetComplete was called.
func (z *Zone) Complete() bool {
	z.mu.RLock()
	defer z.mu.RUnlock()
	return z.complete
}

// Node returns one host's entries.
func (z *Zone) Node(node string) []Entry {
	z.mu.RLock()
	defer z.mu.RUnlock()
	return slices.Clone(z.nodes[node])
}

// NewZone makes an empty zone.
func NewZone() *Zone {
	return &Zone{nodes: map[string][]Entry{}, byName: map[string]map[netip.Addr]int{}, byAddr: map[netip.Addr]map[string]int{},
		canon: map[netip.Addr]string{}}
}

// SetNode replaces one host's entries; nil removes the host.
func (z *Zone) SetNode(node string, entries []Entry) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.setLocked(node, entries)
}

// Reset replaces every host's entries.
func (z *Zone) Reset(nodes map[string][]Entry) {
	z.mu.Lock()
	defer z.mu.Unlock()
	for node := range z.nodes {
		if _, ok := nodes[node]; !ok {
			z.setLocked(node, nil)
		}
	}
	for node, es := range nodes {
		z.setLocked(node, es)
	}
}

func (z *Zone) setLocked(node string, entries []Entry) {
	for _, e := range z.nodes[node] {
		for _, n := range e.Names {
			z.count(strings.ToLower(n), e.IP, -1)
		}
		if len(e.Names) > 0 && z.canon[e.IP] == strings.ToLower(e.Names[0]) {
			delete(z.canon, e.IP)
		}
	}
	if len(entries) == 0 {
		delete(z.nodes, node)
		return
	}
	z.nodes[node] = slices.Clone(entries)
	for _, e := range entries {
		for _, n := range e.Names {
			z.count(strings.ToLower(n), e.IP, 1)
		}
		if len(e.Names) > 0 {
			z.canon[e.IP] = strings.ToLower(e.Names[0])
		}
	}
}

func (z *Zone) count(name string, ip netip.Addr, d int) {
	add := func(m map[netip.Addr]int) map[netip.Addr]int {
		if m == nil {
			m = map[netip.Addr]int{}
		}
		if m[ip] += d; m[ip] <= 0 {
			delete(m, ip)
		}
		return m
	}
	if m := add(z.byName[name]); len(m) > 0 {
		z.byName[name] = m
	} else {
		delete(z.byName, name)
	}
	r := z.byAddr[ip]
	if r == nil {
		r = map[string]int{}
	}
	if r[name] += d; r[name] <= 0 {
		delete(r, name)
	}
	if len(r) > 0 {
		z.byAddr[ip] = r
	} else {
		delete(z.byAddr, ip)
	}
}

// Lookup returns the addresses of a name (any case), sorted.
func (z *Zone) Lookup(name string) []netip.Addr {
	z.mu.RLock()
	defer z.mu.RUnlock()
	out := slices.Collect(maps.Keys(z.byName[strings.ToLower(name)]))
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// Names returns the names of an address: its endpoint's name first, then
// the others sorted.
func (z *Zone) Names(ip netip.Addr) []string {
	z.mu.RLock()
	defer z.mu.RUnlock()
	out := slices.Collect(maps.Keys(z.byAddr[ip]))
	first := z.canon[ip]
	slices.SortFunc(out, func(a, b string) int {
		switch {
		case a == first:
			return -1
		case b == first:
			return 1
		}
		return strings.Compare(a, b)
	})
	return out
}

// Len is how many names the zone holds.
func (z *Zone) Len() int {
	z.mu.RLock()
	defer z.mu.RUnlock()
	return len(z.byName)
}
