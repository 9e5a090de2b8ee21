//! The agent's decisions, without sockets or disks (sans-IO, like rumqttc's `MqttState`): it is
//! fed events (connected, a C2D body, `latest.json` read, an install progressed or finished) and
//! answers with [`Action`]s for the driver to carry out.
//!
//! It owns the agent's small state: the active version, the last reported state, whether an
//! install is running, and at most one command waiting behind it (a newer command replaces an
//! older waiting one, so a burst of notices costs one install).
//!
//! Update retries: when an install fails (the download ran out of retries, or the package did not
//! verify) the agent remembers that an update is due ([`AgentCore::retry_due`], one flag). It then
//! checks `latest.json` again when its MQTT session is re-established (if
//! [`AgentCore::with_retry_on_reconnect`] is on) and on every [`AgentCore::on_check`] (a periodic or
//! requested check), and installs what it names unless that version is already active. Such a
//! check is silent: it reports nothing unless it starts an install, which reports every state
//! like a notice-driven one. A rolled-back release (it installed but failed its self-test) is not
//! retried on reconnect: the package itself is bad, and only a new notice or check moves on.
//! A notice for the version an install is already working on (a check found it first) is
//! answered by that install rather than queued, and a notice that arrives after a check already
//! installed its version (it was held up by a dropped link) is answered by that `installed`
//! report, so both orders end `installed`, not `already-installed`. A notice for a version a
//! notice installed still reports `already-installed`.

use iothub_emulator::clock::{Millis, iso8601};
use serde_json::json;

use super::contract;
use crate::notice::{Command, InstallState, TransitionEvent, UpdateNotice};

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish `payload` on `topic` (QoS 0 for twin patches, QoS 1 for telemetry).
    Publish {
        /// The MQTT topic.
        topic: String,
        /// The body.
        payload: Vec<u8>,
        /// True for QoS 1.
        at_least_once: bool,
    },
    /// Read `latest.json` from the package server, then call [`AgentCore::on_latest`].
    FetchLatest,
    /// Install this package, then call [`AgentCore::on_install_done`].
    Install(UpdateNotice),
}

/// How an install attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallResult {
    /// The version is active.
    Installed,
    /// A check failed before the switch; the previous version stays active.
    Failed(String),
    /// The version was switched in, failed its self-test and was switched back.
    RolledBack(String),
    /// The installer found the version already active (the core's idea of the active version
    /// was stale).
    AlreadyInstalled,
}

impl From<&crate::install::InstallOutcome> for InstallResult {
    fn from(o: &crate::install::InstallOutcome) -> Self {
        let reason = || o.reason.clone().unwrap_or_else(|| "no reason given".into());
        match o.state {
            InstallState::Installed => Self::Installed,
            InstallState::AlreadyInstalled => Self::AlreadyInstalled,
            InstallState::RolledBack => Self::RolledBack(reason()),
            _ => Self::Failed(reason()),
        }
    }
}

/// One agent's state machine.
#[derive(Debug)]
pub struct AgentCore {
    device_id: String,
    /// The active application version (`None`: nothing installed yet).
    app_version: Option<String>,
    /// The last state reported (re-reported on every connect).
    install_state: Option<InstallState>,
    /// The version being installed, while an install or a `latest.json` fetch runs.
    busy: Option<Option<String>>,
    /// The running `latest.json` fetch is a background check, not a command: it reports nothing
    /// unless it finds a version to install.
    checking: bool,
    /// The last install of a newer version failed: check `latest.json` again (see the module
    /// documentation).
    retry_due: bool,
    /// Check again when the MQTT session is re-established while a retry is due.
    retry_on_reconnect: bool,
    /// The running install was started by a check, not by a notice.
    install_by_check: bool,
    /// The active version was installed by a check and no notice named it since: the
    /// `installed` report answers the notice that comes late for it.
    installed_by_check: bool,
    /// The command to run once the current one finishes.
    waiting: Option<Command>,
    next_rid: u64,
    /// How many installs completed (`installed`) since start: the fleet's exactly-once check.
    pub installs: u32,
}

impl AgentCore {
    /// A core for `device_id` with `app_version` active.
    pub fn new(device_id: String, app_version: Option<String>) -> Self {
        Self {
            device_id,
            app_version,
            install_state: None,
            busy: None,
            checking: false,
            retry_due: false,
            retry_on_reconnect: false,
            install_by_check: false,
            installed_by_check: false,
            waiting: None,
            next_rid: 1,
            installs: 0,
        }
    }

