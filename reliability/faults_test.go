//go:build linux

package reliability

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/e2e"
)

// TestReconnectStorm: the upstream connection is reset 100 times through a proxy while devices publish: no
// acknowledged event is lost and each reset sends at most a window again.
func TestReconnectStorm(t *testing.T) {
	t.Parallel()
	start := time.Now()
	const window, resets = 32, 100
	devs := e2e.Devices("storm", 20)
	perDevice := scale(100, 1000)
	u := newUpstream(t, true)
	g := e2e.Start(t, bin(t), e2e.Config{Devices: devs, Upstream: u.url(), Set: map[string]any{
		"forward.sinks.0.window":      window,
		"forward.sinks.0.backoff_min": "5ms",
		"forward.sinks.0.backoff_max": "50ms",
	}})
	f := e2e.NewFleet(t, g.MQTTURL(), devs)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	done := runFleet(ctx, f, e2e.Load{PerDevice: perDevice, Interval: 5 * time.Millisecond})
	dropped := 0
	for i := range resets {
		e2e.WaitFor(t, 15*time.Second, fmt.Sprintf("the sink to reconnect before reset %d", i+1),
			func() bool { return u.proxy.Conns() > 0 })
		dropped += u.proxy.ResetAll()
	}
	<-done
	e2e.WaitFor(t, 15*time.Second, fmt.Sprintf("edgegate_forward_reconnects_total to reach %d", resets), func() bool {
		m, err := g.Metrics()
		return err == nil && sinkMetric(m, "edgegate_forward_reconnects_total") >= resets
	})

	o := measure(t, f, u.coll, time.Minute)
	m := waitDrained(t, g, 30*time.Second)
	reconnects := sinkMetric(m, "edgegate_forward_reconnects_total")
	record(t, "reconnect-storm", start, o, fmt.Sprintf("%d devices x %d, %d resets, %d connections dropped, %.0f reconnects, window %d",
		len(devs), perDevice, resets, dropped, reconnects, window))
	if o.acked != o.sent {
		t.Errorf("acked %d of %d: upstream resets must not cost devices their PUBACKs", o.acked, o.sent)
	}
	if limit := window * resets; o.counts.Duplicates > limit {
		t.Errorf("%d duplicates, want at most %d (window %d x %d resets)", o.counts.Duplicates, limit, window, resets)
	}
	if err := g.Stop(); err != nil {
		t.Errorf("graceful stop: %v", err)
	}
}

