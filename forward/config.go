package forward

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"
)

// Sink types.
const (
	TypeMQTT = "mqtt"
	TypeNATS = "nats"
	TypeHTTP = "http"
)

// Sink modes: the CloudEvents HTTP binding's content modes; MQTT has structured (the default) and batch.
const (
	// ModeStructured sends one event per request or message, the stored CloudEvent JSON
	// (HTTP Content-Type: application/cloudevents+json).
	ModeStructured = "structured"
	// ModeBinary sends one event per request: attributes as ce-* headers, the event's data as the body (HTTP).
	ModeBinary = "binary"
	// ModeBatch sends up to batch_size consecutive events per request or message as a JSON array, the
	// CloudEvents JSON batch format (HTTP Content-Type: application/cloudevents-batch+json).
	ModeBatch = "batch"
)

// Defaults applied to zero fields (see SinkConfig).
const (
	DefaultBatchSize      = 128
	DefaultWindow         = 1024
	DefaultAckTimeout     = 10 * time.Second
	DefaultBackoffMin     = 500 * time.Millisecond
	DefaultBackoffMax     = 30 * time.Second
	DefaultMQTTTopic      = "edgegate/{gateway}/events/{subject}/{type}"
	DefaultMQTTBatchTopic = "edgegate/{gateway}/batches"
	// DefaultBatchMaxBytes is the default bound of an MQTT batch's payload: AWS IoT Core's limit, 128 KiB.
	DefaultBatchMaxBytes = 128 << 10
	DefaultCommandTopic  = "edgegate/{gateway}/commands/{device}/{command}"
	DefaultNATSSubject   = "edgegate.{gateway}.events.{subject}.{type}"
	DefaultKeepAlive     = 30 * time.Second
	// MaxKeepAlive is the longest MQTT keep-alive: the protocol carries it in seconds in 16 bits.
	MaxKeepAlive         = 65535 * time.Second
	DefaultConnTimeout   = 10 * time.Second
	DefaultMaxRetryAfter = 5 * time.Minute
	// MaxWindow is the largest window a sink may have: MQTT numbers the messages in flight with 16 bits, and
	// every sink keeps buffers of a window's size.
	MaxWindow = 65535
)

// Config configures the forwarding sinks (yaml key "forward"). No sinks is valid: events then stay in the log
// only until retention removes them.
type Config struct {
	// Sinks are the upstreams; each reads the log through its own cursor.
	Sinks []SinkConfig `yaml:"sinks"`
}

// DefaultConfig returns the configuration a minimal YAML file gets: no sinks. Each sink's zero fields take the
// defaults named on SinkConfig and its blocks.
func DefaultConfig() Config { return Config{} }

// SinkConfig configures one upstream. Zero numeric fields take the defaults named on them.
type SinkConfig struct {
	// Name identifies the sink (letters, digits, '.', '_', '-'); it must be unique. The sink's cursor in the
	// log is "sink:<name>": renaming a sink starts it from the oldest stored event.
	Name string `yaml:"name"`
	// Type is mqtt, nats or http; the block of the same name configures it.
	Type string `yaml:"type"`
	// Types, when set, limits the sink to events whose CloudEvent type matches one of the patterns: "*" (any),
	// "prefix.*" (every type starting "prefix.") or an exact type. Other events are passed over (the cursor
	// moves past them).
	Types []string `yaml:"types"`
	// BatchSize is how many records are read from the log at once, and for http in batch mode the most events
	// in one request (default 128).
	BatchSize int `yaml:"batch_size"`
	// Window is the most events sent past the sink's cursor as the log has durably stored it, in flight or
	// acknowledged and not yet stored (default 1024, at most 65535). After a reconnect, or a restart after a crash,
	// at most this many events are sent again.
	Window int `yaml:"window"`
	// RateLimit caps the events sent per second (0, the default: no cap); the sink's priority lanes share it.
	RateLimit float64 `yaml:"rate_limit"`
	// PriorityLanes, when set, sends higher-priority events first: each number (1-9) starts a lane that
	// carries the events of at least that priority and below the next higher lane's, on a connection and
	// through a cursor of its own ("sink:<name>@p<n>"), so they never wait behind a backlog of lower-priority
	// events. The sink itself carries the priorities below its lowest lane. Order is kept within a lane: per
	// device, the events of one lane arrive in order. Every event is still carried once, and the sink's cursor
	// passes an event of a lane only after that lane has carried it, so adding, changing or removing lanes
	// later loses nothing (a change may send some events again). With MQTT, a lane's client id is the sink's
	// with "-p<n>" appended; only the sink itself subscribes to commands. Empty (the default): one connection,
	// every event in log order.
	PriorityLanes []int `yaml:"priority_lanes"`
	// StrictOrder, when true, sends every event in log order, across devices too. By default, when a connection
	// starts with a backlog, the events of devices that have nothing left in it go ahead of it (each device's
	// own events still arrive in order); with strict_order they wait behind the whole backlog, as a consumer
	// that relies on the order across devices needs.
	StrictOrder bool `yaml:"strict_order"`
	// AckTimeout is how long the sink waits for an acknowledgement while events are in flight before it
	// declares the upstream stalled, drops the connection and reconnects (default 10s).
	AckTimeout time.Duration `yaml:"ack_timeout"`
	// BackoffMin and BackoffMax bound the wait between reconnect attempts (defaults 500ms and 30s): exponential
	// with full jitter.
	BackoffMin time.Duration `yaml:"backoff_min"`
	BackoffMax time.Duration `yaml:"backoff_max"`

	MQTT *MQTTConfig `yaml:"mqtt"`
	NATS *NATSConfig `yaml:"nats"`
	HTTP *HTTPConfig `yaml:"http"`
}

