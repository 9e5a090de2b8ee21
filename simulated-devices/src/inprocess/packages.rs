//! The package server of in-process devices: packages held in memory (file name → bytes, plus
//! the release `latest.json` names), and installs that run the real install state machine
//! ([`InstallMachine`]) against them: the bytes a device "downloads" are checked for size and
//! sha256 and the archive's manifest is read and validated, as on a disk, but nothing is written
//! and the device's active version is a field of its state.
//!
//! Two differences from the FTP installer, both forced by running a million devices in one
//! process: the machine's retry waits end at once (an in-memory download fails only when the
//! file is missing, which waiting does not change), and packages with a self-test command are
//! refused when they are added (a million shell processes is not a simulation; use a socket
//! transport for those).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use crate::agent::core::InstallResult;
use crate::install::machine::{Action, Event, InstallMachine, RetryPolicy};
use crate::install::{InstallOutcome, InstallState};
use crate::notice::UpdateNotice;
use crate::package::{self, PackageError, Release};

/// Packages in memory; one value serves a whole in-process fleet. The maps are written only
/// while a scenario publishes (rarely) and read by every install.
#[derive(Debug, Default)]
pub struct MemoryPackages {
    files: RwLock<HashMap<String, Arc<[u8]>>>,
    latest: RwLock<Option<Release>>,
}

impl MemoryPackages {
    /// No packages yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Offers `bytes` as the package file `file` (a path relative to the server root). Refuses
    /// a package that is not one (no valid manifest) or that has a self-test.
    pub fn add(&self, file: &str, bytes: Vec<u8>) -> Result<(), PackageError> {
        let manifest = package::manifest_in_archive(&bytes)?;
        if let Some(cmd) = manifest.self_test {
            return Err(PackageError::Manifest(format!(
                "{file} has a self-test (`{cmd}`): in-process devices do not run self-tests; use the mqtt transport"
            )));
        }
        let mut files = self.files.write().unwrap_or_else(|p| p.into_inner());
        files.insert(file.trim_start_matches('/').to_string(), bytes.into());
        Ok(())
    }

    /// Names `release` in `latest.json`.
    pub fn set_latest(&self, release: Release) {
        *self.latest.write().unwrap_or_else(|p| p.into_inner()) = Some(release);
    }

    /// What `latest.json` names, as a notice.
    pub fn latest(&self) -> Result<UpdateNotice, String> {
        let latest = self.latest.read().unwrap_or_else(|p| p.into_inner());
        match &*latest {
            Some(r) => Ok(UpdateNotice::for_release(r, "in-process")),
            None => Err(format!("550 {} not found", package::LATEST_FILE)),
        }
    }

    fn file(&self, name: &str) -> Option<Arc<[u8]>> {
        self.files.read().unwrap_or_else(|p| p.into_inner()).get(name.trim_start_matches('/')).cloned()
    }

    /// Installs `notice` on a device whose active version is `current`, calling `progress` once
    /// per state entered (`downloading`, `verifying`, `installing`). `seed` drives the machine's
    /// jitter (unused here: waits end at once).
    pub fn install(
        &self,
        notice: &UpdateNotice,
        current: Option<&str>,
        seed: u64,
        mut progress: impl FnMut(InstallState),
    ) -> InstallResult {
        let release = notice.to_release();
        let mut machine =
            InstallMachine::new(release.clone(), current.map(str::to_string), RetryPolicy::default(), seed);
        let mut pending: std::collections::VecDeque<Action> = machine.start().into();
        let mut download: Option<Arc<[u8]>> = None;
        let mut last = None;
        while let Some(action) = pending.pop_front() {
            let event = match action {
                Action::Report { state, .. } => {
                    if !state.is_final() && last != Some(state) {
                        last = Some(state);
                        progress(state);
                    }
                    continue;
                }
                Action::Done(state) => {
                    let outcome = InstallOutcome {
                        state,
                        version: release.version.clone(),
                        reason: machine.reason().map(str::to_string),
                        download_attempts: machine.attempts(),
                    };
                    return InstallResult::from(&outcome);
                }
                Action::Download { .. } => match self.file(&release.file) {
                    Some(bytes) => {
                        let n = bytes.len() as u64;
                        download = Some(bytes);
                        Event::Downloaded { bytes: n }
                    }
                    None => Event::DownloadFailed {
                        bytes: 0,
                        error: format!("550 {}: no such file on the package server", release.file),
                    },
                },
                Action::Wait(_) => Event::WaitOver,
                Action::Verify => {
                    let bytes = download.as_deref().unwrap_or_default();
                    Event::Verified { size: bytes.len() as u64, sha256: package::hex(&Sha256::digest(bytes)) }
                }
                Action::DiscardDownload => {
                    download = None;
                    Event::Cleaned
                }
                Action::Unpack => Event::Unpacked(
                    package::manifest_in_archive(download.as_deref().unwrap_or_default())
                        .map_err(|e| e.to_string()),
                ),
                Action::SelfTest(cmd) => {
                    Event::SelfTested(Err(format!("`{cmd}`: in-process devices do not run self-tests")))
                }
                Action::Switch => {
                    download = None;
                    Event::Switched(Ok(()))
                }
                Action::Rollback => Event::RolledBack(Ok(())),
            };
            pending.extend(machine.on(event));
        }
        InstallResult::Failed("the install state machine stopped without an outcome".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::{Manifest, build_package};

    fn built(version: &str, self_test: Option<&str>) -> (Vec<u8>, Release) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("firmware.bin"), version.repeat(100)).unwrap();
        let m =
            Manifest { name: "app".into(), version: version.into(), self_test: self_test.map(Into::into) };
        let (_, path, release) = build_package(&src, Some(&m), &tmp.path().join("out")).unwrap();
        (std::fs::read(path).unwrap(), release)
    }

    #[test]
    fn installs_verify_the_bytes_and_report_each_state() {
        let packages = MemoryPackages::new();
        let (bytes, release) = built("2.0.0", None);
        packages.add(&release.file, bytes).unwrap();
        let notice = UpdateNotice::for_release(&release, "127.0.0.1:2121");
        let mut seen = Vec::new();
        let r = packages.install(&notice, Some("1.0.0"), 1, |s| seen.push(s));
        assert_eq!(r, InstallResult::Installed);
        assert_eq!(seen, [InstallState::Downloading, InstallState::Verifying, InstallState::Installing]);
        assert_eq!(packages.install(&notice, Some("2.0.0"), 1, |_| {}), InstallResult::AlreadyInstalled);
        let mut wrong = notice.clone();
        wrong.sha256 = "0".repeat(64);
        assert!(
            matches!(packages.install(&wrong, Some("1.0.0"), 1, |_| {}), InstallResult::Failed(r) if r.contains("sha256"))
        );
        let mut missing = notice.clone();
        missing.url = "ftp://h/nothing.tar.gz".into();
        assert!(matches!(packages.install(&missing, None, 1, |_| {}), InstallResult::Failed(_)));
    }

    #[test]
    fn latest_and_refusals() {
        let packages = MemoryPackages::new();
        assert!(packages.latest().is_err());
        let (bytes, release) = built("3.0.0", Some("true"));
        assert!(packages.add(&release.file, bytes).unwrap_err().to_string().contains("self-test"));
        assert!(packages.add("x.tar.gz", b"junk".to_vec()).is_err());
        packages.set_latest(release.clone());
        assert_eq!(packages.latest().unwrap().version, "3.0.0");
    }
}
