package overlay

import (
	"context"
	"sync"
)

// ctxMutex is a mutex whose waiters can give up: a request whose client
// went away, or whose deadline passed while a pass held the lock through
// a slow store, must not go on waiting and then work for nobody. The zero
// value is unlocked.
type ctxMutex struct {
	once sync.Once
	ch   chan struct{}
}

func (m *ctxMutex) init() { m.once.Do(func() { m.ch = make(chan struct{}, 1) }) }

func (m *ctxMutex) Lock() {
	m.init()
	m.ch <- struct{}{}
}

// LockCtx takes the lock, or returns ctx's error once it is done.
func (m *ctxMutex) LockCtx(ctx context.Context) error {
	m.init()
	select {
	case m.ch <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (m *ctxMutex) Unlock() { <-m.ch }

// netOps orders, per network (by name), the store repairs of a pass
// against the attaches and detaches of that network. Attaches and
// detaches share it: they overlap, so that their commits group. A repair
// of a network's records (a republish, a removed network's endpoints,
// addresses held by nobody) runs without mu, so that it holds up no
// kernel work, and excludes them, so that it works from local records
// that do not change under it. A pass never waits for it: a network with
// operations under way is left to the next pass, as before.
//
// Order: a network's lock is taken before mu, never while holding it.
type netOps struct {
	mu sync.Mutex
	m  map[string]*sync.RWMutex
}

func (o *netOps) get(network string) *sync.RWMutex {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.m == nil {
		o.m = map[string]*sync.RWMutex{}
	}
	l := o.m[network]
	if l == nil {
		l = &sync.RWMutex{}
		o.m[network] = l
	}
	return l
}

// enter is taken by an attach or detach for its whole run.
func (o *netOps) enter(network string) (leave func()) {
	l := o.get(network)
	l.RLock()
	return l.RUnlock
}

// exclusive is taken by a pass for a network's store repair, if no
// operation of the network is under way.
func (o *netOps) exclusive(network string) (release func(), ok bool) {
	l := o.get(network)
	if !l.TryLock() {
		return nil, false
	}
	return l.Unlock, true
}
