package kvstore_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/vxnet/vxnet/internal/testconsul"
	"github.com/vxnet/vxnet/kvstore"
)

// suites run against every backend.
var suites = map[string]func(t *testing.T, s kvstore.Store){
	"GetPutList":      testGetPutList,
	"CAS":             testCAS,
	"TxnAllOrNothing": testTxnAllOrNothing,
	"Watch":           testWatch,
	"Sessions":        testSessions,
	"SessionExpiry":   testSessionExpiry,
}

// TestConformance runs every suite against the embedded store and a real
// Consul server, each suite on a fresh store (its own key prefix in Consul).
func TestConformance(t *testing.T) {
	t.Run("bolt", func(t *testing.T) {
		t.Parallel()
		for name, suite := range suites {
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				s, err := kvstore.NewBolt(filepath.Join(t.TempDir(), "store.db"))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { s.Close() })
				suite(t, s)
			})
		}
	})
	t.Run("consul", func(t *testing.T) {
		t.Parallel()
		srv := testconsul.Start(t)
		for name, suite := range suites {
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				s, err := kvstore.Open(srv.URL(fmt.Sprintf("test-%s-%d", name, time.Now().UnixNano())), kvstore.Options{})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { s.Close() })
				suite(t, s)
			})
		}
	})
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func testGetPutList(t *testing.T, s kvstore.Store) {
	{
		c := ctx(t)
		if _, err := s.Get(c, "a/x"); !errors.Is(err, kvstore.ErrNotFound) {
			t.Fatalf("Get of a missing key: %v", err)
		}
		for _, k := range []string{"a/x", "a/y", "ab", "b/z"} {
			if err := s.Put(c, k, []byte("v-"+k)); err != nil {
				t.Fatal(err)
			}
		}
		kv, err := s.Get(c, "a/x")
		if err != nil || string(kv.Value) != "v-a/x" || kv.ModifyIndex == 0 || kv.Key != "a/x" {
			t.Fatalf("Get: %+v %v", kv, err)
		}
		pairs, idx, err := s.List(c, "a/")
		if err != nil || len(pairs) != 2 || pairs[0].Key != "a/x" || pairs[1].Key != "a/y" || idx == 0 {
			t.Fatalf("List a/: %v %d %v", keys(pairs), idx, err)
		}
		if err := s.Delete(c, "a/x"); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(c, "a/x"); err != nil {
			t.Fatalf("deleting an absent key: %v", err)
		}
		if pairs, _, _ := s.List(c, "a/"); len(pairs) != 1 {
			t.Fatalf("after delete: %v", keys(pairs))
		}
	}
}

func testCAS(t *testing.T, s kvstore.Store) {
	{
		c := ctx(t)
		if err := s.CAS(c, "k", []byte("1"), 0); err != nil {
			t.Fatalf("create-only: %v", err)
		}
		if err := s.CAS(c, "k", []byte("2"), 0); !errors.Is(err, kvstore.ErrConflict) {
			t.Fatalf("create-only on an existing key: %v", err)
		}
		kv, _ := s.Get(c, "k")
		if err := s.CAS(c, "k", []byte("2"), kv.ModifyIndex+1000); !errors.Is(err, kvstore.ErrConflict) {
			t.Fatalf("stale CAS: %v", err)
		}
		if err := s.CAS(c, "k", []byte("2"), kv.ModifyIndex); err != nil {
			t.Fatalf("CAS: %v", err)
		}
		if err := s.DeleteCAS(c, "k", kv.ModifyIndex); !errors.Is(err, kvstore.ErrConflict) {
			t.Fatalf("stale DeleteCAS: %v", err)
		}
		kv2, _ := s.Get(c, "k")
		if string(kv2.Value) != "2" || kv2.ModifyIndex <= kv.ModifyIndex {
			t.Fatalf("after CAS: %+v", kv2)
		}
		if err := s.DeleteCAS(c, "k", kv2.ModifyIndex); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteCAS(c, "k", kv2.ModifyIndex); !errors.Is(err, kvstore.ErrConflict) {
			t.Fatalf("DeleteCAS of an absent key: %v", err)
		}
	}
}

