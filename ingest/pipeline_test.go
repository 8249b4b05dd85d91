package ingest_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/ingest"
)

// asyncConsumer is an AsyncConsumer: ConsumeAsync records the event at once; its wait returns only when the test
// settles that event (nil: durable, or an error such as ErrFull).
type asyncConsumer struct {
	*consumer
	mu      sync.Mutex
	settle  []settle // one per queued event, in order
	queued  chan struct{}
	syncUse int // calls of the blocking Consume (it must not be used for QoS 1)
}

func newAsyncConsumer(c *consumer) *asyncConsumer {
	return &asyncConsumer{consumer: c, queued: make(chan struct{}, 64)}
}

func (a *asyncConsumer) Consume(ctx context.Context, r ingest.Result, durable bool) error {
	if durable {
		a.mu.Lock()
		a.syncUse++
		a.mu.Unlock()
	}
	return a.consumer.Consume(ctx, r, durable)
}

// settle is how a queued event's outcome reaches its Wait: err is sent on ch, then done is closed.
type settle struct {
	ch   chan error
	done chan struct{}
}

func (a *asyncConsumer) ConsumeAsync(ctx context.Context, r ingest.Result) (ingest.Durability, error) {
	if err := a.consumer.Consume(ctx, r, true); err != nil {
		return ingest.Durability{}, err
	}
	s := settle{ch: make(chan error, 1), done: make(chan struct{})}
	a.mu.Lock()
	a.settle = append(a.settle, s)
	a.mu.Unlock()
	a.queued <- struct{}{}
	return ingest.Durability{Done: s.done, Wait: func(ctx context.Context) error {
		select {
		case err := <-s.ch:
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	}}, nil
}

// waitQueued waits until n events were queued.
func (a *asyncConsumer) waitQueued(t *testing.T, n int) {
	t.Helper()
	for range n {
		select {
		case <-a.queued:
		case <-time.After(waitTimeout):
			t.Fatalf("fewer than %d events queued", n)
		}
	}
}

// finish settles the i-th queued event (0-based) with err.
func (a *asyncConsumer) finish(i int, err error) {
	a.mu.Lock()
	s := a.settle[i]
	a.mu.Unlock()
	s.ch <- err
	close(s.done)
}

func startAsync(t *testing.T, devs []dev) (*testBroker, *asyncConsumer) {
	var ac *asyncConsumer
	tb := startBroker(t, brokerOpts{devices: devs, consumer: func(c *consumer) ingest.Consumer {
		ac = newAsyncConsumer(c)
		return ac
	}})
	return tb, ac
}

// A device's QoS 1 publishes are all taken before the first is durable, and their PUBACKs follow in the order of
// the publishes, each only once its event is durable.
func TestPipelinedAcksInOrderOnceDurable(t *testing.T) {
	for _, version := range []byte{4, 5} {
		t.Run(fmt.Sprintf("v%d", version), func(t *testing.T) {
			tb, ac := startAsync(t, nil)
			rc := dialRaw(t, tb.addr, version)
			rc.mustConnect("sensor-1")
			var ids []uint16
			for i := range 3 {
				ids = append(ids, rc.publish(fmt.Sprintf("devices/sensor-1/events/e%d", i), 1, []byte(`{}`)))
			}
			ac.waitQueued(t, 3) // all three taken while none is durable: the connection is not held up
			if pk, err := rc.read(150 * time.Millisecond); err == nil {
				t.Fatalf("packet type %d before any event was durable", pk.FixedHeader.Type)
			}
			ac.finish(1, nil) // the second is durable first: its PUBACK still waits for the first
			if pk, err := rc.read(150 * time.Millisecond); err == nil {
				t.Fatalf("packet type %d id %d before the first event was durable", pk.FixedHeader.Type, pk.PacketID)
			}
			ac.finish(0, nil)
			for _, want := range ids[:2] {
				if ack := rc.expect(packets.Puback); ack.PacketID != want || ack.ReasonCode != 0 {
					t.Fatalf("PUBACK id %d reason 0x%02x, want id %d success (in order)", ack.PacketID, ack.ReasonCode, want)
				}
			}
			ac.finish(2, nil)
			if ack := rc.expect(packets.Puback); ack.PacketID != ids[2] {
				t.Fatalf("PUBACK id %d, want %d", ack.PacketID, ids[2])
			}
			ac.mu.Lock()
			syncUse := ac.syncUse
			ac.mu.Unlock()
			if syncUse != 0 {
				t.Errorf("the blocking Consume was used %d times for QoS 1", syncUse)
			}
			if n := tb.metric(t, "edgegate_ingest_events_total"); n < 3 {
				t.Errorf("events_total %v, want ≥ 3", n)
			}
		})
	}
}

// An event that finds no room is refused as the protocol allows, and the publishes after it go on.
func TestPipelinedRefusal(t *testing.T) {
	tb, ac := startAsync(t, nil)
	t.Run("v5 PUBACK 0x97", func(t *testing.T) {
		rc := dialRaw(t, tb.addr, 5)
		rc.mustConnect("sensor-1")
		id := rc.publish("devices/sensor-1/events/refused", 1, []byte(`{}`))
		ac.waitQueued(t, 1)
		ac.finish(0, fmt.Errorf("log: %w", ingest.ErrFull))
		if ack := rc.expect(packets.Puback); ack.PacketID != id || ack.ReasonCode != packets.ErrQuotaExceeded.Code {
			t.Fatalf("PUBACK id %d reason 0x%02x, want id %d 0x97", ack.PacketID, ack.ReasonCode, id)
		}
	})
	t.Run("v3.1.1 no PUBACK", func(t *testing.T) {
		rc := dialRaw(t, tb.addr, 4)
		rc.mustConnect("sensor-2")
		rc.publish("devices/sensor-2/events/refused", 1, []byte(`{}`))
		id := rc.publish("devices/sensor-2/events/stored", 1, []byte(`{}`))
		ac.waitQueued(t, 2)
		ac.finish(1, fmt.Errorf("log: %w", ingest.ErrFull))
		ac.finish(2, nil)
		if ack := rc.expect(packets.Puback); ack.PacketID != id {
			t.Fatalf("PUBACK id %d, want only the stored event's %d", ack.PacketID, id)
		}
	})
	if n := tb.metric(t, "edgegate_ingest_rejected_total", "reason", "full"); n != 2 {
		t.Errorf("rejected_total{full} = %v, want 2", n)
	}
}

// watchSensor connects the device "watcher", subscribed to devices/sensor-1/#; each message it gets comes out of
// the channel as "topic payload".
func watchSensor(t *testing.T, tb *testBroker) <-chan string {
	t.Helper()
	got := make(chan string, 10)
	w, err := pahoConnect(t, "tcp://"+tb.addr, pahoOpts{user: "watcher", pass: password("watcher")})
	if err != nil {
		t.Fatal(err)
	}
	if tok := w.Subscribe("devices/sensor-1/#", 1, func(_ paho.Client, m paho.Message) {
		got <- m.Topic() + " " + string(m.Payload())
	}); !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	return got
}

// Local subscribers get a pipelined message (once), and a dead letter is acknowledged in its turn.
func TestPipelinedLocalDeliveryAndDeadLetter(t *testing.T) {
	tb, ac := startAsync(t, []dev{{id: "sensor-1"}, {id: "watcher", subscribe: []string{"devices/#"}}})
	got := watchSensor(t, tb)

	rc := dialRaw(t, tb.addr, 5)
	rc.mustConnect("sensor-1")
	first := rc.publish("devices/sensor-1/events/motion", 1, []byte(`{"n":1}`))
	second := rc.publish("devices/sensor-1/no/mapping/here", 1, []byte(`junk`))
	ac.waitQueued(t, 1)
	for _, want := range []string{`devices/sensor-1/events/motion {"n":1}`, "devices/sensor-1/no/mapping/here junk"} {
		select {
		case m := <-got:
			if m != want {
				t.Fatalf("subscriber got %q, want %q", m, want)
			}
		case <-time.After(waitTimeout):
			t.Fatalf("subscriber did not get %q", want)
		}
	}
	// The dead letter's PUBACK waits behind the event before it.
	if pk, err := rc.read(150 * time.Millisecond); err == nil {
		t.Fatalf("packet type %d id %d before the first event was durable", pk.FixedHeader.Type, pk.PacketID)
	}
	ac.finish(0, nil)
	for _, want := range []uint16{first, second} {
		if ack := rc.expect(packets.Puback); ack.PacketID != want || ack.ReasonCode != 0 {
			t.Fatalf("PUBACK id %d reason 0x%02x, want %d success", ack.PacketID, ack.ReasonCode, want)
		}
	}
	if n := len(tb.dl.all()); n != 1 {
		t.Errorf("%d dead letters, want 1", n)
	}
	select {
	case m := <-got:
		t.Fatalf("a message was delivered twice: %q", m)
	case <-time.After(100 * time.Millisecond):
	}
}

// A retained message is kept and given to a later subscriber, on the blocking path and on the pipelined one.
func TestRetainedMessages(t *testing.T) {
	devs := []dev{{id: "sensor-1"}, {id: "watcher", subscribe: []string{"devices/#"}}}
	for _, pipelined := range []bool{false, true} {
		t.Run(fmt.Sprintf("pipelined=%v", pipelined), func(t *testing.T) {
			var tb *testBroker
			if pipelined {
				var ac *asyncConsumer
				tb, ac = startAsync(t, devs)
				done := make(chan struct{})
				t.Cleanup(func() { close(done) })
				go func() { // settle every queued event as durable
					for i := 0; ; i++ {
						select {
						case <-ac.queued:
							ac.finish(i, nil)
						case <-done:
							return
						}
					}
				}()
			} else {
				tb = startBroker(t, brokerOpts{devices: devs})
			}
			pub, err := pahoConnect(t, "tcp://"+tb.addr, pahoOpts{user: "sensor-1", pass: password("sensor-1")})
			if err != nil {
				t.Fatal(err)
			}
			if tok := pub.Publish("devices/sensor-1/events/mode", 1, true, `{"mode":"away"}`); !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
				t.Fatalf("retained publish: %v", tok.Error())
			}
			got := make(chan paho.Message, 1)
			w, err := pahoConnect(t, "tcp://"+tb.addr, pahoOpts{user: "watcher", pass: password("watcher")})
			if err != nil {
				t.Fatal(err)
			}
			w.Subscribe("devices/sensor-1/events/mode", 1, func(_ paho.Client, m paho.Message) { got <- m })
			select {
			case m := <-got:
				if !m.Retained() || string(m.Payload()) != `{"mode":"away"}` {
					t.Fatalf("got retained=%v %q", m.Retained(), m.Payload())
				}
			case <-time.After(waitTimeout):
				t.Fatal("a later subscriber did not get the retained message")
			}
		})
	}
}

