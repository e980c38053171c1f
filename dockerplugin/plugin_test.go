package dockerplugin

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
)

// The protocol's edges that need no agent: what the plugin says it is,
// and the bad input it refuses before asking anyone.
func TestActivateAndRefusals(t *testing.T) {
	p := New(context.Background(), nil, nil, slog.New(slog.NewTextHandler(io.Discard, nil)), "")
	srv := httptest.NewServer(p.Handler())
	defer srv.Close()
	call := func(path, body string) (int, map[string]any) {
		t.Helper()
		resp, err := http.Post(srv.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out map[string]any
		json.NewDecoder(resp.Body).Decode(&out)
		return resp.StatusCode, out
	}
	if _, out := call("/Plugin.Activate", ""); !slices.Equal(toStrings(out["Implements"]), []string{"NetworkDriver", "IpamDriver"}) {
		t.Errorf("Activate: %v", out)
	}
	if _, out := call("/NetworkDriver.GetCapabilities", "{}"); out["Scope"] != "local" {
		t.Errorf("capabilities: %v", out)
	}
	for _, c := range []struct{ path, body, want string }{
		{"/NetworkDriver.CreateNetwork", `{"NetworkID":"abc","IPv4Data":[{"AddressSpace":"LocalDefault","Pool":"10.1.0.0/24"}]}`, "--ipam-driver vxnet"},
		{"/NetworkDriver.CreateNetwork", `{"NetworkID":"abc","IPv4Data":[{"AddressSpace":"vxnet","Pool":"10.1.0.0/24"}],"IPv6Data":[{"Pool":"fd00::/64"}]}`, "IPv4 only"},
		{"/NetworkDriver.CreateNetwork", `{"NetworkID":"abc","IPv4Data":[{"AddressSpace":"vxnet"}],"Options":{"com.docker.network.generic":{"color":"red"}}}`, "unknown option"},
		{"/NetworkDriver.AllocateNetwork", `{"NetworkID":"abc"}`, "swarm"},
		{"/IpamDriver.RequestPool", `{"AddressSpace":"vxnet","V6":true}`, "IPv4 only"},
		{"/IpamDriver.RequestPool", `{"AddressSpace":"vxnet","Pool":"10.1.0.0/24","SubPool":"10.1.0.0/25"}`, "--ip-range"},
		{"/IpamDriver.RequestPool", `{"AddressSpace":"vxnet","Pool":"10.1.0.1/24"}`, "network address"},
		{"/NetworkDriver.CreateEndpoint", `{"NetworkID":"abc","EndpointID":"0123456789abcdef","Interface":{}}`, "no address"},
	} {
		code, out := call(c.path, c.body)
		if msg, _ := out["Err"].(string); code != http.StatusInternalServerError || !strings.Contains(msg, c.want) {
			t.Errorf("%s %s: %d %v, want an error saying %q", c.path, c.body, code, out, c.want)
		}
	}
}

func toStrings(v any) []string {
	var out []string
	l, _ := v.([]any)
	for _, s := range l {
		str, _ := s.(string)
		out = append(out, str)
	}
	return out
}

func TestPublishSpecs(t *testing.T) {
	var pm any
	json.Unmarshal([]byte(`[{"Proto":6,"Port":80,"HostPort":8080,"HostPortEnd":8080},{"Proto":17,"Port":53,"HostIP":"0.0.0.0","HostPort":5353}]`), &pm)
	got, err := publishSpecs(pm)
	if err != nil || !slices.Equal(got, []string{"8080:80/tcp", "5353:53/udp"}) {
		t.Errorf("got %v, %v", got, err)
	}
	for body, want := range map[string]string{
		`[{"Proto":6,"Port":80}]`:                                   "host port",
		`[{"Proto":6,"Port":80,"HostIP":"10.0.0.1","HostPort":80}]`: "all of the host's addresses",
		`[{"Proto":132,"Port":80,"HostPort":80}]`:                   "tcp and udp",
		`[{"Proto":6,"Port":80,"HostPort":80,"HostPortEnd":81}]`:    "one host port",
	} {
		var v any
		json.Unmarshal([]byte(body), &v)
		if _, err := publishSpecs(v); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", body, err, want)
		}
	}
}

func TestNames(t *testing.T) {
	ep, err := endpointName("0123456789ABCDEF0123")
	if err != nil || ep != "0123456789ab" || len(handoffName(ep)) > 15 {
		t.Errorf("%q %q %v", ep, handoffName(ep), err)
	}
	if _, err := endpointName("short"); err == nil {
		t.Error("a short endpoint id is taken")
	}
}
