package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/deadletter"
	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/ingest"
	"github.com/edgegate/edgegate/rules"
)

// Gateway is one running edgegate: every part, wired.
type Gateway struct {
	cfg      Config
	log      *slog.Logger
	reg      *prometheus.Registry
	registry *devices.Registry
	state    *devices.StateView
	dead     *deadletter.Store
	events   *buffer.Log
	norm     *ingest.Normalizer
	broker   *ingest.Broker
	rules    *rules.Engine
	fwd      *forward.Forwarder
	httpLn   net.Listener
	ready    atomic.Bool
	started  time.Time

	saveMu     sync.Mutex // one save of the device state at a time
	savedState uint64     // the state view's Changes at the last save or load
	stateSeq   uint64     // the log's end at the previous save of the state view (saveMu), or at start
	reloads    *prometheus.CounterVec

	ran      atomic.Bool                                                                    // Run was called
	wrapPart func(name string, run func(context.Context) error) func(context.Context) error // tests: how a part runs
}

// New validates the configuration, opens the data directory, loads the registry and the rules, and binds the
// listeners. It starts nothing: Run does. On error everything opened so far is closed again.
func New(cfg Config, logger *slog.Logger, reg *prometheus.Registry) (gw *Gateway, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	g := &Gateway{cfg: cfg, log: logger.With("component", "gateway"), reg: reg}
	var closers []func()
	defer func() {
		if err != nil {
			for i := len(closers) - 1; i >= 0; i-- {
				closers[i]()
			}
		}
	}()

	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("gateway: data_dir: %w", err)
	}
	if g.registry, err = devices.LoadRegistry(cfg.Devices.Registry); err != nil {
		return nil, fmt.Errorf("gateway: devices.registry: %w", err)
	}
	g.state = devices.NewStateView()
	statePos := g.loadState()

	if g.dead, err = deadletter.Open(filepath.Join(cfg.DataDir, "deadletter.db"), cfg.DeadLetter, logger, reg); err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	closers = append(closers, func() { _ = g.dead.Close() })
	dl := deadLetters{store: g.dead, log: g.log}

	src := &logSource{}
	if g.fwd, err = forward.New(cfg.Forward, cfg.ID, src, commandSink{g: g}, dl, logger, reg); err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}

	bcfg := cfg.Buffer
	bcfg.Path = filepath.Join(cfg.DataDir, "events.db")
	bcfg.Cursors = g.fwd.CursorNames()
	if g.events, err = buffer.Open(bcfg, logger, reg); err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	closers = append(closers, func() { _ = g.events.Close() })
	src.log = g.events
	g.replayState(statePos)
	g.stateSeq = g.events.LastSeq() // every event up to here is in the view, or lost with the log

	if g.norm, err = ingest.NewNormalizer(cfg.ID, cfg.Ingest); err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}

	rcfg := cfg.RulesConfig()
	rcfg.StateFile = filepath.Join(cfg.DataDir, "rules-state.json")
	em := &emitter{g: g}
	g.rules, err = rules.New(rcfg, rules.Deps{
		Directory:   directory{reg: g.registry},
		Commander:   commander{g: g},
		Emitter:     em,
		State:       g.state,
		DeadLetters: dl,
	}, logger, reg)
	if err != nil {
		return nil, fmt.Errorf("gateway: rules: %w", err)
	}

	// The admin listener is bound before the broker's: the broker has no way to release its listeners if a later
	// step failed.
	if cfg.HTTP.Listen != "off" {
		ln, err := net.Listen("tcp", cfg.HTTP.Listen)
		if err != nil {
			if isAddrInUse(err) {
				return nil, fmt.Errorf("gateway: listen http.listen: port %s is already in use: change http.listen in the config: %w", portOf(cfg.HTTP.Listen), err)
			}
			return nil, fmt.Errorf("gateway: listen http.listen: %w", err)
		}
		g.httpLn = ln
		closers = append(closers, func() { _ = ln.Close() })
	}
	g.broker, err = ingest.NewBroker(cfg.MQTT, ingest.Deps{
		Normalizer:  g.norm,
		Auth:        g.registry,
		ACL:         g.registry,
		Consumer:    consumer{g: g},
		DeadLetters: dl,
	}, logger, reg)
	if err != nil {
		return nil, err
	}

	g.registerMetrics()
	return g, nil
}