// TLSConfig configures TLS towards an upstream. Without any field set the system roots verify the server.
type TLSConfig struct {
	// CAFile is a PEM bundle of the authorities that verify the server (default: the system roots).
	CAFile string `yaml:"ca_file"`
	// CertFile and KeyFile are the client certificate and key (PEM) for mutual TLS; set both or neither. When
	// they change on disk (a renewal), the next connection loads them again; until both load, the previous
	// certificate is used.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ServerName overrides the name checked in the server's certificate (default: the URL's host).
	ServerName string `yaml:"server_name"`
	// InsecureSkipVerify turns server verification off. Only for tests and labs; it is logged as a warning.
	InsecureSkipVerify bool `yaml:"insecure_skip_verify"`
}

// MQTTConfig configures an MQTT 3.1.1 upstream (paho). Events are published with QoS 1 on a persistent session
// (clean session off) whose client id is stable: edgegate-<gateway>-<sink> unless ClientID is set.
//
// Sinks on the same broker (the same host and port, the default port counting for a URL without one) are
// checked together: no two connections may have the same client id (each would take the session over from the
// other, forever), at most one sink may subscribe to a command topic another's could match (each command would
// be delivered twice: with the default command_topic, set disable_commands on all but one), and no sink may
// publish events where another's command subscription matches.
type MQTTConfig struct {
	// URL is the broker: tcp:// (or mqtt://), ssl:// (or tls://, mqtts://), ws:// or wss://, host and optional
	// port (default 1883 for tcp and mqtt, 8883 for ssl, tls and mqtts, 80 for ws and 443 for wss). Only ssl,
	// tls, mqtts and wss use TLS; a tls block with another scheme is refused.
	URL      string `yaml:"url"`
	Username string `yaml:"username"`
	Password Secret `yaml:"password"`
	// ClientID overrides the derived client id, edgegate-<gateway>-<sink> (a priority lane's has "-p<n>"
	// appended). Two sinks on one broker may not end up with the same id: a sink "cloud" with priority_lanes
	// [5] and a sink "cloud-p5" are refused, as are two sinks setting the same client_id. Gateways sharing a
	// broker need distinct ids too, which a single configuration cannot check: gateway "a" with sink "b-c" and
	// gateway "a-b" with sink "c" both derive edgegate-a-b-c; set client_id on one of them.
	ClientID string `yaml:"client_id"`
	// Topic is the topic template for events (default edgegate/{gateway}/events/{subject}/{type}); it may use
	// {gateway}, {sink}, {subject} and {type}. Characters MQTT forbids in a topic level (+ # / NUL) are
	// replaced by '_' in the values; an empty value becomes "_".
	Topic string `yaml:"topic"`
	// CommandTopic is the template of cloud-to-device commands (default
	// edgegate/{gateway}/commands/{device}/{command}); {device} and {command} must each fill a whole level. The
	// sink subscribes with + in their place.
	CommandTopic string `yaml:"command_topic"`
	// DisableCommands turns the command subscription off. Of two sinks on one broker whose command topics
	// could match the same topic (two sinks with the default command_topic do), all but one must set it.
	DisableCommands bool `yaml:"disable_commands"`
	// Mode is structured (the default: one CloudEvent per message, on Topic) or batch: each message carries a
	// JSON array of up to the sink's batch_size consecutive events (the CloudEvents JSON batch format) on
	// BatchTopic, within BatchMaxBytes, and one PUBACK acknowledges them all. A batch holds what is ready to send:
	// a single live event goes at once, as an array of one, while a backlog drains in full batches, with far
	// fewer messages for the brokers to route (and for a cloud broker that bills per message to count).
	Mode string `yaml:"mode"`
	// BatchTopic is the topic of batches (default edgegate/{gateway}/batches); it may use {gateway} and {sink}.
	BatchTopic string `yaml:"batch_topic"`
	// BatchMaxBytes bounds a batch's payload (default 131072, the limit of AWS IoT Core); an event larger than
	// that goes alone.
	BatchMaxBytes int `yaml:"batch_max_bytes"`
	// KeepAlive is the MQTT keep-alive (default 30s; from 1s to 65535s, counted in whole seconds);
	// ConnectTimeout bounds a connection attempt (default 10s).
	KeepAlive      time.Duration `yaml:"keep_alive"`
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
	// TLS configures TLS for ssl://, tls://, mqtts:// and wss:// URLs; it may not be set with another scheme.
	TLS TLSConfig `yaml:"tls"`
}

