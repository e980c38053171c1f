package overlay

import (
	"slices"
	"strings"
	"testing"
)

func TestParsePublish(t *testing.T) {
	got, err := parsePublish([]string{"8080:80", "53:5353/udp", "8443:443/tcp", "8080:81/udp", "4789:80/tcp"}, 4789)
	if err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, p := range got {
		s = append(s, p.String())
	}
	if want := []string{"8080:80/tcp", "53:5353/udp", "8443:443/tcp", "8080:81/udp", "4789:80/tcp"}; !slices.Equal(s, want) {
		t.Fatalf("parsePublish = %q, want %q", s, want)
	}
	for spec, why := range map[string]string{
		"80":          "no ':'",
		":80":         "host port",
		"80:":         "container port",
		"0:80":        "host port",
		"65536:80":    "host port",
		"80:70000":    "container port",
		"80:80/sctp":  "protocol",
		"80:80/":      "protocol",
		"a:80":        "host port",
		"80:80/tcp/x": "protocol",
		"4789:80/udp": "VXLAN port",
	} {
		if _, err := parsePublish([]string{spec}, 4789); err == nil || !strings.Contains(err.Error(), why) || !strings.Contains(err.Error(), spec) {
			t.Errorf("parsePublish(%q) = %v, want an error naming %q and the spec", spec, err, why)
		}
	}
	if _, err := parsePublish([]string{"80:80", "80:81/tcp"}, 4789); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("a host port twice: %v", err)
	}
}
