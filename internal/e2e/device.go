//go:build linux

package e2e

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// Key names one event a device published: the device, the seq number in its payload and the kind of event
// ("" for the e2e.tick events of NewClient; a NewKindClient's kind otherwise). Each kind numbers its seqs on
// its own.
type Key struct {
	Device string
	Seq    int
	Kind   string
}

func (k Key) String() string {
	if k.Kind == "" {
		return fmt.Sprintf("%s#%d", k.Device, k.Seq)
	}
	return fmt.Sprintf("%s/%s#%d", k.Device, k.Kind, k.Seq)
}

// Client is one device connected to the gateway with MQTT 3.1.1 (paho, clean session, no automatic reconnect:
// Publish reconnects). It publishes QoS 1 events {"seq":N,"device":ID} to devices/{id}/events/e2e.tick, seq
// counting from 1, each seq exactly once, and records which of them got a PUBACK. It is safe for concurrent
// use, though one goroutine per client keeps the seq order.
type Client struct {
	dev      Device
	url      string
	clientID string
	topic    string
	kind     string

	mu      sync.Mutex
	cl      paho.Client
	next    int          // the next seq to publish
	sent    int          // publishes written to an open connection
	acked   map[int]bool // seq → PUBACK received
	refused atomic.Int64 // publishes without a PUBACK (timeout or error after the write)
	conns   int
}

// NewClient returns a client of dev for the gateway at url (tcp://host:port); it connects on first use.
func NewClient(t testing.TB, url string, dev Device) *Client {
	c := &Client{dev: dev, url: url, clientID: dev.ID, topic: "devices/" + dev.ID + "/events/" + EventType, next: 1,
		acked: map[int]bool{}}
	t.Cleanup(c.Close)
	return c
}

// NewKindClient returns a client of dev that publishes events of another kind, on a connection of its own
// (client id "<device id>:<kind>"): QoS 1 {"seq":N,"device":ID,"kind":KIND} to topic, seq counting from 1 for
// this kind. The gateway's mappings decide the events' type and priority from topic; the Collector and
// CheckLog tell the events apart by the kind in their data, whatever their type, and report them under
// Key.Kind.
func NewKindClient(t testing.TB, url string, dev Device, kind, topic string) *Client {
	c := &Client{dev: dev, url: url, clientID: dev.ID + ":" + kind, topic: topic, kind: kind, next: 1,
		acked: map[int]bool{}}
	t.Cleanup(c.Close)
	return c
}

// ID is the device id.
func (c *Client) ID() string { return c.dev.ID }

// Kind is the kind of the events the client publishes ("" for NewClient's).
func (c *Client) Kind() string { return c.kind }

// Connect connects when not connected; it returns the connection error.
func (c *Client) Connect(timeout time.Duration) error {
	c.mu.Lock()
	cl := c.cl
	c.mu.Unlock()
	if cl != nil && cl.IsConnectionOpen() {
		return nil
	}
	if cl != nil {
		cl.Disconnect(0)
	}
	opts := paho.NewClientOptions().AddBroker(c.url).SetClientID(c.clientID).SetUsername(c.dev.ID).
		SetPassword(c.dev.Password).SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(timeout).SetKeepAlive(10 * time.Second).SetOrderMatters(true).
		SetWriteTimeout(timeout)
	cl = paho.NewClient(opts)
	tok := cl.Connect()
	if !tok.WaitTimeout(timeout + time.Second) {
		cl.Disconnect(0)
		return fmt.Errorf("connect %s: timed out", c.clientID)
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("connect %s: %w", c.clientID, err)
	}
	c.mu.Lock()
	c.cl = cl
	c.conns++
	c.mu.Unlock()
	return nil
}