// NATSConfig configures a NATS JetStream upstream. A stream must capture the subjects; each message carries the
// CloudEvent id as Nats-Msg-Id, so the stream's duplicate window removes the copies a reconnect sends again.
type NATSConfig struct {
	// URL is the server (nats:// or tls://, host and port); several may be given separated by commas.
	URL      string `yaml:"url"`
	Username string `yaml:"username"`
	Password Secret `yaml:"password"`
	Token    Secret `yaml:"token"`
	// CredsFile is a NATS credentials file (JWT and NKey seed).
	CredsFile string `yaml:"creds_file"`
	// Subject is the subject template (default edgegate.{gateway}.events.{subject}.{type}); it may use
	// {gateway}, {sink}, {subject} and {type}. Space, tab, '*' and '>' in the values become '_'; dots are kept
	// (types are dotted); an empty value becomes "_".
	Subject string `yaml:"subject"`
	// Stream, when set, is the stream the server must store the messages in (expected-stream header).
	Stream         string        `yaml:"stream"`
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
	// KeepAlive bounds how long a dead connection with nothing to send looks alive (default 30s, at least 1s):
	// the client pings the server every half of it and drops the connection when two pings in a row go
	// unanswered. Sending finds a dead connection sooner (ack_timeout).
	KeepAlive time.Duration `yaml:"keep_alive"`
	// TLS configures TLS. With tls:// and wss:// URLs the connection always uses TLS; with nats:// and ws://
	// a tls block makes the client require it too (it fails to connect to a server that offers none, rather
	// than going on in plaintext).
	TLS TLSConfig `yaml:"tls"`
}

// HTTPConfig configures an HTTP upstream using the CloudEvents HTTP binding. A 2xx response acknowledges the
// request's events. 400, 409, 413, 415, 422 and 431 refuse them for good: they are dead-lettered (reason
// upstream_rejected) and the sink moves on. Every other answer — 5xx, and the 4xx that say the endpoint or the
// credentials are wrong (401, 403, 404, 405, 407, 410, …) or ask to wait (408, 425, 429) — timeouts and network
// errors are retried with backoff (honouring Retry-After): the cursor stays, and health shows the sink unhealthy
// with the answer as its last error.
type HTTPConfig struct {
	// URL is the endpoint (http:// or https://); events are POSTed to it.
	URL string `yaml:"url"`
	// Mode is structured (default), binary or batch.
	Mode string `yaml:"mode"`
	// Headers are added to every request (values are treated as secrets in logs).
	Headers map[string]Secret `yaml:"headers"`
	// BearerToken, when set, is sent as "Authorization: Bearer <token>".
	BearerToken Secret `yaml:"bearer_token"`
	// Username and Password, when set, are sent as HTTP basic authentication.
	Username string `yaml:"username"`
	Password Secret `yaml:"password"`
	// MaxRetryAfter caps the wait a Retry-After header asks for (default 5m).
	MaxRetryAfter time.Duration `yaml:"max_retry_after"`
	// TLS configures TLS for an https:// URL; it may not be set with http://.
	TLS TLSConfig `yaml:"tls"`
}

