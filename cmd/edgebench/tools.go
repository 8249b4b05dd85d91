//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/devices"
)

// cmdBareMochi runs mochi-mqtt, the broker embedded in edgegate, with its default capabilities, allow-all
// authentication and nothing else: the baseline that shows what edgegate's ingest adds.
func cmdBareMochi(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("edgebench bare-mochi", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:1884", "MQTT listener address")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	srv := mqtt.New(&mqtt.Options{
		Logger: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err := srv.AddHook(new(allowAll), nil); err != nil {
		return fmt.Errorf("mochi: %w", err)
	}
	if err := srv.AddListener(listeners.NewTCP(listeners.Config{ID: "tcp", Address: *listen})); err != nil {
		return fmt.Errorf("mochi: listen %s: %w", *listen, err)
	}
	if err := srv.Serve(); err != nil {
		return fmt.Errorf("mochi: %w", err)
	}
	<-ctx.Done()
	return srv.Close()
}

// allowAll lets every client connect and publish or subscribe anywhere (mochi's auth.AllowHook, whose package
// would bring in a YAML library this module does not otherwise need).
type allowAll struct{ mqtt.HookBase }

func (*allowAll) ID() string { return "allow-all" }

func (*allowAll) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnectAuthenticate, mqtt.OnACLCheck}, []byte{b})
}

func (*allowAll) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }

func (*allowAll) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

// cmdRepublish is the rule as a plain MQTT client on a broker: it subscribes to every sensor's room.entered and
// publishes lights.on (QoS 1) to every light of the room, as the registry says, echoing the sensor's ts.
func cmdRepublish(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("edgebench republish", flag.ContinueOnError)
	fs.SetOutput(stderr)
	broker := fs.String("broker", "tcp://127.0.0.1:1883", "MQTT broker URL")
	registry := fs.String("registry", "", "device registry: the lights of each room (required)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *registry == "" {
		fs.Usage()
		return errUsage
	}
	reg, err := devices.LoadRegistry(*registry)
	if err != nil {
		return err
	}
	lights := map[string][]string{}
	for _, d := range reg.All() {
		if d.Kind == "light" && d.Room != "" {
			lights[d.Room] = append(lights[d.Room], d.ID)
		}
	}
	opts := paho.NewClientOptions().AddBroker(*broker).SetClientID("edgebench-republish").
		SetCleanSession(true).SetAutoReconnect(false).SetOrderMatters(false).SetConnectTimeout(5 * time.Second)
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("connect %s: %v", *broker, tok.Error())
	}
	defer c.Disconnect(100)
	handler := func(c paho.Client, m paho.Message) {
		var ev struct {
			Room string          `json:"room"`
			TS   json.RawMessage `json:"ts"`
		}
		if json.Unmarshal(m.Payload(), &ev) != nil {
			return
		}
		if ev.Room == "" {
			// Like the rule: the sensor's own room when the payload names none.
			id := strings.Split(m.Topic(), "/")[1]
			if d, ok := reg.Get(id); ok {
				ev.Room = d.Room
			}
		}
		payload := `{"on":true}`
		if len(ev.TS) > 0 {
			payload = `{"on":true,"ts":` + string(ev.TS) + `}`
		}
		for _, id := range lights[ev.Room] {
			c.Publish("devices/"+id+"/commands/lights.on", 1, false, payload)
		}
	}
	tok := c.Subscribe("devices/+/events/room.entered", 1, handler)
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("subscribe: %v", tok.Error())
	}
	fmt.Fprintf(stderr, "republish: ready (%d rooms with lights)\n", len(lights))
	<-ctx.Done()
	return nil
}
