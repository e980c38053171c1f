package test

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vxnet/vxnet/api"
)

// The CLI's Docker habits: -q, --format and --filter on listings, inspect
// and rm by id prefix, endpoint inspect, network prune, JSON for every
// command and for errors, completion of names through the agent.
func TestCLIDockerHabits(t *testing.T) {
	c := newCluster(t, 1)
	a := c.agents[0]
	var na, nb api.Network
	a.jsonOut(&na, "network", "create", "alpha", "--subnet", "10.36.0.0/24")
	a.jsonOut(&nb, "network", "create", "beta", "--subnet", "10.37.0.0/24")
	a.mustVxnet("attach", "alpha", c.net.AddNS("c1"), "--name", "web")

	if out := a.mustVxnet("network", "ls", "-q"); strings.Count(strings.TrimSpace(out), "\n") != 1 || !strings.Contains(out, na.ID) {
		t.Errorf("network ls -q:\n%s", out)
	}
	if out := a.mustVxnet("network", "ls", "--filter", "name=alp", "--format", "{{.Name}} {{.Subnet}}"); strings.TrimSpace(out) != "alpha 10.36.0.0/24" {
		t.Errorf("network ls --filter --format: %q", out)
	}
	if out, err := a.vxnet("network", "ls", "--filter", "color=red"); err == nil || !strings.Contains(out, "unknown key") {
		t.Errorf("an unknown filter: %v %s", err, out)
	}
	if out := a.mustVxnet("endpoint", "ls", "-q", "--filter", "node=host1"); strings.TrimSpace(out) != "web" {
		t.Errorf("endpoint ls -q --filter node=: %q", out)
	}
	var eps []api.Endpoint
	a.jsonOut(&eps, "endpoint", "inspect", "alpha/web")
	if len(eps) != 1 || eps[0].Name != "web" || eps[0].IP == "" {
		t.Errorf("endpoint inspect: %+v", eps)
	}
	if out, err := a.vxnet("endpoint", "inspect", "nope"); err == nil || !strings.Contains(out, `endpoint "nope" not found`) {
		t.Errorf("endpoint inspect nope: %v %s", err, out)
	}
	var ds []api.NetworkDetail
	a.jsonOut(&ds, "network", "inspect", na.ID[:6])
	if len(ds) != 1 || ds[0].Name != "alpha" || len(ds[0].Endpoints) != 1 {
		t.Errorf("inspect by id prefix: %+v", ds)
	}

	// Errors are JSON with -o json, with the API's code.
	cmd := exec.Command(filepath.Join(binDir, "vxnet"), "-H", "unix://"+a.socket, "-o", "json", "network", "inspect", "ghost")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil {
		t.Error("inspect ghost succeeded")
	}
	var e api.Error
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &e); err != nil || e.Message == "" {
		t.Errorf("-o json error: %v: %q", err, stderr.String())
	}
	var v map[string]string
	a.jsonOut(&v, "version")
	if v["client"] == "" || v["agent"] == "" {
		t.Errorf("version -o json: %v", v)
	}

	// Completion asks the agent.
	if out := a.mustVxnet("__complete", "network", "rm", ""); !strings.Contains(out, "alpha") || !strings.Contains(out, "beta") {
		t.Errorf("completion of network rm:\n%s", out)
	}
	if out := a.mustVxnet("__complete", "detach", "alpha", ""); !strings.Contains(out, "web") {
		t.Errorf("completion of detach:\n%s", out)
	}

	// prune takes beta (no endpoints), not alpha; rm takes an id prefix.
	var pruned []string
	a.jsonOut(&pruned, "network", "prune", "-f")
	if len(pruned) != 1 || pruned[0] != "beta" {
		t.Errorf("prune: %v", pruned)
	}
	var det map[string]string
	a.jsonOut(&det, "detach", "alpha", "web")
	if det["detached"] != "true" {
		t.Errorf("detach -o json: %v", det)
	}
	if out := a.mustVxnet("network", "rm", na.ID[:8]); strings.TrimSpace(out) != "alpha" {
		t.Errorf("rm by id prefix: %q", out)
	}
	if out := a.mustVxnet("network", "ls", "-q"); strings.TrimSpace(out) != "" {
		t.Errorf("networks left: %q", out)
	}
}