// Publish publishes the next seq and waits up to timeout for its PUBACK. When the client is not connected it
// reconnects first, retrying until ctx ends (the seq is then not used). It reports whether a PUBACK arrived;
// the seq is used (and counted as sent) whenever the PUBLISH was handed to an open connection.
func (c *Client) Publish(ctx context.Context, timeout time.Duration) (seq int, acked bool, err error) {
	for {
		if err := ctx.Err(); err != nil {
			return 0, false, err
		}
		if err := c.Connect(timeout); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return 0, false, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	c.mu.Lock()
	cl := c.cl
	seq = c.next
	c.next++
	c.sent++
	c.mu.Unlock()
	payload := fmt.Sprintf(`{"seq":%d,"device":%q}`, seq, c.dev.ID)
	if c.kind != "" {
		payload = fmt.Sprintf(`{"seq":%d,"device":%q,"kind":%q}`, seq, c.dev.ID, c.kind)
	}
	tok := cl.Publish(c.topic, 1, false, payload)
	ok := tok.WaitTimeout(timeout) && tok.Error() == nil
	if ok {
		c.mu.Lock()
		c.acked[seq] = true
		c.mu.Unlock()
	} else {
		// No PUBACK: the gateway withheld it (the connection is still up) or the connection broke (the next
		// Publish reconnects). Either way the seq stays unacknowledged and is never published again.
		c.refused.Add(1)
	}
	return seq, ok, nil
}

// Sent counts the publishes handed to an open connection.
func (c *Client) Sent() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sent
}

// Acked returns the seqs that got a PUBACK.
func (c *Client) Acked() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]int, 0, len(c.acked))
	for s := range c.acked {
		out = append(out, s)
	}
	return out
}

// Unacked counts the publishes that got no PUBACK.
func (c *Client) Unacked() int { return int(c.refused.Load()) }

// Conns counts the connections made.
func (c *Client) Conns() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conns
}

// Close disconnects.
func (c *Client) Close() {
	c.mu.Lock()
	cl := c.cl
	c.cl = nil
	c.mu.Unlock()
	if cl != nil {
		cl.Disconnect(0)
	}
}

// Fleet is a set of device clients publishing together.
type Fleet struct {
	Clients []*Client
}

// NewFleet returns a client per device for the gateway at url.
func NewFleet(t testing.TB, url string, devs []Device) *Fleet {
	f := &Fleet{}
	for _, d := range devs {
		f.Clients = append(f.Clients, NewClient(t, url, d))
	}
	return f
}

// Load paces a Fleet's publishing.
type Load struct {
	// PerDevice is how many events each device publishes (required, > 0).
	PerDevice int
	// Interval is the pause between one device's publishes (0: back to back, each after the previous PUBACK
	// or timeout).
	Interval time.Duration
	// AckTimeout bounds the wait for each PUBACK (default 5s).
	AckTimeout time.Duration
	// Progress, when set, is called after every publish with the fleet's running count (for tests that act
	// midway, e.g. kill the gateway after half the events).
	Progress func(published int64)
}

// Run makes every device publish load.PerDevice events, all devices at once, and returns when they are done or
// ctx ends (the events not yet published are then left out). It returns the number of publishes made.
func (f *Fleet) Run(ctx context.Context, load Load) int64 {
	if load.AckTimeout == 0 {
		load.AckTimeout = 5 * time.Second
	}
	var total atomic.Int64
	var wg sync.WaitGroup
	for _, c := range f.Clients {
		wg.Go(func() {
			for range load.PerDevice {
				if _, _, err := c.Publish(ctx, load.AckTimeout); err != nil {
					return
				}
				n := total.Add(1)
				if load.Progress != nil {
					load.Progress(n)
				}
				if load.Interval > 0 {
					select {
					case <-ctx.Done():
						return
					case <-time.After(load.Interval):
					}
				}
			}
		})
	}
	wg.Wait()
	return total.Load()
}

// Sent counts the fleet's publishes handed to an open connection.
func (f *Fleet) Sent() int {
	n := 0
	for _, c := range f.Clients {
		n += c.Sent()
	}
	return n
}

// Acked returns every event that got a PUBACK.
func (f *Fleet) Acked() []Key {
	var out []Key
	for _, c := range f.Clients {
		for _, s := range c.Acked() {
			out = append(out, Key{Device: c.ID(), Seq: s, Kind: c.kind})
		}
	}
	return out
}

// Close disconnects every client.
func (f *Fleet) Close() {
	for _, c := range f.Clients {
		c.Close()
	}
}
