//go:build linux

package e2e

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// Row is one scenario's figures for the Report.
type Row struct {
	Scenario string
	// Sent counts the device publishes handed to the gateway, Acked those that got a PUBACK.
	Sent, Acked int
	// Delivered counts the messages the upstream collector received, Unique the distinct events among them,
	// Duplicates the repeats.
	Delivered, Unique, Duplicates int
	// Lost counts acknowledged events that never arrived upstream (and were not dropped by a configured policy).
	Lost int
	// Elapsed is the scenario's wall time.
	Elapsed time.Duration
	// Note is free text: restarts, drops, the policy in force.
	Note string
}

// Report gathers Rows from tests that may run in parallel and prints them as a table.
type Report struct {
	mu   sync.Mutex
	rows []Row
}

// Add appends a row.
func (r *Report) Add(row Row) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.rows = append(r.rows, row)
}

// Rows returns the rows added so far.
func (r *Report) Rows() []Row {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Row(nil), r.rows...)
}

// Print writes the rows as an aligned table (nothing when there are none).
func (r *Report) Print(w io.Writer) {
	rows := r.Rows()
	if len(rows) == 0 {
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tsent\tacked\tdelivered\tunique\tdups\tlost\ttime\t\tnote")
	for _, row := range rows {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t\t%s\n", row.Scenario, row.Sent, row.Acked, row.Delivered,
			row.Unique, row.Duplicates, row.Lost, row.Elapsed.Round(10*time.Millisecond), row.Note)
	}
	_ = tw.Flush()
	fmt.Fprintln(w, strings.Repeat("-", 40))
}
