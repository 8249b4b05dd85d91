package ingest

import (
	"bytes"
	"cmp"
	"errors"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
)

// maxRateDelay is how long a publish over the rate limit may be held back (the device is slowed down, nothing is
// lost). Beyond it the publish is refused: no PUBACK on MQTT 3.1.1, reason 0x96 on MQTT 5.
const maxRateDelay = time.Second

// clientState is what the hook knows about one connection.
type clientState struct {
	device  *deviceState
	will    atomic.Bool // the will was published
	denied  atomic.Bool // a denial by the ACL was logged at info
	version byte
	acks    *acker // PUBACKs waiting for durability (AsyncConsumer); only the connection's reader sets it
	online  bool   // its device.connected event was emitted and it counts in device.online (device.presence)
}

// deviceState is shared by every connection of one device.
type deviceState struct {
	id      string
	limiter *rate.Limiter
	clients map[*mqtt.Client]struct{} // authenticated connections, established or not (hook.mu)
	waiters []*waiter                 // (hook.mu)

	// presence orders the device's presence events: each is handed to the consumer under it, together with the
	// change of online it reports, so that the last event always tells whether the device is online.
	presence sync.Mutex
	online   atomic.Int32 // connections whose session is established and not ended (changed under presence)
}

type hook struct {
	mqtt.HookBase
	b *Broker

	clients sync.Map // *mqtt.Client → *clientState
	conns   sync.Map // net.Conn → *mqtt.Client, for each client in clients: see abandon

	mu      sync.Mutex
	devices map[string]*deviceState
	// limiters are the devices' publish token buckets, kept when a device's last connection ends: reconnecting
	// does not fill a bucket. One per device that ever authenticated (bounded by the registry).
	limiters map[string]*rate.Limiter
	pending  atomic.Int64 // commands waiting for an acknowledgement
	// subscribed is set by the first SUBSCRIBE and stays set: until then no client can receive a message, so
	// pipelined publishes skip local delivery (see publishPipelined).
	subscribed atomic.Bool
	ackers     sync.WaitGroup // running ackers (pipeline.go)

	messagesIn [3]prometheus.Counter // edgegate_ingest_messages_total by QoS, resolved once
}

func newHook(b *Broker) *hook {
	h := &hook{b: b, devices: map[string]*deviceState{}, limiters: map[string]*rate.Limiter{}}
	for q := range h.messagesIn {
		h.messagesIn[q] = b.m.messagesIn.WithLabelValues(qosLabel(byte(q)))
	}
	return h
}

func (h *hook) ID() string { return "edgegate-ingest" }

func (h *hook) Provides(b byte) bool {
	return bytes.Contains([]byte{
		mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnSessionEstablished, mqtt.OnDisconnect,
		mqtt.OnPublish, mqtt.OnWillSent, mqtt.OnQosPublish, mqtt.OnPacketRead, mqtt.OnSubscribe,
	}, []byte{b})
}

func (h *hook) state(cl *mqtt.Client) *clientState {
	if v, ok := h.clients.Load(cl); ok {
		return v.(*clientState)
	}
	return nil
}

