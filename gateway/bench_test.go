package gateway_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/gateway"
)

const (
	benchSensorTopic = "devices/kitchen-motion/events/room.entered"
	benchLightTopic  = "devices/kitchen-light-1/commands/lights.on"
	benchWarmup      = 50
)

// BenchmarkRoomEnteredToLightsOn measures the latency from a motion sensor's QoS 1 room.entered publish to the
// light receiving lights.on, in the same run:
//
//   - gateway-rule: edgegate's embedded broker and rule engine (testdata/bench.yaml) send the command, with the
//     default durability (the sensor's event is fsync'd before its PUBACK);
//   - gateway-rule-interval: the same with buffer.durability interval (no fsync per event), to show what the
//     fsync costs the command path;
//   - direct-no-rule: the floor of this setup — the sensor publishes the light's command itself through the same
//     bare broker, one hop with no rule, as if it were wired to the light;
//   - republish-client: the classic alternative — a bare broker and a separate client subscribed to the sensor's
//     topic that republishes a command to the light's topic (what a Node-RED flow does).
//
// Each reports p50-µs and p99-µs of the per-iteration latency; republish-client also reports the gateway-rule
// and the direct-no-rule figures divided by its own (gateway-p50/republish-p50, gateway-p99/republish-p99,
// direct-p99/republish-p99). The republish path is two such hops plus a client, so direct-p99/republish-p99
// is about the lowest ratio any rule engine behind this broker could reach.
func BenchmarkRoomEnteredToLightsOn(b *testing.B) {
	var gwP50, gwP99, directP99 time.Duration
	gatewayRule := func(durability string) func(*testing.B) (time.Duration, time.Duration) {
		return func(b *testing.B) (time.Duration, time.Duration) {
			gw := startGateway(b, func(c *gateway.Config) {
				c.HTTP.Listen = "off"
				c.Log.Level = "info"
				c.MQTT.PublishRate, c.MQTT.PublishBurst = 1e6, 1e6
				c.Buffer.Durability = durability
				writeRules(b, c.Rules.Dir, "bench.yaml", readTestdata(b, "bench.yaml"))
			})
			return measureRoomEntered(b, gw.MQTTAddr("tcp"), false)
		}
	}
	b.Run("gateway-rule", func(b *testing.B) {
		gwP50, gwP99 = gatewayRule(buffer.DurabilityFsync)(b)
	})
	b.Run("gateway-rule-interval", func(b *testing.B) {
		gatewayRule(buffer.DurabilityInterval)(b)
	})
	b.Run("direct-no-rule", func(b *testing.B) {
		_, directP99 = measureRoomEntered(b, startBareBroker(b), true)
	})
	b.Run("republish-client", func(b *testing.B) {
		addr := startBareBroker(b)
		republisher := connectClient(b, addr, "republisher", "", "")
		tok := republisher.Subscribe(benchSensorTopic, 1, func(c paho.Client, m paho.Message) {
			// What a flow does: decode the sensor's message, build the command, publish it to the light.
			var in struct {
				Room string `json:"room"`
				N    int    `json:"n"`
			}
			if json.Unmarshal(m.Payload(), &in) != nil || in.Room == "" {
				return
			}
			out, _ := json.Marshal(map[string]any{"on": true, "n": in.N, "cause": m.MessageID()})
			c.Publish(benchLightTopic, 1, false, out)
		})
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			b.Fatalf("republisher subscribe: %v", tok.Error())
		}
		p50, p99 := measureRoomEntered(b, addr, false)
		if gwP99 > 0 && p99 > 0 {
			b.ReportMetric(float64(gwP50)/float64(p50), "gateway-p50/republish-p50")
			b.ReportMetric(float64(gwP99)/float64(p99), "gateway-p99/republish-p99")
		}
		if directP99 > 0 && p99 > 0 {
			b.ReportMetric(float64(directP99)/float64(p99), "direct-p99/republish-p99")
		}
	})
}

