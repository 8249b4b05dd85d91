package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/crypto/bcrypt"

	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/ingest"
	"github.com/edgegate/edgegate/internal/passwordfile"
)

// demoRegistry writes the shipped demo registry with every documented password hashed again at bcrypt's lowest
// cost: a cost-10 check takes most of a second under -race, and the gateway checks only as many at once as it
// has processors, so on a busy machine the last of the demo devices could still wait for its check when the
// gateway's CONNECT deadline (mqtt.connect_timeout, 5s) closes its connection. Ids, kinds and rooms stay as
// shipped, and devsim finds the passwords by the demo convention "<id>-pw" as before.
func demoRegistry(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "configs", "devices.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	hashLine := regexp.MustCompile(`password_hash: "[^"]+" # (\S+)`)
	var hashErr error
	out := hashLine.ReplaceAllFunc(data, func(line []byte) []byte {
		pw := hashLine.FindSubmatch(line)[1]
		h, err := bcrypt.GenerateFromPassword(pw, bcrypt.MinCost)
		if err != nil {
			hashErr = err
		}
		return fmt.Appendf(nil, "password_hash: %q # %s", h, pw)
	})
	if hashErr != nil {
		t.Fatal(hashErr)
	}
	path := filepath.Join(t.TempDir(), "devices.yaml")
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startGateway runs an in-process gateway on free ports with the given registry and the reference rules.
func startGateway(t *testing.T, registry string) *gateway.Gateway {
	t.Helper()
	cfg := gateway.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.MQTT.Listen = "127.0.0.1:0"
	cfg.HTTP.Listen = "off"
	cfg.Devices.Registry = registry
	cfg.Rules.Dir = filepath.Join("..", "..", "configs", "rules.d")
	// The lights report their state on devices/{id}/state/light, which the built-in mappings leave out.
	cfg.Ingest.Mappings = []ingest.Mapping{{Name: "state", Topic: "devices/{device}/state/{metric}", Type: "state.{metric}"}}
	gw, err := gateway.New(cfg, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- gw.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("gateway: %v", err)
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for !gw.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("gateway not ready within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return gw
}

// The demo registry's sensors and lights against a real gateway with the reference rules: every sensor's
// room.entered reaches the lights of its room as lights.on, the lights acknowledge (QoS 1) and report state.
func TestSensorsTurnLightsOnThroughGateway(t *testing.T) {
	registry := demoRegistry(t)
	gw := startGateway(t, registry)
	var stdout, stderr bytes.Buffer
	jsonPath := filepath.Join(t.TempDir(), "summary.json")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code := runMain(ctx, []string{"--broker", "tcp://" + gw.MQTTAddr("tcp"), "--registry", registry,
		"--rate", "20", "--count", "5", "--duration", "5s", "--linger", "1s", "--json", jsonPath}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("devsim exit %d\n%s\n%s", code, stdout.String(), stderr.String())
	}
	var sum summary
	data, err := os.ReadFile(jsonPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &sum); err != nil {
		t.Fatal(err)
	}
	// Demo registry: kitchen-motion, hall-motion, kitchen-light-1/2, hall-light, thermo-1.
	if sum.Sensors != 2 || sum.Lights != 3 || sum.Thermometers != 1 || sum.Connected != 6 {
		t.Fatalf("devices: %+v", sum)
	}
	// 3 publishers × 5 messages, every one acknowledged after the log made it durable.
	if sum.Sent != 15 || sum.Acked != 15 || sum.PublishErrors != 0 {
		t.Errorf("sent %d acked %d errors %d, want 15 15 0", sum.Sent, sum.Acked, sum.PublishErrors)
	}
	// The rule is debounced per room: each light gets one lights.on however many events its room had.
	if sum.Commands < 3 || sum.StateReports != sum.Commands {
		t.Errorf("commands %d, state reports %d: want ≥ 3, one report per command", sum.Commands, sum.StateReports)
	}
	if sum.CommandLatency.N != sum.Commands || sum.CommandLatency.Max <= 0 || sum.CommandLatency.Max > 5000 {
		t.Errorf("command latency %+v for %d commands", sum.CommandLatency, sum.Commands)
	}
	if !strings.Contains(stdout.String(), "room.entered → lights.on") {
		t.Errorf("summary lacks the latency line:\n%s", stdout.String())
	}
	// The lights' state reports reached the gateway's state view.
	deadline := time.Now().Add(5 * time.Second)
	for _, id := range []string{"kitchen-light-1", "kitchen-light-2", "hall-light"} {
		for {
			m, _ := gw.State().Get(id)
			st, _ := json.Marshal(m)
			if strings.Contains(string(st), "true") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("state of %s: %s", id, st)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// gen-devices writes a registry the devices loader accepts, with hashes the written passwords verify against,
// and devsim runs its devices against a gateway using that registry.
func TestGenDevicesRegistryLoadsAndConnects(t *testing.T) {
	dir := t.TempDir()
	reg := filepath.Join(dir, "reg.yaml")
	var stdout, stderr bytes.Buffer
	if code := runMain(context.Background(), []string{"gen-devices", "8", "--out", reg, "--bcrypt-cost", "4"}, &stdout, &stderr); code != 0 {
		t.Fatalf("gen-devices exit %d: %s", code, stderr.String())
	}
	r, err := devices.LoadRegistry(reg)
	if err != nil {
		t.Fatal(err)
	}
	pw, err := passwordfile.Read(reg + ".passwords")
	if err != nil {
		t.Fatal(err)
	}
	if r.Len() != 8 || len(pw) != 8 {
		t.Fatalf("registry %d devices, %d passwords; want 8", r.Len(), len(pw))
	}
	kinds := map[string]int{}
	rooms := map[string]int{}
	for _, d := range r.All() {
		kinds[d.Kind]++
		rooms[d.Room]++
		if ok, err := devices.VerifyPassword(d.PasswordHash, []byte(pw[d.ID])); !ok || err != nil {
			t.Errorf("%s: password does not verify (%v)", d.ID, err)
		}
		if ok, _ := devices.VerifyPassword(d.PasswordHash, []byte(d.ID+"-pw")); ok {
			t.Errorf("%s: the demo password verifies too", d.ID)
		}
	}
	if kinds[kindSensor] != 2 || kinds[kindLight] != 4 || kinds[kindThermometer] != 2 || len(rooms) != 2 {
		t.Errorf("kinds %v rooms %v", kinds, rooms)
	}

	gw := startGateway(t, reg)
	jsonPath := filepath.Join(dir, "summary.json")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stdout.Reset()
	code := runMain(ctx, []string{"--broker", "tcp://" + gw.MQTTAddr("tcp"), "--registry", reg, "--password-file",
		reg + ".passwords", "--rate", "50", "--count", "3", "--duration", "5s", "--payload-bytes", "100",
		"--json", jsonPath, "--quiet"}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("devsim exit %d\n%s\n%s", code, stdout.String(), stderr.String())
	}
	var sum summary
	data, _ := os.ReadFile(jsonPath)
	if err := json.Unmarshal(data, &sum); err != nil {
		t.Fatal(err)
	}
	if sum.Connected != 8 || sum.Acked != 12 || sum.Commands < 4 {
		t.Errorf("connected %d acked %d commands %d; want 8, 12, ≥ 4\n%s", sum.Connected, sum.Acked, sum.Commands, stdout.String())
	}
	// Without the password file the generated devices are refused.
	code = runMain(ctx, []string{"--broker", "tcp://" + gw.MQTTAddr("tcp"), "--registry", reg, "--count", "1",
		"--duration", "2s", "--quiet", "--connect-timeout", "2s"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "no device could connect") {
		t.Errorf("wrong passwords: exit %d, stderr %s", code, stderr.String())
	}
}

func TestPayloadPadding(t *testing.T) {
	s := &sim{cfg: simConfig{Payload: 100}}
	b := s.telemetryPayload(nil, time.Unix(1, 0), 7, 21.5)
	if len(b) != 100 || !json.Valid(b) {
		t.Errorf("payload %d bytes, valid %t: %s", len(b), json.Valid(b), b)
	}
	b = s.sensorPayload(nil, simDevice{Room: "kitchen"}, time.Unix(0, 42), 1)
	var p struct {
		Room, TS string
	}
	if err := json.Unmarshal(b, &p); err != nil || p.Room != "kitchen" || p.TS != "42" || len(b) != 100 {
		t.Errorf("sensor payload %s (%v)", b, err)
	}
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"--sensors", "1", "--registry", "x.yaml"},
		{"gen-devices"},
		{"gen-devices", "x", "--out", "f"},
		{"--bogus"},
	} {
		var out, errb bytes.Buffer
		if code := runMain(context.Background(), args, &out, &errb); code == 0 {
			t.Errorf("%q: exit 0", args)
		}
	}
}

// Ctrl-C (the context ending) stops a long run early; the summary is still printed and written.
func TestInterruptPrintsSummary(t *testing.T) {
	registry := demoRegistry(t)
	gw := startGateway(t, registry)
	ctx, cancel := context.WithCancel(context.Background())
	jsonPath := filepath.Join(t.TempDir(), "summary.json")
	var stdout, stderr bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- runMain(ctx, []string{"--broker", "tcp://" + gw.MQTTAddr("tcp"), "--registry", registry,
			"--rate", "50", "--duration", "10m", "--json", jsonPath}, &stdout, &stderr)
	}()
	// Interrupt once the gateway has seen the devices publish.
	deadline := time.Now().Add(10 * time.Second)
	for gw.Log().LastSeq() < 20 {
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("no events within 10s\n%s", stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("exit %d: %s", code, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("devsim did not stop within 10s of the interrupt")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("stopping took %s", d)
	}
	var sum summary
	data, err := os.ReadFile(jsonPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &sum); err != nil {
		t.Fatal(err)
	}
	if !sum.Interrupted || sum.Sent == 0 || sum.Acked != sum.Sent || !strings.Contains(stdout.String(), "(interrupted)") {
		t.Errorf("summary after interrupt: %+v\n%s", sum, stdout.String())
	}
}