// TestStall: the upstream accepts the connection but stops acknowledging (the proxy swallows what the broker
// sends back). The gateway detects it within ack_timeout (sink stalled and unhealthy in /api/status, /readyz
// 503, edgegate_forward_stalled 1), recovers when the path clears, and loses nothing.
func TestStall(t *testing.T) {
	t.Parallel()
	start := time.Now()
	const window = 32
	ackTimeout := time.Second
	devs := e2e.Devices("stall", 10)
	perDevice := scale(80, 800)
	total := int64(len(devs) * perDevice)
	u := newUpstream(t, true)
	g := e2e.Start(t, bin(t), e2e.Config{Devices: devs, Upstream: u.url(), Set: map[string]any{
		"forward.sinks.0.window":               window,
		"forward.sinks.0.ack_timeout":          ackTimeout.String(),
		"forward.sinks.0.mqtt.connect_timeout": "1s",
	}})
	f := e2e.NewFleet(t, g.MQTTURL(), devs)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	prog, marks := progressAt(total / 4)
	done := runFleet(ctx, f, e2e.Load{PerDevice: perDevice, Interval: 10 * time.Millisecond, Progress: prog})
	await(t, marks[0], time.Minute, "a quarter of the events")
	e2e.WaitFor(t, 10*time.Second, "the sink to connect", func() bool { return sinkConnected(g) })

	u.proxy.Blackhole(true)
	stalledAt := time.Now()
	var st e2e.Status
	e2e.WaitFor(t, 10*ackTimeout, "the stall to show in /api/status and the metric", func() bool {
		var err error
		if st, err = g.Status(); err != nil {
			return false
		}
		s, _ := st.Sink(e2e.SinkName)
		m, err := g.Metrics()
		return err == nil && s.Stalled && !s.Healthy && !st.Healthy && sinkMetric(m, "edgegate_forward_stalled") == 1
	})
	detect := time.Since(stalledAt)
	s, _ := st.Sink(e2e.SinkName)
	t.Logf("stall detected after %s (ack_timeout %s): %q", detect.Round(time.Millisecond), ackTimeout, s.LastError)
	// /readyz says why: the stalled sink among its problems and, in its sinks, stalled and unhealthy.
	code, rz := readyz(t, g)
	if code != http.StatusServiceUnavailable {
		t.Errorf("/readyz during the stall = %d, want 503", code)
	}
	if !rz.Ready || rz.Healthy {
		t.Errorf("/readyz during the stall: ready %v, healthy %v; want ready and not healthy", rz.Ready, rz.Healthy)
	}
	named := false
	for _, p := range rz.Problems {
		named = named || strings.HasPrefix(p, "sink "+e2e.SinkName+" unhealthy")
	}
	if !named {
		t.Errorf("/readyz problems during the stall = %q, want one naming sink %s", rz.Problems, e2e.SinkName)
	}
	if rs, ok := rz.sink(e2e.SinkName); !ok || !rs.Stalled || rs.Healthy {
		t.Errorf("/readyz sink %s during the stall = %+v (found %v), want stalled and not healthy", e2e.SinkName, rs, ok)
	}
	// Keep it stalled a while longer: the sink reconnects and the new connection stalls too.
	time.Sleep(2 * ackTimeout)
	m := g.MustMetrics()
	held := backlog(m)

	u.proxy.Blackhole(false)
	clearedAt := time.Now()
	e2e.WaitFor(t, 30*time.Second, "recovery from the stall", func() bool {
		st, err := g.Status()
		if err != nil {
			return false
		}
		s, _ := st.Sink(e2e.SinkName)
		m, err := g.Metrics()
		return err == nil && !s.Stalled && s.Healthy && sinkMetric(m, "edgegate_forward_stalled") == 0
	})
	recover := time.Since(clearedAt)
	<-done

	o := measure(t, f, u.coll, time.Minute)
	m = waitDrained(t, g, 30*time.Second)
	record(t, "stall", start, o, fmt.Sprintf("%d devices x %d, detected in %s, recovered in %s, backlog held %.0f",
		len(devs), perDevice, detect.Round(10*time.Millisecond), recover.Round(10*time.Millisecond), held))
	if o.acked != o.sent {
		t.Errorf("acked %d of %d: a stalled upstream must not cost devices their PUBACKs", o.acked, o.sent)
	}
	if sinkMetric(m, "edgegate_forward_stalled") != 0 {
		t.Error("edgegate_forward_stalled still 1 after recovery")
	}
	if err := g.Stop(); err != nil {
		t.Errorf("graceful stop: %v", err)
	}
}

// readyzBody is the JSON body of GET /readyz (gateway.Handler).
type readyzBody struct {
	Ready    bool             `json:"ready"`
	Healthy  bool             `json:"healthy"`
	Problems []string         `json:"problems"`
	Sinks    []e2e.SinkStatus `json:"sinks"`
}

// sink returns the named sink of the body (ok false when absent).
func (b readyzBody) sink(name string) (e2e.SinkStatus, bool) {
	for _, s := range b.Sinks {
		if s.Name == name {
			return s, true
		}
	}
	return e2e.SinkStatus{}, false
}

// readyz GETs /readyz and decodes its body; it fails the test when there is no JSON answer.
func readyz(t *testing.T, g *e2e.Gateway) (int, readyzBody) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, g.HTTPURL()+"/readyz", nil)
	if err != nil {
		t.Fatalf("GET /readyz: %v", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET /readyz: %v", err)
	}
	defer resp.Body.Close()
	var body readyzBody
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatalf("GET /readyz (%d): body is not the expected JSON: %v", resp.StatusCode, err)
	}
	return resp.StatusCode, body
}

// deadUpstream is an MQTT URL nothing listens on: the sink keeps retrying, so its cursor holds every event. It is
// port 1, where no test listens: a port merely free now could be taken by the broker of a test running
// alongside, which would then receive this gateway's events (and its cursor would pass them).
func deadUpstream(t *testing.T) string {
	t.Helper()
	return "tcp://127.0.0.1:1"
}

// publishRound makes every device publish n events with the given PUBACK timeout and returns how many were
// acknowledged.
func publishRound(t *testing.T, f *e2e.Fleet, n int, ackTimeout time.Duration) (sent, acked int) {
	t.Helper()
	s0, a0 := f.Sent(), len(f.Acked())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f.Run(ctx, e2e.Load{PerDevice: n, AckTimeout: ackTimeout})
	return f.Sent() - s0, len(f.Acked()) - a0
}

func freeBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * int64(st.Bsize) // Bsize is int32 on 32-bit ARM
}

