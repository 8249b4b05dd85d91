//go:build linux

package main

import (
	"context"
	"fmt"
	"strconv"
	"time"
)

const ingestDescription = `Ten devices publish 100-byte JSON telemetry as fast as they can (QoS 1: up to 32 unacknowledged
publishes each) into (a) edgegate: authenticated devices, every message normalized to a CloudEvent and appended to
the bbolt log (QoS 1: PUBACK after the fsync of its group commit), (b) bare mochi-mqtt (the broker edgegate embeds)
with allow-all authentication, and (c) mosquitto. The two brokers deliver to one subscriber on devices/# (at the
publish QoS), which counts what they received; for edgegate the count is the events appended to the log. The rate
is what the system received per second, from the first publish to the last message received; a publisher stops at
its message count or after 20 seconds, whichever comes first. delivered below 1 at QoS 0 means the broker dropped
messages (mochi drops QoS 0 messages for a subscriber whose queue of pending writes is full); they are not in the
rate. p50–max (QoS 1) are publish-to-PUBACK latencies. mochi and mosquitto run with their default settings.`

// runIngest measures QoS 0 and QoS 1 publish throughput into the gateway, bare mochi and mosquitto.
func runIngest(ctx context.Context, h *harness, res *Result) error {
	const publishers, payload = 10, 100
	counts := map[int]int{0: pick(h, 20000, 300), 1: pick(h, 10000, 200)} // messages per publisher
	limit := pick(h, 20*time.Second, 5*time.Second)
	res.Subject = "gateway"
	res.Params["publishers"] = strconv.Itoa(publishers)
	res.Params["payload_bytes"] = strconv.Itoa(payload)
	res.Params["messages_per_publisher"] = fmt.Sprintf("QoS 0: %d, QoS 1: %d", counts[0], counts[1])
	res.Params["inflight_qos1"] = "32"
	reg, pw, err := h.genRegistry(ctx, publishers, "thermometer")
	if err != nil {
		return err
	}
	systems := []string{"gateway", "mochi", "mosquitto"}
	return h.forRounds(ctx, func(round int) error {
		for _, qos := range []int{0, 1} {
			for _, system := range systems {
				s, err := h.ingestOnce(ctx, system, qos, reg, pw, counts[qos], payload, limit)
				if err != nil {
					return fmt.Errorf("%s QoS %d: %w", system, qos, err)
				}
				s.Round = round
				row := res.row(fmt.Sprintf("QoS %d", qos), system, "msg/s", false)
				row.Samples = append(row.Samples, s)
				h.logf("ingest: round %d QoS %d %-9s %8.0f msg/s, delivered %d/%d, rss %.1f MiB, cpu %.2fs",
					round, qos, system, s.Value, s.Received, s.Sent, float64(s.RSSKiB)/1024, s.CPUSeconds)
			}
		}
		return nil
	})
}

func (h *harness) startSystem(ctx context.Context, system string, gw gatewayOptions) (*sut, error) {
	switch system {
	case "gateway":
		return h.startGateway(ctx, gw)
	case "mochi":
		return h.startMochi(ctx)
	case "mosquitto":
		return h.startMosquitto(ctx)
	}
	return nil, fmt.Errorf("unknown system %q", system)
}

// ingestOnce starts the system, runs the publishers against it and measures what it received.
func (h *harness) ingestOnce(ctx context.Context, system string, qos int, reg, pw string, count, payload int,
	limit time.Duration) (Sample, error) {
	var smp Sample
	s, err := h.startSystem(ctx, system, gatewayOptions{Registry: reg})
	if err != nil {
		return smp, err
	}
	defer s.stop()
	if system != "gateway" {
		if err := s.subscribe(ctx, "devices/#", byte(qos)); err != nil {
			return smp, err
		}
	}
	before := s.usage()
	sum, err := h.runDevsim(ctx, s.url, "--registry", reg, "--password-file", pw, "--rate", "0",
		"--qos", strconv.Itoa(qos), "--inflight", "32", "--count", strconv.Itoa(count), "--duration", limit.String(),
		"--payload-bytes", strconv.Itoa(payload), "--linger", "0s", "--quiet")
	if err != nil {
		return smp, err
	}
	if sum.Connected == 0 || sum.Sent == 0 {
		return smp, fmt.Errorf("devsim sent nothing: %s", sum.FirstError)
	}
	want := sum.Sent
	presence := int64(0)
	if system == "gateway" {
		// The gateway also logs a presence event at every connect and disconnect.
		presence = 2 * sum.Connected
	}
	exited := time.Now()
	got, changed, err := settle(ctx, s, want+presence, 500*time.Millisecond, 30*time.Second)
	if err != nil {
		return smp, err
	}
	after := s.usage()
	end := time.Unix(0, sum.LastDone)
	if changed.After(exited) && changed.After(end) {
		end = changed
	}
	smp.Sent, smp.Received = sum.Sent, got-presence
	if secs := end.Sub(time.Unix(0, sum.FirstPublish)).Seconds(); secs > 0 {
		smp.Value = float64(smp.Received) / secs
	}
	smp.RSSKiB, smp.HWMKiB = after.RSSKiB, after.HWMKiB
	smp.CPUSeconds = (after.CPU - before.CPU).Seconds()
	if qos == 1 {
		smp.Extra = sum.AckLatency.extra()
	}
	return smp, nil
}
