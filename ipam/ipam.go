// Package ipam hands out subnets, VNIs and addresses, safely across hosts,
// on top of a kvstore.
//
// Key layout (relative to the store prefix; values are JSON with a
// "version" field):
//
//	ipam/networks                 every network's subnet, gateway and VNI in one
//	                              key, changed by CAS in the same transaction as
//	                              the caller's network record: network changes are
//	                              rare, and one key makes the overlap and VNI
//	                              checks atomic
//	ipam/addrs/<network-id>/<ip>  one key per address in use, created with a
//	                              create-only CAS and holding its owner: allocators
//	                              on different hosts collide only when they pick
//	                              the same address, never on a shared counter
package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vxnet/vxnet/kvstore"
)

var (
	// ErrExhausted: nothing left in the pool, subnet or VNI range.
	ErrExhausted = errors.New("no free addresses")
	// ErrInUse: the requested subnet overlaps, or the VNI or address is taken.
	ErrInUse = errors.New("already in use")
	// ErrInvalid: the request itself is wrong.
	ErrInvalid = errors.New("invalid request")
)

const (
	networksKey  = "ipam/networks"
	addrsPrefix  = "ipam/addrs/"
	valueVersion = 1
	maxRetries   = 50
)

// Options configures an Allocator.
type Options struct {
	Pool           netip.Prefix // default 10.0.0.0/8
	SubnetBits     int          // default 24
	VNIMin, VNIMax uint32       // default 256, 16777215
}

// NetworkRequest asks for a network; zero fields are chosen.
type NetworkRequest struct {
	Subnet  netip.Prefix
	Gateway netip.Addr
	VNI     uint32
	// Avoid are address ranges in use outside the overlay (underlay
	// networks, host routes): an explicit subnet overlapping one is
	// refused, and an automatic one is picked around them.
	Avoid []Avoid
	// Records returns the networks as their records say, by id (see
	// checked for records that do not decode). The
	// records are the truth: the reservations are checked against them,
	// so a lost or tampered reservation key cannot hand out a subnet or
	// VNI twice. It is called after each read of the reservations, so a
	// network created meanwhile is seen by one or the other. nil: the
	// reservations alone.
	Records func(context.Context) (map[string]NetworkLease, error)
}

// Avoid is a range a network must not overlap, and what it is.
type Avoid struct {
	Prefix netip.Prefix
	What   string
}

// NetworkLease is what a network holds.
type NetworkLease struct {
	Subnet  netip.Prefix `json:"subnet"`
	Gateway netip.Addr   `json:"gateway"`
	VNI     uint32       `json:"vni"`
}

// AddrOwner says who holds an address.
type AddrOwner struct {
	Node     string `json:"node"`
	Endpoint string `json:"endpoint"`
}

// reservedPrefix marks an owner that is a reservation, not an endpoint:
// endpoint names cannot contain '@'. The time after it lets a host tell a
// young reservation, whose endpoint is on its way, from a forgotten one.
const reservedPrefix = "reserved@"

// ReservationOwner is the owner of an address the node reserved at now.
// A random part makes each reservation its own: two of one address in the
// same second must not take each other for a retry.
func ReservationOwner(node string, now time.Time) AddrOwner {
	return AddrOwner{Node: node, Endpoint: fmt.Sprintf("%s%d.%08x", reservedPrefix, now.Unix(), rand.Uint32())}
}

// Reserved reports whether the owner is a reservation, and since when.
func (o AddrOwner) Reserved() (time.Time, bool) {
	ts, ok := strings.CutPrefix(o.Endpoint, reservedPrefix)
	if !ok {
		return time.Time{}, false
	}
	ts, _, _ = strings.Cut(ts, ".")
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return time.Time{}, true // a reservation of unknown age: old
	}
	return time.Unix(sec, 0), true
}

type registry struct {
	Version  int                     `json:"version"`
	Networks map[string]NetworkLease `json:"networks"`
}

type addrValue struct {
	Version int `json:"version"`
	AddrOwner
}

// Allocator allocates through a store.
type Allocator struct {
	store kvstore.Store
	opts  Options

	// known caches, per network, the addresses seen taken, so that an
	// allocation is one create-only write rather than a list of the whole
	// network first. A stale cache costs a conflict, never a duplicate:
	// the create-only write decides.
	mu    sync.Mutex
	known map[string]map[netip.Addr]bool
	// hot remembers, per network, how contended its last allocation was:
	// while other allocators are busy in the same network, every lowest
	// free address this one knows of has just been taken by one of them,
	// so starting there again costs a conflict per allocation. It decays
	// to zero (lowest first) once the network is quiet.
	hot map[string]int
}

