//! The release pipeline step after the package is on the FTP server: list every device (a query,
//! paged past 1,000, optionally filtered), send each an update notice with `iothub-ack: full`,
//! collect delivery feedback until every message is final or a timeout passes, and optionally
//! wait until the twins report the new `appVersion`. It owns only the bookkeeping of one run.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::amqp_client::{AmqpEndpoint, AmqpService, TOKEN_RENEWAL, TokenSource};
use crate::notice::UpdateNotice;
use crate::service_client::{C2dSend, FeedbackRecord, ServiceClient, ServiceError};

/// How a release run behaves.
#[derive(Debug, Clone)]
pub struct ReleaseOptions {
    /// A `WHERE` condition selecting the devices (all when `None`).
    pub where_clause: Option<String>,
    /// How long to collect feedback (and, with `wait_installed`, to wait for twins).
    pub timeout: Duration,
    /// C2D sends in flight at once.
    pub send_concurrency: usize,
    /// Pause between feedback polls when none is waiting.
    pub poll_interval: Duration,
    /// Also wait until every targeted twin reports `appVersion` = the released version.
    pub wait_installed: bool,
    /// Send the notices and read feedback over AMQP at this endpoint (what a pipeline's service
    /// SDK does); `None` uses the REST extension and HTTP feedback.
    pub amqp: Option<AmqpEndpoint>,
}

impl Default for ReleaseOptions {
    fn default() -> Self {
        Self {
            where_clause: None,
            timeout: Duration::from_secs(300),
            send_concurrency: 32,
            poll_interval: Duration::from_millis(500),
            wait_installed: false,
            amqp: None,
        }
    }
}

/// What happened to a release's notices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseSummary {
    /// The version released.
    pub version: String,
    /// Devices the query selected.
    pub targeted: usize,
    /// Notices the hub accepted.
    pub sent: usize,
    /// Notices the hub refused (queue full, device gone, …).
    pub send_failed: usize,
    /// Feedback `Success`: the device took the notice.
    pub completed: usize,
    /// Feedback `Expired`.
    pub expired: usize,
    /// Feedback `Rejected`.
    pub rejected: usize,
    /// Feedback `DeliveryCountExceeded` or `Purged`.
    pub dead_lettered: usize,
    /// Sent notices with no final feedback when the run ended.
    pub not_final: usize,
    /// Milliseconds from the first send to the last final feedback.
    pub last_feedback_ms: Option<u64>,
    /// With `wait_installed`: devices whose twin reports the version.
    pub installed: Option<usize>,
    /// With `wait_installed`: milliseconds from the first send until every twin reported it (or
    /// the run ended).
    pub last_install_ms: Option<u64>,
}

impl fmt::Display for ReleaseSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "release {}: targeted {}, sent {}, send failed {}, completed {}, expired {}, rejected {}, dead-lettered {}, not yet final {}",
            self.version,
            self.targeted,
            self.sent,
            self.send_failed,
            self.completed,
            self.expired,
            self.rejected,
            self.dead_lettered,
            self.not_final
        )?;
        if let Some(ms) = self.last_feedback_ms {
            write!(f, "; last feedback after {:.1} s", ms as f64 / 1000.0)?;
        }
        if let Some(n) = self.installed {
            write!(f, "; installed {n}/{}", self.targeted)?;
        }
        if let Some(ms) = self.last_install_ms {
            write!(f, " (last install after {:.1} s)", ms as f64 / 1000.0)?;
        }
        Ok(())
    }
}

/// The protocol notices and feedback go through.
#[derive(Debug, Clone)]
enum Via {
    Rest(ServiceClient),
    Amqp(AmqpService),
}

impl Via {
    async fn send(&self, device_id: &str, msg: &C2dSend) -> Result<(), ServiceError> {
        match self {
            Self::Rest(s) => s.send_c2d(device_id, msg).await,
            Self::Amqp(a) => Ok(a.send_c2d(device_id, msg).await?),
        }
    }

    /// The next feedback batch, already completed; `None` after waiting up to `wait` for one.
    async fn feedback(&self, wait: Duration) -> Result<Option<Vec<FeedbackRecord>>, ServiceError> {
        match self {
            Self::Rest(s) => match s.receive_feedback().await? {
                Some(batch) => {
                    s.complete_feedback(&batch.lock_token).await?;
                    Ok(Some(batch.records))
                }
                None => {
                    tokio::time::sleep(wait).await;
                    Ok(None)
                }
            },
            Self::Amqp(a) => Ok(a.receive_feedback(wait).await?),
        }
    }
}

