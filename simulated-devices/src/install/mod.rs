//! The on-disk installer: what a device does with a release. [`machine`] decides (sans I/O);
//! [`Installer`] does the work on the device's directory and reports each transition.
//!
//! Layout under the device's root directory:
//! - `downloads/<file>.part`: the package being fetched (kept across dropped connections and
//!   restarts, and resumed with `REST`);
//! - `releases/<version>/`: unpacked releases (the new one is unpacked into
//!   `releases/.<version>.partial` and renamed when complete);
//! - `current`: a symlink to `releases/<version>`, replaced by renaming a new symlink over it, so
//!   a crash at any point leaves either the old or the new version active, never neither.
//!
//! The release `current` pointed to before an install is kept; older ones are pruned.

pub mod ftp;
pub mod machine;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub use ftp::{Credentials, FtpError, FtpSource, tls_trusting};
pub use machine::{Action, Event, InstallMachine, InstallState, RetryPolicy};

use tokio::sync::watch;

use crate::package::{self, LATEST_FILE, Release};

/// Longest a self-test may run before it counts as failed.
pub const DEFAULT_SELF_TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest self-test output kept in a failure reason.
const REASON_OUTPUT_BYTES: usize = 300;

/// One state transition, as the agent reports it (twin `installState`, D2C event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// The new state.
    pub state: InstallState,
    /// The version being installed.
    pub version: String,
    /// Why, for failures, rollbacks and download retries.
    pub reason: Option<String>,
    /// When the transition happened.
    pub at: SystemTime,
}

/// How an install ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOutcome {
    /// The final state.
    pub state: InstallState,
    /// The version that was requested.
    pub version: String,
    /// Why, when it failed or rolled back.
    pub reason: Option<String>,
    /// Download attempts made.
    pub download_attempts: u32,
}

/// Errors reading what the server offers.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The FTP server could not be reached or refused.
    #[error("FTP: {0}")]
    Ftp(#[from] FtpError),
    /// `latest.json` is not a release description.
    #[error("latest.json is not valid: {0}")]
    BadLatest(String),
}

/// Installs releases into one device's directory.
#[derive(Debug, Clone)]
pub struct Installer {
    root: PathBuf,
    source: FtpSource,
    retry: RetryPolicy,
    self_test_timeout: Duration,
    seed: u64,
    /// Changes when the device's link drops: the running download attempt is cut.
    link_cuts: Option<watch::Receiver<u32>>,
}

impl Installer {
    /// An installer for the device directory `root`, downloading from `source`.
    pub fn new(root: PathBuf, source: FtpSource) -> Self {
        let seed = source
            .device_id
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Self {
            root,
            source,
            retry: RetryPolicy::default(),
            self_test_timeout: DEFAULT_SELF_TEST_TIMEOUT,
            seed,
            link_cuts: None,
        }
    }

    /// Replaces the download retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Cuts the running download attempt (closing its FTP connections) whenever `cuts` changes,
    /// as a dropped network link would; the attempt counts as failed and is retried.
    pub fn with_link_cuts(mut self, cuts: watch::Receiver<u32>) -> Self {
        self.link_cuts = Some(cuts);
        self
    }

    /// Replaces the self-test timeout.
    pub fn with_self_test_timeout(mut self, timeout: Duration) -> Self {
        self.self_test_timeout = timeout;
        self
    }

    /// Where packages come from.
    pub fn source(&self) -> &FtpSource {
        &self.source
    }

