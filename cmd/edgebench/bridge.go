//go:build linux

package main

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/edgegate/edgegate/internal/bridgebench"
)

const onlineDescription = `Devices publish QoS 1 JSON (100 bytes) to the edge, which carries it to a cloud mosquitto read by a
counting subscriber: edgegate with one MQTT sink (log fsync'd before the device's PUBACK), against an edge
mosquitto bridged to the cloud one (QoS 1, persistence, no queue limits). The rate is the distinct messages
delivered per second, from the first publish to the last arrival; p50–max are publish-to-arrival latencies.
gateway-batch is the gateway with its MQTT sink in batch mode (mqtt.mode: batch): a message carries a JSON array
of up to 128 consecutive events, which the subscriber splits; gateway is the default, one event per message.
Measured by internal/bridgebench.RunOnline.`

const drainDescription = `The cloud broker is stopped, the devices publish a backlog (all acknowledged at the edge), the cloud
broker starts again and the time until the last backlog message arrives is measured (lower is better), while one
more device publishes live traffic whose latency is measured (live_p99_ms: until the backlog drained).
transfer_rate is the backlog over the time from its first to its last arrival. bridge-defaults is the bridge
with mosquitto's default limit of 1000 queued messages, which loses most of the backlog (see delivered). The
bridge sends the live messages after the backlog it queued before them; the gateway sends them ahead of the
backlog, because the live device has no events in it but among its last ones (the device's order holds).
gateway-live-lane is the gateway with the live device's messages at priority 5 and its sink configured with
priority_lanes: [5]: they go up on a connection of their own. gateway-batch is the gateway with its MQTT sink in
batch mode (mqtt.mode: batch: JSON arrays of up to 128 events per message). Measured by
internal/bridgebench.RunDrain.`

func bridgeOptions(h *harness, system bridgebench.System) bridgebench.Options {
	return bridgebench.Options{
		System:        system,
		Devices:       10,
		Messages:      pick(h, 10000, 200),
		Backlog:       pick(h, 100000, 2000),
		GatewayBinary: h.bins.Edgegate,
		WorkDir:       h.work,
		StallTimeout:  pick(h, 15*time.Second, 2*time.Second),
		Timeout:       pick(h, 5*time.Minute, time.Minute),
		Logf:          func(format string, args ...any) { h.logf("bridgebench: "+format, args...) },
	}
}

func bridgeSample(r bridgebench.Result) Sample {
	return Sample{Sent: int64(r.Acked), Received: int64(r.Unique), RSSKiB: r.RSS >> 10, HWMKiB: r.PeakRSS >> 10,
		CPUSeconds: r.CPU.Seconds()}
}

func msOf(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// runOnline runs bridgebench.RunOnline for the gateway and the mosquitto bridge, alternating.
func runOnline(ctx context.Context, h *harness, res *Result) error {
	res.Subject = "gateway"
	o := bridgeOptions(h, bridgebench.Gateway)
	res.Params["devices"] = strconv.Itoa(o.Devices)
	res.Params["messages_per_device"] = strconv.Itoa(o.Messages)
	group := fmt.Sprintf("%d devices × %d messages", o.Devices, o.Messages)
	runs := []bridgeRun{
		{bridgebench.Gateway.String(), bridgeOptions(h, bridgebench.Gateway)},
		batchRun(h),
		{bridgebench.MosquittoBridge.String(), bridgeOptions(h, bridgebench.MosquittoBridge)},
	}
	return h.forRounds(ctx, func(round int) error {
		for _, run := range runs {
			r, err := bridgebench.RunOnline(ctx, run.o)
			if err != nil {
				return fmt.Errorf("%s: %w", run.name, err)
			}
			s := bridgeSample(r)
			s.Round, s.Value = round, r.Rate
			s.Extra = map[string]float64{"p50_ms": msOf(r.LatencyP50), "p99_ms": msOf(r.LatencyP99),
				"max_ms": msOf(r.LatencyMax), "duplicates": float64(r.Duplicates)}
			row := res.row(group, run.name, "msg/s", false)
			row.Samples = append(row.Samples, s)
			h.logf("online: round %d %s %s", round, run.name, r)
		}
		return nil
	})
}

// runDrain runs bridgebench.RunDrain for the gateway and the mosquitto bridge (with and without mosquitto's
// default queue limit), alternating.
func runDrain(ctx context.Context, h *harness, res *Result) error {
	res.Subject = "gateway"
	o := bridgeOptions(h, bridgebench.Gateway)
	res.Params["devices"] = strconv.Itoa(o.Devices)
	res.Params["backlog"] = strconv.Itoa(o.Backlog)
	group := fmt.Sprintf("backlog of %d", o.Backlog)
	var runs []bridgeRun
	for _, system := range bridgebench.Systems {
		runs = append(runs, bridgeRun{system.String(), bridgeOptions(h, system)})
	}
	// The gateway again, its live device's messages at priority 5 with a priority lane for them.
	lane := bridgeOptions(h, bridgebench.Gateway)
	lane.LivePriority = liveLanePriority
	runs = append(runs, bridgeRun{liveLaneSystem, lane}, batchRun(h))
	return h.forRounds(ctx, func(round int) error {
		for _, run := range runs {
			r, err := bridgebench.RunDrain(ctx, run.o)
			if err != nil {
				return fmt.Errorf("%s: %w", run.name, err)
			}
			s := bridgeSample(r)
			s.Round, s.Value = round, r.Duration.Seconds()
			s.Extra = map[string]float64{"transfer_rate": r.TransferRate, "first_delivery_ms": msOf(r.FirstDelivery),
				"live_p99_ms": msOf(r.LatencyP99), "live_lost": float64(r.LiveLost), "duplicates": float64(r.Duplicates)}
			row := res.row(group, run.name, "s to drain", true)
			row.Samples = append(row.Samples, s)
			h.logf("drain: round %d %s %s", round, run.name, r)
		}
		return nil
	})
}

// The drain's extra gateway run: the live device's messages at liveLanePriority, the sink with a priority
// lane from it (forward priority_lanes), which carries them on a connection of its own.
const (
	liveLanePriority = 5
	liveLaneSystem   = "gateway-live-lane"
)

// batchSystem is the gateway with its MQTT sink in batch mode.
const batchSystem = "gateway-batch"

// bridgeRun is one system of a scenario: its row's name and its options.
type bridgeRun struct {
	name string
	o    bridgebench.Options
}

// batchRun is the gateway with its MQTT sink in batch mode.
func batchRun(h *harness) bridgeRun {
	o := bridgeOptions(h, bridgebench.Gateway)
	o.Batch = true
	return bridgeRun{batchSystem, o}
}
