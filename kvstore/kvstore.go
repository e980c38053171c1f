// Package kvstore is a small key/value interface (get, list, CAS, txn, watch,
// sessions) with a Consul backend and an embedded single-file backend.
//
// Keys are relative to the store's prefix (default "vxnet/"): callers never
// see the prefix. Every value carries the store's ModifyIndex so that callers
// can do compare-and-swap without a separate read.
package kvstore

import (
	"context"
	"errors"
	"time"
)

var (
	// ErrNotFound is returned by Get and by CAS/Delete of a key that does not exist.
	ErrNotFound = errors.New("key not found")
	// ErrConflict means a compare-and-swap or a transaction lost a race (or a
	// create-only put met an existing key): re-read and retry.
	ErrConflict = errors.New("store conflict")
	// ErrUnavailable wraps failures to reach the store at all.
	ErrUnavailable = errors.New("store unavailable")
	// ErrForbidden means the store refused the request (an ACL token that
	// is missing or lacks the rights).
	ErrForbidden = errors.New("permission denied by the store")
)

// KV is one stored pair.
type KV struct {
	Key         string
	Value       []byte
	ModifyIndex uint64
	// Session is the id of the session holding the key, if any.
	Session string
}

// OpKind names a transaction operation.
type OpKind int

const (
	// OpPut writes unconditionally.
	OpPut OpKind = iota
	// OpCAS writes only if the key's ModifyIndex equals Index; Index 0 means
	// "only if the key does not exist" (create-only).
	OpCAS
	// OpDelete deletes unconditionally (no error if absent).
	OpDelete
	// OpDeleteCAS deletes only if the key's ModifyIndex equals Index.
	OpDeleteCAS
	// OpCheckIndex fails the transaction unless the key's ModifyIndex equals
	// Index (Index 0: unless the key is absent).
	OpCheckIndex
	// OpLock writes the value and binds the key to Session; the key is
	// deleted when the session ends. Fails if another session holds it.
	OpLock
)

// Op is one operation of a transaction.
type Op struct {
	Kind    OpKind
	Key     string
	Value   []byte
	Index   uint64
	Session string
}

// Event is delivered by Watch: the complete current contents of the watched
// prefix. Watchers diff snapshots rather than apply deltas, so a missed or
// coalesced update can never leave them wrong.
type Event struct {
	Pairs []*KV
	// Index is the store index the snapshot reflects.
	Index uint64
	// Reset: the index went backwards since the last snapshot delivered,
	// as when the store restarted empty or from an older snapshot. What
	// vanished since may not have been removed by anyone.
	Reset bool
	// Err is set (and Pairs is nil) when the store could not be read; the
	// watch keeps retrying with backoff and sends a fresh snapshot once it
	// succeeds again.
	Err error
}

// Store is what the rest of vxnet uses. Implementations are safe for
// concurrent use.
type Store interface {
	// Get returns ErrNotFound if the key is absent.
	Get(ctx context.Context, key string) (*KV, error)
	// List returns every pair whose key starts with prefix, sorted by key,
	// and the store index of the read.
	List(ctx context.Context, prefix string) ([]*KV, uint64, error)
	// Put writes unconditionally.
	Put(ctx context.Context, key string, value []byte) error
	// CAS writes only if the key's ModifyIndex equals index (0: only if
	// absent). Returns ErrConflict otherwise.
	CAS(ctx context.Context, key string, value []byte, index uint64) error
	// Delete removes a key; deleting an absent key is not an error.
	Delete(ctx context.Context, key string) error
	// DeleteCAS removes a key only if its ModifyIndex equals index.
	// Returns ErrConflict otherwise (including when absent).
	DeleteCAS(ctx context.Context, key string, index uint64) error
	// Txn applies all ops atomically or none; a failed check returns an
	// error wrapping ErrConflict.
	Txn(ctx context.Context, ops []Op) error
	// Watch sends a snapshot of prefix at once and then after every change,
	// until ctx is done, when the channel is closed. Slow consumers get the
	// latest snapshot (intermediate ones may be skipped).
	Watch(ctx context.Context, prefix string) <-chan Event

	// CreateSession starts a session that expires unless renewed within
	// ttl; keys locked by it are deleted when it ends. name is informational.
	CreateSession(ctx context.Context, name string, ttl time.Duration) (string, error)
	// RenewSession extends a session; ErrNotFound if it has expired.
	RenewSession(ctx context.Context, id string) error
	// DestroySession ends a session at once.
	DestroySession(ctx context.Context, id string) error

	// Close releases the backend's resources.
	Close() error
}
