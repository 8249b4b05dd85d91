// Command devsim simulates devices against an MQTT broker (edgegate or any other): motion sensors publish
// room.entered, lights follow their commands and report their state, thermometers publish telemetry. It prints a
// summary at the end: messages sent and acknowledged, commands received, and the latency of room.entered →
// lights.on as the lights see it.
//
// Usage:
//
//	devsim [flags]                                   simulate devices (devsim --help for the flags)
//	devsim gen-devices N --out FILE [flags]          write a registry of N devices and a password file
//
// Examples:
//
//	devsim --registry configs/devices.yaml --duration 30s          # the demo devices, passwords "<id>-pw"
//	devsim gen-devices 100 --out /tmp/reg.yaml                     # also writes /tmp/reg.yaml.passwords
//	devsim --broker tcp://127.0.0.1:1884 --registry /tmp/reg.yaml --password-file /tmp/reg.yaml.passwords
//	devsim --broker tcp://127.0.0.1:1884 --thermometers 10 --rate 0 --count 10000 --qos 1   # anonymous broker
//
// Lights report their state on devices/{id}/state/light (--state-topic). edgegate's built-in topic mappings do not
// cover that topic, so it becomes a dead letter (unknown topic) unless the configuration maps it, e.g.
//
//	ingest:
//	  mappings:
//	    - {name: state, topic: "devices/{device}/state/{metric}", type: "state.{metric}"}
//
// or the lights report as events instead: --state-topic 'devices/{id}/events/state.light'.
//
// Every loop is bounded by --duration (and --count); Ctrl-C stops the run early and still prints the summary.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/edgegate/edgegate/devices"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := runMain(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// runMain runs devsim with args and returns the exit code: 0 done, 1 failed, 2 usage.
func runMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var err error
	if len(args) > 0 && args[0] == "gen-devices" {
		err = cmdGen(args[1:], stdout, stderr)
	} else {
		err = cmdSim(ctx, args, stdout, stderr)
	}
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintf(stderr, "devsim: %v\n", err)
		return 1
	}
}

var errUsage = errors.New("usage")

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return nil
}

func cmdSim(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("devsim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	broker := fs.String("broker", "tcp://127.0.0.1:1883", "MQTT broker URL")
	registry := fs.String("registry", "", "registry file: simulate its motion sensors, lights and thermometers")
	passwords := fs.String("password-file", "", `passwords of the registry's devices ("id password" lines); default "<id>-pw"`)
	sensors := fs.Int("sensors", 0, "generated motion sensors (without --registry)")
	lights := fs.Int("lights", 0, "generated lights (without --registry)")
	thermos := fs.Int("thermometers", 0, "generated thermometers (without --registry)")
	prefix := fs.String("prefix", "sim", "id prefix of generated devices")
	rate := fs.Float64("rate", 1, "messages per second per sensor and thermometer (0: as fast as --inflight allows)")
	qos := fs.Int("qos", 1, "QoS of publishes and of the lights' subscriptions (0 or 1)")
	payload := fs.Int("payload-bytes", 0, "pad every JSON payload to this many bytes")
	duration := fs.Duration("duration", 10*time.Second, "how long devices publish")
	count := fs.Int("count", 0, "messages per sensor and thermometer (0: until --duration)")
	inflight := fs.Int("inflight", 1, "QoS 1 publishes a device may have unacknowledged at once")
	linger := fs.Duration("linger", time.Second, "after publishing, how long lights wait for commands on their way")
	connectTimeout := fs.Duration("connect-timeout", 10*time.Second, "CONNECT timeout of each device")
	workers := fs.Int("connect-workers", 32, "connections opened at once")
	stateTopic := fs.String("state-topic", "devices/{id}/state/light", "topic lights report their state on")
	jsonOut := fs.String("json", "", "also write the summary as JSON to this file (- for stdout)")
	quiet := fs.Bool("quiet", false, "print no progress lines on stderr")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: devsim [flags]\n       devsim gen-devices N --out FILE [flags]\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "devsim: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return errUsage
	}
	var devs []simDevice
	switch {
	case *registry != "":
		if *sensors+*lights+*thermos > 0 {
			return errors.New("--registry and --sensors/--lights/--thermometers exclude each other")
		}
		var err error
		if devs, err = loadDevices(*registry, *passwords); err != nil {
			return err
		}
	case *sensors+*lights+*thermos > 0:
		if *sensors < 0 || *lights < 0 || *thermos < 0 {
			return errors.New("--sensors, --lights, --thermometers: must be ≥ 0")
		}
		devs = generatedDevices(*prefix, *sensors, *lights, *thermos)
	default:
		fmt.Fprintln(stderr, "devsim: give --registry FILE or --sensors/--lights/--thermometers N")
		fs.Usage()
		return errUsage
	}
	if *qos < 0 || *qos > 1 {
		return fmt.Errorf("--qos: must be 0 or 1, got %d", *qos)
	}
	cfg := simConfig{Broker: *broker, Devices: devs, Rate: *rate, QoS: byte(*qos), Payload: *payload,
		Duration: *duration, Count: *count, Inflight: *inflight, Linger: *linger, ConnectTimeout: *connectTimeout,
		ConnectWorkers: *workers, StateTopic: *stateTopic}
	if !*quiet {
		cfg.Status = func(s string) { fmt.Fprintf(stderr, "devsim: %s\n", s) }
	}
	sum, err := runSim(ctx, cfg)
	if err != nil {
		return err
	}
	sum.print(stdout)
	if *jsonOut != "" {
		data, err := json.MarshalIndent(sum, "", "  ")
		if err != nil {
			return fmt.Errorf("encode summary: %w", err)
		}
		data = append(data, '\n')
		if *jsonOut == "-" {
			_, err = stdout.Write(data)
		} else {
			err = os.WriteFile(*jsonOut, data, 0o644)
		}
		if err != nil {
			return fmt.Errorf("write summary: %w", err)
		}
	}
	if sum.Connected == 0 {
		return fmt.Errorf("no device could connect: %s", sum.FirstError)
	}
	return nil
}

func cmdGen(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("devsim gen-devices", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("out", "", "registry file to write (required)")
	pwOut := fs.String("password-file", "", "password file to write (default: the registry file + .passwords)")
	prefix := fs.String("prefix", "sim", "device id prefix")
	kinds := fs.String("kinds", "motion-sensor,light,light,thermometer", "kinds, cycled through; each cycle is one room")
	algo := fs.String("algo", "bcrypt", "password hash: bcrypt or argon2id")
	cost := fs.Int("bcrypt-cost", devices.BcryptCost, "bcrypt cost (lower than the default only for load tests)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: devsim gen-devices N --out FILE [flags]\n\nFlags:")
		fs.PrintDefaults()
	}
	// N may come before or after the flags.
	var n string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		n, args = args[0], args[1:]
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if n == "" && fs.NArg() == 1 {
		n = fs.Arg(0)
	} else if fs.NArg() > 0 {
		fs.Usage()
		return errUsage
	}
	count, err := strconv.Atoi(n)
	if err != nil || *out == "" {
		fs.Usage()
		return errUsage
	}
	if *pwOut == "" {
		*pwOut = *out + ".passwords"
	}
	devs, err := genDevices(genOptions{N: count, Prefix: *prefix, Kinds: strings.Split(*kinds, ","), Algo: *algo,
		BcryptCost: *cost})
	if err != nil {
		return err
	}
	if err := writeRegistry(devs, *out, *pwOut); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %d devices to %s and their passwords to %s\n", len(devs), *out, *pwOut)
	return nil
}
