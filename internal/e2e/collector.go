//go:build linux

package e2e

import (
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// UpstreamTopic and UpstreamBatchTopic are the filters the Collector subscribes to: every event any gateway
// forwards with the default MQTT topic template edgegate/{gateway}/events/{subject}/{type}, and every batch of
// events (a JSON array) on the default batch topic edgegate/{gateway}/batches.
const (
	UpstreamTopic      = "edgegate/+/events/#"
	UpstreamBatchTopic = "edgegate/+/batches"
)

// Collector subscribes to the upstream broker with a persistent session (QoS 1, clean session off, automatic
// reconnect) and records the CloudEvents the gateway forwards: how often each id arrived, and for each device
// and kind the seqs of the Client events in order of first arrival. The broker's persistence is saved right
// after the subscription, so the session survives the broker being killed and started again.
type Collector struct {
	t  testing.TB
	cl paho.Client

	mu      sync.Mutex
	ids     map[string]int    // CloudEvent id → arrivals
	idKind  map[string]string // CloudEvent id of a Client event → its kind
	keys    map[Key]string    // device/seq/kind → the id it first arrived with
	keyIDs  map[Key]int       // device/seq/kind → distinct ids seen for it
	order   map[stream][]int  // device and kind → seqs in order of first arrival
	msgs    int               // events received (each event of a batch counts)
	batches int               // messages that were batches (JSON arrays of events)
	other   int               // events that are not Client events (presence, …)
	bad     []string          // payloads that are not CloudEvents
	last    time.Time         // when the last message arrived
	types   map[string]int    // CloudEvent type → arrivals
}

// stream is the events of one kind from one device: the unit of order.
type stream struct{ device, kind string }

func (s stream) String() string {
	if s.kind == "" {
		return s.device
	}
	return s.device + "/" + s.kind
}

type upstreamEvent struct {
	ID      string          `json:"id"`
	Type    string          `json:"type"`
	Subject string          `json:"subject"`
	Data    json.RawMessage `json:"data"`
}

// NewCollector connects to broker, subscribes to UpstreamTopic and UpstreamBatchTopic and saves the broker's
// persistence.
func NewCollector(t testing.TB, broker *mosquittotest.Broker) *Collector {
	t.Helper()
	c := &Collector{t: t, ids: map[string]int{}, idKind: map[string]string{}, keys: map[Key]string{},
		keyIDs: map[Key]int{}, order: map[stream][]int{}, types: map[string]int{}}
	opts := paho.NewClientOptions().AddBroker(broker.URL()).SetClientID(fmt.Sprintf("e2e-collector-%d", time.Now().UnixNano())).
		SetCleanSession(false).SetAutoReconnect(true).SetConnectRetry(true).
		SetConnectRetryInterval(50 * time.Millisecond).SetMaxReconnectInterval(100 * time.Millisecond).
		SetResumeSubs(true).SetOrderMatters(true).SetKeepAlive(5 * time.Second).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { c.record(m.Payload()) })
	c.cl = paho.NewClient(opts)
	if tok := c.cl.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("e2e: collector connect: %v", tok.Error())
	}
	filters := map[string]byte{UpstreamTopic: 1, UpstreamBatchTopic: 1}
	if tok := c.cl.SubscribeMultiple(filters, nil); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("e2e: collector subscribe: %v", tok.Error())
	}
	broker.Save()
	t.Cleanup(func() { c.cl.Disconnect(0) })
	return c
}

func (c *Collector) record(payload []byte) {
	if len(payload) > 0 && payload[0] == '[' {
		var batch []json.RawMessage
		if err := json.Unmarshal(payload, &batch); err == nil && len(batch) > 0 {
			c.mu.Lock()
			c.batches++
			c.mu.Unlock()
			for _, e := range batch {
				c.record(e)
			}
			return
		}
	}
	var ev upstreamEvent
	err := json.Unmarshal(payload, &ev)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.msgs++
	c.last = time.Now()
	if err != nil || ev.ID == "" {
		if len(c.bad) < 10 {
			c.bad = append(c.bad, string(payload))
		}
		return
	}
	c.ids[ev.ID]++
	c.types[ev.Type]++
	if c.ids[ev.ID] > 1 {
		return
	}
	k, ok := clientKey(ev.Type, ev.Subject, ev.Data)
	if !ok {
		c.other++
		return
	}
	c.idKind[ev.ID] = k.Kind
	c.keyIDs[k]++
	if _, seen := c.keys[k]; seen {
		return // a second id for the same publish: counted by Counts as a duplicate
	}
	c.keys[k] = ev.ID
	s := stream{k.Device, k.Kind}
	c.order[s] = append(c.order[s], k.Seq)
}

