package test

import (
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// neighWatch records when neighbor and FDB entries appear on and vanish
// from one host's VXLAN device, from netlink events rather than polling, so
// that a convergence figure is not bounded below by a poll interval.
type neighWatch struct {
	vx   int // ifindex of vxlan1 in the overlay namespace
	nsh  netns.NsHandle
	h    *netlink.Handle
	done chan struct{}
	wg   sync.WaitGroup

	mu       sync.Mutex
	neighAdd map[string]time.Time // IP -> first time seen added
	neighDel map[string]time.Time
	fdbAdd   map[string]time.Time // MAC -> first time seen added
	fdbDel   map[string]time.Time
	lost     error // a netlink error: some events may be missing
}

// watchNeighbors subscribes to the neighbor events of vxlan1 in the
// overlay namespace at path.
func watchNeighbors(path string) (*neighWatch, error) {
	nsh, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		nsh.Close()
		return nil, fmt.Errorf("netlink handle in %s: %w", path, err)
	}
	l, err := h.LinkByName("vxlan1")
	if err != nil {
		h.Close()
		nsh.Close()
		return nil, fmt.Errorf("vxlan1 in %s: %w", path, err)
	}
	w := &neighWatch{vx: l.Attrs().Index, nsh: nsh, h: h, done: make(chan struct{}),
		neighAdd: map[string]time.Time{}, neighDel: map[string]time.Time{},
		fdbAdd: map[string]time.Time{}, fdbDel: map[string]time.Time{}}
	ch := make(chan netlink.NeighUpdate, 4096)
	err = netlink.NeighSubscribeWithOptions(ch, w.done, netlink.NeighSubscribeOptions{
		Namespace:              &nsh,
		ReceiveBufferSize:      8 << 20,
		ReceiveBufferForceSize: true,
		ErrorCallback: func(err error) {
			w.mu.Lock()
			w.lost = err
			w.mu.Unlock()
		},
	})
	if err != nil {
		h.Close()
		nsh.Close()
		return nil, fmt.Errorf("subscribe in %s: %w", path, err)
	}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for u := range ch {
			w.record(u, time.Now())
		}
	}()
	return w, nil
}

func (w *neighWatch) record(u netlink.NeighUpdate, at time.Time) {
	if u.LinkIndex != w.vx {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	var m map[string]time.Time
	var key string
	switch {
	case u.Family == unix.AF_INET && u.IP != nil:
		key = u.IP.String()
		m = w.neighAdd
		if u.Type == unix.RTM_DELNEIGH {
			m = w.neighDel
		}
	case u.Family == unix.AF_BRIDGE && u.HardwareAddr != nil:
		key = u.HardwareAddr.String()
		m = w.fdbAdd
		if u.Type == unix.RTM_DELNEIGH {
			m = w.fdbDel
		}
	default:
		return
	}
	if _, ok := m[key]; !ok {
		m[key] = at
	}
}

// reset forgets what was seen, before a new phase.
func (w *neighWatch) reset() {
	w.mu.Lock()
	defer w.mu.Unlock()
	clear(w.neighAdd)
	clear(w.neighDel)
	clear(w.fdbAdd)
	clear(w.fdbDel)
}

// added returns when both the neighbor entry for ip and the FDB entry for
// mac had appeared, or false if one has not.
func (w *neighWatch) added(ip, mac string) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return latest(w.neighAdd, ip, w.fdbAdd, mac)
}

// removed is added's counterpart for removal.
func (w *neighWatch) removed(ip, mac string) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return latest(w.neighDel, ip, w.fdbDel, mac)
}

func latest(a map[string]time.Time, ka string, b map[string]time.Time, kb string) (time.Time, bool) {
	ta, ok1 := a[ka]
	tb, ok2 := b[kb]
	if !ok1 || !ok2 {
		return time.Time{}, false
	}
	if tb.After(ta) {
		return tb, true
	}
	return ta, true
}

// counts reads the device's tables now: permanent neighbor entries and
// FDB entries with a remote destination.
func (w *neighWatch) counts() (neigh, fdb int, err error) {
	ns, err := w.h.NeighList(w.vx, unix.AF_INET)
	if err != nil {
		return 0, 0, err
	}
	for _, n := range ns {
		if n.State&netlink.NUD_PERMANENT != 0 {
			neigh++
		}
	}
	fs, err := w.h.NeighList(w.vx, unix.AF_BRIDGE)
	if err != nil {
		return 0, 0, err
	}
	for _, f := range fs {
		if f.IP != nil && !isZero(f.HardwareAddr) {
			fdb++
		}
	}
	return neigh, fdb, nil
}

// flush deletes every neighbor and FDB entry of the device, as a host
// that lost its tables would have none.
func (w *neighWatch) flush() error {
	for _, fam := range []int{unix.AF_INET, unix.AF_BRIDGE} {
		ns, err := w.h.NeighList(w.vx, fam)
		if err != nil {
			return err
		}
		for _, n := range ns {
			if fam == unix.AF_BRIDGE && (n.IP == nil || isZero(n.HardwareAddr)) {
				continue
			}
			if err := w.h.NeighDel(&n); err != nil {
				return fmt.Errorf("delete %v: %w", n, err)
			}
		}
	}
	return nil
}

func isZero(mac net.HardwareAddr) bool {
	for _, b := range mac {
		if b != 0 {
			return false
		}
	}
	return true
}

func (w *neighWatch) close() {
	close(w.done)
	w.h.Close()
	w.nsh.Close()
}
