// Package rules evaluates operator-written rules against the gateway's CloudEvents and turns matches into actions:
// commands to devices, derived events and state updates.
//
// # Rule files
//
// A rule directory holds *.yaml / *.yml files, read in name order; each is a mapping with a `rules:` list.
// Decoding is strict: an unknown key, a bad duration, an expression that does not compile, an unknown action or a
// named device missing from the registry is an error naming file, line and key, and every problem of the whole
// directory is reported at once. Rule names are unique across files. A rule:
//
//	rules:
//	  - name: kitchen-lights-on          # required, unique: letters, digits, . _ -
//	    description: free text
//	    disabled: false
//	    on:                              # which events; every key optional; a plain string is a type
//	      type: room.entered             # "*" matches any run of characters: "room.*", "*"
//	      source: /gateways/*/devices/*
//	      subject: kitchen-*
//	      device: {kind: motion-sensor, room: kitchen, labels.floor: "1"}   # metadata of the subject device
//	    when: 'data.room != ""'          # optional condition (expr-lang, compiled at load, must be boolean)
//	    key: data.room                   # optional: debounce/throttle key (default: the subject); also the
//	                                     # default correlation key of sequence/absence and group of windows
//	    debounce: 30s                    # act on the first event; stay quiet while events of the key keep
//	                                     # coming less than 30s apart (each one extends the quiet period)
//	    throttle: 1m                     # or: act at most once per minute per key (repeats do not extend)
//	    actions: [...]                   # at least one
//
// At most one temporal pattern may be added:
//
//	window:                              # aggregate over time, per group
//	  size: 10m                          # window length
//	  slide: 1m                          # sliding windows advancing by slide (size a multiple of it); default
//	                                     # size = tumbling windows. Windows start at whole multiples of slide
//	                                     # (for slides dividing a day: at the same times every day).
//	  agg: avg                           # count (default), sum, avg, min, max
//	  value: data.temp                   # numeric expression; required unless agg is count
//	  group_by: device.room              # default: key, else the subject
//	  emit: close                        # close (default): act when a window with data closes;
//	                                     # crossing: act when threshold becomes true (again) after an event
//	  threshold: window.value > 30       # condition over `window`; required for crossing
//
//	sequence:                            # first followed by then within the time, per key
//	  first: door.opened                 # a type, or a mapping: type, source, subject, device, when
//	  then: {type: room.entered, when: 'data.room == "hall"'}
//	  within: 2m
//	  key: device.room                   # default: the rule's key, else the subject
//
//	absence:                             # after not followed by missing within the time → act (once, at the deadline)
//	  after: room.entered
//	  missing: room.entered              # each new `after` re-arms the timer; a `missing` event cancels it
//	  within: 5m
//	  key: data.room
//
// `on` and `when` filter every event a pattern rule sees; the steps pick the role an event plays. Actions of a
// sequence see the completing event as `event` and the first one as `first`; actions of an absence see the event
// that armed it; actions of a window see its last event and `window`.
//
// Actions (each list item is exactly one of):
//
//	actions:
//	  - command:                         # a QoS 1 command to devices
//	      device: hall-light             # one device: a name (checked at load) or a template (checked as it
//	                                     # renders: an unknown id is an error of the rule, nothing is sent), or
//	      to: {kind: light, room: '{{ data.room }}'}  # every device matching (id, name, room, kind, labels.X)
//	      command: lights.on
//	      payload: '{"on":true}'         # a string template sent as it renders, or YAML data sent as JSON
//	  - emit:                            # a derived CloudEvent, appended to the log, evaluated like any event
//	      type: room.occupied
//	      subject: '{{ data.room }}'     # default: the cause's subject
//	      data: {room: '{{ data.room }}'}  # string template or YAML data (JSON)
//	  - state:                           # set a key in the state view
//	      device: '{{ event.subject }}'  # default: the subject
//	      key: occupied                  # a template
//	      value: true
//
// # Expressions and templates
//
// Conditions, keys and values are expr-lang expressions (https://expr-lang.org) over: data (the event data as
// decoded JSON, or its text), event (id, type, source, subject, time, extensions, data), device (id, name, room,
// kind, labels, known: the subject's metadata), state (the subject's entry in the state view), now (the engine's
// clock), window (key, count, sum, avg, min, max, value, start, end) and first (the first event of a sequence).
// coalesce(a, b, ...) returns its first argument that is neither nil nor "". Unknown names are load errors; type
// errors at evaluation (say data.temp > 30 on a string) are counted in edgegate_rules_errors_total, logged
// (rate-limited) and skip that rule for that event only.
//
// Templates are strings with {{ expr }} segments. In YAML data (payload, data, value) a string that is exactly one
// segment keeps the type of its value ('{{ data.temp }}' stays a number); structured data is JSON-encoded safely,
// whereas a string template is sent as it renders.
//
// # Engine
//
// The Engine takes every event through Submit (non-blocking; a full queue refuses and counts) and evaluates
// events one at a time, in submission order: on the submitter's goroutine when the engine is idle, otherwise in
// Run after those already queued. A rule whose handling of an event panics gets an evaluation error
// (ErrEvalPanic) and the other rules go on. It hands commands to a bounded pool of workers (retries with
// backoff, then a dead letter with reason command_undelivered; a full command queue is a dead letter at once).
// The commands to one device go out in the order the rules gave them: one that is still being tried (a device
// that did not acknowledge it, or is not connected yet) holds the later ones back, so that a retried "on" never
// lands after the "off" that followed it; other devices' commands do not wait. At most 32 commands wait behind
// one device's (more are dead letters at once), so a device that takes none does not fill the queue. The Engine
// reloads the rule files between two events, so no event is skipped or evaluated twice across a reload. A reload
// keeps the timers, windows and debounce state of every rule whose name and pattern are unchanged. Derived events
// carry the extensions causationid, correlationid, chaindepth and rule; an event more than max_chain_depth
// derivations deep is not emitted (loop guard). Timers, windows, debounce and sequence state are saved to
// Config.StateFile (atomically, within persist_interval of a change, default 1s, and on stop) and restored by New;
// an absence that fell due while the gateway was down fires once when Run starts. A crash loses at most the last
// persist_interval of state changes.
//
// DryRun runs the same evaluation over recorded events on a simulated clock (event time) and explains every
// decision without side effects.
package rules
