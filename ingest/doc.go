// Package ingest runs the embedded MQTT broker that devices connect to and turns every message a device publishes
// into exactly one CloudEvent.
//
// The broker side (Broker) authenticates devices against the registry, enforces a deny-by-default ACL, guards the
// process against hostile clients (packet size, CONNECT deadline, connection caps, per-device publish rate, panic
// containment per connection) and hands each accepted PUBLISH to the normalizer. The normalizer (Normalizer) maps
// topics and payloads to CloudEvents; what cannot be mapped becomes a dead letter with its original bytes. Each
// event is then handed to a Consumer declared here; for QoS 1 the device's PUBACK is written only after the
// consumer accepted the event.
package ingest
