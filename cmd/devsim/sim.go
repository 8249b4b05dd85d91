package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// Device kinds devsim simulates; other kinds in a registry are ignored.
const (
	kindSensor      = "motion-sensor"
	kindLight       = "light"
	kindThermometer = "thermometer"
)

// simDevice is one simulated device.
type simDevice struct {
	ID, Kind, Room, Password string
}

// simConfig configures one simulation run. Every loop is bounded by Duration, and publishing devices also by
// Count when it is > 0.
type simConfig struct {
	Broker   string
	Devices  []simDevice
	Rate     float64       // messages per second per publishing device; 0: as fast as the window allows
	QoS      byte          // QoS of publishes and of the lights' command subscriptions
	Payload  int           // bytes of each publish's JSON payload (padded; at least the natural size)
	Duration time.Duration // how long devices publish (> 0)
	Count    int           // messages per publishing device (0: until Duration)
	Inflight int           // QoS 1 publishes a device may have unacknowledged at once (≥ 1)
	// Linger is how long, after publishing ends, lights keep listening for commands still on their way.
	Linger         time.Duration
	ConnectTimeout time.Duration
	ConnectWorkers int // connections opened at once
	// StateTopic is the topic a light reports its state on; {id} stands for its id.
	StateTopic string
	// Status, when set, receives progress lines (connected devices) as they happen.
	Status func(string)
}

// summary is the outcome of a run; it is printed at the end and written as JSON with --json.
type summary struct {
	Broker          string  `json:"broker"`
	Devices         int     `json:"devices"`
	Connected       int64   `json:"connected"`
	ConnectFailures int64   `json:"connect_failures"`
	Sensors         int     `json:"sensors"`
	Lights          int     `json:"lights"`
	Thermometers    int     `json:"thermometers"`
	QoS             byte    `json:"qos"`
	Sent            int64   `json:"sent"`
	Acked           int64   `json:"acknowledged"`
	PublishErrors   int64   `json:"publish_errors"`
	Commands        int64   `json:"commands_received"`
	StateReports    int64   `json:"state_reports"`
	PublishSeconds  float64 `json:"publish_seconds"` // first publish to the last acknowledgement (QoS 1) or write
	FirstPublish    int64   `json:"first_publish_unix_ns"`
	LastDone        int64   `json:"last_done_unix_ns"`
	Rate            float64 `json:"rate"`            // sent (QoS 0) or acknowledged (QoS 1) per publish second
	AckLatency      latency `json:"ack_latency"`     // publish → PUBACK (QoS 1)
	CommandLatency  latency `json:"command_latency"` // room.entered sent → command received by a light
	Interrupted     bool    `json:"interrupted,omitempty"`
	FirstError      string  `json:"first_error,omitempty"`
}

// latency summarizes samples in milliseconds.
type latency struct {
	N   int64   `json:"n"`
	P50 float64 `json:"p50_ms"`
	P90 float64 `json:"p90_ms"`
	P99 float64 `json:"p99_ms"`
	Max float64 `json:"max_ms"`
}

// maxSamples bounds the memory of a recorder; past it samples are kept by reservoir sampling.
const maxSamples = 1 << 20

// recorder collects latency samples; safe for concurrent use.
type recorder struct {
	mu      sync.Mutex
	n       int64
	max     time.Duration
	samples []time.Duration
	rng     *rand.Rand
}

func newRecorder() *recorder { return &recorder{rng: rand.New(rand.NewPCG(1, 2))} }

func (r *recorder) add(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n++
	r.max = max(r.max, d)
	if len(r.samples) < maxSamples {
		r.samples = append(r.samples, d)
		return
	}
	if i := r.rng.Int64N(r.n); i < maxSamples {
		r.samples[i] = d
	}
}