// OnConnectAuthenticate decides who the client is: a certificate CN, a username and password, or (only in the
// explicitly opened development mode) its client id.
func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	id, reason := h.identify(cl, pk)
	if reason != "" {
		h.b.m.authFail.WithLabelValues(reason).Inc()
		h.b.log.Info("connection refused", "reason", reason, "device_id", id, "client_id", cl.ID,
			"remote", cl.Net.Remote)
		return false
	}
	// A client id names a session; only the device itself may use its own (exactly, or as "{device}:{suffix}"),
	// so no device can take over another's session and subscriptions.
	if cl.ID != id && !hasPrefixSep(cl.ID, id, ':') && len(cl.Properties.Props.AssignedClientID) == 0 {
		h.b.m.authFail.WithLabelValues("client_id_mismatch").Inc()
		h.b.log.Info("connection refused", "reason", "client_id_mismatch", "device_id", id, "client_id", cl.ID,
			"hint", "use the device id as client id, or \"<device id>:<suffix>\"")
		return false
	}
	// A will aimed at a topic the device may not publish to is never published.
	if atomic.LoadUint32(&cl.Properties.Will.Flag) == 1 && !h.b.deps.ACL.CanPublish(id, cl.Properties.Will.TopicName) {
		atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
		cl.Properties.Will = mqtt.Will{}
		h.b.m.aclDenied.WithLabelValues("will").Inc()
		h.b.log.Warn("will refused by the ACL: it will not be published", "device_id", id, "topic", pk.Connect.WillTopic)
	}
	// A will is published as soon as the connection ends: an MQTT 5 Will Delay Interval is not applied. mochi
	// publishes a delayed will from its event loop without the client's state, and not at all through the hook
	// once the session is gone, so a delayed will would reach local subscribers but never become an event.
	cl.Properties.Will.WillDelayInterval = 0
	cl.Properties.Username = []byte(id)
	if !cl.Properties.Clean || cl.Properties.Props.SessionExpiryInterval > 0 {
		h.trimSessions(id, cl)
	}

	st := &clientState{version: cl.Properties.ProtocolVersion}
	h.mu.Lock()
	if n := h.openConns(id, cl.ID); n >= h.b.cfg.MaxConnectionsPerDevice {
		h.mu.Unlock()
		h.b.m.authFail.WithLabelValues("device_connection_limit").Inc()
		h.b.log.Info("connection refused", "reason", "device_connection_limit", "device_id", id, "client_id", cl.ID,
			"connections", n, "max_connections_per_device", h.b.cfg.MaxConnectionsPerDevice)
		return false
	}
	ds := h.devices[id]
	if ds == nil {
		lim := h.limiters[id]
		if lim == nil {
			lim = rate.NewLimiter(rate.Limit(h.b.cfg.PublishRate), h.b.cfg.PublishBurst)
			h.limiters[id] = lim
		}
		ds = &deviceState{id: id, limiter: lim, clients: map[*mqtt.Client]struct{}{}}
		h.devices[id] = ds
	}
	ds.clients[cl] = struct{}{}
	st.device = ds
	h.mu.Unlock()
	h.clients.Store(cl, st)
	h.conns.Store(cl.Net.Conn, cl)
	return true
}

// openConns counts the device's authenticated connections other than one with client id clientID, which a new
// connection with that id takes over. h.mu is held.
func (h *hook) openConns(device, clientID string) int {
	ds := h.devices[device]
	if ds == nil {
		return 0
	}
	n := 0
	for c := range ds.clients {
		if c.ID != clientID {
			n++
		}
	}
	return n
}

// maxStoredSessions bounds the sessions of disconnected clients the broker keeps for one device (client ids
// "{device}" and "{device}:{suffix}" without a clean start). Each keeps its subscriptions and queued messages for
// up to mqtt.session_expiry, so without a bound one device could fill the memory by connecting under ever new
// client ids. When a device asks for a persistent session and already has this many, its oldest are dropped.
const maxStoredSessions = 16

// trimSessions drops the oldest stored sessions of the device so that, with the connecting client's, it keeps at
// most maxStoredSessions.
func (h *hook) trimSessions(id string, connecting *mqtt.Client) {
	var stored []*mqtt.Client
	for _, c := range h.b.srv.Clients.GetAll() {
		if c.ID != connecting.ID && c.StopTime() > 0 && string(c.Properties.Username) == id {
			stored = append(stored, c)
		}
	}
	if len(stored) < maxStoredSessions {
		return
	}
	slices.SortFunc(stored, func(a, b *mqtt.Client) int { return cmp.Compare(a.StopTime(), b.StopTime()) })
	for _, c := range stored[:len(stored)-maxStoredSessions+1] {
		if !h.dropSession(c) {
			continue // reconnected meanwhile
		}
		h.b.m.sessionsDropped.Inc()
		h.b.log.Debug("stored session dropped", "device_id", id, "client_id", c.ID, "max", maxStoredSessions)
	}
}

