package forward

import (
	"context"
	"errors"
	"fmt"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// ErrDeviceOffline is what a CommandSink wraps when a command names a device it knows that is not connected. The
// MQTT sink then holds the command, unacknowledged, until the device connects (see the package documentation).
var ErrDeviceOffline = errors.New("forward: device not connected")

const (
	// commandHold is how long an MQTT sink holds a cloud-to-device command for a registered device that is not
	// connected (after a restart of the gateway, the devices come back one by one) before it dead-letters it.
	commandHold = 30 * time.Second
	// maxHeldCommands bounds the commands one connection holds. A held command is not acknowledged to the
	// broker, so it takes one of the broker's in-flight slots of the session (mosquitto's max_inflight_messages
	// is 20 by default): the bound leaves room for commands to connected devices. When it is reached, a further
	// command for a device that is not connected is dead-lettered at once (reason command_failed).
	maxHeldCommands = 16
	// holdRetry is how often the held commands are tried again.
	holdRetry = 250 * time.Millisecond
)

// heldCommand is a command waiting for its device.
type heldCommand struct {
	m               paho.Message
	device, command string
	until           time.Time // the end of its hold
	err             error     // why the last attempt did not deliver it
}

// heldCommands are the commands of one connection whose devices could not take them yet, in order per device.
// Only the connection's delivering goroutine uses it.
type heldCommands struct {
	byDevice map[string][]*heldCommand
	n        int
}

// onMessage runs on paho's router goroutine: it only queues the command.
func (c *mqttConn) onMessage(_ paho.Client, m paho.Message) {
	select {
	case c.cmdq <- m:
	case <-c.ctx.Done(): // not acknowledged: the broker sends it again on the next connection
	}
}

// deliverCommands delivers the queued commands one at a time and tries the held ones again every holdRetry.
// When the connection ends, the held commands are left unacknowledged: the broker sends them again on the next
// connection, whose hold starts anew.
func (c *mqttConn) deliverCommands() {
	defer c.wg.Done()
	h := &heldCommands{byDevice: map[string][]*heldCommand{}}
	var tick *time.Ticker
	var retry <-chan time.Time
	defer func() {
		if tick != nil {
			tick.Stop()
		}
	}()
	for {
		switch {
		case h.n > 0 && tick == nil:
			tick = time.NewTicker(holdRetry)
			retry = tick.C
		case h.n == 0 && tick != nil:
			tick.Stop()
			tick, retry = nil, nil
		}
		select {
		case <-c.ctx.Done():
			return
		case m := <-c.cmdq:
			c.deliver(h, m)
		case <-retry:
			for device := range h.byDevice {
				if !c.flush(h, device) {
					return
				}
			}
		}
	}
}

// deliver hands one command to the CommandSink and acknowledges it to the broker once it is delivered or
// dead-lettered; a command for a device that is not connected is held (deliverCommands); a command cut short by
// the connection's end is not acknowledged, so the broker resends it.
func (c *mqttConn) deliver(h *heldCommands, m paho.Message) {
	topic, payload := m.Topic(), m.Payload()
	if c.t.cmd == nil {
		// The session holds a command subscription of an earlier run: the command stays at the broker (it is
		// sent again on the next connection, and delivered once commands are enabled again).
		if !c.offLogged {
			c.offLogged = true
			c.t.log.Info("commands are disabled; a command queued for this sink's session is left at the broker",
				"topic", topic)
		}
		return
	}
	device, command, ok := c.t.cmd.match(topic)
	if !ok {
		c.t.log.Warn("message on the command subscription does not fit command_topic; dead-lettered", "topic", topic)
		c.t.dl.DeadLetter(ReasonBadCommandTopic, fmt.Sprintf("sink %s: topic does not fit the command topic", c.t.sinkName), "", topic, payload)
		m.Ack()
		return
	}
	hc := &heldCommand{m: m, device: device, command: command, until: time.Now().Add(c.t.hold)}
	if len(h.byDevice[device]) > 0 { // behind the device's held commands
		c.hold(h, hc)
		c.flush(h, device)
		return
	}
	switch c.attempt(hc, false) {
	case attemptHeld:
		c.hold(h, hc)
	case attemptDone, attemptCut:
	}
}

// The results of one attempt to deliver a command.
const (
	attemptDone = iota // delivered or dead-lettered, and acknowledged
	attemptHeld        // the device cannot take it yet
	attemptCut         // the connection ended: neither delivered nor acknowledged
)

// attempt hands the command to the CommandSink once. A command that was held stays held after any failure
// while its hold lasts: its device has just come, and may not have subscribed to its commands yet.
func (c *mqttConn) attempt(hc *heldCommand, held bool) int {
	topic, payload := hc.m.Topic(), hc.m.Payload()
	ctx, cancel := context.WithTimeout(c.ctx, c.t.ackTimeout)
	err := c.t.cmds.DeliverCommand(ctx, hc.device, hc.command, payload)
	cancel()
	switch {
	case err == nil:
	case errors.Is(err, ErrUnknownDevice):
		c.t.log.Warn("command for an unknown device; dead-lettered", "device_id", hc.device, "command", hc.command, "topic", topic)
		c.t.dl.DeadLetter(ReasonUnknownDevice, err.Error(), hc.device, topic, payload)
	case c.ctx.Err() != nil:
		return attemptCut
	case errors.Is(err, ErrDeviceOffline) || held && time.Now().Before(hc.until):
		if held && !errors.Is(err, ErrDeviceOffline) {
			c.t.log.Debug("held command not delivered; tried again", "device_id", hc.device, "command", hc.command,
				"topic", topic, "error", err)
		}
		hc.err = err
		return attemptHeld
	default:
		c.t.log.Warn("command could not be delivered; dead-lettered", "device_id", hc.device, "command", hc.command,
			"topic", topic, "error", err)
		c.t.dl.DeadLetter(ReasonCommandFailed, err.Error(), hc.device, topic, payload)
	}
	hc.m.Ack()
	if err == nil {
		c.t.log.Debug("command delivered", "device_id", hc.device, "command", hc.command, "topic", topic, "held", held)
	}
	return attemptDone
}

// hold keeps a command until its device can take it; when maxHeldCommands are held already, it dead-letters the
// command instead.
func (c *mqttConn) hold(h *heldCommands, hc *heldCommand) {
	topic := hc.m.Topic()
	if h.n >= maxHeldCommands {
		c.t.log.Warn("command for a device that is not connected, with the hold full; dead-lettered",
			"device_id", hc.device, "command", hc.command, "topic", topic, "held", h.n)
		detail := fmt.Sprintf("sink %s: device %s is not connected and %d commands wait already", c.t.sinkName, hc.device, h.n)
		if hc.err != nil {
			detail += ": " + hc.err.Error()
		}
		c.t.dl.DeadLetter(ReasonCommandFailed, detail, hc.device, topic, hc.m.Payload())
		hc.m.Ack()
		return
	}
	h.byDevice[hc.device] = append(h.byDevice[hc.device], hc)
	h.n++
	c.t.log.Debug("command held until its device connects", "device_id", hc.device, "command", hc.command,
		"topic", topic, "until", hc.until)
}

// flush delivers the device's held commands in order while it takes them, and dead-letters those whose hold has
// ended. It returns false when the connection ended.
func (c *mqttConn) flush(h *heldCommands, device string) bool {
	q := h.byDevice[device]
	defer func() {
		if len(q) == 0 {
			delete(h.byDevice, device)
		} else {
			h.byDevice[device] = q
		}
	}()
	for len(q) > 0 {
		hc := q[0]
		if time.Now().Before(hc.until) {
			switch c.attempt(hc, true) {
			case attemptHeld:
				return true
			case attemptCut:
				return false
			}
		} else {
			c.expire(hc)
		}
		q[0] = nil
		q = q[1:]
		h.n--
	}
	return true
}

// expire dead-letters a command whose hold ended.
func (c *mqttConn) expire(hc *heldCommand) {
	topic := hc.m.Topic()
	c.t.log.Warn("command not taken by its device within the hold; dead-lettered", "device_id", hc.device,
		"command", hc.command, "topic", topic, "hold", c.t.hold, "error", hc.err)
	detail := fmt.Sprintf("sink %s: device %s did not take the command within %s", c.t.sinkName, hc.device, c.t.hold)
	if hc.err != nil {
		detail += ": " + hc.err.Error()
	}
	c.t.dl.DeadLetter(ReasonCommandFailed, detail, hc.device, topic, hc.m.Payload())
	hc.m.Ack()
}
