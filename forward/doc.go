// Package forward carries the events of the durable log to upstream sinks — an MQTT broker, NATS JetStream or
// an HTTP endpoint — each reading the log through its own named cursor and advancing it only on a real
// acknowledgement.
//
// # Promise
//
// At least once, never lost: a sink's cursor ("sink:<name>") moves only over events the upstream acknowledged
// (an MQTT PUBACK, a JetStream PubAck, an HTTP 2xx) on the connection that sent them, and over events the sink
// does not carry (its types filter) or that the upstream refused for good (dead-lettered, reason
// upstream_rejected: an HTTP 400, 409, 413, 415, 422 or 431, or a NATS event larger than the server's max_payload
// or the stream's max_msg_size). At most window
// events are sent past the cursor as the log has durably stored it, in flight or acknowledged and not yet
// stored; acknowledgements that arrive out of order are held until the gap before them fills. While events are
// in flight the cursor goes to the log each time a quarter of the window is acknowledged (it rides along with
// the appends' commits, or takes a commit of its own, at most one per 5 ms), and at once when nothing is in
// flight. With the window full it is stored at once, without that spacing: a small window sends a window per
// commit, not a window per 5 ms. After any
// failure the sink reconnects (exponential backoff with full jitter) and sends again from its cursor, so an
// upstream may see an event twice — at most a window of events per reconnect, and per restart after a crash
// of the gateway (kill -9) as well, plus the events sent ahead of a backlog (below; at most four windows). The
// CloudEvent id never changes and is the key to drop duplicates with (JetStream does so by Nats-Msg-Id).
//
// Order: a sink sends on one connection, in log order except for the events sent ahead of a backlog, so the
// events of one device (subject) arrive in order; a reconnect may repeat events already sent, never bring a newer
// one before an older one.
//
// A NATS sink publishes without the client's own retries: a publish that fails ("no responders" while no stream
// captures the subject, or any other error in its PubAck) ends the connection, and the sink sends again from its
// cursor, in order. A connection's first event goes alone, the others waiting for its PubAck, so a stream created
// while the sink is already trying to publish stores the events in order. One window remains, of a round trip:
// the events sent after an event whose publish fails, before its failure comes back, are stored if the stream
// takes them, ahead of the failed one, which the sink sends again only after reconnecting (JetStream drops the
// repeats of those by Nats-Msg-Id). That needs a stream that stops answering and answers again within the round
// trip (deleted and created again, or a leader lost and elected), or one that refuses an event and takes the next
// (a stream with discard: new that is full, then makes room). An event then reaches the consumer after newer
// events of its device, once.
//
// # Ahead of a backlog
//
// When a connection starts with a backlog of more than four windows of events (after an outage, or a restart),
// the sink reads the headers of that backlog (edgegate_forward_sending_ahead is 1 from then until it has caught
// up). It reads each event's header once: its connection attempts during an outage, and its later connections,
// read only what was appended since. A device with events in the backlog before its last four windows of events
// waits for the backlog, in log order, until the sink has sent the last of those and of its events that came
// meanwhile. Every other device — quiet
// during the outage, or online only near its end — has nothing older still to send, so its events, those at the
// end of the backlog and the new ones, go upstream at once, on the same connection, ahead of the backlog (counted
// in edgegate_forward_sent_ahead_total). The cursor passes such an event only when the sink's reader reaches it
// in log order, so a reconnect sends it again: at most four windows of them at a time. Sinks with strict_order
// (for an upstream consumer that relies on the order across devices), with a rate_limit, priority lanes
// themselves and windows below 8 send in log order only.
//
// # Priority lanes
//
// By default priority affects retention in the log only. A sink with priority_lanes sends higher-priority
// events first: each lane (e.g. priority_lanes: [5] makes "cloud@p5", for priorities 5 to 9) reads the log
// through a cursor of its own ("sink:cloud@p5") and sends its events on a connection of its own, while the
// sink itself ("cloud") carries the lower priorities. After an outage an alarm therefore goes out at once
// instead of after the backlog of telemetry queued before it. Order holds within a lane; across lanes a newer
// high-priority event may arrive before an older low-priority one of the same device. The sink's cursor
// passes an event of a lane only once the lane has carried it (the sink goes on sending its own events, up
// to its window, meanwhile), so its cursor always means "everything before this went upstream": lanes can be
// added, changed or removed between runs without losing an event; a change may send some again. The lanes
// share the sink's rate_limit and appear in health and the metrics under their own names.
//
// A connection that has events in flight and receives no acknowledgement within ack_timeout is declared
// stalled (health, edgegate_forward_stalled, a log line), dropped and replaced.
//
// # Batches
//
// An MQTT sink with mode: batch publishes JSON arrays of consecutive events (the CloudEvents JSON batch format)
// on its batch_topic instead of one event per message on its topic; an HTTP sink with mode: batch POSTs them.
// A batch holds what is ready to send, up to batch_size events (and, for MQTT, batch_max_bytes, by default
// 128 KiB): a live event that comes alone goes at once, in an array of one, while a backlog drains in full
// batches. One acknowledgement covers the whole batch, and the order and the promise above are the same, a
// reconnect sending whole batches again. Far fewer messages reach the upstream broker: for a backlog of telemetry
// it routes, stores and (on a cloud broker that bills per message) counts one message per batch_size events.
// The consumer reads arrays instead of events; the batch topic names no device or type.
//
// # Cloud-to-device commands
//
// An MQTT sink subscribes (QoS 1, persistent session) to its command topic, by default
// edgegate/{gateway}/commands/{device}/{command}, and hands each command to the CommandSink. A command for an
// unknown device is dead-lettered (reason unknown_device). Commands are delivered locally only: they never
// enter the log and are never forwarded upstream. A command is acknowledged to the broker once delivered or
// dead-lettered; one cut short by a lost connection is delivered again (at least once). A configuration whose
// events (or batches) could be published on a topic the command subscription matches is refused: every event
// sent would come back as a command to its device. The check covers the sinks that share a broker (the same host
// and port): one sink's events may not be published where another's command subscription matches, and two sinks
// may not subscribe to command topics that could match the same topic, for the broker would hand every such
// command to both and it would be delivered twice. Of several sinks on one broker with the default command_topic,
// all but one must set disable_commands (or use a command_topic with {sink}).
//
// Commands published while the gateway is away wait at the broker and come right after the sink connects, as a
// rule before their devices are back. A command for a device the CommandSink knows but that cannot take it yet
// (ErrDeviceOffline) is held, unacknowledged, for up to 30 s and tried again every 250 ms; once the device
// takes it, it is delivered (in order with that device's other commands) and acknowledged. A held command whose
// delivery then fails is tried again as well, while the hold lasts: its device has just come and may not have
// subscribed yet. When the hold ends the command is dead-lettered (reason command_failed). A connection holds at
// most 16 commands, because a held command occupies one of the broker's in-flight slots of the session
// (mosquitto's max_inflight_messages is 20 by default) and commands for connected devices need the others; a
// further command for a device that cannot take it is dead-lettered at once. A connection that ends leaves its
// held commands unacknowledged: the broker sends them again on the next one, which holds them anew.
//
// With disable_commands the sink subscribes to nothing and removes the command subscriptions of earlier runs
// from its session (the default filter, and that of its command_topic); a command still queued there is left
// unacknowledged at the broker, neither delivered nor dead-lettered, and arrives once commands are enabled
// again. A sink whose command_topic is not the default also removes the default filter. A filter of an earlier
// command_topic that was not the default is not known to the sink and stays in the session: the commands it
// brings fit no template and are dead-lettered (reason bad_command_topic). To end that, unsubscribe the old
// filter in the sink's session (its client id, clean session off) while the gateway is stopped.
//
// # Configuration
//
// Under the key "forward"; every sink needs name, type and the block of its type, the rest has defaults
// (SinkConfig):
//
//	forward:
//	  sinks:
//	    - name: cloud                 # cursor "sink:cloud"
//	      type: mqtt
//	      types: ["sensor.*", door.opened]   # optional filter
//	      window: 1024                # events in flight (at most 65535)
//	      priority_lanes: [5]         # optional: priorities 5-9 go first, on a connection of their own
//	      strict_order: false         # true: no device goes ahead of a backlog, all in log order
//	      ack_timeout: 10s            # stall detection
//	      mqtt:
//	        url: ssl://broker.example.com:8883   # without a port: 1883 for tcp://, 8883 for ssl://
//	        username: gw-17
//	        password: s3cret          # logged as REDACTED
//	        tls: {ca_file: /etc/edgegate/ca.pem}  # only with ssl://, tls://, mqtts:// or wss://
//	        # keep_alive: 30s         # from 1s to 65535s
//	        # client_id: edgegate-<gateway>-cloud   # unique per broker; a lane's has -p<n> appended
//	        # mode: batch             # optional: JSON arrays of up to batch_size events on batch_topic
//	        # batch_topic: edgegate/{gateway}/batches
//	        # command_topic: edgegate/{gateway}/commands/{device}/{command}
//	        # disable_commands: true  # take no commands; those queued at the broker stay there
//	    - name: stream
//	      type: nats
//	      nats: {url: "nats://10.0.0.5:4222", stream: EVENTS}   # keep_alive: 30s: a ping every 15s
//	    - name: hook
//	      type: http
//	      http: {url: "https://ingest.example.com/events", mode: batch, bearer_token: abc}
//
// # Metrics
//
// All labelled by sink: edgegate_forward_sent_total, _sent_ahead_total, _acked_total, _resent_total,
// _reconnects_total, _errors_total, _connected, _stalled, _in_flight, _sending_ahead, _last_ack_age_seconds and
// _drain_rate_events_per_second.
package forward
