package forward

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// natsURL is the shared NATS server (with JetStream) the tests use; CI runs one there.
const natsURL = "nats://127.0.0.1:4222"

// natsStream connects to the shared server and creates a stream of its own capturing <prefix>.>, deleted by the
// test's cleanup. The test fails when no server is reachable: .ci/run starts one.
func natsStream(t *testing.T) (js jetstream.JetStream, stream jetstream.Stream, prefix string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", "127.0.0.1:4222", time.Second)
	if err != nil {
		t.Fatalf("no NATS server on 127.0.0.1:4222 (start one with: nats-server -a 127.0.0.1 -p 4222 -js): %v", err)
	}
	_ = c.Close()
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatalf("nats connect: %v", err)
	}
	t.Cleanup(nc.Close)
	if js, err = jetstream.New(nc); err != nil {
		t.Fatal(err)
	}
	id := strings.ReplaceAll(uuid.NewString(), "-", "")[:12]
	prefix = "egtest" + id
	name := "EGTEST_" + id
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err = js.CreateStream(ctx, jetstream.StreamConfig{
		Name:       name,
		Subjects:   []string{prefix + ".>"},
		Storage:    jetstream.MemoryStorage,
		Duplicates: time.Minute,
	})
	if err != nil {
		t.Fatalf("NATS on 127.0.0.1:4222 has no JetStream (start it with -js): %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := js.DeleteStream(ctx, name); err != nil {
			t.Errorf("delete stream %s: %v", name, err)
		}
	})
	return js, stream, prefix
}

// TestNATSDedupe: events reach the stream on the templated subject with Nats-Msg-Id and content type; the
// same event sent twice is stored once.
func TestNATSDedupe(t *testing.T) {
	_, stream, prefix := natsStream(t)
	log := newMemLog(t)
	const n = 50
	for i := range n {
		log.add("room.entered", "hall motion", i+1) // a space: sanitised in the subject
	}
	// The same event (same id) again, as after a resend.
	first, _ := log.Read(0, 1)
	log.addRaw(first[0].Type, first[0].Subject, first[0].Data)

	sc := fastSink("js", TypeNATS)
	sc.NATS = &NATSConfig{URL: natsURL, Subject: prefix + ".{gateway}.events.{subject}.{type}"}
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitFor(t, 10*time.Second, "the cursor at the end", func() bool { return log.Cursor("sink:js") == n+1 })

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != n {
		t.Errorf("stream holds %d messages, want %d (the duplicate dropped)", info.State.Msgs, n)
	}
	msg, err := stream.GetMsg(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if want := prefix + ".gw1.events.hall_motion.room.entered"; msg.Subject != want {
		t.Errorf("subject = %s, want %s", msg.Subject, want)
	}
	if id := msg.Header.Get(jetstream.MsgIDHeader); id != "ev-000001" {
		t.Errorf("Nats-Msg-Id = %q", id)
	}
	if ct := msg.Header.Get("Content-Type"); ct != contentTypeStructured {
		t.Errorf("Content-Type = %q", ct)
	}
	if string(msg.Data) != string(first[0].Data) {
		t.Errorf("data = %s", msg.Data)
	}
	if h := sinkHealth(r, "js"); !h.Healthy || h.Target != natsURL {
		t.Errorf("health = %+v", h)
	}
}

// TestNATSNoStream: a subject no stream captures is not acknowledged; the sink keeps the events and retries.
func TestNATSNoStream(t *testing.T) {
	_, _, prefix := natsStream(t)
	log := newMemLog(t)
	log.add("room.entered", "hall", 1)
	sc := fastSink("js", TypeNATS)
	sc.NATS = &NATSConfig{URL: natsURL, Subject: "nostream" + prefix + ".{subject}"}
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitFor(t, 10*time.Second, "an error", func() bool { return sinkHealth(r, "js").LastError != "" })
	if c := log.Cursor("sink:js"); c != 0 {
		t.Errorf("cursor moved to %d without a PubAck", c)
	}
}

// TestNATSIdleDeadConnection: a connection with nothing to send that stops answering (the path swallows what the
// server sends) is dropped within about 1.5 keep-alives by the client's pings, and the sink shows disconnected
// until the path works again; then it reconnects and sends on.
func TestNATSIdleDeadConnection(t *testing.T) {
	_, stream, prefix := natsStream(t)
	proxy := mosquittotest.NewProxy(t, "127.0.0.1:4222")
	log := newMemLog(t)
	log.add("sensor.reading", "hall", 1)
	sc := fastSink("js", TypeNATS)
	sc.NATS = &NATSConfig{URL: "nats://" + proxy.Addr(), Subject: prefix + ".{subject}.{type}", KeepAlive: time.Second,
		ConnectTimeout: time.Second}
	r := startForwarder(t, Config{Sinks: []SinkConfig{sc}}, log, nil)
	waitFor(t, 10*time.Second, "the first event stored", func() bool { return log.Cursor("sink:js") == 1 })
	if !sinkHealth(r, "js").Connected {
		t.Fatal("not connected after an acknowledged event")
	}
	proxy.Blackhole(true)
	waitForOrReport(t, 10*time.Second, "the idle dead connection dropped", func() bool { return !sinkHealth(r, "js").Connected })
	proxy.Blackhole(false)
	log.add("sensor.reading", "hall", 2)
	waitFor(t, 15*time.Second, "the second event stored after the path came back", func() bool { return log.Cursor("sink:js") == 2 })
	if got := streamIDs(t, stream); strings.Join(got, ",") != "ev-000001,ev-000002" {
		t.Errorf("stream holds %v, want [ev-000001 ev-000002]", got)
	}
}