// dropSession forgets the session of a stopped client — its messages in flight, its subscriptions and its entry in
// mochi's client list — unless a new connection has taken its client id meanwhile (false).
func (h *hook) dropSession(cl *mqtt.Client) bool {
	if cur, ok := h.b.srv.Clients.Get(cl.ID); !ok || cur != cl {
		return false
	}
	cl.ClearInflights()
	h.b.srv.UnsubscribeClient(cl)
	h.b.srv.Clients.Delete(cl.ID)
	return true
}

func hasPrefixSep(s, prefix string, sep byte) bool {
	return len(s) > len(prefix) && s[:len(prefix)] == prefix && s[len(prefix)] == sep
}

func (h *hook) identify(cl *mqtt.Client, pk packets.Packet) (id, reason string) {
	user := string(pk.Connect.Username)
	if cs, ok := tlsState(cl.Net.Conn); ok && len(cs.PeerCertificates) > 0 {
		cn := cs.PeerCertificates[0].Subject.CommonName
		dev, ok := h.b.deps.Auth.DeviceForCN(cn)
		if !ok {
			return cn, "unknown_certificate"
		}
		if user != "" && user != dev {
			return dev, "certificate_username_mismatch"
		}
		return dev, ""
	}
	if user != "" || pk.Connect.PasswordFlag {
		if h.b.deps.Auth.Authenticate(user, pk.Connect.Password) {
			return user, ""
		}
		return user, "bad_credentials"
	}
	if h.b.cfg.AllowAnonymous {
		return cl.ID, ""
	}
	return "", "anonymous"
}

// OnACLCheck applies the deny-by-default ACL to subscriptions and deliveries (read); OnPublish applies it to
// publishes.
func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	st := h.state(cl)
	if st == nil {
		return false
	}
	if write {
		// Publishes are checked by OnPublish (publishDenied): refused here, an MQTT 5 one would be answered at
		// once, ahead of the PUBACKs of earlier publishes that wait for durability.
		return true
	}
	return h.b.deps.ACL.CanSubscribe(st.device.id, topic)
}

// Bounds on the subscriptions one client holds: the broker keeps each filter (up to 64 KiB) for the session's
// life, so without them a device could make the gateway hold gigabytes with SUBSCRIBEs inside its own namespace.
const (
	maxSubscriptions     = 100
	maxSubscriptionBytes = 64 << 10 // the filters' lengths added up
)

// OnSubscribe logs and counts filters the ACL will refuse (mochi answers them with "not authorized"), and refuses
// new filters beyond maxSubscriptions and maxSubscriptionBytes: it blanks them, which mochi answers as an invalid
// filter (0x8F; 0x80 on MQTT 3.1.1).
func (h *hook) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	h.subscribed.Store(true)
	st := h.state(cl)
	if st == nil {
		return pk
	}
	held, size := -1, 0 // counted on the first allowed filter
	for i, f := range pk.Filters {
		if !h.b.deps.ACL.CanSubscribe(st.device.id, f.Filter) {
			h.b.m.aclDenied.WithLabelValues("subscribe").Inc()
			h.logDenied(st, "subscription denied", f.Filter)
			continue
		}
		if held < 0 {
			subs := cl.State.Subscriptions.GetAll()
			held = len(subs)
			for filter := range subs {
				size += len(filter)
			}
		}
		if _, ok := cl.State.Subscriptions.Get(f.Filter); ok {
			continue // replaces a subscription it holds
		}
		if held >= maxSubscriptions || size+len(f.Filter) > maxSubscriptionBytes {
			h.b.m.aclDenied.WithLabelValues("subscribe_limit").Inc()
			h.logDenied(st, "subscription refused: the client holds too many", f.Filter)
			pk.Filters[i].Filter = ""
			continue
		}
		held, size = held+1, size+len(f.Filter)
	}
	return pk
}

// logDenied logs a refusal by the ACL: the first on a connection at info, the others at debug, so that a device
// that keeps trying (denied publishes are not rate limited) cannot flood the log. The metric counts every one.
func (h *hook) logDenied(st *clientState, msg, topic string) {
	if st.denied.CompareAndSwap(false, true) {
		h.b.log.Info(msg, "device_id", st.device.id, "topic", topic, "further_denials", "logged at debug")
		return
	}
	h.b.log.Debug(msg, "device_id", st.device.id, "topic", topic)
}

