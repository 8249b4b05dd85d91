//go:build linux

// Command edgebench measures edgegate against baselines on this machine, every system a separate process on
// free loopback ports, alternating the systems round by round, and stores the results as JSON that
// `edgebench report` turns into docs/benchmarks.md.
//
// Usage:
//
//	edgebench run [--quick] [--rounds N] [--out DIR] SCENARIO...   run scenarios (or "all")
//	edgebench report [--in DIR] [--out FILE]                       regenerate docs/benchmarks.md
//	edgebench list                                                  list the scenarios
//	edgebench bare-mochi --listen ADDR                              mochi-mqtt with allow-all (a baseline)
//	edgebench republish --broker URL --registry FILE                room.entered → lights.on as a plain client
//
// Run it from the repository: it builds cmd/edgegate, cmd/devsim and cmd/edgebench into a temporary directory.
// Every process it starts is in its own process group and is killed when the run ends or is interrupted.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := runMain(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

var errUsage = errors.New("usage")

// runMain runs edgebench with args and returns the exit code: 0 done, 1 failed, 2 usage.
func runMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		printUsage(stderr)
		return 2
	}
	var err error
	switch args[0] {
	case "run":
		err = cmdRun(ctx, args[1:], stdout, stderr)
	case "report":
		err = cmdReport(args[1:], stdout, stderr)
	case "list":
		for _, s := range scenarios() {
			fmt.Fprintf(stdout, "%-10s %s\n", s.name, s.title)
		}
	case "bare-mochi":
		err = cmdBareMochi(ctx, args[1:], stderr)
	case "republish":
		err = cmdRepublish(ctx, args[1:], stderr)
	case "-h", "--help", "help":
		printUsage(stdout)
	default:
		fmt.Fprintf(stderr, "edgebench: unknown command %q\n\n", args[0])
		printUsage(stderr)
		return 2
	}
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintf(stderr, "edgebench %s: %v\n", args[0], err)
		return 1
	}
}

func printUsage(w io.Writer) {
	fmt.Fprint(w, `edgebench: benchmarks of edgegate against baselines, on this machine

Usage:
  edgebench run [--quick] [--rounds N] [--out DIR] SCENARIO...|all
  edgebench report [--in DIR] [--out FILE]
  edgebench list
  edgebench bare-mochi --listen ADDR
  edgebench republish --broker URL --registry FILE

Scenarios:
`)
	for _, s := range scenarios() {
		fmt.Fprintf(w, "  %-10s %s\n", s.name, s.title)
	}
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return nil
}

// scenario is one benchmark: it fills res with rows, one sample per round.
type scenario struct {
	name, title, description string
	run                      func(ctx context.Context, h *harness, res *Result) error
}

func scenarios() []scenario {
	return []scenario{
		{"ingest", "publish throughput: gateway vs bare mochi vs mosquitto", ingestDescription, runIngest},
		{"durable", "QoS 1 with PUBACK after fsync at 10, 100 and 500 devices", durableDescription, runDurable},
		{"latency", "room.entered → lights.on: gateway rule vs mosquitto + republishing client", latencyDescription, runLatency},
		{"footprint", "memory with 1,000 devices, start-up with a 1M-event log, binary size", footprintDescription, runFootprint},
		{"online", "forwarding upstream with everything up: gateway vs mosquitto bridge", onlineDescription, runOnline},
		{"drain", "draining a backlog after an upstream outage: gateway vs mosquitto bridge", drainDescription, runDrain},
	}
}

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("edgebench run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	quick := fs.Bool("quick", false, "smoke run: tiny loads, one round, results in DIR/<scenario>.quick.json")
	rounds := fs.Int("rounds", 3, "rounds; the systems alternate within each round")
	out := fs.String("out", "docs/benchmarks", "directory of the JSON results (relative to the repository root)")
	timeout := fs.Duration("timeout", 30*time.Minute, "bound on the whole run")
	verbose := fs.Bool("v", true, "progress lines on stderr")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: edgebench run [flags] SCENARIO...|all\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return errUsage
	}
	if *rounds < 1 {
		return fmt.Errorf("--rounds: must be ≥ 1, got %d", *rounds)
	}
	if !*quick && *rounds < 3 {
		fmt.Fprintf(stderr, "edgebench: warning: %d rounds; medians need at least 3\n", *rounds)
	}
	var todo []scenario
	for _, name := range fs.Args() {
		found := false
		for _, s := range scenarios() {
			if name == s.name || name == "all" {
				todo = append(todo, s)
				found = true
			}
		}
		if !found {
			return fmt.Errorf("unknown scenario %q (edgebench list)", name)
		}
	}
	if *quick {
		*rounds = 1
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	logf := func(format string, a ...any) {
		if *verbose {
			fmt.Fprintf(stderr, "edgebench: "+format+"\n", a...)
		}
	}
	h, err := newHarness(ctx, *quick, *rounds, logf)
	if err != nil {
		return err
	}
	defer h.close()
	outDir := *out
	if !strings.HasPrefix(outDir, "/") {
		outDir = h.root + "/" + outDir
	}
	command := "go run ./cmd/edgebench run " + strings.Join(args, " ")
	mach := machine()
	var errs []error
	for _, s := range todo {
		res := &Result{Scenario: s.name, Title: s.title, Description: s.description, Command: command,
			Date: time.Now().UTC().Truncate(time.Second), Machine: mach, Quick: *quick, Rounds: *rounds,
			Params: map[string]string{}}
		logf("%s: %s", s.name, s.title)
		start := time.Now()
		res.Params["loadavg_before"] = loadAvg()
		err := s.run(ctx, h, res)
		res.Params["loadavg_after"] = loadAvg()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.name, err))
		}
		res.Params["wall_seconds"] = fmt.Sprintf("%.0f", time.Since(start).Seconds())
		fmt.Fprintf(stdout, "\n## %s — %s\n\n", s.name, s.title)
		res.table(stdout)
		if err != nil {
			// A failed or interrupted run keeps the previous result file: partial rows are printed only.
			fmt.Fprintf(stdout, "\nerror: %v\n", err)
		} else {
			path, serr := res.save(outDir)
			if serr != nil {
				errs = append(errs, serr)
			} else {
				logf("%s: wrote %s (%s)", s.name, path, time.Since(start).Round(time.Second))
			}
		}
		if ctx.Err() != nil {
			break
		}
	}
	return errors.Join(errs...)
}

// loadAvg is the 1-minute load average: other work on the machine shows in it.
func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

// forRounds runs each round, the systems alternating inside fn.
func (h *harness) forRounds(ctx context.Context, fn func(round int) error) error {
	for r := 1; r <= h.rounds; r++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(r); err != nil {
			return err
		}
	}
	return nil
}

// pick returns quick when the harness runs a smoke test, else real.
func pick[T any](h *harness, real, quick T) T {
	if h.quick {
		return quick
	}
	return real
}
