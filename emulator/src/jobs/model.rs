//! The sans-IO model of scheduled jobs (reference §2.10): what a `JobRequest` may say, one job's
//! state machine and device statistics, and the [`JobTable`] that holds every job the hub knows.
//!
//! Nothing here does I/O, spawns or sleeps: every transition takes `now` from the caller, so the
//! model is unit-tested without sockets or timers. The driver in `jobs/mod.rs` owns a table behind
//! one mutex and feeds it what its task observes.
//!
//! Life of a job: `scheduled` (start time in the future) or `queued` → `running` → `completed`,
//! `failed` (maxExecutionTime elapsed, the query broke, the hub shut down) or `cancelled`. Terminal
//! states are final; statistics keep counting what in-flight devices report.

use std::collections::{HashMap, VecDeque};
use std::ops::RangeInclusive;

use serde_json::{Map, Value, json};

use crate::clock::{Millis, iso8601, parse_iso8601};
use crate::error::{ErrorCode, HubError};
use crate::hub::{Section, Twin};
use crate::limits::{
    JOB_ID_MAX_CHARS, JOBS_DEFAULT_MAX_EXECUTION_SECS, METHOD_DEFAULT_RESPONSE_TIMEOUT_SECS,
    METHOD_MAX_CONNECT_TIMEOUT_SECS, METHOD_MAX_PAYLOAD_BYTES, METHOD_MAX_RESPONSE_TIMEOUT_SECS,
    METHOD_MIN_RESPONSE_TIMEOUT_SECS,
};
use crate::query::Query;

/// What a job does to each matching device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobType {
    /// `scheduleUpdateTwin`: patch tags and desired properties.
    UpdateTwin,
    /// `scheduleDeviceMethod`: invoke a direct method.
    DeviceMethod,
}

impl JobType {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Self::UpdateTwin => "scheduleUpdateTwin",
            Self::DeviceMethod => "scheduleDeviceMethod",
        }
    }

    /// Parses a wire name (`type`, or the query's `jobType`).
    pub fn parse(field: &str, s: &str) -> Result<Self, HubError> {
        match s {
            "scheduleUpdateTwin" => Ok(Self::UpdateTwin),
            "scheduleDeviceMethod" => Ok(Self::DeviceMethod),
            _ => Err(HubError::invalid(format!(
                "{field} '{s}' is not supported; use scheduleUpdateTwin or scheduleDeviceMethod \
                 (import/export jobs are not emulated)"
            ))),
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Waiting for a start time in the future.
    Scheduled,
    /// Due, waiting for its task to pick it up.
    Queued,
    /// Working through the matching devices.
    Running,
    /// Every matching device was processed (some may have failed).
    Completed,
    /// The job stopped before every device was processed; `failureReason` says why.
    Failed,
    /// Cancelled by `POST /jobs/v2/{id}/cancel`.
    Cancelled,
}

impl JobStatus {
    const ALL: [JobStatus; 6] =
        [Self::Scheduled, Self::Queued, Self::Running, Self::Completed, Self::Failed, Self::Cancelled];

    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses the query's `jobStatus` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self, HubError> {
        Self::ALL.into_iter().find(|st| st.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            HubError::invalid(format!(
                "jobStatus '{s}' is not valid; use scheduled, queued, running, completed, failed or cancelled"
            ))
        })
    }

    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// A direct-method invocation as `POST /twins/{id}/methods` and a method job's
/// `cloudToDeviceMethod` describe it, validated (reference §2.7).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodSpec {
    /// The method name.
    pub name: String,
    /// The payload (any JSON).
    pub payload: Value,
    /// Seconds to wait for the device's answer.
    pub response_timeout_secs: u64,
    /// Seconds to wait for the device to come online (0: it must be online already).
    pub connect_timeout_secs: u64,
}

