package rules

import (
	"container/heap"
	"time"
)

type timerKind int

const (
	timerAbsence     timerKind = iota // an absence is due: fire
	timerSequence                     // a sequence's first step expired: forget it
	timerWindowClose                  // a window rule's windows close
)

// timerItem is one pending deadline; items live in the machine's heap.
type timerItem struct {
	at   time.Time
	seq  uint64
	kind timerKind
	st   *ruleState
	key  string // absence/sequence key
	idx  int    // heap index, -1 when not in the heap
}

// timerHeap orders items by deadline, then by creation.
type timerHeap []*timerItem

func (h timerHeap) Len() int { return len(h) }
func (h timerHeap) Less(i, j int) bool {
	if h[i].at.Equal(h[j].at) {
		return h[i].seq < h[j].seq
	}
	return h[i].at.Before(h[j].at)
}
func (h timerHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].idx, h[j].idx = i, j
}
func (h *timerHeap) Push(x any) {
	it := x.(*timerItem)
	it.idx = len(*h)
	*h = append(*h, it)
}
func (h *timerHeap) Pop() any {
	old := *h
	n := len(old)
	it := old[n-1]
	old[n-1] = nil
	it.idx = -1
	*h = old[:n-1]
	return it
}

// timers is the machine's set of deadlines.
type timers struct {
	h   timerHeap
	seq uint64
}

// set schedules (or moves) it to at.
func (t *timers) set(it *timerItem, at time.Time) {
	it.at = at
	if it.idx >= 0 && it.idx < len(t.h) && t.h[it.idx] == it {
		heap.Fix(&t.h, it.idx)
		return
	}
	t.seq++
	it.seq = t.seq
	heap.Push(&t.h, it)
}

func (t *timers) remove(it *timerItem) {
	if it == nil || it.idx < 0 || it.idx >= len(t.h) || t.h[it.idx] != it {
		return
	}
	heap.Remove(&t.h, it.idx)
}

// next returns the earliest deadline.
func (t *timers) next() (time.Time, bool) {
	if len(t.h) == 0 {
		return time.Time{}, false
	}
	return t.h[0].at, true
}

// popDue removes and returns the earliest item due at or before now.
func (t *timers) popDue(now time.Time) *timerItem {
	if len(t.h) == 0 || t.h[0].at.After(now) {
		return nil
	}
	return heap.Pop(&t.h).(*timerItem)
}

func (t *timers) len() int { return len(t.h) }

func (t *timers) reset() { t.h = t.h[:0] }