func testTxnAllOrNothing(t *testing.T, s kvstore.Store) {
	{
		c := ctx(t)
		s.Put(c, "t/existing", []byte("x"))
		err := s.Txn(c, []kvstore.Op{
			{Kind: kvstore.OpPut, Key: "t/a", Value: []byte("a")},
			{Kind: kvstore.OpCAS, Key: "t/b", Value: []byte("b")},
			{Kind: kvstore.OpCAS, Key: "t/existing", Value: []byte("y")}, // create-only: fails
		})
		if !errors.Is(err, kvstore.ErrConflict) {
			t.Fatalf("failing txn: %v", err)
		}
		if pairs, _, _ := s.List(c, "t/"); len(pairs) != 1 || string(pairs[0].Value) != "x" {
			t.Fatalf("a failed txn changed something: %v", keys(pairs))
		}
		ex, _ := s.Get(c, "t/existing")
		err = s.Txn(c, []kvstore.Op{
			{Kind: kvstore.OpCheckIndex, Key: "t/existing", Index: ex.ModifyIndex},
			{Kind: kvstore.OpCheckIndex, Key: "t/none", Index: 0},
			{Kind: kvstore.OpPut, Key: "t/a", Value: []byte("a")},
			{Kind: kvstore.OpCAS, Key: "t/b", Value: []byte("b")},
			{Kind: kvstore.OpDeleteCAS, Key: "t/existing", Index: ex.ModifyIndex},
		})
		if err != nil {
			t.Fatalf("txn: %v", err)
		}
		if pairs, _, _ := s.List(c, "t/"); len(pairs) != 2 || pairs[0].Key != "t/a" || pairs[1].Key != "t/b" {
			t.Fatalf("after txn: %v", keys(pairs))
		}
		if err := s.Txn(c, []kvstore.Op{{Kind: kvstore.OpCheckIndex, Key: "t/a", Index: 0}}); !errors.Is(err, kvstore.ErrConflict) {
			t.Fatalf("check-not-exists on an existing key: %v", err)
		}
	}
}

func testWatch(t *testing.T, s kvstore.Store) {
	{
		c, cancel := context.WithCancel(ctx(t))
		s.Put(c, "w/0", []byte("0"))
		ch := s.Watch(c, "w/")
		ev := next(t, ch)
		if len(ev.Pairs) != 1 {
			t.Fatalf("initial snapshot: %v", keys(ev.Pairs))
		}
		// Unrelated keys do not wake the watch with a different snapshot.
		s.Put(c, "other", []byte("x"))
		const n = 100
		for i := 1; i <= n; i++ {
			if err := s.Put(c, fmt.Sprintf("w/%d", i), []byte("v")); err != nil {
				t.Fatal(err)
			}
		}
		s.Delete(c, "w/0")
		deadline := time.After(10 * time.Second)
		for {
			select {
			case ev := <-ch:
				if ev.Err != nil {
					t.Fatalf("watch error: %v", ev.Err)
				}
				if len(ev.Pairs) == n && ev.Pairs[0].Key != "w/0" {
					cancel()
					for range ch { // the channel is closed after cancel
					}
					return
				}
			case <-deadline:
				t.Fatal("watch never delivered the final state")
			}
		}
	}
}

