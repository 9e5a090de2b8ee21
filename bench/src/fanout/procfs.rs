//! What the bench reads about a server process from `/proc`: CPU time (`utime + stime` of
//! `/proc/<pid>/stat`, every thread, living and exited), on-CPU nanoseconds of its living threads
//! (`/proc/<pid>/task/*/schedstat`, finer grained, used to tell when the server has gone idle),
//! resident memory (`VmRSS` of `/proc/<pid>/status`) and the machine's load average.

use std::time::Duration;

/// CPU time of process `pid` (user + system, all threads) in microseconds, from
/// `/proc/<pid>/stat` (clock-tick resolution, usually 10 ms).
pub fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 1_000_000 / clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// On-CPU nanoseconds of the living threads of `pid` (`/proc/<pid>/task/*/schedstat`).
pub fn run_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else { continue };
        if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
            total += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(total)
}

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// The first three fields of `/proc/loadavg`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Waits until `pid` uses less than `busy_ns` of CPU per `window`, polling every `window / 4`
/// (so an idle check costs a few `/proc` reads), or until `deadline`. Returns whether it went
/// idle.
pub async fn wait_idle(pid: u32, window: Duration, busy_ns: u64, deadline: tokio::time::Instant) -> bool {
    let step = window / 4;
    let mut samples: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    loop {
        let Some(now) = run_ns(pid) else { return false };
        samples.push_back(now);
        if samples.len() > 5 {
            samples.pop_front();
        }
        if samples.len() == 5 && now - samples[0] < busy_ns {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(step).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_us(me).is_some());
        assert!(run_ns(me).unwrap() > 0);
        assert!(rss_kib(me).unwrap() > 0);
        assert_ne!(loadavg(), "?");
    }
}
