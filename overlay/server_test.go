package overlay

import (
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testnet"
	"github.com/vxnet/vxnet/kvstore"
)

// testAgent is an agent on an embedded store, never run: enough to serve
// the API's validation and store paths without a kernel datapath.
func testAgent(t testing.TB) *Agent {
	testnet.RequireRoot(t)
	dir := t.TempDir()
	store, err := kvstore.NewBolt(filepath.Join(dir, "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	a, err := New(Config{
		Node: "n1", Advertise: netip.MustParseAddr("192.0.2.1"), StateDir: dir, NetNSDir: filepath.Join(dir, "netns"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}, store)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func do(h http.Handler, method, path, body string) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	r, err := http.NewRequest(method, "http://vxnetd"+path, strings.NewReader(body))
	if err != nil {
		w.Code = 400 // no client could send it
		w.WriteString(`{"error":"unsendable","code":"invalid"}`)
		return w
	}
	h.ServeHTTP(w, r)
	return w
}

// Malformed requests get a 4xx with a JSON error that says what is wrong.
func TestAPIRefusesMalformedRequests(t *testing.T) {
	h := testAgent(t).Handler()
	cases := []struct{ method, path, body, want string }{
		{"POST", "/v1/networks", `{`, "malformed"},
		{"POST", "/v1/networks", `{"name":"a","subnett":"10.0.0.0/24"}`, "subnett"},
		{"POST", "/v1/networks", `{"name":"a"} {"name":"b"}`, "more than one"},
		{"POST", "/v1/networks", `{"name":""}`, "empty"},
		{"POST", "/v1/networks", `{"name":"a","subnet":"10.0.0.0/33"}`, "10.0.0.0/33"},
		{"POST", "/v1/networks", `{"name":"a","gateway":"10.0.0.1"}`, "--gateway needs --subnet"},
		{"POST", "/v1/networks", `{"name":"a","vni":"x"}`, "malformed"},
		{"POST", "/v1/networks/a%2Fb/endpoints", `{"netns":"x"}`, "network name"},
		{"POST", "/v1/networks/nope/endpoints", `{"netns":"x"}`, "not found"},
		{"DELETE", "/v1/networks/nope", ``, "not found"},
		{"GET", "/v1/nothing", ``, "no route"},
		{"DELETE", "/v1/nodes/n1", ``, "this node"},
	}
	for _, c := range cases {
		w := do(h, c.method, c.path, c.body)
		var e api.Error
		if w.Code < 400 || w.Code >= 500 || json.Unmarshal(w.Body.Bytes(), &e) != nil || !strings.Contains(e.Message, c.want) {
			t.Errorf("%s %s %s: %d %s (want 4xx mentioning %q)", c.method, c.path, c.body, w.Code, w.Body, c.want)
		}
	}
	// And the valid request still works afterwards.
	if w := do(h, "POST", "/v1/networks", `{"name":"ok","subnet":"10.9.0.0/24"}`); w.Code != http.StatusCreated {
		t.Errorf("create after refusals: %d %s", w.Code, w.Body)
	}
}

// FuzzAPI feeds arbitrary bodies to the mutating routes: the agent answers
// every one with a status and a JSON body, never a panic or a 500.
func FuzzAPI(f *testing.F) {
	f.Add("/v1/networks", `{"name":"n","subnet":"10.1.0.0/24","vni":300,"mtu":1400}`)
	f.Add("/v1/networks", `{"name":"n","internal":true}`)
	f.Add("/v1/networks/n/endpoints", `{"netns":"/proc/self/ns/net","ip":"10.1.0.9"}`)
	f.Add("/v1/networks", `[]`)
	a := testAgent(f)
	h := a.Handler()
	f.Fuzz(func(t *testing.T, path, body string) {
		if !strings.HasPrefix(path, "/v1/networks") || strings.ContainsAny(path, "?#%") {
			return
		}
		w := do(h, "POST", path, body)
		if w.Code >= 500 {
			t.Fatalf("POST %s %q: %d %s", path, body, w.Code, w.Body)
		}
		if w.Code >= 400 {
			var e api.Error
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Message == "" {
				t.Fatalf("POST %s %q: error body %q", path, body, w.Body)
			}
		}
	})
}

// A body over the limit is refused with 413 and a JSON error that names
// the limit, before the agent does anything with it; a body under the
// limit is decoded as usual. Neither needs the store: decoding fails
// first.
func TestAPIRefusesOversizedBody(t *testing.T) {
	h := (&Agent{log: slog.New(slog.DiscardHandler)}).Handler()
	big := `{"name":"` + strings.Repeat("a", maxBody) + `"}`
	for _, path := range []string{"/v1/networks", "/v1/networks/n/endpoints"} {
		w := do(h, "POST", path, big)
		var e api.Error
		if w.Code != http.StatusRequestEntityTooLarge || json.Unmarshal(w.Body.Bytes(), &e) != nil ||
			e.Code != api.CodeInvalid || !strings.Contains(e.Message, "65536 bytes") {
			t.Errorf("POST %s with %d bytes: %d %s, want 413 naming the 65536-byte limit", path, len(big), w.Code, w.Body)
		}
	}
	// Just under the limit, the body is read whole and judged on its
	// content (here an unknown field): 400, not 413.
	under := `{"x":"` + strings.Repeat("a", maxBody-16) + `"}`
	w := do(h, "POST", "/v1/networks", under)
	var e api.Error
	if w.Code != http.StatusBadRequest || json.Unmarshal(w.Body.Bytes(), &e) != nil || !strings.Contains(e.Message, `unknown field "x"`) {
		t.Errorf("POST with %d bytes: %d %s, want 400 for the unknown field", len(under), w.Code, w.Body)
	}
}

// decodeBody itself tells a body over the limit from a malformed one, and
// keeps the cause for errors.As.
func TestDecodeBodyLimit(t *testing.T) {
	w := httptest.NewRecorder()
	r := httptest.NewRequest("POST", "/v1/networks", strings.NewReader(strings.Repeat(" ", maxBody+1)+"{}"))
	var v api.CreateNetworkRequest
	err := decodeBody(w, r, &v)
	var tooLarge *http.MaxBytesError
	if !errors.As(err, &tooLarge) || tooLarge.Limit != maxBody || ErrorCode(err) != api.CodeInvalid {
		t.Fatalf("decodeBody over the limit: %v (code %s)", err, ErrorCode(err))
	}
	r = httptest.NewRequest("POST", "/v1/networks", strings.NewReader(strings.Repeat(" ", maxBody-2)+"{}"))
	if err := decodeBody(httptest.NewRecorder(), r, &v); err != nil {
		t.Fatalf("decodeBody at the limit: %v", err)
	}
}
