//! The FTP side of the installer (suppaftp, async on tokio): one session per attempt, with a
//! timeout on every step (connect, greeting, login, each command, each read of the data
//! connection), binary mode, and `REST` to resume a partial download. With a TLS configuration
//! the session upgrades to explicit FTPS (`AUTH TLS`, `PROT P`) before logging in, so the SAS
//! token never crosses the wire in clear.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use suppaftp::tokio::{AsyncRustlsConnector, AsyncRustlsFtpStream as AsyncFtpStream};
use suppaftp::types::FileType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sas;

/// Largest `latest.json` read.
const LATEST_MAX_BYTES: usize = 64 * 1024;
/// Lifetime of the SAS token made for each login.
const TOKEN_LIFETIME_SECS: u64 = 3600;

/// How a device logs in to the package server.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// Sign a fresh token per login with the device's key (base64), for `hostname`.
    Key {
        /// The hub's host name (the token's audience).
        hostname: String,
        /// The device key.
        key: String,
    },
    /// Use this token as is.
    Token(String),
}

/// Where packages come from.
#[derive(Debug, Clone)]
pub struct FtpSource {
    /// `host:port` of the FTP server.
    pub addr: String,
    /// The device id (the FTP user).
    pub device_id: String,
    /// The password source.
    pub credentials: Credentials,
    /// Timeout of every FTP step.
    pub step_timeout: Duration,
    /// Explicit FTPS: the TLS client settings (see [`tls_trusting`]) and the name the server's
    /// certificate must carry. `None`: plain FTP.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

/// A TLS client configuration trusting only the CA in `ca_pem` (the hub's `ca.pem`).
pub fn tls_trusting(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the CA PEM cannot be read: {e}"))?;
        roots.add(cert).map_err(|e| format!("the CA certificate is not usable: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the CA PEM holds no certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Why one FTP attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {message}")]
pub struct FtpError {
    /// The step that failed (`connect`, `login`, `RETR app.tar.gz`, …).
    pub step: String,
    /// What went wrong (the server's reply for refusals).
    pub message: String,
}

async fn step<T, E: std::fmt::Display>(
    name: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, FtpError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(FtpError { step: name.to_string(), message: e.to_string() }),
        Err(_) => Err(FtpError { step: name.to_string(), message: format!("timed out after {timeout:?}") }),
    }
}

impl FtpSource {
    fn password(&self) -> Result<String, FtpError> {
        match &self.credentials {
            Credentials::Token(t) => Ok(t.clone()),
            Credentials::Key { hostname, key } => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                sas::device_token(hostname, &self.device_id, key, now + TOKEN_LIFETIME_SECS)
                    .map_err(|e| FtpError { step: "login".into(), message: e.to_string() })
            }
        }
    }

    /// Connects, logs in and switches to binary mode.
    async fn session(&self) -> Result<AsyncFtpStream, FtpError> {
        let t = self.step_timeout;
        let mut ftp = step("connect", t, AsyncFtpStream::connect(self.addr.as_str())).await?;
        if let Some((config, server_name)) = &self.tls {
            let connector = AsyncRustlsConnector::from(tokio_rustls::TlsConnector::from(config.clone()));
            ftp = step("AUTH TLS", t, ftp.into_secure(connector, server_name)).await?;
        }
        let password = self.password()?;
        step("login", t, ftp.login(self.device_id.as_str(), password.as_str())).await?;
        step("TYPE I", t, ftp.transfer_type(FileType::Binary)).await?;
        Ok(ftp)
    }

    /// Reads `latest.json` from the server root.
    pub async fn fetch_text(&self, remote: &str) -> Result<Vec<u8>, FtpError> {
        let t = self.step_timeout;
        let mut ftp = self.session().await?;
        let retr = format!("RETR {remote}");
        let mut stream = step(&retr, t, ftp.retr_as_stream(remote)).await?;
        let mut body = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = step(&retr, t, stream.read(&mut buf)).await?;
            if n == 0 {
                break;
            }
            if body.len() + n > LATEST_MAX_BYTES {
                return Err(FtpError {
                    step: retr,
                    message: format!("larger than {LATEST_MAX_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&buf[..n]);
        }
        step(&retr, t, stream.finish()).await?;
        let _ = step("QUIT", t, ftp.quit()).await;
        Ok(body)
    }

    /// Downloads `remote` into `dest`, keeping its first `resume_from` bytes (the file is
    /// truncated to that length) and asking the server to restart there. Returns the file's size
    /// afterwards; on failure the error comes with the size reached, which the next attempt keeps.
    pub async fn download(
        &self,
        remote: &str,
        dest: &Path,
        resume_from: u64,
    ) -> Result<u64, (u64, FtpError)> {
        self.download_until(remote, dest, resume_from, std::future::pending()).await
    }

    /// Like [`FtpSource::download`], but when `cut` resolves first the attempt stops there,
    /// closing its FTP connections (a dropped link), and fails with the size reached.
    pub async fn download_until(
        &self,
        remote: &str,
        dest: &Path,
        resume_from: u64,
        cut: impl Future<Output = ()>,
    ) -> Result<u64, (u64, FtpError)> {
        let io = |e: std::io::Error| FtpError {
            step: format!("writing {}", dest.display()),
            message: e.to_string(),
        };
        let mut file =
            match tokio::fs::OpenOptions::new().create(true).write(true).truncate(false).open(dest).await {
                Ok(f) => f,
                Err(e) => return Err((0, io(e))),
            };
        if let Err(e) = file.set_len(resume_from).await {
            return Err((0, io(e)));
        }
        let mut written = resume_from;
        let result = tokio::select! {
            r = self.download_into(remote, &mut file, &mut written) => r,
            () = cut => Err(FtpError {
                step: format!("RETR {remote}"),
                message: "the network link dropped".into(),
            }),
        };
        let flushed = file.flush().await.and(file.sync_data().await).map_err(io);
        match (result, flushed) {
            (Ok(()), Ok(())) => Ok(written),
            (Err(e), _) | (Ok(()), Err(e)) => Err((written, e)),
        }
    }

    async fn download_into(
        &self,
        remote: &str,
        file: &mut tokio::fs::File,
        written: &mut u64,
    ) -> Result<(), FtpError> {
        use tokio::io::AsyncSeekExt;
        let t = self.step_timeout;
        let mut ftp = self.session().await?;
        if *written > 0 {
            step("REST", t, ftp.resume_transfer(*written as usize)).await?;
        }
        file.seek(std::io::SeekFrom::Start(*written))
            .await
            .map_err(|e| FtpError { step: "seek".into(), message: e.to_string() })?;
        let retr = format!("RETR {remote}");
        let mut stream = step(&retr, t, ftp.retr_as_stream(remote)).await?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = step(&retr, t, stream.read(&mut buf)).await?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])
                .await
                .map_err(|e| FtpError { step: "write".into(), message: e.to_string() })?;
            *written += n as u64;
        }
        // The completion reply tells a complete transfer from one the server cut short.
        step(&retr, t, stream.finish()).await?;
        let _ = step("QUIT", t, ftp.quit()).await;
        Ok(())
    }
}
