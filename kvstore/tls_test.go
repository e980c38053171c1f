package kvstore_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vxnet/vxnet/internal/testconsul"
	"github.com/vxnet/vxnet/kvstore"
)

// writeCerts makes a throwaway CA and a server certificate for 127.0.0.1.
func writeCerts(t *testing.T) (ca, cert, key string) {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vxnet test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "server.dc1.consul"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"server.dc1.consul", "localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		KeyUsage:    x509.KeyUsageDigitalSignature,
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(srvKey)
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return write("ca.pem", "CERTIFICATE", caDER), write("server.pem", "CERTIFICATE", srvDER), write("server-key.pem", "EC PRIVATE KEY", keyDER)
}

// TLS with a self-signed CA and an ACL token, against a real Consul.
func TestConsulTLSAndACL(t *testing.T) {
	t.Parallel()
	ca, cert, key := writeCerts(t)
	const token = "0f8e2a4c-vxnet-test-token"
	srv := testconsul.Start(t, testconsul.WithTLS(ca, cert, key), testconsul.WithACL(token))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	url := "consuls://" + srv.HTTPSAddr() + "/secure"
	s, err := kvstore.Open(url, kvstore.Options{CAFile: ca, Token: token})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Put(ctx, "k", []byte("v")); err != nil {
		t.Fatalf("put over TLS with a token: %v", err)
	}
	if kv, err := s.Get(ctx, "k"); err != nil || string(kv.Value) != "v" {
		t.Fatalf("get over TLS: %v", err)
	}

	// No token: refused, and said so (not mistaken for an outage).
	anon, _ := kvstore.Open(url, kvstore.Options{CAFile: ca})
	_, err = anon.Get(ctx, "k")
	if !errors.Is(err, kvstore.ErrForbidden) || strings.Contains(err.Error(), token) {
		t.Errorf("get without a token: %v", err)
	}
	// A wrong CA: the server is not trusted.
	otherCA, _, _ := writeCerts(t)
	untrusted, _ := kvstore.Open(url, kvstore.Options{CAFile: otherCA, Token: token})
	if _, err := untrusted.Get(ctx, "k"); err == nil || strings.Contains(err.Error(), token) {
		t.Errorf("get with the wrong CA: %v", err)
	}
}
