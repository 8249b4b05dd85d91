package buffer

import (
	"context"
	"fmt"
)

// Pending is an event queued by AppendAsync; Wait tells when it is durable.
type Pending struct {
	l   *Log
	b   *batch
	idx int
}

// AppendAsync queues e for the next commit, like Append, but returns as soon as it is queued. A caller that must
// keep its events in order (one device connection) queues them one after another and waits for each later, so
// that its events share commits instead of taking one commit each. The events are committed in the order they
// were queued. When the queue is full AppendAsync waits for room, like Append.
func (l *Log) AppendAsync(ctx context.Context, e Entry) (*Pending, error) {
	return l.AppendAsyncFunc(ctx, e, nil)
}

// AppendAsyncFunc is AppendAsync calling queued (when not nil) once the event is queued, before the writer is
// woken for it (a commit already running may take it in, though): a reader that reacts to events as they enter
// the log (the rules) acts before the commit's fsync starts, and never for an event the log refused outright.
// An event queued and then refused by its commit (no room under the reject policy) has been seen by queued.
func (l *Log) AppendAsyncFunc(ctx context.Context, e Entry, queued func()) (*Pending, error) {
	p, err := l.appendAsync(ctx, &e, queued)
	if err != nil {
		return nil, err
	}
	return &p, nil
}

// appendAsync is AppendAsyncFunc returning the Pending by value (Append keeps it on its stack).
func (l *Log) appendAsync(ctx context.Context, e *Entry, queued func()) (Pending, error) {
	if err := ctx.Err(); err != nil {
		return Pending{}, fmt.Errorf("buffer: append: %w", err)
	}
	b, idx, err := l.enqueue(ctx, e, true, queued)
	if err != nil {
		return Pending{}, fmt.Errorf("buffer: append: %w", err)
	}
	return Pending{l: l, b: b, idx: idx}, nil
}

// Done is closed once the commit that holds the event has ended: Wait then returns without blocking.
func (p *Pending) Done() <-chan struct{} { return p.b.done }

// Wait returns the event's sequence number once it is durable (in fsync mode; written in interval mode), or the
// reason it is not: ErrFull when the log had no room for it under the reject policy, or the commit's error. Call
// it once.
func (p *Pending) Wait(ctx context.Context) (uint64, error) {
	if c := ctx.Done(); c == nil {
		<-p.b.done
	} else {
		select {
		case <-p.b.done:
		case <-c:
			p.b.returned.Add(1)
			return 0, fmt.Errorf("buffer: append: %w", ctx.Err())
		}
	}
	// The last appender to return wakes the writer, which may wait for them to queue their next events
	// (see settle).
	if p.b.returned.Add(1) == int32(p.b.waiters) {
		p.l.poke()
	}
	if p.b.err != nil {
		return 0, fmt.Errorf("buffer: append: %w", p.b.err)
	}
	seq := p.b.seqs[p.idx]
	if seq == 0 {
		return 0, fmt.Errorf("buffer: append: %w", ErrFull)
	}
	return seq, nil
}
