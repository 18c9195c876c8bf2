package evloop

import (
	"container/heap"
	"time"
)

// Timer runs a function on its loop at a deadline: the deadlines of sockets
// taken from the Go runtime's poller (login, query wait, idle, a stalled
// client's writes) are the loop's timers. A Timer's methods may be called
// only on its loop.
type Timer struct {
	l    *Loop
	when int64
	f    func()
	i    int // index in the heap, -1 when not scheduled
}

// NewTimer returns a timer that runs f on l once Reset; it is not scheduled.
func (l *Loop) NewTimer(f func()) *Timer { return &Timer{l: l, f: f, i: -1} }

// AfterFunc runs f on l after d.
func (l *Loop) AfterFunc(d time.Duration, f func()) *Timer {
	t := l.NewTimer(f)
	t.Reset(d)
	return t
}

// Reset schedules t to run after d, replacing its previous deadline.
func (t *Timer) Reset(d time.Duration) {
	t.when = t.l.now() + int64(d)
	if t.i >= 0 {
		heap.Fix(&t.l.timers, t.i)
		return
	}
	heap.Push(&t.l.timers, t)
}

// Stop unschedules t; it reports whether t was scheduled.
func (t *Timer) Stop() bool {
	if t.i < 0 {
		return false
	}
	heap.Remove(&t.l.timers, t.i)
	return true
}

// runTimers runs the timers whose deadline passed, earliest first.
func (l *Loop) runTimers() {
	if len(l.timers) == 0 {
		return
	}
	now := l.now()
	for len(l.timers) > 0 && l.timers[0].when <= now {
		t := heap.Pop(&l.timers).(*Timer)
		t.f()
		l.reap()
	}
}

// timerHeap is a min-heap of timers by deadline (container/heap).
type timerHeap []*Timer

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].when < h[j].when }
func (h timerHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].i, h[j].i = i, j
}
func (h *timerHeap) Push(x any) {
	t := x.(*Timer)
	t.i = len(*h)
	*h = append(*h, t)
}
func (h *timerHeap) Pop() any {
	old := *h
	n := len(old)
	t := old[n-1]
	old[n-1] = nil
	t.i = -1
	*h = old[:n-1]
	return t
}
