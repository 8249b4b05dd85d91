//go:build unix

package bridgebench

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// System is the system under test: what carries the devices' messages to the cloud broker.
type System int

const (
	// Gateway is edgegate with one MQTT sink to the cloud broker.
	Gateway System = iota
	// MosquittoBridge is an edge mosquitto bridged to the cloud broker, configured to keep everything
	// (persistence, clean session off, no queue limit).
	MosquittoBridge
	// MosquittoBridgeDefaults is the same bridge with mosquitto's default limit of 1000 queued messages.
	MosquittoBridgeDefaults
)

// Systems lists every System.
var Systems = []System{Gateway, MosquittoBridge, MosquittoBridgeDefaults}

// String returns the system's name: gateway, bridge or bridge-defaults.
func (s System) String() string {
	switch s {
	case Gateway:
		return "gateway"
	case MosquittoBridge:
		return "bridge"
	case MosquittoBridgeDefaults:
		return "bridge-defaults"
	}
	return fmt.Sprintf("System(%d)", int(s))
}

// ParseSystem is the inverse of String.
func ParseSystem(name string) (System, error) {
	for _, s := range Systems {
		if s.String() == name {
			return s, nil
		}
	}
	return 0, fmt.Errorf("bridgebench: unknown system %q (want gateway, bridge or bridge-defaults)", name)
}

// Options configures a run. Zero fields take the defaults named on them.
type Options struct {
	// System is what carries the messages.
	System System
	// Devices is the number of publishing devices (default 10); drain adds one live device.
	Devices int
	// Messages is what each device publishes in RunOnline (default 10000).
	Messages int
	// Backlog is how many messages the devices publish together while the cloud is down in RunDrain
	// (default 100000).
	Backlog int
	// LiveRate is the live device's messages per second in RunDrain (default 200).
	LiveRate float64
	// LiveTail is how long the live traffic goes on after the backlog has drained (default 1s).
	LiveTail time.Duration
	// PayloadBytes is the size of each device message, JSON (default 100).
	PayloadBytes int
	// Inflight is the most unacknowledged publishes of one device (default 100).
	Inflight int
	// StallTimeout ends the wait for deliveries when nothing new arrived for this long (default 15s); the
	// messages still missing count as lost.
	StallTimeout time.Duration
	// Timeout bounds the whole run (default 10m).
	Timeout time.Duration

	// GatewayBinary is the edgegate binary (see BuildGateway); empty: it is built into the run's directory.
	GatewayBinary string
	// MosquittoBinary is the broker binary; empty: FindMosquitto.
	MosquittoBinary string
	// Durability is the gateway log's buffer.durability, fsync (default) or interval.
	Durability string
	// Window is the gateway sink's window (0: the forward package's default).
	Window int
	// LivePriority, when above 0, gives the live device's messages this priority (an ingest mapping) and the
	// gateway's sink a priority lane from it (forward priority_lanes), which carries the live traffic of RunDrain
	// on a connection of its own. The bridge has nothing like it and ignores it. 0: one lane (the live device's
	// messages still go ahead of the backlog, see forward's "Ahead of a backlog").
	LivePriority int
	// Batch puts the gateway's MQTT sink in batch mode (forward "Batches"): JSON arrays of up to batch_size (128)
	// events per message on edgegate/bench/batches. The bridge ignores it.
	Batch bool
	// GatewayProcs, when above 0, runs the gateway with GOMAXPROCS set to it (0: Go's default, one per processor).
	GatewayProcs int
	// BridgeInflight is the edge mosquitto's max_inflight_messages, which bounds the bridge's unacknowledged
	// QoS 1 messages (0: mosquitto's default, 20; -1: no limit).
	BridgeInflight int

	// WorkDir is where the run's temporary directory is made (default os.TempDir()).
	WorkDir string
	// KeepDir keeps the run's directory (configurations, logs, data) instead of removing it.
	KeepDir bool
	// Logf, when set, receives progress lines.
	Logf func(format string, args ...any)
}

