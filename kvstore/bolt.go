package kvstore

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The embedded store serves one host: it keeps the same semantics as the
// Consul backend (indexes, CAS, transactions, watches, sessions) in a
// single bbolt file, so that vxnet runs without Consul on a single host.
// Sessions are kept in the file with their TTL and get a fresh TTL when
// the store is opened: the store's restart is its host's agent restarting,
// which is no reason to take the node for dead. A session that is not
// renewed after that expires as usual; keys locked by a session the file
// does not know are removed at open.

var (
	kvBucket      = []byte("kv")
	metaBucket    = []byte("meta")
	sessionBucket = []byte("sessions")
	indexKey      = []byte("index")
)

type boltValue struct {
	Value       []byte `json:"v"`
	ModifyIndex uint64 `json:"i"`
	Session     string `json:"s,omitempty"`
}

type boltSession struct {
	ttl     time.Duration
	expires time.Time
}

type boltStore struct {
	db *bolt.DB

	mu       sync.Mutex
	changed  chan struct{} // closed and replaced on every commit
	sessions map[string]*boltSession
	stop     chan struct{}
	done     sync.WaitGroup

	// testHookBeforeTxnWrite, when set, runs in Txn just before its write
	// transaction begins, so tests can end a session at that moment.
	testHookBeforeTxnWrite func()
}

// NewBolt opens (or creates) the store file.
func NewBolt(path string) (Store, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("embedded store: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("embedded store %s is locked by another process (another agent on this state dir?)", path)
		}
		return nil, fmt.Errorf("embedded store %s: %w", path, err)
	}
	s := &boltStore{db: db, changed: make(chan struct{}), sessions: map[string]*boltSession{}, stop: make(chan struct{})}
	err = db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(kvBucket)
		if err != nil {
			return err
		}
		if _, err := tx.CreateBucketIfNotExists(metaBucket); err != nil {
			return err
		}
		sb, err := tx.CreateBucketIfNotExists(sessionBucket)
		if err != nil {
			return err
		}
		sb.ForEach(func(k, v []byte) error {
			if len(v) == 8 {
				ttl := time.Duration(binary.BigEndian.Uint64(v))
				s.sessions[string(k)] = &boltSession{ttl: ttl, expires: time.Now().Add(ttl)}
			}
			return nil
		})
		// Keys of sessions that are not kept: drop them.
		var stale [][]byte
		b.ForEach(func(k, v []byte) error {
			var bv boltValue
			if json.Unmarshal(v, &bv) == nil && bv.Session != "" && s.sessions[bv.Session] == nil {
				stale = append(stale, bytes.Clone(k))
			}
			return nil
		})
		for _, k := range stale {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("embedded store %s: %w", path, err)
	}
	s.done.Add(1)
	go s.reap()
	return s, nil
}

func currentIndex(tx *bolt.Tx) uint64 {
	v := tx.Bucket(metaBucket).Get(indexKey)
	if len(v) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

func readValue(b *bolt.Bucket, key string) (*boltValue, error) {
	v := b.Get([]byte(key))
	if v == nil {
		return nil, nil
	}
	var bv boltValue
	if err := json.Unmarshal(v, &bv); err != nil {
		return nil, fmt.Errorf("embedded store: corrupt value at %s: %w", key, err)
	}
	return &bv, nil
}

// update runs fn in a write transaction with the next index and wakes the
// watchers if anything was written.
func (s *boltStore) update(fn func(b *bolt.Bucket, index uint64) (bool, error)) error {
	wrote := false
	err := s.db.Update(func(tx *bolt.Tx) error {
		index := currentIndex(tx) + 1
		w, err := fn(tx.Bucket(kvBucket), index)
		if err != nil || !w {
			return err
		}
		wrote = true
		var buf [8]byte
		binary.BigEndian.PutUint64(buf[:], index)
		return tx.Bucket(metaBucket).Put(indexKey, buf[:])
	})
	if err == nil && wrote {
		s.mu.Lock()
		close(s.changed)
		s.changed = make(chan struct{})
		s.mu.Unlock()
	}
	return err
}

func put(b *bolt.Bucket, key string, bv boltValue) error {
	data, _ := json.Marshal(bv)
	return b.Put([]byte(key), data)
}

func (s *boltStore) Get(ctx context.Context, key string) (*KV, error) {
	var out *KV
	err := s.db.View(func(tx *bolt.Tx) error {
		bv, err := readValue(tx.Bucket(kvBucket), key)
		if err != nil {
			return err
		}
		if bv == nil {
			return fmt.Errorf("%s: %w", key, ErrNotFound)
		}
		out = &KV{Key: key, Value: bv.Value, ModifyIndex: bv.ModifyIndex, Session: bv.Session}
		return nil
	})
	return out, err
}

func (s *boltStore) List(ctx context.Context, prefix string) ([]*KV, uint64, error) {
	var out []*KV
	var index uint64
	err := s.db.View(func(tx *bolt.Tx) error {
		index = currentIndex(tx)
		c := tx.Bucket(kvBucket).Cursor()
		p := []byte(prefix)
		for k, v := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, v = c.Next() {
			var bv boltValue
			if err := json.Unmarshal(v, &bv); err != nil {
				return fmt.Errorf("embedded store: corrupt value at %s: %w", k, err)
			}
			out = append(out, &KV{Key: string(k), Value: bv.Value, ModifyIndex: bv.ModifyIndex, Session: bv.Session})
		}
		return nil
	})
	return out, index, err
}

func (s *boltStore) Put(ctx context.Context, key string, value []byte) error {
	return s.Txn(ctx, []Op{{Kind: OpPut, Key: key, Value: value}})
}

func (s *boltStore) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	return s.Txn(ctx, []Op{{Kind: OpCAS, Key: key, Value: value, Index: index}})
}

