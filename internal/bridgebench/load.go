//go:build unix

package bridgebench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// liveDeviceID is the device that publishes the live traffic of RunDrain.
const liveDeviceID = "bench-live"

// probeDevice is the device index carried by probe messages (sent to see that the path is up; not counted).
const probeDevice = -1

// payload returns a JSON object of at least size bytes naming the device index, the sequence number and the
// publish time (Unix microseconds, exact in a float64 should anything decode it as one).
func payload(dev, seq int, at time.Time, size int) []byte {
	b := make([]byte, 0, max(size, 64))
	b = append(b, `{"bd":`...)
	b = strconv.AppendInt(b, int64(dev), 10)
	b = append(b, `,"bs":`...)
	b = strconv.AppendInt(b, int64(seq), 10)
	b = append(b, `,"bt":`...)
	b = strconv.AppendInt(b, at.UnixMicro(), 10)
	b = append(b, `,"pad":"`...)
	for len(b) < size-2 {
		b = append(b, 'x')
	}
	return append(b, `"}`...)
}

// intField finds "key": followed by an integer in b (the first occurrence) and returns the integer.
func intField(b []byte, key string) (int64, bool) {
	i := bytes.Index(b, []byte(`"`+key+`"`))
	if i < 0 {
		return 0, false
	}
	b = b[i+len(key)+2:]
	b = bytes.TrimLeft(b, " \t\r\n")
	if len(b) == 0 || b[0] != ':' {
		return 0, false
	}
	b = bytes.TrimLeft(b[1:], " \t\r\n")
	j := 0
	if j < len(b) && b[j] == '-' {
		j++
	}
	for j < len(b) && b[j] >= '0' && b[j] <= '9' {
		j++
	}
	n, err := strconv.ParseInt(string(b[:j]), 10, 64)
	return n, err == nil
}

// stringField finds "key":"value" in b (the first occurrence, a value without escapes) and returns the value.
func stringField(b []byte, key string) ([]byte, bool) {
	i := bytes.Index(b, []byte(`"`+key+`"`))
	if i < 0 {
		return nil, false
	}
	b = bytes.TrimLeft(b[i+len(key)+2:], " \t\r\n")
	if len(b) == 0 || b[0] != ':' {
		return nil, false
	}
	b = bytes.TrimLeft(b[1:], " \t\r\n")
	if len(b) == 0 || b[0] != '"' {
		return nil, false
	}
	j := bytes.IndexByte(b[1:], '"')
	if j < 0 {
		return nil, false
	}
	return b[1 : 1+j], true
}

// arrival is one live message's first arrival.
type arrival struct {
	sent    int64 // publish time, Unix microseconds
	latency time.Duration
}

// subscriber counts what arrives at the cloud broker, per device and sequence number.
type subscriber struct {
	cl      paho.Client
	withIDs bool // count distinct CloudEvent ids too (gateway)
	liveDev int  // the device index whose arrivals' latencies are kept (-2: every device)

	arrivals atomic.Int64 // every counted arrival, for progress polling
	uniqueN  atomic.Int64
	probes   atomic.Int64

	mu        sync.Mutex
	seen      map[int][]uint16 // device index -> seq -> arrivals
	delivered map[int]int      // device index -> arrivals
	unique    map[int]int      // device index -> distinct seqs
	first     time.Time        // the first arrival of a non-live message since reset
	last      time.Time        // the last first-arrival of a non-live message
	live      []arrival
	// ids holds a 64-bit hash of each distinct CloudEvent id (a collision among a million ids has a chance of
	// about 3·10⁻⁸): string keys cost the subscriber, which shares the machine with the systems measured, an
	// allocation per message and a growing heap to scan, on the gateway's runs only.
	ids       map[uint64]struct{}
	seed      maphash.Seed
	malformed int
	other     int
}

