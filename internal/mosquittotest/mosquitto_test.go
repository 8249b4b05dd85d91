//go:build unix

package mosquittotest

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/eventually"
)

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	eventually.True(t, timeout, what, cond)
}

// collector is a persistent-session subscriber that records the payloads it receives.
type collector struct {
	mu  sync.Mutex
	got []string
	cl  paho.Client
}

func (c *collector) payloads() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.got...)
}

func subscribe(t *testing.T, url, id, topic string) *collector {
	t.Helper()
	c := &collector{}
	opts := paho.NewClientOptions().AddBroker(url).SetClientID(id).SetCleanSession(false).
		SetAutoReconnect(true).SetMaxReconnectInterval(100 * time.Millisecond).SetConnectRetry(true).
		SetConnectRetryInterval(50 * time.Millisecond).SetResumeSubs(true)
	opts.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
		c.mu.Lock()
		c.got = append(c.got, string(m.Payload()))
		c.mu.Unlock()
	})
	c.cl = paho.NewClient(opts)
	if tok := c.cl.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("connect subscriber: %v", tok.Error())
	}
	if tok := c.cl.Subscribe(topic, 1, nil); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	t.Cleanup(func() { c.cl.Disconnect(0) })
	return c
}

func publisher(t *testing.T, url, id string) paho.Client {
	t.Helper()
	cl := paho.NewClient(paho.NewClientOptions().AddBroker(url).SetClientID(id).SetAutoReconnect(false))
	if tok := cl.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("connect publisher: %v", tok.Error())
	}
	t.Cleanup(func() { cl.Disconnect(0) })
	return cl
}

func publish(t *testing.T, cl paho.Client, topic, payload string) {
	t.Helper()
	if tok := cl.Publish(topic, 1, false, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("publish %s: %v", payload, tok.Error())
	}
}

func TestBrokerRoundTrip(t *testing.T) {
	b := Start(t)
	if !strings.HasPrefix(b.URL(), "tcp://127.0.0.1:") || b.Port() == 1883 {
		t.Fatalf("URL = %s, want a private loopback port", b.URL())
	}
	sub := subscribe(t, b.URL(), "sub", "t/#")
	pub := publisher(t, b.URL(), "pub")
	for i := range 10 {
		publish(t, pub, "t/x", fmt.Sprint(i))
	}
	waitFor(t, 5*time.Second, "10 messages", func() bool { return len(sub.payloads()) == 10 })
}

// TestTryStartRefused: a configuration the broker refuses is an error carrying the broker's complaint, not a
// failed test; an accepted one gives a running broker.
func TestTryStartRefused(t *testing.T) {
	b, err := TryStart(t, "no_such_option_for_the_test 1")
	if err == nil {
		t.Fatalf("TryStart with an unknown option started a broker on %s", b.Addr())
	}
	if !strings.Contains(err.Error(), "no_such_option_for_the_test") {
		t.Errorf("error does not carry the broker's log: %v", err)
	}
	b, err = TryStart(t)
	if err != nil || !b.Running() {
		t.Fatalf("TryStart without extra lines: %v", err)
	}
}

// TestStopStartKeepsSavedSession shows what the forward outage tests rely on: a persistent subscription saved
// with Save survives a SIGKILL, and messages published while the subscriber is away are queued for it.
func TestStopStartKeepsSavedSession(t *testing.T) {
	b := Start(t)
	sub := subscribe(t, b.URL(), "sub", "t/#")
	b.Save()
	port := b.Port()

	b.Stop()
	if b.Running() {
		t.Fatal("Running after Stop")
	}
	if c, err := net.DialTimeout("tcp", b.Addr(), time.Second); err == nil {
		_ = c.Close()
		t.Fatal("broker still accepts after Stop")
	}
	b.Start()
	if b.Port() != port || !b.Running() {
		t.Fatalf("restarted on port %d (running %v), want %d", b.Port(), b.Running(), port)
	}
	// Publish before the subscriber is back: the restored session queues the message.
	pub := publisher(t, b.URL(), "pub")
	publish(t, pub, "t/after", "queued")
	waitFor(t, 10*time.Second, "the queued message", func() bool {
		got := sub.payloads()
		return len(got) == 1 && got[0] == "queued"
	})
}

func TestProxy(t *testing.T) {
	b := Start(t)
	p := NewProxy(t, b.Addr())
	sub := subscribe(t, b.URL(), "sub", "t/#")

	lost := make(chan error, 1)
	opts := paho.NewClientOptions().AddBroker(p.URL()).SetClientID("via-proxy").SetAutoReconnect(false).
		SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	cl := paho.NewClient(opts)
	if tok := cl.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("connect via proxy: %v", tok.Error())
	}
	defer cl.Disconnect(0)
	publish(t, cl, "t/a", "through")
	waitFor(t, 5*time.Second, "a message through the proxy", func() bool { return len(sub.payloads()) == 1 })
	if p.Conns() != 1 || p.Accepted() != 1 {
		t.Fatalf("Conns = %d, Accepted = %d, want 1, 1", p.Conns(), p.Accepted())
	}

	// Blackhole: the broker still gets the message, but the PUBACK never comes back.
	p.Blackhole(true)
	tok := cl.Publish("t/a", 1, false, "no-ack")
	waitFor(t, 5*time.Second, "the blackholed message at the broker", func() bool { return len(sub.payloads()) == 2 })
	if tok.WaitTimeout(300 * time.Millisecond) {
		t.Fatalf("publish completed through a blackhole (err %v)", tok.Error())
	}
	p.Blackhole(false)

	if n := p.ResetAll(); n != 1 {
		t.Fatalf("ResetAll dropped %d connections, want 1", n)
	}
	select {
	case <-lost:
	case <-time.After(5 * time.Second):
		t.Fatal("client did not notice the reset")
	}
	waitFor(t, 5*time.Second, "no connections", func() bool { return p.Conns() == 0 })

	// The proxy keeps accepting after a reset; a dead target refuses.
	c2 := publisher(t, p.URL(), "again")
	publish(t, c2, "t/b", "after-reset")
	b.Stop()
	before := p.Accepted()
	if c3, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		defer c3.Close() // accepted, then dropped: the target is down
	}
	waitFor(t, 5*time.Second, "the proxy to accept while the target is down", func() bool { return p.Accepted() > before })
	waitFor(t, 5*time.Second, "proxy to drop connections to a dead target", func() bool { return p.Conns() == 0 })
}