// New makes an allocator.
func New(store kvstore.Store, opts Options) *Allocator {
	if !opts.Pool.IsValid() {
		opts.Pool = netip.MustParsePrefix("10.0.0.0/8")
	}
	if opts.SubnetBits == 0 {
		opts.SubnetBits = 24
	}
	if opts.VNIMin == 0 {
		opts.VNIMin = 256
	}
	if opts.VNIMax == 0 {
		opts.VNIMax = 1<<24 - 1
	}
	return &Allocator{store: store, opts: opts, known: map[string]map[netip.Addr]bool{}}
}

func (a *Allocator) readRegistry(ctx context.Context) (*registry, uint64, error) {
	kv, err := a.store.Get(ctx, networksKey)
	if errors.Is(err, kvstore.ErrNotFound) {
		return &registry{Version: valueVersion, Networks: map[string]NetworkLease{}}, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("read %s: %w", networksKey, err)
	}
	var r registry
	if err := json.Unmarshal(kv.Value, &r); err != nil || r.Version != valueVersion {
		return nil, 0, fmt.Errorf("read %s: unreadable value (version %d): %v", networksKey, r.Version, err)
	}
	if r.Networks == nil {
		r.Networks = map[string]NetworkLease{}
	}
	return &r, kv.ModifyIndex, nil
}

