package ipam

import (
	"errors"
	"math"
	"net/netip"
	"testing"
)

// span is the inclusive range of IPv4 addresses of p, computed without
// netip's helpers so that it checks them rather than repeats them.
func span(p netip.Prefix) (lo, hi uint64) {
	size := uint64(1) << (32 - p.Bits())
	lo = uint64(u32(p.Addr())) &^ (size - 1)
	return lo, lo + size - 1
}

func spansOverlap(a, b netip.Prefix) bool {
	alo, ahi := span(a)
	blo, bhi := span(b)
	return alo <= bhi && blo <= ahi
}

// maxCandidates bounds the brute force: pools of at most 4096 candidate
// subnets.
const maxCandidates = 1 << 12

// FuzzFirstFreeSubnet checks the pool walk against a brute force over every
// candidate: a subnet it returns is aligned, of the requested size, inside
// the pool, overlaps no taken subnet and is the lowest such; it reports
// exhaustion exactly when no candidate is free, and refuses sizes that do
// not fit the pool.
//
// The taken list is decoded from raw: 5 bytes per subnet (an offset from
// the pool's base or, with the flag bit, an absolute address; then the
// prefix length). fill adds every candidate but the fillSkip-th (or all of
// them when fillSkip is past the end), in ascending or descending order, so
// that full and almost full pools are common.
func FuzzFirstFreeSubnet(f *testing.F) {
	f.Add(uint32(0x0a000000), uint8(8), uint8(24), []byte{}, false, uint16(0), false)
	// The unit test's case: 10.0.0.0/24, 10.0.1.128/25, 10.0.2.0/23.
	f.Add(uint32(0x0a000000), uint8(16), uint8(24), []byte{0, 0, 0, 0, 24, 0, 0, 1, 128, 25, 0, 0, 2, 0, 23}, false, uint16(0), false)
	// A large taken network skipped in one go, and one covering the pool.
	f.Add(uint32(0x0a000000), uint8(12), uint8(24), []byte{0, 0, 0, 0, 14}, false, uint16(0), false)
	f.Add(uint32(0xc0a80000), uint8(23), uint8(24), []byte{0x80 | 0xc0, 0xa8, 0, 0, 16}, false, uint16(0), false)
	// Full and almost full pools, in both orders.
	f.Add(uint32(0xc0a80000), uint8(20), uint8(24), []byte{}, true, uint16(16), false)
	f.Add(uint32(0xc0a80000), uint8(20), uint8(24), []byte{}, true, uint16(15), true)
	f.Add(uint32(0xc0a80000), uint8(20), uint8(26), []byte{}, true, uint16(0), false)
	// The top and bottom of the address space, and a /0 pool.
	f.Add(uint32(0xffff0000), uint8(16), uint8(20), []byte{0, 0, 0xf0, 0, 20, 0, 0, 0, 0, 17}, false, uint16(0), false)
	f.Add(uint32(0xff000000), uint8(8), uint8(12), []byte{0, 0xf0, 0, 0, 12}, true, uint16(15), false)
	f.Add(uint32(0), uint8(0), uint8(8), []byte{0x80, 0, 0, 0, 0}, false, uint16(0), false)
	f.Add(uint32(0), uint8(0), uint8(4), []byte{0, 0, 0, 0, 1, 0x80 | 0xff, 0, 0, 0, 4}, false, uint16(0), false)
	// Unmasked pool and taken addresses, sizes that do not fit.
	f.Add(uint32(0x0a0000ff), uint8(24), uint8(26), []byte{0, 0, 0, 0x45, 26, 0, 0, 0, 0x81, 25}, false, uint16(0), false)
	f.Add(uint32(0x0a000000), uint8(24), uint8(16), []byte{}, false, uint16(0), false)
	f.Add(uint32(0x0a000000), uint8(24), uint8(31), []byte{}, false, uint16(0), false)

	f.Fuzz(func(t *testing.T, base uint32, poolBits, bits uint8, raw []byte, fill bool, fillSkip uint16, descending bool) {
		if poolBits > 32 || bits > 40 {
			return
		}
		pool := netip.PrefixFrom(addr(base), int(poolBits)) // not masked: the walk must mask it
		plo, phi := span(pool)

		got, err := firstFreeSubnet(pool, int(bits), nil)
		if int(bits) < int(poolBits) || bits > 30 {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("pool %s, /%d: got %s %v, want ErrInvalid", pool, bits, got, err)
			}
			return
		}
		if err != nil || got != netip.PrefixFrom(addr(uint32(plo)), int(bits)) {
			t.Fatalf("pool %s, /%d, nothing taken: got %s %v, want the pool's first", pool, bits, got, err)
		}
		if bits-poolBits > 12 {
			return // too many candidates for the brute force
		}
		step := uint64(1) << (32 - bits)
		n := int((phi - plo + 1) / step)

		var taken []netip.Prefix
		for len(raw) >= 5 && len(taken) < 64 {
			a := uint32(raw[0]&0x7f)<<24 | uint32(raw[1])<<16 | uint32(raw[2])<<8 | uint32(raw[3])
			if raw[0]&0x80 == 0 {
				a = uint32(plo) + a // relative to the pool, so that most overlap it
			} else {
				a |= uint32(raw[0]&0x80) << 24
			}
			taken = append(taken, netip.PrefixFrom(addr(a), int(raw[4]%31)))
			raw = raw[5:]
		}
		if fill {
			for i := range n {
				if descending {
					i = n - 1 - i
				}
				if i != int(fillSkip) {
					taken = append(taken, netip.PrefixFrom(addr(uint32(plo+uint64(i)*step)), int(bits)))
				}
			}
		}

		want := -1
		for i := 0; i < n && want < 0; i++ {
			cand := netip.PrefixFrom(addr(uint32(plo+uint64(i)*step)), int(bits))
			free := true
			for _, tk := range taken {
				if spansOverlap(tk, cand) {
					free = false
					break
				}
			}
			if free {
				want = i
			}
		}

		got, err = firstFreeSubnet(pool, int(bits), taken)
		if want < 0 {
			if !errors.Is(err, ErrExhausted) {
				t.Fatalf("pool %s /%d, taken %v: got %s %v, want ErrExhausted", pool, bits, taken, got, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("pool %s /%d, taken %v: %v, but candidate %d is free", pool, bits, taken, err, want)
		}
		lo, hi := span(got)
		switch {
		case got.Bits() != int(bits) || !got.Addr().Is4():
			t.Fatalf("pool %s /%d: got %s of the wrong size", pool, bits, got)
		case got != got.Masked():
			t.Fatalf("pool %s /%d: got %s with host bits", pool, bits, got)
		case lo < plo || hi > phi || !pool.Contains(got.Addr()) || !pool.Overlaps(got):
			t.Fatalf("pool %s /%d: got %s outside the pool", pool, bits, got)
		}
		for _, tk := range taken {
			if spansOverlap(tk, got) || tk.Overlaps(got) {
				t.Fatalf("pool %s /%d: got %s which overlaps taken %s", pool, bits, got, tk)
			}
		}
		if w := netip.PrefixFrom(addr(uint32(plo+uint64(want)*step)), int(bits)); got != w {
			t.Fatalf("pool %s /%d, taken %v: got %s, want the lowest free %s", pool, bits, taken, got, w)
		}
	})
}

// FuzzPickVNI checks pickVNI against a brute force: a VNI it returns is in
// [lo, hi], not taken, and the lowest such; it reports exhaustion exactly
// when every VNI of the range is taken (or the range is empty). The taken
// set is decoded from raw, 2 bytes per VNI as an offset from lo-4 (so some
// fall just outside the range); fill takes the whole range but fillSkip.
// The brute force runs when the range is small; on large ranges the result
// is still checked.
func FuzzPickVNI(f *testing.F) {
	f.Add(uint32(256), uint32(1<<24-1), []byte{}, false, uint16(0))
	f.Add(uint32(256), uint32(1<<24-1), []byte{0, 4, 0, 5, 0, 7}, false, uint16(0))
	f.Add(uint32(10), uint32(10), []byte{0, 4}, false, uint16(0))
	f.Add(uint32(10), uint32(9), []byte{}, false, uint16(0))
	f.Add(uint32(0), uint32(0), []byte{}, true, uint16(1))
	f.Add(uint32(100), uint32(200), []byte{}, true, uint16(100))
	f.Add(uint32(100), uint32(200), []byte{}, true, uint16(101))
	f.Add(uint32(100), uint32(200), []byte{}, true, uint16(0))
	// The top of the range: a loop counter must not wrap around to 0.
	f.Add(uint32(math.MaxUint32-3), uint32(math.MaxUint32), []byte{}, true, uint16(9))
	f.Add(uint32(math.MaxUint32), uint32(math.MaxUint32), []byte{0, 4}, false, uint16(0))
	f.Add(uint32(math.MaxUint32-1), uint32(math.MaxUint32), []byte{0, 4}, false, uint16(0))
	f.Add(uint32(0), uint32(math.MaxUint32), []byte{0, 4, 0, 5}, false, uint16(0))

	f.Fuzz(func(t *testing.T, lo, hi uint32, raw []byte, fill bool, fillSkip uint16) {
		small := lo <= hi && hi-lo < 1<<16
		taken := map[uint32]bool{}
		for ; len(raw) >= 2; raw = raw[2:] {
			taken[lo-4+(uint32(raw[0])<<8|uint32(raw[1]))] = true
		}
		if fill && small {
			for v := uint64(lo); v <= uint64(hi); v++ {
				if v != uint64(lo)+uint64(fillSkip) {
					taken[uint32(v)] = true
				}
			}
		}

		got, err := pickVNI(lo, hi, taken)
		if err == nil {
			if got < lo || got > hi || taken[got] {
				t.Fatalf("[%d, %d]: got %d (taken %v)", lo, hi, got, taken[got])
			}
		} else if !errors.Is(err, ErrExhausted) {
			t.Fatalf("[%d, %d]: error %v is not ErrExhausted", lo, hi, err)
		}
		if !small && lo <= hi {
			// At most len(taken) VNIs are taken, so a range wider than
			// that always has one free.
			if err != nil && uint64(hi)-uint64(lo)+1 > uint64(len(taken)) {
				t.Fatalf("[%d, %d] with %d taken: %v", lo, hi, len(taken), err)
			}
			for v := uint64(lo); err == nil && v < uint64(got); v++ {
				if !taken[uint32(v)] {
					t.Fatalf("[%d, %d]: got %d, but %d is free", lo, hi, got, v)
				}
			}
			return
		}
		want, found := uint32(0), false
		if lo <= hi {
			for v := uint64(lo); v <= uint64(hi); v++ {
				if !taken[uint32(v)] {
					want, found = uint32(v), true
					break
				}
			}
		}
		switch {
		case !found && err == nil:
			t.Fatalf("[%d, %d]: got %d, but every VNI is taken", lo, hi, got)
		case found && err != nil:
			t.Fatalf("[%d, %d]: %v, but %d is free", lo, hi, err, want)
		case found && got != want:
			t.Fatalf("[%d, %d]: got %d, want the lowest free %d", lo, hi, got, want)
		}
	})
}
