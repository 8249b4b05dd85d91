//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"

	"github.com/edgegate/edgegate/buffer"
)

const footprintDescription = `Memory with many connected devices: the devices of a generated registry (a motion sensor, two
lights and a thermometer per room) connect and publish QoS 1 every 5 seconds each; the resident set (VmRSS) of
the broker is read 2 seconds after the last device connected (idle_mib: before any device connected). edgegate
runs the reference rules of configs/rules.d; mosquitto is the baseline. Start-up: edgegate is started on a data
directory whose log holds the backlog (written with buffer.Open beforehand; no sink is configured, so the events
stay), and the time from process start to the first 200 from /readyz is measured, against the same gateway on an
empty data directory; "cold page cache" drops the log file's pages from the kernel's cache first
(posix_fadvise DONTNEED), as after a reboot; "after a crash" starts it on the log as a crash leaves it (its last
commit did not mark it closed, so the first start checks the whole file and rebuilds bbolt's free list), from a
cold page cache too. anon_mib is the anonymous part of the resident set (RssAnon: heap and
stacks); the rest is the mapped log file, whose pages the kernel can drop and read again. Binary size: the edgegate binary as go build makes it, stripped (-ldflags "-s -w"), and the
mosquitto binary (which links libc, libssl and libcrypto dynamically).`

// runFootprint measures memory with connected devices, start-up time with a large log, and binary size.
func runFootprint(ctx context.Context, h *harness, res *Result) error {
	devices := pick(h, 1000, 40)
	backlog := pick(h, 1_000_000, 10_000)
	res.Subject = "gateway"
	res.Params["devices"] = strconv.Itoa(devices)
	res.Params["backlog_events"] = strconv.Itoa(backlog)
	reg, pw, err := h.genRegistry(ctx, devices, "motion-sensor,light,light,thermometer")
	if err != nil {
		return err
	}
	connected := fmt.Sprintf("%d devices connected", devices)
	err = h.forRounds(ctx, func(round int) error {
		for _, system := range []string{"gateway", "mosquitto"} {
			s, err := h.connectedOnce(ctx, system, reg, pw, devices)
			if err != nil {
				return fmt.Errorf("%s: %w", connected, err)
			}
			s.Round = round
			row := res.row(connected, system, "MiB RSS", true)
			row.Samples = append(row.Samples, s)
			h.logf("footprint: round %d %-9s %d devices: RSS %.1f MiB (idle %.1f MiB), peak %.1f MiB",
				round, system, int(s.Received), s.Value, s.Extra["idle_mib"], float64(s.HWMKiB)/1024)
		}
		return nil
	})
	if err != nil {
		return err
	}

	dataDir, err := h.dir("backlog")
	if err != nil {
		return err
	}
	start := time.Now()
	if err := buildBacklog(ctx, filepath.Join(dataDir, "events.db"), backlog); err != nil {
		return err
	}
	st, _ := os.Stat(filepath.Join(dataDir, "events.db"))
	if st != nil {
		res.Params["backlog_file_mib"] = fmt.Sprintf("%.0f", float64(st.Size())/(1<<20))
	}
	h.logf("footprint: wrote %d events in %s", backlog, time.Since(start).Round(time.Millisecond))
	startup := fmt.Sprintf("start-up with %d events", backlog)
	err = h.forRounds(ctx, func(round int) error {
		for _, system := range []string{"gateway", "gateway (cold page cache)", "gateway (after a crash, cold page cache)",
			"gateway (empty log)"} {
			o := gatewayOptions{Registry: reg, MaxBytes: 4 << 30}
			if system != "gateway (empty log)" {
				o.DataDir = dataDir
			}
			if system == "gateway (after a crash, cold page cache)" {
				if err := asAfterCrash(filepath.Join(dataDir, "events.db")); err != nil {
					return err
				}
			}
			if strings.Contains(system, "cold page cache") {
				if err := dropCache(filepath.Join(dataDir, "events.db")); err != nil {
					return err
				}
			}
			s, err := h.startGateway(ctx, o)
			if err != nil {
				return fmt.Errorf("%s: %w", startup, err)
			}
			u := s.usage()
			s.stop()
			smp := Sample{Round: round, Value: float64(s.startup.Microseconds()) / 1000, RSSKiB: u.RSSKiB,
				HWMKiB: u.HWMKiB, CPUSeconds: u.CPU.Seconds(), Extra: map[string]float64{"anon_mib": float64(u.AnonKiB) / 1024}}
			row := res.row(startup, system, "ms to /readyz", true)
			row.Samples = append(row.Samples, smp)
			h.logf("footprint: round %d %-20s ready in %.1fms, RSS %.1f MiB", round, system, smp.Value,
				float64(u.RSSKiB)/1024)
		}
		return nil
	})
	if err != nil {
		return err
	}

	stripped := filepath.Join(h.work, "bin", "edgegate-stripped")
	cmd := exec.CommandContext(ctx, "go", "build", "-ldflags", "-s -w", "-o", stripped, "./cmd/edgegate")
	cmd.Dir = h.root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build -ldflags '-s -w': %w\n%s", err, out)
	}
	for _, b := range []struct{ system, path string }{
		{"gateway", h.bins.Edgegate}, {"gateway (-s -w)", stripped}, {"mosquitto", h.bins.Mosquitto}} {
		st, err := os.Stat(b.path)
		if err != nil {
			continue
		}
		row := res.row("binary size", b.system, "MiB", true)
		row.Samples = append(row.Samples, Sample{Round: 1, Value: float64(st.Size()) / (1 << 20)})
	}
	return nil
}

