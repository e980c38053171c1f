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

// The embedded store restarts with its host's agent: a session and the
// keys it holds survive a reopen (a restart is not the node's death), and
// a session not renewed after it still expires.
func TestBoltSessionSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := NewBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	id, err := st.CreateSession(ctx, "node", 1500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Txn(ctx, []Op{{Kind: OpLock, Key: "alive/n", Value: []byte("n"), Session: id}}); err != nil {
		t.Fatal(err)
	}
	st.Close()

	st, err = NewBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.RenewSession(ctx, id); err != nil {
		t.Fatalf("session after reopen: %v", err)
	}
	if kv, err := st.Get(ctx, "alive/n"); err != nil || kv.Session != id {
		t.Fatalf("alive/n after reopen: %+v, %v", kv, err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := st.Get(ctx, "alive/n"); errors.Is(err, ErrNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a session not renewed after reopen did not expire")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := st.RenewSession(ctx, id); !errors.Is(err, ErrNotFound) {
		t.Errorf("renew of an expired session: %v", err)
	}
}
