//! The FTP server's view of the packages directory: libunftp's filesystem back end, read-only for
//! devices (uploads, deletes and renames answer `550`), with the fault knobs applied to every
//! download (keyed by the session's user, see [`super::auth::SessionState`]). Packages are put in
//! place by the release tooling on the local disk, never over FTP.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use unftp_core::auth::DefaultUser;
use unftp_core::storage::{Error, ErrorKind, Fileinfo, Result, StorageBackend};
use unftp_sbe_fs::{Filesystem, Meta};

use super::auth::SessionState;
use super::faults::FtpFaults;

/// The packages directory as devices see it.
#[derive(Debug)]
pub struct PackageStorage {
    /// The directory, or why it could not be opened (every operation then answers with it).
    inner: std::result::Result<Filesystem, String>,
    faults: Arc<FtpFaults>,
    /// The session this back end serves (whose user the download faults count).
    session: Arc<SessionState>,
}

impl PackageStorage {
    /// Serves `root` to `session` with `faults` applied to downloads. libunftp makes one back end per session
    /// and cannot take an error here, so a directory that vanished at run time is reported on each
    /// operation (`451`) instead.
    pub fn new(root: &Path, faults: Arc<FtpFaults>, session: Arc<SessionState>) -> Self {
        let inner = Filesystem::new(root).map_err(|e| {
            tracing::error!(dir = %root.display(), "cannot open the FTP packages directory: {e}");
            format!("the packages directory {} cannot be opened: {e}", root.display())
        });
        Self { inner, faults, session }
    }

    fn fs(&self) -> Result<&Filesystem> {
        self.inner.as_ref().map_err(|e| Error::new(ErrorKind::LocalError, e.clone()))
    }
}

fn read_only() -> Error {
    Error::from(ErrorKind::PermissionDenied)
}

#[async_trait]
impl StorageBackend<DefaultUser> for PackageStorage {
    type Metadata = Meta;

    fn name(&self) -> &str {
        "iothub-emulator packages (read-only)"
    }

    fn supported_features(&self) -> u32 {
        self.fs().map_or(0, StorageBackend::<DefaultUser>::supported_features)
    }

    async fn metadata<P: AsRef<Path> + Send + Debug>(&self, user: &DefaultUser, path: P) -> Result<Meta> {
        self.fs()?.metadata(user, path).await
    }

    async fn list<P>(&self, user: &DefaultUser, path: P) -> Result<Vec<Fileinfo<PathBuf, Meta>>>
    where
        P: AsRef<Path> + Send + Debug,
    {
        self.fs()?.list(user, path).await
    }

    async fn get<P: AsRef<Path> + Send + Debug>(
        &self,
        user: &DefaultUser,
        path: P,
        start_pos: u64,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>> {
        let reader = self.fs()?.get(user, path, start_pos).await?;
        Ok(self.faults.wrap_download(self.session.user_key(), reader))
    }

    async fn put<P: AsRef<Path> + Send + Debug, R: tokio::io::AsyncRead + Send + Sync + Unpin + 'static>(
        &self,
        _user: &DefaultUser,
        _input: R,
        _path: P,
        _start_pos: u64,
    ) -> Result<u64> {
        Err(read_only())
    }

    async fn del<P: AsRef<Path> + Send + Debug>(&self, _user: &DefaultUser, _path: P) -> Result<()> {
        Err(read_only())
    }

    async fn mkd<P: AsRef<Path> + Send + Debug>(&self, _user: &DefaultUser, _path: P) -> Result<()> {
        Err(read_only())
    }

    async fn rename<P: AsRef<Path> + Send + Debug>(
        &self,
        _user: &DefaultUser,
        _from: P,
        _to: P,
    ) -> Result<()> {
        Err(read_only())
    }

    async fn rmd<P: AsRef<Path> + Send + Debug>(&self, _user: &DefaultUser, _path: P) -> Result<()> {
        Err(read_only())
    }

    async fn cwd<P: AsRef<Path> + Send + Debug>(&self, user: &DefaultUser, path: P) -> Result<()> {
        self.fs()?.cwd(user, path).await
    }
}
