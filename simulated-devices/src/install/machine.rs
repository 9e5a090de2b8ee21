//! The install state machine, sans I/O: it decides what to do next (download, wait, verify,
//! unpack, self-test, switch, roll back) and what to report, and the driver
//! ([`super::Installer`]) does the disk and network work and feeds back what happened.
//!
//! One machine installs one release. It is small (a few words) and has no timers: waiting is an
//! [`Action::Wait`] the driver performs. Retry backoff is exponential with "equal jitter" from a
//! seeded generator, so runs are reproducible in tests.

use std::time::Duration;

use crate::package::{Manifest, Release};

/// The states an install reports (to the twin's `installState` and as D2C events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstallState {
    /// Fetching the package from the FTP server (retries included).
    Downloading,
    /// Checking size and sha256.
    Verifying,
    /// Unpacking, self-testing and switching `current`.
    Installing,
    /// The new version is `current`.
    Installed,
    /// The package could not be fetched or did not verify; nothing changed on disk.
    Failed,
    /// Unpacking, the self-test or the switch failed; the previous version is `current` again.
    RolledBack,
    /// The requested version is already `current`; nothing was done.
    AlreadyInstalled,
}

impl InstallState {
    /// The name reported on the wire (`installState`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Downloading => "downloading",
            Self::Verifying => "verifying",
            Self::Installing => "installing",
            Self::Installed => "installed",
            Self::Failed => "failed",
            Self::RolledBack => "rolled-back",
            Self::AlreadyInstalled => "already-installed",
        }
    }

    /// Whether the install ends in this state.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Installed | Self::Failed | Self::RolledBack | Self::AlreadyInstalled)
    }
}

impl std::fmt::Display for InstallState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How downloads are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Failed download attempts in a row that add no byte, at most (the first one included). An
    /// attempt that keeps more bytes than it started with resets the count, so a link that drops
    /// again and again delays a download without failing it.
    pub max_attempts: u32,
    /// Backoff after a failed attempt; doubles per attempt in a row without progress.
    pub base_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Report a state transition (`reason` says why for failures and retries).
    Report {
        /// The new state.
        state: InstallState,
        /// Why, for `failed`, `rolled-back` and download retries.
        reason: Option<String>,
    },
    /// Download the package into the temporary file, first truncating it to `resume_from`
    /// bytes and resuming there (FTP `REST`). Answer with [`Event::Downloaded`] or
    /// [`Event::DownloadFailed`].
    Download {
        /// Bytes already in the temporary file to keep.
        resume_from: u64,
    },
    /// Wait, then answer with [`Event::WaitOver`].
    Wait(Duration),
    /// Compute the temporary file's size and sha256: [`Event::Verified`].
    Verify,
    /// Delete the temporary file (it can never verify), then [`Event::Cleaned`].
    DiscardDownload,
    /// Unpack the temporary file into `releases/<version>`: [`Event::Unpacked`].
    Unpack,
    /// Run the manifest's self-test in the release directory: [`Event::SelfTested`].
    SelfTest(String),
    /// Point `current` at the new release atomically and delete the temporary file:
    /// [`Event::Switched`].
    Switch,
    /// Make sure `current` is the previous release and remove the new one: [`Event::RolledBack`].
    Rollback,
    /// The install is over.
    Done(InstallState),
}

/// What the driver observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The download finished; the temporary file holds this many bytes.
    Downloaded {
        /// File size now.
        bytes: u64,
    },
    /// The download broke off; the temporary file holds `bytes` bytes.
    DownloadFailed {
        /// File size now (what a resume keeps).
        bytes: u64,
        /// What went wrong.
        error: String,
    },
    /// The backoff is over.
    WaitOver,
    /// The temporary file's size and sha256.
    Verified {
        /// Size in bytes.
        size: u64,
        /// Lower-case hex SHA-256.
        sha256: String,
    },
    /// The temporary file is gone.
    Cleaned,
    /// The package is unpacked, with its manifest, or why not.
    Unpacked(Result<Manifest, String>),
    /// The self-test passed, or why not.
    SelfTested(Result<(), String>),
    /// `current` points at the new release, or why not.
    Switched(Result<(), String>),
    /// The rollback is complete, or why not.
    RolledBack(Result<(), String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Idle,
    Downloading,
    Waiting { resume_from: u64 },
    Verifying,
    Discarding { reason: String },
    Unpacking,
    SelfTesting,
    Switching,
    RollingBack { reason: String },
    Done(InstallState),
}

