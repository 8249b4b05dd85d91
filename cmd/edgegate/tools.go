package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"golang.org/x/term"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/deadletter"
	"github.com/edgegate/edgegate/devices"
	"github.com/edgegate/edgegate/forward"
	"github.com/edgegate/edgegate/gateway"
	"github.com/edgegate/edgegate/rules"
)

func cmdPasswd(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("passwd", "[--algo bcrypt|argon2id]  (reads the password from the terminal or one line of stdin)", stderr)
	algo := fs.String("algo", "bcrypt", "hash algorithm: bcrypt or argon2id")
	if err := parse(fs, args); err != nil {
		return err
	}
	var pw []byte
	if fd := int(os.Stdin.Fd()); term.IsTerminal(fd) {
		fmt.Fprint(stderr, "Password: ")
		p1, err := term.ReadPassword(fd)
		fmt.Fprintln(stderr)
		if err != nil {
			return fmt.Errorf("read password: %w", err)
		}
		fmt.Fprint(stderr, "Again: ")
		p2, err := term.ReadPassword(fd)
		fmt.Fprintln(stderr)
		if err != nil {
			return fmt.Errorf("read password: %w", err)
		}
		if !bytes.Equal(p1, p2) {
			return errors.New("the passwords differ")
		}
		pw = p1
	} else {
		line, err := bufio.NewReader(os.Stdin).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read password: %w", err)
		}
		pw = []byte(strings.TrimRight(line, "\r\n"))
	}
	if len(pw) == 0 {
		return errors.New("empty password")
	}
	h, err := devices.HashPassword(pw, *algo)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, h)
	return nil
}

// errAdminOff says that the configuration turns the admin API off (http.listen: off): there is no gateway to ask.
var errAdminOff = errors.New("the admin API is off")

// adminAPI returns the address of the admin API the configuration at path sets. Only when that path is the
// default (no --config given: given is false) and no such file exists, as where edgegate runs as a service with its
// configuration in /etc/edgegate, is it the default address, 127.0.0.1:8080. A configuration that does not load is
// an error, and so is one with http.listen: off (errAdminOff): any other address could be another gateway's.
func adminAPI(path string, given bool) (string, error) {
	cfg, err := gateway.LoadConfig(path)
	switch {
	case err != nil && !given && errors.Is(err, os.ErrNotExist):
		cfg = gateway.DefaultConfig()
	case err != nil:
		return "", err
	case cfg.HTTP.Listen == "off":
		return "", fmt.Errorf("%w in %s (http.listen: off)", errAdminOff, path)
	}
	addr := cfg.HTTP.Listen
	if strings.HasPrefix(addr, ":") {
		addr = "127.0.0.1" + addr
	}
	return addr, nil
}

// adminAddr returns the admin API address of the configuration at path, or "" when it has none to ask (see
// adminAPI).
func adminAddr(path string) string {
	addr, err := adminAPI(path, true)
	if err != nil {
		return ""
	}
	return addr
}

// flagGiven reports whether the command line set the flag name.
func flagGiven(fs *flag.FlagSet, name string) bool {
	given := false
	fs.Visit(func(f *flag.Flag) { given = given || f.Name == name })
	return given
}

func getJSON(ctx context.Context, url string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("is edgegate running? %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 && resp.StatusCode != http.StatusServiceUnavailable {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", "[--config FILE | --addr HOST:PORT] [--json]", stderr)
	path := fs.String("config", defaultConfig, "configuration file (for the admin API address)")
	addr := fs.String("addr", "", "admin API address (overrides the config)")
	asJSON := fs.Bool("json", false, "print the raw JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *addr == "" {
		a, err := adminAPI(*path, flagGiven(fs, "config"))
		if errors.Is(err, errAdminOff) {
			return fmt.Errorf("%w: status asks a running gateway there; name one with --addr HOST:PORT", err)
		}
		if err != nil {
			return err
		}
		*addr = a
	}
	var raw json.RawMessage
	if err := getJSON(ctx, "http://"+*addr+"/api/status", &raw); err != nil {
		return err
	}
	if *asJSON {
		var st map[string]any
		if err := json.Unmarshal(raw, &st); err != nil {
			return fmt.Errorf("decode status: %w", err)
		}
		return printJSON(stdout, st)
	}
	var st gateway.Status
	if err := json.Unmarshal(raw, &st); err != nil {
		return fmt.Errorf("decode status: %w", err)
	}
	return printStatus(stdout, st, time.Now())
}