// OnSessionEstablished emits device.connected for every connection whose session is established.
func (h *hook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	h.b.guard.established(cl.Net.Conn)
	st := h.state(cl)
	if st == nil {
		return
	}
	h.b.log.Debug("device connected", "device_id", st.device.id, "client_id", cl.ID, "remote", cl.Net.Remote)
	ds := st.device
	ds.presence.Lock()
	defer ds.presence.Unlock()
	ds.online.Add(1)
	st.online = true
	h.consume(h.b.deps.Normalizer.Presence(ds.id, true, "", time.Now()), false)
}

// OnDisconnect forgets the connection and emits device.disconnected if it was the device's last one.
func (h *hook) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	v, ok := h.clients.LoadAndDelete(cl)
	if !ok {
		return
	}
	h.conns.CompareAndDelete(cl.Net.Conn, cl)
	st := v.(*clientState)
	stopAcker(st)
	reason := "connection_lost"
	switch {
	case st.will.Load():
		reason = "will_published"
	case errors.Is(cl.StopCause(), packets.ErrSessionTakenOver):
		reason = "taken_over"
	case h.b.closed.Load():
		reason = "server_shutdown"
	case kickedForLimit(err):
		reason = PresenceKickedLimit
	case errors.Is(cl.StopCause(), errRevoked):
		reason = PresenceRevoked
	case err == nil || errors.Is(err, packets.CodeDisconnect):
		reason = "clean_disconnect"
	}
	ds := st.device
	h.b.log.Debug("device disconnected", "device_id", ds.id, "client_id", cl.ID, "reason", reason, "error", err)
	// The event is emitted while the connection still holds the device state, so that a new connection of the
	// device shares it and its device.connected follows this event.
	ds.presence.Lock()
	if st.online {
		st.online = false
		if ds.online.Add(-1) == 0 {
			h.consume(h.b.deps.Normalizer.Presence(ds.id, false, reason, time.Now()), false)
		} else {
			h.b.log.Debug("device still connected: no device.disconnected", "device_id", ds.id,
				"client_id", cl.ID, "connections", ds.online.Load())
		}
	}
	ds.presence.Unlock()
	h.mu.Lock()
	delete(ds.clients, cl)
	if len(ds.clients) == 0 && len(ds.waiters) == 0 {
		delete(h.devices, ds.id)
	}
	h.mu.Unlock()
}

// errRevoked ends the connections of a device whose registry entry is gone or no longer lets them in.
var errRevoked = errors.New("ingest: the device's registry entry changed")

// revoke closes every connection of the device (an MQTT 5 client is told "not authorized" first; no will is
// published) and drops its stored sessions, whose subscriptions the old entry granted. It returns how many
// connections it closed.
func (h *hook) revoke(device string) int {
	h.mu.Lock()
	var open []*mqtt.Client
	if ds := h.devices[device]; ds != nil {
		for cl := range ds.clients {
			open = append(open, cl)
		}
	}
	h.mu.Unlock()
	for _, cl := range open {
		atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
		if cl.Properties.ProtocolVersion == 5 {
			_ = cl.Net.Conn.SetWriteDeadline(time.Now().Add(time.Second)) // the connection ends anyway
			_ = cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect},
				ReasonCode: packets.ErrNotAuthorized.Code,
				Properties: packets.Properties{ReasonString: "the device's registry entry changed"}})
		}
		cl.Stop(errRevoked)
	}
	for _, cl := range h.b.srv.Clients.GetAll() {
		if string(cl.Properties.Username) != device || cl.Net.Inline {
			continue
		}
		cl.Stop(errRevoked) // no-op for one already stopped
		h.dropSession(cl)
	}
	return len(open)
}

// errAbandoned ends the session of a client whose connection panicked.
var errAbandoned = errors.New("ingest: connection abandoned after a panic")

// errEndedEarly is the cause given to a client whose connection ended before mochi read from it.
var errEndedEarly = errors.New("ingest: connection ended before its session started")