/// The install of one release.
#[derive(Debug, Clone)]
pub struct InstallMachine {
    target: Release,
    current: Option<String>,
    policy: RetryPolicy,
    phase: Phase,
    attempts: u32,
    rng: u64,
    reason: Option<String>,
    /// Bytes of an earlier partial download to keep on the first attempt.
    partial: u64,
    /// Where the running download attempt started (its `resume_from`).
    attempt_from: u64,
    /// Failed attempts in a row that added no byte: what `max_attempts` limits, so a download
    /// cut again and again (a flaky link) keeps going as long as each attempt progresses.
    stalled: u32,
}

impl InstallMachine {
    /// Installs `target` on a device whose `current` version is `current`. `seed` drives the
    /// backoff jitter.
    pub fn new(target: Release, current: Option<String>, policy: RetryPolicy, seed: u64) -> Self {
        Self {
            target,
            current,
            policy,
            phase: Phase::Idle,
            attempts: 0,
            rng: seed | 1,
            reason: None,
            partial: 0,
            attempt_from: 0,
            stalled: 0,
        }
    }

    /// Resumes a download an earlier run left with `bytes` bytes (a device restarted
    /// mid-download). A partial file longer than the package is ignored.
    pub fn with_partial_download(mut self, bytes: u64) -> Self {
        self.partial = if bytes <= self.target.size { bytes } else { 0 };
        self
    }

    /// The release being installed.
    pub fn target(&self) -> &Release {
        &self.target
    }

    /// Download attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The final state, once [`Action::Done`] was returned.
    pub fn outcome(&self) -> Option<InstallState> {
        match self.phase {
            Phase::Done(s) => Some(s),
            _ => None,
        }
    }

    /// Why the install failed or rolled back.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The first actions.
    pub fn start(&mut self) -> Vec<Action> {
        if self.phase != Phase::Idle {
            return Vec::new();
        }
        if self.current.as_deref() == Some(self.target.version.as_str()) {
            return self.finish(InstallState::AlreadyInstalled, None);
        }
        self.attempts = 1;
        self.attempt_from = self.partial;
        self.phase = Phase::Downloading;
        vec![report(InstallState::Downloading, None), Action::Download { resume_from: self.partial }]
    }

