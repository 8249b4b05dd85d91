package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
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

	"github.com/edgegate/edgegate/deadletter"
	"github.com/edgegate/edgegate/devices"
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

// adminAddr returns the admin API address from the config (or the default).
func adminAddr(path string) string {
	cfg, err := gateway.LoadConfig(path)
	if err != nil || cfg.HTTP.Listen == "off" {
		cfg = gateway.DefaultConfig()
	}
	addr := cfg.HTTP.Listen
	if strings.HasPrefix(addr, ":") {
		addr = "127.0.0.1" + addr
	}
	return addr
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
		*addr = adminAddr(*path)
	}
	var st map[string]any
	if err := getJSON(ctx, "http://"+*addr+"/api/status", &st); err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	fmt.Fprintf(stdout, "gateway %v  ready=%v healthy=%v uptime=%v clients=%v devices=%v\n",
		st["id"], st["ready"], st["healthy"], st["uptime"], st["clients"], st["devices"])
	if p, ok := st["problems"].([]any); ok {
		for _, x := range p {
			fmt.Fprintf(stdout, "  problem: %v\n", x)
		}
	}
	b, _ := json.MarshalIndent(st["backlog"], "  ", "  ")
	fmt.Fprintf(stdout, "backlog:\n  %s\n", b)
	if sinks, ok := st["sinks"].([]any); ok && len(sinks) > 0 {
		fmt.Fprintln(stdout, "sinks:")
		for _, s := range sinks {
			sb, _ := json.Marshal(s)
			fmt.Fprintf(stdout, "  %s\n", sb)
		}
	}
	return nil
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
	url := fmt.Sprintf("http://%s/api/deadletters?after=%d&limit=%d", adminAddr(*path), *after, *limit)
	if err := getJSON(ctx, url, &recs); err != nil {
		// Not running: read the store directly.
		cfg, cerr := loadConfig(*path)
		if cerr != nil {
			return cerr
		}
		st, oerr := deadletter.Open(filepath.Join(cfg.DataDir, "deadletter.db"), cfg.DeadLetter, discardLogger(), nil)
		if oerr != nil {
			return fmt.Errorf("%w (and the admin API: %w)", oerr, err)
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
		fs := newFlagSet("rules test", "--rules DIR --events FILE.jsonl [--devices FILE]", stderr)
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
		f, err := os.Open(*events)
		if err != nil {
			return err
		}
		defer f.Close()
		return dryRun(*dir, *devs, f, stdout)
	case "replay":
		fs := newFlagSet("rules replay", "--since DURATION [--config FILE] [--rules DIR]", stderr)
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
		if *dir == "" {
			*dir = cfg.Rules.Dir
		}
		lg, err := openLog(cfg)
		if err != nil {
			return err
		}
		defer lg.Close()
		pr, pw := io.Pipe()
		go func() {
			pw.CloseWithError(exportLog(ctx, lg, time.Now().Add(-*since), time.Time{}, pw, nil))
		}()
		defer pr.Close()
		return dryRun(*dir, cfg.Devices.Registry, pr, stdout)
	default:
		fmt.Fprintln(stderr, "Usage: edgegate rules test --rules DIR --events FILE.jsonl | edgegate rules replay --since DURATION")
		if sub == "-h" || sub == "--help" {
			return errHelp
		}
		return errUsage
	}
}

func dryRun(dir, registry string, events io.Reader, out io.Writer) error {
	var d rules.Directory
	if registry != "" {
		reg, err := devices.LoadRegistry(registry)
		if err != nil {
			return err
		}
		d = gateway.Directory(reg)
	}
	cfg := rules.DefaultConfig()
	cfg.Dir = dir
	return rules.DryRun(cfg, d, events, out, rules.DryRunOptions{})
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
