package rules

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/fsnotify/fsnotify"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
)

// ErrRunning is returned by Run when the engine is already running.
var ErrRunning = errors.New("rules: engine is already running")

// ErrEvalPanic marks the evaluation error of a rule whose handling of an event panicked; the panic is contained
// to that rule and that event.
var ErrEvalPanic = errors.New("rules: evaluation panicked")

// reloadSettle is how long the watcher waits after the last change of a rule file before reloading (editors
// write a file in several steps).
const reloadSettle = 250 * time.Millisecond

// Engine evaluates the rules against every submitted event, one event at a time, and carries out their actions.
type Engine struct {
	started atomic.Int64 // when Run started (unix ns): commands wait for offline devices until offlineHold after
	cfg     Config
	deps    Deps
	log     *slog.Logger
	met     *metrics
	clock   Clock
	limiter *logLimiter

	queue     chan *event.Event
	queued    atomic.Int64  // events submitted to queue and not yet evaluated
	evalSince atomic.Int64  // when the evaluation in progress began (Unix ns), 0 when none is; set with mu held
	lanes     *commandLanes // the commands, in order per device
	cmds      chan string   // devices whose lane is ready, for the workers
	wake      chan struct{}

	set      atomic.Pointer[ruleSet] // the rules in force (read by Submit and Rules)
	running  atomic.Bool
	reloadMu sync.Mutex // one Reload at a time; guards stamp
	stamp    string     // the rule files as last read (names, sizes, times)

	// writeState writes the state file (writeStateFile; a test may slow it down).
	writeState func(path string, sf *stateFile) error

	mu       sync.Mutex // guards m, wakeAt, wakeStop, runCtx, handoff
	m        *machine
	handoff  []commandJob // commands sent during an evaluation, for the workers once it is over
	wakeAt   time.Time
	wakeStop Stopper
	runCtx   context.Context
}

type commandJob struct {
	rule    *rule
	cause   string
	device  string
	command string
	payload []byte
	sent    func(context.Context) error // the first attempt, already sent by the evaluation (CommandSender)
}

// New loads the rules in cfg.Dir and the state saved in cfg.StateFile. An invalid rule set is an error listing
// every problem as file:line: key: message (errors.Is(err, ErrInvalidRules)). Nothing runs until Run.
func New(cfg Config, deps Deps, logger *slog.Logger, reg prometheus.Registerer) (*Engine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("rules: config: %w", err)
	}
	cfg = cfg.withDefaults()
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	logger = logger.With("component", "rules")
	if deps.Clock == nil {
		deps.Clock = SystemClock{}
	}
	met, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	stamp := dirStamp(cfg.Dir)
	rules, warnings, err := loadDir(cfg.Dir, deps.Directory)
	if err != nil {
		return nil, err
	}
	e := &Engine{
		stamp:   stamp,
		cfg:     cfg,
		deps:    deps,
		log:     logger,
		met:     met,
		clock:   deps.Clock,
		limiter: newLogLimiter(10 * time.Second),
		queue:   make(chan *event.Event, cfg.QueueSize),
		lanes:   newCommandLanes(),
		cmds:    make(chan string, cfg.CommandQueueSize),
		wake:    make(chan struct{}, 1),

		writeState: writeStateFile,
	}
	if deps.Directory == nil {
		logger.Warn("no device directory: device matches fail, selectors pick no device, named devices are not checked")
	}
	for _, w := range warnings {
		logger.Warn("rule file", "warning", w)
	}
	met.bind(rules)
	set := newRuleSet(rules)
	e.m = &machine{
		dir:      deps.Directory,
		store:    deps.State,
		sink:     engineSink{e},
		met:      met,
		onError:  e.evalError,
		source:   cfg.Source,
		maxDepth: cfg.MaxChainDepth,
		newID:    newEventID,
	}
	e.m.install(set)
	e.set.Store(set)
	if cfg.StateFile != "" {
		sf, err := readStateFile(cfg.StateFile)
		if err != nil {
			logger.Warn("rule state not restored: starting without saved timers and windows", "error", err)
		} else if sf != nil {
			n, errs := e.m.restore(sf)
			for _, err := range errs {
				logger.Warn("rule state entry not restored", "error", err)
			}
			logger.Info("rule state restored", "rules", n, "pending_timers", e.m.timers.len(), "saved", sf.Saved)
		}
		e.m.dirty = false
	}
	logger.Info("rules loaded", "rules", len(rules), "dir", cfg.Dir)
	return e, nil
}

func newEventID() string {
	id, err := uuid.NewV7()
	if err != nil {
		return uuid.NewString()
	}
	return id.String()
}