// stopGrace is how long Run still waits for the parts once shutdown_timeout has passed and every one of them has
// been told to stop at once: Run returns at the latest shutdown_timeout + stopGrace after it began to stop.
const stopGrace = time.Second

// Run runs every part until ctx ends or one of them fails (returns an error or panics). Downstream parts start
// first; on stop the broker stops first (no new events), then rules and sinks, then the device state is saved and
// the log commits what is queued and closes. It returns the errors of the parts that failed.
//
// The stop is bounded: once shutdown_timeout has passed every part still running is told to stop at once, and a
// part that has not returned stopGrace later is left behind: Run returns an error that names it. What such a part
// may still use (the dead-letter store) is closed once it has returned.
//
// A gateway runs once: a second call returns an error at once.
func (g *Gateway) Run(ctx context.Context) error {
	if !g.ran.CompareAndSwap(false, true) {
		return errors.New("gateway: run: this gateway has already been run (New makes another)")
	}
	g.started = time.Now()
	// Three stop stages, in order: ingest, then rules/forward/http, then the log.
	ingestCtx, stopIngest := context.WithCancel(context.Background())
	midCtx, stopMid := context.WithCancel(context.Background())
	logCtx, stopLog := context.WithCancel(context.Background())
	defer stopIngest()
	defer stopMid()
	defer stopLog()

	failed := make(chan struct{})
	var failOnce sync.Once
	fail := func() { failOnce.Do(func() { close(failed) }) }
	start := func(ctx context.Context, name string, run func(context.Context) error) *runningPart {
		if g.wrapPart != nil {
			run = g.wrapPart(name, run)
		}
		return g.startPart(ctx, name, run, fail)
	}

	logPart := start(logCtx, "buffer", g.events.Run)
	saver := start(midCtx, "device state", func(ctx context.Context) error { g.saveStateEvery(ctx); return nil })
	mid := []*runningPart{start(midCtx, "forward", g.fwd.Run), start(midCtx, "rules", g.rules.Run), saver}
	var srv *http.Server
	if g.httpLn != nil {
		// Bounded: an idle keep-alive connection, or a client that stops reading, does not hold the server.
		srv = &http.Server{Handler: g.Handler(), ReadHeaderTimeout: 5 * time.Second, WriteTimeout: 30 * time.Second,
			IdleTimeout: time.Minute, MaxHeaderBytes: 64 << 10}
		mid = append(mid, start(midCtx, "http", func(context.Context) error {
			if err := srv.Serve(g.httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("gateway: http: %w", err)
			}
			return nil
		}))
		g.log.Info("admin http ready", "addr", g.httpLn.Addr().String())
	}
	ingestPart := start(ingestCtx, "ingest", g.broker.Run)
	g.ready.Store(true)
	g.log.Info("gateway running", "id", g.cfg.ID, "data_dir", g.cfg.DataDir, "devices", g.registry.Len())

	select {
	case <-ctx.Done():
		g.log.Info("stopping")
	case <-failed:
	}
	g.ready.Store(false)
	timeout := g.cfg.ShutdownTimeout
	force := time.AfterFunc(timeout, func() {
		g.log.Error("graceful stop took too long; stopping everything now", "timeout", timeout)
		stopMid()
		stopLog()
	})
	defer force.Stop()
	giveUp, cancelGiveUp := context.WithTimeout(context.Background(), timeout+stopGrace)
	defer cancelGiveUp()

	stopIngest()
	stuck := waitParts(giveUp.Done(), ingestPart)
	stopMid()
	if srv != nil {
		sctx, cancel := context.WithTimeout(giveUp, 2*time.Second)
		if err := srv.Shutdown(sctx); err != nil {
			_ = srv.Close() // requests still running end now, before the parts they read are closed
		}
		cancel()
	}
	stuck = append(stuck, waitParts(giveUp.Done(), mid...)...)
	// After the rules: their last state actions are in it. With ingest or the rules still running, the view may
	// still change: it is saved at the position of the previous save, from where a start replays the log.
	if slices.Contains(stuck, saver) {
		g.log.Error("device state not saved at stop: the previous save has not finished")
	} else {
		g.saveState(len(stuck) == 0)
	}
	stopLog()
	stuck = append(stuck, waitParts(giveUp.Done(), logPart)...)

	all := append([]*runningPart{ingestPart}, mid...)
	all = append(all, logPart)
	if len(stuck) == 0 {
		g.closeDeadLetters()
		g.log.Info("stopped")
		return partErrors(all)
	}
	names := make([]string, len(stuck))
	for i, p := range stuck {
		names[i] = p.name
	}
	// The parts left behind may still write dead letters: the store is closed once they have returned.
	go func() {
		for _, p := range stuck {
			<-p.done
		}
		g.closeDeadLetters()
		g.log.Info("the parts that did not stop in time have returned; dead letters closed", "parts", names)
	}()
	g.log.Error("stopped, leaving behind parts that did not stop within shutdown_timeout", "parts", names,
		"timeout", timeout)
	return errors.Join(partErrors(all), fmt.Errorf("gateway: stop: %s did not stop within shutdown_timeout (%s)",
		strings.Join(names, ", "), timeout))
}

