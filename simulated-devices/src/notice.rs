//! What the fleet's agents and the release command say to each other: the update notice a C2D
//! message carries, how an agent reads any C2D body, the install states it reports, and the
//! telemetry event each state transition becomes.

use serde::{Deserialize, Serialize};

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

/// The `installState` an agent reports (twin reported property and telemetry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstallState {
    /// Fetching the package.
    Downloading,
    /// Checking size and SHA-256.
    Verifying,
    /// Unpacking, running the self-test, switching `current`.
    Installing,
    /// The new version is active.
    Installed,
    /// A check failed before anything was switched; the previous version stays active.
    Failed,
    /// The new version was switched in, then failed its self-test and was switched back.
    RolledBack,
    /// The notice named the version already active: nothing was done.
    AlreadyInstalled,
}

impl InstallState {
    /// The wire name (`already-installed`, …).
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

    /// True for states that end an install attempt.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Installed | Self::Failed | Self::RolledBack | Self::AlreadyInstalled)
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
    fn states_use_the_documented_names() {
        let names: Vec<_> = [
            InstallState::Downloading,
            InstallState::Verifying,
            InstallState::Installing,
            InstallState::Installed,
            InstallState::Failed,
            InstallState::RolledBack,
            InstallState::AlreadyInstalled,
        ]
        .iter()
        .map(|s| {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            s.as_str()
        })
        .collect();
        assert_eq!(
            names,
            [
                "downloading",
                "verifying",
                "installing",
                "installed",
                "failed",
                "rolled-back",
                "already-installed"
            ]
        );
    }
}