func (r *recorder) summary() latency {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == 0 {
		return latency{}
	}
	s := slices.Clone(r.samples)
	slices.Sort(s)
	q := func(p float64) float64 {
		i := int(p*float64(len(s)) + 0.5)
		i = min(max(i-1, 0), len(s)-1)
		return ms(s[i])
	}
	return latency{N: r.n, P50: q(0.50), P90: q(0.90), P99: q(0.99), Max: ms(r.max)}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// sim is one running simulation.
type sim struct {
	cfg      simConfig
	sum      *summary
	ackLat   *recorder
	cmdLat   *recorder
	sentAt   sync.Map // room → time.Time of the last room.entered sent (correlation when a command has no ts)
	firstPub atomic.Int64
	lastDone atomic.Int64

	connected, connectFailures, sent, acked, pubErrors, commands, stateReports atomic.Int64

	errOnce  sync.Once
	firstErr string
}

// runSim connects every device, runs them until cfg.Duration (or Count) is reached or ctx ends, disconnects
// them and returns the summary. It fails only when the configuration is unusable; connection failures are
// counted in the summary.
func runSim(ctx context.Context, cfg simConfig) (*summary, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &sim{cfg: cfg, ackLat: newRecorder(), cmdLat: newRecorder(),
		sum: &summary{Broker: cfg.Broker, Devices: len(cfg.Devices), QoS: cfg.QoS}}
	for _, d := range cfg.Devices {
		switch d.Kind {
		case kindSensor:
			s.sum.Sensors++
		case kindLight:
			s.sum.Lights++
		case kindThermometer:
			s.sum.Thermometers++
		}
	}

	// Connect every device, lights first (they subscribe), a bounded number at once.
	order := slices.Clone(cfg.Devices)
	slices.SortStableFunc(order, func(a, b simDevice) int {
		return boolInt(a.Kind != kindLight) - boolInt(b.Kind != kindLight)
	})
	clients := make([]paho.Client, len(order))
	work := make(chan int)
	var wg sync.WaitGroup
	for range max(1, min(cfg.ConnectWorkers, len(order))) {
		wg.Go(func() {
			for i := range work {
				c, err := s.connect(ctx, order[i])
				if err != nil {
					s.connectFailures.Add(1)
					s.fail(fmt.Errorf("connect %s: %w", order[i].ID, err))
					continue
				}
				clients[i] = c
			}
		})
	}
feed:
	for i := range order {
		select {
		case work <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	disconnect := func() {
		var dwg sync.WaitGroup
		for i, c := range clients {
			if c != nil {
				dwg.Go(func() { c.Disconnect(100) })
				clients[i] = nil
			}
		}
		dwg.Wait()
	}
	defer disconnect()
	for _, c := range clients {
		if c != nil {
			s.connected.Add(1)
		}
	}
	if cfg.Status != nil {
		cfg.Status(fmt.Sprintf("connected %d/%d devices", s.connected.Load(), len(order)))
	}

	runCtx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	var pubs sync.WaitGroup
	publishers := 0
	for i, d := range order {
		c := clients[i]
		if c == nil || (d.Kind != kindSensor && d.Kind != kindThermometer) {
			continue
		}
		publishers++
		pubs.Go(func() { s.publishLoop(runCtx, c, d) })
	}
	pubs.Wait()
	if publishers == 0 {
		// Only lights: they listen for commands for the whole duration.
		<-runCtx.Done()
	}
	if s.sum.Lights > 0 && s.sum.Sensors > 0 && ctx.Err() == nil && cfg.Linger > 0 {
		// Commands caused by the last events may still be on their way.
		select {
		case <-ctx.Done():
		case <-time.After(cfg.Linger):
		}
	}
	disconnect()
	s.sum.Interrupted = ctx.Err() != nil
	s.sum.Connected, s.sum.ConnectFailures = s.connected.Load(), s.connectFailures.Load()
	s.sum.Sent, s.sum.Acked, s.sum.PublishErrors = s.sent.Load(), s.acked.Load(), s.pubErrors.Load()
	s.sum.Commands, s.sum.StateReports = s.commands.Load(), s.stateReports.Load()
	s.errOnce.Do(func() {}) // no error recorded from here on
	s.sum.FirstError = s.firstErr
	s.sum.FirstPublish, s.sum.LastDone = s.firstPub.Load(), s.lastDone.Load()
	if f, l := s.firstPub.Load(), s.lastDone.Load(); f > 0 && l > f {
		s.sum.PublishSeconds = time.Duration(l - f).Seconds()
	}
	done := s.sum.Sent
	if cfg.QoS > 0 {
		done = s.sum.Acked
	}
	if s.sum.PublishSeconds > 0 {
		s.sum.Rate = float64(done) / s.sum.PublishSeconds
	}
	s.sum.AckLatency = s.ackLat.summary()
	s.sum.CommandLatency = s.cmdLat.summary()
	return s.sum, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func (c simConfig) validate() error {
	var errs []error
	if c.Broker == "" {
		errs = append(errs, errors.New("--broker: must be set"))
	}
	if len(c.Devices) == 0 {
		errs = append(errs, errors.New("no devices to simulate"))
	}
	if c.Duration <= 0 {
		errs = append(errs, fmt.Errorf("--duration: must be > 0, got %s", c.Duration))
	}
	if c.QoS > 1 {
		errs = append(errs, fmt.Errorf("--qos: must be 0 or 1, got %d", c.QoS))
	}
	if c.Rate < 0 {
		errs = append(errs, fmt.Errorf("--rate: must be ≥ 0, got %g", c.Rate))
	}
	if c.Count < 0 {
		errs = append(errs, fmt.Errorf("--count: must be ≥ 0, got %d", c.Count))
	}
	if c.Inflight < 1 {
		errs = append(errs, fmt.Errorf("--inflight: must be ≥ 1, got %d", c.Inflight))
	}
	if c.Payload < 0 || c.Payload > 1<<20 {
		errs = append(errs, fmt.Errorf("--payload-bytes: must be between 0 and 1048576, got %d", c.Payload))
	}
	if !strings.Contains(c.StateTopic, "{id}") {
		errs = append(errs, fmt.Errorf("--state-topic: %q must contain {id}", c.StateTopic))
	}
	if c.ConnectTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--connect-timeout: must be > 0, got %s", c.ConnectTimeout))
	}
	return errors.Join(errs...)
}

func (s *sim) fail(err error) {
	s.errOnce.Do(func() { s.firstErr = err.Error() })
}

func (s *sim) connect(ctx context.Context, d simDevice) (paho.Client, error) {
	opts := paho.NewClientOptions().
		AddBroker(s.cfg.Broker).
		SetClientID(d.ID).
		SetUsername(d.ID).
		SetPassword(d.Password).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(s.cfg.ConnectTimeout).
		SetKeepAlive(60 * time.Second).
		SetOrderMatters(false).
		SetWriteTimeout(10 * time.Second)
	c := paho.NewClient(opts)
	tok := c.Connect()
	if err := waitToken(ctx, tok, s.cfg.ConnectTimeout+time.Second); err != nil {
		c.Disconnect(0)
		return nil, err
	}
	if d.Kind == kindLight {
		filter := "devices/" + d.ID + "/commands/#"
		st := c.Subscribe(filter, s.cfg.QoS, func(c paho.Client, m paho.Message) { s.onCommand(c, d, m) })
		if err := waitToken(ctx, st, s.cfg.ConnectTimeout); err != nil {
			c.Disconnect(0)
			return nil, fmt.Errorf("subscribe %s: %w", filter, err)
		}
		if sub, ok := st.(*paho.SubscribeToken); ok {
			if r := sub.Result()[filter]; r == 0x80 {
				c.Disconnect(0)
				return nil, fmt.Errorf("subscribe %s: refused by the broker", filter)
			}
		}
	}
	return c, nil
}

func waitToken(ctx context.Context, tok paho.Token, timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-tok.Done():
		return tok.Error()
	case <-t.C:
		return fmt.Errorf("no answer within %s", timeout)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// onCommand is a light receiving a command: it is acknowledged (paho sends the PUBACK when the handler
// returns), its latency measured, and the light reports its new state.
func (s *sim) onCommand(c paho.Client, d simDevice, m paho.Message) {
	now := time.Now()
	s.commands.Add(1)
	command := m.Topic()[strings.LastIndexByte(m.Topic(), '/')+1:]
	var p struct {
		On   *bool           `json:"on"`
		TS   json.RawMessage `json:"ts"`
		Room string          `json:"room"`
	}
	_ = json.Unmarshal(m.Payload(), &p)
	if command == "lights.on" {
		if sent, ok := parseTS(p.TS); ok {
			s.cmdLat.add(now.Sub(sent))
		} else if v, ok := s.sentAt.Load(d.Room); ok {
			s.cmdLat.add(now.Sub(v.(time.Time)))
		}
	}
	on := command == "lights.on"
	if p.On != nil {
		on = *p.On
	}
	// Reported asynchronously: waiting for its PUBACK inside the handler would stall the client's router.
	c.Publish(strings.ReplaceAll(s.cfg.StateTopic, "{id}", d.ID), s.cfg.QoS, false, fmt.Sprintf(`{"on":%t}`, on))
	s.stateReports.Add(1)
}

// parseTS reads a timestamp in unix nanoseconds given as a JSON number or a string of digits.
func parseTS(raw json.RawMessage) (time.Time, bool) {
	v := strings.Trim(string(raw), `"`)
	if v == "" {
		return time.Time{}, false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 {
		return time.Time{}, false
	}
	return time.Unix(0, n), true
}

type pending struct {
	tok   paho.Token
	start time.Time
}

// publishLoop is a sensor or thermometer publishing until ctx ends or Count messages are sent. At most Inflight
// publishes are outstanding (not yet acknowledged at QoS 1, not yet written at QoS 0): a slot is taken before
// each publish and given back by a collector goroutine, which measures each one's PUBACK latency in order.
func (s *sim) publishLoop(ctx context.Context, c paho.Client, d simDevice) {
	topic := "devices/" + d.ID + "/telemetry/temperature"
	if d.Kind == kindSensor {
		topic = "devices/" + d.ID + "/events/room.entered"
	}
	slots := make(chan struct{}, s.cfg.Inflight)
	window := make(chan pending, s.cfg.Inflight) // never blocks: a slot is held for each entry
	var collector sync.WaitGroup
	collector.Go(func() {
		for p := range window {
			err := waitToken(context.Background(), p.tok, 30*time.Second)
			<-slots
			now := time.Now()
			s.lastDone.Store(now.UnixNano())
			if err != nil {
				s.pubErrors.Add(1)
				s.fail(fmt.Errorf("publish %s: %w", topic, err))
				continue
			}
			if s.cfg.QoS > 0 {
				s.acked.Add(1)
				s.ackLat.add(now.Sub(p.start))
			}
		}
	})
	defer func() { close(window); collector.Wait() }()

	var tick *time.Ticker
	if s.cfg.Rate > 0 {
		// Devices start at random points of their period so that they do not all publish at once.
		period := time.Duration(float64(time.Second) / s.cfg.Rate)
		select {
		case <-ctx.Done():
			return
		case <-time.After(rand.N(period)):
		}
		tick = time.NewTicker(period)
		defer tick.Stop()
	}
	rng := rand.New(rand.NewPCG(uint64(len(d.ID)), uint64(time.Now().UnixNano())))
	buf := make([]byte, 0, max(s.cfg.Payload, 128))
	for n := 0; s.cfg.Count == 0 || n < s.cfg.Count; n++ {
		if tick != nil {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		} else if ctx.Err() != nil {
			return
		}
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		now := time.Now()
		if d.Kind == kindSensor {
			buf = s.sensorPayload(buf[:0], d, now, n)
			s.sentAt.Store(d.Room, now)
		} else {
			buf = s.telemetryPayload(buf[:0], now, n, 18+rng.Float64()*8)
		}
		s.firstPub.CompareAndSwap(0, now.UnixNano())
		tok := c.Publish(topic, s.cfg.QoS, false, slices.Clone(buf))
		s.sent.Add(1)
		window <- pending{tok: tok, start: now}
	}
}

// sensorPayload is {"room":R,"ts":"<unix ns>","seq":N} padded to the payload size.
func (s *sim) sensorPayload(b []byte, d simDevice, now time.Time, seq int) []byte {
	b = append(b, `{"room":`...)
	b = strconv.AppendQuote(b, d.Room)
	b = append(b, `,"ts":"`...)
	b = strconv.AppendInt(b, now.UnixNano(), 10)
	b = append(b, `","seq":`...)
	b = strconv.AppendInt(b, int64(seq), 10)
	return pad(b, s.cfg.Payload)
}

// telemetryPayload is {"value":T,"unit":"C","ts":"<unix ns>","seq":N} padded to the payload size.
func (s *sim) telemetryPayload(b []byte, now time.Time, seq int, v float64) []byte {
	b = append(b, `{"value":`...)
	b = strconv.AppendFloat(b, v, 'f', 2, 64)
	b = append(b, `,"unit":"C","ts":"`...)
	b = strconv.AppendInt(b, now.UnixNano(), 10)
	b = append(b, `","seq":`...)
	b = strconv.AppendInt(b, int64(seq), 10)
	return pad(b, s.cfg.Payload)
}

// pad closes the JSON object b (missing its closing brace), adding a "pad" string so that the whole object is
// size bytes when it would otherwise be shorter.
func pad(b []byte, size int) []byte {
	const overhead = len(`,"pad":""}`)
	if n := size - len(b) - overhead; n >= 0 {
		b = append(b, `,"pad":"`...)
		for range n {
			b = append(b, 'x')
		}
		b = append(b, `"`...)
	}
	return append(b, '}')
}

func (s *summary) print(w interface{ Write([]byte) (int, error) }) {
	fmt.Fprintf(w, "devsim summary (%s)\n", s.Broker)
	fmt.Fprintf(w, "  devices      %d (%d sensors, %d lights, %d thermometers); connected %d, failed %d\n",
		s.Devices, s.Sensors, s.Lights, s.Thermometers, s.Connected, s.ConnectFailures)
	fmt.Fprintf(w, "  published    %d at QoS %d; acknowledged %d; errors %d; %.1f msg/s over %.2fs\n",
		s.Sent, s.QoS, s.Acked, s.PublishErrors, s.Rate, s.PublishSeconds)
	if s.AckLatency.N > 0 {
		fmt.Fprintf(w, "  PUBACK       p50 %.2fms  p90 %.2fms  p99 %.2fms  max %.2fms  (n=%d)\n",
			s.AckLatency.P50, s.AckLatency.P90, s.AckLatency.P99, s.AckLatency.Max, s.AckLatency.N)
	}
	fmt.Fprintf(w, "  commands     %d received by lights; %d state reports\n", s.Commands, s.StateReports)
	if s.CommandLatency.N > 0 {
		fmt.Fprintf(w, "  room.entered → lights.on  p50 %.2fms  p90 %.2fms  p99 %.2fms  max %.2fms  (n=%d)\n",
			s.CommandLatency.P50, s.CommandLatency.P90, s.CommandLatency.P99, s.CommandLatency.Max, s.CommandLatency.N)
	}
	if s.Interrupted {
		fmt.Fprintln(w, "  (interrupted)")
	}
	if s.FirstError != "" {
		fmt.Fprintf(w, "  first error  %s\n", s.FirstError)
	}
}