// abandon is called once serving conn ended, normally or by a panic, and ends what mochi left of its client.
// mochi forgets a client (OnDisconnect) only once it has read from the connection after the CONNACK; a
// connection that ends before — the CONNACK cannot be written, the client gave up while its credentials were
// checked, a panic — would leave the device connected forever. abandon forgets the client's device state (with
// its presence), and drops its session when it was not to outlive the connection, or always after a panic.
func (h *hook) abandon(conn net.Conn, panicked bool) {
	v, ok := h.conns.Load(conn)
	if !ok {
		return // ended through OnDisconnect, or never authenticated
	}
	cl := v.(*mqtt.Client)
	cause := errEndedEarly
	if panicked {
		cause = errAbandoned
	}
	cl.Stop(cause) // no-op when mochi stopped it already
	h.OnDisconnect(cl, cause, true)
	expire := (cl.Properties.ProtocolVersion == 5 && cl.Properties.Props.SessionExpiryInterval == 0) ||
		(cl.Properties.ProtocolVersion < 5 && cl.Properties.Clean)
	if panicked || expire {
		h.dropSession(cl)
	}
}

// kickedForLimit reports whether mochi closed the connection because the client exceeded a limit.
func kickedForLimit(err error) bool {
	for _, c := range []packets.Code{packets.ErrPacketTooLarge, packets.ErrReceiveMaximum,
		packets.ErrMessageRateTooHigh, packets.ErrQuotaExceeded} {
		if errors.Is(err, c) {
			return true
		}
	}
	return false
}

// OnPublish turns a device's PUBLISH into an event. It returns only after the consumer accepted the event, so
// mochi writes the PUBACK (QoS 1) only then.
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil // the gateway's own messages (commands) are not device events
	}
	st := h.state(cl)
	if st == nil {
		return pk, packets.ErrRejectPacket
	}
	qos := pk.FixedHeader.Qos
	// QoS 1 with an AsyncConsumer: PUBACKs are written in order by the connection's acker (pipeline.go).
	ac, pipelined := h.b.deps.Consumer.(AsyncConsumer)
	pipelined = pipelined && qos == 1
	if !h.b.deps.ACL.CanPublish(st.device.id, pk.TopicName) {
		return h.publishDenied(cl, st, pk, pipelined) // not counted as a message in
	}
	if int(qos) < len(h.messagesIn) {
		h.messagesIn[qos].Inc()
	}

	// Allow is the allocation-free path; only a device over its rate pays for a reservation.
	if lim := st.device.limiter; !lim.Allow() {
		r := lim.Reserve()
		if d := r.Delay(); d <= maxRateDelay {
			if d > 0 {
				h.b.m.rateLimited.WithLabelValues("delayed").Inc()
				time.Sleep(d)
			}
		} else {
			r.Cancel()
			h.b.m.rateLimited.WithLabelValues("refused").Inc()
			h.b.log.Debug("publish refused: rate limit", "device_id", st.device.id, "topic", pk.TopicName)
			if pipelined {
				h.ackerOf(cl, st).jobs <- ackJob{id: pk.PacketID, refuse: true, code: packets.ErrMessageRateTooHigh}
				return handled(pk)
			}
			return pk, refuse(st.version, qos, packets.ErrMessageRateTooHigh)
		}
	}

	start := time.Now()
	res, err := h.b.deps.Normalizer.Normalize(Message{
		DeviceID:    st.device.id,
		Topic:       pk.TopicName,
		Payload:     pk.Payload,
		QoS:         qos,
		Retain:      pk.FixedHeader.Retain,
		ContentType: pk.Properties.ContentType,
		Received:    start,
	})
	h.b.m.normalize.Observe(time.Since(start).Seconds())
	if err != nil {
		var dl *DeadLetterError
		reason, detail := "normalize_failed", err.Error()
		if errors.As(err, &dl) {
			reason, detail = dl.Reason, dl.Detail
		}
		h.b.m.deadLetters.WithLabelValues(reason).Inc()
		h.b.log.Debug("dead letter", "device_id", st.device.id, "topic", pk.TopicName, "reason", reason)
		h.b.deps.DeadLetters.DeadLetter(reason, detail, st.device.id, pk.TopicName, pk.Payload)
		// Kept as a dead letter: acknowledged, and routed to local subscribers as any MQTT message.
		if pipelined {
			return h.publishPipelined(cl, st, pk, nil, ac)
		}
		return pk, nil
	}
	if pipelined {
		return h.publishPipelined(cl, st, pk, &res, ac)
	}
	if err := h.b.deps.Consumer.Consume(*h.b.ctx.Load(), res, qos > 0); err != nil {
		code := h.notTaken(err)
		h.b.log.Debug("event not accepted: no acknowledgement", "device_id", st.device.id, "topic", pk.TopicName, "error", err)
		return pk, refuse(st.version, qos, code)
	}
	h.b.m.events.Inc()
	return pk, nil
}