    /// The device directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The `current` symlink.
    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }

    /// The version `current` points to, if any.
    pub fn current_version(&self) -> Option<String> {
        package::read_manifest(&self.current_link()).ok().map(|m| m.version)
    }

    /// Reads `latest.json` from the server.
    pub async fn latest(&self) -> Result<Release, InstallError> {
        let body = self.source.fetch_text(LATEST_FILE).await?;
        serde_json::from_slice(&body).map_err(|e| InstallError::BadLatest(e.to_string()))
    }

    /// Installs `release`, calling `on_report` on every state transition, and returns how it
    /// ended. Never leaves the device without a working `current` it had before.
    pub async fn install(
        &self,
        release: &Release,
        mut on_report: impl FnMut(InstallReport),
    ) -> InstallOutcome {
        let previous = std::fs::read_link(self.current_link()).ok();
        let tmp = self.root.join("downloads").join(format!("{}.part", release.file));
        let partial = tokio::fs::metadata(&tmp).await.map(|m| m.len()).unwrap_or(0);
        let mut machine = InstallMachine::new(release.clone(), self.current_version(), self.retry, self.seed)
            .with_partial_download(partial);
        let mut pending: VecDeque<Action> = machine.start().into();
        while let Some(action) = pending.pop_front() {
            let event = match action {
                Action::Report { state, reason } => {
                    on_report(InstallReport {
                        state,
                        version: release.version.clone(),
                        reason,
                        at: SystemTime::now(),
                    });
                    continue;
                }
                Action::Done(state) => {
                    return InstallOutcome {
                        state,
                        version: release.version.clone(),
                        reason: machine.reason().map(str::to_string),
                        download_attempts: machine.attempts(),
                    };
                }
                Action::Download { resume_from } => self.download(release, &tmp, resume_from).await,
                Action::Wait(d) => {
                    tokio::time::sleep(d).await;
                    Event::WaitOver
                }
                Action::Verify => {
                    let path = tmp.clone();
                    let r = tokio::task::spawn_blocking(move || package::sha256_file(&path)).await;
                    match r.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                        Ok((sha256, size)) => Event::Verified { size, sha256 },
                        Err(e) => Event::Verified { size: 0, sha256: format!("unreadable ({e})") },
                    }
                }
                Action::DiscardDownload => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    Event::Cleaned
                }
                Action::Unpack => {
                    let (archive, releases, version) =
                        (tmp.clone(), self.root.join("releases"), release.version.clone());
                    let r =
                        tokio::task::spawn_blocking(move || unpack_release(&archive, &releases, &version))
                            .await;
                    Event::Unpacked(r.unwrap_or_else(|e| Err(e.to_string())))
                }
                Action::SelfTest(cmd) => Event::SelfTested(self.self_test(&cmd, &release.version).await),
                Action::Switch => {
                    let r = switch_current(&self.root, &release.version);
                    if r.is_ok() {
                        let _ = tokio::fs::remove_file(&tmp).await;
                        prune_releases(&self.root, &release.version, previous.as_deref());
                    }
                    Event::Switched(r)
                }
                Action::Rollback => {
                    Event::RolledBack(rollback(&self.root, &release.version, previous.as_deref()))
                }
            };
            pending.extend(machine.on(event));
        }
        // The machine always ends with `Done`; reaching here means it stopped answering.
        InstallOutcome {
            state: InstallState::Failed,
            version: release.version.clone(),
            reason: Some("the install state machine stopped without an outcome".into()),
            download_attempts: machine.attempts(),
        }
    }

    async fn download(&self, release: &Release, tmp: &Path, resume_from: u64) -> Event {
        if let Some(dir) = tmp.parent()
            && let Err(e) = tokio::fs::create_dir_all(dir).await
        {
            return Event::DownloadFailed { bytes: 0, error: format!("{}: {e}", dir.display()) };
        }
        let cut = next_cut(self.link_cuts.clone());
        match self.source.download_until(&release.file, tmp, resume_from, cut).await {
            Ok(bytes) => Event::Downloaded { bytes },
            Err((bytes, e)) => {
                tracing::debug!(device = %self.source.device_id, "download attempt failed: {e}");
                Event::DownloadFailed { bytes, error: e.to_string() }
            }
        }
    }

    async fn self_test(&self, cmd: &str, version: &str) -> Result<(), String> {
        let dir = self.root.join("releases").join(version);
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run `{cmd}`: {e}"))?;
        match tokio::time::timeout(self.self_test_timeout, child.wait_with_output()).await {
            Err(_) => Err(format!("`{cmd}` did not finish within {:?}", self.self_test_timeout)),
            Ok(Err(e)) => Err(format!("`{cmd}`: {e}")),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => {
                let text =
                    String::from_utf8_lossy(if out.stderr.is_empty() { &out.stdout } else { &out.stderr });
                let text = text.trim();
                let tail = &text[text.len().saturating_sub(REASON_OUTPUT_BYTES)..];
                Err(format!("`{cmd}` exited with {}: {tail}", out.status))
            }
        }
    }
}

