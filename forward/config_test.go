package forward

import (
	"bytes"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/goccy/go-yaml"
	"github.com/prometheus/client_golang/prometheus"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// TestConfigGolden decodes every testdata/config/*.yaml strictly (as the gateway does) and compares the
// outcome — the decoding error, or Validate's report, or the configuration with defaults — with its golden file.
func TestConfigGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/config/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no test configurations: %v", err)
	}
	for _, path := range files {
		t.Run(filepath.Base(path), func(t *testing.T) {
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			var cfg Config
			if err := yaml.NewDecoder(bytes.NewReader(data), yaml.Strict()).Decode(&cfg); err != nil {
				fmt.Fprintf(&out, "decode error:\n%s\n", yaml.FormatError(err, false, true))
			} else if err := cfg.Validate(); err != nil {
				fmt.Fprintf(&out, "invalid:\n%s\n", err)
			} else {
				fmt.Fprintln(&out, "valid; with defaults:")
				for _, s := range cfg.Sinks {
					fmt.Fprintf(&out, "%s\n", describe(s.withDefaults()))
				}
			}
			golden := strings.TrimSuffix(path, ".yaml") + ".golden"
			if *update {
				if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -run TestConfigGolden -update ./forward/)", err)
			}
			if out.String() != string(want) {
				t.Errorf("%s differs from %s:\n--- got\n%s--- want\n%s", path, golden, out.String(), want)
			}
		})
	}
}

// describe prints a sink's configuration the way a reader checks it; secrets print as REDACTED.
func describe(s SinkConfig) string {
	var b strings.Builder
	fmt.Fprintf(&b, "- %s (%s) types=%v batch=%d window=%d rate=%g strict_order=%t ack_timeout=%s backoff=%s..%s cursor=%s\n",
		s.Name, s.Type, s.Types, s.BatchSize, s.Window, s.RateLimit, s.StrictOrder, s.AckTimeout, s.BackoffMin, s.BackoffMax,
		CursorName(s.Name))
	for _, lo := range s.lanes() {
		l := s.lane("gw1", lo)
		fmt.Fprintf(&b, "  lane %s cursor=%s", LaneName(s.Name, lo), CursorName(LaneName(s.Name, lo)))
		if l.MQTT != nil {
			fmt.Fprintf(&b, " client_id=%s", l.MQTT.ClientID)
		}
		fmt.Fprintln(&b)
	}
	switch {
	case s.MQTT != nil:
		fmt.Fprintf(&b, "  mqtt %+v", *s.MQTT)
	case s.NATS != nil:
		fmt.Fprintf(&b, "  nats %+v", *s.NATS)
	case s.HTTP != nil:
		fmt.Fprintf(&b, "  http %+v", *s.HTTP)
	}
	return b.String()
}

func TestSecretNeverShown(t *testing.T) {
	s := Secret("hunter2")
	var logged bytes.Buffer
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("x", "password", s, "cfg", MQTTConfig{Password: s})
	for _, shown := range []string{fmt.Sprint(s), fmt.Sprintf("%v %+v %#v %s", s, s, s, s),
		fmt.Sprintf("%+v", MQTTConfig{Password: s}), logged.String()} {
		if strings.Contains(shown, "hunter2") {
			t.Errorf("secret shown: %s", shown)
		}
	}
	if Secret("").String() != "" {
		t.Error("an empty secret should print empty")
	}
	// Decoding keeps the value itself.
	var cfg Config
	if err := yaml.Unmarshal([]byte("sinks: [{name: a, type: mqtt, mqtt: {url: 'tcp://h:1883', password: hunter2}}]"), &cfg); err != nil {
		t.Fatal(err)
	}
	if got := string(cfg.Sinks[0].MQTT.Password); got != "hunter2" {
		t.Errorf("decoded password = %q", got)
	}
}