    /// Feeds an event; returns the next actions. Events that do not fit the current phase are
    /// ignored (empty list).
    pub fn on(&mut self, event: Event) -> Vec<Action> {
        match (self.phase.clone(), event) {
            (Phase::Downloading, Event::Downloaded { .. }) => {
                self.phase = Phase::Verifying;
                vec![report(InstallState::Verifying, None), Action::Verify]
            }
            (Phase::Downloading, Event::DownloadFailed { bytes, error }) => self.retry(bytes, error),
            (Phase::Waiting { resume_from }, Event::WaitOver) => {
                self.attempts += 1;
                self.attempt_from = resume_from;
                self.phase = Phase::Downloading;
                vec![Action::Download { resume_from }]
            }
            (Phase::Verifying, Event::Verified { size, sha256 }) => {
                let problem = if size != self.target.size {
                    Some(format!("size mismatch: expected {} bytes, got {size}", self.target.size))
                } else if !sha256.eq_ignore_ascii_case(&self.target.sha256) {
                    Some(format!("sha256 mismatch: expected {}, got {sha256}", self.target.sha256))
                } else {
                    None
                };
                match problem {
                    Some(reason) => {
                        self.phase = Phase::Discarding { reason };
                        vec![Action::DiscardDownload]
                    }
                    None => {
                        self.phase = Phase::Unpacking;
                        vec![report(InstallState::Installing, None), Action::Unpack]
                    }
                }
            }
            (Phase::Discarding { reason }, Event::Cleaned) => self.finish(InstallState::Failed, Some(reason)),
            (Phase::Unpacking, Event::Unpacked(Ok(manifest))) => {
                if manifest.version != self.target.version {
                    return self.rollback(format!(
                        "the package's manifest says version {}, the release says {}",
                        manifest.version, self.target.version
                    ));
                }
                match manifest.self_test {
                    Some(cmd) => {
                        self.phase = Phase::SelfTesting;
                        vec![Action::SelfTest(cmd)]
                    }
                    None => self.switch(),
                }
            }
            (Phase::Unpacking, Event::Unpacked(Err(e))) => self.rollback(format!("unpacking failed: {e}")),
            (Phase::SelfTesting, Event::SelfTested(Ok(()))) => self.switch(),
            (Phase::SelfTesting, Event::SelfTested(Err(e))) => {
                self.rollback(format!("self-test failed: {e}"))
            }
            (Phase::Switching, Event::Switched(Ok(()))) => self.finish(InstallState::Installed, None),
            (Phase::Switching, Event::Switched(Err(e))) => {
                self.rollback(format!("switching current failed: {e}"))
            }
            (Phase::RollingBack { reason }, Event::RolledBack(r)) => {
                let reason = match r {
                    Ok(()) => reason,
                    Err(e) => format!("{reason}; the rollback also failed: {e}"),
                };
                self.finish(InstallState::RolledBack, Some(reason))
            }
            _ => Vec::new(),
        }
    }

    fn retry(&mut self, bytes: u64, error: String) -> Vec<Action> {
        let progressed = bytes > self.attempt_from && bytes <= self.target.size;
        self.stalled = if progressed { 0 } else { self.stalled + 1 };
        if self.stalled >= self.policy.max_attempts {
            let reason = format!(
                "download failed after {} attempts ({} in a row without progress): {error}",
                self.attempts, self.stalled
            );
            return self.finish(InstallState::Failed, Some(reason));
        }
        // A file longer than the package can never verify: start over.
        let resume_from = if bytes <= self.target.size { bytes } else { 0 };
        let delay = self.backoff();
        self.phase = Phase::Waiting { resume_from };
        let reason = format!("attempt {} failed ({error}); retrying from byte {resume_from}", self.attempts);
        vec![report(InstallState::Downloading, Some(reason)), Action::Wait(delay)]
    }