/// Sends `notice` to every selected device and collects the outcome.
pub async fn notify_devices(
    service: &ServiceClient,
    notice: &UpdateNotice,
    opts: &ReleaseOptions,
) -> Result<ReleaseSummary, ServiceError> {
    let ids = service.device_ids(opts.where_clause.as_deref()).await?;
    let mut summary =
        ReleaseSummary { version: notice.version.clone(), targeted: ids.len(), ..Default::default() };
    let body = serde_json::to_vec(notice)
        .map_err(|e| ServiceError::Protocol { op: "notice", reason: e.to_string() })?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let via = match &opts.amqp {
        Some(endpoint) => {
            // Renewed like a service SDK's token, so a release longer than an hour keeps sending.
            let source: TokenSource = {
                let service = service.clone();
                Arc::new(move || service.token().map_err(|e| e.to_string()))
            };
            Via::Amqp(
                AmqpService::connect_renewing(endpoint, service.hub_host(), source, TOKEN_RENEWAL).await?,
            )
        }
        None => Via::Rest(service.clone()),
    };
    let started = Instant::now();

    // message id -> final yet?
    let mut outstanding: HashMap<String, bool> = HashMap::with_capacity(ids.len());
    let sem = Arc::new(Semaphore::new(opts.send_concurrency.max(1)));
    let mut sends = tokio::task::JoinSet::new();
    for id in &ids {
        let msg = C2dSend {
            body: body.clone(),
            message_id: format!("release-{}-{run}-{id}", notice.version),
            ack: "full",
            content_type: Some("application/json".into()),
            expiry_ms: None,
        };
        let (via, id, permit) = (via.clone(), id.clone(), sem.clone().acquire_owned().await);
        sends.spawn(async move {
            let _permit = permit;
            let r = via.send(&id, &msg).await;
            (id, msg.message_id, r)
        });
    }
    while let Some(joined) = sends.join_next().await {
        match joined {
            Ok((_, message_id, Ok(()))) => {
                summary.sent += 1;
                outstanding.insert(message_id, false);
            }
            Ok((id, _, Err(e))) => {
                summary.send_failed += 1;
                tracing::warn!(device = %id, "update notice not sent: {e}");
            }
            Err(e) => {
                summary.send_failed += 1;
                tracing::warn!("a send task failed: {e}");
            }
        }
    }

    let deadline = started + opts.timeout;
    let installs = async {
        match opts.wait_installed {
            true => {
                wait_installed(service, &notice.version, ids.len(), opts, deadline, started).await.map(Some)
            }
            false => Ok(None),
        }
    };
    let (feedback, installs) = tokio::join!(
        collect_feedback(&via, &mut outstanding, &mut summary, opts, deadline, started),
        installs
    );
    feedback?;
    if let Some((installed, at)) = installs? {
        summary.installed = Some(installed);
        summary.last_install_ms = at;
    }
    Ok(summary)
}

/// Receives feedback until every message in `outstanding` is final or `deadline`, counting the
/// outcomes into `summary` (every batch received is completed).
async fn collect_feedback(
    via: &Via,
    outstanding: &mut HashMap<String, bool>,
    summary: &mut ReleaseSummary,
    opts: &ReleaseOptions,
    deadline: Instant,
    started: Instant,
) -> Result<(), ServiceError> {
    let mut finals = 0;
    while finals < outstanding.len() && Instant::now() < deadline {
        let wait = opts.poll_interval.min(deadline.saturating_duration_since(Instant::now()));
        let Some(records) = via.feedback(wait).await? else { continue };
        for rec in &records {
            let Some(done) = outstanding.get_mut(&rec.original_message_id) else { continue };
            if *done {
                continue;
            }
            *done = true;
            finals += 1;
            summary.last_feedback_ms = Some(started.elapsed().as_millis() as u64);
            match rec.status_code.as_str() {
                "Success" => summary.completed += 1,
                "Expired" => summary.expired += 1,
                "Rejected" => summary.rejected += 1,
                _ => summary.dead_lettered += 1,
            }
        }
    }
    summary.not_final = outstanding.len() - finals;
    Ok(())
}

/// Polls the twins until `expected` devices report `appVersion` = `version` with a final
/// `installState`, or `deadline`.
/// Returns the count and, if all reported, the time it took.
async fn wait_installed(
    service: &ServiceClient,
    version: &str,
    expected: usize,
    opts: &ReleaseOptions,
    deadline: Instant,
    started: Instant,
) -> Result<(usize, Option<u64>), ServiceError> {
    let mut cond = format!(
        "properties.reported.appVersion = '{}' AND properties.reported.installState IN ['installed', 'already-installed']",
        version.replace('\'', "''")
    );
    if let Some(w) = opts.where_clause.as_deref().filter(|w| !w.trim().is_empty()) {
        cond = format!("({w}) AND {cond}");
    }
    loop {
        let n = service.device_ids(Some(&cond)).await?.len();
        if n >= expected {
            return Ok((n, Some(started.elapsed().as_millis() as u64)));
        }
        if Instant::now() >= deadline {
            return Ok((n, None));
        }
        tokio::time::sleep(opts.poll_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_every_outcome() {
        let s = ReleaseSummary {
            version: "2.0.0".into(),
            targeted: 3,
            sent: 3,
            completed: 2,
            not_final: 1,
            ..Default::default()
        };
        let text = s.to_string();
        for word in ["sent 3", "completed 2", "expired 0", "rejected 0", "dead-lettered 0", "not yet final 1"]
        {
            assert!(text.contains(word), "{text}");
        }
    }
}