// Secret is a configuration value that must not be shown: it formats and logs as "REDACTED" (empty stays empty).
type Secret string

// String returns "REDACTED" for a set secret and "" for an empty one.
func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return "REDACTED"
}

// GoString is String, so %#v does not show the value either.
func (s Secret) GoString() string { return s.String() }

// LogValue shows the secret to slog as String does.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.String()) }

// MarshalText writes "REDACTED" (for a set secret) wherever a configuration is encoded for display.
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText takes the value as is.
func (s *Secret) UnmarshalText(b []byte) error { *s = Secret(b); return nil }

// CursorName is the name of the log cursor a sink reads with.
func CursorName(sink string) string { return "sink:" + sink }

// CursorNames returns the log cursors the sinks of c use, their priority lanes' included, in configuration order:
// Forwarder.CursorNames returns these.
func (c Config) CursorNames() []string {
	var names []string
	for _, s := range c.Sinks {
		names = append(names, CursorName(s.Name))
		for _, lo := range s.lanes() {
			names = append(names, CursorName(LaneName(s.Name, lo)))
		}
	}
	return names
}

// LaneName is the name of a sink's priority lane starting at priority lo: "<sink>@p<lo>". It names the
// lane in health, metrics and its log cursor.
func LaneName(sink string, lo uint8) string { return fmt.Sprintf("%s@p%d", sink, lo) }

// lane returns the configuration of the sink's lane starting at priority lo: the sink's, with its own MQTT
// client id (the sink's with "-p<lo>" appended).
func (c SinkConfig) lane(gatewayID string, lo uint8) SinkConfig {
	if c.MQTT != nil {
		m := *c.MQTT
		if m.ClientID == "" {
			m.ClientID = mqttClientID(gatewayID, c.Name)
		}
		m.ClientID = laneClientID(m.ClientID, lo)
		c.MQTT = &m
	}
	c.PriorityLanes = nil
	return c
}

// laneClientID is the MQTT client id of a sink's lane starting at priority lo: the sink's with "-p<lo>" appended.
func laneClientID(sinkID string, lo uint8) string { return fmt.Sprintf("%s-p%d", sinkID, lo) }

// maxPriority is the highest event priority (priorities go from 0, the lowest, to 9).
const maxPriority = 9