// connectSubscriber connects a persistent-session (clean session off) subscriber to url and subscribes to
// filter with QoS 1. It reconnects on its own while the broker is away.
func connectSubscriber(ctx context.Context, url, filter string, withIDs bool, liveDev int) (*subscriber, error) {
	s := &subscriber{
		withIDs: withIDs, liveDev: liveDev,
		seen: map[int][]uint16{}, delivered: map[int]int{}, unique: map[int]int{}, ids: map[uint64]struct{}{}, seed: maphash.MakeSeed(),
	}
	opts := paho.NewClientOptions().AddBroker(url).SetClientID("bench-sub").SetCleanSession(false).
		SetProtocolVersion(4).SetAutoReconnect(true).SetMaxReconnectInterval(200 * time.Millisecond).
		SetConnectRetry(true).SetConnectRetryInterval(100 * time.Millisecond).SetResumeSubs(true).
		SetKeepAlive(30 * time.Second).SetOrderMatters(true).SetCustomOpenConnectionFn(openBuffered)
	opts.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { s.onMessage(m.Payload()) })
	s.cl = paho.NewClient(opts)
	if err := waitToken(ctx, s.cl.Connect(), 10*time.Second); err != nil {
		return nil, fmt.Errorf("subscriber: connect %s: %w", url, err)
	}
	if err := waitToken(ctx, s.cl.Subscribe(filter, 1, nil), 10*time.Second); err != nil {
		s.cl.Disconnect(0)
		return nil, fmt.Errorf("subscriber: subscribe %s: %w", filter, err)
	}
	return s, nil
}

func (s *subscriber) close() { s.cl.Disconnect(100) }

// onMessage counts a message: one bench message, one CloudEvent or a JSON array of CloudEvents (a batch).
func (s *subscriber) onMessage(b []byte) {
	now := time.Now()
	if len(b) > 0 && b[0] == '[' {
		for _, e := range splitArray(b) {
			s.onOne(e, now)
		}
		return
	}
	s.onOne(b, now)
}

// splitArray returns the elements of the JSON array b (without checking them); nil when b is not one.
func splitArray(b []byte) [][]byte {
	var out [][]byte
	depth, start, inString, escaped := 0, 0, false, false
	for i, c := range b {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '[' || c == '{':
			if depth++; depth == 1 {
				start = i + 1
			}
		case c == ']' || c == '}':
			if depth--; depth == 0 {
				if e := bytes.TrimSpace(b[start:i]); len(e) > 0 {
					out = append(out, e)
				}
				return out
			}
		case c == ',' && depth == 1:
			out = append(out, bytes.TrimSpace(b[start:i]))
			start = i + 1
		}
	}
	return nil
}

func (s *subscriber) onOne(b []byte, now time.Time) {
	dev, ok1 := intField(b, "bd")
	seq, ok2 := intField(b, "bs")
	at, ok3 := intField(b, "bt")
	var id []byte
	ok4 := true
	if s.withIDs {
		id, ok4 = stringField(b, "id")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !ok1 && !bytes.Contains(b, []byte(`"bd"`)) {
		s.other++ // not a bench message (e.g. the gateway's presence events)
		return
	}
	if !ok1 || !ok2 || !ok3 || !ok4 || seq < 0 || seq > 1<<30 {
		s.malformed++
		return
	}
	if dev == probeDevice {
		s.probes.Add(1)
		return
	}
	d := int(dev)
	seen := s.seen[d]
	if int(seq) >= len(seen) {
		seen = append(seen, make([]uint16, max(int(seq)+1, 2*len(seen))-len(seen))...)
		s.seen[d] = seen
	}
	s.delivered[d]++
	if s.withIDs {
		s.ids[maphash.Bytes(s.seed, id)] = struct{}{}
	}
	s.arrivals.Add(1)
	if seen[seq] < 65535 {
		seen[seq]++
	}
	if seen[seq] > 1 {
		return
	}
	s.unique[d]++
	s.uniqueN.Add(1)
	if s.liveDev == -2 || d == s.liveDev {
		s.live = append(s.live, arrival{sent: at, latency: now.Sub(time.UnixMicro(at))})
	}
	if d != s.liveDev {
		if s.first.IsZero() {
			s.first = now
		}
		s.last = now
	}
}

// times returns the first and last first-arrival of non-live messages.
func (s *subscriber) times() (first, last time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.first, s.last
}

// countKeys counts, for one device, the arrivals of the sequence numbers marked in acked and the acked ones
// that never arrived.
func (s *subscriber) countKeys(dev int, acked []bool) (uniqueAcked, lost int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := s.seen[dev]
	for i, a := range acked {
		if !a {
			continue
		}
		if i < len(seen) && seen[i] > 0 {
			uniqueAcked++
		} else {
			lost++
		}
	}
	return uniqueAcked, lost
}

// totals returns arrivals and distinct messages of one device.
func (s *subscriber) totals(dev int) (delivered, unique int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.delivered[dev], s.unique[dev]
}

func (s *subscriber) liveArrivals() []arrival {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.live)
}

