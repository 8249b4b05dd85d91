// Package devices keeps the device registry (who may connect, with which password or certificate, and what each
// device may publish and subscribe to) and the live state view (the latest facts reported by each device).
//
// The registry is loaded from a YAML file (see ParseRegistry) and is safe for concurrent use; Registry.Replace
// swaps in a reloaded set. Every device may publish to devices/{id} and below and subscribe within
// devices/{id}/commands/#; the publish and subscribe lists of a device grant more, as MQTT filters. Passwords are
// stored as bcrypt or argon2id hashes (HashPassword) and successful logins are remembered in memory so reconnect
// storms stay cheap.
//
// The StateView records, per device, when it was last seen, its last event type, whether it is online and the
// fields of its JSON payloads, within fixed bounds (MaxStateDevices, MaxStateKeys, MaxReportedBytes).
package devices
