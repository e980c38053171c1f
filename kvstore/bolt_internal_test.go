package kvstore

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"
)

// A lock whose session is destroyed while the lock is on its way must fail
// (or have its key removed with the session): a key bound to a session that
// has already ended would never be removed, since nothing ends that session
// again. The embedded store once decided liveness from a snapshot taken
// before its write transaction, so a DestroySession that ran in between
// left such an orphan.
func TestBoltLockRacingDestroySession(t *testing.T) {
	st, err := NewBolt(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	s := st.(*boltStore)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	id, err := s.CreateSession(ctx, "race", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	s.testHookBeforeTxnWrite = func() {
		s.testHookBeforeTxnWrite = nil
		if err := s.DestroySession(ctx, id); err != nil {
			t.Errorf("destroy session: %v", err)
		}
	}
	err = s.Txn(ctx, []Op{{Kind: OpLock, Key: "race/a", Value: []byte("x"), Session: id}})
	if !errors.Is(err, ErrConflict) {
		t.Errorf("lock with a session destroyed before the write: %v, want a conflict", err)
	}
	if kv, err := s.Get(ctx, "race/a"); err == nil {
		t.Errorf("race/a is bound to session %s, which was destroyed", kv.Session)
	} else if !errors.Is(err, ErrNotFound) {
		t.Error(err)
	}
}