// measureRoomEntered runs the light (kitchen-light-1) as a separate mosquitto_sub process — a device elsewhere,
// which stamps its receive times itself — and the sensor (kitchen-motion) as a paho client, both connected to
// the broker at addr. It publishes b.N room.entered events one at a time and times each from the publish to
// the light's receipt of the matching lights.on. With direct the sensor publishes the light's command itself
// instead. It reports and returns p50 and p99.
func measureRoomEntered(b *testing.B, addr string, direct bool) (p50, p99 time.Duration) {
	b.Helper()
	got := startLight(b, addr)
	sensor := connectDevice(b, addr, "kitchen-motion")

	publish := func(n int) paho.Token {
		if direct {
			return sensor.Publish(benchLightTopic, 1, false, fmt.Sprintf(`{"on":true,"n":%d}`, n))
		}
		return sensor.Publish(benchSensorTopic, 1, false, fmt.Sprintf(`{"room":"kitchen","n":%d}`, n))
	}
	// The light subscribes after it connects: send until one command comes through.
	deadline := time.Now().Add(20 * time.Second)
	for ready := false; !ready; {
		if time.Now().After(deadline) {
			b.Fatal("the light received nothing within 20s")
		}
		publish(-1)
		select {
		case <-got:
			ready = true
		case <-time.After(100 * time.Millisecond):
		}
	}
	time.Sleep(200 * time.Millisecond) // lets the commands still in flight arrive; they are drained below
	for len(got) > 0 {
		<-got
	}

	lat := make([]time.Duration, 0, b.N)
	one := func(n int) time.Duration {
		start := time.Now()
		pub := publish(n)
		timeout := time.NewTimer(5 * time.Second)
		defer timeout.Stop()
		for {
			select {
			case m := <-got:
				if m.n != n {
					continue // a late duplicate of an earlier iteration
				}
				d := m.at.Sub(start)
				if !pub.WaitTimeout(5*time.Second) || pub.Error() != nil {
					b.Fatalf("iteration %d: sensor publish not acknowledged: %v", n, pub.Error())
				}
				return d
			case <-timeout.C:
				b.Fatalf("iteration %d: the light received no lights.on within 5s", n)
			}
		}
	}
	for i := range benchWarmup {
		one(-2 - i)
	}
	b.ResetTimer()
	for i := range b.N {
		lat = append(lat, one(i))
	}
	b.StopTimer()
	slices.Sort(lat)
	p50 = lat[(len(lat)-1)*50/100]
	p99 = lat[(len(lat)-1)*99/100]
	b.ReportMetric(float64(p50.Nanoseconds())/1e3, "p50-µs")
	b.ReportMetric(float64(p99.Nanoseconds())/1e3, "p99-µs")
	return p50, p99
}

// lightMsg is one lights.on the light received: its n and when the light had it.
type lightMsg struct {
	n  int
	at time.Time
}

// startLight runs mosquitto_sub as kitchen-light-1, subscribed (QoS 1) to its lights.on command topic, printing
// each message with its receive time (ns); the messages come out of the returned channel.
func startLight(b *testing.B, addr string) <-chan lightMsg {
	b.Helper()
	bin, err := exec.LookPath("mosquitto_sub")
	if err != nil {
		b.Fatalf("mosquitto_sub not installed (scripts/test.sh installs mosquitto-clients): %v", err)
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "-h", host, "-p", port, "-i", "kitchen-light-1", "-u", "kitchen-light-1",
		"-P", "kitchen-light-1-pw", "-q", "1", "--nodelay", "-t", benchLightTopic, "-F", "%U %p")
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	got := make(chan lightMsg, 1024)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			stamp, payload, ok := strings.Cut(sc.Text(), " ")
			sec, nsec, ok2 := strings.Cut(stamp, ".")
			s, err1 := strconv.ParseInt(sec, 10, 64)
			ns, err2 := strconv.ParseInt(nsec, 10, 64)
			var cmd struct {
				On bool `json:"on"`
				N  int  `json:"n"`
			}
			if !ok || !ok2 || err1 != nil || err2 != nil || json.Unmarshal([]byte(payload), &cmd) != nil || !cmd.On {
				continue
			}
			select {
			case got <- lightMsg{n: cmd.N, at: time.Unix(s, ns)}:
			default:
			}
		}
	}()
	b.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
		<-done
	})
	return got
}

// startBareBroker runs a plain mochi broker (no auth, no persistence) on a free loopback port.
func startBareBroker(b *testing.B) string {
	b.Helper()
	srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(new(allowAll), nil); err != nil {
		b.Fatal(err)
	}
	ln := listeners.NewTCP(listeners.Config{ID: "bench", Address: "127.0.0.1:0"})
	if err := srv.AddListener(ln); err != nil {
		b.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = srv.Close() })
	return ln.Address()
}

// allowAll lets every client connect, publish and subscribe (the bare baseline broker).
type allowAll struct{ mqtt.HookBase }

func (h *allowAll) ID() string { return "allow-all" }
func (h *allowAll) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (h *allowAll) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }
func (h *allowAll) OnACLCheck(*mqtt.Client, string, bool) bool              { return true }
