//! What the fleet's agents and the release command say to each other: the update notice a C2D
//! message carries, how an agent reads any C2D body, the install states it reports, and the
//! telemetry event each state transition becomes.

use serde::{Deserialize, Serialize};

pub use crate::install::InstallState;
use crate::package::Release;

/// An update notice: the JSON body of a C2D message naming one package. `latest.json` on the FTP
/// server has the same fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateNotice {
    /// The application version the package installs.
    pub version: String,
    /// Where to download it: `ftp://host:port/path` (or a path relative to the FTP root).
    pub url: String,
    /// The package's SHA-256, lowercase hex.
    pub sha256: String,
    /// The package's size in bytes.
    pub size: u64,
    /// The application's name (optional; taken from the file name when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl UpdateNotice {
    /// The notice for `release` as served by the FTP server at `ftp_addr` (`host:port`).
    pub fn for_release(release: &Release, ftp_addr: &str) -> Self {
        Self {
            version: release.version.clone(),
            url: format!("ftp://{ftp_addr}/{}", release.file.trim_start_matches('/')),
            sha256: release.sha256.clone(),
            size: release.size,
            name: Some(release.name.clone()),
        }
    }

    /// Where the package is: the server (`host:port`, port 21 if the URL has none; `None` for
    /// a URL that is only a path) and the path on it.
    pub fn location(&self) -> (Option<String>, String) {
        let Some(rest) = self.url.strip_prefix("ftp://").or_else(|| self.url.strip_prefix("ftps://")) else {
            return (None, self.url.trim_start_matches('/').to_string());
        };
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        let addr = if host.contains(':') { host.to_string() } else { format!("{host}:21") };
        (Some(addr), path.to_string())
    }

    /// The release the installer fetches and checks.
    pub fn to_release(&self) -> Release {
        let (_, file) = self.location();
        let name = self.name.clone().unwrap_or_else(|| {
            let base = file.rsplit('/').next().unwrap_or(&file);
            let stem = base.strip_suffix(".tar.gz").unwrap_or(base);
            let suffix = format!("-{}", self.version);
            stem.strip_suffix(&suffix).unwrap_or(stem).to_string()
        });
        Release { name, version: self.version.clone(), file, sha256: self.sha256.clone(), size: self.size }
    }
}

/// What a C2D message asks an agent to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Install the package the notice names.
    Install(UpdateNotice),
    /// Any other body (the seed sends plain text): read `latest.json` and install that.
    CheckLatest,
}

impl Command {
    /// Reads a C2D body: a JSON update notice, or anything else (plain text, other JSON, empty) as
    /// "check the server's latest".
    pub fn from_c2d_body(body: &[u8]) -> Self {
        match serde_json::from_slice::<UpdateNotice>(body) {
            Ok(n) if !n.version.is_empty() => Self::Install(n),
            _ => Self::CheckLatest,
        }
    }
}

/// One state transition, sent as D2C telemetry (JSON) by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransitionEvent {
    /// Always `"installState"`, so consumers can tell these events from other telemetry.
    pub event: String,
    /// The device.
    pub device_id: String,
    /// The new state.
    pub install_state: InstallState,
    /// The version the attempt is about.
    pub target_version: Option<String>,
    /// The version active after the transition.
    pub app_version: Option<String>,
    /// Why, for `failed` and `rolled-back`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When, ISO 8601 UTC with milliseconds.
    pub timestamp: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_notice_is_an_install_command() {
        let body = br#"{"version":"2.0.0","url":"ftp://h:21/app-2.0.0.tar.gz","sha256":"ab","size":10}"#;
        let Command::Install(n) = Command::from_c2d_body(body) else { panic!("not an install") };
        assert_eq!((n.version.as_str(), n.size), ("2.0.0", 10));
    }

    #[test]
    fn notices_and_releases_convert_both_ways() {
        let r = Release {
            name: "app".into(),
            version: "2.0.0".into(),
            file: "app-2.0.0.tar.gz".into(),
            sha256: "ab".into(),
            size: 7,
        };
        let n = UpdateNotice::for_release(&r, "127.0.0.1:2121");
        assert_eq!(n.url, "ftp://127.0.0.1:2121/app-2.0.0.tar.gz");
        assert_eq!(n.location(), (Some("127.0.0.1:2121".into()), "app-2.0.0.tar.gz".into()));
        assert_eq!(n.to_release(), r);
        let relative = UpdateNotice { url: "/pkgs/app-2.0.0.tar.gz".into(), ..n.clone() };
        assert_eq!(relative.location(), (None, "pkgs/app-2.0.0.tar.gz".into()));
        let bare = UpdateNotice { url: "ftp://pkg.local/app-2.0.0.tar.gz".into(), name: None, ..n };
        assert_eq!(bare.location().0.as_deref(), Some("pkg.local:21"));
        assert_eq!(bare.to_release(), r);
    }

    #[test]
    fn anything_else_checks_latest() {
        for body in [
            &b"new firmware available"[..],
            b"",
            b"{\"hello\":1}",
            b"{\"version\":\"\",\"url\":\"\",\"sha256\":\"\",\"size\":0}",
        ] {
            assert_eq!(Command::from_c2d_body(body), Command::CheckLatest, "{body:?}");
        }
    }

    #[test]
    fn states_serialize_with_their_wire_names() {
        for s in [InstallState::Downloading, InstallState::RolledBack, InstallState::AlreadyInstalled] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
