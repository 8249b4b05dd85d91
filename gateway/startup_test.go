package gateway_test

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/ingest"
	"github.com/edgegate/edgegate/rules"
)

// newExpectError calls gateway.New and returns its error, failing the test if New succeeds.
func newExpectError(t *testing.T, cfg gateway.Config) error {
	t.Helper()
	gw, err := gateway.New(cfg, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err == nil {
		_ = gw // a gateway that is never run holds its files until the test binary exits
		t.Fatal("gateway.New succeeded, want an error")
	}
	return err
}

// freePort returns a loopback address that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// occupied returns a loopback address some other listener holds for the rest of the test.
func occupied(t *testing.T) (addr, port string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	_, port, _ = net.SplitHostPort(ln.Addr().String())
	return ln.Addr().String(), port
}

func TestStartupErrors(t *testing.T) {
	t.Parallel()

	t.Run("mqtt port in use", func(t *testing.T) {
		t.Parallel()
		cfg := testConfig(t)
		addr, port := occupied(t)
		cfg.MQTT.Listen = addr
		err := newExpectError(t, cfg)
		if !errors.Is(err, ingest.ErrAddrInUse) {
			t.Errorf("error %v, want errors.Is ingest.ErrAddrInUse", err)
		}
		mustContain(t, "the error", err.Error(), "mqtt.listen", "port "+port)
		// Everything New opened was closed again: the same data dir opens and runs.
		cfg.MQTT.Listen = "127.0.0.1:0"
		runGateway(t, cfg).stop()
	})

	t.Run("http port in use", func(t *testing.T) {
		t.Parallel()
		cfg := testConfig(t)
		addr, port := occupied(t)
		cfg.HTTP.Listen = addr
		cfg.MQTT.Listen = freePort(t)
		err := newExpectError(t, cfg)
		mustContain(t, "the error", err.Error(), "http.listen", "port "+port)
		// The MQTT port New had bound is free again.
		ln, err := net.Listen("tcp", cfg.MQTT.Listen)
		if err != nil {
			t.Fatalf("after a failed New the MQTT port %s is still held: %v", cfg.MQTT.Listen, err)
		}
		ln.Close()
	})

	t.Run("invalid rules", func(t *testing.T) {
		t.Parallel()
		cfg := testConfig(t)
		writeRules(t, cfg.Rules.Dir, "a.yaml", "rules:\n  - name: one\n    on: room.entered\n    debounce: soon\n"+
			"    actions: [{command: {device: hall-light, command: lights.on}}]\n")
		writeRules(t, cfg.Rules.Dir, "b.yaml", "rules:\n  - name: two\n    on: room.entered\n"+
			"    actions: [{command: {device: no-such-device, command: lights.on}}]\n")
		err := newExpectError(t, cfg)
		if !errors.Is(err, rules.ErrInvalidRules) {
			t.Errorf("error %v, want errors.Is rules.ErrInvalidRules", err)
		}
		var le *rules.LoadError
		if !errors.As(err, &le) || len(le.Problems) != 2 {
			t.Fatalf("error %v, want a *rules.LoadError with both problems", err)
		}
		mustContain(t, "the error", err.Error(), "a.yaml:4", "debounce", "b.yaml:4", "no-such-device")
		// Nothing is left open: the same data dir opens once the rules are fixed.
		if err := os.Remove(filepath.Join(cfg.Rules.Dir, "a.yaml")); err != nil {
			t.Fatal(err)
		}
		writeRules(t, cfg.Rules.Dir, "b.yaml", "rules: []\n")
		runGateway(t, cfg).stop()
	})

	t.Run("unknown config key", func(t *testing.T) {
		t.Parallel()
		_, err := gateway.ParseConfig("edgegate.yaml", []byte("id: gw1\nmqtt:\n  listen: \":1883\"\n  lisen: \":1884\"\n"))
		if err == nil {
			t.Fatal("ParseConfig accepted an unknown key")
		}
		mustContain(t, "the error", err.Error(), "edgegate.yaml", "[4:3]", `unknown field "lisen"`)
	})

	t.Run("validate lists every problem", func(t *testing.T) {
		t.Parallel()
		path := filepath.Join(t.TempDir(), "bad.yaml")
		yaml := strings.Join([]string{
			"id: 'not an id'",
			"shutdown_timeout: -1s",
			"stall_timeout: 0s",
			"log: {level: loud, format: xml}",
			"http: {listen: nowhere}",
			"devices: {registry: " + filepath.Join(t.TempDir(), "missing.yaml") + "}",
			"mqtt: {listen: 'x', publish_rate: 0, command_topic: 'cmd/{device}'}",
			"buffer: {max_bytes: -5}",
			"rules: {dir: /nonexistent/rules.d, command_retries: -2}",
		}, "\n")
		if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := gateway.LoadConfig(path)
		if err != nil {
			t.Fatalf("LoadConfig: %v", err)
		}
		err = cfg.Validate()
		if err == nil {
			t.Fatal("Validate accepted a config with 13 problems")
		}
		keys := []string{"id:", "shutdown_timeout:", "stall_timeout:", "log.level:", "log.format:", "http.listen:", "devices.registry:",
			"mqtt.listen:", "mqtt.publish_rate:", "mqtt.command_topic:", "buffer.max_bytes:", "rules.dir:",
			"rules.command_retries:"}
		mustContain(t, "the Validate error", err.Error(), keys...)
		if n := len(strings.Split(err.Error(), "\n")); n < len(keys) {
			t.Errorf("Validate reported %d lines for %d problems:\n%v", n, len(keys), err)
		}
		// New refuses the same config with the same report, before touching anything.
		cfg.DataDir = filepath.Join(t.TempDir(), "data")
		if nerr := newExpectError(t, cfg); nerr.Error() != err.Error() {
			t.Errorf("New error differs from Validate:\n%v\nvs\n%v", nerr, err)
		}
		if _, serr := os.Stat(cfg.DataDir); !errors.Is(serr, os.ErrNotExist) {
			t.Errorf("New with an invalid config created the data dir (%v)", serr)
		}
	})

	t.Run("data dir in use", func(t *testing.T) {
		t.Parallel()
		gw := startGateway(t, nil)
		cfg := gw.Cfg
		done := make(chan error, 1)
		go func() { done <- newExpectErrorQuiet(cfg) }()
		select {
		case err := <-done:
			if err == nil {
				t.Fatal("a second gateway opened a data dir another one is using")
			}
			mustContain(t, "the error", err.Error(), "already running")
		case <-time.After(20 * time.Second):
			t.Fatal("a second gateway on the same data dir hangs instead of failing")
		}
	})
}

// newExpectErrorQuiet is New for use off the test goroutine; it returns an error also when New succeeds.
func newExpectErrorQuiet(cfg gateway.Config) error {
	cfg.MQTT.Listen, cfg.HTTP.Listen = "127.0.0.1:0", "127.0.0.1:0"
	_, err := gateway.New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	if err == nil {
		return nil
	}
	return fmt.Errorf("second gateway: %w", err)
}
