package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/term"

	"github.com/edgegate/edgegate/buffer"
	"github.com/edgegate/edgegate/gateway"
)

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// openLog opens the durable log of cfg for an offline tool. It fails fast, naming the file, when a running
// gateway holds it.
func openLog(cfg gateway.Config) (*buffer.Log, error) {
	return openLogFile(cfg, false)
}

// openConfigLog opens the log of the gateway configured in the file at path.
func openConfigLog(path string) (*buffer.Log, error) {
	cfg, err := loadConfig(path)
	if err != nil {
		return nil, err
	}
	return openLog(cfg)
}

// openLogFile opens the gateway's log for a tool; create makes a new one (in a new data dir) when there is none.
func openLogFile(cfg gateway.Config, create bool) (*buffer.Log, error) {
	bcfg := cfg.Buffer
	bcfg.Path = filepath.Join(cfg.DataDir, "events.db")
	// The configured sinks' cursors hold events even where a sink has not acknowledged anything yet: a tool's
	// commit (import, purge) removes only what every one of them has passed.
	bcfg.Cursors = cfg.Forward.CursorNames()
	_, statErr := os.Stat(bcfg.Path)
	if create && errors.Is(statErr, fs.ErrNotExist) {
		if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
			return nil, fmt.Errorf("data_dir: %w", err)
		}
		return buffer.Open(bcfg, discardLogger(), nil) // a new log: the configured cursors from the start
	}
	if err := statErr; err != nil {
		return nil, fmt.Errorf("no event log at %s (data_dir %q): %w", bcfg.Path, cfg.DataDir, err)
	}
	return buffer.OpenTool(bcfg, discardLogger())
}

func cmdBacklog(ctx context.Context, args []string, stdout, stderr io.Writer) (retErr error) {
	sub := ""
	if len(args) > 0 {
		sub = args[0]
	}
	usageAll := func() {
		fmt.Fprintln(stderr, `Usage:
  edgegate backlog stats   [--config FILE]
  edgegate backlog export  [--config FILE] [--since T] [--until T] [--out FILE]
  edgegate backlog import  [--config FILE] [--in FILE]
  edgegate backlog purge   [--config FILE] --before T --yes
  edgegate backlog recover [--config FILE] [--force]
T is RFC 3339 (2026-01-02T15:04:05Z) or a duration ago (2h). The gateway must be stopped for all but stats.`)
	}
	synopsis := map[string]string{
		"stats":   "[--config FILE]",
		"export":  "[--config FILE] [--since T] [--until T] [--out FILE]   (T: RFC 3339 or a duration ago such as 2h)",
		"import":  "[--config FILE] [--in FILE]   (CloudEvents JSON lines; the gateway must be stopped)",
		"purge":   "[--config FILE] --before T --yes   (T: RFC 3339 or a duration ago; the gateway must be stopped)",
		"recover": "[--config FILE] [--force]   (moves a damaged log aside and starts a new one; a sound one only with --force; the gateway must be stopped)",
	}[sub]
	fs := newFlagSet("backlog "+sub, synopsis, stderr)
	path := fs.String("config", defaultConfig, "configuration file")
	switch sub {
	case "stats":
		if err := parse(fs, args[1:]); err != nil {
			return err
		}
		cfg, err := loadConfig(*path)
		if err != nil {
			return err
		}
		lg, err := openLog(cfg)
		if err != nil {
			// A running gateway holds the log: ask it.
			var st map[string]any
			if herr := getJSON(ctx, "http://"+adminAddr(*path)+"/api/status", &st); herr == nil {
				return printJSON(stdout, st["backlog"])
			}
			return err
		}
		defer lg.Close()
		return printJSON(stdout, lg.Stats()) // every configured sink's cursor, stored or not (the log opens them all)
	case "export":
		since := fs.String("since", "", "only events at or after T")
		until := fs.String("until", "", "only events before T")
		out := fs.String("out", "-", "output file (- for stdout)")
		if err := parse(fs, args[1:]); err != nil {
			return err
		}
		s, err := parseWhen(*since)
		if err != nil {
			return fmt.Errorf("--since: %w", err)
		}
		u, err := parseWhen(*until)
		if err != nil {
			return fmt.Errorf("--until: %w", err)
		}
		lg, err := openConfigLog(*path)
		if err != nil {
			return err
		}
		defer lg.Close()
		w := stdout
		if *out != "-" {
			f, err := os.Create(*out)
			if err != nil {
				return err
			}
			defer func() {
				if cerr := f.Close(); retErr == nil && cerr != nil {
					retErr = fmt.Errorf("--out: %w", cerr)
				}
			}()
			w = f
		}
		// Progress goes to a terminal, unless the events themselves go to that terminal too.
		var prog io.Writer
		if isTerminal(stderr) && !isTerminal(w) {
			prog = stderr
		}
		bw := bufio.NewWriterSize(w, 1<<16)
		if err := exportLog(ctx, lg, s, u, nil, bw, prog); err != nil {
			return err
		}
		return bw.Flush()
	case "import":
		in := fs.String("in", "-", "input file of CloudEvents JSON lines (- for stdin)")
		if err := parse(fs, args[1:]); err != nil {
			return err
		}
		cfg, err := loadConfig(*path)
		if err != nil {
			return err
		}
		r := io.Reader(os.Stdin)
		if *in != "-" {
			f, err := os.Open(*in)
			if err != nil {
				return err
			}
			defer f.Close()
			r = f
		}
		return importLog(ctx, cfg, r, stdout)
	case "purge":
		before := fs.String("before", "", "remove events older than T (required)")
		yes := fs.Bool("yes", false, "confirm: the events are removed for good")
		if err := parse(fs, args[1:]); err != nil {
			return err
		}
		t, err := parseWhen(*before)
		if err != nil || t.IsZero() {
			return fmt.Errorf("--before: a time is required (%v)", err)
		}
		if !*yes {
			return errors.New("purge removes events for good: add --yes to confirm")
		}
		lg, err := openConfigLog(*path)
		if err != nil {
			return err
		}
		n, err := lg.Purge(t)
		if cerr := lg.Close(); err == nil && cerr != nil { // in interval mode its fsync makes the purge durable
			err = cerr
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "purged %d events older than %s\n", n, t.Format(time.RFC3339))
		return nil
	case "recover":
		force := fs.Bool("force", false, "move the log aside even when it reads as sound")
		if err := parse(fs, args[1:]); err != nil {
			return err
		}
		cfg, err := loadConfig(*path)
		if err != nil {
			return err
		}
		file := filepath.Join(cfg.DataDir, "events.db")
		// A sound log holds the events still owed to the sinks: it is not moved aside without --force.
		switch err := buffer.Check(file); {
		case err == nil && !*force:
			return fmt.Errorf("%s reads as sound (every page and record checked): nothing moved; --force moves it aside anyway", file)
		case errors.Is(err, buffer.ErrLocked):
			return err
		case err != nil && !errors.Is(err, buffer.ErrCorrupt):
			return err
		}
		moved, err := buffer.Recover(file)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "moved the damaged log aside to %s; a new, empty log will be created at start\n", moved)
		return nil
	case "-h", "--help":
		usageAll()
		return errHelp
	default:
		usageAll()
		return errUsage
	}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// parseWhen parses RFC 3339 or a duration meaning "that long ago"; "" is the zero time.
