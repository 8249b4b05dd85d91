package ingest

import (
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"strings"
	"time"
)

// BrokerConfig configures the embedded MQTT broker (YAML key `mqtt`).
type BrokerConfig struct {
	// Listen is the plain MQTT (TCP) listener address. Default ":1883". "off" disables it.
	Listen string `yaml:"listen"`
	// WebSocket is the MQTT-over-WebSocket listener address, e.g. ":8083". Empty (the default) or "off" disables it.
	WebSocket string `yaml:"websocket"`
	// TLS configures the MQTT-over-TLS listener.
	TLS TLSConfig `yaml:"tls"`
	// AllowAnonymous opens the broker to clients without credentials (development only). An anonymous client
	// acts as the device named by its client id and gets that device's ACL. A warning is logged at start.
	AllowAnonymous bool `yaml:"allow_anonymous"`
	// MaxPacketBytes is the largest MQTT packet accepted; a larger one is refused from its fixed header, before
	// its body is read. Default 256 KiB.
	MaxPacketBytes int `yaml:"max_packet_bytes"`
	// ConnectTimeout is how long a new connection may take to complete its CONNECT (and TLS handshake).
	// Default 5s.
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
	// MaxConnections caps open connections in total. Default 10000.
	MaxConnections int `yaml:"max_connections"`
	// MaxConnectionsPerIP caps open connections from one source address. Default 1000.
	MaxConnectionsPerIP int `yaml:"max_connections_per_ip"`
	// MaxConnectionsPerDevice caps the open connections of one device (client ids "{device}" and
	// "{device}:{suffix}"), so that one device's credentials cannot take the broker's connections. A connection
	// that takes over a session of the device (the same client id) replaces one and is not refused. Default 16.
	MaxConnectionsPerDevice int `yaml:"max_connections_per_device"`
	// PublishRate is the sustained number of messages per second one device may publish. Default 100.
	PublishRate float64 `yaml:"publish_rate"`
	// PublishBurst is the token bucket size of PublishRate. Default 200.
	PublishBurst int `yaml:"publish_burst"`
	// CommandTopic is the template of the topic the gateway publishes device commands to.
	// Default "devices/{device}/commands/{command}".
	CommandTopic string `yaml:"command_topic"`
	// CommandTimeout is how long a command waits for the device's PUBACK. Default 5s.
	CommandTimeout time.Duration `yaml:"command_timeout"`
	// SessionExpiry bounds how long the broker keeps the session of a disconnected persistent client.
	// Default 24h.
	SessionExpiry time.Duration `yaml:"session_expiry"`
}

// TLSConfig configures the TLS listener. It is enabled when Listen is set to an address.
type TLSConfig struct {
	Listen   string `yaml:"listen"`    // e.g. ":8883"; empty (the default) or "off" disables it
	CertFile string `yaml:"cert_file"` // server certificate (PEM)
	KeyFile  string `yaml:"key_file"`  // server key (PEM)
	// ClientCAFile holds the CAs that sign device certificates. With it, a device may authenticate by its
	// certificate: the certificate's common name is looked up in the registry (cert_cn).
	ClientCAFile string `yaml:"client_ca_file"`
	// RequireClientCert refuses TLS clients that present no valid certificate.
	RequireClientCert bool `yaml:"require_client_cert"`
}

// DefaultBrokerConfig returns the defaults documented on BrokerConfig.
func DefaultBrokerConfig() BrokerConfig {
	return BrokerConfig{
		Listen:                  ":1883",
		MaxPacketBytes:          256 << 10,
		ConnectTimeout:          5 * time.Second,
		MaxConnections:          10000,
		MaxConnectionsPerIP:     1000,
		MaxConnectionsPerDevice: 16,
		PublishRate:             100,
		PublishBurst:            200,
		CommandTopic:            "devices/{device}/commands/{command}",
		CommandTimeout:          5 * time.Second,
		SessionExpiry:           24 * time.Hour,
	}
}