    /// Exponential backoff with equal jitter: half the step fixed, half random.
    fn backoff(&mut self) -> Duration {
        let exp = self.stalled.saturating_sub(1).min(20);
        let step = self.policy.base_backoff.saturating_mul(1 << exp).min(self.policy.max_backoff);
        let half = step / 2;
        let jitter = half.mul_f64((self.next_random() >> 11) as f64 / (1u64 << 53) as f64);
        half + jitter
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn switch(&mut self) -> Vec<Action> {
        self.phase = Phase::Switching;
        vec![Action::Switch]
    }

    fn rollback(&mut self, reason: String) -> Vec<Action> {
        self.phase = Phase::RollingBack { reason };
        vec![Action::Rollback]
    }

    fn finish(&mut self, state: InstallState, reason: Option<String>) -> Vec<Action> {
        self.phase = Phase::Done(state);
        self.reason = reason.clone();
        vec![report(state, reason), Action::Done(state)]
    }
}

fn report(state: InstallState, reason: Option<String>) -> Action {
    Action::Report { state, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release {
        Release {
            name: "app".into(),
            version: "2".into(),
            file: "app-2.tar.gz".into(),
            sha256: "ab".repeat(32),
            size: 100,
        }
    }

    fn manifest(version: &str, self_test: Option<&str>) -> Manifest {
        Manifest { name: "app".into(), version: version.into(), self_test: self_test.map(Into::into) }
    }

    fn states(actions: &[Action]) -> Vec<InstallState> {
        actions
            .iter()
            .filter_map(|a| if let Action::Report { state, .. } = a { Some(*state) } else { None })
            .collect()
    }

    fn machine() -> InstallMachine {
        InstallMachine::new(release(), Some("1".into()), RetryPolicy::default(), 42)
    }

    #[test]
    fn happy_path_with_self_test() {
        let mut m = machine();
        let a = m.start();
        assert_eq!(a, vec![report(InstallState::Downloading, None), Action::Download { resume_from: 0 }]);
        let a = m.on(Event::Downloaded { bytes: 100 });
        assert_eq!(a, vec![report(InstallState::Verifying, None), Action::Verify]);
        let a = m.on(Event::Verified { size: 100, sha256: "AB".repeat(32) });
        assert_eq!(a, vec![report(InstallState::Installing, None), Action::Unpack]);
        let a = m.on(Event::Unpacked(Ok(manifest("2", Some("./check")))));
        assert_eq!(a, vec![Action::SelfTest("./check".into())]);
        assert_eq!(m.on(Event::SelfTested(Ok(()))), vec![Action::Switch]);
        let a = m.on(Event::Switched(Ok(())));
        assert_eq!(states(&a), [InstallState::Installed]);
        assert_eq!(a.last(), Some(&Action::Done(InstallState::Installed)));
        assert_eq!(m.outcome(), Some(InstallState::Installed));
        assert!(m.on(Event::WaitOver).is_empty(), "events after the end are ignored");
    }

    #[test]
    fn a_partial_download_from_an_earlier_run_is_resumed() {
        let mut m = machine().with_partial_download(60);
        assert_eq!(m.start()[1], Action::Download { resume_from: 60 });
        let mut m = machine().with_partial_download(101);
        assert_eq!(m.start()[1], Action::Download { resume_from: 0 });
    }

    #[test]
    fn already_installed_does_nothing() {
        let mut m = InstallMachine::new(release(), Some("2".into()), RetryPolicy::default(), 1);
        let a = m.start();
        assert_eq!(states(&a), [InstallState::AlreadyInstalled]);
        assert_eq!(a.last(), Some(&Action::Done(InstallState::AlreadyInstalled)));
        assert!(!a.iter().any(|a| matches!(a, Action::Download { .. })));
    }

    #[test]
    fn sha_mismatch_discards_and_fails_without_touching_current() {
        let mut m = machine();
        m.start();
        m.on(Event::Downloaded { bytes: 100 });
        assert_eq!(
            m.on(Event::Verified { size: 100, sha256: "00".repeat(32) }),
            vec![Action::DiscardDownload]
        );
        let a = m.on(Event::Cleaned);
        assert_eq!(states(&a), [InstallState::Failed]);
        assert!(m.reason().unwrap().contains("sha256 mismatch"));
        let mut m = machine();
        m.start();
        m.on(Event::Downloaded { bytes: 99 });
        m.on(Event::Verified { size: 99, sha256: "ab".repeat(32) });
        m.on(Event::Cleaned);
        assert!(m.reason().unwrap().contains("size mismatch"));
    }

    #[test]
    fn dropped_download_resumes_after_backoff() {
        let mut m = machine();
        m.start();
        let a = m.on(Event::DownloadFailed { bytes: 40, error: "reset".into() });
        assert_eq!(states(&a), [InstallState::Downloading]);
        let Some(Action::Wait(d)) = a.last() else { panic!("{a:?}") };
        assert!(*d >= Duration::from_millis(100) && *d <= Duration::from_millis(200), "{d:?}");
        assert_eq!(m.on(Event::WaitOver), vec![Action::Download { resume_from: 40 }]);
        assert_eq!(m.attempts(), 2);
        // An over-long file restarts from zero.
        m.on(Event::DownloadFailed { bytes: 500, error: "junk".into() });
        assert_eq!(m.on(Event::WaitOver), vec![Action::Download { resume_from: 0 }]);
    }

    #[test]
    fn attempts_that_progress_do_not_use_up_the_retries() {
        let policy = RetryPolicy { max_attempts: 2, ..RetryPolicy::default() };
        let mut m = InstallMachine::new(release(), None, policy, 7);
        m.start();
        for bytes in [10, 20, 30, 40, 50] {
            let a = m.on(Event::DownloadFailed { bytes, error: "cut".into() });
            assert!(matches!(a.last(), Some(Action::Wait(_))), "{a:?}");
            assert_eq!(m.on(Event::WaitOver), vec![Action::Download { resume_from: bytes }]);
        }
        assert_eq!(m.attempts(), 6);
        // Two in a row without a byte more: give up.
        let a = m.on(Event::DownloadFailed { bytes: 50, error: "cut".into() });
        assert!(matches!(a.last(), Some(Action::Wait(_))), "{a:?}");
        m.on(Event::WaitOver);
        let a = m.on(Event::DownloadFailed { bytes: 50, error: "cut".into() });
        assert_eq!(a.last(), Some(&Action::Done(InstallState::Failed)), "{a:?}");
        assert!(m.reason().unwrap().contains("2 in a row without progress"), "{:?}", m.reason());
    }

    #[test]
    fn backoff_grows_and_is_capped_and_gives_up() {
        let policy = RetryPolicy {
            max_attempts: 6,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(800),
        };
        let mut m = InstallMachine::new(release(), None, policy, 7);
        m.start();
        let mut waits = Vec::new();
        loop {
            let a = m.on(Event::DownloadFailed { bytes: 0, error: "refused".into() });
            match a.last() {
                Some(Action::Wait(d)) => {
                    waits.push(*d);
                    m.on(Event::WaitOver);
                }
                Some(Action::Done(s)) => {
                    assert_eq!(*s, InstallState::Failed);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits.len(), 5);
        let caps = [100u64, 200, 400, 800, 800];
        for (w, cap) in waits.iter().zip(caps) {
            assert!(
                *w >= Duration::from_millis(cap / 2) && *w <= Duration::from_millis(cap),
                "{w:?} vs {cap}"
            );
        }
        assert!(m.reason().unwrap().contains("after 6 attempts"));
    }

    #[test]
    fn failures_after_download_roll_back() {
        for (event, expect) in [
            (Event::Unpacked(Err("bad gzip".into())), "unpacking failed"),
            (Event::Unpacked(Ok(manifest("3", None))), "manifest says version 3"),
        ] {
            let mut m = machine();
            m.start();
            m.on(Event::Downloaded { bytes: 100 });
            m.on(Event::Verified { size: 100, sha256: "ab".repeat(32) });
            assert_eq!(m.on(event), vec![Action::Rollback]);
            let a = m.on(Event::RolledBack(Ok(())));
            assert_eq!(states(&a), [InstallState::RolledBack]);
            assert!(m.reason().unwrap().contains(expect), "{:?}", m.reason());
        }
        let mut m = machine();
        m.start();
        m.on(Event::Downloaded { bytes: 100 });
        m.on(Event::Verified { size: 100, sha256: "ab".repeat(32) });
        m.on(Event::Unpacked(Ok(manifest("2", Some("false")))));
        assert_eq!(m.on(Event::SelfTested(Err("exit status 1".into()))), vec![Action::Rollback]);
        m.on(Event::RolledBack(Err("disk full".into())));
        let reason = m.reason().unwrap();
        assert!(reason.contains("self-test failed") && reason.contains("disk full"), "{reason}");
    }
}
