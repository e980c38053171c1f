package kvstore

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
)

// Options carries what a store URL cannot: credentials and defaults.
type Options struct {
	Token         string
	CAFile        string
	CertFile      string
	KeyFile       string
	TLSServerName string
	// DefaultFile is the embedded store's file when the URL is empty.
	DefaultFile string
}

// Open opens a store from a URL:
//
//	consul://HOST:PORT[/PREFIX]   Consul over HTTP (HTTPS with TLS options or CONSUL_HTTP_SSL=true)
//	consuls://HOST:PORT[/PREFIX]  Consul over HTTPS
//	file:///PATH                  the embedded single-host store
//	""                            the embedded store at opts.DefaultFile
//
// Unset token and TLS options are taken from the environment variables
// Consul's own tools read (CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...).
func Open(rawURL string, opts Options) (Store, error) {
	if rawURL == "" {
		if opts.DefaultFile == "" {
			return nil, fmt.Errorf("no store URL and no default file")
		}
		return NewBolt(opts.DefaultFile)
	}
	cfg, path, err := ParseURL(rawURL, opts)
	if err != nil {
		return nil, err
	}
	if path != "" {
		return NewBolt(path)
	}
	return NewConsul(cfg)
}

// ParseURL checks a store URL and returns either a Consul configuration or
// the embedded store's path.
func ParseURL(rawURL string, opts Options) (ConsulConfig, string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return ConsulConfig{}, "", fmt.Errorf("store URL %q: %w", rawURL, err)
	}
	switch u.Scheme {
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return ConsulConfig{}, "", fmt.Errorf("store URL %q: a file URL has no host; write file:///absolute/path", rawURL)
		}
		if !strings.HasPrefix(u.Path, "/") || strings.HasSuffix(u.Path, "/") {
			return ConsulConfig{}, "", fmt.Errorf("store URL %q: needs an absolute file path", rawURL)
		}
		return ConsulConfig{}, u.Path, nil
	case "consul", "consuls":
	default:
		return ConsulConfig{}, "", fmt.Errorf("store URL %q: scheme must be consul://, consuls:// or file://", rawURL)
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil || host == "" || port == "" {
		return ConsulConfig{}, "", fmt.Errorf("store URL %q: want consul://HOST:PORT[/PREFIX]", rawURL)
	}
	if u.User != nil || u.RawQuery != "" {
		return ConsulConfig{}, "", fmt.Errorf("store URL %q: credentials and options go in flags or CONSUL_* variables, not the URL", rawURL)
	}
	prefix := strings.Trim(u.Path, "/")
	if prefix == "" {
		prefix = "vxnet"
	}
	env := func(v, name string) string {
		if v != "" {
			return v
		}
		return os.Getenv(name)
	}
	cfg := ConsulConfig{
		Address:       u.Host,
		Prefix:        prefix + "/",
		Token:         env(opts.Token, "CONSUL_HTTP_TOKEN"),
		CAFile:        env(opts.CAFile, "CONSUL_CACERT"),
		CertFile:      env(opts.CertFile, "CONSUL_CLIENT_CERT"),
		KeyFile:       env(opts.KeyFile, "CONSUL_CLIENT_KEY"),
		TLSServerName: env(opts.TLSServerName, "CONSUL_TLS_SERVER_NAME"),
		Scheme:        "http",
	}
	if u.Scheme == "consuls" || cfg.CAFile != "" || cfg.CertFile != "" || strings.EqualFold(os.Getenv("CONSUL_HTTP_SSL"), "true") {
		cfg.Scheme = "https"
	}
	return cfg, "", nil
}