// Before any client subscribed, pipelined publishes skip local delivery; a retained one is still kept, and once a
// client subscribes it gets both the retained message and the next publishes.
func TestPipelinedDeliveryAfterFirstSubscriber(t *testing.T) {
	tb, ac := startAsync(t, []dev{{id: "sensor-1"}, {id: "watcher", subscribe: []string{"devices/#"}}})
	rc := dialRaw(t, tb.addr, 4)
	rc.mustConnect("sensor-1")
	rc.publish("devices/sensor-1/events/motion", 1, []byte(`{"n":1}`))
	rc.nextID++
	rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true},
		TopicName: "devices/sensor-1/events/mode", Payload: []byte(`{"mode":"eco"}`), PacketID: rc.nextID})
	ac.waitQueued(t, 2)
	ac.finish(0, nil)
	ac.finish(1, nil)
	rc.expect(packets.Puback)
	rc.expect(packets.Puback)

	got := watchSensor(t, tb)
	rc.publish("devices/sensor-1/events/motion", 1, []byte(`{"n":2}`))
	ac.waitQueued(t, 1)
	ac.finish(2, nil)
	want := map[string]bool{`devices/sensor-1/events/mode {"mode":"eco"}`: true, `devices/sensor-1/events/motion {"n":2}`: true}
	for len(want) > 0 {
		select {
		case m := <-got:
			if !want[m] {
				t.Fatalf("subscriber got %q, want one of %v", m, want)
			}
			delete(want, m)
		case <-time.After(waitTimeout):
			t.Fatalf("subscriber did not get %v", want)
		}
	}
}

