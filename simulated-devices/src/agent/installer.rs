//! The seam between the agent and the on-disk installer: the agent decides *what* to install and
//! reports; an [`InstallBackend`] does the work in the device's data directory (download, verify,
//! unpack, switch) and says which version is active.

use std::future::Future;
use std::path::PathBuf;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use super::core::InstallResult;
use crate::notice::{InstallState, UpdateNotice};

/// Who is installing: the device and where its files live.
#[derive(Debug, Clone)]
pub struct DeviceContext {
    /// The device id (also the FTP user name).
    pub device_id: String,
    /// The device's data directory (`releases/`, `current`, downloads).
    pub data_dir: PathBuf,
    /// The device's SAS token (the FTP password).
    pub sas_token: String,
    /// Changes each time the device's link drops with its FTP connections: a running download
    /// closes them and retries (resuming with `REST`).
    pub ftp_cuts: watch::Receiver<u32>,
}

/// Installs packages for one device at a time. One value serves the whole fleet.
pub trait InstallBackend: Send + Sync + 'static {
    /// The version active in `data_dir`, if any.
    fn current_version(&self, device: &DeviceContext) -> Option<String>;

    /// Reads `latest.json` from the package server.
    fn fetch_latest(
        &self,
        device: &DeviceContext,
    ) -> impl Future<Output = Result<UpdateNotice, String>> + Send;

    /// Installs `notice`, sending `downloading`, `verifying` and `installing` on `progress` as it
    /// enters them. Cancel-safe: dropping the future (a power cut) leaves the previous version
    /// active.
    fn install(
        &self,
        device: &DeviceContext,
        notice: &UpdateNotice,
        progress: UnboundedSender<InstallState>,
    ) -> impl Future<Output = InstallResult> + Send;
}
