package rules

import "sync"

// commandLanes keeps the commands to each device in the order the rules gave them. Each device has a lane: its
// commands wait there, and one worker at a time delivers them, oldest first, retries included. Without it a
// command whose first attempt failed could be retried after a later command to the same device went through: a
// light told "on", then "off", would end up on.
//
// A lane is ready (its device is queued once on the workers' channel) while it holds a command and no worker is
// on it. The first attempt of a command that an evaluation sends itself (CommandSender) is only made when the
// device's lane is idle; the lane is held for it until the evaluation hands it over, and the commands given
// meanwhile queue behind it.
type commandLanes struct {
	mu      sync.Mutex
	lanes   map[string]*lane
	pending int // commands waiting in the lanes, held ones included (not those being delivered)
}

type lane struct {
	jobs      []commandJob
	held      bool // a command sent by an evaluation is still to be handed over (it goes first)
	scheduled bool // the device is on the workers' channel, or a worker delivers its commands
}

func newCommandLanes() *commandLanes { return &commandLanes{lanes: map[string]*lane{}} }

// maxLaneWaiting bounds the commands waiting in one device's lane: a device that takes none (not connected, not
// acknowledging) does not fill the command queue of every device. The one being delivered is not counted.
const maxLaneWaiting = 32

// look tells how many commands wait in all the lanes for a worker (held ones included), how many of them are the
// device's, and whether the device's lane is idle: no command of the device waits, is held or is being delivered.
func (c *commandLanes) look(device string) (total, waiting int, idle bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.lanes[device]
	if l == nil {
		return c.pending, 0, true
	}
	waiting = len(l.jobs)
	if l.held {
		waiting++
	}
	return c.pending, waiting, false
}

func (c *commandLanes) laneOf(device string) *lane {
	l := c.lanes[device]
	if l == nil {
		l = &lane{}
		c.lanes[device] = l
	}
	return l
}

// hold reserves the idle lane of device for a command an evaluation has sent: the commands given until handOver
// wait behind it.
func (c *commandLanes) hold(device string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.laneOf(device).held = true
	c.pending++
}

// push queues job last in its device's lane. It reports whether the lane became ready: the caller then queues
// the device for the workers.
func (c *commandLanes) push(job commandJob) (ready bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.laneOf(job.device)
	l.jobs = append(l.jobs, job)
	c.pending++
	return l.ready()
}

// handOver puts the held command job first in its lane and reports whether the lane became ready.
func (c *commandLanes) handOver(job commandJob) (ready bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.laneOf(job.device)
	l.held = false
	l.jobs = append([]commandJob{job}, l.jobs...)
	return l.ready()
}

// release ends the hold of job's lane without delivering job (settled by the caller) and reports whether the
// lane became ready.
func (c *commandLanes) release(job commandJob) (ready bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.lanes[job.device]
	l.held = false
	c.pending--
	if len(l.jobs) == 0 { // a held lane is not scheduled
		delete(c.lanes, job.device)
		return false
	}
	return l.ready()
}

// ready marks the lane scheduled if it can be: it holds a command, none is held before it and no worker is on
// it. c.mu is held.
func (l *lane) ready() bool {
	if l.scheduled || l.held || len(l.jobs) == 0 {
		return false
	}
	l.scheduled = true
	return true
}

// next takes the oldest command of a scheduled lane, once the worker delivered the previous one; ok is false
// when the lane is empty, and the worker leaves it.
func (c *commandLanes) next(device string) (job commandJob, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.lanes[device]
	if len(l.jobs) == 0 { // not held either: a lane is held only while idle, and never scheduled meanwhile
		delete(c.lanes, device)
		return commandJob{}, false
	}
	job = l.jobs[0]
	l.jobs[0] = commandJob{}
	l.jobs = l.jobs[1:]
	c.pending--
	return job, true
}