func (o Options) withDefaults() Options {
	if o.Devices == 0 {
		o.Devices = 10
	}
	if o.Messages == 0 {
		o.Messages = 10000
	}
	if o.Backlog == 0 {
		o.Backlog = 100000
	}
	if o.LiveRate == 0 {
		o.LiveRate = 200
	}
	if o.LiveTail == 0 {
		o.LiveTail = time.Second
	}
	if o.PayloadBytes == 0 {
		o.PayloadBytes = 100
	}
	if o.Inflight == 0 {
		o.Inflight = 100
	}
	if o.StallTimeout == 0 {
		o.StallTimeout = 15 * time.Second
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Minute
	}
	if o.Durability == "" {
		o.Durability = "fsync"
	}
	if o.MosquittoBinary == "" {
		o.MosquittoBinary = FindMosquitto()
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	return o
}

func (o Options) validate() error {
	var errs []error
	if o.System < Gateway || o.System > MosquittoBridgeDefaults {
		errs = append(errs, fmt.Errorf("system: %d is not a System", int(o.System)))
	}
	if o.Devices < 1 || o.Devices > 1000 {
		errs = append(errs, fmt.Errorf("devices: %d is not in 1..1000", o.Devices))
	}
	if o.Messages < 1 || o.Backlog < 1 {
		errs = append(errs, fmt.Errorf("messages (%d) and backlog (%d) must be > 0", o.Messages, o.Backlog))
	}
	if o.LiveRate <= 0 || o.LiveRate > 100000 {
		errs = append(errs, fmt.Errorf("live_rate: %g is not in (0, 100000]", o.LiveRate))
	}
	if o.PayloadBytes < 64 {
		errs = append(errs, fmt.Errorf("payload_bytes: %d is less than 64", o.PayloadBytes))
	}
	if o.Inflight < 1 {
		errs = append(errs, fmt.Errorf("inflight: %d is less than 1", o.Inflight))
	}
	if o.LivePriority < 0 || o.LivePriority > 9 {
		errs = append(errs, fmt.Errorf("live_priority: %d is not in 0..9", o.LivePriority))
	}
	if o.Durability != "fsync" && o.Durability != "interval" {
		errs = append(errs, fmt.Errorf("durability: %q is not fsync or interval", o.Durability))
	}
	if o.MosquittoBinary == "" {
		errs = append(errs, ErrNoMosquitto)
	}
	return errors.Join(errs...)
}

// ErrNoMosquitto is returned when the mosquitto binary is not installed (Debian: apt-get install mosquitto).
var ErrNoMosquitto = errors.New("bridgebench: mosquitto is not installed (Debian: apt-get install mosquitto)")

// Result is what one run measured. The counts are of the measured messages: every device message of
// RunOnline, the backlog of RunDrain (the live traffic is counted in the Live fields).
type Result struct {
	Scenario string // "online" or "drain"
	System   System

	// Sent publishes, Acked of them acknowledged (PUBACK) to the device, Delivered arrivals at the cloud
	// subscriber (copies included), Unique distinct messages among them, Duplicates = Delivered - Unique,
	// Lost acknowledged messages that never arrived.
	Sent, Acked, Delivered, Unique, Duplicates, Lost int
	// UniqueIDs counts distinct CloudEvent ids (gateway only; equals Unique plus the live messages when every
	// message became exactly one event).
	UniqueIDs int

	// Duration is, for online, from the first publish to the last first arrival; for drain, from the cloud
	// broker's restart to the last first arrival of a backlog message.
	Duration time.Duration
	// Rate is Unique / Duration, messages per second.
	Rate float64
	// PublishDuration is how long the devices took to publish everything (drain: the backlog, all
	// acknowledged, while the cloud was down).
	PublishDuration time.Duration
	// FirstDelivery is, for drain, from the restart to the first backlog arrival (reconnecting takes part).
	FirstDelivery time.Duration
	// TransferRate is, for drain, Unique over the time from the first to the last backlog arrival: the rate
	// once connected, without the reconnect delay.
	TransferRate float64

	// Live traffic (drain): published, acknowledged, distinct arrivals, acknowledged and never arrived.
	LiveSent, LiveAcked, LiveUnique, LiveLost int
	// Latency percentiles, publish to arrival: for online of every message, for drain of the live messages
	// published from the restart until the backlog had drained (LatencySamples of them).
	LatencyP50, LatencyP99, LatencyMax time.Duration
	LatencySamples                     int
	// AfterP99 is the live latency's p99 after the backlog had drained (drain only).
	AfterP99 time.Duration

	// CPU is the processor time the system under test (the gateway, or the edge mosquitto) used during the
	// measured phase; CPUPercent relates it to Duration (100 = one core).
	CPU        time.Duration
	CPUPercent float64
	// CloudCPU and BenchCPU are the processor time the cloud mosquitto and this process (devices and
	// subscriber) used in the same phase: when either nears a whole core, it, not the system under test, may
	// bound the rate.
	CloudCPU, BenchCPU time.Duration
	// RSS is the resident set of the system under test at the end, PeakRSS the largest it had.
	RSS, PeakRSS int64

	// Malformed counts arrivals that did not carry a bench payload.
	Malformed int
}

// String is the result on one line.
func (r Result) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s/%s: %.0f msg/s over %s; sent %d acked %d delivered %d unique %d dup %d lost %d",
		r.Scenario, r.System, r.Rate, r.Duration.Round(time.Millisecond), r.Sent, r.Acked, r.Delivered, r.Unique,
		r.Duplicates, r.Lost)
	if r.Scenario == "drain" {
		fmt.Fprintf(&b, "; backlog published in %s, first delivery after %s, then %.0f msg/s; live sent %d lost %d",
			r.PublishDuration.Round(time.Millisecond), r.FirstDelivery.Round(time.Millisecond), r.TransferRate,
			r.LiveSent, r.LiveLost)
	}
	fmt.Fprintf(&b, "; latency p50 %s p99 %s max %s (n=%d)", r.LatencyP50.Round(time.Millisecond),
		r.LatencyP99.Round(time.Millisecond), r.LatencyMax.Round(time.Millisecond), r.LatencySamples)
	if r.Scenario == "drain" {
		fmt.Fprintf(&b, ", after drain p99 %s", r.AfterP99.Round(time.Millisecond))
	}
	fmt.Fprintf(&b, "; cpu %s (%.0f%%) rss %.1f MiB peak %.1f MiB; cloud cpu %s, bench cpu %s",
		r.CPU.Round(10*time.Millisecond), r.CPUPercent, float64(r.RSS)/(1<<20), float64(r.PeakRSS)/(1<<20),
		r.CloudCPU.Round(10*time.Millisecond), r.BenchCPU.Round(10*time.Millisecond))
	if r.Malformed > 0 {
		fmt.Fprintf(&b, "; %d malformed", r.Malformed)
	}
	return b.String()
}
