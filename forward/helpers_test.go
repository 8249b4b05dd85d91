package forward

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edgegate/edgegate/internal/eventually"
)

// memLog is a small in-memory log implementing Source (the gateway's end-to-end tests use the real buffer).
type memLog struct {
	t       testing.TB
	mu      sync.Mutex
	recs    []Record
	seq     uint64
	cursors map[string]uint64
	grew    chan struct{} // closed and replaced on every append
	acked   chan struct{} // closed and replaced on every Ack (stored at once)
	ackErr  error
	acks    int
	nowAcks int               // the AckNow calls among acks
	spaced  bool              // Ack positions are stored only by a later AckNow (a log that groups cursor saves)
	waiting map[string]uint64 // with spaced: the positions Ack left to store
	woke    map[uint64]int    // Wait calls that returned nil, by after
	scans   []uint64          // the after of every ReadHeaders call
	maxRead uint64            // the highest Seq a Read returned

	onHeaders func(ctx context.Context, after uint64) error // when set, called at every ReadHeaders call first
}

func newMemLog(t testing.TB) *memLog {
	return &memLog{t: t, cursors: map[string]uint64{}, grew: make(chan struct{}), acked: make(chan struct{})}
}

// ceJSON makes the structured JSON of a CloudEvent as ingest stores it.
func ceJSON(id, typ, subject string, n int) []byte {
	return fmt.Appendf(nil, `{"specversion":"1.0","id":%q,"source":"edgegate/gw1/%s","type":%q,"subject":%q,`+
		`"time":"2024-05-01T12:00:00Z","datacontenttype":"application/json","data":{"n":%d}}`, id, subject, typ, subject, n)
}

// add appends an event and returns its Seq.
func (l *memLog) add(typ, subject string, n int) uint64 {
	l.mu.Lock()
	id := fmt.Sprintf("ev-%06d", l.seq+1)
	l.mu.Unlock()
	return l.addRaw(typ, subject, ceJSON(id, typ, subject, n))
}

func (l *memLog) addRaw(typ, subject string, data []byte) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seq++
	l.recs = append(l.recs, Record{Seq: l.seq, Type: typ, Subject: subject, Data: data})
	close(l.grew)
	l.grew = make(chan struct{})
	return l.seq
}

func (l *memLog) last() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq
}

func (l *memLog) Read(after uint64, max int) ([]Record, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	i := sort.Search(len(l.recs), func(i int) bool { return l.recs[i].Seq > after })
	j := min(len(l.recs), i+max)
	if j > i && l.recs[j-1].Seq > l.maxRead {
		l.maxRead = l.recs[j-1].Seq
	}
	return slices.Clone(l.recs[i:j]), nil
}

// ReadHeaders is Read without the data (HeaderReader).
func (l *memLog) ReadHeaders(ctx context.Context, after uint64, max int) ([]Record, error) {
	if l.onHeaders != nil {
		if err := l.onHeaders(ctx, after); err != nil {
			return nil, err
		}
	}
	recs, err := l.Read(after, max)
	for i := range recs {
		recs[i].Data = nil
	}
	l.mu.Lock()
	l.scans = append(l.scans, after)
	l.mu.Unlock()
	return recs, err
}

// headerScans returns the after of every ReadHeaders call so far.
func (l *memLog) headerScans() []uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.scans)
}

// wokeAfter counts the Wait calls for records past after that returned.
func (l *memLog) wokeAfter(after uint64) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.woke[after]
}

func (l *memLog) Wait(ctx context.Context, after uint64) error {
	for {
		l.mu.Lock()
		if l.seq > after {
			if l.woke == nil {
				l.woke = map[uint64]int{}
			}
			l.woke[after]++
			l.mu.Unlock()
			return nil
		}
		grew := l.grew
		l.mu.Unlock()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-grew:
		}
	}
}

func (l *memLog) Cursor(name string) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cursors[name]
}

func (l *memLog) Ack(name string, upTo uint64) error { return l.ack(name, upTo, false) }

func (l *memLog) AckNow(name string, upTo uint64) error { return l.ack(name, upTo, true) }

func (l *memLog) ack(name string, upTo uint64, now bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ackErr != nil {
		return l.ackErr
	}
	if upTo < max(l.cursors[name], l.waiting[name]) {
		l.t.Errorf("cursor %s moved backwards: %d -> %d", name, max(l.cursors[name], l.waiting[name]), upTo)
	}
	if upTo > l.seq {
		l.t.Errorf("cursor %s moved past the log's end: %d > %d", name, upTo, l.seq)
	}
	l.acks++
	if now {
		l.nowAcks++
	}
	if l.spaced && !now {
		if l.waiting == nil {
			l.waiting = map[string]uint64{}
		}
		l.waiting[name] = upTo
		return nil
	}
	l.cursors[name] = upTo
	close(l.acked)
	l.acked = make(chan struct{})
	return nil
}