func parseWhen(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(s); err == nil {
		return time.Now().Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is neither RFC 3339 nor a duration", s)
	}
	return t, nil
}

// exportLog writes the log's events in [since, until) as CloudEvents JSON lines, in order. keep, when not nil,
// chooses among them: an event it returns false for is left out.
func exportLog(ctx context.Context, lg *buffer.Log, since, until time.Time, keep func(data []byte) bool, w io.Writer,
	progress io.Writer) error {
	st := lg.Stats()
	total := st.Events
	var after uint64
	var done int
	var buf []byte
	last := time.Now()
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		recs, err := lg.Read(after, 1024)
		if err != nil {
			return err
		}
		if len(recs) == 0 {
			break
		}
		for _, r := range recs {
			after = r.Seq
			done++
			if (!since.IsZero() && r.Time.Before(since)) || (!until.IsZero() && !r.Time.Before(until)) {
				continue
			}
			data := bytes.TrimSpace(r.Data)
			if keep != nil && !keep(data) {
				continue
			}
			buf = append(append(buf[:0], data...), '\n')
			if _, err := w.Write(buf); err != nil {
				return err
			}
		}
		if progress != nil && time.Since(last) > 100*time.Millisecond {
			last = time.Now()
			drawProgress(progress, done, int(total))
		}
	}
	if progress != nil {
		drawProgress(progress, done, int(total))
		fmt.Fprintln(progress)
	}
	return nil
}

func drawProgress(w io.Writer, done, total int) {
	if total <= 0 {
		total = done
	}
	const width = 40
	filled := width
	if total > 0 {
		filled = done * width / total
	}
	if filled > width {
		filled = width
	}
	fmt.Fprintf(w, "\r[%s%s] %d/%d events", strings.Repeat("=", filled), strings.Repeat(" ", width-filled), done, total)
}

// importWindow is how many appends importLog keeps in flight: they share commits instead of taking one fsync
// each.
const importWindow = 4096

// importLog appends CloudEvents JSON lines to the log, in order; every line is validated first, and a bad line
// stops the import with its line number (nothing after it is written). Appends are pipelined; the count it
// reports is of events durably stored (the log's final commit included).
func importLog(ctx context.Context, cfg gateway.Config, r io.Reader, stdout io.Writer) (err error) {
	lg, err := openLogFile(cfg, true)
	if err != nil {
		return err
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- lg.Run(runCtx) }()
	type queued struct {
		p    *buffer.Pending
		line int
	}
	var window []queued
	n := 0
	// settle waits for the queued appends until at most keep are left; the first that failed is the error.
	settle := func(keep int) error {
		var first error
		for len(window) > keep {
			q := window[0]
			window = window[1:]
			if _, err := q.p.Wait(ctx); err != nil {
				if first == nil {
					first = fmt.Errorf("line %d: %w", q.line, err)
				}
				continue
			}
			n++
		}
		return first
	}
	defer func() {
		serr := settle(0)
		stop()
		rerr := <-done
		switch {
		case err != nil:
			err = fmt.Errorf("%w (%d events imported)", err, n)
		case serr != nil:
			err = fmt.Errorf("%w (%d events imported)", serr, n)
		case rerr != nil:
			err = fmt.Errorf("the log's final commit: %w (%d events imported before it)", rerr, n)
		default:
			fmt.Fprintf(stdout, "imported %d events\n", n)
		}
	}()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 1<<16), 16<<20)
	line := 0
	for sc.Scan() {
		line++
		b := []byte(strings.TrimSpace(sc.Text()))
		if len(b) == 0 {
			continue
		}
		ev, err := validateEvent(b)
		if err != nil {
			return fmt.Errorf("line %d: %w", line, err)
		}
		p, err := lg.AppendAsync(ctx, buffer.Entry{Data: b, Type: ev.Type(), Subject: ev.Subject(), Time: ev.Time()})
		if err != nil {
			return fmt.Errorf("line %d: %w", line, err)
		}
		window = append(window, queued{p, line})
		if len(window) >= importWindow {
			if err := settle(importWindow / 2); err != nil {
				return err
			}
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("line %d: %w", line+1, err)
	}
	return nil
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}
