//! The FTP package store's path resolution. The emulator resolves no paths itself: it hands
//! client paths to `unftp-sbe-fs` (cap-std, which resolves inside an open directory handle), so
//! the target drives the public [`PackageStorage`] back end, on a real directory laid out as:
//!
//! ```text
//! <tmp>/secret.txt            "SECRET-OUTSIDE", must never be served
//! <tmp>/packages/fw/pkg.bin   a package
//! <tmp>/packages/escape       symlink to ../secret.txt
//! <tmp>/packages/abs          symlink to <tmp>/secret.txt (absolute)
//! ```
//!
//! Property: whatever the path, `get` never returns the secret's bytes and `list` never shows
//! `secret.txt` (which only the directory above the packages holds).

use std::sync::Arc;

use iothub_emulator::ftp::FtpFaults;
use iothub_emulator::ftp::auth::SessionState;
use iothub_emulator::ftp::storage::PackageStorage;
use tokio::io::AsyncReadExt;
use unftp_core::auth::DefaultUser;
use unftp_core::storage::StorageBackend;

use crate::alloc::untracked;
use crate::runner::{Check, Outcome, Target};

const SECRET: &[u8] = b"SECRET-OUTSIDE";

fn seeds() -> Vec<Vec<u8>> {
    [
        "/fw/pkg.bin",
        "fw/pkg.bin",
        "/",
        "fw",
        "../secret.txt",
        "/../secret.txt",
        "fw/../../secret.txt",
        "escape",
        "abs",
        "fw/./../escape",
        "//secret.txt",
        "..",
        "../",
        "./../packages/../secret.txt",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn check() -> Check {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let root = dir.path().to_path_buf();
    let packages = root.join("packages");
    std::fs::create_dir_all(packages.join("fw")).expect("create the packages dir");
    std::fs::write(packages.join("fw/pkg.bin"), b"PACKAGE").expect("write a package");
    std::fs::write(root.join("secret.txt"), SECRET).expect("write the secret");
    #[cfg(unix)]
    {
        let _ = std::os::unix::fs::symlink("../secret.txt", packages.join("escape"));
        let _ = std::os::unix::fs::symlink(root.join("secret.txt"), packages.join("abs"));
    }
    let storage =
        PackageStorage::new(&packages, Arc::new(FtpFaults::new()), Arc::new(SessionState::default()));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    Box::new(move |input| {
        let _keep = &dir;
        let path = untracked(|| String::from_utf8_lossy(input).into_owned());
        let user = DefaultUser;
        runtime.block_on(async {
            let mut served = false;
            if let Ok(mut reader) = storage.get(&user, path.as_str(), 0).await {
                let mut bytes = Vec::new();
                let _ = (&mut reader).take(1 << 16).read_to_end(&mut bytes).await;
                if bytes.windows(SECRET.len()).any(|w| w == SECRET) {
                    return Err(format!("GET {path:?} served a file outside the packages directory"));
                }
                served = true;
            }
            if let Ok(entries) = storage.list(&user, path.as_str()).await {
                if entries.iter().any(|e| e.path.file_name().is_some_and(|n| n == "secret.txt")) {
                    return Err(format!("LIST {path:?} listed the directory above the packages"));
                }
                served = true;
            }
            Ok(if served { Outcome::Accepted } else { Outcome::Rejected })
        })
    })
}

/// `ftp_path`: client paths against the package store.
pub const FTP_PATH: Target = Target {
    name: "ftp_path",
    about: "ftp::storage::PackageStorage get/list (unftp-sbe-fs, cap-std); nothing outside packages/ is served",
    seeds,
    dictionary: || {
        ["..", "/", "./", "../", "escape", "abs", "secret.txt", "fw", "\\", "%2e%2e", "\u{0}"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect()
    },
    max_len: 1024,
    alloc_k: 64,
    alloc_c: 256 * 1024,
    make: check,
};