// A device's PUBACKs follow the order of its publishes, refusals (MQTT 5) included, also while deliveries to the
// device are queued (mochi then buffers what it writes to the client, and the acker's writes must not overtake it).
func TestPipelinedRefusalKeepsPubackOrder(t *testing.T) {
	tb, ac := startAsync(t, []dev{{id: "sensor-1"}})
	rc := dialRaw(t, tb.addr, 5)
	rc.mustConnect("sensor-1")
	if codes := rc.subscribe("devices/sensor-1/commands/#"); codes[0] != 1 {
		t.Fatalf("SUBACK %v", codes)
	}

	// Deliveries to the device, all along.
	stop := make(chan struct{})
	noiseDone := make(chan struct{})
	go func() {
		defer close(noiseDone)
		for range 1_000_000 {
			select {
			case <-stop:
				return
			default:
			}
			_ = tb.Publish("devices/sensor-1/commands/noise", []byte("n"), false, 0)
		}
	}()
	type ack struct {
		id   uint16
		code byte
	}
	acks := make(chan ack, 1024)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			pk, err := rc.read(2 * waitTimeout)
			if err != nil {
				return
			}
			if pk.FixedHeader.Type == packets.Puback {
				acks <- ack{pk.PacketID, pk.ReasonCode}
			}
		}
	}()
	defer func() {
		close(stop)
		<-noiseDone
		_ = rc.c.Close()
		<-readerDone
	}()

	// Pairs of publishes: the first is refused (no room), the second stored.
	const rounds = 300
	var want []ack
	for i := range rounds {
		for j := range 2 {
			rc.nextID++
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
				TopicName: "devices/sensor-1/events/e", Payload: []byte(`{}`), PacketID: rc.nextID, ProtocolVersion: 5}
			if err := rc.write(encode(t, pk)); err != nil {
				t.Fatal(err)
			}
			code := packets.CodeSuccess.Code
			if j == 0 {
				code = packets.ErrQuotaExceeded.Code
			}
			want = append(want, ack{pk.PacketID, code})
		}
		ac.waitQueued(t, 2)
		ac.finish(2*i, fmt.Errorf("log: %w", ingest.ErrFull))
		ac.finish(2*i+1, nil)
	}
	deadline := time.After(2 * waitTimeout)
	for i, w := range want {
		select {
		case got := <-acks:
			if got != w {
				t.Fatalf("PUBACK %d: id %d reason 0x%02x, want id %d reason 0x%02x", i, got.id, got.code, w.id, w.code)
			}
		case <-deadline:
			t.Fatalf("%d of %d PUBACKs", i, len(want))
		}
	}
}

