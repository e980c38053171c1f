package overlay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/atomicfile"
	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/kvstore"
)

// Teardown needs intent; absence is not intent. A store can lose its
// state (a restarted dev server, a lost raft, a restored snapshot, a key
// deleted by hand), so a network or endpoint missing from it proves
// nothing. This file holds the two records that do carry intent or tell
// a loss apart:
//
//	removed/<network-id>  a tombstone written by network rm in the same
//	                      transaction that deletes the record: a host that
//	                      was away and still has endpoints of the network
//	                      removes them when it sees it
//	identity              written once by the first agent; every agent
//	                      remembers it in its state dir, so a store that
//	                      comes back without it, or with another, has lost
//	                      its state and is repopulated, never obeyed
const (
	tombstonesPrefix = "removed/"
	identityKey      = "identity"
	// formatKey holds the layout of the store's records; an agent that
	// meets another refuses to work on it rather than misread it.
	formatKey = "format"
	// storeFormat 2: peer records per (network, host).
	storeFormat = 2
	// tombstoneRetention is how long a network removal is remembered
	// for hosts that were away. A host away for longer finds its
	// network absent, not removed, and republishes it: the safe side.
	tombstoneRetention = 30 * 24 * time.Hour
)

func tombstoneKey(networkID string) string { return tombstonesPrefix + networkID }

// Tombstone records that a network was removed on purpose.
type Tombstone struct {
	Version int       `json:"version"`
	ID      string    `json:"id"`
	Name    string    `json:"name"`
	Removed time.Time `json:"removed"`
}

func (t *Tombstone) check() error {
	if t.Version != recordVersion || !validID(t.ID) {
		return errors.New("bad tombstone record")
	}
	return nil
}

// networkFate is what the store says of a network this host has local
// endpoints of, when the watched view lacks it.
type networkFate int

const (
	fateUnknown  networkFate = iota // the store did not answer: do nothing
	fatePresent                     // the record is there (the view lags)
	fateRemoved                     // a tombstone: network rm happened
	fateAbsent                      // no record and no tombstone: republish
	fateReplaced                    // the name holds another network, no tombstone for ours
)

// networkFate asks the store itself, not the view.
func (a *Agent) networkFate(ctx context.Context, n *Network) networkFate {
	if _, err := a.store.Get(ctx, tombstoneKey(n.ID)); err == nil {
		return fateRemoved
	} else if !errors.Is(err, kvstore.ErrNotFound) {
		return fateUnknown
	}
	kv, err := a.store.Get(ctx, networkKey(n.Name))
	switch {
	case errors.Is(err, kvstore.ErrNotFound):
		return fateAbsent
	case err != nil:
		return fateUnknown
	}
	var cur Network
	if decodeRecord(kv.Key, kv.Value, &cur) == nil && cur.ID == n.ID {
		return fatePresent
	}
	return fateReplaced
}

// republishNetwork puts a network this host runs endpoints of back into
// the store exactly as its journal recorded it (id, VNI, subnet, gateway),
// with its reservation. Hosts racing to do the same is fine: the first
// write wins and the others find the same network there.
func (a *Agent) republishNetwork(ctx context.Context, n *Network) error {
	data, err := json.Marshal(n)
	if err != nil {
		return err
	}
	lease := ipam.NetworkLease{Subnet: n.Subnet, Gateway: n.Gateway, VNI: n.VNI}
	// Not over a removal that happened since its fate was read.
	err = a.ipam.RestoreNetwork(ctx, n.ID, lease, a.networkRecords, []kvstore.Op{
		{Kind: kvstore.OpCheckIndex, Key: tombstoneKey(n.ID), Index: 0},
		{Kind: kvstore.OpCAS, Key: networkKey(n.Name), Value: data},
	})
	if errors.Is(err, kvstore.ErrConflict) && a.networkFate(ctx, n) == fatePresent {
		return nil // another host was first
	}
	return err
}

// networkRecords reads every network record, by id, for the allocator to
// check its reservations against (see ipam.NetworkRequest.Records).
func (a *Agent) networkRecords(ctx context.Context) (map[string]ipam.NetworkLease, error) {
	pairs, _, err := a.store.List(ctx, networksPrefix)
	if err != nil {
		return nil, err
	}
	out := make(map[string]ipam.NetworkLease, len(pairs))
	for _, kv := range pairs {
		var n Network
		if decodeRecord(kv.Key, kv.Value, &n) == nil {
			out[n.ID] = ipam.NetworkLease{Subnet: n.Subnet, Gateway: n.Gateway, VNI: n.VNI}
			continue
		}
		// Unreadable (corrupt, or written by another release): not a
		// network whose reservation may be reclaimed.
		var loose struct {
			ID string `json:"id"`
		}
		if json.Unmarshal(kv.Value, &loose) == nil && validID(loose.ID) {
			out[loose.ID] = ipam.NetworkLease{}
		} else {
			out[""] = ipam.NetworkLease{}
		}
	}
	return out, nil
}