impl MethodSpec {
    /// Validates a method body; errors name `prefix` + the field (`cloudToDeviceMethod.methodName`).
    pub fn from_json(body: &Value, prefix: &str) -> Result<Self, HubError> {
        let name =
            body.get("methodName").and_then(Value::as_str).filter(|n| !n.is_empty()).ok_or_else(|| {
                HubError::invalid(format!("{prefix}methodName is required (a non-empty string)"))
            })?;
        if let Some(bad) = name.chars().find(|c| !c.is_ascii_graphic() || "$()<>@,;:\\\"/[]?={}".contains(*c))
        {
            return Err(HubError::invalid(format!(
                "{prefix}methodName '{name}' contains {bad:?}, which IoT Hub does not allow"
            )));
        }
        let secs = |key: &str, default: u64, range: RangeInclusive<u64>| -> Result<u64, HubError> {
            match body.get(key).filter(|v| !v.is_null()) {
                None => Ok(default),
                Some(v) => v.as_u64().filter(|n| range.contains(n)).ok_or_else(|| {
                    HubError::invalid(format!(
                        "{prefix}{key} must be an integer from {} to {} seconds, not {v}",
                        range.start(),
                        range.end()
                    ))
                }),
            }
        };
        let response_timeout_secs = secs(
            "responseTimeoutInSeconds",
            METHOD_DEFAULT_RESPONSE_TIMEOUT_SECS,
            METHOD_MIN_RESPONSE_TIMEOUT_SECS..=METHOD_MAX_RESPONSE_TIMEOUT_SECS,
        )?;
        let connect_timeout_secs = secs("connectTimeoutInSeconds", 0, 0..=METHOD_MAX_CONNECT_TIMEOUT_SECS)?;
        let payload = body.get("payload").cloned().unwrap_or(Value::Null);
        let size = serde_json::to_vec(&payload).map(|v| v.len()).unwrap_or(0);
        if size > METHOD_MAX_PAYLOAD_BYTES {
            return Err(HubError::new(
                ErrorCode::MessageTooLarge,
                format!("the {prefix}payload is {size} bytes; at most {METHOD_MAX_PAYLOAD_BYTES}"),
            ));
        }
        Ok(Self { name: name.to_string(), payload, response_timeout_secs, connect_timeout_secs })
    }

    /// The payload as the JSON text a device receives.
    pub fn payload_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.payload).unwrap_or_default()
    }

    fn to_json(&self) -> Value {
        json!({
            "methodName": self.name,
            "payload": self.payload,
            "responseTimeoutInSeconds": self.response_timeout_secs,
            "connectTimeoutInSeconds": self.connect_timeout_secs,
        })
    }
}

/// What a job does, with its validated parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum JobAction {
    /// `updateTwin`: a twin patch with `tags` and/or `properties.desired`, applied like
    /// `PATCH /twins/{id}`.
    UpdateTwin(Value),
    /// `cloudToDeviceMethod`.
    DeviceMethod(MethodSpec),
}

impl JobAction {
    /// The job type this action belongs to.
    pub fn job_type(&self) -> JobType {
        match self {
            Self::UpdateTwin(_) => JobType::UpdateTwin,
            Self::DeviceMethod(_) => JobType::DeviceMethod,
        }
    }
}

/// A validated `JobRequest` (`PUT /jobs/v2/{jobId}`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest {
    /// The job id (from the path; a `jobId` in the body must match it).
    pub id: String,
    /// What to do on each device.
    pub action: JobAction,
    /// The WHERE clause selecting devices (without `WHERE`).
    pub query_condition: String,
    /// When to start; `None` means now.
    pub start_time: Option<Millis>,
    /// How long the job may run once started.
    pub max_execution_secs: u64,
}

/// Checks a job id: 1 to 128 characters of ASCII letters, digits and the punctuation device ids
/// allow.
pub fn validate_job_id(id: &str) -> Result<(), HubError> {
    const EXTRA: &str = "-.+%_#*?!(),=@$':";
    if id.is_empty() || id.chars().count() > JOB_ID_MAX_CHARS {
        return Err(HubError::invalid(format!(
            "jobId '{id}' must be 1 to {JOB_ID_MAX_CHARS} characters long"
        )));
    }
    if let Some(bad) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || EXTRA.contains(*c))) {
        return Err(HubError::invalid(format!(
            "jobId '{id}' contains {bad:?}; use ASCII letters, digits and {EXTRA}"
        )));
    }
    Ok(())
}

/// The query a job runs over the registry for `condition`.
pub fn device_query(condition: &str) -> String {
    format!("SELECT deviceId FROM devices WHERE {condition}")
}