// Rules describes the rules in force, in evaluation order.
func (e *Engine) Rules() []RuleInfo { return e.set.Load().infos() }

// Submit hands an event to the rules without blocking for long. While the engine runs and is idle, with no
// event waiting, the event is evaluated at once on the caller's goroutine (a command goes out before Submit
// returns, without waiting for the evaluation goroutine to be scheduled); otherwise it is queued behind the
// waiting ones, so events are always evaluated in the order they were submitted. It returns false when the queue
// is full (the event is counted in edgegate_rules_queue_dropped_total and not evaluated). With no rules loaded
// it accepts and drops every event.
func (e *Engine) Submit(ev *event.Event) bool {
	if ev == nil || len(e.set.Load().rules) == 0 {
		return true
	}
	if e.queued.Load() == 0 && e.mu.TryLock() {
		// Holding mu with nothing queued, every event submitted before this one has been evaluated.
		if e.runCtx != nil && e.queued.Load() == 0 {
			e.processLocked(ev)
			e.unlockAfterEval()
			return true
		}
		e.mu.Unlock()
	}
	e.queued.Add(1)
	select {
	case e.queue <- ev:
		return true
	default:
		e.queued.Add(-1)
		e.met.dropped.Inc()
		e.limiter.log(e.log, slog.LevelWarn, "queue_full", "rules queue full: event not evaluated",
			"event_id", ev.ID(), "device_id", ev.Subject(), "queue_size", cap(e.queue))
		return false
	}
}

// Reload reads the rule directory again and, if every file is valid, replaces the rules between two events.
// Rules that keep their name and their pattern keep their timers, windows and debounce state. A bad file keeps the
// old rules in force and is reported in the error (file:line: key: message).
func (e *Engine) Reload() error {
	e.reloadMu.Lock()
	defer e.reloadMu.Unlock()
	e.stamp = dirStamp(e.cfg.Dir)
	rules, warnings, err := loadDir(e.cfg.Dir, e.deps.Directory)
	if err != nil {
		e.met.reloads.WithLabelValues("error").Inc()
		return fmt.Errorf("rules: reload (the previous rules stay in force): %w", err)
	}
	for _, w := range warnings {
		e.log.Warn("rule file", "warning", w)
	}
	e.met.bind(rules)
	set := newRuleSet(rules)
	e.mu.Lock()
	e.m.install(set)
	e.set.Store(set)
	e.scheduleWakeLocked()
	e.mu.Unlock()
	e.met.reloads.WithLabelValues("ok").Inc()
	return nil
}

// Run evaluates events until ctx ends: one evaluation goroutine, the command workers and (with watch) the rule
// file watcher. On return every goroutine has ended, undelivered queued commands are dead letters and the state
// has been saved.
func (e *Engine) Run(ctx context.Context) error {
	if !e.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer e.running.Store(false)

	e.started.Store(time.Now().UnixNano())
	e.mu.Lock()
	e.runCtx = ctx
	e.mu.Unlock()

	var wg sync.WaitGroup
	cmds := e.cmds
	for range e.cfg.CommandWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e.worker(ctx, cmds)
		}()
	}
	if *e.cfg.Watch && e.cfg.Dir != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e.watch(ctx)
		}()
	}

	e.mu.Lock()
	e.advanceLocked() // absences that fell due while the gateway was down fire once, now
	e.scheduleWakeLocked()
	e.unlockAfterEval()

	// The state file is written by a goroutine of its own: its fsyncs (tens of milliseconds on an SD card) do
	// not hold up the events and timers this goroutine evaluates meanwhile.
	saves, saverDone := make(chan *stateFile, 1), make(chan struct{})
	go func() {
		defer close(saverDone)
		for sf := range saves {
			e.save(sf)
		}
	}()
	ticker := time.NewTicker(e.cfg.PersistInterval)
	defer ticker.Stop()
	e.log.Info("rule engine running", "rules", len(e.set.Load().rules), "command_workers", e.cfg.CommandWorkers,
		"watch", *e.cfg.Watch && e.cfg.Dir != "")
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case ev := <-e.queue:
			e.mu.Lock()
			e.processLocked(ev)
			e.unlockAfterEval()
			e.queued.Add(-1)
		case <-e.wake:
			e.mu.Lock()
			e.wakeAt = time.Time{}
			e.advanceLocked()
			e.scheduleWakeLocked()
			e.unlockAfterEval()
		case <-ticker.C:
			e.housekeep(saves)
		}
	}
	close(saves)
	<-saverDone // before the last write below, which must not be overtaken by an older one

	e.mu.Lock()
	if e.wakeStop != nil {
		e.wakeStop.Stop()
		e.wakeStop, e.wakeAt = nil, time.Time{}
	}
	e.handOffLocked() // to the workers, which make them dead letters now that ctx has ended
	e.runCtx = nil
	// Commands are queued with e.mu held only; closing lets the workers drain and end.
	e.cmds = make(chan string, e.cfg.CommandQueueSize)
	e.mu.Unlock()
	close(cmds)
	wg.Wait()
	if n := len(e.queue); n > 0 {
		e.log.Info("events left unevaluated at stop", "events", n)
	}
	e.persist()
	e.log.Info("rule engine stopped")
	return nil
}

