// Package buffer is the gateway's durable, ordered event log in a bbolt file: ingest appends CloudEvents,
// forwarding sinks read them through named durable cursors, and an event leaves the log only when every
// required cursor has passed it or a counted retention rule removes it (store-and-forward).
//
// # Durability
//
// One writer goroutine (Log.Run) commits everything queued in one bbolt transaction (group commit): appends
// that arrive while a commit runs share the next one, so many devices' appends share one fsync; the next
// transaction also takes in the appends of those the last commit acknowledged, as they come back. With
// durability "fsync" (the default) Append returns after the commit's fsync: a returned sequence number
// survives a crash or a power loss. With durability "interval" Append returns once the batch is written to
// the file and the file is fsync'd fsync_interval after the previous fsync: a process crash loses nothing, but a
// power loss or kernel crash may lose the events acknowledged during the last fsync_interval (default 200ms) and
// may leave the file damaged, since the writes between two fsyncs reach the disk in no fixed order (the gateway
// then refuses to start and names `edgegate backlog recover`, which moves the file aside).
// A failed commit (write or fsync error, full filesystem) acknowledges none of its events: each appender gets
// the error, and the next batch is tried afresh. bbolt rolls a failed commit back in memory only; when its
// meta page was written before the failure (its fsync failed), the page cache already names the failed
// transaction: the file is then closed and opened again, and the events of that transaction are deleted
// again, so that the log holds exactly what was acknowledged.
//
// Cursors are persisted the same way, promptly and grouped. Ack moves a cursor in memory and does not wait;
// while appends flow the writer saves it with the next commit of appends, otherwise in a commit of its own
// that every Ack made meanwhile shares, at once or, when cursors were saved less than 5ms before, 5ms after
// that save (a sink draining a backlog acknowledges with every round trip). Persisted says where a cursor is after a crash and
// WaitPersisted waits for it to move, so a reader can bound what it would read again after a crash.
//
// # Layout and space
//
// Events are stored under 8-byte big-endian sequence numbers in segment buckets of 8192 numbers, with a
// small header (priority, time, type, subject) before the CloudEvent JSON. Per-segment metadata (counts,
// bytes, bounds, count per priority) lives in its own bucket, updated in the same transaction, so opening a
// log with a large backlog reads no events. Close leaves bbolt's free list in the file, so only the first
// start after a crash walks the file, once, to check it and rebuild that list (reading it sequentially first:
// from a cold disk that is what makes the walk fast). Draining deletes whole
// segments; when the file is mostly free space the writer compacts it into a new file and renames it over the
// old one, so the file shrinks again.
//
// # Retention
//
// Config.Cursors names the cursors that must carry every event. Whole segments every one of them passed
// are deleted promptly; the delivered events of a partly passed segment are deleted when room is needed.
// When max_bytes or min_free_bytes is reached, when_full "reject" refuses new events with ErrFull
// (back-pressure), and "drop-oldest" drops stored events, lowest priority and oldest first (never of a
// priority above the new event's). With no required cursor the log is a bounded history and always makes
// room that way. Every event removed before the required cursors passed it is counted in
// edgegate_buffer_dropped_total by reason (max_bytes, min_free, max_age, purge) and logged at most once per
// second.
package buffer
