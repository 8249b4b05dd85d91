// Package ingest runs the embedded MQTT broker that devices connect to and turns every message a device publishes
// into exactly one CloudEvent.
//
// The broker side (Broker) authenticates devices against the registry, enforces a deny-by-default ACL, guards the
// process against hostile clients (packet size, CONNECT deadline, connection caps, per-device publish rate, panic
// containment per connection) and hands each accepted PUBLISH to the normalizer. The normalizer (Normalizer) maps
// topics and payloads to CloudEvents; what cannot be mapped becomes a dead letter with its original bytes. Each
// event is then handed to a Consumer declared here; for QoS 1 the device's PUBACK is written only after the
// consumer accepted the event, and a connection's PUBACKs, refusals included, go out in the order of its publishes.
//
// Presence is per device: device.connected is emitted for each connection whose session is established, and
// device.disconnected only when the device's last such connection ends (with the reason that one ended). A
// connection that ends while another of the device's is up — a session taken over by the device's new
// connection, or one of several client ids — emits nothing, so the device's latest presence event always tells
// whether it is online. A connection that ends before its session is established emits neither.
//
// A will is published as soon as its connection ends, and becomes an event like any message from the device; an
// MQTT 5 Will Delay Interval is not applied (the will goes out at once, even if the device reconnects within
// the interval).
//
// A command (Broker.Command) counts as acknowledged only when the connection it was sent on returns a PUBACK with
// its packet id; the end of the device's own publishes that reuse that packet id does not count.
package ingest
