//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

const latencyDescription = `Motion sensors publish room.entered (QoS 1, {"room":R,"ts":T}) and the light of each room must get
lights.on. edgegate runs the reference rule of configs/rules.d/lights.yaml without its 30s debounce (so that every
event is answered) and with the sensor's ts echoed in the command; the baseline is mosquitto with a separate client
process (edgebench republish) that subscribes to devices/+/events/room.entered and publishes the command to the
room's lights. The light measures the latency from the ts in the command to its arrival (one clock: everything
runs on this machine). mosquitto runs with set_tcp_nodelay true: with its default (Nagle's algorithm on) each hop
waits for a delayed ACK and the baseline takes about 25ms. RSS and CPU of the baseline are those of mosquitto and the republishing client together.`

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
		return nil
	})
}

func (h *harness) latencyOnce(ctx context.Context, system, reg, pw, rulesDir string, rate float64,
	limit time.Duration) (Sample, error) {
	var smp Sample
	var procs []*proc
	var s *sut
	var err error
	if system == "gateway" {
		s, err = h.startGateway(ctx, gatewayOptions{Registry: reg, RulesDir: rulesDir})
		if err != nil {
			return smp, err
		}
		procs = append(procs, s.proc)
	} else {
		// Without TCP_NODELAY mosquitto's small writes wait for the peer's delayed ACK (tens of ms).
		s, err = h.startMosquitto(ctx, "set_tcp_nodelay true")
		if err != nil {
			return smp, err
		}
		ready := make(chan struct{})
		var once bool
		rp, err := h.start(ctx, "republish", h.bins.Edgebench, []string{"republish", "--broker", s.url, "--registry", reg},
			func(line string) {
				if !once && strings.Contains(line, "republish: ready") {
					once = true
					close(ready)
				}
			})
		if err != nil {
			s.stop()
			return smp, err
		}
		defer rp.Stop(5 * time.Second)
		if err := poll(ctx, rp, 15*time.Second, 5*time.Millisecond, "republish ready", func() bool {
			select {
			case <-ready:
				return true
			default:
				return false
			}
		}); err != nil {
			s.stop()
			return smp, err
		}
		procs = append(procs, s.proc, rp)
	}
	defer s.stop()
	total := func() (u usage) {
		for _, p := range procs {
			pu, _ := readUsage(p.Pid())
			u.CPU += pu.CPU
			u.RSSKiB += pu.RSSKiB
			u.HWMKiB += pu.HWMKiB
		}
		return u
	}
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
