package gateway_test

import (
	"bufio"
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/gateway"
)

// TestObserverWatchesEverything runs what the README tour does to watch the gateway: mosquitto_sub as the
// shipped observer device (configs/devices.yaml, password observer-pw) on devices/#. It sees a sensor's event and
// the commands the shipped rules send.
func TestObserverWatchesEverything(t *testing.T) {
	t.Parallel()
	mosquittoSub, err := exec.LookPath("mosquitto_sub")
	if err != nil {
		t.Fatalf("mosquitto_sub not installed (scripts/test.sh installs mosquitto-clients): %v", err)
	}
	gw := startGateway(t, func(c *gateway.Config) {
		c.Devices.Registry = fastRegistry(t, "observer") // the observer's shipped hash, as the tour uses it
		writeRules(t, c.Rules.Dir, "lights.yaml", shippedLightsRules(t, "5m"))
	})
	addr := gw.MQTTAddr("tcp")
	host, port := splitAddr(t, addr)
	for _, id := range []string{"kitchen-light-1", "kitchen-light-2"} {
		subscribe(t, connectDevice(t, addr, id), "devices/"+id+"/commands/#")
	}
	sensor := connectDevice(t, addr, "kitchen-motion")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, mosquittoSub, "-h", host, "-p", port, "-i", "observer", "-u", "observer",
		"-P", "observer-pw", "-q", "1", "-v", "-t", "devices/#")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 100)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
	})

	// Publish a probe until the observer shows it: then its subscription is in place.
	probe := time.NewTicker(100 * time.Millisecond)
	defer probe.Stop()
	seen := []string{}
wait:
	for {
		publish(t, sensor, "devices/kitchen-motion/events/probe", 0, `{}`)
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("mosquitto_sub ended: %s", stderr.String())
			}
			seen = append(seen, l)
			break wait
		case <-probe.C:
		case <-ctx.Done():
			t.Fatalf("the observer saw nothing within 30s: %s", stderr.String())
		}
	}
	if !strings.HasPrefix(seen[0], "devices/kitchen-motion/events/probe ") {
		t.Fatalf("observer's first line %q, want the probe", seen[0])
	}

	publish(t, sensor, "devices/kitchen-motion/events/room.entered", 1, `{"room":"kitchen"}`)
	want := []string{
		`devices/kitchen-motion/events/room.entered {"room":"kitchen"}`,
		"devices/kitchen-light-1/commands/lights.on {",
		"devices/kitchen-light-2/commands/lights.on {",
	}
	found := make([]bool, len(want))
	for n := 0; n < len(want); {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("mosquitto_sub ended: %s", stderr.String())
			}
			seen = append(seen, l)
			for i, w := range want {
				if !found[i] && strings.HasPrefix(l, w) {
					found[i] = true
					n++
				}
			}
		case <-ctx.Done():
			t.Fatalf("the observer saw %q, want also %q", seen, want)
		}
	}
}
