//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/passwordfile"
)

// probeDevices are the sensor and the light of the one-room registry the probe uses (devsim gen-devices 2
// --kinds motion-sensor,light --prefix dev).
const (
	probeSensor = "dev-1-motion"
	probeLight  = "dev-1-light"
	probeRoom   = "dev-room-1"
	// probeDirect is the floor: mosquitto alone, the light subscribed to the sensor's events (no rule, no client
	// in between).
	probeDirect = "mosquitto direct (no rule)"
)

// commandSeen is a lights.on the light received: the sensor's ts it echoes and the light's receive time.
type commandSeen struct {
	ts int64
	at time.Time
}

// probeOnce measures room.entered → lights.on one event at a time: the sensor (a paho client in this process)
// publishes at QoS 1 with its send time in the payload (unix ns), and the light (a mosquitto_sub process, which stamps each
// message as it reads it) receives the command that echoes it. The next event goes out once the light has the
// command and the sensor its PUBACK, after gap. The sample's value is the p99 in ms; Extra holds the others.
// System probeDirect measures the floor of this setup: the sensor's event delivered by mosquitto to the light.
func (h *harness) probeOnce(ctx context.Context, system, reg, pwFile, rulesDir string, n int,
	gap time.Duration) (Sample, error) {
	var smp Sample
	passwords, err := passwordfile.Read(pwFile)
	if err != nil {
		return smp, err
	}
	var s *sut
	var procs []*proc
	if system == probeDirect {
		if s, err = h.startMosquitto(ctx, "set_tcp_nodelay true"); err == nil {
			procs = []*proc{s.proc}
		}
	} else {
		s, procs, err = h.startLatencySystem(ctx, system, reg, rulesDir)
	}
	if err != nil {
		return smp, err
	}
	defer func() {
		for _, p := range procs {
			p.Stop(5 * time.Second)
		}
	}()
	u, err := url.Parse(s.url)
	if err != nil {
		return smp, fmt.Errorf("broker url: %w", err)
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil {
		return smp, fmt.Errorf("broker url: %w", err)
	}
	sub, err := exec.LookPath("mosquitto_sub")
	if err != nil {
		return smp, fmt.Errorf("mosquitto_sub is not installed (Debian: apt-get install mosquitto-clients): %w", err)
	}
	got := make(chan commandSeen, 1024)
	lightTopic := "devices/" + probeLight + "/commands/lights.on"
	if system == probeDirect {
		// The floor: the light takes the sensor's event itself (it carries "on":true), one broker hop, no rule.
		lightTopic = "devices/" + probeSensor + "/events/room.entered"
	}
	light, err := h.startOut(ctx, "light", sub, []string{"-h", host, "-p", port, "-i", probeLight, "-u", probeLight,
		"-P", passwords[probeLight], "-q", "1", "--nodelay", "-t", lightTopic,
		"-F", "%U %p"}, nil, func(line string) {
		if c, ok := parseCommandLine(line); ok {
			select {
			case got <- c:
			default:
			}
		}
	})
	if err != nil {
		return smp, err
	}
	defer light.Stop(5 * time.Second)

	opts := paho.NewClientOptions().AddBroker(s.url).SetClientID(probeSensor).SetUsername(probeSensor).
		SetPassword(passwords[probeSensor]).SetCleanSession(true).SetAutoReconnect(false).
		SetConnectTimeout(10 * time.Second).SetWriteTimeout(5 * time.Second)
	sensor := paho.NewClient(opts)
	if tok := sensor.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		return smp, fmt.Errorf("sensor connect: %v", tok.Error())
	}
	defer sensor.Disconnect(100)
	publish := func(ts int64) paho.Token {
		return sensor.Publish("devices/"+probeSensor+"/events/room.entered", 1, false,
			fmt.Sprintf(`{"room":%q,"ts":"%d","on":true}`, probeRoom, ts)) // a string: a JSON number would lose digits as a float64
	}
	// The light subscribes after it connects: send until a command comes through, then let stragglers arrive.
	if err := poll(ctx, light, 20*time.Second, 100*time.Millisecond, "a first command at the light", func() bool {
		publish(time.Now().UnixNano())
		select {
		case <-got:
			return true
		case <-time.After(100 * time.Millisecond):
			return false
		}
	}); err != nil {
		return smp, err
	}
	time.Sleep(200 * time.Millisecond)
	for len(got) > 0 {
		<-got
	}

	before := procsUsage(procs)
	lat := make([]time.Duration, 0, n)
	for i := 0; i < n && ctx.Err() == nil; i++ {
		start := time.Now()
		ts := start.UnixNano()
		tok := publish(ts)
		timeout := time.NewTimer(5 * time.Second)
	wait:
		for {
			select {
			case c := <-got:
				if c.ts == ts {
					lat = append(lat, c.at.Sub(start))
					break wait
				}
			case <-timeout.C:
				break wait
			case <-ctx.Done():
				break wait
			}
		}
		timeout.Stop()
		smp.Sent++
		if missing := smp.Sent - int64(len(lat)); missing > 10 {
			return smp, fmt.Errorf("%d of %d commands did not reach the light within 5s", missing, smp.Sent)
		}
		if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			return smp, fmt.Errorf("event %d: no PUBACK within 5s: %v", i, tok.Error())
		}
		time.Sleep(gap)
	}
	if err := ctx.Err(); err != nil {
		return smp, err
	}
	after := procsUsage(procs)
	smp.RSSKiB, smp.HWMKiB = after.RSSKiB, after.HWMKiB
	smp.CPUSeconds = (after.CPU - before.CPU).Seconds()
	smp.Received = int64(len(lat))
	if len(lat) == 0 {
		return smp, errors.New("no command reached the light")
	}
	slices.Sort(lat)
	q := func(p float64) float64 { return msOf(lat[int(p*float64(len(lat)-1))]) }
	smp.Value = q(0.99)
	smp.Extra = map[string]float64{"p50_ms": q(0.50), "p90_ms": q(0.90), "max_ms": msOf(lat[len(lat)-1])}
	return smp, nil
}

// parseCommandLine reads a line of mosquitto_sub -F '%U %p': the receive time (unix seconds with nanoseconds)
// and a command whose ts is the sensor's send time in unix nanoseconds (a number or a string of digits).
func parseCommandLine(line string) (commandSeen, bool) {
	stamp, payload, ok := strings.Cut(line, " ")
	if !ok {
		return commandSeen{}, false
	}
	sec, nsec, ok := strings.Cut(stamp, ".")
	if !ok {
		return commandSeen{}, false
	}
	s, err1 := strconv.ParseInt(sec, 10, 64)
	ns, err2 := strconv.ParseInt(nsec, 10, 64)
	var cmd struct {
		On bool            `json:"on"`
		TS json.RawMessage `json:"ts"`
	}
	if err1 != nil || err2 != nil || json.Unmarshal([]byte(payload), &cmd) != nil || !cmd.On {
		return commandSeen{}, false
	}
	ts, err := strconv.ParseInt(strings.Trim(string(cmd.TS), `"`), 10, 64)
	if err != nil {
		return commandSeen{}, false
	}
	return commandSeen{ts: ts, at: time.Unix(s, ns)}, true
}