// clientKey recognises a Client event by its type and data: an event of type e2e.tick (with any prefix) or one
// whose data names its kind, with a seq in its data. The key's device is the event's subject.
func clientKey(typ, subject string, data []byte) (Key, bool) {
	var d struct {
		Seq  int    `json:"seq"`
		Kind string `json:"kind"`
	}
	if json.Unmarshal(data, &d) != nil || d.Seq <= 0 || (d.Kind == "" && !strings.HasSuffix(typ, EventType)) {
		return Key{}, false
	}
	return Key{Device: subject, Seq: d.Seq, Kind: d.Kind}, true
}

// Connected reports whether the collector's connection is up.
func (c *Collector) Connected() bool { return c.cl.IsConnectionOpen() }

// Counts are a Collector's totals.
type Counts struct {
	// Messages is every event received (each event of a batch counts as one); Events counts the Client events
	// (device/seq) among them, once each; Batches counts the messages that carried a batch (a JSON array).
	Messages, Events, Batches int
	// UniqueIDs counts distinct CloudEvent ids; Duplicates the messages that repeated an id.
	UniqueIDs, Duplicates int
	// SeqDuplicates counts Client events that arrived under more than one id (the gateway stored a publish
	// twice): always a bug, since a Client publishes each seq once.
	SeqDuplicates int
	// Other counts events that are not Client events (presence and the like); Bad the payloads that are not
	// CloudEvents.
	Other, Bad int
}

// Counts returns the totals so far.
func (c *Collector) Counts() Counts {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := Counts{Messages: c.msgs, Events: len(c.keys), Batches: c.batches, UniqueIDs: len(c.ids), Other: c.other,
		Bad: len(c.bad)}
	for _, v := range c.ids {
		n.Duplicates += v - 1
	}
	for _, v := range c.keyIDs {
		n.SeqDuplicates += v - 1
	}
	return n
}

// KindCounts are a Collector's totals for the Client events of one kind.
type KindCounts struct {
	// Events counts the events (device/seq) that arrived, once each; IDs the distinct CloudEvent ids they
	// arrived with (equal to Events unless the gateway stored a publish twice).
	Events, IDs int
	// Duplicates counts the messages that repeated the id of one of these events; SeqDuplicates the events
	// that arrived under more than one id.
	Duplicates, SeqDuplicates int
}

// CountKind returns the totals so far for the Client events of kind ("" for NewClient's).
func (c *Collector) CountKind(kind string) KindCounts {
	c.mu.Lock()
	defer c.mu.Unlock()
	var n KindCounts
	for id, k := range c.idKind {
		if k == kind {
			n.IDs++
			n.Duplicates += c.ids[id] - 1
		}
	}
	for k, v := range c.keyIDs {
		if k.Kind == kind {
			n.Events++
			n.SeqDuplicates += v - 1
		}
	}
	return n
}

// Has reports whether the event k arrived.
func (c *Collector) Has(k Key) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.keys[k]
	return ok
}

// Missing returns the events of want that have not arrived.
func (c *Collector) Missing(want []Key) []Key {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Key
	for _, k := range want {
		if _, ok := c.keys[k]; !ok {
			out = append(out, k)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Device != out[j].Device {
			return out[i].Device < out[j].Device
		}
		if out[i].Kind != out[j].Kind {
			return out[i].Kind < out[j].Kind
		}
		return out[i].Seq < out[j].Seq
	})
	return out
}

// Keys returns every Client event that arrived.
func (c *Collector) Keys() []Key {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Key, 0, len(c.keys))
	for k := range c.keys {
		out = append(out, k)
	}
	return out
}

// OrderErrors returns, per device (and kind, named "device/kind") whose events arrived out of order (by first
// arrival), a description of the first inversion. Nil means every device's events of each kind arrived in
// the order it published them; events of different kinds are not ordered against each other.
func (c *Collector) OrderErrors() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for s, seqs := range c.order {
		for i := 1; i < len(seqs); i++ {
			if seqs[i] < seqs[i-1] {
				out = append(out, fmt.Sprintf("%s: seq %d arrived after %d", s, seqs[i], seqs[i-1]))
				break
			}
		}
	}
	slices.Sort(out)
	return out
}

// BadPayloads returns up to ten payloads that were not CloudEvents.
func (c *Collector) BadPayloads() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.bad)
}

// Quiet reports how long ago the last message arrived (since the collector started when none has).
func (c *Collector) Quiet() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.last.IsZero() {
		return time.Duration(1<<62 - 1)
	}
	return time.Since(c.last)
}

// WaitFor polls until every event of want has arrived or timeout passes; it returns the ones still missing.
func (c *Collector) WaitFor(want []Key, timeout time.Duration) []Key {
	deadline := time.Now().Add(timeout)
	for {
		missing := c.Missing(want)
		if len(missing) == 0 || time.Now().After(deadline) {
			return missing
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Settle waits until no message has arrived for quiet (bounded by timeout), so late duplicates are counted.
func (c *Collector) Settle(quiet, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for c.Quiet() < quiet && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
}