// lanes returns the lower bounds of the sink's priority lanes, highest first.
func (c SinkConfig) lanes() []uint8 {
	out := make([]uint8, 0, len(c.PriorityLanes))
	for _, p := range c.PriorityLanes {
		out = append(out, uint8(p))
	}
	slices.Sort(out)
	slices.Reverse(out)
	return slices.Compact(out)
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// withDefaults fills the zero fields of a sink's configuration.
func (c SinkConfig) withDefaults() SinkConfig {
	if c.BatchSize == 0 {
		c.BatchSize = DefaultBatchSize
	}
	if c.Window == 0 {
		c.Window = DefaultWindow
	}
	if c.AckTimeout == 0 {
		c.AckTimeout = DefaultAckTimeout
	}
	if c.BackoffMin == 0 {
		c.BackoffMin = DefaultBackoffMin
	}
	if c.BackoffMax == 0 {
		c.BackoffMax = max(DefaultBackoffMax, c.BackoffMin)
	}
	switch {
	case c.MQTT != nil:
		m := *c.MQTT
		if m.Topic == "" {
			m.Topic = DefaultMQTTTopic
		}
		if m.CommandTopic == "" {
			m.CommandTopic = DefaultCommandTopic
		}
		if m.KeepAlive == 0 {
			m.KeepAlive = DefaultKeepAlive
		}
		if m.ConnectTimeout == 0 {
			m.ConnectTimeout = DefaultConnTimeout
		}
		if m.Mode == "" {
			m.Mode = ModeStructured
		}
		if m.Mode == ModeBatch {
			if m.BatchTopic == "" {
				m.BatchTopic = DefaultMQTTBatchTopic
			}
			if m.BatchMaxBytes == 0 {
				m.BatchMaxBytes = DefaultBatchMaxBytes
			}
		}
		c.MQTT = &m
	case c.NATS != nil:
		n := *c.NATS
		if n.Subject == "" {
			n.Subject = DefaultNATSSubject
		}
		if n.KeepAlive == 0 {
			n.KeepAlive = DefaultKeepAlive
		}
		if n.ConnectTimeout == 0 {
			n.ConnectTimeout = DefaultConnTimeout
		}
		c.NATS = &n
	case c.HTTP != nil:
		h := *c.HTTP
		if h.Mode == "" {
			h.Mode = ModeStructured
		}
		if h.MaxRetryAfter == 0 {
			h.MaxRetryAfter = DefaultMaxRetryAfter
		}
		c.HTTP = &h
	}
	return c
}

// Validate reports every problem of the configuration, each naming its key (forward.sinks[i].…). Zero fields
// are valid: they take the defaults. MQTT sinks on one broker are checked against each other (see MQTTConfig);
// without the gateway's id, a client_id equal to another sink's derived id is not caught: ValidateFor catches it.
func (c Config) Validate() error { return c.ValidateFor(gatewayUnknown) }

// ValidateFor is Validate for the gateway named gatewayID, whose id the derived client ids hold.
func (c Config) ValidateFor(gatewayID string) error {
	var errs []error
	seen := map[string]int{}
	for i, s := range c.Sinks {
		key := fmt.Sprintf("forward.sinks[%d]", i)
		if j, dup := seen[s.Name]; dup && s.Name != "" {
			errs = append(errs, fmt.Errorf("%s.name: %q is also the name of forward.sinks[%d]", key, s.Name, j))
		} else {
			seen[s.Name] = i
		}
		errs = append(errs, s.validate(key))
	}
	errs = append(errs, c.validateBrokers(gatewayID)...)
	return errors.Join(errs...)
}

func (c SinkConfig) validate(key string) error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if !nameRE.MatchString(c.Name) {
		add("%s.name: %q must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", key, c.Name)
	}
	blocks := map[string]bool{TypeMQTT: c.MQTT != nil, TypeNATS: c.NATS != nil, TypeHTTP: c.HTTP != nil}
	switch c.Type {
	case TypeMQTT, TypeNATS, TypeHTTP:
		if !blocks[c.Type] {
			add("%s.%s: missing (type is %s)", key, c.Type, c.Type)
		}
	default:
		add("%s.type: %q is not mqtt, nats or http", key, c.Type)
	}
	for _, b := range []string{TypeMQTT, TypeNATS, TypeHTTP} {
		if blocks[b] && b != c.Type {
			add("%s.%s: set, but type is %q", key, b, c.Type)
		}
	}
	for i, p := range c.Types {
		if err := validPattern(p); err != nil {
			add("%s.types[%d]: %w", key, i, err)
		}
	}
	if c.BatchSize < 0 {
		add("%s.batch_size: must be >= 0, got %d", key, c.BatchSize)
	}
	if c.Window < 0 || c.Window > MaxWindow {
		add("%s.window: must be from 0 to %d, got %d", key, MaxWindow, c.Window)
	}
	if c.RateLimit < 0 {
		add("%s.rate_limit: must be >= 0, got %g", key, c.RateLimit)
	}
	for i, p := range c.PriorityLanes {
		switch {
		case p < 1 || p > maxPriority:
			add("%s.priority_lanes[%d]: %d is not a priority from 1 to %d", key, i, p, maxPriority)
		case slices.Contains(c.PriorityLanes[:i], p):
			add("%s.priority_lanes[%d]: %d is listed twice", key, i, p)
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"ack_timeout", c.AckTimeout}, {"backoff_min", c.BackoffMin}, {"backoff_max", c.BackoffMax}} {
		if d.v < 0 {
			add("%s.%s: must be >= 0, got %s", key, d.name, d.v)
		}
	}
	if d := c.withDefaults(); d.BackoffMin > d.BackoffMax {
		add("%s.backoff_min: %s is more than backoff_max %s", key, d.BackoffMin, d.BackoffMax)
	}
	if c.Type == TypeMQTT && c.MQTT != nil {
		errs = append(errs, c.MQTT.validate(key+".mqtt"))
	}
	if c.Type == TypeNATS && c.NATS != nil {
		errs = append(errs, c.NATS.validate(key+".nats"))
	}
	if c.Type == TypeHTTP && c.HTTP != nil {
		errs = append(errs, c.HTTP.validate(key+".http"))
	}
	return errors.Join(errs...)
}

