package nat

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
)

func TestAddrBookPersistAndIdempotent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gw.json")
	sub := netip.MustParsePrefix("172.18.0.0/16")
	gw := netip.MustParseAddr("172.18.0.1")
	b, err := OpenAddrBook(path, sub, gw)
	if err != nil {
		t.Fatal(err)
	}
	a1, err := b.Allocate("ep1")
	if err != nil {
		t.Fatal(err)
	}
	if a1 != netip.MustParseAddr("172.18.0.2") {
		t.Fatalf("first allocation %s, want 172.18.0.2 (network and gateway skipped)", a1)
	}
	again, err := b.Allocate("ep1")
	if err != nil || again != a1 {
		t.Fatalf("second Allocate(ep1) = %s, %v; want %s", again, err, a1)
	}
	a2, err := b.Allocate("ep2")
	if err != nil || a2 == a1 {
		t.Fatalf("Allocate(ep2) = %s, %v; want a fresh address", a2, err)
	}

	b2, err := OpenAddrBook(path, sub, gw)
	if err != nil {
		t.Fatal(err)
	}
	if got := b2.Owners(); len(got) != 2 || got["ep1"] != a1 || got["ep2"] != a2 {
		t.Fatalf("reopened owners = %v", got)
	}
	if a, _ := b2.Allocate("ep1"); a != a1 {
		t.Fatalf("after reopen Allocate(ep1) = %s, want %s", a, a1)
	}
	a3, err := b2.Allocate("ep3")
	if err != nil || a3 == a1 || a3 == a2 {
		t.Fatalf("after reopen Allocate(ep3) = %s, %v: duplicate", a3, err)
	}
	// Owners is a copy: mutating it must not leak into the book.
	o := b2.Owners()
	delete(o, "ep1")
	if _, ok := b2.Owners()["ep1"]; !ok {
		t.Fatal("Owners() returned the internal map")
	}
	// No temporary files left next to the book.
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Fatalf("directory holds %d entries, want only the book", len(ents))
	}
}

func TestAddrBookReleaseReuseAndExhaustion(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gw.json")
	// /29: .0 network, .7 broadcast, .1 reserved -> .2-.6 usable (5).
	sub := netip.MustParsePrefix("10.9.0.0/29")
	b, err := OpenAddrBook(path, sub, netip.MustParseAddr("10.9.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[netip.Addr]bool{}
	for i := range 5 {
		a, err := b.Allocate(fmt.Sprint("ep", i))
		if err != nil {
			t.Fatalf("allocation %d: %v", i, err)
		}
		if seen[a] || !b.usable(a) {
			t.Fatalf("allocation %d gave %s (duplicate or unusable)", i, a)
		}
		seen[a] = true
	}
	if _, err := b.Allocate("one-too-many"); !errors.Is(err, ErrAddrExhausted) {
		t.Fatalf("Allocate on full book: %v, want ErrAddrExhausted", err)
	}
	freed := b.Owners()["ep2"]
	if err := b.Release("ep2"); err != nil {
		t.Fatal(err)
	}
	if err := b.Release("ep2"); err != nil {
		t.Fatalf("releasing twice: %v", err)
	}
	if err := b.Release("never-existed"); err != nil {
		t.Fatalf("releasing unknown owner: %v", err)
	}
	a, err := b.Allocate("newcomer")
	if err != nil || a != freed {
		t.Fatalf("Allocate after release = %s, %v; want reuse of %s", a, err, freed)
	}
	b2, err := OpenAddrBook(path, sub, netip.MustParseAddr("10.9.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := b2.Owners()["ep2"]; ok {
		t.Fatal("release not persisted")
	}
	if b2.Owners()["newcomer"] != freed {
		t.Fatal("reallocation not persisted")
	}
}

func TestAddrBookRejectsBadFiles(t *testing.T) {
	dir := t.TempDir()
	sub := netip.MustParsePrefix("10.9.0.0/24")
	gw := netip.MustParseAddr("10.9.0.1")
	for name, content := range map[string]string{
		"garbage":      "{not json",
		"othersubnet":  `{"subnet":"10.8.0.0/24","owners":{}}`,
		"outside":      `{"subnet":"10.9.0.0/24","owners":{"a":"10.8.0.5"}}`,
		"gateway":      `{"subnet":"10.9.0.0/24","owners":{"a":"10.9.0.1"}}`,
		"duplicate":    `{"subnet":"10.9.0.0/24","owners":{"a":"10.9.0.5","b":"10.9.0.5"}}`,
		"unparseable":  `{"subnet":"10.9.0.0/24","owners":{"a":"nope"}}`,
		"broadcastish": `{"subnet":"10.9.0.0/24","owners":{"a":"10.9.0.255"}}`,
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := OpenAddrBook(p, sub, gw); err == nil {
			t.Errorf("%s: OpenAddrBook accepted %s", name, content)
		}
	}
	// A book whose directory is gone cannot persist: the allocation must
	// not be handed out.
	b, err := OpenAddrBook(filepath.Join(dir, "missing", "gw.json"), sub, gw)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Allocate("x"); err == nil {
		t.Fatal("Allocate succeeded without persisting")
	}
	if len(b.Owners()) != 0 {
		t.Fatal("failed allocation left an owner behind")
	}
}