// runningPart is a part Run started: done is closed once its Run has returned, err is then its error.
type runningPart struct {
	name string
	done chan struct{}
	err  error
}

// startPart runs run(ctx) in a goroutine. An error, or a panic (turned into an error, logged with its stack),
// calls fail.
func (g *Gateway) startPart(ctx context.Context, name string, run func(context.Context) error, fail func()) *runningPart {
	p := &runningPart{name: name, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		defer func() {
			if r := recover(); r != nil {
				p.err = fmt.Errorf("gateway: %s: panic: %v", name, r)
				g.log.Error("part panicked", "part", name, "panic", r, "stack", string(debug.Stack()))
				fail()
			}
		}()
		if err := run(ctx); err != nil {
			p.err = err
			g.log.Error("part failed", "part", name, "error", err)
			fail()
		}
	}()
	return p
}

// waitParts waits for the parts to return until giveUp is closed, and returns those that have not.
func waitParts(giveUp <-chan struct{}, parts ...*runningPart) (stuck []*runningPart) {
	for _, p := range parts {
		select {
		case <-p.done:
			continue
		default:
		}
		select {
		case <-p.done:
		case <-giveUp:
			stuck = append(stuck, p)
		}
	}
	return stuck
}

// partErrors joins the errors of the parts that have returned.
func partErrors(parts []*runningPart) error {
	var errs []error
	for _, p := range parts {
		select {
		case <-p.done:
			errs = append(errs, p.err)
		default:
		}
	}
	return errors.Join(errs...)
}

// closeDeadLetters closes the dead-letter store.
func (g *Gateway) closeDeadLetters() {
	if err := g.dead.Close(); err != nil {
		g.log.Warn("close dead letters", "error", err)
	}
}