// publishDenied answers a publish the ACL refuses as mochi's own ACL check would: nothing for QoS 0; MQTT 3.1.1,
// which has no negative acknowledgement, ends the connection; MQTT 5 gets reason 0x87 (not authorized). But a QoS 1
// refusal goes through the connection's acker, behind the PUBACKs of earlier publishes that still wait for
// durability, since PUBACKs must follow the order of the publishes.
func (h *hook) publishDenied(cl *mqtt.Client, st *clientState, pk packets.Packet, pipelined bool) (packets.Packet, error) {
	h.b.m.aclDenied.WithLabelValues("publish").Inc()
	h.logDenied(st, "publish denied", pk.TopicName)
	switch {
	case pk.FixedHeader.Qos == 0:
		return pk, packets.ErrRejectPacket
	case st.version != 5:
		_ = h.b.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
		return pk, packets.ErrRejectPacket
	case pipelined:
		h.ackerOf(cl, st).jobs <- ackJob{id: pk.PacketID, refuse: true, code: packets.ErrNotAuthorized}
		return handled(pk)
	case pk.FixedHeader.Qos == 2:
		// mochi answers a refused QoS 2 publish with a PUBACK; the flow needs a PUBREC.
		rec := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: pk.PacketID,
			ReasonCode: packets.ErrNotAuthorized.Code, Created: time.Now().Unix()}
		rec.Properties.ReasonString = packets.ErrNotAuthorized.Reason
		if err := cl.WritePacket(rec); err != nil {
			h.b.log.Debug("refusal not written", "device_id", st.device.id, "error", err)
		}
		return pk, packets.ErrRejectPacket
	default: // mochi writes the PUBACK at once, which is in order without an acker
		return pk, packets.ErrNotAuthorized
	}
}

// refuse makes mochi withhold the PUBACK (MQTT 3.1.1, QoS 0) or answer with a reason code (MQTT 5, QoS > 0).
func refuse(version, qos byte, code packets.Code) error {
	if version == 5 && qos > 0 {
		return code
	}
	return packets.ErrRejectPacket
}

func qosLabel(q byte) string {
	return strconv.Itoa(int(q))
}

// OnWillSent records that the will went out and turns it into an event like any message from the device.
func (h *hook) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	st := h.state(cl)
	if st == nil {
		return
	}
	st.will.Store(true)
	res, err := h.b.deps.Normalizer.Normalize(Message{DeviceID: st.device.id, Topic: pk.TopicName, Payload: pk.Payload,
		QoS: pk.FixedHeader.Qos, Retain: pk.FixedHeader.Retain, ContentType: pk.Properties.ContentType, Received: time.Now()})
	if err != nil {
		var dl *DeadLetterError
		reason := "normalize_failed"
		if errors.As(err, &dl) {
			reason = dl.Reason
		}
		h.b.m.deadLetters.WithLabelValues(reason).Inc()
		h.b.deps.DeadLetters.DeadLetter(reason, err.Error(), st.device.id, pk.TopicName, pk.Payload)
		return
	}
	h.consume(res, false)
}

// notTaken counts an event the consumer did not take (edgegate_ingest_rejected_total, reason full or error) and
// returns the refusal for the device: quota exceeded when the log is full.
func (h *hook) notTaken(err error) packets.Code {
	if errors.Is(err, ErrFull) {
		h.b.m.rejected.WithLabelValues("full").Inc()
		return packets.ErrQuotaExceeded
	}
	h.b.m.rejected.WithLabelValues("error").Inc()
	return packets.ErrUnspecifiedError
}