func testSessions(t *testing.T, s kvstore.Store) {
	{
		c := ctx(t)
		id, err := s.CreateSession(c, "test", 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.RenewSession(c, id); err != nil {
			t.Fatalf("renew: %v", err)
		}
		if err := s.Txn(c, []kvstore.Op{{Kind: kvstore.OpLock, Key: "s/a", Value: []byte("x"), Session: id}}); err != nil {
			t.Fatalf("lock: %v", err)
		}
		kv, err := s.Get(c, "s/a")
		if err != nil || kv.Session != id {
			t.Fatalf("locked key: %+v %v", kv, err)
		}
		other, _ := s.CreateSession(c, "other", 10*time.Second)
		if err := s.Txn(c, []kvstore.Op{{Kind: kvstore.OpLock, Key: "s/a", Value: []byte("y"), Session: other}}); !errors.Is(err, kvstore.ErrConflict) {
			t.Fatalf("lock held by another session: %v", err)
		}
		if err := s.DestroySession(c, id); err != nil {
			t.Fatal(err)
		}
		s.DestroySession(c, other)
		if _, err := s.Get(c, "s/a"); !errors.Is(err, kvstore.ErrNotFound) {
			t.Fatalf("key of a destroyed session: %v", err)
		}
		if err := s.RenewSession(c, id); !errors.Is(err, kvstore.ErrNotFound) {
			t.Fatalf("renew of a destroyed session: %v", err)
		}
	}
}

// A session that is not renewed expires and takes its keys with it
// (Consul may take up to twice the TTL).
func testSessionExpiry(t *testing.T, s kvstore.Store) {
	{
		c := ctx(t)
		id, err := s.CreateSession(c, "expiring", 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Txn(c, []kvstore.Op{{Kind: kvstore.OpLock, Key: "e/a", Value: []byte("x"), Session: id}}); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		for {
			if _, err := s.Get(c, "e/a"); errors.Is(err, kvstore.ErrNotFound) {
				t.Logf("expired after %s", time.Since(start).Round(100*time.Millisecond))
				return
			}
			if time.Since(start) > 25*time.Second {
				t.Fatal("key of an unrenewed session still there after 25s")
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// A watch survives a Consul restart and resumes with the new state.
func TestWatchSurvivesConsulRestart(t *testing.T) {
	t.Parallel()
	srv := testconsul.Start(t, testconsul.WithPersistence())
	s, err := kvstore.Open(srv.URL("restart"), kvstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c, cancel := context.WithCancel(ctx(t))
	defer cancel()
	s.Put(c, "r/a", []byte("1"))
	ch := s.Watch(c, "r/")
	if ev := next(t, ch); len(ev.Pairs) != 1 {
		t.Fatalf("initial: %v", keys(ev.Pairs))
	}
	srv.Restart()
	put := time.Now()
	for {
		if err := s.Put(c, "r/b", []byte("2")); err == nil {
			break
		}
		if time.Since(put) > 20*time.Second {
			t.Fatal("cannot write after restart")
		}
		time.Sleep(200 * time.Millisecond)
	}
	deadline := time.After(20 * time.Second)
	for {
		select {
		case ev := <-ch:
			if ev.Err == nil && len(ev.Pairs) == 2 {
				return
			}
		case <-deadline:
			t.Fatal("watch did not deliver the write made after the restart")
		}
	}
}

func TestOpenURL(t *testing.T) {
	t.Setenv("CONSUL_HTTP_TOKEN", "secret")
	cfg, path, err := kvstore.ParseURL("consul://10.1.0.5:8500", kvstore.Options{})
	if err != nil || path != "" || cfg.Address != "10.1.0.5:8500" || cfg.Prefix != "vxnet/" || cfg.Token != "secret" || cfg.Scheme != "http" {
		t.Errorf("consul URL: %+v %q %v", cfg, path, err)
	}
	cfg, _, _ = kvstore.ParseURL("consuls://h:1/team/vx/", kvstore.Options{Token: "flag"})
	if cfg.Prefix != "team/vx/" || cfg.Scheme != "https" || cfg.Token != "flag" {
		t.Errorf("consuls URL: %+v", cfg)
	}
	if _, path, err := kvstore.ParseURL("file:///var/lib/vxnet/store.db", kvstore.Options{}); err != nil || path != "/var/lib/vxnet/store.db" {
		t.Errorf("file URL: %q %v", path, err)
	}
	for _, bad := range []string{"consul://nohost", "etcd://h:1", "file://relative/x", "consul://user:pw@h:1", "file:///dir/", "::"} {
		if _, _, err := kvstore.ParseURL(bad, kvstore.Options{}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// A Consul that does not answer fails requests in seconds, as unavailable.
func TestConsulUnreachable(t *testing.T) {
	s, err := kvstore.NewConsul(kvstore.ConsulConfig{Address: "127.0.0.1:1", Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = s.Get(context.Background(), "x")
	if !errors.Is(err, kvstore.ErrUnavailable) {
		t.Errorf("want ErrUnavailable, got %v", err)
	}
	if time.Since(start) > 3*time.Second {
		t.Errorf("took %s", time.Since(start))
	}
}

func next(t *testing.T, ch <-chan kvstore.Event) kvstore.Event {
	t.Helper()
	select {
	case ev := <-ch:
		if ev.Err != nil {
			t.Fatalf("watch: %v", ev.Err)
		}
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no watch event")
	}
	return kvstore.Event{}
}

func keys(pairs []*kvstore.KV) []string {
	var out []string
	for _, p := range pairs {
		out = append(out, p.Key)
	}
	return out
}