// unlockAfterEval releases e.mu after an evaluation. The commands it sent go to the workers (which wait for
// their acknowledgements) after the processor has been offered to other goroutines: the goroutine that writes a
// command to its device runs first, rather than behind a worker that would only start waiting.
func (e *Engine) unlockAfterEval() {
	sent := len(e.handoff) > 0
	e.mu.Unlock()
	if !sent {
		return
	}
	runtime.Gosched()
	e.mu.Lock()
	e.handOffLocked()
	e.mu.Unlock()
}

// handOffLocked queues the commands sent by evaluations for the workers, each first in its device's lane. e.mu is
// held.
func (e *Engine) handOffLocked() {
	for i, job := range e.handoff {
		e.handoff[i] = commandJob{}
		var ready bool
		if e.runCtx == nil {
			e.stopped(job)
			ready = e.lanes.release(job)
		} else {
			ready = e.lanes.handOver(job)
		}
		if ready {
			e.cmds <- job.device // room: one entry per lane at most, and no more lanes than queued commands
		}
	}
	e.handoff = e.handoff[:0]
}

// release ends the wait for the acknowledgement of a command sent by an evaluation; it reports whether the
// device had acknowledged it already.
func release(job commandJob) bool {
	if job.sent == nil {
		return false
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return job.sent(ctx) == nil
}

// stopped settles a command the engine, stopping, will not deliver: one that an evaluation sent and its device
// has acknowledged already is delivered; any other is a dead letter.
func (e *Engine) stopped(job commandJob) {
	if release(job) {
		e.met.action(job.rule, actCommand, "ok")
		return
	}
	e.met.action(job.rule, actCommand, "failed")
	e.undelivered(job, "not delivered: the rule engine stopped")
}

// processLocked evaluates one event: due timers first, then the event. e.mu is held.
func (e *Engine) processLocked(ev *event.Event) {
	e.evalSince.Store(time.Now().UnixNano())
	defer e.evalSince.Store(0)
	now := e.clock.Now()
	e.m.advance(now)
	e.m.handle(ev, now)
	e.scheduleWakeLocked()
}

// advanceLocked fires the timers that fell due. e.mu is held.
func (e *Engine) advanceLocked() {
	e.evalSince.Store(time.Now().UnixNano())
	defer e.evalSince.Store(0)
	e.m.advance(e.clock.Now())
}

// Busy returns how long the evaluation in progress (of an event, or of timers that fell due) has been running, or
// 0 when none is. A rule whose condition does not end, or an action that blocks, shows here; meanwhile no other
// event is evaluated.
func (e *Engine) Busy() time.Duration {
	if since := e.evalSince.Load(); since != 0 {
		return max(time.Duration(time.Now().UnixNano()-since), 1)
	}
	return 0
}

// scheduleWakeLocked arranges a wake-up at the machine's next deadline.
func (e *Engine) scheduleWakeLocked() {
	if e.runCtx == nil {
		return
	}
	at, ok := e.m.nextTimer()
	if !ok {
		if e.wakeStop != nil {
			e.wakeStop.Stop()
			e.wakeStop, e.wakeAt = nil, time.Time{}
		}
		return
	}
	if e.wakeStop != nil && e.wakeAt.Equal(at) {
		return
	}
	if e.wakeStop != nil {
		e.wakeStop.Stop()
	}
	d := at.Sub(e.clock.Now())
	if d < 0 {
		d = 0
	}
	e.wakeAt = at
	e.wakeStop = e.clock.AfterFunc(d, func() {
		select {
		case e.wake <- struct{}{}:
		default:
		}
	})
}

// housekeep forgets expired state and hands what changed to the saver (saves): a snapshot still waiting there
// is replaced by this newer one.
func (e *Engine) housekeep(saves chan *stateFile) {
	e.mu.Lock()
	e.m.sweep(e.clock.Now())
	e.mu.Unlock()
	sf := e.snapshot()
	if sf == nil {
		return
	}
	select {
	case saves <- sf:
	default:
		select {
		case <-saves:
		default:
		}
		saves <- sf // only this goroutine sends: the slot is free
	}
}

// persist writes the state file if the state changed since the last write.
func (e *Engine) persist() {
	if sf := e.snapshot(); sf != nil {
		e.save(sf)
	}
}

// snapshot captures the state if it changed since the last snapshot (nil otherwise, and without a state file).
func (e *Engine) snapshot() *stateFile {
	if e.cfg.StateFile == "" {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.m.dirty {
		return nil
	}
	sf, err := e.m.snapshot(e.clock.Now())
	if err != nil {
		e.limiter.log(e.log, slog.LevelError, "persist", "rule state not saved", "path", e.cfg.StateFile, "error", err)
		return nil
	}
	e.m.dirty = false
	return sf
}

// save writes a snapshot to the state file; after a failure the next snapshot is taken even if nothing changed.
func (e *Engine) save(sf *stateFile) {
	if err := e.writeState(e.cfg.StateFile, sf); err != nil {
		e.mu.Lock()
		e.m.dirty = true
		e.mu.Unlock()
		e.limiter.log(e.log, slog.LevelError, "persist", "rule state not saved", "path", e.cfg.StateFile, "error", err)
	}
}

func (e *Engine) evalError(r *rule, ev *event.Event, err error) {
	e.limiter.log(e.log, slog.LevelWarn, "eval:"+r.name, "rule evaluation failed", "rule", r.name,
		"event_id", ev.ID(), "device_id", ev.Subject(), "error", err)
}

// engineSink carries out actions for real. It runs with e.mu held (on the evaluation goroutine or inline in Submit).
type engineSink struct{ e *Engine }

func (s engineSink) command(r *rule, cause *event.Event, device, command string, payload []byte) {
	e := s.e
	job := commandJob{rule: r, cause: cause.ID(), device: device, command: command, payload: payload}
	// Commands are queued with e.mu held only, so room seen here is room when the job is queued.
	total, waiting, idle := e.lanes.look(device)
	if total >= e.cfg.CommandQueueSize {
		e.met.action(r, actCommand, "dropped")
		e.undelivered(job, "command queue full")
		return
	}
	if waiting >= maxLaneWaiting {
		e.met.action(r, actCommand, "dropped")
		e.undelivered(job, fmt.Sprintf("%d earlier commands to the device wait for it", waiting))
		return
	}
	// The first attempt goes out at once, unless an earlier command to the device is not delivered yet: it must
	// not overtake that one's retries.
	if cs, ok := e.deps.Commander.(CommandSender); ok && idle {
		if wait, err := cs.SendCommand(device, command, payload); err == nil {
			job.sent = wait
			e.lanes.hold(device)
			e.handoff = append(e.handoff, job)
			return
		}
	}
	if e.lanes.push(job) {
		e.cmds <- device // room: one entry per lane at most, and no more lanes than queued commands
	}
}

func (s engineSink) emit(r *rule, ev *event.Event) {
	e := s.e
	if e.deps.Emitter == nil {
		e.met.action(r, actEmit, "error")
		e.m.fail(r, ev, errors.New("emit: no emitter"))
		return
	}
	ctx := e.runCtx
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, e.cfg.CommandTimeout)
	defer cancel()
	if err := e.deps.Emitter.Emit(ctx, ev); err != nil {
		e.met.action(r, actEmit, "error")
		e.m.fail(r, ev, fmt.Errorf("emit %s: %w", ev.Type(), err))
		if e.deps.DeadLetters != nil {
			b, _ := ev.MarshalJSON()
			e.deps.DeadLetters.DeadLetter("rule_emit_failed", fmt.Sprintf("rule %s: %v", r.name, err), ev.Subject(), "", b)
		}
		return
	}
	e.met.action(r, actEmit, "ok")
}

func (s engineSink) state(r *rule, device, key string, value any) {
	e := s.e
	if e.deps.State == nil {
		e.met.action(r, actState, "error")
		return
	}
	e.deps.State.Set(device, key, value)
	e.met.action(r, actState, "ok")
}

// worker delivers the commands of the devices whose lanes are ready, each lane's in order, until cmds is
// closed; once ctx has ended, what is left becomes dead letters.
func (e *Engine) worker(ctx context.Context, cmds <-chan string) {
	for device := range cmds {
		for job, ok := e.lanes.next(device); ok; job, ok = e.lanes.next(device) {
			if ctx.Err() != nil {
				e.stopped(job)
				continue
			}
			e.deliver(ctx, job)
		}
	}
}

// deliver tries a command, then retries it with a doubling backoff, then makes it a dead letter.
func (e *Engine) deliver(ctx context.Context, job commandJob) {
	if e.deps.Commander == nil {
		e.met.action(job.rule, actCommand, "failed")
		e.undelivered(job, "no commander")
		return
	}
	backoff := e.cfg.CommandBackoff
	var err error
	attempts, refused := 0, 0 // refused: the attempts that count against command_retries
	holdUntil := time.Unix(0, e.started.Load()).Add(offlineHold)
	sent := job.sent // the first attempt's, sent by the evaluation: waited for once
	for refused <= e.cfg.CommandRetries {
		if attempts > 0 {
			wait := backoff
			if errors.Is(err, ErrDeviceOffline) {
				wait = min(backoff, time.Second)
			}
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
			case <-t.C:
			}
			backoff = min(2*backoff, 30*time.Second)
		}
		if ctx.Err() != nil {
			break
		}
		attempts++
		actx, cancel := context.WithTimeout(ctx, e.cfg.CommandTimeout)
		if sent != nil {
			err, sent = sent(actx), nil
		} else {
			err = e.deps.Commander.Command(actx, job.device, job.command, job.payload)
		}
		cancel()
		if err == nil {
			e.met.action(job.rule, actCommand, "ok")
			e.log.Debug("command delivered", "rule", job.rule.name, "device_id", job.device, "command", job.command, "event_id", job.cause)
			return
		}
		if !errors.Is(err, ErrDeviceOffline) || !time.Now().Before(holdUntil) {
			refused++ // a device not there yet, while the hold lasts, has not refused it
		}
	}
	if attempts == 0 { // the engine stopped before the first try
		e.stopped(job)
		return
	}
	if err == nil {
		err = ctx.Err()
	}
	e.met.action(job.rule, actCommand, "failed")
	e.undelivered(job, fmt.Sprintf("%d attempt(s): %v", attempts, err))
}