func (m MQTTConfig) validate(key string) error {
	var errs []error
	if err := validURL(m.URL, "tcp", "ssl", "tls", "mqtt", "mqtts", "ws", "wss"); err != nil {
		errs = append(errs, fmt.Errorf("%s.url: %w", key, err))
	} else {
		errs = append(errs, m.TLS.validateScheme(key, m.URL, "ssl", "tls", "mqtts", "wss"))
	}
	if m.Topic != "" {
		if _, err := parseTemplate(m.Topic, eventFields, mqttTopicCheck); err != nil {
			errs = append(errs, fmt.Errorf("%s.topic: %w", key, err))
		}
	}
	if m.CommandTopic != "" {
		if _, err := parseCommandTopic(m.CommandTopic); err != nil {
			errs = append(errs, fmt.Errorf("%s.command_topic: %w", key, err))
		}
	}
	errs = append(errs, m.validateNoEcho(key))
	switch m.Mode {
	case "", ModeStructured:
		if m.BatchTopic != "" {
			errs = append(errs, fmt.Errorf("%s.batch_topic: set without mode: batch", key))
		}
		if m.BatchMaxBytes != 0 {
			errs = append(errs, fmt.Errorf("%s.batch_max_bytes: set without mode: batch", key))
		}
	case ModeBatch:
		if m.BatchTopic != "" {
			if _, err := parseTemplate(m.BatchTopic, batchFields, mqttTopicCheck); err != nil {
				errs = append(errs, fmt.Errorf("%s.batch_topic: %w", key, err))
			}
		}
		if m.BatchMaxBytes < 0 {
			errs = append(errs, fmt.Errorf("%s.batch_max_bytes: must be >= 0, got %d", key, m.BatchMaxBytes))
		}
	default:
		errs = append(errs, fmt.Errorf("%s.mode: %q is not structured or batch", key, m.Mode))
	}
	if m.KeepAlive != 0 && (m.KeepAlive < time.Second || m.KeepAlive > MaxKeepAlive) {
		// MQTT carries the keep-alive in whole seconds in 16 bits: paho would send less than a second as 0
		// (keep-alive off) and cut a longer one than MaxKeepAlive to its low 16 bits.
		errs = append(errs, fmt.Errorf("%s.keep_alive: must be from 1s to 65535s (%s), or 0 for the default %s; got %s",
			key, MaxKeepAlive, DefaultKeepAlive, m.KeepAlive))
	}
	if m.ConnectTimeout < 0 {
		errs = append(errs, fmt.Errorf("%s.connect_timeout: must be >= 0, got %s", key, m.ConnectTimeout))
	}
	errs = append(errs, m.TLS.validate(key+".tls"))
	return errors.Join(errs...)
}

// validateNoEcho rejects a topic events are published on that the command subscription could match: every
// event sent would come back from the upstream broker as a command to its device. The gateway's id and the
// values of the events are not known here, so each field counts as any value that fits in one level.
func (m MQTTConfig) validateNoEcho(key string) error {
	if m.DisableCommands {
		return nil
	}
	cmdTopic := cmp.Or(m.CommandTopic, DefaultCommandTopic)
	ct, err := parseCommandTopic(cmdTopic)
	if err != nil {
		return nil // command_topic's own error
	}
	name, topic, fields := "topic", cmp.Or(m.Topic, DefaultMQTTTopic), eventFields
	if m.Mode == ModeBatch {
		name, topic, fields = "batch_topic", cmp.Or(m.BatchTopic, DefaultMQTTBatchTopic), batchFields
	}
	t, err := parseTemplate(topic, fields, mqttTopicCheck)
	if err != nil || !ct.couldMatch(t) {
		return nil // a topic's own error, or no echo
	}
	return fmt.Errorf("%s.%s: %q can match the subscription of %s.command_topic %q (%s): every event sent "+
		"would come back as a command to its device; make them differ or set disable_commands",
		key, name, topic, key, cmdTopic, ct.wildcards())
}