// connectedOnce connects every device of the registry to the system and reads its RSS once they all are.
func (h *harness) connectedOnce(ctx context.Context, system, reg, pw string, devices int) (Sample, error) {
	var smp Sample
	s, err := h.startSystem(ctx, system, gatewayOptions{Registry: reg, RulesDir: filepath.Join(h.root, "configs", "rules.d")})
	if err != nil {
		return smp, err
	}
	defer s.stop()
	idle := s.usage()
	hold := pick(h, 6*time.Second, 2*time.Second)
	settleFor := pick(h, 2*time.Second, 300*time.Millisecond)
	run, err := h.startDevsim(ctx, s.url, "--registry", reg, "--password-file", pw, "--rate", "0.2", "--qos", "1",
		"--duration", hold.String(), "--linger", "0s", "--connect-workers", "64", "--connect-timeout", "30s")
	if err != nil {
		return smp, err
	}
	select {
	case <-run.connected:
	case <-ctx.Done():
		return smp, ctx.Err()
	case <-time.After(2 * time.Minute):
		return smp, errors.New("devices did not connect within 2 minutes")
	}
	time.Sleep(settleFor) // a fixed measurement point, not a synchronization
	u := s.usage()
	sum, err := run.wait(ctx)
	if err != nil {
		return smp, err
	}
	if sum.Connected == 0 {
		return smp, fmt.Errorf("no device connected: %s", sum.FirstError)
	}
	smp.Value = float64(u.RSSKiB) / 1024
	smp.Sent, smp.Received = int64(devices), sum.Connected
	smp.RSSKiB, smp.HWMKiB = u.RSSKiB, u.HWMKiB
	smp.CPUSeconds = (u.CPU - idle.CPU).Seconds()
	smp.Extra = map[string]float64{"idle_mib": float64(idle.RSSKiB) / 1024, "anon_mib": float64(u.AnonKiB) / 1024,
		"kib_per_device": float64(u.RSSKiB-idle.RSSKiB) / float64(sum.Connected), "connected": float64(sum.Connected)}
	return smp, nil
}

// asAfterCrash leaves the log file at path as a crash leaves it: one more commit without bbolt's free list,
// as every commit of a running gateway is made, so that the next start cannot take the clean path.
func asAfterCrash(path string) error {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second, NoFreelistSync: true,
		FreelistType: bolt.FreelistMapType})
	if err != nil {
		return fmt.Errorf("as after a crash: %w", err)
	}
	err = db.Update(func(*bolt.Tx) error { return nil })
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("as after a crash: %w", err)
	}
	return nil
}

// dropCache writes the file's dirty pages and asks the kernel to drop its cached pages, so that the next open
// reads it from the disk (as after a reboot); other files' cache is left alone.
func dropCache(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("drop cache: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("drop cache: %w", err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return fmt.Errorf("drop cache: %w", err)
	}
	return nil
}

// buildBacklog writes n telemetry CloudEvents (about 330 bytes each) into a new log at path.
func buildBacklog(ctx context.Context, path string, n int) error {
	lg, err := buffer.Open(buffer.Config{Path: path, Durability: buffer.DurabilityInterval, MaxBytes: 4 << 30},
		slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil {
		return fmt.Errorf("backlog: %w", err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- lg.Run(runCtx) }()
	defer func() { stop(); <-done }()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var buf []byte
	for i := range n {
		if err := ctx.Err(); err != nil {
			return err
		}
		dev := "dev-" + strconv.Itoa(i%1000+1) + "-thermo"
		at := t0.Add(time.Duration(i) * 100 * time.Millisecond)
		buf = fmt.Appendf(buf[:0], `{"specversion":"1.0","id":"bench-%012d","source":"/gateways/bench/devices/%s",`+
			`"type":"telemetry.temperature","subject":"%s","time":"%s","datacontenttype":"application/json",`+
			`"data":{"value":%.2f,"unit":"C","seq":%d}}`, i, dev, dev, at.Format(time.RFC3339Nano), 18+float64(i%800)/100, i)
		e := buffer.Entry{Data: buf, Type: "telemetry.temperature", Subject: dev, Time: at}
		// Every 8192nd append waits for its commit, which keeps the queue from filling up.
		if i%8192 == 8191 || i == n-1 {
			_, err = lg.Append(ctx, e)
		} else if err = lg.Enqueue(e); errors.Is(err, buffer.ErrFull) {
			_, err = lg.Append(ctx, e)
		}
		if err != nil {
			return fmt.Errorf("backlog: event %d: %w", i, err)
		}
	}
	if got := lg.Stats().Events; got != int64(n) {
		return fmt.Errorf("backlog: the log holds %d events, want %d", got, n)
	}
	return nil
}