    /// Checks `latest.json` again on every connect while [`Self::retry_due`] (off by default).
    pub fn with_retry_on_reconnect(mut self, on: bool) -> Self {
        self.retry_on_reconnect = on;
        self
    }

    /// Starts with a retry due (the agent's previous session ended with a failed install).
    pub fn with_retry_due(mut self, due: bool) -> Self {
        self.retry_due = due;
        self
    }

    /// The last install of a newer version failed and no later check or install succeeded.
    pub fn retry_due(&self) -> bool {
        self.retry_due
    }

    /// The active version.
    pub fn app_version(&self) -> Option<&str> {
        self.app_version.as_deref()
    }

    /// The last reported state.
    pub fn install_state(&self) -> Option<InstallState> {
        self.install_state
    }

    /// True while an install (or the fetch before it) runs.
    pub fn is_busy(&self) -> bool {
        self.busy.is_some()
    }

    /// The MQTT session is up: report the current state (a power cut may have lost the last
    /// report, and twin patches are QoS 0), and check `latest.json` again if an install failed
    /// and retries on reconnect are on.
    pub fn on_connected(&mut self) -> Vec<Action> {
        let mut out = vec![self.twin_patch()];
        if self.retry_on_reconnect && self.retry_due {
            out.extend(self.on_check());
        }
        out
    }

    /// A periodic or requested update check: reads `latest.json` (silently) unless an install or
    /// a read is already running, which covers it.
    pub fn on_check(&mut self) -> Vec<Action> {
        if self.busy.is_some() {
            return Vec::new();
        }
        self.busy = Some(None);
        self.checking = true;
        vec![Action::FetchLatest]
    }

    /// A C2D message arrived.
    pub fn on_c2d(&mut self, body: &[u8], now: Millis) -> Vec<Action> {
        let cmd = Command::from_c2d_body(body);
        if let Some(running) = &self.busy {
            // A notice for the version being installed is served by that install (started by an
            // update check, say), whichever of the two came first: its outcome is the answer.
            let covered = matches!((&cmd, running), (Command::Install(n), Some(v)) if n.version == *v);
            if covered {
                // This notice is answered by the running install: a later one is not.
                self.install_by_check = false;
            } else {
                self.waiting = Some(cmd);
            }
            return Vec::new();
        }
        self.start(cmd, now)
    }

    /// A desired-properties patch announced an update (`notice`: its JSON): the desired state.
    /// Nothing to do when that version is already active (a desired state is met silently, unlike
    /// a C2D notice, which is answered with `already-installed`); otherwise handled as a notice.
    pub fn on_desired(&mut self, notice: &[u8], now: Millis) -> Vec<Action> {
        let version = serde_json::from_slice::<UpdateNotice>(notice).ok().map(|n| n.version);
        if version.is_some() && version.as_deref() == self.app_version.as_deref() {
            return Vec::new();
        }
        self.on_c2d(notice, now)
    }

    fn start(&mut self, cmd: Command, now: Millis) -> Vec<Action> {
        match cmd {
            Command::CheckLatest => {
                self.busy = Some(None);
                vec![Action::FetchLatest]
            }
            Command::Install(notice) => self.consider(notice, now),
        }
    }

    /// Installs `notice` unless its version is already active.
    fn consider(&mut self, notice: UpdateNotice, now: Millis) -> Vec<Action> {
        if self.app_version.as_deref() == Some(notice.version.as_str()) {
            self.busy = None;
            if std::mem::take(&mut self.installed_by_check) {
                // A check installed it first (the notice came late, say behind a dropped link):
                // that install's `installed` is this notice's answer.
                return self.next(now);
            }
            let mut out = self.transition(InstallState::AlreadyInstalled, Some(notice.version), None, now);
            out.extend(self.next(now));
            return out;
        }
        self.busy = Some(Some(notice.version.clone()));
        vec![Action::Install(notice)]
    }

