package forward

import (
	"cmp"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strings"
)

// gatewayUnknown stands for the gateway's id where Config.Validate derives client ids without knowing it. MQTT
// strings never hold NUL, so no client_id a configuration sets equals a derived id; New checks again with the
// gateway's real id, which catches those too.
const gatewayUnknown = "\x00gateway\x00"

// mqttDefaultPort is the port an MQTT URL without one connects to: MQTT's (1883) and MQTT over TLS's (8883)
// registered ports, and HTTP's and HTTPS's for WebSocket.
func mqttDefaultPort(scheme string) string {
	switch scheme {
	case "ssl", "tls", "mqtts":
		return "8883"
	case "ws":
		return "80"
	case "wss":
		return "443"
	}
	return "1883"
}

// mqttHostPort is the host and port an MQTT URL connects to: the URL's, with the scheme's default port when it
// names none. The dialer and the checks of sinks sharing a broker both use it.
func mqttHostPort(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	return net.JoinHostPort(u.Hostname(), mqttDefaultPort(u.Scheme))
}

// mqttBroker names the broker an MQTT URL reaches, to tell whether two sinks share one: its host (case folded)
// and port, and for WebSocket the path. Two names of one host (localhost and 127.0.0.1) count as two brokers.
func mqttBroker(raw string) (string, bool) {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "", false
	}
	b := strings.ToLower(mqttHostPort(u))
	if u.Scheme == "ws" || u.Scheme == "wss" {
		b += cmp.Or(u.Path, "/")
	}
	return b, true
}

// brokerSink is an MQTT sink as the checks across sinks see it.
type brokerSink struct {
	idx  int
	name string
	m    MQTTConfig
}

func (b brokerSink) key() string { return fmt.Sprintf("forward.sinks[%d]", b.idx) }

// validateBrokers checks the MQTT sinks that share a broker against each other: their client ids (lanes
// included) must differ, their command subscriptions may not match the same topic, and none may publish events
// where another's command subscription matches. gatewayID is the gateway's id, or gatewayUnknown. Sinks with
// errors of their own in the fields compared are left to those errors.
func (c Config) validateBrokers(gatewayID string) []error {
	var order []string
	groups := map[string][]brokerSink{}
	for i, s := range c.Sinks {
		if s.Type != TypeMQTT || s.MQTT == nil || !nameRE.MatchString(s.Name) {
			continue
		}
		if validURL(s.MQTT.URL, "tcp", "ssl", "tls", "mqtt", "mqtts", "ws", "wss") != nil {
			continue
		}
		b, ok := mqttBroker(s.MQTT.URL)
		if !ok {
			continue
		}
		if _, seen := groups[b]; !seen {
			order = append(order, b)
		}
		groups[b] = append(groups[b], brokerSink{idx: i, name: s.Name, m: *s.MQTT})
	}
	var errs []error
	for _, b := range order {
		g := groups[b]
		errs = append(errs, clientIDCollisions(c.Sinks, g, b, gatewayID)...)
		errs = append(errs, commandOverlaps(g, b)...)
		errs = append(errs, crossSinkEchoes(g, b)...)
	}
	return errs
}

// clientIDCollisions refuses two connections to one broker with the same client id: the broker would close
// the older whenever the newer connects, and each reconnects at once, forever.
func clientIDCollisions(sinks []SinkConfig, g []brokerSink, broker, gatewayID string) []error {
	type owner struct {
		sink brokerSink
		lane string // "" for the sink's own connection
	}
	var errs []error
	ids := map[string]owner{}
	for _, bs := range g {
		s := sinks[bs.idx]
		conns := []owner{{sink: bs}}
		base := cmp.Or(bs.m.ClientID, mqttClientID(gatewayID, bs.name))
		names := []string{base}
		for _, lo := range s.lanes() {
			conns = append(conns, owner{sink: bs, lane: LaneName(bs.name, lo)})
			names = append(names, laneClientID(base, lo))
		}
		for i, id := range names {
			o := conns[i]
			prev, dup := ids[id]
			if !dup {
				ids[id] = o
				continue
			}
			key := o.sink.key() + ".name"
			if o.sink.m.ClientID != "" {
				key = o.sink.key() + ".mqtt.client_id"
			}
			errs = append(errs, fmt.Errorf("%s: the connection of %s has the client id %q, as has that of %s "+
				"(%s), on the same broker %s: each would take the session over from the other, forever; "+
				"set a different mqtt.client_id or name on one of them", key, describeConn(o.sink, o.lane),
				shownClientID(id, gatewayID), describeConn(prev.sink, prev.lane), prev.sink.key(), broker))
		}
	}
	return errs
}

