//! This process's memory as the kernel counts it: resident set size now (`VmRSS`) and its peak
//! since the process started (`VmHWM`), read from `/proc/self/status`. A small reusable probe:
//! the runner samples it into its time series and reports start/peak/end; in embedded mode the
//! hub, the FTP server and the fleet all live in this one process, so the numbers are theirs
//! together.

/// Resident memory of this process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the most that was ever resident.
    pub peak_kib: u64,
}

/// Reads `/proc/self/status`; `None` where there is no procfs (not Linux) or it lacks the fields.
pub fn current() -> Option<Memory> {
    parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The `VmRSS` and `VmHWM` lines of a `/proc/<pid>/status` text ("VmRSS:\t  1234 kB").
pub fn parse_status(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Some(Memory { rss_kib: field("VmRSS:")?, peak_kib: field("VmHWM:")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss_and_high_water_mark() {
        let status =
            "Name:\ttestbench\nVmPeak:\t  900000 kB\nVmHWM:\t   52000 kB\nVmRSS:\t   48123 kB\nThreads:\t5\n";
        assert_eq!(parse_status(status), Some(Memory { rss_kib: 48123, peak_kib: 52000 }));
        assert_eq!(parse_status("Name:\tx\nVmRSS:\t12 kB\n"), None, "no VmHWM");
        assert_eq!(parse_status("VmRSS:\tlots kB\nVmHWM:\t1 kB\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_resident_memory() {
        let m = current().expect("procfs on Linux");
        assert!(m.rss_kib > 0 && m.peak_kib >= m.rss_kib, "{m:?}");
    }
}