func (s *boltStore) Delete(ctx context.Context, key string) error {
	return s.Txn(ctx, []Op{{Kind: OpDelete, Key: key}})
}

func (s *boltStore) DeleteCAS(ctx context.Context, key string, index uint64) error {
	return s.Txn(ctx, []Op{{Kind: OpDeleteCAS, Key: key, Index: index}})
}

// Txn checks every operation against the state before any write, inside
// one bbolt transaction: all or nothing.
func (s *boltStore) Txn(ctx context.Context, ops []Op) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if s.testHookBeforeTxnWrite != nil {
		s.testHookBeforeTxnWrite()
	}
	return s.update(func(b *bolt.Bucket, index uint64) (bool, error) {
		// Later ops see earlier ones' effects, as in Consul.
		pending := map[string]*boltValue{}
		get := func(key string) (*boltValue, error) {
			if v, ok := pending[key]; ok {
				return v, nil
			}
			return readValue(b, key)
		}
		for _, op := range ops {
			cur, err := get(op.Key)
			if err != nil {
				return false, err
			}
			var curIndex uint64
			if cur != nil {
				curIndex = cur.ModifyIndex
			}
			switch op.Kind {
			case OpPut:
				sess := ""
				if cur != nil {
					sess = cur.Session
				}
				pending[op.Key] = &boltValue{Value: op.Value, ModifyIndex: index, Session: sess}
			case OpCAS:
				if curIndex != op.Index {
					return false, fmt.Errorf("cas %s at index %d (is %d): %w", op.Key, op.Index, curIndex, ErrConflict)
				}
				sess := ""
				if cur != nil {
					sess = cur.Session
				}
				pending[op.Key] = &boltValue{Value: op.Value, ModifyIndex: index, Session: sess}
			case OpDelete:
				pending[op.Key] = nil
			case OpDeleteCAS:
				if cur == nil || curIndex != op.Index {
					return false, fmt.Errorf("delete %s at index %d (is %d): %w", op.Key, op.Index, curIndex, ErrConflict)
				}
				pending[op.Key] = nil
			case OpCheckIndex:
				if curIndex != op.Index {
					return false, fmt.Errorf("check %s at index %d (is %d): %w", op.Key, op.Index, curIndex, ErrConflict)
				}
			case OpLock:
				if !s.sessionLive(op.Session) {
					return false, fmt.Errorf("lock %s: session %q: %w", op.Key, op.Session, ErrConflict)
				}
				if cur != nil && cur.Session != "" && cur.Session != op.Session {
					return false, fmt.Errorf("lock %s: held by another session: %w", op.Key, ErrConflict)
				}
				pending[op.Key] = &boltValue{Value: op.Value, ModifyIndex: index, Session: op.Session}
			default:
				return false, fmt.Errorf("txn: unknown operation %d on %s", op.Kind, op.Key)
			}
		}
		for key, v := range pending {
			if v == nil {
				if err := b.Delete([]byte(key)); err != nil {
					return false, err
				}
				continue
			}
			if err := put(b, key, *v); err != nil {
				return false, err
			}
		}
		return len(pending) > 0, nil
	})
}

