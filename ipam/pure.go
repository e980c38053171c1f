package ipam

import (
	"fmt"
	"net"
	"net/netip"
)

// MACFromIP derives an endpoint's MAC from its IPv4 address (02:42 and the
// four address bytes, as Docker does), so that a peer's neighbor entry can
// be computed from its address alone.
func MACFromIP(ip netip.Addr) net.HardwareAddr {
	b := ip.As4()
	return net.HardwareAddr{0x02, 0x42, b[0], b[1], b[2], b[3]}
}

func u32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func addr(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// hostRange is the first and last address that may be handed out: the
// network and broadcast addresses never are.
func hostRange(p netip.Prefix) (first, last uint32) {
	base := u32(p.Masked().Addr())
	size := uint32(1) << (32 - p.Bits())
	return base + 1, base + size - 2
}

// reserved are the IPv4 ranges that no host interface may be numbered
// from: an overlay there would capture the host's own loopback,
// link-local or multicast traffic, or be unroutable.
var reserved = []struct {
	p    netip.Prefix
	what string
}{
	{netip.MustParsePrefix("0.0.0.0/8"), "\"this network\" range 0.0.0.0/8"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback range 127.0.0.0/8"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local range 169.254.0.0/16"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast range 224.0.0.0/4"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved (class E) range 240.0.0.0/4"},
}

// ValidateSubnet refuses what cannot be an overlay subnet.
func ValidateSubnet(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return fmt.Errorf("subnet is not a valid CIDR: %w", ErrInvalid)
	case !p.Addr().Is4():
		return fmt.Errorf("subnet %s: only IPv4 is supported: %w", p, ErrInvalid)
	case p.Bits() > 30:
		return fmt.Errorf("subnet %s is smaller than /30: %w", p, ErrInvalid)
	case p != p.Masked():
		return fmt.Errorf("subnet %s has host bits set; did you mean %s?: %w", p, p.Masked(), ErrInvalid)
	}
	for _, r := range reserved {
		if r.p.Overlaps(p) {
			return fmt.Errorf("subnet %s overlaps the %s: %w", p, r.what, ErrInvalid)
		}
	}
	return nil
}

// ValidatePool refuses a pool that subnets cannot be taken from.
func ValidatePool(p netip.Prefix, bits int) error {
	switch {
	case !p.IsValid() || !p.Addr().Is4():
		return fmt.Errorf("pool %s is not an IPv4 prefix: %w", p, ErrInvalid)
	case p != p.Masked():
		return fmt.Errorf("pool %s has host bits set; did you mean %s?: %w", p, p.Masked(), ErrInvalid)
	case p.Bits() > bits:
		return fmt.Errorf("pool %s is smaller than one /%d subnet: %w", p, bits, ErrInvalid)
	}
	for _, r := range reserved {
		if r.p.Overlaps(p) {
			return fmt.Errorf("pool %s overlaps the %s: %w", p, r.what, ErrInvalid)
		}
	}
	return nil
}

// validateHost checks that ip may be given to an endpoint or the gateway.
func validateHost(p netip.Prefix, ip netip.Addr, what string) error {
	if !ip.Is4() {
		return fmt.Errorf("%s %s is not an IPv4 address: %w", what, ip, ErrInvalid)
	}
	if !p.Contains(ip) {
		return fmt.Errorf("%s %s is outside the subnet %s: %w", what, ip, p, ErrInvalid)
	}
	first, last := hostRange(p)
	if v := u32(ip); v < first || v > last {
		return fmt.Errorf("%s %s is the network or broadcast address of %s: %w", what, ip, p, ErrInvalid)
	}
	return nil
}

// ValidateAddr checks that ip may be an endpoint's address in the lease:
// a host address of the subnet (not the network or broadcast address)
// other than the gateway.
func ValidateAddr(l NetworkLease, ip netip.Addr) error {
	if err := validateHost(l.Subnet, ip, "address"); err != nil {
		return err
	}
	if ip == l.Gateway {
		return fmt.Errorf("address %s is the gateway of %s: %w", ip, l.Subnet, ErrInvalid)
	}
	return nil
}

// firstFreeSubnet walks the pool in steps of the subnet size and returns
// the first subnet that overlaps none of taken.
func firstFreeSubnet(pool netip.Prefix, bits int, taken []netip.Prefix) (netip.Prefix, error) {
	if !pool.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("pool %s is not IPv4: %w", pool, ErrInvalid)
	}
	if bits < pool.Bits() || bits > 30 {
		return netip.Prefix{}, fmt.Errorf("subnet size /%d does not fit pool %s: %w", bits, pool, ErrInvalid)
	}
	base := u32(pool.Masked().Addr())
	step := uint64(1) << (32 - bits)
	end := uint64(base) + uint64(1)<<(32-pool.Bits())
	for v := uint64(base); v < end; v += step {
		cand := netip.PrefixFrom(addr(uint32(v)), bits)
		free := true
		for _, t := range taken {
			if t.Overlaps(cand) {
				free = false
				// Jump past the taken subnet when it is the larger one.
				if t.Bits() < bits {
					_, last := hostRange(t)
					v = uint64(last+1) + 1 - step
				}
				break
			}
		}
		if free {
			return cand, nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("no free /%d left in pool %s: %w", bits, pool, ErrExhausted)
}

// pickVNI returns the lowest VNI in [lo, hi] not in taken.
func pickVNI(lo, hi uint32, taken map[uint32]bool) (uint32, error) {
	for v := lo; v <= hi && v >= lo; v++ {
		if !taken[v] {
			return v, nil
		}
	}
	return 0, fmt.Errorf("no free VNI in %d..%d: %w", lo, hi, ErrExhausted)
}

// pickAddr returns the skip-th free host address of the lease (0 = the
// lowest), wrapping around; ok is false when none is free. Skipping lets
// allocators that collided spread out instead of racing for the same one.
func pickAddr(l NetworkLease, taken map[netip.Addr]bool, skip int) (netip.Addr, bool) {
	first, last := hostRange(l.Subnet)
	free := int(last-first+1) - len(taken)
	if free <= 0 {
		return netip.Addr{}, false
	}
	var found []netip.Addr
	for v := first; v <= last && v >= first; v++ {
		a := addr(v)
		if a == l.Gateway || taken[a] {
			continue
		}
		if len(found) == skip {
			return a, true
		}
		found = append(found, a)
	}
	if len(found) == 0 {
		return netip.Addr{}, false
	}
	return found[skip%len(found)], true
}

// Usable is how many endpoint addresses a subnet has: its host addresses
// less the gateway.
func Usable(p netip.Prefix) int {
	first, last := hostRange(p)
	return max(int(int64(last)-int64(first)+1)-1, 0)
}
