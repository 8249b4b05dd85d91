package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/rules"
)

const defaultConfig = "configs/edgegate.yaml"

// defaultGCPercent is the daemon's GOGC unless the environment sets one.
const defaultGCPercent = 300

func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("edgegate "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: edgegate %s %s\n", name, synopsis)
		var has bool
		fs.VisitAll(func(*flag.Flag) { has = true })
		if has {
			fmt.Fprintln(stderr, "\nFlags:")
			fs.PrintDefaults()
		}
	}
	return fs
}

// parse parses flags; --help is not an error (exit 0), a bad flag is a usage error (exit 2), and so is an argument
// left after the flags: no command takes one, so a file named without --config (or a flag after a stray word, where
// parsing stops) must not go unnoticed while the command carries on with its defaults.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errHelp
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		hint := ""
		if ext := filepath.Ext(fs.Arg(0)); fs.Lookup("config") != nil && (ext == ".yaml" || ext == ".yml") {
			hint = " (a configuration file is named with --config FILE)"
		}
		fmt.Fprintf(fs.Output(), "%s: unexpected argument %q%s\n", fs.Name(), fs.Arg(0), hint)
		fs.Usage()
		return errUsage
	}
	return nil
}

// errHelp ends a command after printing its help (exit code 0).
var errHelp = errUsageOK

var errUsageOK = errors.New("help shown")

func loadConfig(path string) (gateway.Config, error) {
	cfg, err := gateway.LoadConfig(path)
	if err != nil {
		return cfg, err
	}
	return cfg, nil
}

func newLogger(cfg gateway.LogConfig, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Level))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func cmdRun(ctx context.Context, args []string, _, stderr io.Writer) error {
	// The signals are taken first, before the start-up: gateway.New may take minutes (after a crash it checks the
	// log and replays the device state), and until signal.Notify Go's default action applies: a SIGHUP (systemctl
	// reload) would kill the daemon, and systemd does not restart a death by SIGHUP. A SIGHUP during start-up waits
	// in hup and is handled once the gateway runs; a SIGINT or SIGTERM during start-up stops it cleanly after.
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	fs := newFlagSet("run", "[--config FILE]", stderr)
	path := fs.String("config", defaultConfig, "configuration file (YAML)")
	cfg, err := parseValidConfig(fs, args, path)
	if err != nil {
		return err
	}
	logger := newLogger(cfg.Log, stderr)
	if _, set := os.LookupEnv("GOGC"); !set {
		// The heap is small and mostly short-lived (one event's bytes): collecting at 300% instead of Go's 100%
		// costs a few MiB and saves about a tenth of the CPU under load.
		debug.SetGCPercent(defaultGCPercent)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	gw, err := gateway.New(cfg, logger, reg)
	if err != nil {
		return err
	}
	if ctx.Err() != nil {
		// Run stops at once and closes what New opened.
		logger.Info("stop requested during start-up")
	}

	// Under systemd with WatchdogSec the watchdog is fed from here on, start-up included, while no part stalls.
	if every, err := daemon.SdWatchdogEnabled(false); err != nil {
		logger.Warn("systemd watchdog settings not understood; the watchdog is not fed", "error", err)
	} else if every > 0 {
		wctx, stopWatchdog := context.WithCancel(context.Background())
		fed := make(chan struct{})
		go func() {
			defer close(fed)
			feedWatchdog(wctx, every/2, gw.Stalls, func() error {
				_, err := daemon.SdNotify(false, daemon.SdNotifyWatchdog)
				return err
			}, logger)
		}()
		defer func() { stopWatchdog(); <-fed }()
		logger.Info("feeding the systemd watchdog", "watchdog_sec", every, "stall_timeout", cfg.StallTimeout)
	}

	done := make(chan error, 1)
	go func() { done <- gw.Run(ctx) }()

	// READY only once every listener is bound and every part runs.
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	notified := false
	stopping := ctx.Done()
	var reload <-chan os.Signal // hup, once the gateway runs: a SIGHUP from before then waits in it
	for {
		select {
		case err := <-done:
			_, _ = daemon.SdNotify(false, daemon.SdNotifyStopping)
			return err
		case <-reload:
			// The registry first: the rules may name devices that it adds.
			if _, err := gw.ReloadDevices(); err != nil {
				logger.Error("device registry reload failed; the previous registry stays in force", "error", err)
			}
			if err := gw.ReloadTLS(); err != nil {
				logger.Error("TLS certificate reload failed", "error", err)
			}
			if err := gw.Rules().Reload(); err != nil {
				logger.Error("rules reload failed; the previous rules stay active", "error", err)
			} else {
				logger.Info("rules reloaded")
			}
		case <-stopping:
			stopping = nil // Run is draining; wait for it above
			logger.Info("stopping", "timeout", cfg.ShutdownTimeout)
			if notified {
				_, _ = daemon.SdNotify(false, daemon.SdNotifyStopping)
				notified = false
			}
		case <-tick.C:
			if reload == nil && gw.Ready() {
				reload = hup
			}
			if !notified && gw.Ready() && ctx.Err() == nil {
				if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
					logger.Warn("sd_notify failed", "error", err)
				}
				notified = true
				logger.Info("ready", "mqtt", gw.MQTTAddr("tcp"), "http", gw.HTTPAddr())
				tick.Reset(time.Hour)
			}
		}
	}
}

