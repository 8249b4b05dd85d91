//go:build linux

package main

import (
	"context"
	"fmt"
	"time"
)

const durableDescription = `Devices publish QoS 1 telemetry (100-byte JSON) in a closed loop, one unacknowledged message each:
the next publish waits for the PUBACK, which edgegate sends only once the event is in the log. With durability
fsync (the default) the PUBACK waits for the fsync of the group commit holding the event; with interval the log
is written at once and fsync'd every 200ms, the same gateway otherwise. The baseline mochi is bare mochi with
allow-all authentication and no durability at all (its PUBACK follows the publish at once), delivering to one
subscriber on devices/#. The rate is acknowledged messages per second; p50–max are the PUBACK latencies (publish
to PUBACK) seen by the devices.`

// runDurable measures QoS 1 acknowledged throughput and PUBACK latency at several device counts, durability
// fsync against interval.
func runDurable(ctx context.Context, h *harness, res *Result) error {
	counts := pick(h, []int{10, 100, 500}, []int{2, 10})
	limit := pick(h, 6*time.Second, time.Second)
	res.Subject = "fsync"
	res.Params["payload_bytes"] = "100"
	res.Params["seconds_per_measurement"] = fmt.Sprint(limit.Seconds())
	regs := map[int][2]string{}
	for _, n := range counts {
		reg, pw, err := h.genRegistry(ctx, n, "thermometer")
		if err != nil {
			return err
		}
		regs[n] = [2]string{reg, pw}
	}
	return h.forRounds(ctx, func(round int) error {
		for _, n := range counts {
			for _, durability := range []string{"fsync", "interval", "mochi"} {
				s, err := h.durableOnce(ctx, durability, regs[n][0], regs[n][1], limit)
				if err != nil {
					return fmt.Errorf("%d devices, %s: %w", n, durability, err)
				}
				s.Round = round
				row := res.row(fmt.Sprintf("%d devices", n), durability, "msg/s", false)
				row.Samples = append(row.Samples, s)
				h.logf("durable: round %d %4d devices %-8s %7.0f msg/s, PUBACK p50 %.2fms p99 %.2fms max %.2fms",
					round, n, durability, s.Value, s.Extra["p50_ms"], s.Extra["p99_ms"], s.Extra["max_ms"])
			}
		}
		return nil
	})
}

// durableOnce measures one system: the gateway with durability fsync or interval, or bare mochi ("mochi").
func (h *harness) durableOnce(ctx context.Context, durability, reg, pw string, limit time.Duration) (Sample, error) {
	var smp Sample
	system := "gateway"
	if durability == "mochi" {
		system = "mochi"
	}
	s, err := h.startSystem(ctx, system, gatewayOptions{Registry: reg, Durability: durability})
	if err != nil {
		return smp, err
	}
	defer s.stop()
	presence := int64(0)
	if system == "mochi" {
		if err := s.subscribe(ctx, "devices/#", 1); err != nil {
			return smp, err
		}
	}
	before := s.usage()
	sum, err := h.runDevsim(ctx, s.url, "--registry", reg, "--password-file", pw, "--rate", "0", "--qos", "1",
		"--inflight", "1", "--duration", limit.String(), "--payload-bytes", "100", "--linger", "0s", "--quiet")
	if err != nil {
		return smp, err
	}
	if sum.Acked == 0 {
		return smp, fmt.Errorf("nothing acknowledged: %s", sum.FirstError)
	}
	if system == "gateway" {
		presence = 2 * sum.Connected // the gateway logs a presence event at every connect and disconnect
	}
	got, _, err := settle(ctx, s, sum.Sent+presence, 500*time.Millisecond, 30*time.Second)
	if err != nil {
		return smp, err
	}
	after := s.usage()
	smp.Value = sum.Rate
	smp.Sent, smp.Received = sum.Sent, got-presence
	smp.RSSKiB, smp.HWMKiB = after.RSSKiB, after.HWMKiB
	smp.CPUSeconds = (after.CPU - before.CPU).Seconds()
	smp.Extra = sum.AckLatency.extra()
	smp.Extra["connected"] = float64(sum.Connected)
	return smp, nil
}