// listenerOff reports whether a listener address (mqtt.listen, mqtt.websocket, mqtt.tls.listen) disables its
// listener: it is empty or "off".
func listenerOff(addr string) bool {
	return addr == "" || addr == "off"
}

// Validate reports every problem of the configuration, each naming its key.
func (c BrokerConfig) Validate() error {
	var errs []error
	addr := func(key, v string) {
		if listenerOff(v) {
			return
		}
		if _, _, err := net.SplitHostPort(v); err != nil {
			errs = append(errs, fmt.Errorf("%s: %q is not host:port (e.g. \":1883\" or \"127.0.0.1:1883\")", key, v))
		}
	}
	addr("mqtt.listen", c.Listen)
	addr("mqtt.websocket", c.WebSocket)
	addr("mqtt.tls.listen", c.TLS.Listen)
	if listenerOff(c.Listen) && listenerOff(c.WebSocket) && listenerOff(c.TLS.Listen) {
		errs = append(errs, errors.New("mqtt: no listener enabled (set mqtt.listen, mqtt.websocket or mqtt.tls.listen)"))
	}
	if !listenerOff(c.TLS.Listen) {
		if c.TLS.CertFile == "" {
			errs = append(errs, errors.New("mqtt.tls.cert_file: required when mqtt.tls.listen is set"))
		}
		if c.TLS.KeyFile == "" {
			errs = append(errs, errors.New("mqtt.tls.key_file: required when mqtt.tls.listen is set"))
		}
		for key, f := range map[string]string{"mqtt.tls.cert_file": c.TLS.CertFile, "mqtt.tls.key_file": c.TLS.KeyFile, "mqtt.tls.client_ca_file": c.TLS.ClientCAFile} {
			if f == "" {
				continue
			}
			if _, err := os.Stat(f); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", key, err))
			}
		}
		if c.TLS.RequireClientCert && c.TLS.ClientCAFile == "" {
			errs = append(errs, errors.New("mqtt.tls.require_client_cert: needs mqtt.tls.client_ca_file"))
		}
	}
	if c.MaxPacketBytes < 64 || c.MaxPacketBytes > 256<<20 {
		errs = append(errs, fmt.Errorf("mqtt.max_packet_bytes: must be between 64 and 268435456, got %d", c.MaxPacketBytes))
	}
	if c.ConnectTimeout <= 0 {
		errs = append(errs, fmt.Errorf("mqtt.connect_timeout: must be > 0, got %s", c.ConnectTimeout))
	}
	if c.MaxConnections <= 0 {
		errs = append(errs, fmt.Errorf("mqtt.max_connections: must be > 0, got %d", c.MaxConnections))
	}
	if c.MaxConnectionsPerIP <= 0 {
		errs = append(errs, fmt.Errorf("mqtt.max_connections_per_ip: must be > 0, got %d", c.MaxConnectionsPerIP))
	}
	if c.MaxConnectionsPerDevice <= 0 {
		errs = append(errs, fmt.Errorf("mqtt.max_connections_per_device: must be > 0, got %d", c.MaxConnectionsPerDevice))
	}
	if !(c.PublishRate > 0) || math.IsInf(c.PublishRate, 1) { // NaN fails the comparison
		errs = append(errs, fmt.Errorf("mqtt.publish_rate: must be a finite number > 0, got %g", c.PublishRate))
	}
	if c.PublishBurst <= 0 {
		errs = append(errs, fmt.Errorf("mqtt.publish_burst: must be > 0, got %d", c.PublishBurst))
	}
	if !strings.Contains(c.CommandTopic, "{device}") || !strings.Contains(c.CommandTopic, "{command}") {
		errs = append(errs, fmt.Errorf("mqtt.command_topic: %q must contain {device} and {command}", c.CommandTopic))
	}
	if c.CommandTimeout <= 0 {
		errs = append(errs, fmt.Errorf("mqtt.command_timeout: must be > 0, got %s", c.CommandTimeout))
	}
	if c.SessionExpiry <= 0 {
		errs = append(errs, fmt.Errorf("mqtt.session_expiry: must be > 0, got %s", c.SessionExpiry))
	}
	return errors.Join(errs...)
}