// plan picks a lease for req against the existing networks.
func (a *Allocator) plan(req NetworkRequest, nets map[string]NetworkLease) (NetworkLease, error) {
	var l NetworkLease
	var taken []netip.Prefix
	vnis := map[uint32]bool{}
	for _, n := range nets {
		taken = append(taken, n.Subnet)
		vnis[n.VNI] = true
	}
	for _, av := range req.Avoid {
		taken = append(taken, av.Prefix)
	}
	if req.Subnet.IsValid() {
		if err := ValidateSubnet(req.Subnet); err != nil {
			return l, err
		}
		for id, n := range nets {
			if n.Subnet.Overlaps(req.Subnet) {
				return l, fmt.Errorf("subnet %s overlaps %s of network %s: %w", req.Subnet, n.Subnet, short(id), ErrInUse)
			}
		}
		for _, av := range req.Avoid {
			if av.Prefix.Overlaps(req.Subnet) {
				return l, fmt.Errorf("subnet %s overlaps %s (%s): %w", req.Subnet, av.Prefix, av.What, ErrInUse)
			}
		}
		l.Subnet = req.Subnet
	} else {
		s, err := firstFreeSubnet(a.opts.Pool, a.opts.SubnetBits, taken)
		if err != nil {
			return l, err
		}
		l.Subnet = s
	}
	if req.Gateway.IsValid() {
		if err := validateHost(l.Subnet, req.Gateway, "gateway"); err != nil {
			return l, err
		}
		l.Gateway = req.Gateway
	} else {
		first, _ := hostRange(l.Subnet)
		l.Gateway = addr(first)
	}
	if req.VNI != 0 {
		if req.VNI > 1<<24-1 {
			return l, fmt.Errorf("vni %d is out of range 1..16777215: %w", req.VNI, ErrInvalid)
		}
		if vnis[req.VNI] {
			return l, fmt.Errorf("vni %d: %w", req.VNI, ErrInUse)
		}
		l.VNI = req.VNI
	} else {
		v, err := pickVNI(a.opts.VNIMin, a.opts.VNIMax, vnis)
		if err != nil {
			return l, err
		}
		l.VNI = v
	}
	return l, nil
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// backoff sleeps a little, more after more conflicts, with jitter so that
// competing allocators do not retry in step.
func backoff(ctx context.Context, try int) error {
	d := time.Duration(rand.Int64N(int64(time.Millisecond)*int64(min(try+1, 20)))) + time.Millisecond
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// AllocateNetwork reserves a subnet and VNI for network id, committing the
// caller's ops (its network record) in the same transaction.
func (a *Allocator) AllocateNetwork(ctx context.Context, id string, req NetworkRequest, extra func(NetworkLease) ([]kvstore.Op, error)) (NetworkLease, error) {
	var lease NetworkLease
	err := a.updateRegistry(ctx, "reserve network "+short(id), func(reg *registry) ([]kvstore.Op, error) {
		if _, ok := reg.Networks[id]; ok {
			return nil, fmt.Errorf("network %s already has a reservation: %w", short(id), ErrInUse)
		}
		taken, err := a.checked(ctx, reg, req.Records)
		if err != nil {
			return nil, err
		}
		l, err := a.plan(req, taken)
		if err != nil {
			return nil, err
		}
		var ops []kvstore.Op
		if extra != nil {
			if ops, err = extra(l); err != nil {
				return nil, err
			}
		}
		reg.Networks[id], lease = l, l
		return ops, nil
	})
	return lease, err
}

// Plan says what AllocateNetwork would give req now, reserving nothing.
func (a *Allocator) Plan(ctx context.Context, req NetworkRequest) (NetworkLease, error) {
	reg, _, err := a.readRegistry(ctx)
	if err != nil {
		return NetworkLease{}, err
	}
	taken, err := a.checked(ctx, reg, req.Records)
	if err != nil {
		return NetworkLease{}, err
	}
	return a.plan(req, taken)
}

// updateRegistry runs change on a fresh read of the reservations and
// commits what it made of them, with the ops it returns, in one
// transaction; it starts again while other writers move the reservations.
func (a *Allocator) updateRegistry(ctx context.Context, what string, change func(*registry) ([]kvstore.Op, error)) error {
	for try := 0; ; try++ {
		reg, idx, err := a.readRegistry(ctx)
		if err != nil {
			return err
		}
		ops, err := change(reg)
		if err != nil {
			return err
		}
		data, _ := json.Marshal(reg)
		err = a.store.Txn(ctx, append([]kvstore.Op{{Kind: kvstore.OpCAS, Key: networksKey, Value: data, Index: idx}}, ops...))
		if err == nil {
			return nil
		}
		if !errors.Is(err, kvstore.ErrConflict) {
			return fmt.Errorf("%s: %w", what, err)
		}
		// If the reservations did not move, the caller's own ops
		// failed: no retry can fix that.
		if _, now, rerr := a.readRegistry(ctx); rerr == nil && now == idx {
			return fmt.Errorf("%s: %w", what, err)
		}
		if try >= maxRetries {
			return fmt.Errorf("%s: too much contention: %w", what, err)
		}
		if err := backoff(ctx, try); err != nil {
			return err
		}
	}
}

// checked returns the networks a new lease must not collide with: the
// reservations and the records together. A reservation whose network has
// no record and no address held is what a removal that lost its record
// left behind (records and reservations are written in one transaction,
// so it is not a network being made): it is dropped from reg, to be
// committed with the caller's write, instead of blocking its subnet for
// good.
func (a *Allocator) checked(ctx context.Context, reg *registry, records func(context.Context) (map[string]NetworkLease, error)) (map[string]NetworkLease, error) {
	if records == nil {
		return reg.Networks, nil
	}
	recs, err := records(ctx)
	if err != nil {
		return nil, fmt.Errorf("read network records: %w", err)
	}
	out := maps.Clone(recs)
	// A record that could not be decoded is listed with its id and no
	// lease (its reservation is kept, with the lease the reservation
	// says), or, when not even its id could be read, under "": then no
	// reservation can be known to lack its record, and none is dropped.
	_, incomplete := recs[""]
	delete(out, "")
	for id, l := range reg.Networks {
		if r, ok := recs[id]; ok {
			if !r.Subnet.IsValid() {
				out[id] = l
			}
			continue
		}
		if incomplete {
			out[id] = l
			continue
		}
		pairs, _, err := a.store.List(ctx, addrsPrefix+id+"/")
		if err != nil {
			return nil, fmt.Errorf("addresses of reservation %s: %w", short(id), err)
		}
		if len(pairs) == 0 {
			delete(reg.Networks, id)
			continue
		}
		out[id] = l // its hosts still hold addresses: they republish it
	}
	for id, l := range out {
		if !l.Subnet.IsValid() {
			delete(out, id) // unreadable and unreserved: nothing to avoid
		}
	}
	return out, nil
}

// RestoreNetwork reserves exactly lease for network id again, together
// with the caller's ops (its record): a host that still runs endpoints of
// a network whose record or reservation the store lost puts them back as
// they were. It is idempotent for the same lease, and fails with ErrInUse
// if another network holds the subnet or the VNI now.
func (a *Allocator) RestoreNetwork(ctx context.Context, id string, lease NetworkLease, records func(context.Context) (map[string]NetworkLease, error), extra []kvstore.Op) error {
	return a.updateRegistry(ctx, "restore network "+short(id), func(reg *registry) ([]kvstore.Op, error) {
		if have, ok := reg.Networks[id]; ok && have != lease {
			return nil, fmt.Errorf("network %s is reserved as %s vni %d, not %s vni %d: %w", short(id), have.Subnet, have.VNI, lease.Subnet, lease.VNI, ErrInUse)
		}
		taken, err := a.checked(ctx, reg, records)
		if err != nil {
			return nil, err
		}
		for other, n := range taken {
			switch {
			case other == id:
			case n.Subnet.Overlaps(lease.Subnet):
				return nil, fmt.Errorf("subnet %s overlaps %s of network %s: %w", lease.Subnet, n.Subnet, short(other), ErrInUse)
			case n.VNI == lease.VNI:
				return nil, fmt.Errorf("vni %d is network %s's: %w", lease.VNI, short(other), ErrInUse)
			}
		}
		reg.Networks[id] = lease
		return extra, nil
	})
}

// ReleaseNetwork drops a network's reservation together with the caller's
// ops, then its address keys (Consul's transactions are limited to 64
// operations, so those are deleted after the commit; a leftover address
// key of a removed network is harmless and deleted again next time).
func (a *Allocator) ReleaseNetwork(ctx context.Context, id string, extra []kvstore.Op) error {
	err := a.updateRegistry(ctx, "release network "+short(id), func(reg *registry) ([]kvstore.Op, error) {
		delete(reg.Networks, id)
		return extra, nil
	})
	if err != nil {
		return err
	}
	pairs, _, err := a.store.List(ctx, addrsPrefix+id+"/")
	if err != nil {
		return fmt.Errorf("release addresses of %s: %w", short(id), err)
	}
	for _, kv := range pairs {
		if err := a.store.Delete(ctx, kv.Key); err != nil {
			return fmt.Errorf("release addresses of %s: %w", short(id), err)
		}
	}
	return nil
}

// Networks returns every reservation.
func (a *Allocator) Networks(ctx context.Context) (map[string]NetworkLease, error) {
	reg, _, err := a.readRegistry(ctx)
	if err != nil {
		return nil, err
	}
	return reg.Networks, nil
}

func addrKey(netID string, ip netip.Addr) string { return addrsPrefix + netID + "/" + ip.String() }

// Addrs lists the addresses held in a network and their owners.
func (a *Allocator) Addrs(ctx context.Context, netID string) (map[netip.Addr]AddrOwner, error) {
	pairs, _, err := a.store.List(ctx, addrsPrefix+netID+"/")
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	out := make(map[netip.Addr]AddrOwner, len(pairs))
	for _, kv := range pairs {
		ip, err := netip.ParseAddr(kv.Key[strings.LastIndex(kv.Key, "/")+1:])
		if err != nil {
			continue // not ours
		}
		var v addrValue
		if json.Unmarshal(kv.Value, &v) != nil {
			continue
		}
		out[ip] = v.AddrOwner
	}
	return out, nil
}

// AllocateAddr reserves want if given (idempotent for the same owner),
// else the lowest free address. On
// a collision with another allocator it moves on to a randomly later free
// address, so that many allocators spread out rather than all retrying the
// same one.
func (a *Allocator) AllocateAddr(ctx context.Context, netID string, l NetworkLease, want netip.Addr, owner AddrOwner) (netip.Addr, error) {
	data, _ := json.Marshal(addrValue{Version: valueVersion, AddrOwner: owner})
	if want.IsValid() {
		if err := ValidateAddr(l, want); err != nil {
			return netip.Addr{}, err
		}
		err := a.store.CAS(ctx, addrKey(netID, want), data, 0)
		if errors.Is(err, kvstore.ErrConflict) {
			// Held already: fine if by the same owner (a retry, or a host
			// re-reserving what it holds), or by a reservation of the
			// same node, which this endpoint takes over; taken otherwise.
			if kv, gerr := a.store.Get(ctx, addrKey(netID, want)); gerr == nil {
				var v addrValue
				if json.Unmarshal(kv.Value, &v) == nil && v.AddrOwner == owner {
					return want, nil
				}
				if _, res := v.Reserved(); res && v.Node == owner.Node {
					if err := a.store.CAS(ctx, kv.Key, data, kv.ModifyIndex); err == nil {
						return want, nil
					} else if !errors.Is(err, kvstore.ErrConflict) {
						return netip.Addr{}, fmt.Errorf("take over reservation of %s: %w", want, err)
					}
				}
			}
			return netip.Addr{}, fmt.Errorf("address %s: %w", want, ErrInUse)
		}
		if err != nil {
			return netip.Addr{}, fmt.Errorf("reserve %s: %w", want, err)
		}
		return want, nil
	}
	a.mu.Lock()
	hot := a.hot[netID]
	a.mu.Unlock()
	conflicts := 0
	defer func() {
		a.mu.Lock()
		if a.hot == nil {
			a.hot = map[string]int{}
		}
		if conflicts > 0 {
			a.hot[netID] = min(max(conflicts, (hot+conflicts+1)/2), 64)
		} else if hot > 0 {
			a.hot[netID] = hot / 2
		}
		a.mu.Unlock()
	}()
	for try := 0; try < 4*maxRetries; try++ {
		a.mu.Lock()
		taken := maps.Clone(a.known[netID])
		a.mu.Unlock()
		if taken == nil || (conflicts > 0 && conflicts%4 == 0) {
			held, err := a.Addrs(ctx, netID)
			if err != nil {
				return netip.Addr{}, err
			}
			taken = make(map[netip.Addr]bool, len(held))
			for ip := range held {
				taken[ip] = true
			}
		}
		skip := 0
		if c := conflicts + hot; c > 0 {
			skip = rand.IntN(2 * c * c)
		}
		ip, ok := pickAddr(l, taken, skip)
		if !ok {
			if conflicts < 4 {
				// The cache may be stale the other way: re-list once.
				a.forget(netID)
				conflicts = 4
				continue
			}
			return netip.Addr{}, fmt.Errorf("subnet %s: %w", l.Subnet, ErrExhausted)
		}
		err := a.store.CAS(ctx, addrKey(netID, ip), data, 0)
		if err != nil && !errors.Is(err, kvstore.ErrConflict) {
			return netip.Addr{}, fmt.Errorf("reserve %s: %w", ip, err)
		}
		taken[ip] = true
		a.mu.Lock()
		a.known[netID] = taken // a copy: readers clone under the lock
		a.mu.Unlock()
		if err == nil {
			return ip, nil
		}
		conflicts++
	}
	return netip.Addr{}, fmt.Errorf("subnet %s: too much contention", l.Subnet)
}

func (a *Allocator) forget(netID string) {
	a.mu.Lock()
	delete(a.known, netID)
	a.mu.Unlock()
}

// ReleaseReservation frees ip if it is a reservation of node; an address
// an endpoint holds, or nobody, is left alone (nil).
func (a *Allocator) ReleaseReservation(ctx context.Context, netID string, ip netip.Addr, node string) error {
	_, err := a.releaseIf(ctx, netID, ip, func(o AddrOwner) bool {
		_, res := o.Reserved()
		return res && o.Node == node
	})
	if errors.Is(err, errNotHeld) {
		return nil
	}
	return err
}

// ReleaseAddr frees ip if owner holds it.
func (a *Allocator) ReleaseAddr(ctx context.Context, netID string, ip netip.Addr, owner AddrOwner) error {
	held, err := a.releaseIf(ctx, netID, ip, func(o AddrOwner) bool { return o == owner })
	if errors.Is(err, errNotHeld) {
		return fmt.Errorf("release %s: held by %s/%s, not %s/%s: %w", ip, held.Node, held.Endpoint, owner.Node, owner.Endpoint, ErrInUse)
	}
	return err
}

// errNotHeld: the address is held by an owner that releaseIf's test
// refused.
var errNotHeld = errors.New("not held so")

// releaseIf frees ip if its owner passes ok (absent is nil); otherwise it
// returns the owner it found and errNotHeld.
func (a *Allocator) releaseIf(ctx context.Context, netID string, ip netip.Addr, ok func(AddrOwner) bool) (AddrOwner, error) {
	for try := 0; try < maxRetries; try++ {
		kv, err := a.store.Get(ctx, addrKey(netID, ip))
		if errors.Is(err, kvstore.ErrNotFound) {
			return AddrOwner{}, nil
		}
		if err != nil {
			return AddrOwner{}, fmt.Errorf("release %s: %w", ip, err)
		}
		var v addrValue
		if err := json.Unmarshal(kv.Value, &v); err != nil || !ok(v.AddrOwner) {
			return v.AddrOwner, errNotHeld
		}
		err = a.store.DeleteCAS(ctx, kv.Key, kv.ModifyIndex)
		if err == nil {
			a.mu.Lock()
			delete(a.known[netID], ip)
			a.mu.Unlock()
			return AddrOwner{}, nil
		}
		if !errors.Is(err, kvstore.ErrConflict) {
			return AddrOwner{}, fmt.Errorf("release %s: %w", ip, err)
		}
	}
	return AddrOwner{}, fmt.Errorf("release %s: too much contention", ip)
}