/// Resolves at the next change of `cuts`; never without one (or once its sender is gone).
async fn next_cut(cuts: Option<watch::Receiver<u32>>) {
    if let Some(mut rx) = cuts {
        rx.borrow_and_update();
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await
}

/// Unpacks into `releases/.<version>.partial`, then renames it to `releases/<version>`.
fn unpack_release(archive: &Path, releases: &Path, version: &str) -> Result<package::Manifest, String> {
    let partial = releases.join(format!(".{version}.partial"));
    let dest = releases.join(version);
    let _ = std::fs::remove_dir_all(&partial);
    let manifest = package::unpack(archive, &partial).map_err(|e| e.to_string())?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    std::fs::rename(&partial, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    Ok(manifest)
}

/// Points `current` at `releases/<version>`: a new symlink renamed over the old one (atomic).
fn switch_current(root: &Path, version: &str) -> Result<(), String> {
    point_current(root, &Path::new("releases").join(version))
}

#[cfg(unix)]
fn point_current(root: &Path, target: &Path) -> Result<(), String> {
    let tmp = root.join(".current.new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, root.join("current"))
        .map_err(|e| format!("renaming {} over current: {e}", tmp.display()))?;
    // Make the rename durable before reporting `installed`.
    if let Ok(dir) = std::fs::File::open(root) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(not(unix))]
fn point_current(_root: &Path, _target: &Path) -> Result<(), String> {
    Err("switching `current` needs symlinks (Unix only)".into())
}

/// Puts `current` back on `previous` (if it moved) and removes the new release.
fn rollback(root: &Path, version: &str, previous: Option<&Path>) -> Result<(), String> {
    let new_target = Path::new("releases").join(version);
    let now = std::fs::read_link(root.join("current")).ok();
    if now.as_deref() == Some(new_target.as_path()) {
        match previous {
            Some(prev) => point_current(root, prev)?,
            None => std::fs::remove_file(root.join("current")).map_err(|e| e.to_string())?,
        }
    }
    let releases = root.join("releases");
    let _ = std::fs::remove_dir_all(releases.join(format!(".{version}.partial")));
    if previous != Some(new_target.as_path()) {
        let _ = std::fs::remove_dir_all(releases.join(version));
    }
    Ok(())
}

/// Removes releases other than `current` and `previous`.
fn prune_releases(root: &Path, current: &str, previous: Option<&Path>) {
    let keep_prev = previous.and_then(|p| p.file_name()).map(|n| n.to_os_string());
    let Ok(entries) = std::fs::read_dir(root.join("releases")) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name == current || Some(&name) == keep_prev.as_ref() {
            continue;
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn release_dir(root: &Path, version: &str) {
        let dir = root.join("releases").join(version);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(package::MANIFEST_FILE), format!(r#"{{"name":"a","version":"{version}"}}"#))
            .unwrap();
    }

    fn current(root: &Path) -> PathBuf {
        std::fs::read_link(root.join("current")).unwrap()
    }

    #[test]
    fn switch_replaces_current_even_over_a_leftover_temporary_link() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        release_dir(root, "1");
        release_dir(root, "2");
        switch_current(root, "1").unwrap();
        // A crash between creating the new link and renaming it leaves `.current.new` behind.
        std::os::unix::fs::symlink("releases/1", root.join(".current.new")).unwrap();
        switch_current(root, "2").unwrap();
        assert_eq!(current(root), Path::new("releases/2"));
        assert!(!root.join(".current.new").exists());
        assert_eq!(package::read_manifest(&root.join("current")).unwrap().version, "2");
    }

    #[test]
    fn rollback_restores_the_previous_release_and_removes_the_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        release_dir(root, "1");
        release_dir(root, "2");
        switch_current(root, "2").unwrap();
        rollback(root, "2", Some(Path::new("releases/1"))).unwrap();
        assert_eq!(current(root), Path::new("releases/1"));
        assert!(!root.join("releases/2").exists());
        // Without a previous release, `current` goes away rather than pointing at a bad one.
        release_dir(root, "3");
        switch_current(root, "3").unwrap();
        rollback(root, "3", None).unwrap();
        assert!(std::fs::symlink_metadata(root.join("current")).is_err());
    }

    #[test]
    fn prune_keeps_current_and_previous() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for v in ["1", "2", "3"] {
            release_dir(root, v);
        }
        prune_releases(root, "3", Some(Path::new("releases/2")));
        let mut left: Vec<_> = std::fs::read_dir(root.join("releases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["2", "3"]);
    }
}
