//go:build unix

package bridgebench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// env is one run's processes and clients.
type env struct {
	o        Options
	dir      string
	cloud    *mosquitto
	edge     *mosquitto   // bridge systems
	gw       *gatewayProc // gateway
	sutPid   int
	sub      *subscriber
	devs     []*device // the bench devices
	live     *device   // drain only
	probeSeq int
}

// sutLog returns the tail of the system under test's log, for errors.
func (e *env) sutLog() string {
	if e.gw != nil {
		return tailFile(e.gw.logPath(), 20)
	}
	if e.edge != nil {
		return tailFile(e.edge.logPath(), 20)
	}
	return ""
}

// setup starts the cloud broker, the system under test, the subscriber and the devices, and waits until a
// probe message goes all the way through. With live, one more device (index o.Devices) is connected.
func setup(ctx context.Context, o Options, live bool) (_ *env, err error) {
	dir, err := os.MkdirTemp(o.WorkDir, "bridgebench-")
	if err != nil {
		return nil, fmt.Errorf("bridgebench: %w", err)
	}
	e := &env{o: o, dir: dir}
	defer func() {
		if err != nil {
			e.close()
		}
	}()

	// The cloud keeps everything for its subscriber and sends without an in-flight limit, so it is never the
	// part that loses or slows messages.
	e.cloud, err = newMosquitto("cloud mosquitto", o.MosquittoBinary, filepath.Join(dir, "cloud"),
		"max_queued_messages 0", "max_inflight_messages 0")
	if err != nil {
		return e, fmt.Errorf("bridgebench: %w", err)
	}
	if err := e.cloud.start(ctx); err != nil {
		return e, fmt.Errorf("bridgebench: %w", err)
	}

	ids := make([]string, 0, o.Devices+1)
	for i := range o.Devices {
		ids = append(ids, fmt.Sprintf("bench-%03d", i))
	}
	if live {
		ids = append(ids, liveDeviceID)
	}

	var deviceURL, filter string
	switch o.System {
	case Gateway:
		bin := o.GatewayBinary
		if bin == "" {
			o.Logf("building %s", GatewayPackage)
			if bin, err = BuildGateway(ctx, dir); err != nil {
				return e, fmt.Errorf("bridgebench: %w", err)
			}
		}
		e.gw, err = writeGatewayConfig(filepath.Join(dir, "gateway"), ids, e.cloud.url(), o)
		if err != nil {
			return e, fmt.Errorf("bridgebench: %w", err)
		}
		if err := e.gw.start(ctx, bin, o.GatewayProcs); err != nil {
			return e, fmt.Errorf("bridgebench: %w", err)
		}
		e.sutPid, deviceURL, filter = e.gw.proc.Pid(), e.gw.url(), eventTopicFilter
		o.Logf("gateway: pid %d, mqtt %s, directory %s", e.sutPid, e.gw.addr(), e.gw.dir)
	case MosquittoBridge, MosquittoBridgeDefaults:
		lines := []string{}
		if o.System == MosquittoBridge {
			lines = append(lines, "max_queued_messages 0")
		}
		switch {
		case o.BridgeInflight > 0:
			lines = append(lines, fmt.Sprintf("max_inflight_messages %d", o.BridgeInflight))
		case o.BridgeInflight < 0:
			lines = append(lines, "max_inflight_messages 0")
		}
		lines = append(lines,
			"connection cloud",
			"address "+e.cloud.addr(),
			"clientid edge-bridge",
			"topic devices/# out 1",
			"cleansession false",
			"bridge_attempt_unsubscribe false",
			"bridge_protocol_version mqttv311",
			"restart_timeout 1 1",
		)
		e.edge, err = newMosquitto("edge mosquitto", o.MosquittoBinary, filepath.Join(dir, "edge"), lines...)
		if err != nil {
			return e, fmt.Errorf("bridgebench: %w", err)
		}
		if err := e.edge.start(ctx); err != nil {
			return e, fmt.Errorf("bridgebench: %w", err)
		}
		e.sutPid, deviceURL, filter = e.edge.proc.Pid(), e.edge.url(), "devices/#"
		o.Logf("%s: edge mosquitto pid %d, mqtt %s, directory %s", o.System, e.sutPid, e.edge.addr(), e.edge.dir)
	}

	liveDev := -2 // online: every message's latency
	if live {
		liveDev = o.Devices
	}
	if e.sub, err = connectSubscriber(ctx, e.cloud.url(), filter, o.System == Gateway, liveDev); err != nil {
		return e, fmt.Errorf("bridgebench: %w", err)
	}
	for i, id := range ids {
		d, err := connectDevice(ctx, deviceURL, id, i)
		if err != nil {
			return e, fmt.Errorf("bridgebench: %w\n%s", err, e.sutLog())
		}
		if i < o.Devices {
			e.devs = append(e.devs, d)
		} else {
			e.live = d
		}
	}
	if err := e.probe(ctx, 30*time.Second); err != nil {
		return e, err
	}
	return e, nil
}

