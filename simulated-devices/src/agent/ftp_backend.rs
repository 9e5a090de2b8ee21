//! The agent's real install backend: [`crate::install::Installer`] downloading from the hub's FTP
//! package server, logged in as the device (user = device id, password = its SAS token).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::core::InstallResult;
use super::installer::{DeviceContext, InstallBackend};
use crate::install::{Credentials, FtpSource, InstallState, Installer, RetryPolicy};
use crate::notice::UpdateNotice;

/// Installs from an FTP server; one value serves every agent of a fleet.
#[derive(Debug, Clone)]
pub struct FtpBackend {
    /// `host:port` of the package server, for `latest.json` and for notices whose URL is a bare
    /// path.
    pub ftp_addr: String,
    /// Timeout of every FTP step.
    pub step_timeout: Duration,
    /// How failed downloads are retried.
    pub retry: RetryPolicy,
    /// Explicit FTPS (TLS settings and the name on the server's certificate); `None`: plain FTP.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

impl FtpBackend {
    /// A backend for the package server at `ftp_addr` with the installer's default retries.
    pub fn new(ftp_addr: impl Into<String>) -> Self {
        Self {
            ftp_addr: ftp_addr.into(),
            step_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            tls: None,
        }
    }

    fn installer(&self, device: &DeviceContext, addr: &str) -> Installer {
        let source = FtpSource {
            addr: addr.to_string(),
            device_id: device.device_id.clone(),
            credentials: Credentials::Token(device.sas_token.clone()),
            step_timeout: self.step_timeout,
            tls: self.tls.clone(),
        };
        Installer::new(device.data_dir.clone(), source)
            .with_retry(self.retry)
            .with_link_cuts(device.ftp_cuts.clone())
    }
}

impl InstallBackend for FtpBackend {
    fn current_version(&self, device: &DeviceContext) -> Option<String> {
        self.installer(device, &self.ftp_addr).current_version()
    }

    async fn fetch_latest(&self, device: &DeviceContext) -> Result<UpdateNotice, String> {
        let release = self.installer(device, &self.ftp_addr).latest().await.map_err(|e| e.to_string())?;
        Ok(UpdateNotice::for_release(&release, &self.ftp_addr))
    }

    async fn install(
        &self,
        device: &DeviceContext,
        notice: &UpdateNotice,
        progress: UnboundedSender<InstallState>,
    ) -> InstallResult {
        let addr = notice.location().0.unwrap_or_else(|| self.ftp_addr.clone());
        let installer = self.installer(device, &addr);
        let mut last = None;
        let outcome = installer
            .install(&notice.to_release(), |report| {
                // Final states are the agent's to report; intermediate ones once per entry.
                if !report.state.is_final() && last != Some(report.state) {
                    last = Some(report.state);
                    let _ = progress.send(report.state);
                }
            })
            .await;
        InstallResult::from(&outcome)
    }
}