// TestDiskFull: the data directory is a small tmpfs. Filled up, the gateway stops acknowledging (no PUBACK),
// stays up and healthy, and acknowledges again once space is freed; the log holds every acknowledged event
// and every record parses. "guard" lets buffer.min_free_bytes act before the filesystem is full; "enospc"
// turns the guard off so commits fail with ENOSPC.
func TestDiskFull(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		minFree int64
		leave   int64 // bytes left free by the filler
	}{
		{"guard", 2 << 20, 1 << 20},
		{"enospc", 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			mnt := e2e.MountTmpfs(t, "8m")
			devs := e2e.Devices("disk-"+tc.name, 10)
			g := e2e.Start(t, bin(t), e2e.Config{Devices: devs, Upstream: deadUpstream(t),
				DataDir: filepath.Join(mnt, "data"), Set: map[string]any{"buffer.min_free_bytes": tc.minFree}})
			f := e2e.NewFleet(t, g.MQTTURL(), devs)

			if sent, acked := publishRound(t, f, 10, 5*time.Second); acked != sent {
				t.Fatalf("before the disk fills: %d of %d acknowledged", acked, sent)
			}
			filler := filepath.Join(mnt, "filler")
			wrote, err := e2e.Fill(filler, freeBytes(t, mnt)-tc.leave)
			if err != nil {
				t.Fatalf("fill: %v", err)
			}
			// Publish until the gateway refuses (free pages inside the log file may take a few first). A refused
			// publish gets no PUBACK at all; the wait for one is long enough that a PUBACK merely slow on a loaded
			// machine is not taken for a refusal.
			const refusedAfter = 2 * time.Second
			refused := 0
			var fullSent, fullAcked int
			for round := 0; round < 20 && refused == 0; round++ {
				s, a := publishRound(t, f, 5, refusedAfter)
				fullSent, fullAcked = fullSent+s, fullAcked+a
				refused += s - a
			}
			if refused == 0 {
				t.Fatalf("the gateway acknowledged every publish with the disk full (%d bytes of filler, %d bytes free)",
					wrote, freeBytes(t, mnt))
			}
			// Once refusing, it keeps refusing while the disk is full.
			if s, a := publishRound(t, f, 2, refusedAfter); a != 0 {
				t.Errorf("disk still full: %d of %d publishes acknowledged, want 0", a, s)
			}
			if !g.Running() {
				t.Fatalf("the gateway exited with the disk full: %v", g.ExitErr())
			}
			if code, err := g.Healthz(); err != nil || code != http.StatusOK {
				t.Errorf("/healthz with the disk full = %d, %v; want 200", code, err)
			}
			m := g.MustMetrics()
			t.Logf("disk full (%s): filler %d bytes, %d bytes free; refused %d; ingest rejected{full} %v, "+
				"buffer rejected %v, commit errors %v, buffer full %v", tc.name, wrote, freeBytes(t, mnt), refused,
				m.Get("edgegate_ingest_rejected_total", "reason", "full"), m.Get("edgegate_buffer_rejected_total"),
				m.Get("edgegate_buffer_commit_errors_total"), m.Get("edgegate_buffer_full"))
			if m.Get("edgegate_ingest_rejected_total", "reason", "full") == 0 {
				t.Error(`edgegate_ingest_rejected_total{reason="full"} = 0 with the disk full`)
			}

			if err := os.Remove(filler); err != nil {
				t.Fatal(err)
			}
			var after int
			e2e.WaitFor(t, 15*time.Second, "acknowledgements after space was freed", func() bool {
				_, a := publishRound(t, f, 1, time.Second)
				after += a
				return a == len(devs)
			})
			if sent, acked := publishRound(t, f, 5, 5*time.Second); acked != sent {
				t.Errorf("after space was freed: %d of %d acknowledged", acked, sent)
			}
			if err := g.Stop(); err != nil {
				t.Errorf("graceful stop: %v", err)
			}
			chk, err := g.CheckLog()
			if err != nil {
				t.Fatalf("log after the disk-full episode: %v", err)
			}
			inLog := map[e2e.Key]bool{}
			for _, k := range chk.Keys {
				inLog[k] = true
			}
			acked := f.Acked()
			var lost []e2e.Key
			for _, k := range acked {
				if !inLog[k] {
					lost = append(lost, k)
				}
			}
			row := e2e.Row{Scenario: "disk-full/" + tc.name, Sent: f.Sent(), Acked: len(acked), Delivered: len(chk.Keys),
				Unique: len(chk.Keys), Lost: len(lost), Elapsed: time.Since(start),
				Note: fmt.Sprintf("8m tmpfs, min_free %d, refused %d while full; delivered = in the log (no upstream)", tc.minFree, refused)}
			report.Add(row)
			t.Logf("%s: sent %d, acked %d, in the log %d (records %d), lost %d", row.Scenario, row.Sent, row.Acked,
				len(chk.Keys), chk.Events, len(lost))
			if len(lost) > 0 {
				t.Errorf("%d acknowledged events are not in the log, e.g. %v", len(lost), lost[:min(10, len(lost))])
			}
		})
	}
}

