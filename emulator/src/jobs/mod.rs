//! Scheduled jobs (reference §2.10): twin updates and direct methods across the devices a WHERE
//! clause selects, at a start time, with progress statistics, cancel and a jobs query.
//!
//! Ownership: [`Jobs`] lives inside the hub's shared state and is the one owner of every job. Its
//! one `std::sync::Mutex` guards the sans-IO [`JobTable`](model::JobTable) (all job state) plus each
//! unfinished job's cancellation token. Critical sections are short and synchronous; no lock is held
//! across an `.await`, and the jobs lock is never held together with a registry shard lock.
//!
//! Execution: ONE Tokio task per unfinished job, never one per device. The task sleeps until the
//! start time (one timer per job), then walks the matching devices through the query engine
//! (`SELECT deviceId FROM devices WHERE …`, [`JOBS_DEVICE_PAGE`] ids at a time), applying twin
//! patches through [`Hub::update_twin`] (the `PATCH /twins/{id}` path, so connected devices get
//! desired-property notifications) or invoking methods through [`Hub::invoke_method`] (the `POST
//! /twins/{id}/methods` path) with at most [`JOBS_METHOD_CONCURRENCY`] calls in flight, polled
//! inside the same task. Cancel, `maxExecutionTimeInSeconds` and the hub's shutdown stop it. With a
//! tier configured, each device's operation waits for its turn at the tier's jobs per-device rate.

pub mod model;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorCode, HubError};
use crate::hub::Hub;
use crate::limits::{JOBS_DEVICE_PAGE, JOBS_HISTORY_MAX, JOBS_MAX_ACTIVE, JOBS_METHOD_CONCURRENCY};
use crate::throttle::Op;
use model::{JobAction, JobRequest, JobStatus, JobTable, JobType, JobsPage, device_query};

/// The hub's jobs: the table and the tokens that stop their tasks.
#[derive(Debug)]
pub struct Jobs {
    state: Mutex<State>,
    /// Parent of every job's token; cancelled when the hub shuts down.
    shutdown: CancellationToken,
}

#[derive(Debug)]
struct State {
    table: JobTable,
    /// One token per unfinished job, removed when its task ends.
    tokens: std::collections::HashMap<String, CancellationToken>,
}

impl Default for Jobs {
    fn default() -> Self {
        Self::new(JOBS_MAX_ACTIVE, JOBS_HISTORY_MAX)
    }
}

