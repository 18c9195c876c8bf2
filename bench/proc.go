package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// clockTicks is sysconf(_SC_CLK_TCK), the unit of utime and stime in
// /proc/PID/stat: `getconf CLK_TCK`, 100 on Linux when that fails.
func clockTicks() int64 {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err == nil {
		if n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64); err == nil && n > 0 {
			return n
		}
	}
	return 100
}

// cpuTicks returns utime+stime of a process (all its threads) in clock
// ticks, from /proc/PID/stat.
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: fields are counted after
	// its closing parenthesis. utime and stime are fields 14 and 15.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad utime/stime", pid)
	}
	return ut + st, nil
}

// statusBytes reads a "kB" field of /proc/PID/status (VmRSS, VmHWM) in bytes.
func statusBytes(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return 0, err
			}
			return kb * 1024, nil
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no %s", pid, field)
}

// resetPeakRSS resets a process' VmHWM to its current RSS (writing 5 to
// /proc/PID/clear_refs, Linux 4.0+; needs root or the same user).
func resetPeakRSS(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// cpuSample is the CPU a process had consumed at a moment.
type cpuSample struct {
	at    time.Time
	ticks int64
}

// procStats is what a procMonitor saw.
type procStats struct {
	samples []cpuSample
	tck     int64
	// peakRSS is VmHWM since the reset at the start, or the highest VmRSS
	// sampled when the reset was not possible.
	peakRSS int64
}

// cpuBetween is the CPU seconds consumed from the first sample at or after
// from to the last sample at or before to (samples are 100ms apart, so a
// window edge is up to 100ms late).
func (s procStats) cpuBetween(from, to time.Time) (float64, bool) {
	first, last := -1, -1
	for i, x := range s.samples {
		if first < 0 && !x.at.Before(from) {
			first = i
		}
		if !x.at.After(to) {
			last = i
		}
	}
	if first < 0 || last <= first {
		return 0, false
	}
	return float64(s.samples[last].ticks-s.samples[first].ticks) / float64(s.tck), true
}

// procMonitor samples a process' CPU every 100ms and tracks its peak RSS.
type procMonitor struct {
	pid      int
	hwmReset bool
	done     chan struct{}
	wg       sync.WaitGroup
	mu       sync.Mutex
	stats    procStats
}

// startProcMonitor resets the process' peak RSS and starts sampling.
func startProcMonitor(pid int) *procMonitor {
	m := &procMonitor{pid: pid, done: make(chan struct{}), stats: procStats{tck: clockTicks()}}
	m.hwmReset = resetPeakRSS(pid) == nil
	m.sample()
	m.wg.Add(1)
	go func() { // owner: m; ends at m.stop
		defer m.wg.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-m.done:
				return
			case <-tick.C:
				m.sample()
			}
		}
	}()
	return m
}

// sample records the CPU ticks and RSS now.
func (m *procMonitor) sample() {
	now := time.Now()
	ticks, err := cpuTicks(m.pid)
	rss, _ := statusBytes(m.pid, "VmRSS")
	m.mu.Lock()
	defer m.mu.Unlock()
	if err == nil {
		m.stats.samples = append(m.stats.samples, cpuSample{at: now, ticks: ticks})
	}
	m.stats.peakRSS = max(m.stats.peakRSS, rss)
}

// stop takes a last sample and returns what was seen.
func (m *procMonitor) stop() procStats {
	close(m.done)
	m.wg.Wait()
	m.sample()
	if m.hwmReset {
		if hwm, err := statusBytes(m.pid, "VmHWM"); err == nil {
			m.mu.Lock()
			m.stats.peakRSS = max(m.stats.peakRSS, hwm)
			m.mu.Unlock()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stats
}

// raiseNoFile raises RLIMIT_NOFILE to at least want when it can (the soft
// limit up to the hard one; as root the hard one too, up to fs.nr_open) and
// returns the soft limit in force. Children (pgbench, the poolers) inherit
// it.
func raiseNoFile(want uint64) (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	if lim.Cur >= want {
		// Set it explicitly anyway: Go restores the original soft limit in
		// children unless the program called Setrlimit itself.
		return lim.Cur, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	if lim.Max < want && os.Geteuid() == 0 {
		newMax := want
		if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
			if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n < newMax {
				newMax = n
			}
		}
		try := syscall.Rlimit{Cur: newMax, Max: newMax}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &try); err == nil {
			return newMax, nil
		}
	}
	lim.Cur = min(want, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	if lim.Cur < want {
		return lim.Cur, fmt.Errorf("RLIMIT_NOFILE hard limit %d is below the %d wanted", lim.Max, want)
	}
	return lim.Cur, nil
}