// probe publishes probe messages until one arrives at the subscriber.
func (e *env) probe(ctx context.Context, timeout time.Duration) error {
	before := e.sub.probes.Load()
	deadline := time.Now().Add(timeout)
	d := e.devs[0]
	for {
		e.probeSeq++
		tok := d.cl.Publish(d.topic, 1, false, payload(probeDevice, e.probeSeq, time.Now(), e.o.PayloadBytes))
		if err := waitToken(ctx, tok, 10*time.Second); err != nil {
			return fmt.Errorf("bridgebench: probe: %w\n%s", err, e.sutLog())
		}
		wait := time.Now().Add(200 * time.Millisecond)
		for time.Now().Before(wait) {
			if e.sub.probes.Load() > before {
				return nil
			}
			if err := sleepCtx(ctx, 5*time.Millisecond); err != nil {
				return err
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("bridgebench: %w within %s\n%s", errNoPath, timeout, e.sutLog())
		}
	}
}

func (e *env) close() {
	if e.sub != nil {
		e.sub.close()
	}
	for _, d := range append(slices.Clone(e.devs), e.live) {
		if d != nil {
			d.close()
		}
	}
	if e.gw != nil && e.gw.proc != nil {
		e.gw.proc.Kill()
	}
	if e.edge != nil {
		e.edge.kill()
	}
	if e.cloud != nil {
		e.cloud.kill()
	}
	if !e.o.KeepDir {
		_ = os.RemoveAll(e.dir)
	} else {
		e.o.Logf("kept %s", e.dir)
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// publishAll has every bench device publish its share of total messages (seq numbers from 0) at full speed and
// waits until all are acknowledged or failed.
func (e *env) publishAll(ctx context.Context, perDevice func(i int) int) error {
	var wg sync.WaitGroup
	errs := make([]error, len(e.devs))
	for i, d := range e.devs {
		wg.Go(func() { errs[i] = d.publishN(ctx, 0, perDevice(i), e.o.Inflight, e.o.PayloadBytes) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// waitDelivered waits until every acknowledged bench message has arrived, nothing new has arrived for
// StallTimeout, or ctx ends. want is the number of acknowledged bench messages.
func (e *env) waitDelivered(ctx context.Context, want int, count func() int) {
	last, lastChange := count(), time.Now()
	for last < want {
		if sleepCtx(ctx, 5*time.Millisecond) != nil {
			return
		}
		n := count()
		if n != last {
			last, lastChange = n, time.Now()
		} else if time.Since(lastChange) > e.o.StallTimeout {
			e.o.Logf("%s: nothing new for %s; %d of %d arrived", e.o.System, e.o.StallTimeout, n, want)
			return
		}
	}
}

// benchCounts fills the counts of the bench devices' messages.
func (e *env) benchCounts(r *Result) {
	for _, d := range e.devs {
		r.Sent += d.sent
		r.Acked += d.acked
		del, uniq := e.sub.totals(d.idx)
		r.Delivered += del
		r.Unique += uniq
		_, lost := e.sub.countKeys(d.idx, d.ackedSeq)
		r.Lost += lost
	}
	r.Duplicates = r.Delivered - r.Unique
	if e.o.System == Gateway {
		r.UniqueIDs = e.sub.idCount()
	}
	r.Malformed = e.sub.malformedCount()
}

// snap is the resource use of the processes of a run at one moment.
type snap struct {
	sut, cloud, self Usage
	cloudPid         int
}

func (e *env) snapshot() snap {
	var s snap
	s.sut, _ = ReadUsage(e.sutPid)
	if e.cloud.proc != nil && !e.cloud.proc.Exited() {
		s.cloudPid = e.cloud.proc.Pid()
		s.cloud, _ = ReadUsage(s.cloudPid)
	}
	s.self, _ = ReadUsage(os.Getpid())
	return s
}

// usage fills the resource use since before; over is the measured phase's length.
func (e *env) usage(r *Result, before snap, over time.Duration) {
	after := e.snapshot()
	if after.sut.HWMKiB == 0 {
		e.o.Logf("%s: no resource use of pid %d (no /proc?)", e.o.System, e.sutPid)
		return
	}
	r.CPU = after.sut.CPU - before.sut.CPU
	if after.cloudPid == before.cloudPid {
		r.CloudCPU = after.cloud.CPU - before.cloud.CPU
	} else {
		r.CloudCPU = after.cloud.CPU // restarted during the phase
	}
	r.BenchCPU = after.self.CPU - before.self.CPU
	if over > 0 {
		r.CPUPercent = 100 * r.CPU.Seconds() / over.Seconds()
	}
	r.RSS, r.PeakRSS = after.sut.RSSKiB<<10, after.sut.HWMKiB<<10
}

func prepare(ctx context.Context, o Options) (Options, context.Context, context.CancelFunc, error) {
	o = o.withDefaults()
	if err := o.validate(); err != nil {
		return o, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	return o, ctx, cancel, nil
}

// RunOnline measures forwarding with everything up: Devices devices publish Messages QoS 1 messages each as
// fast as Inflight allows; Rate is the distinct messages delivered per second from the first publish to the
// last arrival. Every process it starts is gone when it returns.
func RunOnline(ctx context.Context, o Options) (Result, error) {
	o, ctx, cancel, err := prepare(ctx, o)
	if err != nil {
		return Result{}, err
	}
	defer cancel()
	r := Result{Scenario: "online", System: o.System}
	e, err := setup(ctx, o, false)
	if err != nil {
		return r, err
	}
	defer e.close()

	before := e.snapshot()
	o.Logf("%s: online: %d devices x %d messages", o.System, o.Devices, o.Messages)
	start := time.Now()
	pubErr := e.publishAll(ctx, func(int) int { return o.Messages })
	r.PublishDuration = time.Since(start)
	acked := 0
	for _, d := range e.devs {
		acked += d.acked
	}
	e.waitDelivered(ctx, acked, func() int { return int(e.sub.uniqueN.Load()) })
	_, last := e.sub.times()
	r.Duration = last.Sub(start)
	e.usage(&r, before, r.Duration)
	e.benchCounts(&r)
	if r.Duration > 0 {
		r.Rate = float64(r.Unique) / r.Duration.Seconds()
	}
	lat := e.sub.liveArrivals()
	fillLatency(&r, lat, func(arrival) bool { return true })
	if pubErr != nil {
		return r, fmt.Errorf("bridgebench: online: %w", pubErr)
	}
	return r, ctx.Err()
}

// RunDrain measures the drain of a backlog: the cloud broker is stopped, Devices devices publish Backlog
// messages together, the cloud broker is started again, and Duration is from then to the arrival of the last
// backlog message; meanwhile one more device publishes LiveRate messages per second whose latency is
// measured. Every process it starts is gone when it returns.
func RunDrain(ctx context.Context, o Options) (Result, error) {
	o, ctx, cancel, err := prepare(ctx, o)
	if err != nil {
		return Result{}, err
	}
	defer cancel()
	r := Result{Scenario: "drain", System: o.System}
	e, err := setup(ctx, o, true)
	if err != nil {
		return r, err
	}
	defer e.close()

	o.Logf("%s: drain: cloud down, %d devices publish %d messages", o.System, o.Devices, o.Backlog)
	e.cloud.stop()
	share := func(i int) int {
		n := o.Backlog / o.Devices
		if i < o.Backlog%o.Devices {
			n++
		}
		return n
	}
	start := time.Now()
	if err := e.publishAll(ctx, share); err != nil {
		return r, fmt.Errorf("bridgebench: drain: publish the backlog: %w\n%s", err, e.sutLog())
	}
	r.PublishDuration = time.Since(start)
	acked := 0
	for _, d := range e.devs {
		acked += d.acked
	}

	before := e.snapshot()
	liveCtx, stopLive := context.WithCancel(ctx)
	defer stopLive()
	liveDone := make(chan struct{})
	go func() {
		defer close(liveDone)
		e.live.publishAt(liveCtx, 0, o.LiveRate, 1000, o.PayloadBytes)
	}()
	restore := time.Now()
	o.Logf("%s: drain: backlog of %d published in %s; cloud back", o.System, acked, r.PublishDuration.Round(time.Millisecond))
	if err := e.cloud.start(ctx); err != nil {
		stopLive()
		<-liveDone
		return r, fmt.Errorf("bridgebench: drain: restart the cloud broker: %w", err)
	}
	e.waitDelivered(ctx, acked, func() int {
		n := 0
		for _, d := range e.devs {
			_, u := e.sub.totals(d.idx)
			n += u
		}
		return n
	})
	first, last := e.sub.times()
	e.usage(&r, before, max(0, last.Sub(restore)))
	drained := last
	if err := sleepCtx(ctx, o.LiveTail); err == nil {
		stopLive()
	}
	<-liveDone
	// The live messages still on their way.
	e.waitDelivered(ctx, e.live.acked, func() int { _, u := e.sub.totals(e.live.idx); return u })

	e.benchCounts(&r)
	if !last.IsZero() {
		r.Duration = last.Sub(restore)
		r.FirstDelivery = first.Sub(restore)
		r.Rate = float64(r.Unique) / r.Duration.Seconds()
		if d := last.Sub(first); d > 0 {
			r.TransferRate = float64(r.Unique) / d.Seconds()
		}
	}
	r.LiveSent, r.LiveAcked = e.live.sent, e.live.acked
	_, r.LiveUnique = e.sub.totals(e.live.idx)
	_, r.LiveLost = e.sub.countKeys(e.live.idx, e.live.ackedSeq)
	lat := e.sub.liveArrivals()
	from, to := restore.UnixMicro(), drained.UnixMicro()
	fillLatency(&r, lat, func(a arrival) bool { return a.sent >= from && a.sent <= to })
	var after []time.Duration
	for _, a := range lat {
		if a.sent > to {
			after = append(after, a.latency)
		}
	}
	slices.Sort(after)
	r.AfterP99 = percentile(after, 99)
	return r, ctx.Err()
}

func fillLatency(r *Result, arrivals []arrival, keep func(arrival) bool) {
	var l []time.Duration
	for _, a := range arrivals {
		if keep(a) {
			l = append(l, a.latency)
		}
	}
	slices.Sort(l)
	r.LatencySamples = len(l)
	r.LatencyP50, r.LatencyP99 = percentile(l, 50), percentile(l, 99)
	if len(l) > 0 {
		r.LatencyMax = l[len(l)-1]
	}
}