impl JobRequest {
    /// Validates the body of `PUT /jobs/v2/{path_id}`. Every error is `400 ArgumentInvalid` naming
    /// the field and what is allowed.
    pub fn parse(path_id: &str, body: &Value) -> Result<Self, HubError> {
        validate_job_id(path_id)?;
        let body =
            body.as_object().ok_or_else(|| HubError::invalid("the job request must be a JSON object"))?;
        let field = |k: &str| body.get(k).filter(|v| !v.is_null());
        if let Some(id) = field("jobId")
            && id.as_str() != Some(path_id)
        {
            return Err(HubError::invalid(format!(
                "jobId {id} in the body does not match '{path_id}' in the path"
            )));
        }
        let ty = field("type").and_then(Value::as_str).ok_or_else(|| {
            HubError::invalid("type is required: scheduleUpdateTwin or scheduleDeviceMethod")
        })?;
        let action = match JobType::parse("type", ty)? {
            JobType::UpdateTwin => {
                let patch = field("updateTwin").ok_or_else(|| {
                    HubError::invalid("updateTwin is required for a scheduleUpdateTwin job")
                })?;
                JobAction::UpdateTwin(validate_twin_patch(patch)?)
            }
            JobType::DeviceMethod => {
                let m = field("cloudToDeviceMethod").ok_or_else(|| {
                    HubError::invalid("cloudToDeviceMethod is required for a scheduleDeviceMethod job")
                })?;
                JobAction::DeviceMethod(MethodSpec::from_json(m, "cloudToDeviceMethod.")?)
            }
        };
        let query_condition = field("queryCondition")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                HubError::invalid("queryCondition is required (a WHERE clause, e.g. tags.group = 'canary')")
            })?;
        Query::parse(&device_query(query_condition)).map_err(|e| {
            HubError::invalid(format!("queryCondition '{query_condition}' is not a valid WHERE clause: {e}"))
        })?;
        let start_time =
            match field("startTime") {
                None => None,
                Some(v) => Some(v.as_str().and_then(parse_iso8601).ok_or_else(|| {
                    HubError::invalid(format!("startTime {v} is not an ISO 8601 UTC time"))
                })?),
            };
        let max_execution_secs = match field("maxExecutionTimeInSeconds") {
            None => JOBS_DEFAULT_MAX_EXECUTION_SECS,
            Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
                HubError::invalid(format!("maxExecutionTimeInSeconds must be a positive integer, not {v}"))
            })?,
        };
        Ok(Self {
            id: path_id.to_string(),
            action,
            query_condition: query_condition.to_string(),
            start_time,
            max_execution_secs,
        })
    }
}

/// Checks an `updateTwin` against the twin rules once, so a bad patch fails the request instead of
/// every device. Returns the patch reduced to `tags` and `properties.desired`.
fn validate_twin_patch(patch: &Value) -> Result<Value, HubError> {
    if !patch.is_object() {
        return Err(HubError::invalid(
            "updateTwin must be a twin object with tags and/or properties.desired",
        ));
    }
    if patch.pointer("/properties/reported").is_some_and(|v| !v.is_null()) {
        return Err(HubError::invalid("updateTwin cannot set properties.reported; devices write those"));
    }
    let tags = patch.get("tags").filter(|v| !v.is_null());
    let desired = patch.pointer("/properties/desired").filter(|v| !v.is_null());
    if tags.is_none() && desired.is_none() {
        return Err(HubError::invalid("updateTwin must set tags and/or properties.desired"));
    }
    let mut probe = Twin::new(0);
    let mut out = Map::new();
    if let Some(t) = tags {
        probe
            .patch(Section::Tags, t, 0)
            .map_err(|e| HubError::invalid(format!("updateTwin: {}", e.message)))?;
        out.insert("tags".into(), t.clone());
    }
    if let Some(d) = desired {
        probe
            .patch(Section::Desired, d, 0)
            .map_err(|e| HubError::invalid(format!("updateTwin: {}", e.message)))?;
        out.insert("properties".into(), json!({ "desired": d }));
    }
    Ok(Value::Object(out))
}

/// `deviceJobStatistics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceJobStatistics {
    /// Devices the query matched so far.
    pub device_count: u64,
    /// Devices where the operation failed (offline for a method, refused patch, …).
    pub failed_count: u64,
    /// Devices where it succeeded.
    pub succeeded_count: u64,
    /// Devices being worked on.
    pub running_count: u64,
    /// Devices matched but not started.
    pub pending_count: u64,
}

/// One job: its request and where it is.
#[derive(Debug, Clone)]
pub struct Job {
    /// What was asked.
    pub request: JobRequest,
    /// When the hub accepted it.
    pub created: Millis,
    /// When it started running.
    pub started: Option<Millis>,
    /// When it ended.
    pub ended: Option<Millis>,
    /// Where it is.
    pub status: JobStatus,
    /// Why it failed.
    pub failure_reason: Option<String>,
    /// A human-readable note on how it ended.
    pub status_message: Option<String>,
    /// Per-device counts.
    pub stats: DeviceJobStatistics,
    /// The `PUT /jobs/v2/{id}` body it was made from (kept by `--persist` to rebuild the request).
    pub body: Option<Value>,
    /// Creation order, for the jobs query's order and continuation.
    seq: u64,
}