// Persisted is Cursor: an Ack is stored at once (with spaced, only an AckNow is).
func (l *memLog) Persisted(name string) uint64 { return l.Cursor(name) }

func (l *memLog) WaitPersisted(ctx context.Context, name string, after uint64) error {
	for {
		l.mu.Lock()
		if l.cursors[name] > after {
			l.mu.Unlock()
			return nil
		}
		acked := l.acked
		l.mu.Unlock()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-acked:
		}
	}
}

// deadLetter is one recorded dead letter.
type deadLetter struct {
	reason, detail, device, topic string
	payload                       []byte
}

type deadLetters struct {
	mu  sync.Mutex
	got []deadLetter
}

func (d *deadLetters) DeadLetter(reason, detail, device, topic string, payload []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.got = append(d.got, deadLetter{reason, detail, device, topic, slices.Clone(payload)})
}

func (d *deadLetters) all() []deadLetter {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.got)
}

// command is one command delivered to the fake CommandSink.
type command struct {
	device, command string
	payload         string
}

// commands knows the devices in known; any other is unknown.
type commands struct {
	known map[string]bool
	mu    sync.Mutex
	got   []command
}

func (c *commands) DeliverCommand(_ context.Context, device, cmd string, payload []byte) error {
	if !c.known[device] {
		return fmt.Errorf("test: command %s to %q: %w", cmd, device, ErrUnknownDevice)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.got = append(c.got, command{device, cmd, string(payload)})
	return nil
}

func (c *commands) all() []command {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.got)
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("EDGEGATE_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// fastSink is a sink configuration with short timings for tests.
func fastSink(name, typ string) SinkConfig {
	return SinkConfig{
		Name:       name,
		Type:       typ,
		AckTimeout: time.Second,
		BackoffMin: 20 * time.Millisecond,
		BackoffMax: 200 * time.Millisecond,
	}
}

func mqttSink(name, url string) SinkConfig {
	s := fastSink(name, TypeMQTT)
	s.MQTT = &MQTTConfig{URL: url, KeepAlive: 5 * time.Second, ConnectTimeout: time.Second}
	return s
}

// running is a Forwarder started by startForwarder.
type running struct {
	f    *Forwarder
	reg  *prometheus.Registry
	dl   *deadLetters
	stop func()
}

// startForwarder builds and runs a forwarder; the test's cleanup stops it and checks that Run returned nil.
func startForwarder(t *testing.T, cfg Config, src Source, cmds CommandSink) *running {
	t.Helper()
	return startForwarderWith(t, cfg, src, cmds, nil)
}

// startForwarderWith is startForwarder with a chance to adjust the Forwarder before it runs.
func startForwarderWith(t *testing.T, cfg Config, src Source, cmds CommandSink, adjust func(*Forwarder)) *running {
	t.Helper()
	reg := prometheus.NewRegistry()
	dl := &deadLetters{}
	f, err := New(cfg, "gw1", src, cmds, dl, testLogger(t), reg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if adjust != nil {
		adjust(f)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(20 * time.Second):
				t.Errorf("Run did not return after its context ended")
			}
		})
	}
	t.Cleanup(stop)
	return &running{f: f, reg: reg, dl: dl, stop: stop}
}

func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	eventually.True(t, timeout, what, cond)
}

// received is what a collector saw of one event.
type received struct {
	topic, id, subject string
	n                  int
	msg, size          int  // the message that carried the event (counted from 1), and its payload's length
	inArray            bool // the message was a JSON array (a batch)
}

// collector subscribes upstream (persistent session, automatic reconnect) and records every event received: a
// message is one CloudEvent, or a JSON array of them (a batch).
type collector struct {
	mu   sync.Mutex
	got  []received
	msgs int
	cl   paho.Client
}

