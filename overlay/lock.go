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