    /// `latest.json` was read (or could not be: `Err(reason)`).
    pub fn on_latest(&mut self, latest: Result<UpdateNotice, String>, now: Millis) -> Vec<Action> {
        if std::mem::take(&mut self.checking) {
            // A background check: only a version to install is worth a report.
            return match latest {
                Ok(notice) if self.app_version.as_deref() != Some(notice.version.as_str()) => {
                    let out = self.consider(notice, now);
                    self.install_by_check = true;
                    out
                }
                Ok(_) => {
                    self.busy = None;
                    self.retry_due = false;
                    self.next(now)
                }
                Err(reason) => {
                    tracing::debug!(device = %self.device_id, "update check failed: {reason}");
                    self.busy = None;
                    self.next(now)
                }
            };
        }
        match latest {
            Ok(notice) => self.consider(notice, now),
            Err(reason) => {
                self.busy = None;
                self.retry_due = true;
                let mut out = self.transition(InstallState::Failed, None, Some(reason), now);
                out.extend(self.next(now));
                out
            }
        }
    }

    /// The installer entered `state` (`downloading`, `verifying`, `installing`).
    pub fn on_progress(&mut self, state: InstallState, now: Millis) -> Vec<Action> {
        let target = self.busy.clone().flatten();
        self.transition(state, target, None, now)
    }

    /// The running install ended.
    pub fn on_install_done(&mut self, outcome: InstallResult, now: Millis) -> Vec<Action> {
        let target = self.busy.take().flatten();
        let by_check = std::mem::take(&mut self.install_by_check);
        self.installed_by_check = by_check && outcome == InstallResult::Installed;
        let mut out = match outcome {
            InstallResult::Installed => {
                self.retry_due = false;
                self.app_version = target.clone();
                self.installs += 1;
                self.transition(InstallState::Installed, target, None, now)
            }
            InstallResult::Failed(r) => {
                self.retry_due = true;
                self.transition(InstallState::Failed, target, Some(r), now)
            }
            InstallResult::RolledBack(r) => {
                self.retry_due = false;
                self.transition(InstallState::RolledBack, target, Some(r), now)
            }
            InstallResult::AlreadyInstalled => {
                self.retry_due = false;
                self.app_version = target.clone();
                self.transition(InstallState::AlreadyInstalled, target, None, now)
            }
        };
        out.extend(self.next(now));
        out
    }

    fn next(&mut self, now: Millis) -> Vec<Action> {
        match self.waiting.take() {
            Some(cmd) => self.start(cmd, now),
            None => Vec::new(),
        }
    }

    /// Records `state` and reports it: a twin patch and a telemetry event.
    fn transition(
        &mut self,
        state: InstallState,
        target_version: Option<String>,
        reason: Option<String>,
        now: Millis,
    ) -> Vec<Action> {
        self.install_state = Some(state);
        let event = TransitionEvent {
            event: "installState".into(),
            device_id: self.device_id.clone(),
            install_state: state,
            target_version,
            app_version: self.app_version.clone(),
            reason,
            timestamp: iso8601(now),
        };
        let telemetry = Action::Publish {
            topic: contract::telemetry_topic(&self.device_id),
            payload: serde_json::to_vec(&event).unwrap_or_default(),
            at_least_once: true,
        };
        vec![self.twin_patch(), telemetry]
    }