// TestCapacity: buffer.max_bytes is reached while the upstream is down. "reject": devices get no PUBACK for
// what does not fit and nothing stored is dropped; every acknowledged event arrives once the upstream is back.
// "drop-oldest": every publish is acknowledged, and edgegate_buffer_dropped_total equals exactly the number of
// events that never arrive upstream.
func TestCapacity(t *testing.T) {
	t.Parallel()
	for _, policy := range []string{"reject", "drop-oldest"} {
		t.Run(policy, func(t *testing.T) {
			start := time.Now()
			const maxBytes = 64 << 10
			devs := e2e.Devices("cap-"+policy, 10)
			perDevice := scale(40, 200)
			u := newUpstream(t, false)
			// The link, not the broker, goes down: a stopped broker's port is free for the length of the load,
			// and a test running alongside could take it, so that the broker could not come back on it.
			u.link.Down()
			g := e2e.Start(t, bin(t), e2e.Config{Devices: devs, Upstream: u.url(), Set: map[string]any{
				"buffer.max_bytes": maxBytes,
				"buffer.when_full": policy,
			}})
			f := e2e.NewFleet(t, g.MQTTURL(), devs)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			// A publish the full log refuses gets no PUBACK, so each costs the whole AckTimeout; one the log took
			// but acknowledged after the timeout would count as refused and then arrive upstream (delivered without
			// PUBACK). The timeout is a second where refusals are expected, the default where none are.
			load := e2e.Load{PerDevice: perDevice}
			if policy == "reject" {
				load.AckTimeout = time.Second
			}
			f.Run(ctx, load)
			var dropped, appended float64

			u.link.Up()
			m := waitDrained(t, g, 30*time.Second)
			dropped = m.Sum("edgegate_buffer_dropped_total")
			appended = m.Get("edgegate_buffer_appended_total")
			stored := int(appended - dropped)
			e2e.WaitFor(t, 30*time.Second, fmt.Sprintf("the %d stored events upstream", stored), func() bool {
				return u.coll.Counts().UniqueIDs >= stored
			})
			o := measure(t, f, u.coll, 0) // everything that can arrive has arrived
			missing := int(appended) - o.counts.UniqueIDs
			note := fmt.Sprintf("max_bytes %d, when_full %s; appended %.0f, dropped %.0f, missing upstream %d",
				maxBytes, policy, appended, dropped, missing)

			switch policy {
			case "reject":
				// Lost here is what the drop policy may not explain: with reject nothing may be dropped.
				record(t, "capacity/"+policy, start, o, note)
				if o.acked >= o.sent {
					t.Errorf("acked %d of %d: max_bytes was never reached", o.acked, o.sent)
				}
				if dropped != 0 {
					t.Errorf("edgegate_buffer_dropped_total = %v with when_full reject, want 0", dropped)
				}
				if o.deliveredNotAk != 0 {
					t.Errorf("%d events arrived upstream that the devices got no PUBACK for", o.deliveredNotAk)
				}
				if missing != 0 {
					t.Errorf("%d stored events never arrived upstream", missing)
				}
			case "drop-oldest":
				// Acknowledged events that were dropped are accounted for by the counter, not lost.
				o2 := o
				o2.lost = nil
				record(t, "capacity/"+policy, start, o2, note)
				if o.acked != o.sent {
					t.Errorf("acked %d of %d: drop-oldest must acknowledge every publish", o.acked, o.sent)
				}
				if dropped == 0 {
					t.Error("nothing dropped: max_bytes was never reached")
				}
				if missing != int(dropped) {
					t.Errorf("edgegate_buffer_dropped_total = %v, but %d stored events are missing upstream", dropped, missing)
				}
				if len(o.lost) > int(dropped) {
					t.Errorf("%d acknowledged device events missing upstream, more than the %v dropped", len(o.lost), dropped)
				}
			}
			if err := g.Stop(); err != nil {
				t.Errorf("graceful stop: %v", err)
			}
		})
	}
}
