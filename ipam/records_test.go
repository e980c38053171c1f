package ipam

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// The records are the truth: a reservation key that lost an entry cannot
// hand its network's subnet or VNI out again; a reservation with no record
// and no address is reclaimed; a network is restored as it was, once.
func TestReservationsCheckedAgainstRecords(t *testing.T) {
	st := boltStore(t)
	a := New(st, Options{})
	lease := NetworkLease{Subnet: netip.MustParsePrefix("10.1.0.0/24"), Gateway: netip.MustParseAddr("10.1.0.1"), VNI: 300}
	records := map[string]NetworkLease{"net-a": lease}
	recs := func(context.Context) (map[string]NetworkLease, error) { return records, nil }

	// net-a has a record but, the reservations having been lost, no
	// reservation: its subnet and VNI are still taken.
	if _, err := a.AllocateNetwork(bg, "net-b", NetworkRequest{Subnet: lease.Subnet, Records: recs}, nil); !errors.Is(err, ErrInUse) {
		t.Errorf("subnet of a network with a record but no reservation: %v", err)
	}
	if _, err := a.AllocateNetwork(bg, "net-b", NetworkRequest{VNI: 300, Records: recs}, nil); !errors.Is(err, ErrInUse) {
		t.Errorf("vni of a network with a record but no reservation: %v", err)
	}
	got, err := a.AllocateNetwork(bg, "net-b", NetworkRequest{Records: recs}, nil)
	if err != nil || got.Subnet.Overlaps(lease.Subnet) || got.VNI == 300 {
		t.Fatalf("automatic lease next to net-a: %+v, %v", got, err)
	}

	// Restored as it was, twice over; not over another network.
	if err := a.RestoreNetwork(bg, "net-a", lease, recs, nil); err != nil {
		t.Fatal(err)
	}
	if err := a.RestoreNetwork(bg, "net-a", lease, recs, nil); err != nil {
		t.Errorf("restore again: %v", err)
	}
	records["net-b"] = got
	clash := NetworkLease{Subnet: got.Subnet, Gateway: got.Gateway, VNI: 999}
	if err := a.RestoreNetwork(bg, "net-c", clash, recs, nil); !errors.Is(err, ErrInUse) {
		t.Errorf("restore over net-b's subnet: %v", err)
	}

	// net-b's record goes (deleted by hand) and no address is held: its
	// reservation no longer blocks the subnet.
	delete(records, "net-b")
	if _, err := a.AllocateNetwork(bg, "net-d", NetworkRequest{Subnet: got.Subnet, Records: recs}, nil); err != nil {
		t.Errorf("subnet of a reservation with no record and no address: %v", err)
	}
	// With an address held, it does (its hosts republish it).
	records["net-d"] = NetworkLease{Subnet: got.Subnet, Gateway: got.Gateway, VNI: got.VNI}
	if _, err := a.AllocateAddr(bg, "net-a", lease, netip.Addr{}, AddrOwner{Node: "h", Endpoint: "e"}); err != nil {
		t.Fatal(err)
	}
	delete(records, "net-a")
	_, err = a.AllocateNetwork(bg, "net-e", NetworkRequest{Subnet: lease.Subnet, Records: recs}, nil)
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "net-a") {
		t.Errorf("subnet of a reservation whose hosts hold addresses: %v", err)
	}
}

// Reserved ranges and ranges in use outside the overlay are refused, and
// automatic subnets go around the latter.
func TestReservedAndAvoidedRanges(t *testing.T) {
	for _, bad := range []string{"0.0.0.0/8", "127.0.0.0/24", "169.254.1.0/24", "224.0.0.0/24", "239.1.1.0/24", "240.0.0.0/24", "0.0.0.0/0"} {
		if err := ValidateSubnet(netip.MustParsePrefix(bad)); !errors.Is(err, ErrInvalid) {
			t.Errorf("subnet %s: %v", bad, err)
		}
	}
	if err := ValidatePool(netip.MustParsePrefix("224.0.0.0/4"), 24); !errors.Is(err, ErrInvalid) {
		t.Errorf("multicast pool: %v", err)
	}
	a := New(boltStore(t), Options{Pool: netip.MustParsePrefix("10.88.0.0/23")})
	avoid := []Avoid{{Prefix: netip.MustParsePrefix("10.88.0.0/24"), What: "the underlay network of host h1"}}
	if _, err := a.AllocateNetwork(bg, "x", NetworkRequest{Subnet: netip.MustParsePrefix("10.88.0.0/25"), Avoid: avoid}, nil); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "underlay network of host h1") {
		t.Errorf("subnet in the underlay: %v", err)
	}
	got, err := a.AllocateNetwork(bg, "x", NetworkRequest{Avoid: avoid}, nil)
	if err != nil || got.Subnet != netip.MustParsePrefix("10.88.1.0/24") {
		t.Errorf("automatic subnet next to the underlay: %+v, %v", got, err)
	}
}

// A record that does not decode keeps its network's reservation: by its
// id when that can be read, and every reservation when not even that.
func TestUnreadableRecordsKeepReservations(t *testing.T) {
	a := New(boltStore(t), Options{})
	lease := NetworkLease{Subnet: netip.MustParsePrefix("10.2.0.0/24"), Gateway: netip.MustParseAddr("10.2.0.1"), VNI: 400}
	if err := a.RestoreNetwork(bg, "net-a", lease, nil, nil); err != nil {
		t.Fatal(err)
	}
	for name, recs := range map[string]map[string]NetworkLease{
		"by id": {"net-a": {}},
		"no id": {"": {}},
		"both":  {"net-a": {}, "": {}},
	} {
		r := func(context.Context) (map[string]NetworkLease, error) { return recs, nil }
		if _, err := a.AllocateNetwork(bg, "net-x", NetworkRequest{Subnet: lease.Subnet, Records: r}, nil); !errors.Is(err, ErrInUse) {
			t.Errorf("%s: subnet of a network with an unreadable record: %v", name, err)
		}
	}
}

func TestUsable(t *testing.T) {
	for p, want := range map[string]int{"10.0.0.0/24": 253, "10.0.0.0/29": 5, "10.0.0.0/30": 1} {
		if got := Usable(netip.MustParsePrefix(p)); got != want {
			t.Errorf("Usable(%s) = %d, want %d", p, got, want)
		}
	}
}