// describeConn names a sink's connection, or that of one of its lanes, in an error.
func describeConn(s brokerSink, lane string) string {
	if lane != "" {
		return fmt.Sprintf("sink %q's priority lane %s", s.name, lane)
	}
	return fmt.Sprintf("sink %q", s.name)
}

// shownClientID shows a client id derived without the gateway's id as the template it is.
func shownClientID(id, gatewayID string) string {
	if gatewayID == gatewayUnknown {
		return strings.ReplaceAll(id, gatewayUnknown, "<gateway>")
	}
	return id
}

// commandOverlaps refuses two sinks on one broker whose command subscriptions could match the same topic: the
// broker would send each command to both, and both would deliver it.
func commandOverlaps(g []brokerSink, broker string) []error {
	var errs []error
	for j, b := range g {
		cb := boundCommandTopic(b)
		if cb == nil {
			continue
		}
		for _, a := range g[:j] {
			ca := boundCommandTopic(a)
			if ca == nil || !ca.couldOverlap(cb) {
				continue
			}
			errs = append(errs, fmt.Errorf("%s.mqtt.command_topic: %q (%s) can match the same commands as %s.mqtt.command_topic "+
				"%q (%s) on the same broker %s: every such command would be delivered twice, once by sink %q and "+
				"once by sink %q; set disable_commands on all but one of the sinks of that broker, or give them "+
				"command_topic templates that cannot match the same topic (with {sink}, say)",
				b.key(), commandTemplate(b), cb.wildcards(), a.key(), commandTemplate(a), ca.wildcards(), broker, a.name, b.name))
			break // one error per sink
		}
	}
	return errs
}

// crossSinkEchoes refuses a sink whose events (or batches) could be published on a topic the command
// subscription of another sink on the same broker matches: they would come back as commands to their devices.
// (A sink's own topics are checked against its own subscription by MQTTConfig.validate.)
func crossSinkEchoes(g []brokerSink, broker string) []error {
	var errs []error
	for _, a := range g {
		name, topic, fields := "topic", cmp.Or(a.m.Topic, DefaultMQTTTopic), eventFields
		if a.m.Mode == ModeBatch {
			name, topic, fields = "batch_topic", cmp.Or(a.m.BatchTopic, DefaultMQTTBatchTopic), batchFields
		}
		t, err := parseTemplate(topic, fields, mqttTopicCheck)
		if err != nil {
			continue // the topic's own error
		}
		t = t.bind(map[string]string{fieldSink: mqttLevel(a.name)})
		for _, b := range g {
			if b.idx == a.idx {
				continue
			}
			cb := boundCommandTopic(b)
			if cb == nil || !cb.couldMatch(t) {
				continue
			}
			errs = append(errs, fmt.Errorf("%s.mqtt.%s: %q can match the subscription of %s.mqtt.command_topic %q (%s) "+
				"on the same broker %s: every event sink %q sends would come back through sink %q as a command to "+
				"its device; make them differ or set disable_commands on %s",
				a.key(), name, topic, b.key(), commandTemplate(b), cb.wildcards(), broker, a.name, b.name, b.key()))
			break // one error per sink
		}
	}
	return errs
}

// boundCommandTopic is the command topic a sink subscribes to, with {sink} filled in, or nil when the sink takes
// no commands (or its command_topic has an error of its own).
func boundCommandTopic(s brokerSink) *commandTopic {
	if s.m.DisableCommands {
		return nil
	}
	ct, err := parseCommandTopic(commandTemplate(s))
	if err != nil {
		return nil
	}
	return ct.bindSink(mqttLevel(s.name))
}

func commandTemplate(s brokerSink) string { return cmp.Or(s.m.CommandTopic, DefaultCommandTopic) }

// bindSink returns the command topic with {sink} filled in (the other fields kept), for comparing the
// subscriptions of sinks with different names.
func (ct *commandTopic) bindSink(sink string) *commandTopic {
	out := *ct
	out.levels = make([]*template, len(ct.levels))
	for i, lvl := range ct.levels {
		out.levels[i] = lvl.bind(map[string]string{fieldSink: sink})
	}
	return &out
}

// couldOverlap reports whether one topic could match both command subscriptions. As in couldMatch, a field
// other than {device} and {command} stands for any non-empty text without '/'.
func (ct *commandTopic) couldOverlap(o *commandTopic) bool {
	if len(ct.levels) != len(o.levels) {
		return false
	}
	for i := range ct.levels {
		if slices.Contains([]int{ct.device, ct.command, o.device, o.command}, i) {
			continue // + matches any level
		}
		if !levelsOverlap(ct.levels[i].parts, o.levels[i].parts) {
			return false
		}
	}
	return true
}