func (s *subscriber) idCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.ids)
}

func (s *subscriber) malformedCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.malformed
}

// device is one publishing client.
type device struct {
	id    string
	idx   int
	topic string
	cl    paho.Client

	sent, acked, failed int
	ackedSeq            []bool // seq -> acknowledged (written by the one goroutine publishing for the device)
}

func connectDevice(ctx context.Context, url, id string, idx int) (*device, error) {
	opts := paho.NewClientOptions().AddBroker(url).SetClientID(id).SetUsername(id).SetPassword(benchPassword).
		SetProtocolVersion(4).SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetKeepAlive(30 * time.Second).SetWriteTimeout(30 * time.Second).SetCustomOpenConnectionFn(openBuffered)
	cl := paho.NewClient(opts)
	if err := waitToken(ctx, cl.Connect(), 20*time.Second); err != nil {
		return nil, fmt.Errorf("device %s: connect %s: %w", id, url, err)
	}
	return &device{id: id, idx: idx, topic: "devices/" + id + "/telemetry", cl: cl}, nil
}

func (d *device) close() { d.cl.Disconnect(0) }

type pubTok struct {
	seq int
	tok paho.Token
}

// publishN publishes sequence numbers from..from+n-1 with QoS 1, keeping at most inflight unacknowledged.
func (d *device) publishN(ctx context.Context, from, n, inflight, size int) error {
	if need := from + n; need > len(d.ackedSeq) {
		d.ackedSeq = append(d.ackedSeq, make([]bool, need-len(d.ackedSeq))...)
	}
	ring := make([]pubTok, 0, inflight)
	var firstErr error
	settle := func(p pubTok) {
		if err := waitToken(ctx, p.tok, 60*time.Second); err != nil {
			d.failed++
			if firstErr == nil {
				firstErr = fmt.Errorf("device %s: publish %d: %w", d.id, p.seq, err)
			}
			return
		}
		d.acked++
		d.ackedSeq[p.seq] = true
	}
	for seq := from; seq < from+n && ctx.Err() == nil; seq++ {
		if len(ring) == inflight {
			settle(ring[0])
			ring = ring[1:]
		}
		tok := d.cl.Publish(d.topic, 1, false, payload(d.idx, seq, time.Now(), size))
		d.sent++
		ring = append(ring, pubTok{seq: seq, tok: tok})
	}
	for _, p := range ring {
		settle(p)
	}
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	return firstErr
}

// publishAt publishes at rate messages per second from seq from on until ctx ends; it returns the next
// sequence number. Acknowledgements are waited for in the background (at most inflight at a time).
func (d *device) publishAt(ctx context.Context, from int, rate float64, inflight, size int) int {
	every := time.Duration(float64(time.Second) / rate)
	tick := time.NewTicker(every)
	defer tick.Stop()
	type pending struct {
		seq int
		tok paho.Token
	}
	pend := make(chan pending, inflight)
	var wg sync.WaitGroup
	var mu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		for p := range pend {
			err := waitToken(context.Background(), p.tok, 30*time.Second)
			mu.Lock()
			if err != nil {
				d.failed++
			} else {
				d.acked++
				d.ackedSeq[p.seq] = true
			}
			mu.Unlock()
		}
	}()
	seq := from
	for {
		select {
		case <-ctx.Done():
			close(pend)
			wg.Wait()
			return seq
		case <-tick.C:
		}
		mu.Lock()
		if seq >= len(d.ackedSeq) {
			d.ackedSeq = append(d.ackedSeq, make([]bool, max(1024, len(d.ackedSeq)))...)
		}
		mu.Unlock()
		tok := d.cl.Publish(d.topic, 1, false, payload(d.idx, seq, time.Now(), size))
		d.sent++
		select {
		case pend <- pending{seq: seq, tok: tok}:
		case <-ctx.Done():
			close(pend)
			wg.Wait()
			return seq + 1
		}
		seq++
	}
}

// waitToken waits for a paho token, at most timeout, and returns its error.
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

// percentile returns the p-th percentile (0..100) of sorted durations (nearest rank).
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p/100+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

var errNoPath = errors.New("no probe message arrived at the cloud broker")