impl Job {
    /// A job accepted at `now`: `scheduled` when it starts later, `queued` when it is due.
    pub fn new(request: JobRequest, now: Millis) -> Self {
        let status = match request.start_time {
            Some(t) if t > now => JobStatus::Scheduled,
            _ => JobStatus::Queued,
        };
        Self {
            request,
            created: now,
            started: None,
            ended: None,
            status,
            failure_reason: None,
            status_message: None,
            stats: DeviceJobStatistics::default(),
            body: None,
            seq: 0,
        }
    }

    /// The job as `--persist` stores it: its request body and where it is.
    pub fn stored(&self) -> Value {
        let s = &self.stats;
        json!({
            "body": self.body,
            "created": self.created,
            "started": self.started,
            "ended": self.ended,
            "status": self.status.name(),
            "failureReason": self.failure_reason,
            "statusMessage": self.status_message,
            "stats": [s.device_count, s.failed_count, s.succeeded_count, s.running_count, s.pending_count],
            "seq": self.seq,
        })
    }

    /// Rebuilds job `id` from [`Job::stored`]'s JSON.
    pub fn from_stored(id: &str, v: &Value) -> Result<Self, HubError> {
        let bad = |what: &str| HubError::invalid(format!("stored job '{id}': {what}"));
        let body = v.get("body").filter(|b| !b.is_null()).ok_or_else(|| bad("no request body"))?;
        let request = JobRequest::parse(id, body)?;
        let num = |k: &str| v.get(k).and_then(Value::as_u64);
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let status =
            JobStatus::parse(v.get("status").and_then(Value::as_str).ok_or_else(|| bad("no status"))?)?;
        let stats: Vec<u64> = v
            .get("stats")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let stat = |i: usize| stats.get(i).copied().unwrap_or(0);
        Ok(Self {
            request,
            created: num("created").ok_or_else(|| bad("no created time"))?,
            started: num("started"),
            ended: num("ended"),
            status,
            failure_reason: text("failureReason"),
            status_message: text("statusMessage"),
            stats: DeviceJobStatistics {
                device_count: stat(0),
                failed_count: stat(1),
                succeeded_count: stat(2),
                running_count: stat(3),
                pending_count: stat(4),
            },
            body: Some(body.clone()),
            seq: num("seq").unwrap_or(0),
        })
    }

    /// When the job is due.
    pub fn due_at(&self) -> Millis {
        self.request.start_time.unwrap_or(self.created)
    }

    /// `scheduled`/`queued` → `running` at `now`. Returns false (changing nothing) when the job is
    /// not waiting any more (it was cancelled).
    pub fn begin(&mut self, now: Millis) -> bool {
        if !matches!(self.status, JobStatus::Scheduled | JobStatus::Queued) {
            return false;
        }
        self.status = JobStatus::Running;
        self.started = Some(now);
        true
    }

    /// When a running job has used up `maxExecutionTimeInSeconds`.
    pub fn deadline(&self) -> Option<Millis> {
        self.started.map(|s| s.saturating_add(self.request.max_execution_secs.saturating_mul(1000)))
    }

    /// The query found `n` more matching devices.
    pub fn discovered(&mut self, n: u64) {
        self.stats.device_count += n;
        self.stats.pending_count += n;
    }

    /// Work on one pending device began.
    pub fn device_started(&mut self) {
        self.stats.pending_count = self.stats.pending_count.saturating_sub(1);
        self.stats.running_count += 1;
    }

    /// Work on one running device ended.
    pub fn device_finished(&mut self, ok: bool) {
        self.stats.running_count = self.stats.running_count.saturating_sub(1);
        if ok {
            self.stats.succeeded_count += 1;
        } else {
            self.stats.failed_count += 1;
        }
    }

    /// `succeeded + failed` pending devices were processed in one go (a page of twin updates,
    /// applied synchronously, so nothing was ever seen running).
    pub fn devices_done(&mut self, succeeded: u64, failed: u64) {
        self.stats.pending_count = self.stats.pending_count.saturating_sub(succeeded + failed);
        self.stats.succeeded_count += succeeded;
        self.stats.failed_count += failed;
    }

