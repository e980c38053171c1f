package overlay

import (
	"sync"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/metrics"
)

// maxEvents is how many recent events the agent keeps for --since.
const maxEvents = 1000

// eventLog is the agent's recent history and the streams that follow it.
// Emitting never waits: a reader that falls behind by a buffer's worth is
// cut off (told so with an overflow event) rather than slowing the agent.
type eventLog struct {
	mu   sync.Mutex
	ring []api.Event // oldest first once full, by next
	next int
	subs map[chan api.Event]struct{}
}

// streamBuffer is how far a reader may fall behind.
const streamBuffer = 256

func (l *eventLog) emit(ev api.Event) {
	ev.Time = time.Now().UTC()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.ring) < maxEvents {
		l.ring = append(l.ring, ev)
	} else {
		l.ring[l.next] = ev
		l.next = (l.next + 1) % maxEvents
	}
	for ch := range l.subs {
		select {
		case ch <- ev:
		default:
			delete(l.subs, ch)
			close(ch) // the reader sees the end and says overflow
		}
	}
}

// follow returns the kept events since since, and a channel of those to
// come, closed if the reader falls behind; stop ends it.
func (l *eventLog) follow(since time.Time) (past []api.Event, ch <-chan api.Event, stop func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := range l.ring {
		ev := l.ring[(l.next+i)%len(l.ring)]
		if !ev.Time.Before(since) {
			past = append(past, ev)
		}
	}
	c := make(chan api.Event, streamBuffer)
	if l.subs == nil {
		l.subs = map[chan api.Event]struct{}{}
	}
	l.subs[c] = struct{}{}
	return past, c, func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		if _, ok := l.subs[c]; ok {
			delete(l.subs, c)
			close(c)
		}
	}
}

// repaired counts and tells drift the agent found and repaired.
func (a *Agent) repaired(kind, network, detail string, n int) {
	metrics.Repairs.WithLabelValues(kind).Add(float64(n))
	a.events.emit(api.Event{Kind: "drift_repaired", Network: network, Detail: kind + ": " + detail})
}

// leakRemoved counts and tells a leftover the agent removed.
func (a *Agent) leakRemoved(kind, network, detail string, n int) {
	metrics.LeaksRemoved.WithLabelValues(kind).Add(float64(n))
	a.events.emit(api.Event{Kind: "leak_removed", Network: network, Detail: kind + ": " + detail})
}

// networkName is a network's name by id, for events ("" if unknown).
func (a *Agent) networkName(id string) string {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	for name, n := range a.networks {
		if n.ID == id {
			return name
		}
	}
	return ""
}

// peerEvents tells what changed from one programmed set of a network's
// peers to the next.
func (a *Agent) peerEvents(network string, prev, now peerSet) {
	for ip, p := range prev {
		if q, ok := now[ip]; !ok || q.VTEP != p.VTEP {
			a.events.emit(api.Event{Kind: "peer_removed", Network: network, IP: ip.String(), Detail: "vtep " + p.VTEP.String()})
		}
	}
	for ip, p := range now {
		if q, ok := prev[ip]; !ok || q.VTEP != p.VTEP {
			a.events.emit(api.Event{Kind: "peer_added", Network: network, IP: ip.String(), Detail: "vtep " + p.VTEP.String()})
		}
	}
}
