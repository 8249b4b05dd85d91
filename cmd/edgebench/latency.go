//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

const latencyDescription = `Motion sensors publish room.entered (QoS 1, {"room":R,"ts":T}) and the light of each room must get
lights.on. edgegate runs the reference rule of configs/rules.d/lights.yaml without its 30s debounce (so that every
event is answered) and with the sensor's ts echoed in the command; the baseline is mosquitto with a separate client
process (edgebench republish) that subscribes to devices/+/events/room.entered and publishes the command to the
room's lights. The light measures the latency from the ts in the command to its arrival (one clock: everything
runs on this machine). mosquitto runs with set_tcp_nodelay true: with its default (Nagle's algorithm on) each hop
waits for a delayed ACK and the baseline takes about 25ms. RSS and CPU of the baseline are those of mosquitto and the republishing client together.
The second group isolates one event: a sensor (a paho client in edgebench) publishes room.entered at QoS 1, the light
(a mosquitto_sub process, which stamps each message as it reads it) receives the command, and the next event
follows the light's receipt and the sensor's PUBACK after a short gap; its value is the p99. "mosquitto direct" is
the floor of this setup: the light subscribed to the sensor's events through mosquitto alone, one hop, no rule.`

// benchRule is the reference lights-on rule without debounce, its command carrying the sensor's timestamp.
const benchRule = `rules:
  - name: lights-on-motion
    description: The reference rule without debounce; the command echoes the sensor's ts.
    on:
      type: room.entered
    when: coalesce(data?.room, device.room) != nil
    actions:
      - command:
          to: {kind: light, room: '{{ coalesce(data?.room, device.room) }}'}
          command: lights.on
          payload: {on: true, cause: '{{ event.id }}', ts: '{{ data?.ts }}'}
`

// runLatency measures room.entered → lights.on through the gateway's rule and through mosquitto plus a
// republishing client.
func runLatency(ctx context.Context, h *harness, res *Result) error {
	rooms := pick(h, 10, 2)
	rate := 20.0
	limit := pick(h, 10*time.Second, 1500*time.Millisecond)
	res.Subject = "gateway"
	res.Params["rooms"] = strconv.Itoa(rooms)
	res.Params["events_per_second_per_sensor"] = fmt.Sprint(rate)
	res.Params["seconds_per_measurement"] = fmt.Sprint(limit.Seconds())
	reg, pw, err := h.genRegistry(ctx, 2*rooms, "motion-sensor,light")
	if err != nil {
		return err
	}
	rulesDir, err := h.dir("rules")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(rulesDir, "lights.yaml"), []byte(benchRule), 0o600); err != nil {
		return fmt.Errorf("rules: %w", err)
	}
	probeReg, probePw, err := h.genRegistry(ctx, 2, "motion-sensor,light")
	if err != nil {
		return err
	}
	probeN := pick(h, 2000, 50)
	probeGap := 2 * time.Millisecond
	res.Params["probe_events"] = strconv.Itoa(probeN)
	res.Params["probe_gap_ms"] = fmt.Sprint(msOf(probeGap))
	return h.forRounds(ctx, func(round int) error {
		for _, system := range []string{"gateway", "mosquitto+republish"} {
			s, err := h.latencyOnce(ctx, system, reg, pw, rulesDir, rate, limit)
			if err != nil {
				return fmt.Errorf("%s: %w", system, err)
			}
			s.Round = round
			row := res.row(fmt.Sprintf("%d rooms × %g events/s", rooms, rate), system, "ms p50", true)
			row.Samples = append(row.Samples, s)
			h.logf("latency: round %d %-20s p50 %.2fms p90 %.2fms p99 %.2fms max %.2fms, %d/%d commands",
				round, system, s.Value, s.Extra["p90_ms"], s.Extra["p99_ms"], s.Extra["max_ms"], s.Received, s.Sent)
		}
		for _, system := range []string{"gateway", "mosquitto+republish", probeDirect} {
			s, err := h.probeOnce(ctx, system, probeReg, probePw, rulesDir, probeN, probeGap)
			if err != nil {
				return fmt.Errorf("%s (one event at a time): %w", system, err)
			}
			s.Round = round
			row := res.row("1 sensor → 1 light, one event at a time", system, "ms p99", true)
			row.Samples = append(row.Samples, s)
			h.logf("latency: round %d %-20s one at a time: p50 %.3fms p90 %.3fms p99 %.3fms max %.2fms, %d/%d commands",
				round, system, s.Extra["p50_ms"], s.Extra["p90_ms"], s.Value, s.Extra["max_ms"], s.Received, s.Sent)
		}
		return nil
	})
}