// ReloadDevices reads the device registry file again and, if it is valid, puts it in force at once: new devices
// can connect, rules select on the new metadata, and every connection of a device that is gone, or whose
// credentials or grants changed, is closed (it reconnects under its new entry, if it has one). A bad file keeps the
// previous registry in force; the error names the file, with line and field. So does a file without a device list
// while devices are registered (an explicit `devices: []` removes them all). It returns the ids of the devices
// whose access changed.
func (g *Gateway) ReloadDevices() ([]string, error) {
	next, err := devices.LoadRegistry(g.cfg.Devices.Registry)
	if err == nil && !next.Listed() && g.registry.Len() > 0 {
		// An empty file is most often one being written (a shell redirect, an editor that truncates first):
		// taking it would disconnect every device.
		err = fmt.Errorf("%s has no device list (empty, or caught while being written); to remove every device, "+
			"write `devices: []`", g.cfg.Devices.Registry)
	}
	if err != nil {
		g.reloads.WithLabelValues("devices", "error").Inc()
		return nil, fmt.Errorf("gateway: devices.registry: reload (the previous registry stays in force): %w", err)
	}
	g.reloads.WithLabelValues("devices", "ok").Inc()
	changed := g.registry.Replace(next)
	closed := 0
	for _, id := range changed {
		closed += g.broker.Revoke(id)
	}
	g.log.Info("device registry reloaded", "devices", g.registry.Len(), "access_changed", changed,
		"connections_closed", closed)
	return changed, nil
}

// ReloadTLS loads the certificate, key and client CAs of the MQTT TLS listener again, for new connections; if they
// do not load, the previous ones stay in use and the error says why. Without a TLS listener it does nothing.
func (g *Gateway) ReloadTLS() error {
	notAfter, err := g.broker.ReloadTLS()
	if err != nil {
		g.reloads.WithLabelValues("tls", "error").Inc()
		return fmt.Errorf("gateway: mqtt.tls: reload: %w", err)
	}
	if !notAfter.IsZero() {
		g.reloads.WithLabelValues("tls", "ok").Inc()
		g.log.Info("TLS certificate reloaded", "not_after", notAfter)
	}
	return nil
}

// statePath is the file of the device state view.
func (g *Gateway) statePath() string { return filepath.Join(g.cfg.DataDir, "device-state.json") }

// loadState loads the device state view saved by the previous run and returns the log position it was saved at
// (0: none). A file that cannot be read as one is moved aside (named in the log) and the view starts empty: it
// fills again as devices report.
func (g *Gateway) loadState() (logSeq uint64) {
	n, pos, err := g.state.LoadAt(g.statePath())
	if err == nil {
		g.savedState = g.state.Changes()
		if n > 0 {
			g.log.Info("device state loaded", "path", g.statePath(), "devices", n)
		}
		return pos
	}
	aside := fmt.Sprintf("%s.bad-%s", g.statePath(), time.Now().UTC().Format("20060102T150405Z"))
	if rerr := os.Rename(g.statePath(), aside); rerr != nil {
		g.log.Error("device state not loaded; starting without it", "error", err, "move_aside_error", rerr)
		return 0
	}
	g.log.Error("device state not loaded; the file is moved aside and the view starts empty", "error", err,
		"moved_to", aside)
	return 0
}

// maxStateReplay bounds the events replayed into the device state view at start: the newest ones, so that a
// start long after the view's last save stays quick (the view then misses only what the older ones alone said).
const maxStateReplay = 100_000

