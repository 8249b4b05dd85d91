package forward

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/edgegate/edgegate/buffer"
)

// bufferLog is the real durable log as a Source, the way the gateway shows it to the sinks.
type bufferLog struct{ *buffer.Log }

// openBufferLog opens a log in a temporary directory holding events for cursors, runs its writer and stops it
// at cleanup.
func openBufferLog(t testing.TB, cursors ...string) bufferLog {
	t.Helper()
	l, err := buffer.Open(buffer.Config{Path: filepath.Join(t.TempDir(), "events.db"), MaxBytes: 1 << 30,
		Cursors: cursors}, testLogger(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("log Run: %v", err)
		}
	})
	return bufferLog{l}
}

func (l bufferLog) Read(after uint64, max int) ([]Record, error) {
	recs, err := l.Log.Read(after, max)
	if err != nil {
		return nil, err
	}
	out := make([]Record, len(recs))
	for i, r := range recs {
		out[i] = Record{Seq: r.Seq, Type: r.Type, Subject: r.Subject, Priority: r.Priority, Data: r.Data}
	}
	return out, nil
}

// add appends an event numbered n of subject (durably) and returns its Seq.
func (l bufferLog) add(t testing.TB, id, typ, subject string, n int) uint64 {
	t.Helper()
	seq, err := l.Append(context.Background(), buffer.Entry{Data: ceJSON(id, typ, subject, n), Type: typ, Subject: subject})
	if err != nil {
		t.Fatal(err)
	}
	return seq
}
