package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
)

// podmanHost is podman on one simulated host: run inside the host's
// network namespace, with storage, configuration and CNI networks of its
// own, the vxnet-cni plugin and the network's configuration naming the
// host's agent.
type podmanHost struct {
	t    *testing.T
	host string // the host's netns path
	dir  string
	env  []string
}

// busyboxImage is a root file system with Debian's static busybox: an
// image made offline.
func busyboxImage(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	root := filepath.Join(dir, "rootfs", "bin")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"sh", "sleep", "ip", "ping", "cat"} {
		if err := os.Symlink("busybox", filepath.Join(root, c)); err != nil {
			t.Fatal(err)
		}
	}
	tar := filepath.Join(dir, "busybox.tar")
	if out, err := exec.Command("tar", "-C", filepath.Join(dir, "rootfs"), "-cf", tar, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, out)
	}
	return tar
}

func newPodmanHost(t *testing.T, a *agent, image, cniName, network string) *podmanHost {
	t.Helper()
	dir, err := os.MkdirTemp("", "vxnet-podman-")
	if err != nil {
		t.Fatal(err)
	}
	p := &podmanHost{t: t, host: a.host.Path, dir: dir}
	for _, d := range []string{"cni", "plugins"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	conf := fmt.Sprintf(`[network]
network_backend = "cni"
network_config_dir = %q
cni_plugin_dirs = [%q, "/usr/lib/cni"]
[containers]
# This VM's bounding set lacks CAP_SYS_RESOURCE: podman's default limits fail.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
# crun refuses a hybrid cgroup layout; runc takes it.
runtime = "runc"
`, filepath.Join(dir, "cni"), binDir)
	if err := os.WriteFile(filepath.Join(dir, "containers.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	list := fmt.Sprintf(`{"cniVersion":"1.0.0","name":%q,"plugins":[{"type":"vxnet-cni","network":%q,"socket":%q}]}`, cniName, network, a.socket)
	if err := os.WriteFile(filepath.Join(dir, "cni", cniName+".conflist"), []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	p.env = append(os.Environ(), "CONTAINERS_CONF="+filepath.Join(dir, "containers.conf"))
	t.Cleanup(func() {
		p.podman("rm", "-f", "-a", "-t", "0")
		p.podman("system", "reset", "-f")
		exec.Command("umount", "-R", filepath.Join(dir, "root")).Run()
		os.RemoveAll(dir)
		// libcni's cache of this network's results, outside our dirs.
		matches, _ := filepath.Glob("/var/lib/cni/results/" + cniName + "-*")
		for _, m := range matches {
			os.Remove(m)
		}
		os.Remove("/var/lib/cni/results") // if empty: made by podman for us
		os.Remove("/var/lib/cni")
	})
	if out, err := p.podman("import", image, "vxtest/busybox"); err != nil {
		t.Fatalf("podman import: %v\n%s", err, out)
	}
	return p
}

// podman runs podman inside the host's network namespace with its own
// storage and configuration.
func (p *podmanHost) podman(args ...string) (string, error) {
	full := append([]string{"--net=" + p.host, "podman", "--root", filepath.Join(p.dir, "root"), "--runroot", filepath.Join(p.dir, "run"),
		"--tmpdir", filepath.Join(p.dir, "tmp")}, args...)
	cmd := exec.Command("nsenter", full...)
	cmd.Env = p.env
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// With podman 4.3 and its CNI backend as the runtime: `podman run
// --network` gives containers on two hosts addresses from vxnet on one
// overlay, they ping each other, and `podman rm` leaves nothing behind.
func TestPodmanWithCNI(t *testing.T) {
	if out, err := exec.Command("../scripts/install-runtimes.sh").CombinedOutput(); err != nil {
		t.Fatalf("install podman: %v\n%s", err, out)
	}
	image := busyboxImage(t)
	c := newCluster(t, 2)
	a1, a2 := c.agents[0], c.agents[1]
	a1.mustVxnet("network", "create", "pn", "--subnet", "10.33.0.0/24")
	cniName := c.net.Prefix + "-net1" // unique: libcni keeps a cache by name in /var/lib/cni
	p1, p2 := newPodmanHost(t, a1, image, cniName, "pn"), newPodmanHost(t, a2, image, cniName, "pn")

	ips := map[string]string{}
	for name, p := range map[string]*podmanHost{"pc1": p1, "pc2": p2} {
		if out, err := p.podman("run", "-d", "--name", name, "--network", cniName, "vxtest/busybox", "sleep", "600"); err != nil {
			t.Fatalf("podman run %s: %v\n%s", name, err, out)
		}
		out, err := p.podman("inspect", name, "--format", "{{(index .NetworkSettings.Networks \""+cniName+"\").IPAddress}}")
		if err != nil || !strings.HasPrefix(out, "10.33.0.") {
			t.Fatalf("podman inspect %s: %v: %q", name, err, out)
		}
		ips[name] = out
	}
	eventually(t, 5*time.Second, "pc1 pings pc2 across hosts", func() error {
		out, err := p1.podman("exec", "pc1", "ping", "-c", "1", "-W", "1", ips["pc2"])
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	var eps []api.Endpoint
	a1.jsonOut(&eps, "endpoint", "ls", "--network", "pn")
	if len(eps) != 2 {
		t.Errorf("vxnet sees %d endpoints of podman's containers, want 2: %+v", len(eps), eps)
	}

	// vxnetd restarts on both hosts with the containers running: no
	// packet lost.
	sandbox, err := p1.podman("inspect", "pc1", "--format", "{{.NetworkSettings.SandboxKey}}")
	if err != nil || !strings.HasPrefix(sandbox, "/run/netns/") {
		t.Fatalf("pc1's sandbox: %v: %q", err, sandbox)
	}
	res, _ := pingLoss(t, filepath.Base(sandbox), ips["pc2"], 3*time.Second)
	a1.stop(syscall.SIGTERM)
	a2.stop(syscall.SIGKILL)
	time.Sleep(500 * time.Millisecond)
	a1.start()
	a2.start()
	if loss := lossOf(t, res); loss != "0" {
		t.Errorf("%s%% of the pings between podman containers lost across vxnetd restarts", loss)
	}

	for name, p := range map[string]*podmanHost{"pc1": p1, "pc2": p2} {
		if out, err := p.podman("rm", "-f", "-t", "0", name); err != nil {
			t.Errorf("podman rm %s: %v\n%s", name, err, out)
		}
	}
	eventually(t, 10*time.Second, "nothing left after podman rm", func() error {
		var eps []api.Endpoint
		a1.jsonOut(&eps, "endpoint", "ls")
		if len(eps) != 0 {
			return fmt.Errorf("endpoints left: %+v", eps)
		}
		for _, a := range []*agent{a1, a2} {
			if got := a.overlayNamespaces(); len(got) != 0 {
				return fmt.Errorf("%s keeps overlay namespaces %v", a.node, got)
			}
		}
		if keys := c.consul.Keys("vxnet/ipam/addrs/"); len(keys) != 0 {
			return fmt.Errorf("addresses left: %v", keys)
		}
		return nil
	})
}
