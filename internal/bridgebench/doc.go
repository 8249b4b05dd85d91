// Package bridgebench compares how fast edgegate carries device events to a cloud MQTT broker with how fast a
// Mosquitto bridge does, on loopback, with real processes: the edgegate binary (cmd/edgegate) or an edge
// mosquitto bridged to the cloud, and a cloud mosquitto that a counting subscriber reads.
//
// # Scenarios
//
// RunOnline: everything is up; Options.Devices devices publish Options.Messages QoS 1 messages each (JSON of
// Options.PayloadBytes bytes) as fast as Options.Inflight unacknowledged publishes per device allow. The rate
// is the distinct messages delivered per second, from the first publish to the last arrival.
//
// RunDrain: the cloud broker is stopped (SIGTERM; it saves its persistence), the devices publish
// Options.Backlog messages, the cloud broker is started again on the same port with the same persistence (the
// subscriber's persistent session and the bridge's survive), and the time to deliver the last backlog message
// is measured from that moment, while one more device publishes live traffic at Options.LiveRate messages per
// second whose end-to-end latency (publish to arrival at the subscriber) is measured. The bridge sends in the
// order it queued, so live messages wait behind the backlog. The live device has no events in the backlog but
// among its last ones (it starts publishing as the cloud broker comes back), so the gateway sends its
// messages ahead of the backlog (forward: "Ahead of a backlog"); with Options.LivePriority they get that priority
// and the gateway's sink a priority lane for them instead, which carries them on a connection of its own.
//
// # Systems
//
// Gateway is edgegate with one MQTT sink (QoS 1) to the cloud broker, its log at the default durability
// (fsync before the PUBACK to the device). MosquittoBridge is an edge mosquitto with a QoS 1 bridge
// ("topic devices/# out 1") configured to keep everything: persistence on, clean session off on both sides,
// max_queued_messages 0 (no limit). MosquittoBridgeDefaults is the same bridge with mosquitto's default queue
// limit (1000 queued messages per client), which loses the rest of a long outage's backlog. Both systems retry
// a lost upstream connection within about a second (gateway backoff 100ms–1s, bridge restart_timeout 1). With
// Options.Batch the gateway's sink is in batch mode (forward: "Batches"): each message to the cloud carries a
// JSON array of up to 128 consecutive events, which the subscriber splits and counts one by one.
//
// Every process is started in its own process group on free 127.0.0.1 ports and killed when the run ends or
// its context is cancelled; on Linux it is also killed should the calling process die.
//
// # Running it
//
//	go test -run '^$' -bench . -benchtime 1x ./internal/bridgebench/          # one round of each scenario
//	go test -run '^$' -bench Drain -benchtime 3x ./internal/bridgebench/     # three rounds, gateway and bridge alternating
//	go test -run '^$' -bench Drain -benchtime 1x ./internal/bridgebench/ -drain 1000000
//
// Flags of the benchmarks: -devices, -messages (per device, online), -inflight (the unacknowledged publishes of
// one device), -payload (the bytes of a device message), -drain (the backlog), -live-rate, -live-priority (the live device's priority, with a lane for it),
// -durability (the gateway log's fsync or interval), -window (the gateway sink's window), -batch (the gateway's
// sink in batch mode), -edgegate (a built binary instead of building cmd/edgegate), -bridge-defaults=false (skip
// the lossy bridge run), -progress, -keep (keep each run's directory). They report each system's median rate, the ratio gateway/bridge of the
// medians, and per system the lost messages, the latency p99, the CPU share and the peak RSS. On a machine
// shared with other work the rates vary a lot from run to run; compare ratios of the same run, and CPU per
// message (Result.CPU / Unique), which varies less.
package bridgebench
