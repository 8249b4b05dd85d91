package forward

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
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
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("tls.cert_file/key_file: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	if c.InsecureSkipVerify {
		tc.InsecureSkipVerify = true
		log.Warn("TLS server verification is off (tls.insecure_skip_verify): the upstream's identity is not checked")
	}
	return tc, nil
}
