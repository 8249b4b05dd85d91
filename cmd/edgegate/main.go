// Command edgegate is the IoT edge gateway daemon and its operator tools.
//
// Usage:
//
//	edgegate run --config FILE            run the gateway
//	edgegate check-config --config FILE   validate a configuration and exit
//	edgegate passwd [--algo bcrypt]       hash a device password for the registry
//	edgegate status                       show the running gateway's state
//	edgegate deadletter list              list dead letters
//	edgegate backlog stats|export|import|purge|recover
//	edgegate rules test|replay
//	edgegate version
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// errUsage marks a command-line mistake: the usage was printed, exit code 2.
var errUsage = errors.New("usage")

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"run", "run the gateway", cmdRun},
		{"check-config", "validate a configuration file and exit", cmdCheckConfig},
		{"passwd", "hash a device password for the registry", cmdPasswd},
		{"status", "show the running gateway's sinks, backlog and health", cmdStatus},
		{"deadletter", "list dead letters (deadletter list)", cmdDeadLetter},
		{"backlog", "inspect and manage the durable log (stats, export, import, purge, recover)", cmdBacklog},
		{"rules", "dry-run rules over recorded events (rules test) or the log's history (rules replay)", cmdRules},
		{"version", "print the version", cmdVersion},
	}
}

func main() {
	os.Exit(runMain(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}

func runMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			err := c.run(ctx, args[1:], stdout, stderr)
			switch {
			case err == nil, errors.Is(err, errUsageOK):
				return 0
			case errors.Is(err, errUsage):
				return 2
			default:
				fmt.Fprintf(stderr, "edgegate %s: %v\n", c.name, err)
				return 1
			}
		}
	}
	fmt.Fprintf(stderr, "edgegate: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "edgegate: an IoT edge gateway (MQTT broker → CloudEvents → durable log → upstream, with local rules)")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Usage: edgegate <command> [flags]   (edgegate <command> --help for its flags)")
	fmt.Fprintln(w)
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-13s %s\n", c.name, c.summary)
	}
}

func cmdVersion(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", "", stderr)
	if err := parse(fs, args); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "edgegate %s\n", version)
	return nil
}