// feedWatchdog notifies the systemd watchdog every interval while stalls reports nothing, until ctx ends. While a
// part is stalled it sends nothing, so that systemd restarts the gateway once WatchdogSec has passed, and it logs
// the stall when it begins and when it ends.
func feedWatchdog(ctx context.Context, every time.Duration, stalls func() []string, notify func() error, logger *slog.Logger) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	stalled, failing := false, false
	for {
		if s := stalls(); len(s) > 0 {
			if !stalled {
				logger.Error("stalled: the systemd watchdog is no longer fed and will restart the gateway", "stalls", s)
			}
			stalled = true
		} else {
			if stalled {
				logger.Warn("no longer stalled: the systemd watchdog is fed again")
			}
			stalled = false
			err := notify()
			if err != nil && !failing {
				logger.Warn("sd_notify WATCHDOG=1 failed", "error", err)
			}
			failing = err != nil
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func cmdCheckConfig(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("check-config", "[--config FILE]   (also loads the device registry and checks the rule files of rules.dir)", stderr)
	path := fs.String("config", defaultConfig, "configuration file (YAML)")
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	var errs []error
	if err := cfg.Validate(); err != nil {
		errs = append(errs, err)
	}
	n, err := checkRules(cfg)
	if err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s is not valid:\n%s", *path, indent(errors.Join(errs...).Error()))
	}
	fmt.Fprintf(stdout, "%s: ok (%d rules)\n", *path, n)
	return nil
}

// checkRules loads the device registry and the rule files of cfg's rules.dir as the gateway would, without running
// anything, and returns the number of rules in force or every problem, each with its file and line. A registry or
// rules directory that does not exist is left to Config.Validate, which reports it.
func checkRules(cfg gateway.Config) (int, error) {
	var errs []error
	var dir rules.Directory
	if _, err := os.Stat(cfg.Devices.Registry); err == nil {
		reg, err := devices.LoadRegistry(cfg.Devices.Registry)
		if err != nil {
			errs = append(errs, fmt.Errorf("devices.registry: %w", err))
		} else {
			dir = gateway.Directory(reg) // rules naming a device are checked against the registry
		}
	}
	n := 0
	if fi, err := os.Stat(cfg.Rules.Dir); cfg.Rules.Dir != "" && err == nil && fi.IsDir() {
		infos, err := rules.Check(cfg.Rules.Dir, dir)
		if err != nil {
			errs = append(errs, fmt.Errorf("rules.dir %s: %w", cfg.Rules.Dir, err))
		}
		n = len(infos)
	}
	return n, errors.Join(errs...)
}

// parseValidConfig parses the flags, then loads and validates the configuration they name.
func parseValidConfig(fs *flag.FlagSet, args []string, path *string) (gateway.Config, error) {
	if err := parse(fs, args); err != nil {
		return gateway.Config{}, err
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return gateway.Config{}, err
	}
	if err := cfg.Validate(); err != nil {
		return gateway.Config{}, fmt.Errorf("%s is not valid:\n%s", *path, indent(err.Error()))
	}
	return cfg, nil
}

func indent(s string) string {
	return "  " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n  ")
}
