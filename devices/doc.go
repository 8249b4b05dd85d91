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
// fields of its JSON payloads, within fixed bounds (MaxStateDevices, MaxStateKeys, MaxReportedBytes). Numbers
// decode as encoding/json decodes them (float64), except integers beyond ±2^53 that fit an int64 (a nanosecond
// timestamp, a 64-bit counter): they stay int64, with every digit, as in the rules.
package devices