func TestNew(t *testing.T) {
	log := newMemLog(t)
	dl := &deadLetters{}
	logger := slog.New(slog.DiscardHandler)
	cfg := Config{Sinks: []SinkConfig{
		mqttSink("a", "tcp://127.0.0.1:1"),
		{Name: "b", Type: TypeHTTP, HTTP: &HTTPConfig{URL: "http://127.0.0.1:1/x"}},
	}}
	f, err := New(cfg, "gw1", log, nil, dl, logger, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	if got := f.CursorNames(); len(got) != 2 || got[0] != "sink:a" || got[1] != "sink:b" {
		t.Errorf("CursorNames = %v", got)
	}
	if f.Healthy() {
		t.Error("Healthy before Run")
	}
	if h := f.Health(); len(h) != 2 || h[0].Target != "tcp://127.0.0.1:1" || h[1].Type != TypeHTTP {
		t.Errorf("Health = %+v", h)
	}
	empty, err := New(Config{}, "gw1", log, nil, dl, logger, nil)
	if err != nil || !empty.Healthy() || len(empty.CursorNames()) != 0 {
		t.Errorf("no sinks: %v, healthy %v", err, empty.Healthy())
	}

	bad := []struct {
		name string
		cfg  Config
		gw   string
		want string
	}{
		{"invalid", Config{Sinks: []SinkConfig{{Name: "x", Type: "mqtt"}}}, "gw1", "forward.sinks[0].mqtt: missing"},
		{"no gateway", cfg, "", "empty gateway id"},
		{"missing ca", Config{Sinks: []SinkConfig{{Name: "x", Type: TypeMQTT,
			MQTT: &MQTTConfig{URL: "ssl://h:8883", TLS: TLSConfig{CAFile: filepath.Join(t.TempDir(), "none.pem")}}}}},
			"gw1", "tls.ca_file"},
	}
	for _, tc := range bad {
		_, err := New(tc.cfg, tc.gw, log, nil, dl, logger, prometheus.NewRegistry())
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
	// Metrics are registered once per registry.
	reg := prometheus.NewRegistry()
	if _, err := New(cfg, "gw1", log, nil, dl, logger, reg); err != nil {
		t.Fatal(err)
	}
	if _, err := New(cfg, "gw1", log, nil, dl, logger, reg); err == nil {
		t.Error("a second forwarder on the same registry registered its metrics")
	}
}

// TestBackoff: the wait before reconnect attempt k is drawn uniformly from [backoff_min,
// min(backoff_max, backoff_min·2^k)): the upper bound doubles with each attempt until backoff_max caps it, and
// the waits of one attempt spread over that whole range (full jitter). Each attempt takes 2000 samples: the
// largest misses the top 10% of the range, or the smallest its bottom 10%, by a chance of 0.9^2000 (about
// 1e-92), and the mean lies within 20% of the range's middle by some 30 standard deviations, so these loose
// bounds never flake while a fixed, linear, uncapped or unjittered wait fails them.
func TestBackoff(t *testing.T) {
	const samples = 2000
	lo, hi := 100*time.Millisecond, 2*time.Second
	s := &sink{cfg: SinkConfig{BackoffMin: lo, BackoffMax: hi}}
	prevCeil, prevMax := time.Duration(0), time.Duration(0)
	for attempt := 1; attempt < 80; attempt++ {
		ceil := lo // min(hi, lo·2^attempt), doubling step by step so it cannot overflow
		for range attempt {
			ceil = min(2*ceil, hi)
		}
		span := ceil - lo
		dmin, dmax, sum := time.Duration(math.MaxInt64), time.Duration(0), 0.0
		distinct := map[time.Duration]bool{}
		for range samples {
			d := s.backoff(attempt)
			if d < lo || d >= ceil {
				t.Fatalf("attempt %d: %s outside [%s, %s)", attempt, d, lo, ceil)
			}
			dmin, dmax, sum = min(dmin, d), max(dmax, d), sum+float64(d)
			distinct[d] = true
		}
		if dmax < ceil-span/10 {
			t.Errorf("attempt %d: the longest of %d waits is %s, want close to the bound %s", attempt, samples, dmax, ceil)
		}
		if dmin > lo+span/10 {
			t.Errorf("attempt %d: the shortest of %d waits is %s, want close to backoff_min %s (full jitter)",
				attempt, samples, dmin, lo)
		}
		if mean := time.Duration(sum / samples); mean < lo+span*3/10 || mean > lo+span*7/10 {
			t.Errorf("attempt %d: mean wait %s, want about %s (uniform over [%s, %s))", attempt, mean, lo+span/2, lo, ceil)
		}
		if len(distinct) < samples/2 {
			t.Errorf("attempt %d: only %d distinct waits in %d: no jitter", attempt, len(distinct), samples)
		}
		if ceil > prevCeil && dmax <= prevMax {
			t.Errorf("attempt %d: the longest wait %s did not grow from %s at the attempt before", attempt, dmax, prevMax)
		}
		prevCeil, prevMax = ceil, dmax
	}
	same := &sink{cfg: SinkConfig{BackoffMin: time.Second, BackoffMax: time.Second}}
	if d := same.backoff(3); d != time.Second {
		t.Errorf("min = max: %s", d)
	}
}

// TestValidateWindow: window is bounded, so a mistyped window fails validation instead of the process running out
// of memory when the sink connects (and MQTT out of packet ids).
func TestValidateWindow(t *testing.T) {
	tests := []struct {
		window int
		want   string // "" for valid
	}{
		{0, ""},
		{1, ""},
		{DefaultWindow, ""},
		{MaxWindow, ""},
		{MaxWindow + 1, "forward.sinks[0].window: must be from 0 to 65535, got 65536"},
		{1 << 30, "forward.sinks[0].window: must be from 0 to 65535, got 1073741824"},
		{-1, "forward.sinks[0].window: must be from 0 to 65535, got -1"},
	}
	for _, typ := range []string{TypeMQTT, TypeNATS, TypeHTTP} {
		for _, tc := range tests {
			s := SinkConfig{Name: "s", Type: typ, Window: tc.window}
			switch typ {
			case TypeMQTT:
				s.MQTT = &MQTTConfig{URL: "tcp://127.0.0.1:1883"}
			case TypeNATS:
				s.NATS = &NATSConfig{URL: "nats://127.0.0.1:4222"}
			case TypeHTTP:
				s.HTTP = &HTTPConfig{URL: "http://127.0.0.1:8080/events"}
			}
			err := Config{Sinks: []SinkConfig{s}}.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("%s window %d: %v", typ, tc.window, err)
			case tc.want != "" && (err == nil || err.Error() != tc.want):
				t.Errorf("%s window %d: err = %v, want %q", typ, tc.window, err, tc.want)
			}
		}
	}
}

// TestValidateCommandEcho: an MQTT sink whose events (or batches) could be published on a topic its command
// subscription matches would receive every event it sends back as a command; such a configuration is refused,
// naming both keys, unless commands are off.
func TestValidateCommandEcho(t *testing.T) {
	const echo = "can match the subscription of forward.sinks[0].mqtt.command_topic"
	tests := []struct {
		name    string
		m       MQTTConfig
		wantKey string // "" for valid
	}{
		{"defaults", MQTTConfig{}, ""},
		{"default batch topic", MQTTConfig{Mode: ModeBatch}, ""},
		{"events under the default command topic",
			MQTTConfig{Topic: "edgegate/{gateway}/commands/{subject}/{type}"}, "topic"},
		{"events under the default command topic, commands off",
			MQTTConfig{Topic: "edgegate/{gateway}/commands/{subject}/{type}", DisableCommands: true}, ""},
		{"literal levels where the subscription has +",
			MQTTConfig{Topic: "edgegate/{gateway}/commands/hall/{type}"}, "topic"},
		{"a literal gateway where the subscription has the gateway's id",
			MQTTConfig{Topic: "edgegate/gw1/commands/{subject}/{type}"}, "topic"},
		{"events topic with the default command topic's shape, another word",
			MQTTConfig{Topic: "edgegate/{gateway}/command/{subject}/{type}"}, ""},
		{"one level more", MQTTConfig{Topic: "edgegate/{gateway}/commands/{subject}/{type}/x"}, ""},
		{"one level less", MQTTConfig{Topic: "edgegate/{gateway}/commands/{subject}"}, ""},
		{"custom command topic",
			MQTTConfig{Topic: "site/{subject}/{type}", CommandTopic: "site/{device}/{command}"}, "topic"},
		{"custom command topic, different first level",
			MQTTConfig{Topic: "site/{subject}/{type}", CommandTopic: "cmd/{device}/{command}"}, ""},
		{"a first level that could match, one level less",
			MQTTConfig{Topic: "{type}-x/c/{subject}", CommandTopic: "x-{gateway}/c/{device}/{command}"}, ""},
		{"a field inside a level of each, overlapping text",
			MQTTConfig{Topic: "ab{type}/c/{subject}/{type}", CommandTopic: "{gateway}ba/c/{device}/{command}"}, "topic"},
		{"a field inside a level of each, same depth",
			MQTTConfig{Topic: "{type}-x/c/{subject}/{type}", CommandTopic: "x-{gateway}/c/{device}/{command}"}, "topic"},
		{"a field inside a level of each: no value fits both",
			MQTTConfig{Topic: "a{type}/c/{subject}/{type}", CommandTopic: "b{gateway}/c/{device}/{command}"}, ""},
		{"a field needs at least one character",
			MQTTConfig{Topic: "gw/c/{subject}/{type}", CommandTopic: "gw{sink}/c/{device}/{command}"}, ""},
		{"an empty level matches +",
			MQTTConfig{Topic: "a//x", CommandTopic: "a/{device}/{command}"}, "topic"},
		{"batches under the command topic",
			MQTTConfig{Mode: ModeBatch, BatchTopic: "edgegate/{gateway}/commands/all/{sink}"}, "batch_topic"},
		{"batches elsewhere: the event topic is not used",
			MQTTConfig{Mode: ModeBatch, Topic: "edgegate/{gateway}/commands/{subject}/{type}"}, ""},
		{"batches under the command topic, commands off",
			MQTTConfig{Mode: ModeBatch, BatchTopic: "edgegate/{gateway}/commands/all/{sink}", DisableCommands: true}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := tc.m
			m.URL = "tcp://127.0.0.1:1883"
			err := Config{Sinks: []SinkConfig{{Name: "cloud", Type: TypeMQTT, MQTT: &m}}}.Validate()
			if tc.wantKey == "" {
				if err != nil {
					t.Fatalf("err = %v, want valid", err)
				}
				return
			}
			if err == nil {
				t.Fatal("valid, want an error")
			}
			if want := "forward.sinks[0].mqtt." + tc.wantKey + ": "; !strings.HasPrefix(err.Error(), want) ||
				!strings.Contains(err.Error(), echo) || !strings.Contains(err.Error(), "disable_commands") ||
				strings.Contains(err.Error(), "\n") {
				t.Errorf("err = %v, want one error starting %q and naming command_topic", err, want)
			}
		})
	}
}
