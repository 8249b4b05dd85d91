package forward

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
)

// tlsConfig loads the TLS material of c. It returns nil when nothing is configured (the client's defaults:
// the system roots verify the server).
func tlsConfig(c TLSConfig, log *slog.Logger) (*tls.Config, error) {
	if c == (TLSConfig{}) {
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.ServerName}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("tls.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls.ca_file: %s: no PEM certificates", c.CAFile)
		}
		tc.RootCAs = pool
	}
	if c.CertFile != "" {
		cc := &clientCert{certFile: c.CertFile, keyFile: c.KeyFile, log: log}
		if err := cc.load(); err != nil {
			return nil, fmt.Errorf("tls.cert_file/key_file: %w", err)
		}
		tc.GetClientCertificate = cc.get
	}
	if c.InsecureSkipVerify {
		tc.InsecureSkipVerify = true
		log.Warn("TLS server verification is off (tls.insecure_skip_verify): the upstream's identity is not checked")
	}
	return tc, nil
}

// clientCert is the client certificate of a sink. Each TLS handshake checks whether its files changed (a renewal)
// and loads them again; if they do not load (say, the certificate is renewed but the key not yet), the previous
// certificate is used and the next handshake tries again.
type clientCert struct {
	certFile, keyFile string
	log               *slog.Logger

	mu    sync.Mutex
	cert  *tls.Certificate
	stamp string // size and modification time of both files when cert was loaded
}

func (c *clientCert) load() error {
	stamp := filesStamp(c.certFile, c.keyFile)
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return err
	}
	c.cert, c.stamp = &cert, stamp
	return nil
}

func (c *clientCert) get(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if filesStamp(c.certFile, c.keyFile) != c.stamp {
		if err := c.load(); err != nil {
			c.log.Warn("the changed client certificate does not load; the previous one is used", "cert_file",
				c.certFile, "key_file", c.keyFile, "error", err)
		} else {
			c.log.Info("client certificate loaded again", "cert_file", c.certFile)
		}
	}
	return c.cert, nil
}

// filesStamp identifies the contents of files by their sizes and modification times.
func filesStamp(paths ...string) string {
	var b strings.Builder
	for _, p := range paths {
		if fi, err := os.Stat(p); err == nil {
			fmt.Fprintf(&b, "%d/%d;", fi.Size(), fi.ModTime().UnixNano())
		} else {
			b.WriteString("-;")
		}
	}
	return b.String()
}