func (h *harness) latencyOnce(ctx context.Context, system, reg, pw, rulesDir string, rate float64,
	limit time.Duration) (Sample, error) {
	var smp Sample
	s, procs, err := h.startLatencySystem(ctx, system, reg, rulesDir)
	if err != nil {
		return smp, err
	}
	defer func() {
		for _, p := range procs {
			p.Stop(5 * time.Second)
		}
	}()
	total := func() usage { return procsUsage(procs) }
	before := total()
	sum, err := h.runDevsim(ctx, s.url, "--registry", reg, "--password-file", pw, "--rate", fmt.Sprint(rate),
		"--qos", "1", "--duration", limit.String(), "--linger", "1s", "--quiet")
	if err != nil {
		return smp, err
	}
	after := total()
	if sum.CommandLatency.N == 0 {
		return smp, fmt.Errorf("no command reached a light (sent %d events): %s", sum.Sent, sum.FirstError)
	}
	smp.Value = sum.CommandLatency.P50
	smp.Sent, smp.Received = sum.Sent, sum.Commands
	smp.RSSKiB, smp.HWMKiB = after.RSSKiB, after.HWMKiB
	smp.CPUSeconds = (after.CPU - before.CPU).Seconds()
	smp.Extra = sum.CommandLatency.extra()
	delete(smp.Extra, "p50_ms")
	return smp, nil
}

// startLatencySystem starts the gateway with the rules of rulesDir, or mosquitto and the republishing client;
// procs are its processes, to be stopped in reverse order.
func (h *harness) startLatencySystem(ctx context.Context, system, reg, rulesDir string) (*sut, []*proc, error) {
	if system == "gateway" {
		s, err := h.startGateway(ctx, gatewayOptions{Registry: reg, RulesDir: rulesDir})
		if err != nil {
			return nil, nil, err
		}
		return s, []*proc{s.proc}, nil
	}
	// Without TCP_NODELAY mosquitto's small writes wait for the peer's delayed ACK (tens of ms).
	s, err := h.startMosquitto(ctx, "set_tcp_nodelay true")
	if err != nil {
		return nil, nil, err
	}
	ready := make(chan struct{})
	var once sync.Once
	rp, err := h.start(ctx, "republish", h.bins.Edgebench, []string{"republish", "--broker", s.url, "--registry", reg},
		func(line string) {
			if strings.Contains(line, "republish: ready") {
				once.Do(func() { close(ready) })
			}
		})
	if err != nil {
		s.stop()
		return nil, nil, err
	}
	if err := poll(ctx, rp, 15*time.Second, 5*time.Millisecond, "republish ready", func() bool {
		select {
		case <-ready:
			return true
		default:
			return false
		}
	}); err != nil {
		rp.Stop(5 * time.Second)
		s.stop()
		return nil, nil, err
	}
	return s, []*proc{rp, s.proc}, nil
}

// procsUsage adds up the CPU time and memory of procs.
func procsUsage(procs []*proc) (u usage) {
	for _, p := range procs {
		pu, _ := readUsage(p.Pid())
		u.CPU += pu.CPU
		u.RSSKiB += pu.RSSKiB
		u.HWMKiB += pu.HWMKiB
	}
	return u
}