// TestDeniedPublishKeepsPubackOrder: an MQTT 5 publish the ACL refuses gets its PUBACK (0x87) after the PUBACKs of
// the device's earlier publishes, which wait for durability; mochi alone would answer it at once, ahead of them.
func TestDeniedPublishKeepsPubackOrder(t *testing.T) {
	tb, ac := startAsync(t, []dev{{id: "sensor-1"}})
	rc := dialRaw(t, tb.addr, 5)
	rc.mustConnect("sensor-1")
	publish := func(topic string, qos ...byte) uint16 {
		t.Helper()
		rc.nextID++
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: append(qos, 1)[0]},
			TopicName: topic, Payload: []byte(`{}`), PacketID: rc.nextID, ProtocolVersion: 5}
		if err := rc.write(encode(t, pk)); err != nil {
			t.Fatal(err)
		}
		return pk.PacketID
	}
	denied0 := tb.metric(t, "edgegate_ingest_acl_denied_total", "action", "publish")
	stored := publish("devices/sensor-1/events/e")
	ac.waitQueued(t, 1)
	refused := publish("devices/sensor-2/events/e") // another device's topic
	waitFor(t, "the refusal counted", func() bool {
		return tb.metric(t, "edgegate_ingest_acl_denied_total", "action", "publish") == denied0+1
	})
	ac.finish(0, nil)
	for _, want := range []struct {
		id   uint16
		code byte
	}{{stored, packets.CodeSuccess.Code}, {refused, packets.ErrNotAuthorized.Code}} {
		pk, err := rc.read(waitTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if pk.FixedHeader.Type != packets.Puback || pk.PacketID != want.id || pk.ReasonCode != want.code {
			t.Fatalf("got %s id %d reason 0x%02x, want PUBACK id %d reason 0x%02x",
				packets.PacketNames[pk.FixedHeader.Type], pk.PacketID, pk.ReasonCode, want.id, want.code)
		}
	}
	// QoS 2: refused with a PUBREC, as its flow needs.
	id := publish("devices/sensor-2/events/e", 2)
	pk, err := rc.read(waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if pk.FixedHeader.Type != packets.Pubrec || pk.PacketID != id || pk.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Fatalf("QoS 2: got %s id %d reason 0x%02x, want PUBREC id %d reason 0x87",
			packets.PacketNames[pk.FixedHeader.Type], pk.PacketID, pk.ReasonCode, id)
	}
}