func (n NATSConfig) validate(key string) error {
	var errs []error
	if n.URL == "" {
		errs = append(errs, fmt.Errorf("%s.url: missing", key))
	}
	for u := range strings.SplitSeq(n.URL, ",") {
		if n.URL == "" {
			break
		}
		if err := validURL(strings.TrimSpace(u), "nats", "tls", "ws", "wss"); err != nil {
			errs = append(errs, fmt.Errorf("%s.url: %w", key, err))
		}
	}
	if n.Subject != "" {
		if _, err := parseTemplate(n.Subject, eventFields, natsSubjectCheck); err != nil {
			errs = append(errs, fmt.Errorf("%s.subject: %w", key, err))
		}
	}
	if n.Token != "" && (n.Username != "" || n.CredsFile != "") {
		errs = append(errs, fmt.Errorf("%s.token: set together with username or creds_file; use one", key))
	}
	if n.ConnectTimeout < 0 {
		errs = append(errs, fmt.Errorf("%s.connect_timeout: must be >= 0, got %s", key, n.ConnectTimeout))
	}
	if n.KeepAlive != 0 && n.KeepAlive < time.Second {
		errs = append(errs, fmt.Errorf("%s.keep_alive: must be at least 1s, or 0 for the default %s; got %s",
			key, DefaultKeepAlive, n.KeepAlive))
	}
	errs = append(errs, n.TLS.validate(key+".tls"))
	return errors.Join(errs...)
}

func (h HTTPConfig) validate(key string) error {
	var errs []error
	if err := validURL(h.URL, "http", "https"); err != nil {
		errs = append(errs, fmt.Errorf("%s.url: %w", key, err))
	} else {
		errs = append(errs, h.TLS.validateScheme(key, h.URL, "https"))
	}
	switch h.Mode {
	case "", ModeStructured, ModeBinary, ModeBatch:
	default:
		errs = append(errs, fmt.Errorf("%s.mode: %q is not structured, binary or batch", key, h.Mode))
	}
	if h.BearerToken != "" && (h.Username != "" || h.Password != "") {
		errs = append(errs, fmt.Errorf("%s.bearer_token: set together with username/password; use one", key))
	}
	if h.MaxRetryAfter < 0 {
		errs = append(errs, fmt.Errorf("%s.max_retry_after: must be >= 0, got %s", key, h.MaxRetryAfter))
	}
	for name := range h.Headers {
		if name == "" || strings.ContainsAny(name, " \t\r\n:") {
			errs = append(errs, fmt.Errorf("%s.headers: %q is not a valid header name", key, name))
		}
	}
	errs = append(errs, h.TLS.validate(key+".tls"))
	return errors.Join(errs...)
}

func (t TLSConfig) validate(key string) error {
	if (t.CertFile == "") != (t.KeyFile == "") {
		return fmt.Errorf("%s: cert_file and key_file go together (mutual TLS); got only one", key)
	}
	return nil
}

// validateScheme refuses a tls block on a valid URL whose scheme the client connects to without TLS: the block
// would be ignored and the connection, credentials included, would go in plaintext. key is the block's parent.
func (t TLSConfig) validateScheme(key, raw string, tlsSchemes ...string) error {
	if t == (TLSConfig{}) {
		return nil
	}
	u, err := url.Parse(raw)
	if err != nil || slices.Contains(tlsSchemes, u.Scheme) {
		return nil // the URL's own error, or TLS
	}
	return fmt.Errorf("%s.tls: set, but %s.url %q connects without TLS (scheme %q), so the tls block would be "+
		"ignored and everything, credentials included, sent in plaintext; use %s:// or remove the tls block",
		key, key, redactURL(raw), u.Scheme, strings.Join(tlsSchemes, ":// or "))
}

func validURL(raw string, schemes ...string) error {
	if raw == "" {
		return errors.New("missing")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("%q: %w", raw, err)
	}
	ok := false
	for _, s := range schemes {
		ok = ok || u.Scheme == s
	}
	if !ok {
		return fmt.Errorf("%q: scheme %q is not one of %s", raw, u.Scheme, strings.Join(schemes, ", "))
	}
	if u.Host == "" {
		return fmt.Errorf("%q: no host", raw)
	}
	return nil
}
