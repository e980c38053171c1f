package overlay

import (
	"log/slog"
	"time"
)

// steps times the steps of one operation, for a debug line that says
// where an attach's time goes (store round trips, fsyncs, netlink).
type steps struct {
	last  time.Time
	attrs []any
}

func newSteps() *steps { return &steps{last: time.Now()} }

// mark ends the step called name.
func (s *steps) mark(name string) {
	now := time.Now()
	s.attrs = append(s.attrs, slog.Duration(name, now.Sub(s.last)))
	s.last = now
}
