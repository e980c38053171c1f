package overlay

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vxnet/vxnet/internal/atomicfile"
	"github.com/vxnet/vxnet/internal/netnsutil"
)

// Phases of a local endpoint. The record is written before every step that
// changes the kernel or the store, so that after a crash the agent knows
// whether to finish or to undo what it was doing.
const (
	phaseAttaching = "attaching"
	phaseAttached  = "attached"
	phaseDetaching = "detaching"
)

// localEndpoint is this host's own record of an endpoint, kept in the state
// dir. Together with the store it is the desired state; it alone is enough to
// rebuild the endpoint's datapath when the store is unreachable.
type localEndpoint struct {
	Phase    string   `json:"phase"`
	Endpoint Endpoint `json:"endpoint"`
	// Network as it was when attached: enough to rebuild the namespace
	// without the store.
	Net     Network `json:"net"`
	Netns   string  `json:"netns"`
	NetnsID nsID    `json:"netns_id"`
	MTU     int     `json:"mtu"`
	// ReplaceDefault: the attach asked for the container's own default
	// route to be replaced by the gateway's (restored at detach).
	ReplaceDefault bool `json:"replace_default,omitempty"`
	// Handoff is the name the container side was made under in the
	// agent's own namespace, for a runtime to move into its container
	// (Docker's Join); Netns is then where the runtime said it went, and
	// NetnsID is zero until the agent has seen it there.
	Handoff string `json:"handoff,omitempty"`
}

// pending reports whether the endpoint's interface was handed to a
// runtime and not yet seen in its container.
func (l *localEndpoint) pending() bool { return l.Handoff != "" && l.NetnsID == (nsID{}) }

type nsID = netnsutil.ID

func (l *localEndpoint) key() string { return l.Endpoint.Network + "/" + l.Endpoint.Name }

func (l *localEndpoint) addrPrefix() netip.Prefix {
	return netip.PrefixFrom(l.Endpoint.IP, l.Net.Subnet.Bits())
}

// stateDir stores one JSON file per local endpoint.
type stateDir struct{ dir string }

func (s stateDir) path(network, name string) string {
	return filepath.Join(s.dir, "endpoints", network, name+".json")
}

// save writes atomically: a crash leaves the old or the new record, never a
// torn one.
func (s stateDir) save(l *localEndpoint) error {
	data, err := json.MarshalIndent(l, "", "  ")
	if err != nil {
		return err
	}
	p := s.path(l.Endpoint.Network, l.Endpoint.Name)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("save endpoint state: %w", err)
	}
	if err := atomicfile.Write(p, data, 0o600); err != nil {
		return fmt.Errorf("save endpoint state: %w", err)
	}
	return nil
}

func (s stateDir) remove(network, name string) error {
	p := s.path(network, name)
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove endpoint state: %w", err)
	}
	// Drop the network's directory once empty; failure just means not empty.
	os.Remove(filepath.Dir(p))
	return nil
}

// load reads every record; unreadable ones are reported and skipped so that
// one bad file cannot stop the agent. gaps names the networks with an
// unreadable record ("" when even that is unknown): what the agent finds
// of them in the kernel or the store may be that record's, so it must not
// be taken for a leak.
func (s stateDir) load() (out map[string]*localEndpoint, errs []error, gaps map[string]bool) {
	out, gaps = map[string]*localEndpoint{}, map[string]bool{}
	root := filepath.Join(s.dir, "endpoints")
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			gaps[""] = true
			return err
		}
		if d.IsDir() {
			return nil
		}
		if strings.HasSuffix(p, ".tmp") || atomicfile.IsTemp(p) {
			os.Remove(p) // a crash during a save
			return nil
		}
		if !strings.HasSuffix(p, ".json") {
			return nil
		}
		network := filepath.Base(filepath.Dir(p))
		data, err := os.ReadFile(p)
		if err != nil {
			errs = append(errs, err)
			gaps[network] = true
			return nil
		}
		var l localEndpoint
		if err := json.Unmarshal(data, &l); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p, err))
			gaps[network] = true
			return nil
		}
		if err := l.Endpoint.check(); err != nil && l.Phase == phaseAttached {
			errs = append(errs, fmt.Errorf("%s: %w", p, err))
			gaps[network] = true
			return nil
		}
		out[l.key()] = &l
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	return out, errs, gaps
}