func collect(t testing.TB, url, filter string) *collector {
	t.Helper()
	c := &collector{}
	opts := paho.NewClientOptions().AddBroker(url).SetClientID("collector").SetCleanSession(false).
		SetAutoReconnect(true).SetMaxReconnectInterval(50 * time.Millisecond).SetConnectRetry(true).
		SetConnectRetryInterval(50 * time.Millisecond).SetResumeSubs(true).SetOrderMatters(true)
	opts.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
		type cloudEvent struct {
			ID      string `json:"id"`
			Subject string `json:"subject"`
			Data    struct {
				N int `json:"n"`
			} `json:"data"`
		}
		var evs []cloudEvent
		p := m.Payload()
		var err error
		if len(p) > 0 && p[0] == '[' {
			err = json.Unmarshal(p, &evs)
		} else {
			evs = make([]cloudEvent, 1)
			err = json.Unmarshal(p, &evs[0])
		}
		if err != nil {
			t.Errorf("collector: %s: %v", m.Topic(), err)
			return
		}
		c.mu.Lock()
		c.msgs++
		for _, ev := range evs {
			c.got = append(c.got, received{topic: m.Topic(), id: ev.ID, subject: ev.Subject, n: ev.Data.N,
				msg: c.msgs, size: len(p), inArray: p[0] == '['})
		}
		c.mu.Unlock()
	})
	c.cl = paho.NewClient(opts)
	if tok := c.cl.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("collector connect: %v", tok.Error())
	}
	if tok := c.cl.Subscribe(filter, 1, nil); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("collector subscribe: %v", tok.Error())
	}
	t.Cleanup(func() { c.cl.Disconnect(0) })
	return c
}

func (c *collector) all() []received {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.got)
}

func (c *collector) unique() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	seen := map[string]bool{}
	for _, r := range c.got {
		seen[r.id] = true
	}
	return len(seen)
}

// checkDelivery checks that every id in want arrived, that per subject the first arrivals came in order, and
// returns the number of duplicates.
func checkDelivery(t *testing.T, got []received, want int) (dups int) {
	t.Helper()
	seen := map[string]bool{}
	lastN := map[string]int{}
	for _, r := range got {
		if seen[r.id] {
			dups++
			continue
		}
		seen[r.id] = true
		if r.n <= lastN[r.subject] {
			t.Errorf("subject %s: event n=%d arrived (first time) after n=%d", r.subject, r.n, lastN[r.subject])
		}
		lastN[r.subject] = r.n
	}
	if len(seen) != want {
		t.Errorf("received %d distinct events, want %d", len(seen), want)
		var missing []string
		for i := 1; i <= want*2 && len(missing) < 20; i++ {
			if id := fmt.Sprintf("ev-%06d", i); !seen[id] {
				missing = append(missing, id)
			}
		}
		t.Logf("first missing ids (of a log numbered from 1): %v", missing)
	}
	return dups
}

// producer appends count events over subjects, numbering each subject's events from 1, pausing every batch.
func producer(ctx context.Context, l *memLog, count int, subjects []string, batch int, pause time.Duration) {
	next := map[string]int{}
	for i := range count {
		if ctx.Err() != nil {
			return
		}
		s := subjects[i%len(subjects)]
		next[s]++
		l.add("sensor.reading", s, next[s])
		if batch > 0 && (i+1)%batch == 0 && pause > 0 {
			t := time.NewTimer(pause)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

func sinkHealth(r *running, name string) SinkHealth {
	for _, h := range r.f.Health() {
		if h.Name == name {
			return h
		}
	}
	return SinkHealth{}
}

func joinLines(ss ...string) string { return strings.Join(ss, "\n") + "\n" }

// waitForOrReport is waitFor that goes on (with an error) instead of stopping the test.
func waitForOrReport(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Errorf("timed out after %s waiting for %s", timeout, what)
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// eventUpstream is an HTTP upstream (structured mode, one event per request) that records the CloudEvents it
// accepts, in order. While down is set it answers 503 to the events of subject downSubject ("": every event).
type eventUpstream struct {
	*upstream
	down        atomic.Bool
	downSubject string
	mu          sync.Mutex
	got         []received
	refused     int
}

func newEventUpstream(t *testing.T, downSubject string) *eventUpstream {
	eu := &eventUpstream{downSubject: downSubject}
	eu.upstream = newUpstream(t, func(_ int, r request) (int, map[string]string) {
		var ev struct {
			ID, Subject string
			Data        struct{ N int }
		}
		if err := json.Unmarshal([]byte(r.body), &ev); err != nil || ev.ID == "" {
			t.Errorf("upstream: request body %q is not a structured CloudEvent: %v", r.body, err)
			return http.StatusBadRequest, nil
		}
		eu.mu.Lock()
		defer eu.mu.Unlock()
		if eu.down.Load() && (eu.downSubject == "" || ev.Subject == eu.downSubject) {
			eu.refused++
			return http.StatusServiceUnavailable, nil
		}
		eu.got = append(eu.got, received{id: ev.ID, subject: ev.Subject, n: ev.Data.N})
		return http.StatusNoContent, nil
	})
	return eu
}

// accepted returns the events the upstream accepted, in order.
func (eu *eventUpstream) accepted() []received {
	eu.mu.Lock()
	defer eu.mu.Unlock()
	return slices.Clone(eu.got)
}

// refusals counts the requests answered 503.
func (eu *eventUpstream) refusals() int {
	eu.mu.Lock()
	defer eu.mu.Unlock()
	return eu.refused
}