// sessionLive tells whether a session exists. Txn asks inside its write
// transaction, not before it: DestroySession and the reaper remove a session
// from the map before their own write transaction drops its keys, and bbolt
// runs one writer at a time, so a session ended before this check fails the
// lock, and one ended after it has its keys dropped once this transaction
// commits. A check made before the transaction could see a session that
// ends, and has its keys dropped, before the lock is written: the key would
// stay bound to a dead session for good.
func (s *boltStore) sessionLive(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sessions[id] != nil
}

func (s *boltStore) Watch(ctx context.Context, prefix string) <-chan Event {
	ch := make(chan Event, 1)
	go func() {
		defer close(ch)
		var last []*KV
		first := true
		for {
			s.mu.Lock()
			changed := s.changed
			s.mu.Unlock()
			pairs, index, err := s.List(ctx, prefix)
			if err != nil {
				sendLatest(ch, Event{Err: err})
			} else if first || !samePairs(last, pairs) {
				first = false
				last = pairs
				sendLatest(ch, Event{Pairs: pairs, Index: index})
			}
			select {
			case <-ctx.Done():
				return
			case <-s.stop:
				return
			case <-changed:
			}
		}
	}()
	return ch
}

func samePairs(a, b []*KV) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Key != b[i].Key || a[i].ModifyIndex != b[i].ModifyIndex || a[i].Session != b[i].Session {
			return false
		}
	}
	return true
}

func (s *boltStore) CreateSession(ctx context.Context, name string, ttl time.Duration) (string, error) {
	b := make([]byte, 16)
	rand.Read(b)
	id := hex.EncodeToString(b)
	var v [8]byte
	binary.BigEndian.PutUint64(v[:], uint64(ttl))
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(sessionBucket).Put([]byte(id), v[:]) }); err != nil {
		return "", fmt.Errorf("create session: %w", err)
	}
	s.mu.Lock()
	s.sessions[id] = &boltSession{ttl: ttl, expires: time.Now().Add(ttl)}
	s.mu.Unlock()
	return id, nil
}

// forgetSessions removes ended sessions from the file.
func (s *boltStore) forgetSessions(ids map[string]bool) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(sessionBucket)
		for id := range ids {
			if err := b.Delete([]byte(id)); err != nil {
				return err
			}
		}
		return nil
	})
}

func (s *boltStore) RenewSession(ctx context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	se := s.sessions[id]
	if se == nil {
		return fmt.Errorf("session %s: %w", id, ErrNotFound)
	}
	se.expires = time.Now().Add(se.ttl)
	return nil
}

func (s *boltStore) DestroySession(ctx context.Context, id string) error {
	// Out of the map before its keys are dropped: see sessionLive.
	s.mu.Lock()
	delete(s.sessions, id)
	s.mu.Unlock()
	ids := map[string]bool{id: true}
	if err := s.forgetSessions(ids); err != nil {
		return fmt.Errorf("destroy session: %w", err)
	}
	return s.dropSessionKeys(ids)
}

// reap ends expired sessions and deletes the keys they held.
func (s *boltStore) reap() {
	defer s.done.Done()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		expired := map[string]bool{}
		s.mu.Lock()
		for id, se := range s.sessions {
			if time.Now().After(se.expires) {
				expired[id] = true
				delete(s.sessions, id)
			}
		}
		s.mu.Unlock()
		if len(expired) > 0 {
			s.forgetSessions(expired)
			s.dropSessionKeys(expired)
		}
	}
}

func (s *boltStore) dropSessionKeys(ids map[string]bool) error {
	return s.update(func(b *bolt.Bucket, _ uint64) (bool, error) {
		var keys [][]byte
		b.ForEach(func(k, v []byte) error {
			var bv boltValue
			if json.Unmarshal(v, &bv) == nil && ids[bv.Session] {
				keys = append(keys, bytes.Clone(k))
			}
			return nil
		})
		for _, k := range keys {
			if err := b.Delete(k); err != nil {
				return false, err
			}
		}
		return len(keys) > 0, nil
	})
}

func (s *boltStore) Close() error {
	select {
	case <-s.stop:
		return nil
	default:
	}
	close(s.stop)
	s.done.Wait()
	return s.db.Close()
}