// tombstoneOps record a network's removal, and drop tombstones past their
// retention: removals are rare, so this is where they are collected.
func (a *Agent) tombstoneOps(ctx context.Context, n *Network) []kvstore.Op {
	data, _ := json.Marshal(Tombstone{Version: recordVersion, ID: n.ID, Name: n.Name, Removed: time.Now().UTC().Truncate(time.Second)})
	ops := []kvstore.Op{{Kind: kvstore.OpPut, Key: tombstoneKey(n.ID), Value: data}}
	pairs, _, err := a.store.List(ctx, tombstonesPrefix)
	if err != nil {
		return ops
	}
	for _, kv := range pairs {
		var t Tombstone
		if decodeRecord(kv.Key, kv.Value, &t) == nil && time.Since(t.Removed) > tombstoneRetention && len(ops) < 32 {
			ops = append(ops, kvstore.Op{Kind: kvstore.OpDeleteCAS, Key: kv.Key, Index: kv.ModifyIndex})
		}
	}
	return ops
}

func (a *Agent) identityFile() string { return filepath.Join(a.cfg.StateDir, "store-identity") }

// checkIdentity compares the store's identity with the one this host
// remembers. lost is true when the store has lost its state since: the
// key is gone or holds another identity. A store without one that this
// host never saw either is new, not lost; it gets one. The store's
// identity (a new one if it had none) is remembered from then on.
func (a *Agent) checkIdentity(ctx context.Context) (lost bool, err error) {
	known := a.knownIdentity()
	kv, err := a.store.Get(ctx, identityKey)
	var cur string
	switch {
	case errors.Is(err, kvstore.ErrNotFound):
		id := newID()
		switch err := a.store.CAS(ctx, identityKey, []byte(id), 0); {
		case err == nil:
			cur = id
		case errors.Is(err, kvstore.ErrConflict):
			// Another agent was first: take its.
			if kv, err = a.store.Get(ctx, identityKey); err != nil {
				return false, fmt.Errorf("read store identity: %w", err)
			}
			cur = string(kv.Value)
		default:
			return false, fmt.Errorf("write store identity: %w", err)
		}
	case err != nil:
		return false, fmt.Errorf("read store identity: %w", err)
	default:
		cur = string(kv.Value)
	}
	if cur == known {
		return false, nil
	}
	a.cmu.Lock()
	a.identity = cur
	a.cmu.Unlock()
	if err := atomicfile.Write(a.identityFile(), []byte(cur), 0o600); err != nil {
		a.log.Warn("remember store identity", "err", err)
	}
	return known != "", nil
}

func (a *Agent) knownIdentity() string {
	a.cmu.RLock()
	id := a.identity
	a.cmu.RUnlock()
	if id != "" {
		return id
	}
	data, err := os.ReadFile(a.identityFile())
	if err != nil {
		return ""
	}
	id = strings.TrimSpace(string(data))
	a.cmu.Lock()
	a.identity = id
	a.cmu.Unlock()
	return id
}

// storeLost is what happens when the store is found to have lost its
// state: loudly logged, peers held as they were (hold), and this host's
// networks, endpoints and session put back at once rather than at the
// next renewal.
func (a *Agent) storeLost(why string) {
	a.log.Error("the store has lost its state ("+why+"); keeping the datapath as it is and republishing this host's networks and endpoints",
		"hold", a.holdTime())
	a.cmu.Lock()
	a.lostAt = time.Now()
	a.cmu.Unlock()
	a.kickRenew()
	a.trigger()
}

// holdTime is how long endpoints of other hosts that vanished with a lost
// store stay programmed, waiting for their hosts to republish them: long
// enough for every host to notice (its next session renewal at worst) and
// republish, short enough that a host that died meanwhile is not served
// for long.
func (a *Agent) holdTime() time.Duration { return max(2*a.cfg.NodeTTL, 20*time.Second) }

// lostRecently reports whether the store was found to have lost its state
// within a hold time: what vanishes or fails meanwhile is its doing.
func (a *Agent) lostRecently() bool {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	return !a.lostAt.IsZero() && time.Since(a.lostAt) < a.holdTime()
}

// checkFormat compares the store's format with this release's, writing it
// into a store that has none.
func (a *Agent) checkFormat(ctx context.Context) error {
	want := fmt.Sprintf(`{"version":%d}`, storeFormat)
	kv, err := a.store.Get(ctx, formatKey)
	if errors.Is(err, kvstore.ErrNotFound) {
		err = a.store.CAS(ctx, formatKey, []byte(want), 0)
		if err == nil {
			return nil
		}
		if !errors.Is(err, kvstore.ErrConflict) {
			return err
		}
		kv, err = a.store.Get(ctx, formatKey)
	}
	if err != nil {
		return err
	}
	var f struct {
		Version int `json:"version"`
	}
	if json.Unmarshal(kv.Value, &f) != nil || f.Version != storeFormat {
		return fmt.Errorf("%w: the store holds records of format %q under %q; this agent (%s) reads format %d only",
			errWrongFormat, kv.Value, formatKey, api.Version, storeFormat)
	}
	return nil
}

var errWrongFormat = errors.New("store format mismatch")