impl Jobs {
    /// No jobs yet; at most `max_active` unfinished and `max_history` finished ones kept.
    pub fn new(max_active: usize, max_history: usize) -> Self {
        Self {
            state: Mutex::new(State {
                table: JobTable::new(max_active, max_history),
                tokens: Default::default(),
            }),
            shutdown: CancellationToken::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the job table under the jobs lock (the durable hub's recovery and snapshots).
    pub(crate) fn with_table<T>(&self, f: impl FnOnce(&mut JobTable) -> T) -> T {
        f(&mut self.lock().table)
    }
}

/// How a job's device walk ended.
enum Outcome {
    /// Every matching device was processed.
    Done,
    /// The walk could not go on.
    Failed(String),
}

impl Hub {
    /// `PUT /jobs/v2/{id}`: validates and accepts a job, starts its task and returns its
    /// `JobResponse` (status `scheduled` or `queued`). Must be called inside a Tokio runtime.
    pub fn create_job(&self, id: &str, body: &Value) -> Result<Value, HubError> {
        let request = JobRequest::parse(id, body)?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| HubError::new(ErrorCode::ServerError, "jobs need a Tokio runtime to run in"))?;
        let now = self.now();
        let jobs = self.jobs();
        let token = jobs.shutdown.child_token();
        let json = {
            let mut state = jobs.lock();
            let json = state.table.create(request, now)?.to_json();
            if self.is_persistent() {
                let stored = state.table.update(id, |j| {
                    j.body = Some(body.clone());
                    j.stored()
                })?;
                self.record_job(id, &stored);
            }
            state.tokens.insert(id.to_string(), token.clone());
            json
        };
        tracing::info!(job = id, "job accepted");
        runtime.spawn(run(self.clone(), id.to_string(), token));
        Ok(json)
    }

    /// `GET /jobs/v2/{id}`.
    pub fn get_job(&self, id: &str) -> Result<Value, HubError> {
        Ok(self.jobs().lock().table.get(id)?.to_json())
    }

    /// `POST /jobs/v2/{id}/cancel`: a scheduled, queued or running job becomes `cancelled` and
    /// its task stops; a finished job is returned as it ended.
    pub fn cancel_job(&self, id: &str) -> Result<Value, HubError> {
        let now = self.now();
        let (json, token) = {
            let mut state = self.jobs().lock();
            let json = state.table.cancel(id, now)?;
            if self.is_persistent()
                && let Ok(stored) = state.table.get(id).map(model::Job::stored)
            {
                self.record_job(id, &stored);
            }
            (json, state.tokens.remove(id))
        };
        if let Some(t) = token {
            t.cancel();
        }
        Ok(json)
    }

    /// `GET /jobs/v2/query?jobType=&jobStatus=`: one page of jobs in creation order.
    pub fn query_jobs(
        &self,
        job_type: Option<&str>,
        job_status: Option<&str>,
        continuation: Option<&str>,
        page_size: usize,
    ) -> Result<JobsPage, HubError> {
        let job_type =
            job_type.filter(|s| !s.is_empty()).map(|t| JobType::parse("jobType", t)).transpose()?;
        let status = job_status.filter(|s| !s.is_empty()).map(JobStatus::parse).transpose()?;
        self.jobs().lock().table.query(job_type, status, continuation, page_size)
    }

    /// Jobs per status and the `latest` newest jobs' `JobResponse`s (see [`JobTable::summary`]).
    pub fn jobs_summary(&self, latest: usize) -> (Vec<(&'static str, usize)>, Vec<Value>) {
        self.jobs().lock().table.summary(latest)
    }

    /// Stops every job task (the hub is shutting down). Unfinished jobs end as `failed`.
    pub fn shutdown_jobs(&self) {
        self.jobs().shutdown.cancel();
    }

    /// Runs `f` on job `id` under the jobs lock; `None` if the job is gone.
    fn with_job<T>(&self, id: &str, f: impl FnOnce(&mut model::Job) -> T) -> Option<T> {
        let mut state = self.jobs().lock();
        let persist = self.is_persistent();
        // With --persist a job is stored when it is created, starts and ends (not per device).
        let before = persist.then(|| state.table.get(id).map(|j| j.status).ok()).flatten();
        let out = state.table.update(id, f).ok();
        if let Some(before) = before
            && let Ok(job) = state.table.get(id)
            && job.status != before
        {
            self.record_job(id, &job.stored());
        }
        out
    }
}

/// The task of job `id`: wait for the start time, run, record how it ended.
async fn run(hub: Hub, id: String, token: CancellationToken) {
    let outcome = tokio::select! {
        o = drive(&hub, &id) => o,
        _ = token.cancelled() => None,
    };
    let now = hub.now();
    hub.with_job(&id, |j| match outcome {
        Some(Outcome::Done) => {
            j.complete(now);
        }
        Some(Outcome::Failed(reason)) => {
            j.fail(now, reason);
        }
        // Cancelled through the API (already recorded) or the hub is shutting down.
        None => {
            j.fail(now, "the hub shut down before the job finished");
        }
    });
    hub.jobs().lock().tokens.remove(&id);
    tracing::info!(job = %id, "job ended");
}

/// Waits for the start time, starts the job and walks its devices until `maxExecutionTime`.
/// `None` if the job was cancelled before it started.
async fn drive(hub: &Hub, id: &str) -> Option<Outcome> {
    let due = hub.with_job(id, |j| j.due_at())?;
    hub.sleep_until(due).await;
    let now = hub.now();
    let (action, condition, deadline) = hub.with_job(id, |j| {
        j.begin(now).then(|| (j.request.action.clone(), j.request.query_condition.clone(), j.deadline()))
    })??;
    let budget = Duration::from_millis(deadline.unwrap_or(u64::MAX).saturating_sub(now));
    let out_of_time = async {
        match deadline {
            Some(at) => hub.sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        outcome = walk(hub, id, &action, &condition) => Some(outcome),
        () = out_of_time => Some(Outcome::Failed(format!(
            "maxExecutionTimeInSeconds ({} s) elapsed before every device was processed",
            budget.as_secs()
        ))),
    }
}

/// Applies `action` to every device matching `condition`, a page of ids at a time.
async fn walk(hub: &Hub, id: &str, action: &JobAction, condition: &str) -> Outcome {
    let text = device_query(condition);
    let mut continuation: Option<String> = None;
    let mut in_flight = FuturesUnordered::new();
    loop {
        let page = match hub.query(&text, continuation.as_deref(), Some(JOBS_DEVICE_PAGE)) {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(format!("the device query failed: {}", e.message)),
        };
        let ids: Vec<String> =
            page.items.iter().filter_map(|v| v.get("deviceId")?.as_str().map(str::to_string)).collect();
        hub.with_job(id, |j| j.discovered(ids.len() as u64));
        // Twin updates are synchronous: the page's outcome is recorded once, not twice per device
        // under the jobs lock.
        let (mut succeeded, mut failed) = (0, 0);
        for device in ids {
            // Tier throttling: jobs per-device operations are worked off at the tier's rate.
            hub.pace(Op::JobsDeviceOp, 1).await;
            match action {
                JobAction::UpdateTwin(patch) => match hub.update_twin(&device, patch, None, false) {
                    Ok(_) => succeeded += 1,
                    Err(e) => {
                        failed += 1;
                        tracing::debug!(job = id, device, "twin update failed: {e}");
                    }
                },
                JobAction::DeviceMethod(spec) => {
                    while in_flight.len() >= JOBS_METHOD_CONCURRENCY {
                        if let Some(ok) = in_flight.next().await {
                            hub.with_job(id, |j| j.device_finished(ok));
                        }
                    }
                    hub.with_job(id, |j| j.device_started());
                    let (hub, name, payload) =
                        (hub.clone(), spec.name.clone(), Bytes::from(spec.payload_bytes()));
                    let connect = Duration::from_secs(spec.connect_timeout_secs);
                    let response = Duration::from_secs(spec.response_timeout_secs);
                    in_flight.push(async move {
                        let r = hub.invoke_method(&device, &name, payload, connect, response).await;
                        if let Err(e) = &r {
                            tracing::debug!(device, "job method call failed: {e}");
                        }
                        r.is_ok()
                    });
                }
            }
        }
        if succeeded + failed > 0 {
            hub.with_job(id, |j| j.devices_done(succeeded, failed));
        }
        // A page of twin updates runs synchronously: let other tasks in between pages.
        tokio::task::yield_now().await;
        match page.continuation {
            Some(c) => continuation = Some(c),
            None => break,
        }
    }
    while let Some(ok) = in_flight.next().await {
        hub.with_job(id, |j| j.device_finished(ok));
    }
    Outcome::Done
}
