package gateway_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/gateway"
)

// TestParseConfigWithoutKeys checks that a file holding no key at all is the defaults: every key is optional.
func TestParseConfigWithoutKeys(t *testing.T) {
	for name, src := range map[string]string{
		"empty":              "",
		"blank":              "\n  \n",
		"comments only":      "# edgegate configuration\n# every key is optional\n",
		"document start":     "---\n",
		"start and comments": "---\n# nothing set yet\n",
		"start and end":      "# c\n---\n...\n",
	} {
		t.Run(name, func(t *testing.T) {
			cfg, err := gateway.ParseConfig("edgegate.yaml", []byte(src))
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			def := gateway.DefaultConfig()
			if cfg.ID != def.ID || cfg.DataDir != def.DataDir || cfg.MQTT.Listen != def.MQTT.Listen ||
				cfg.HTTP.Listen != def.HTTP.Listen || cfg.Buffer.MaxBytes != def.Buffer.MaxBytes {
				t.Errorf("ParseConfig = %+v, want the defaults", cfg)
			}
		})
	}
	// Keys after comments count.
	cfg, err := gateway.ParseConfig("edgegate.yaml", []byte("# c\n---\nid: gw-7\n"))
	if err != nil || cfg.ID != "gw-7" {
		t.Fatalf("ParseConfig = %q, %v; want id gw-7", cfg.ID, err)
	}
	// Keys the decoder does not reach are not quietly replaced by the defaults.
	if cfg, err := gateway.ParseConfig("edgegate.yaml", []byte("---\n---\nid: gw-8\n")); err == nil && cfg.ID != "gw-8" {
		t.Fatalf("ParseConfig = id %q, nil: the key id was dropped without an error", cfg.ID)
	}
}

// TestParseConfigErrorHidesSecrets checks that a YAML mistake is reported by its line, column and message, without
// quoting the file: a password on a neighbouring line must not reach the log.
func TestParseConfigErrorHidesSecrets(t *testing.T) {
	const secret = "s3cr3t-Upstream-pw"
	sink := "forward:\n  sinks:\n    - name: cloud\n      type: mqtt\n      mqtt:\n        url: tcp://127.0.0.1:1884\n" +
		"        username: gw\n"
	cases := []struct {
		name, src string
		want      []string
	}{
		{"unknown key after the password", sink + "        password: " + secret + " # never logged\n        topik: x\n",
			[]string{"[9:9]", `unknown field "topik"`}},
		{"bad indentation after the password", sink + "        password: " + secret + "\n       retain: true\n",
			[]string{"[9:"}},
		{"unterminated quote", sink + "        password: \"" + secret + "\n        topic: x\n", []string{"[8:"}},
		{"duplicate key", sink + "        password: " + secret + "\n        password: " + secret + "2\n",
			[]string{"[9:9]", `"password" already defined`}},
		{"bearer token before a bad type", "forward:\n  sinks:\n    - name: h\n      type: http\n      http:\n" +
			"        bearer_token: " + secret + "\n        batch_size: many\n", []string{"[7:"}},
		{"header value before a list", "forward:\n  sinks:\n    - name: h\n      type: http\n      http:\n" +
			"        headers:\n          X-Api-Key: " + secret + "\n          - a\n", []string{"[8:"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "edgegate.yaml")
			if err := os.WriteFile(path, []byte(c.src), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := gateway.LoadConfig(path)
			if err == nil {
				t.Fatal("LoadConfig accepted a broken file")
			}
			msg := err.Error()
			if strings.Contains(msg, secret) {
				t.Errorf("the error quotes the secret:\n%s", msg)
			}
			for _, w := range append([]string{path}, c.want...) {
				if !strings.Contains(msg, w) {
					t.Errorf("the error does not say %q:\n%s", w, msg)
				}
			}
		})
	}
}

// TestListenersOff checks that what check-config accepts also runs: "off" disables the WebSocket and TLS listeners
// (as the README documents), and turning every listener off is refused.
func TestListenersOff(t *testing.T) {
	cfg, err := gateway.ParseConfig("edgegate.yaml", []byte("mqtt:\n  websocket: off\n  tls:\n    listen: off\n"))
	if err != nil {
		t.Fatal(err)
	}
	tg := startGateway(t, func(c *gateway.Config) { c.MQTT.WebSocket, c.MQTT.TLS = cfg.MQTT.WebSocket, cfg.MQTT.TLS })
	if tg.MQTTAddr("tcp") == "" || tg.MQTTAddr("ws") != "" || tg.MQTTAddr("tls") != "" {
		t.Errorf("listeners tcp=%q ws=%q tls=%q, want only tcp", tg.MQTTAddr("tcp"), tg.MQTTAddr("ws"), tg.MQTTAddr("tls"))
	}

	none := testConfig(t)
	none.MQTT.Listen, none.MQTT.WebSocket, none.MQTT.TLS.Listen = "off", "off", "off"
	if err := none.Validate(); err == nil || !strings.Contains(err.Error(), "no listener enabled") {
		t.Errorf("Validate with every listener off: %v, want \"no listener enabled\"", err)
	}
}

// TestValidateKnowsTheGatewayID: the configuration's check (check-config, and the start) derives the sinks' client
// ids with the gateway's id, so a client_id equal to another sink's derived one is refused there, not only later.
func TestValidateKnowsTheGatewayID(t *testing.T) {
	cfg, err := gateway.ParseConfig("edgegate.yaml", []byte(`id: gw1
forward:
  sinks:
    - {name: a, type: mqtt, mqtt: {url: "tcp://127.0.0.1:1883", disable_commands: true}}
    - {name: b, type: mqtt, mqtt: {url: "tcp://127.0.0.1:1883", client_id: edgegate-gw1-a, disable_commands: true}}
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), `"edgegate-gw1-a", as has that of sink "a"`) {
		t.Errorf("Validate: %v, want the client id collision", err)
	}
}
