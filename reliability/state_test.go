//go:build linux

package reliability

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/e2e"
)

// TestStateAfterKill9: the device state view survives a kill -9 whole. It is saved on a graceful stop (here
// only: state_save_interval is an hour), and at start the gateway replays onto it the events its log holds
// after that save, so what a device reported after the last save, acknowledged, is in the view after the kill;
// the device, gone before the kill, is not online (its replayed connection does not set online).
func TestStateAfterKill9(t *testing.T) {
	t.Parallel()
	g, devs, c, publish := stateGateway(t, "state")
	publish()
	if err := g.Stop(); err != nil { // saves the view: seq 1
		t.Fatal(err)
	}
	g.Restart()
	var last int
	for range 5 {
		last = publish()
	}
	before, err := g.Status() // every event so far is committed: the publishes were acknowledged
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	// The view sees an event once the log has queued it, before its commit: wait for both, so that the
	// disconnection is in the log when the process is killed.
	e2e.WaitFor(t, 10*time.Second, "the device's disconnection, in the view and committed", func() bool {
		st, ok, err := g.DeviceState(devs[0].ID)
		if err != nil || !ok || st["online"] != false {
			return false
		}
		now, err := g.Status()
		return err == nil && now.Backlog.LastSeq > before.Backlog.LastSeq
	})
	g.Kill9()
	g.Restart()

	st, ok, err := g.DeviceState(devs[0].ID)
	if err != nil || !ok {
		t.Fatalf("device state after kill -9: ok %v: %v", ok, err)
	}
	rep, _ := st["reported"].(map[string]any)
	if rep["seq"] != float64(last) {
		t.Errorf("reported seq after kill -9 = %v, want %d (the last acknowledged event); state %v", rep["seq"], last, st)
	}
	// The last event is the device's disconnection: replayed, it sets last_event, not online.
	if st["online"] != false || st["last_event"] != "device.disconnected" {
		t.Errorf("state after kill -9 = %v, want online false and last_event device.disconnected", st)
	}
	if !strings.Contains(g.Output(), "device state: replayed the log's events since its last save") {
		t.Error("no log line for the replay")
	}
}

// TestStateAfterKill9BeforeFirstSave: a gateway killed before it ever saved its device state view (a new install,
// within the first state_save_interval) gets the view back from the log at its next start.
func TestStateAfterKill9BeforeFirstSave(t *testing.T) {
	t.Parallel()
	g, devs, c, publish := stateGateway(t, "first")
	var last int
	for range 3 {
		last = publish()
	}
	c.Close()
	g.Kill9()
	g.Restart()

	st, ok, err := g.DeviceState(devs[0].ID)
	if err != nil || !ok {
		t.Fatalf("device state after kill -9: ok %v: %v", ok, err)
	}
	if rep, _ := st["reported"].(map[string]any); rep["seq"] != float64(last) {
		t.Errorf("reported seq after kill -9 = %v, want %d (the last acknowledged event); state %v", rep["seq"], last, st)
	}
}

// stateGateway starts a gateway that saves its device state view only at stop (state_save_interval is an hour)
// and connects its one device; publish sends the device's next event and returns its seq once acknowledged.
func stateGateway(t *testing.T, prefix string) (g *e2e.Gateway, devs []e2e.Device, c *e2e.Client, publish func() int) {
	t.Helper()
	devs = e2e.Devices(prefix, 1)
	g = e2e.Start(t, bin(t), e2e.Config{Devices: devs, Set: map[string]any{"devices.state_save_interval": "1h"}})
	c = e2e.NewClient(t, g.MQTTURL(), devs[0])
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return g, devs, c, func() int {
		t.Helper()
		seq, acked, err := c.Publish(ctx, 5*time.Second)
		if err != nil || !acked {
			t.Fatalf("publish: seq %d acked %v: %v", seq, acked, err)
		}
		return seq
	}
}