// undelivered makes a command a dead letter (reason command_undelivered) and logs it, rate-limited.
func (e *Engine) undelivered(job commandJob, detail string) {
	topic := "devices/" + job.device + "/commands/" + job.command
	detail = fmt.Sprintf("rule %s, cause %s: %s", job.rule.name, job.cause, detail)
	if e.deps.DeadLetters != nil {
		e.deps.DeadLetters.DeadLetter("command_undelivered", detail, job.device, topic, job.payload)
	}
	e.limiter.log(e.log, slog.LevelWarn, "cmd:"+job.rule.name, "command not delivered", "rule", job.rule.name,
		"device_id", job.device, "topic", topic, "event_id", job.cause, "detail", detail)
}

// watch reloads the rules when a rule file changes, once the changes settle.
func (e *Engine) watch(ctx context.Context) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		e.log.Warn("rule files not watched (reload with SIGHUP)", "error", err)
		return
	}
	defer w.Close()
	if err := w.Add(e.cfg.Dir); err != nil {
		e.log.Warn("rule files not watched (reload with SIGHUP)", "dir", e.cfg.Dir, "error", err)
		return
	}
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	defer settle.Stop()
	// A file changed between New and now (before the watch began) is picked up too.
	e.reloadMu.Lock()
	changed := e.stamp != dirStamp(e.cfg.Dir)
	e.reloadMu.Unlock()
	if changed {
		settle.Reset(0)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events:
			if !ok {
				return
			}
			ext := filepath.Ext(ev.Name)
			if ext == ".yaml" || ext == ".yml" || ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
				settle.Reset(reloadSettle)
			}
		case err, ok := <-w.Errors:
			if !ok {
				return
			}
			e.limiter.log(e.log, slog.LevelWarn, "watch", "rule file watcher", "error", err)
		case <-settle.C:
			if err := e.Reload(); err != nil {
				e.log.Error("rule files changed but were not loaded", "error", err)
			} else {
				e.log.Info("rule files changed: rules reloaded", "rules", len(e.set.Load().rules))
			}
		}
	}
}

// dirStamp describes the rule files of dir (names, sizes, modification times) to notice changes.
func dirStamp(dir string) string {
	if dir == "" {
		return ""
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "error: " + err.Error()
	}
	var b strings.Builder
	for _, en := range entries {
		ext := filepath.Ext(en.Name())
		if ext != ".yaml" && ext != ".yml" {
			continue
		}
		fi, err := en.Info()
		if err != nil {
			continue
		}
		fmt.Fprintf(&b, "%s:%d:%d;", en.Name(), fi.Size(), fi.ModTime().UnixNano())
	}
	return b.String()
}