// replayState applies to the device state view the events the log holds after pos, the position its file was
// saved at (0 when there is no file or it has none: every event the log holds): what a kill -9 took from the view
// since its last save. The rules do not see them again. Events already
// removed from the log (delivered, or dropped by retention) cannot be replayed; the view gets their devices'
// news from their next events.
func (g *Gateway) replayState(pos uint64) {
	last := g.events.LastSeq()
	switch {
	case last == pos: // nothing after the saved position (with pos 0: the log has never had an event)
		return
	case last < pos:
		g.log.Warn("device state: saved at a log position the log has not reached (a new log?); nothing replayed",
			"state_seq", pos, "log_seq", last)
		return
	}
	from, skipped := pos, uint64(0)
	if last-from > maxStateReplay {
		skipped, from = last-maxStateReplay-from, last-maxStateReplay
	}
	if first := g.events.FirstSeq(); first == 0 || first > last {
		from = last
	} else if first > from+1 {
		from = first - 1
	}
	start := time.Now()
	var n, bad int
	for after := from; after < last; {
		recs, err := g.events.Read(after, 1024)
		if err != nil {
			g.log.Warn("device state: replay from the log stopped", "after_seq", after, "error", err)
			break
		}
		if len(recs) == 0 {
			break
		}
		for i := range recs {
			if recs[i].Seq > last {
				break
			}
			ev := event.New()
			if err := ev.UnmarshalJSON(recs[i].Data); err != nil {
				bad++
				continue
			}
			g.state.Replay(&ev)
			n++
		}
		after = recs[len(recs)-1].Seq
	}
	g.log.Info("device state: replayed the log's events since its last save", "events", n, "after_seq", pos,
		"to_seq", last, "skipped_oldest", skipped, "unreadable", bad, "took", time.Since(start).Round(time.Millisecond))
}

// saveStateEvery saves the device state view every devices.state_save_interval while it changes, until ctx ends.
func (g *Gateway) saveStateEvery(ctx context.Context) {
	tick := time.NewTicker(g.cfg.Devices.StateSaveInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			g.saveState(false)
		}
	}
}

// saveState saves the device state view if it changed since the last save; a failure is logged and retried by the
// next save. The file records a log position that the view holds every event up to, from where a start after a
// crash replays the log. An event is applied to the view as it is queued, before its commit, but the goroutine
// queueing it could in principle be held up past the commit; so while the gateway runs the position is the log's
// end as the previous save saw it, long since applied (a replay may apply some events again, which leaves the
// view as it was). The final save, with ingest and the rules stopped, takes the log's end.
func (g *Gateway) saveState(final bool) {
	g.saveMu.Lock()
	defer g.saveMu.Unlock()
	end := g.events.LastSeq()
	pos := g.stateSeq
	if final {
		pos = end
	}
	g.stateSeq = end
	changes := g.state.Changes()
	if changes == g.savedState {
		return
	}
	if err := g.state.SaveAt(g.statePath(), pos); err != nil {
		g.log.Error("device state not saved", "error", err)
		return
	}
	g.savedState = changes
}

// Ready reports whether every listener is bound and every part is running.
func (g *Gateway) Ready() bool { return g.ready.Load() }

// MQTTAddr returns the bound address of an MQTT listener ("tcp", "tls" or "ws").
func (g *Gateway) MQTTAddr(listener string) string { return g.broker.Addr(listener) }

// HTTPAddr returns the bound admin API address, or "" when it is off.
func (g *Gateway) HTTPAddr() string {
	if g.httpLn == nil {
		return ""
	}
	return g.httpLn.Addr().String()
}

// Log returns the durable event log (for tests and tools running in the same process).
func (g *Gateway) Log() *buffer.Log { return g.events }

// State returns the live device state view.
func (g *Gateway) State() *devices.StateView { return g.state }

// Rules returns the rule engine (for SIGHUP reloads).
func (g *Gateway) Rules() *rules.Engine { return g.rules }

// DeadLetters returns the dead-letter store.
func (g *Gateway) DeadLetters() *deadletter.Store { return g.dead }

func (g *Gateway) registerMetrics() {
	g.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_gateway_reloads_total",
		Help: "Reloads of the device registry (what=devices) and of the MQTT TLS certificate (what=tls), by result (ok, error)."},
		[]string{"what", "result"})
	g.reg.MustRegister(g.reloads)
	g.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "edgegate_gateway_ready", Help: "1 when every part is running.",
	}, func() float64 {
		if g.ready.Load() {
			return 1
		}
		return 0
	}), prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "edgegate_gateway_stalled", Help: "Parts stuck in one step for longer than stall_timeout (see /healthz).",
	}, func() float64 { return float64(len(g.Stalls())) }))
}