    fn twin_patch(&mut self) -> Action {
        let rid = self.next_rid;
        self.next_rid += 1;
        let patch = json!({
            "appVersion": self.app_version,
            "installState": self.install_state.map(InstallState::as_str),
        });
        Action::Publish {
            topic: contract::twin_patch_topic(rid),
            payload: patch.to_string().into_bytes(),
            at_least_once: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn notice(v: &str) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"version": v, "url": format!("ftp://h/app-{v}.tar.gz"), "sha256": "00", "size": 1}),
        )
        .unwrap()
    }

    /// The twin patches and telemetry states in `actions`.
    fn reports(actions: &[Action]) -> (Vec<Value>, Vec<String>) {
        let (mut twin, mut events) = (Vec::new(), Vec::new());
        for a in actions {
            if let Action::Publish { topic, payload, .. } = a {
                let v: Value = serde_json::from_slice(payload).unwrap();
                if topic.starts_with("$iothub/twin/PATCH/properties/reported/?$rid=") {
                    twin.push(v);
                } else {
                    assert!(topic.starts_with("devices/d1/messages/events/"), "{topic}");
                    assert_eq!(v["timestamp"], "1970-01-01T00:00:01.000Z");
                    events.push(v["installState"].as_str().unwrap().to_string());
                }
            }
        }
        (twin, events)
    }

    #[test]
    fn a_notice_installs_and_reports_every_transition() {
        let mut a = AgentCore::new("d1".into(), Some("1.0.0".into()));
        let out = a.on_c2d(&notice("2.0.0"), 1000);
        assert!(matches!(&out[..], [Action::Install(n)] if n.version == "2.0.0"));
        let mut all = Vec::new();
        for s in [InstallState::Downloading, InstallState::Verifying, InstallState::Installing] {
            all.extend(a.on_progress(s, 1000));
        }
        all.extend(a.on_install_done(InstallResult::Installed, 1000));
        let (twin, events) = reports(&all);
        assert_eq!(events, ["downloading", "verifying", "installing", "installed"]);
        assert_eq!(twin.last().unwrap(), &json!({"appVersion": "2.0.0", "installState": "installed"}));
        assert_eq!((a.app_version(), a.installs, a.is_busy()), (Some("2.0.0"), 1, false));
    }

    #[test]
    fn a_desired_update_installs_once_and_is_silent_when_already_met() {
        let mut a = AgentCore::new("d1".into(), Some("1.0.0".into()));
        let out = a.on_desired(&notice("2.0.0"), 1000);
        assert!(matches!(&out[..], [Action::Install(n)] if n.version == "2.0.0"), "{out:?}");
        a.on_install_done(InstallResult::Installed, 1000);
        assert_eq!(a.app_version(), Some("2.0.0"));
        // The same desired state again (a later patch, a reconnect): nothing, not even a report.
        assert!(a.on_desired(&notice("2.0.0"), 2000).is_empty());
        // A C2D notice for the active version is still answered.
        let (_, events) = reports(&a.on_c2d(&notice("2.0.0"), 1000));
        assert_eq!(events, ["already-installed"]);
    }

    #[test]
    fn the_active_version_is_not_reinstalled() {
        let mut a = AgentCore::new("d1".into(), Some("2.0.0".into()));
        let out = a.on_c2d(&notice("2.0.0"), 1000);
        let (twin, events) = reports(&out);
        assert_eq!(events, ["already-installed"]);
        assert_eq!(twin[0], json!({"appVersion": "2.0.0", "installState": "already-installed"}));
        assert!(!out.iter().any(|a| matches!(a, Action::Install(_))));
        assert_eq!(a.installs, 0);
    }

    #[test]
    fn plain_text_reads_latest_first() {
        let mut a = AgentCore::new("d1".into(), Some("1.0.0".into()));
        assert_eq!(a.on_c2d(b"update!", 1000), [Action::FetchLatest]);
        assert!(a.is_busy());
        let n: UpdateNotice = serde_json::from_slice(&notice("1.0.0")).unwrap();
        let (_, events) = reports(&a.on_latest(Ok(n), 1000));
        assert_eq!(events, ["already-installed"]);
        assert_eq!(a.on_c2d(b"update!", 1000), [Action::FetchLatest]);
        let (_, events) = reports(&a.on_latest(Err("no latest.json".into()), 1000));
        assert_eq!(events, ["failed"]);
        assert!(!a.is_busy());
    }

    #[test]
    fn commands_during_an_install_coalesce_to_the_newest() {
        let mut a = AgentCore::new("d1".into(), None);
        assert_eq!(a.on_c2d(&notice("2.0.0"), 1000).len(), 1);
        assert!(a.on_c2d(&notice("2.0.0"), 1000).is_empty());
        assert!(a.on_c2d(&notice("3.0.0"), 1000).is_empty());
        let out = a.on_install_done(InstallResult::Installed, 1000);
        assert!(matches!(out.last(), Some(Action::Install(n)) if n.version == "3.0.0"), "{out:?}");
    }

    #[test]
    fn a_failed_check_keeps_the_old_version_and_says_why() {
        let mut a = AgentCore::new("d1".into(), Some("1.0.0".into()));
        a.on_c2d(&notice("2.0.0"), 1000);
        let out = a.on_install_done(InstallResult::Failed("sha256 mismatch".into()), 1000);
        let (twin, events) = reports(&out);
        assert_eq!(events, ["failed"]);
        assert_eq!(twin[0], json!({"appVersion": "1.0.0", "installState": "failed"}));
        let Action::Publish { payload, .. } = &out[1] else { panic!() };
        let v: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(
            (v["reason"].as_str(), v["targetVersion"].as_str()),
            (Some("sha256 mismatch"), Some("2.0.0"))
        );
    }

    fn notice_of(v: &str) -> UpdateNotice {
        serde_json::from_slice(&notice(v)).unwrap()
    }

    #[test]
    fn a_failed_install_is_retried_from_latest_on_reconnect() {
        let mut a = AgentCore::new("d1".into(), Some("1.0.0".into())).with_retry_on_reconnect(true);
        assert_eq!(a.on_connected().len(), 1, "nothing to retry yet");
        a.on_c2d(&notice("2.0.0"), 1000);
        a.on_install_done(InstallResult::Failed("download failed after 8 attempts".into()), 1000);
        assert!(a.retry_due());
        let out = a.on_connected();
        assert_eq!(out.last(), Some(&Action::FetchLatest), "{out:?}");
        // latest.json names the version that failed: install it, reporting like the first time.
        let out = a.on_latest(Ok(notice_of("2.0.0")), 1000);
        assert!(matches!(&out[..], [Action::Install(n)] if n.version == "2.0.0"), "{out:?}");
        let (_, events) = reports(&a.on_progress(InstallState::Downloading, 1000));
        assert_eq!(events, ["downloading"]);
        let (_, events) = reports(&a.on_install_done(InstallResult::Installed, 1000));
        assert_eq!(events, ["installed"]);
        assert!(!a.retry_due());
        assert_eq!((a.app_version(), a.installs), (Some("2.0.0"), 1));
        assert_eq!(a.on_connected().len(), 1, "no retry once installed");
    }

    #[test]
    fn checks_are_silent_unless_they_install_and_never_reinstall_the_active_version() {
        let mut a = AgentCore::new("d1".into(), Some("2.0.0".into()));
        assert_eq!(a.on_check(), [Action::FetchLatest]);
        assert!(a.on_check().is_empty(), "one check at a time");
        assert!(a.on_latest(Ok(notice_of("2.0.0")), 1000).is_empty(), "already on it: no report");
        assert!(!a.is_busy());
        a.on_check();
        assert!(a.on_latest(Err("530 refused".into()), 1000).is_empty(), "a failed check is silent");
        assert!(!a.retry_due(), "a check that could not read latest.json is not an install failure");
        // Retries on reconnect are off by default.
        a.on_c2d(&notice("3.0.0"), 1000);
        a.on_install_done(InstallResult::Failed("x".into()), 1000);
        assert_eq!(a.on_connected().len(), 1);
        // A check while an install runs is covered by it.
        a.on_c2d(&notice("3.0.0"), 1000);
        assert!(a.on_check().is_empty());
        a.on_install_done(InstallResult::RolledBack("self-test".into()), 1000);
        assert!(!a.retry_due(), "a release that rolled back is not retried on reconnect");
        // A notice for the version a check is installing is served by that install.
        a.on_check();
        a.on_latest(Ok(notice_of("4.0.0")), 1000);
        assert!(a.on_c2d(&notice("4.0.0"), 1000).is_empty());
        let (_, events) = reports(&a.on_install_done(InstallResult::Installed, 1000));
        assert_eq!(events, ["installed"], "no already-installed after it");
        // A notice arriving after a check installed its version is answered by that install...
        a.on_check();
        a.on_latest(Ok(notice_of("5.0.0")), 1000);
        a.on_install_done(InstallResult::Installed, 1000);
        assert!(a.on_c2d(&notice("5.0.0"), 1000).is_empty(), "no already-installed");
        // ...once: the same notice again reports as usual.
        let (_, events) = reports(&a.on_c2d(&notice("5.0.0"), 1000));
        assert_eq!(events, ["already-installed"]);
        // A notice arriving during a check waits for it.
        a.on_check();
        assert!(a.on_c2d(&notice("3.0.0"), 1000).is_empty());
        let out = a.on_latest(Ok(notice_of("5.0.0")), 1000);
        assert!(matches!(&out[..], [Action::Install(n)] if n.version == "3.0.0"), "{out:?}");
    }

    #[test]
    fn every_connect_re_reports_the_state() {
        let mut a = AgentCore::new("d1".into(), Some("1.0.0".into()));
        let (twin, events) = reports(&a.on_connected());
        assert_eq!((twin.len(), events.len()), (1, 0));
        assert_eq!(twin[0]["appVersion"], "1.0.0");
    }
}