    fn end(&mut self, status: JobStatus, now: Millis) -> bool {
        if self.status.is_terminal() {
            return false;
        }
        self.status = status;
        self.ended = Some(now);
        true
    }

    /// `running` → `completed`: every matching device was processed.
    pub fn complete(&mut self, now: Millis) -> bool {
        if self.status != JobStatus::Running {
            return false;
        }
        let s = self.stats;
        self.status_message = Some(format!(
            "{} of {} devices succeeded, {} failed",
            s.succeeded_count, s.device_count, s.failed_count
        ));
        self.end(JobStatus::Completed, now)
    }

    /// → `failed` with `reason`. Devices still in flight are abandoned and count as failed.
    pub fn fail(&mut self, now: Millis, reason: impl Into<String>) -> bool {
        if !self.end(JobStatus::Failed, now) {
            return false;
        }
        self.abandon_running();
        self.failure_reason = Some(reason.into());
        true
    }

    /// → `cancelled` unless the job has ended. Devices in flight are abandoned and count as failed;
    /// pending devices stay pending.
    pub fn cancel(&mut self, now: Millis) -> bool {
        if !self.end(JobStatus::Cancelled, now) {
            return false;
        }
        self.abandon_running();
        self.status_message = Some("cancelled".into());
        true
    }

    fn abandon_running(&mut self) {
        self.stats.failed_count += self.stats.running_count;
        self.stats.running_count = 0;
    }

    /// IoT Hub's `JobResponse` JSON.
    pub fn to_json(&self) -> Value {
        let r = &self.request;
        let mut out = json!({
            "jobId": r.id,
            "queryCondition": r.query_condition,
            "createdTime": iso8601(self.created),
            "startTime": iso8601(self.started.unwrap_or_else(|| self.due_at())),
            "maxExecutionTimeInSeconds": r.max_execution_secs,
            "type": r.action.job_type().name(),
            "status": self.status.name(),
            "deviceJobStatistics": {
                "deviceCount": self.stats.device_count,
                "failedCount": self.stats.failed_count,
                "succeededCount": self.stats.succeeded_count,
                "runningCount": self.stats.running_count,
                "pendingCount": self.stats.pending_count,
            },
        });
        let m = out.as_object_mut().expect("object literal");
        match &r.action {
            JobAction::UpdateTwin(patch) => m.insert("updateTwin".into(), patch.clone()),
            JobAction::DeviceMethod(spec) => m.insert("cloudToDeviceMethod".into(), spec.to_json()),
        };
        if let Some(end) = self.ended {
            m.insert("endTime".into(), Value::String(iso8601(end)));
        }
        if let Some(f) = &self.failure_reason {
            m.insert("failureReason".into(), Value::String(f.clone()));
        }
        if let Some(s) = &self.status_message {
            m.insert("statusMessage".into(), Value::String(s.clone()));
        }
        out
    }
}

/// One page of the jobs query.
#[derive(Debug, Clone, PartialEq)]
pub struct JobsPage {
    /// `JobResponse` objects in creation order.
    pub items: Vec<Value>,
    /// `x-ms-continuation` for the next page, while more remain.
    pub continuation: Option<String>,
}

/// Every job the hub knows: unfinished ones (at most `max_active`) and the most recent
/// `max_history` finished ones. The oldest finished job is forgotten first.
#[derive(Debug)]
pub struct JobTable {
    jobs: HashMap<String, Job>,
    /// Ids of finished jobs, oldest first. Every terminal job is here exactly once, so
    /// `jobs.len() - finished.len()` is the number of unfinished jobs.
    finished: VecDeque<String>,
    next_seq: u64,
    max_active: usize,
    max_history: usize,
}

fn not_found(id: &str) -> HubError {
    HubError::new(ErrorCode::JobNotFound, format!("job '{id}' does not exist (or has left the history)"))
}

impl JobTable {
    /// An empty table allowing `max_active` unfinished jobs and keeping `max_history` finished ones.
    pub fn new(max_active: usize, max_history: usize) -> Self {
        Self { jobs: HashMap::new(), finished: VecDeque::new(), next_seq: 0, max_active, max_history }
    }

    /// Jobs scheduled, queued or running.
    pub fn active(&self) -> usize {
        self.jobs.len() - self.finished.len()
    }