func (h *hook) consume(r Result, durable bool) {
	if err := h.b.deps.Consumer.Consume(*h.b.ctx.Load(), r, durable); err != nil {
		h.notTaken(err)
		h.b.log.Warn("event not accepted", "type", r.Event.Type(), "device_id", r.Event.Subject(), "error", err)
		return
	}
	h.b.m.events.Inc()
}

// expectAck registers a command waiter for device on topic. It returns ErrNotConnected when the device has no
// connection and ErrNotSubscribed when none of its connections is among subs, the subscribers of the topic.
func (h *hook) expectAck(device, topic string, subs *mqtt.Subscribers) (*waiter, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ds := h.devices[device]
	if ds == nil || len(ds.clients) == 0 {
		return nil, ErrNotConnected
	}
	if !reaches(subs, ds.clients) {
		return nil, ErrNotSubscribed
	}
	w := &waiter{topic: topic, done: make(chan struct{})}
	ds.waiters = append(ds.waiters, w)
	h.pending.Add(1)
	return w, nil
}

// reaches reports whether subs holds a subscription of one of clients, shared ones included.
func reaches(subs *mqtt.Subscribers, clients map[*mqtt.Client]struct{}) bool {
	for cl := range clients {
		if _, ok := subs.Subscriptions[cl.ID]; ok {
			return true
		}
		for _, group := range subs.Shared {
			if _, ok := group[cl.ID]; ok {
				return true
			}
		}
	}
	return false
}

func (h *hook) dropWaiter(device string, w *waiter) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ds := h.devices[device]
	if ds == nil {
		return
	}
	for i, x := range ds.waiters {
		if x == w {
			ds.waiters = append(ds.waiters[:i], ds.waiters[i+1:]...)
			h.pending.Add(-1)
			break
		}
	}
	if len(ds.clients) == 0 && len(ds.waiters) == 0 {
		delete(h.devices, device)
	}
}

func (h *hook) connected(device string) bool {
	h.mu.Lock()
	ds := h.devices[device]
	h.mu.Unlock()
	// online, not clients: it changes together with the presence event (before it is handed on), and a
	// connection that never established its session does not count.
	return ds != nil && ds.online.Load() > 0
}

// OnQosPublish binds a waiting command to the packet id mochi gave it on one of the device's connections, or, when
// mochi resends it on the connection that took the session over, to that connection.
func (h *hook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, _ int64, resends int) {
	if h.pending.Load() == 0 || resends > 0 {
		return
	}
	st := h.state(cl)
	if st == nil {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, w := range st.device.waiters {
		if w.client == nil && w.topic == pk.TopicName {
			w.client, w.packetID = cl, pk.PacketID
			return
		}
	}
	if !pk.FixedHeader.Dup {
		return
	}
	// A command resent on the connection that took the session over: its PUBACK comes on this one now.
	for _, w := range st.device.waiters {
		if w.client != nil && w.client != cl && w.client.Closed() && w.packetID == pk.PacketID && w.topic == pk.TopicName {
			w.client = cl
			return
		}
	}
}

// OnPacketRead resolves the command waiting for a PUBACK the device sent. Only a PUBACK read from the
// connection the command went out on counts: mochi's OnQosComplete also reports the end of the device's own QoS 1
// and 2 publishes with the same packet id, and mochi keeps one in-flight entry per packet id for both directions,
// so a device's publish can remove the command's entry and have mochi ignore the device's PUBACK for it.
func (h *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Puback && h.pending.Load() > 0 {
		h.acknowledged(cl, pk.PacketID)
	}
	return pk, nil
}

// acknowledged resolves the command bound to packet id on cl, if there is one.
func (h *hook) acknowledged(cl *mqtt.Client, id uint16) {
	st := h.state(cl)
	if st == nil {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, w := range st.device.waiters {
		if w.client == cl && w.packetID == id {
			w.once.Do(func() { close(w.done) })
			return
		}
	}
}