// printStatus writes the gateway's state, a line on the log and one row per sink (and priority lane): its
// state, its backlog (the stored events after its cursor), the age of the oldest of them, and its last error.
func printStatus(w io.Writer, st gateway.Status, now time.Time) error {
	fmt.Fprintf(w, "gateway %s  ready=%v healthy=%v uptime=%s clients=%d devices=%d\n",
		st.ID, st.Ready, st.Healthy, st.Uptime, st.Clients, st.Devices)
	for _, p := range st.Problems {
		fmt.Fprintf(w, "  problem: %s\n", oneLine(p))
	}
	b := st.Backlog
	fmt.Fprintf(w, "log: %d events, %s", b.Events, fmtBytes(b.Bytes))
	if b.MaxBytes > 0 {
		fmt.Fprintf(w, " of %s", fmtBytes(b.MaxBytes))
	}
	if !b.Oldest.IsZero() {
		fmt.Fprintf(w, ", oldest %s (%s ago)", b.Oldest.Format(time.RFC3339), fmtAge(now.Sub(b.Oldest)))
	}
	if b.Full {
		fmt.Fprint(w, ", FULL: new events are refused")
	}
	fmt.Fprintln(w)

	cursors := make(map[string]buffer.CursorStats, len(b.Cursors))
	for _, c := range b.Cursors {
		cursors[c.Name] = c
	}
	if len(st.Sinks) == 0 {
		fmt.Fprintln(w, "sinks: none configured")
	} else {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SINK\tTYPE\tTARGET\tSTATE\tBACKLOG\tOLDEST WAITING\tIN FLIGHT\tLAST ACK\tLAST ERROR")
		for _, s := range st.Sinks {
			backlog, oldest := "?", "-" // "?": the log has no cursor of that name
			if c, ok := cursors[forward.CursorName(s.Name)]; ok {
				backlog = fmt.Sprint(c.Backlog)
				if c.Backlog > 0 && !c.OldestUnacked.IsZero() {
					oldest = fmtAge(now.Sub(c.OldestUnacked)) + " ago"
				}
				delete(cursors, c.Name)
			}
			lastAck := "never"
			if !s.LastAck.IsZero() {
				lastAck = fmtAge(now.Sub(s.LastAck)) + " ago"
			}
			lastErr := "-"
			if s.LastError != "" {
				lastErr = oneLine(s.LastError)
				if !s.LastErrorTime.IsZero() {
					lastErr = fmtAge(now.Sub(s.LastErrorTime)) + " ago: " + lastErr
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", s.Name, s.Type, oneLine(s.Target), sinkState(s),
				backlog, oldest, s.InFlight, lastAck, lastErr)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	// Cursors no sink uses: readers' cursors, or those of sinks removed from the configuration.
	var other []buffer.CursorStats
	for _, c := range b.Cursors {
		if _, ok := cursors[c.Name]; ok {
			other = append(other, c)
		}
	}
	for _, c := range other {
		hold := "holds no events"
		if c.Required {
			hold = "holds its events"
		}
		fmt.Fprintf(w, "cursor %s (no sink; %s): backlog %d\n", c.Name, hold, c.Backlog)
	}
	return nil
}

// sinkState is a sink's state in a word or two: healthy, or why it is not.
func sinkState(s forward.SinkHealth) string {
	switch {
	case s.Healthy:
		return "healthy"
	case s.Stalled && !s.Connected:
		return "unhealthy (stalled, disconnected)"
	case s.Stalled:
		return "unhealthy (stalled)"
	case !s.Connected:
		return "unhealthy (disconnected)"
	default:
		return "unhealthy"
	}
}

// oneLine makes s fit in one cell of a table: line breaks and tabs become spaces.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// fmtAge shows a duration to the second (negative ones, from clock skew, as 0s).
func fmtAge(d time.Duration) string {
	return max(d, 0).Round(time.Second).String()
}

// fmtBytes shows a size in B, KiB, MiB or GiB.
func fmtBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 2; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMG"[exp])
}

func cmdDeadLetter(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "list" {
		fmt.Fprintln(stderr, "Usage: edgegate deadletter list [--config FILE] [--after ID] [--limit N] [--json]")
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			return errHelp
		}
		return errUsage
	}
	fs := newFlagSet("deadletter list", "[--config FILE] [--after ID] [--limit N] [--json]", stderr)
	path := fs.String("config", defaultConfig, "configuration file")
	after := fs.Uint64("after", 0, "list records after this id")
	limit := fs.Int("limit", 100, "at most this many records")
	asJSON := fs.Bool("json", false, "print JSON lines")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	var recs []deadletter.Record
	addr, err := adminAPI(*path, flagGiven(fs, "config"))
	if err != nil && !errors.Is(err, errAdminOff) {
		return err
	}
	if err == nil {
		url := fmt.Sprintf("http://%s/api/deadletters?after=%d&limit=%d", addr, *after, *limit)
		if err = getJSON(ctx, url, &recs); err != nil {
			err = fmt.Errorf("the admin API: %w", err)
		}
	}
	if err != nil {
		// Not running, or the admin API is off: read the store directly.
		cfg, cerr := loadConfig(*path)
		if cerr != nil {
			return fmt.Errorf("%w (and %w)", cerr, err)
		}
		st, oerr := deadletter.Open(filepath.Join(cfg.DataDir, "deadletter.db"), cfg.DeadLetter, discardLogger(), nil)
		if oerr != nil {
			return fmt.Errorf("%w (and %w)", oerr, err)
		}
		defer st.Close()
		if recs, err = st.List(*after, *limit); err != nil {
			return err
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		for _, r := range recs {
			if err := enc.Encode(r); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTIME\tREASON\tDEVICE\tTOPIC\tBYTES\tDETAIL")
	for _, r := range recs {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d\t%s\n", r.ID, r.Time.Format(time.RFC3339), r.Reason, r.DeviceID, r.Topic,
			len(r.Payload), r.Detail)
	}
	return tw.Flush()
}

func cmdRules(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	sub := ""
	if len(args) > 0 {
		sub = args[0]
	}
	switch sub {
	case "test":
		fs := newFlagSet("rules test", "--events FILE.jsonl [--config FILE] [--rules DIR] [--devices FILE]\n\n"+
			"Dry-runs the rules over recorded events. With --config, the rules settings, rule directory and device\n"+
			"registry are the configuration's; --rules and --devices override them.", stderr)
		path := fs.String("config", "", "configuration file (default: none, the built-in rules settings)")
		dir := fs.String("rules", "configs/rules.d", "directory of rule files")
		events := fs.String("events", "", "recorded CloudEvents, one JSON object per line")
		devs := fs.String("devices", "configs/devices.yaml", "device registry (for metadata matches)")
		if err := parse(fs, args[1:]); err != nil {
			return err
		}
		if *events == "" {
			fs.Usage()
			return errUsage
		}
		cfg := rules.DefaultConfig()
		if *path != "" {
			gcfg, err := loadConfig(*path)
			if err != nil {
				return err
			}
			cfg = gcfg.RulesConfig()
			set := map[string]bool{}
			fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
			if !set["rules"] {
				*dir = cfg.Dir
			}
			if !set["devices"] {
				*devs = gcfg.Devices.Registry
			}
		}
		cfg.Dir = *dir
		if err := cfg.Validate(); err != nil {
			return fmt.Errorf("rules: %w", err)
		}
		f, err := os.Open(*events)
		if err != nil {
			return err
		}
		defer f.Close()
		return dryRun(cfg, *devs, f, stdout)
	case "replay":
		fs := newFlagSet("rules replay", "--since DURATION [--config FILE] [--rules DIR]\n\n"+
			"Dry-runs the rules over the events stored in the log, with the rules settings of the configuration.\n"+
			"Stored events that rules derived (those with the CloudEvents extension \"rule\") are left out: the dry\n"+
			"run derives them again from the events that caused them.", stderr)
		path := fs.String("config", defaultConfig, "configuration file")
		since := fs.Duration("since", time.Hour, "replay events newer than this")
		dir := fs.String("rules", "", "directory of rule files (default: the config's rules.dir)")
		if err := parse(fs, args[1:]); err != nil {
			return err
		}
		cfg, err := loadConfig(*path)
		if err != nil {
			return err
		}
		rcfg := cfg.RulesConfig()
		if *dir != "" {
			rcfg.Dir = *dir
		}
		if err := rcfg.Validate(); err != nil {
			return fmt.Errorf("%s: %w", *path, err)
		}
		lg, err := openLog(cfg)
		if err != nil {
			return err
		}
		defer lg.Close()
		return replay(ctx, lg, time.Now().Add(-*since), rcfg, cfg.Devices.Registry, stdout)
	default:
		fmt.Fprintln(stderr, "Usage: edgegate rules test --events FILE.jsonl [--config FILE] | edgegate rules replay --since DURATION")
		if sub == "-h" || sub == "--help" {
			return errHelp
		}
		return errUsage
	}
}

// replay dry-runs the rules of cfg over the log's events since the given time, leaving out the events that rules
// derived, and says how many it left out.
func replay(ctx context.Context, lg *buffer.Log, since time.Time, cfg rules.Config, registry string, out io.Writer) error {
	var derived int // written by the export, read once it has ended
	pr, pw := io.Pipe()
	exported := make(chan struct{})
	go func() {
		defer close(exported)
		keep := func(data []byte) bool {
			if derivedByRule(data) {
				derived++
				return false
			}
			return true
		}
		pw.CloseWithError(exportLog(ctx, lg, since, time.Time{}, keep, pw, nil))
	}()
	err := dryRun(cfg, registry, pr, out)
	pr.Close() // ends the export early when the dry run stopped reading
	<-exported
	if derived > 0 {
		fmt.Fprintf(out, "left out %d stored event(s) that rules derived (extension %q): the dry run derives them again\n",
			derived, rules.ExtRule)
	}
	return err
}

// derivedByRule reports whether a stored CloudEvent (JSON) carries the extension rules set on the events they
// derive.
func derivedByRule(data []byte) bool {
	if !bytes.Contains(data, []byte(`"`+rules.ExtRule+`"`)) {
		return false // the common case, without decoding
	}
	var attrs map[string]json.RawMessage
	if err := json.Unmarshal(data, &attrs); err != nil {
		return false
	}
	v, ok := attrs[rules.ExtRule]
	return ok && string(v) != "null"
}

// dryRun evaluates the rules of cfg.Dir over CloudEvents JSON lines; registry, when set, is the device registry
// that device matches and selectors use.
func dryRun(cfg rules.Config, registry string, events io.Reader, out io.Writer) error {
	var d rules.Directory
	if registry != "" {
		reg, err := devices.LoadRegistry(registry)
		if err != nil {
			return err
		}
		d = gateway.Directory(reg)
	}
	// Conditions see the device state the events build, as in the gateway (a new view: the run starts from none).
	return rules.DryRun(cfg, d, events, out, rules.DryRunOptions{State: devices.NewStateView()})
}

// validateEvent decodes one CloudEvents JSON line.
func validateEvent(line []byte) (*event.Event, error) {
	ev := event.New()
	if err := json.Unmarshal(line, &ev); err != nil {
		return nil, fmt.Errorf("not a CloudEvent: %w", err)
	}
	if err := ev.Validate(); err != nil {
		return nil, fmt.Errorf("invalid CloudEvent: %w", err)
	}
	return &ev, nil
}