    /// Accepts `request` at `now`: `409 JobAlreadyExists` for a known id, `429004
    /// ThrottlingMaxActiveJobCountExceeded` when `max_active` jobs have not finished.
    pub fn create(&mut self, request: JobRequest, now: Millis) -> Result<&Job, HubError> {
        if self.jobs.contains_key(&request.id) {
            return Err(HubError::new(
                ErrorCode::JobAlreadyExists,
                format!("a job with id '{}' exists already; job ids are unique", request.id),
            ));
        }
        if self.active() >= self.max_active {
            return Err(HubError::new(
                ErrorCode::ThrottlingMaxActiveJobCountExceeded,
                format!(
                    "{} jobs are scheduled or running, the most this hub allows; wait for one to finish or cancel one",
                    self.max_active
                ),
            ));
        }
        let mut job = Job::new(request, now);
        self.next_seq += 1;
        job.seq = self.next_seq;
        let id = job.request.id.clone();
        Ok(self.jobs.entry(id).or_insert(job))
    }

    /// Recovery: puts `job` back as stored (replacing one of its id), finished jobs into the
    /// history.
    pub fn restore(&mut self, job: Job) {
        let id = job.request.id.clone();
        self.next_seq = self.next_seq.max(job.seq);
        let terminal = job.status.is_terminal();
        self.jobs.insert(id.clone(), job);
        if terminal && !self.finished.contains(&id) {
            self.finished.push_back(id);
            while self.finished.len() > self.max_history {
                if let Some(old) = self.finished.pop_front() {
                    self.jobs.remove(&old);
                }
            }
        }
    }

    /// Every job, for a snapshot.
    pub fn all(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// Job `id`, or `404 JobNotFound`.
    pub fn get(&self, id: &str) -> Result<&Job, HubError> {
        self.jobs.get(id).ok_or_else(|| not_found(id))
    }

    /// Runs `f` on job `id` and records the job as finished if `f` ended it.
    pub fn update<T>(&mut self, id: &str, f: impl FnOnce(&mut Job) -> T) -> Result<T, HubError> {
        let job = self.jobs.get_mut(id).ok_or_else(|| not_found(id))?;
        let was_terminal = job.status.is_terminal();
        let out = f(job);
        if !was_terminal && job.status.is_terminal() {
            self.finished.push_back(id.to_string());
            while self.finished.len() > self.max_history {
                if let Some(old) = self.finished.pop_front() {
                    self.jobs.remove(&old);
                }
            }
        }
        Ok(out)
    }

    /// Cancels job `id` at `now` (a finished job stays as it ended) and returns its JSON.
    pub fn cancel(&mut self, id: &str, now: Millis) -> Result<Value, HubError> {
        self.update(id, |j| {
            j.cancel(now);
            j.to_json()
        })
    }

    /// How many jobs the table holds in each status (by wire name, every status present) and the
    /// `latest` most recently created ones, newest first. The table is bounded, so this is cheap.
    pub fn summary(&self, latest: usize) -> (Vec<(&'static str, usize)>, Vec<Value>) {
        let counts = JobStatus::ALL
            .into_iter()
            .map(|st| (st.name(), self.jobs.values().filter(|j| j.status == st).count()))
            .collect();
        let mut newest: Vec<&Job> = self.jobs.values().collect();
        newest.sort_by_key(|j| std::cmp::Reverse(j.seq));
        (counts, newest.iter().take(latest).map(|j| j.to_json()).collect())
    }

    /// One page of the jobs query: jobs of `job_type` and `status` (any when `None`) in creation
    /// order, starting after `continuation`.
    pub fn query(
        &self,
        job_type: Option<JobType>,
        status: Option<JobStatus>,
        continuation: Option<&str>,
        page_size: usize,
    ) -> Result<JobsPage, HubError> {
        let after = match continuation.filter(|c| !c.is_empty()) {
            None => 0,
            Some(c) => c.parse::<u64>().map_err(|_| {
                HubError::invalid(format!("x-ms-continuation '{c}' is not a token this hub issued"))
            })?,
        };
        let mut matching: Vec<&Job> = self
            .jobs
            .values()
            .filter(|j| j.seq > after)
            .filter(|j| job_type.is_none_or(|t| j.request.action.job_type() == t))
            .filter(|j| status.is_none_or(|s| j.status == s))
            .collect();
        matching.sort_by_key(|j| j.seq);
        let page_size = page_size.max(1);
        let continuation = (matching.len() > page_size).then(|| matching[page_size - 1].seq.to_string());
        let items = matching.iter().take(page_size).map(|j| j.to_json()).collect();
        Ok(JobsPage { items, continuation })
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
