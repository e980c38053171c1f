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
	"github.com/vxnet/vxnet/internal/testconsul"
	"github.com/vxnet/vxnet/internal/testnet"
)

// dockerHost is Debian's dockerd 20.10 on one simulated host: in the
// host's network namespace, with a containerd, data and exec root of its
// own, and in a mount namespace of its own where the host's plugin
// directory is bind-mounted on /run/docker/plugins (the only place
// besides /etc/docker/plugins where dockerd looks for plugins).
type dockerHost struct {
	t      *testing.T
	dir    string
	socket string
	cmd    *exec.Cmd
	done   chan struct{}
}

// dockerDir makes a host's Docker directory; its plugins/ is where the
// host's vxnetd serves the plugin (pluginSocket).
func dockerDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vxnet-docker-")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"plugins", "etc", "data", "exec", "run"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func pluginSocket(dir string) string { return filepath.Join(dir, "plugins", "vxnet.sock") }

// startDocker starts dockerd for a host whose agent serves the plugin in
// dir, and imports image as vxtest/busybox.
func startDocker(t *testing.T, host *testnet.Host, dir, image string) *dockerHost {
	t.Helper()
	d := &dockerHost{t: t, dir: dir, socket: filepath.Join(dir, "docker.sock")}
	execRoot := filepath.Join(dir, "exec")
	// dockerd mounts each container's namespace (Join's SandboxKey)
	// under its exec root: shared, it is visible to the agent too.
	for _, args := range [][]string{{"--bind", execRoot, execRoot}, {"--make-shared", execRoot}} {
		if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v: %s", args, err, out)
		}
	}
	for _, p := range []string{"/run/docker/plugins", "/etc/docker"} {
		if _, err := os.Stat(p); os.IsNotExist(err) {
			// The bind mounts need a mount point; made once, left empty.
			os.MkdirAll(p, 0o755)
		}
	}
	script := fmt.Sprintf("mount --bind %s /run/docker/plugins && mount --bind %s /etc/docker && exec dockerd --data-root %s --exec-root %s -H unix://%s --pidfile %s --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs",
		filepath.Join(dir, "plugins"), filepath.Join(dir, "etc"), filepath.Join(dir, "data"), execRoot, d.socket, filepath.Join(dir, "run", "docker.pid"))
	logf, err := os.Create(filepath.Join(dir, "dockerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	d.cmd = exec.Command("nsenter", "--net="+host.Path, "unshare", "--mount", "--propagation", "unchanged", "sh", "-c", script)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d.done = make(chan struct{})
	go func() { d.cmd.Wait(); logf.Close(); close(d.done) }()
	t.Cleanup(d.cleanup)
	eventually(t, 30*time.Second, "dockerd answers", func() error {
		select {
		case <-d.done:
			t.Fatalf("dockerd exited:\n%s", d.logTail())
		default:
		}
		_, err := d.docker("version", "--format", "{{.Server.Version}}")
		return err
	})
	if out, err := d.docker("import", image, "vxtest/busybox"); err != nil {
		t.Fatalf("docker import: %v\n%s", err, out)
	}
	return d
}

func (d *dockerHost) logTail() string {
	data, _ := os.ReadFile(filepath.Join(d.dir, "dockerd.log"))
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	return strings.Join(lines[max(0, len(lines)-20):], "\n")
}

// docker runs Debian's client against the host's daemon.
func (d *dockerHost) docker(args ...string) (string, error) {
	cmd := exec.Command("/usr/bin/docker", args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST=unix://"+d.socket)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func (d *dockerHost) mustDocker(args ...string) string {
	d.t.Helper()
	out, err := d.docker(args...)
	if err != nil {
		d.t.Fatalf("docker %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (d *dockerHost) cleanup() {
	if d.cmd != nil && d.cmd.Process != nil {
		select {
		case <-d.done:
		default:
			if ids, err := d.docker("ps", "-aq"); err == nil && ids != "" {
				d.docker(append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
			}
			d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.done:
			case <-time.After(15 * time.Second):
				d.cmd.Process.Kill()
				<-d.done
			}
		}
	}
	exec.Command("umount", "-R", filepath.Join(d.dir, "exec")).Run()
	os.RemoveAll(d.dir)
}

// dockerCluster is hosts each with a vxnetd serving the Docker plugin
// and a dockerd using it, on one Consul.
type dockerCluster struct {
	*cluster
	dockers []*dockerHost
}

func newDockerCluster(t *testing.T, n int) *dockerCluster {
	t.Helper()
	if out, err := exec.Command("../scripts/install-runtimes.sh").CombinedOutput(); err != nil {
		t.Fatalf("install docker: %v\n%s", err, out)
	}
	image := busyboxImage(t)
	tn := testnet.New(t)
	consul := testconsul.Start(t, testconsul.WithNetNS("/var/run/netns/"+tn.Switch), testconsul.WithAddr(tn.SwitchAddr().String()))
	c := &dockerCluster{cluster: &cluster{net: tn, consul: consul}}
	for i := range n {
		h := tn.AddHost(fmt.Sprintf("h%d", i+1))
		dir := dockerDir(t)
		a := startAgent(t, h, fmt.Sprintf("host%d", i+1), consul.URL("vxnet/"), "--node-ttl", "10s",
			"--docker-plugin-socket", pluginSocket(dir), "--docker-host", "unix://"+filepath.Join(dir, "docker.sock"),
			"--gateway-bridge", fmt.Sprintf("%sg%d", tn.Prefix, i+1), "--chain-prefix", fmt.Sprintf("VXT%d", i+1))
		c.hosts, c.agents = append(c.hosts, h), append(c.agents, a)
		c.dockers = append(c.dockers, startDocker(t, h, dir, image))
	}
	return c
}

func (d *dockerHost) ip(t *testing.T, container, network string) string {
	t.Helper()
	return d.mustDocker("inspect", container, "--format", "{{(index .NetworkSettings.Networks \""+network+"\").IPAddress}}")
}

// The article with Docker: `docker network create -d vxnet` on two hosts
// gives one overlay, containers on it ping each other across hosts,
// another network is isolated from it, a vxnetd restart loses no packet,
// and docker rm and docker network rm leave nothing behind.
func TestDockerArticle(t *testing.T) {
	c := newDockerCluster(t, 2)
	a1 := c.agents[0]
	d1, d2 := c.dockers[0], c.dockers[1]

	// The same command on both hosts: the first creates, the second joins.
	for _, d := range []*dockerHost{d1, d2} {
		d.mustDocker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", "10.44.0.0/24", "net1")
	}
	// Without --subnet, one is chosen; the second host gives the first's.
	d2.mustDocker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "net2")
	sub2 := d2.mustDocker("network", "inspect", "net2", "--format", "{{(index .IPAM.Config 0).Subnet}}")
	d1.mustDocker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", sub2, "net2")
	if ls := d1.mustDocker("network", "ls", "--filter", "driver=vxnet", "--format", "{{.Name}}"); ls != "net1\nnet2" && ls != "net2\nnet1" {
		t.Errorf("docker network ls: %q", ls)
	}

	// --dns: Docker's embedded DNS asks vxnet's (net1's gateway) for
	// what it does not know, the containers of other hosts.
	d1.mustDocker("run", "-d", "--name", "c1", "--net", "net1", "--dns", "10.44.0.1", "vxtest/busybox", "sleep", "600")
	d2.mustDocker("run", "-d", "--name", "c2", "--net", "net1", "vxtest/busybox", "sleep", "600")
	d2.mustDocker("run", "-d", "--name", "c3", "--net", "net2", "vxtest/busybox", "sleep", "600")
	ip1, ip2, ip3 := d1.ip(t, "c1", "net1"), d2.ip(t, "c2", "net1"), d2.ip(t, "c3", "net2")
	if !strings.HasPrefix(ip1, "10.44.0.") || !strings.HasPrefix(ip2, "10.44.0.") || ip1 == ip2 {
		t.Fatalf("addresses from vxnet's IPAM: c1 %s, c2 %s", ip1, ip2)
	}
	var n1 []api.NetworkDetail
	a1.jsonOut(&n1, "network", "inspect", "net1")
	if len(n1) != 1 || n1[0].Subnet != "10.44.0.0/24" || len(n1[0].Endpoints) != 2 {
		t.Errorf("vxnet's net1: %+v", n1)
	}

	// eth0 named and configured by Docker, the MTU the overlay's, and
	// egress by vxnet's gateway interface, not docker_gwbridge.
	addr := d1.mustDocker("exec", "c1", "ip", "addr", "show", "eth0")
	if !strings.Contains(addr, "inet "+ip1+"/24") || !strings.Contains(addr, "mtu 1450") {
		t.Errorf("c1's eth0:\n%s", addr)
	}
	eventually(t, 5*time.Second, "c1's default route through vxnet's gateway bridge", func() error {
		out, _ := d1.docker("exec", "c1", "ip", "route")
		if !strings.Contains(out, "default via 172.") {
			return fmt.Errorf("routes:\n%s", out)
		}
		return nil
	})
	if out, _ := d1.docker("network", "ls", "--format", "{{.Name}}"); strings.Contains(out, "docker_gwbridge") {
		t.Errorf("Docker made a docker_gwbridge:\n%s", out)
	}

	eventually(t, 5*time.Second, "c1 pings c2 across hosts", func() error {
		out, err := d1.docker("exec", "c1", "ping", "-c", "1", "-W", "1", ip2)
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	eventually(t, 5*time.Second, "c1 pings c2 by its container name", func() error {
		out, err := d1.docker("exec", "c1", "ping", "-c", "1", "-W", "1", "c2")
		if err != nil || !strings.Contains(out, ip2) {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	if out, err := d2.docker("exec", "c3", "ping", "-c", "2", "-W", "1", ip1); err == nil {
		t.Errorf("c3 on net2 reaches c1 on net1:\n%s", out)
	}
	if out, err := d1.docker("exec", "c1", "ping", "-c", "2", "-W", "1", ip3); err == nil {
		t.Errorf("c1 on net1 reaches c3 on net2:\n%s", out)
	}

	// Bad input: a clear error, nothing changed.
	if out, err := d1.docker("network", "create", "-d", "vxnet", "badipam"); err == nil || !strings.Contains(out, "--ipam-driver vxnet") {
		t.Errorf("network create with Docker's own IPAM: %v: %s", err, out)
	}
	if out, err := d1.docker("run", "--rm", "--net", "net1", "--ip", ip2, "vxtest/busybox", "true"); err == nil || !strings.Contains(out, "in use") {
		t.Errorf("docker run with c2's address: %v: %s", err, out)
	}
	if out, err := d1.docker("run", "--rm", "--net", "net1", "-p", "80", "vxtest/busybox", "true"); err == nil || !strings.Contains(out, "host port") {
		t.Errorf("docker run -p without a host port: %v: %s", err, out)
	}
	a1.mustVxnet("network", "create", "net3", "--subnet", "10.44.3.0/24")
	d2.mustDocker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", "10.44.9.0/24", "net3")
	if out, err := d2.docker("run", "--rm", "--net", "net3", "vxtest/busybox", "true"); err == nil || !strings.Contains(out, "has subnet 10.44.3.0/24") {
		t.Errorf("docker run on a network whose subnet differs from vxnet's: %v: %s", err, out)
	}
	var eps []api.Endpoint
	a1.jsonOut(&eps, "endpoint", "ls")
	if len(eps) != 3 {
		t.Errorf("endpoints after the refused runs: %+v", eps)
	}

	// A published port reaches the container from another host.
	d1.mustDocker("run", "-d", "--name", "web", "--net", "net1", "-p", "8080:80", "vxtest/busybox",
		"sh", "-c", "echo hello >/index.html && exec busybox httpd -f -p 80 -h /")
	eventually(t, 5*time.Second, "h2 gets c1's page through h1's port 8080", func() error {
		out, err := exec.Command("nsenter", "--net="+c.hosts[1].Path, "curl", "-s", "-m", "1",
			fmt.Sprintf("http://%s:8080/index.html", c.hosts[0].Addr)).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "hello" {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	d1.mustDocker("rm", "-f", "web")

	// vxnetd restarts with the containers running: no packet lost, and
	// Docker's later calls for the endpoints still work.
	sandbox := d1.mustDocker("inspect", "c1", "--format", "{{.NetworkSettings.SandboxKey}}")
	res := pingLossPath(t, sandbox, ip2, 3*time.Second)
	a1.stop(syscall.SIGTERM)
	c.agents[1].stop(syscall.SIGKILL)
	time.Sleep(500 * time.Millisecond)
	a1.start()
	c.agents[1].start()
	if loss := lossOf(t, res); loss != "0" {
		t.Errorf("%s%% of the pings between Docker containers lost across vxnetd restarts", loss)
	}
	d1.mustDocker("network", "disconnect", "net1", "c1")
	d1.mustDocker("network", "connect", "net1", "c1")
	eventually(t, 5*time.Second, "c1 reconnected pings c2", func() error {
		ip := d1.ip(t, "c1", "net1")
		out, err := d1.docker("exec", "c1", "ping", "-c", "1", "-W", "1", ip2)
		if err != nil {
			return fmt.Errorf("c1 at %s: %v: %s", ip, err, out)
		}
		return nil
	})

	// docker rm and docker network rm leave nothing behind.
	d1.mustDocker("rm", "-f", "c1")
	d2.mustDocker("rm", "-f", "c2", "c3")
	for _, d := range []*dockerHost{d1, d2} {
		d.mustDocker("network", "rm", "net1", "net2")
	}
	d2.mustDocker("network", "rm", "net3")
	eventually(t, 10*time.Second, "nothing left after docker rm and docker network rm", func() error {
		var eps []api.Endpoint
		a1.jsonOut(&eps, "endpoint", "ls")
		if len(eps) != 0 {
			return fmt.Errorf("endpoints left: %+v", eps)
		}
		var nets []api.Network
		a1.jsonOut(&nets, "network", "ls")
		if len(nets) != 1 || nets[0].Name != "net3" {
			return fmt.Errorf("networks left: %+v (want net3 only: vxnet's own)", nets)
		}
		for i, a := range c.agents {
			if got := a.overlayNamespaces(); len(got) != 0 {
				return fmt.Errorf("%s keeps overlay namespaces %v", a.node, got)
			}
			if out, _ := exec.Command("nsenter", "--net="+c.hosts[i].Path, "ip", "-br", "link").CombinedOutput(); strings.Contains(string(out), "vxd") || strings.Contains(string(out), "veth") {
				return fmt.Errorf("%s keeps interfaces:\n%s", a.node, out)
			}
		}
		if keys := c.consul.Keys("vxnet/ipam/addrs/"); len(keys) != 0 {
			return fmt.Errorf("addresses left: %v", keys)
		}
		return nil
	})
}

// pingLossPath is pingLoss from a namespace given by its path.
func pingLossPath(t *testing.T, ns, addr string, d time.Duration) chan string {
	count := int(d / (50 * time.Millisecond))
	cmd := exec.Command("nsenter", "--net="+ns, "ping", "-i", "0.05", "-c", fmt.Sprint(count), "-W", "1", addr)
	res := make(chan string, 1)
	go func() {
		out, _ := cmd.CombinedOutput()
		res <- string(out)
	}()
	t.Cleanup(func() { cmd.Process.Kill() })
	return res
}
