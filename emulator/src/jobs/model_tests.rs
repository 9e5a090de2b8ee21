//! Unit tests of the job model: request validation, the state machine and its statistics, and the
//! table's duplicate, cap, history and query rules. No sockets, no timers.

use serde_json::json;

use super::*;

fn twin_request(id: &str) -> Value {
    json!({
        "jobId": id,
        "type": "scheduleUpdateTwin",
        "updateTwin": {"etag": "*", "tags": {"rolled": true}, "properties": {"desired": {"fw": "2.0"}}},
        "queryCondition": "tags.group = 'canary'",
        "startTime": null,
        "maxExecutionTimeInSeconds": 60,
    })
}

fn method_request(id: &str) -> Value {
    json!({
        "jobId": id,
        "type": "scheduleDeviceMethod",
        "cloudToDeviceMethod": {"methodName": "reboot", "payload": {"in": 5}, "responseTimeoutInSeconds": 10},
        "queryCondition": "deviceId IN ['a', 'b']",
        "startTime": "2026-01-01T00:00:10.000Z",
    })
}

fn parse(id: &str, body: Value) -> JobRequest {
    JobRequest::parse(id, &body).unwrap()
}

const T0: Millis = 1_767_225_600_000; // 2026-01-01T00:00:00Z

#[test]
fn requests_parse_into_actions() {
    let r = parse("j1", twin_request("j1"));
    assert_eq!(r.max_execution_secs, 60);
    assert_eq!(r.start_time, None);
    assert_eq!(
        r.action,
        JobAction::UpdateTwin(json!({"tags": {"rolled": true}, "properties": {"desired": {"fw": "2.0"}}}))
    );
    let m = parse("j2", method_request("j2"));
    assert_eq!(m.start_time, Some(T0 + 10_000));
    assert_eq!(m.max_execution_secs, JOBS_DEFAULT_MAX_EXECUTION_SECS);
    let JobAction::DeviceMethod(spec) = &m.action else { panic!("method job") };
    assert_eq!(
        (spec.name.as_str(), spec.response_timeout_secs, spec.connect_timeout_secs),
        ("reboot", 10, 0)
    );
    assert_eq!(spec.payload_bytes(), br#"{"in":5}"#);
}

#[test]
fn bad_requests_name_the_field() {
    let cases: Vec<(Value, &str)> = vec![
        (json!([]), "JSON object"),
        (json!({"type": "scheduleUpdateTwin"}), "updateTwin is required"),
        (json!({"queryCondition": "x = 1"}), "type is required"),
        (json!({"type": "export"}), "type 'export'"),
        (
            json!({"type": "scheduleDeviceMethod", "queryCondition": "x = 1"}),
            "cloudToDeviceMethod is required",
        ),
        (
            json!({"type": "scheduleDeviceMethod", "cloudToDeviceMethod": {"methodName": "a b"}, "queryCondition": "x = 1"}),
            "cloudToDeviceMethod.methodName",
        ),
        (
            json!({"type": "scheduleDeviceMethod", "cloudToDeviceMethod": {"methodName": "m", "responseTimeoutInSeconds": 1}, "queryCondition": "x = 1"}),
            "cloudToDeviceMethod.responseTimeoutInSeconds",
        ),
        (
            json!({"type": "scheduleUpdateTwin", "updateTwin": {"tags": {"a": 1}}}),
            "queryCondition is required",
        ),
        (
            json!({"type": "scheduleUpdateTwin", "updateTwin": {"tags": {"a": 1}}, "queryCondition": "tags.a = = 1"}),
            "queryCondition 'tags.a = = 1'",
        ),
        (
            json!({"type": "scheduleUpdateTwin", "updateTwin": {"deviceId": "x"}, "queryCondition": "x = 1"}),
            "tags and/or properties.desired",
        ),
        (
            json!({"type": "scheduleUpdateTwin", "updateTwin": {"properties": {"reported": {"a": 1}}}, "queryCondition": "x = 1"}),
            "properties.reported",
        ),
        (
            json!({"type": "scheduleUpdateTwin", "updateTwin": {"tags": {"a.b": 1}}, "queryCondition": "x = 1"}),
            "updateTwin: key 'a.b'",
        ),
        (
            json!({"type": "scheduleUpdateTwin", "updateTwin": {"tags": {"a": 1}}, "queryCondition": "x = 1", "startTime": "soon"}),
            "startTime",
        ),
        (
            json!({"type": "scheduleUpdateTwin", "updateTwin": {"tags": {"a": 1}}, "queryCondition": "x = 1", "maxExecutionTimeInSeconds": 0}),
            "maxExecutionTimeInSeconds",
        ),
        (
            json!({"jobId": "other", "type": "scheduleUpdateTwin", "updateTwin": {"tags": {"a": 1}}, "queryCondition": "x = 1"}),
            "does not match",
        ),
    ];
    for (body, needle) in cases {
        let e = JobRequest::parse("j", &body).unwrap_err();
        assert_eq!(e.code, ErrorCode::ArgumentInvalid, "{body}");
        assert!(e.message.contains(needle), "{body}: '{}' should mention '{needle}'", e.message);
    }
    assert!(
        JobRequest::parse("has space", &twin_request("has space")).unwrap_err().message.contains("jobId")
    );
    assert!(JobRequest::parse(&"x".repeat(129), &json!({})).is_err());
}

#[test]
fn a_job_runs_through_its_states_and_counts_devices() {
    let mut job = Job::new(parse("j", twin_request("j")), T0);
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.due_at(), T0);
    assert!(job.begin(T0 + 5));
    assert!(!job.begin(T0 + 6), "a running job does not start twice");
    assert_eq!(job.deadline(), Some(T0 + 5 + 60_000));
    job.discovered(3);
    job.device_started();
    job.device_finished(true);
    job.device_started();
    job.device_finished(false);
    job.device_started();
    let s = job.stats;
    assert_eq!(
        (s.device_count, s.succeeded_count, s.failed_count, s.running_count, s.pending_count),
        (3, 1, 1, 1, 0)
    );
    job.device_finished(true);
    assert!(job.complete(T0 + 100));
    assert!(!job.cancel(T0 + 200), "a completed job cannot be cancelled");
    assert_eq!(job.status, JobStatus::Completed);
    let v = job.to_json();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["type"], "scheduleUpdateTwin");
    assert_eq!(v["endTime"], iso8601(T0 + 100));
    assert_eq!(v["startTime"], iso8601(T0 + 5));
    assert_eq!(
        v["deviceJobStatistics"],
        json!({"deviceCount": 3, "failedCount": 1, "succeededCount": 2, "runningCount": 0, "pendingCount": 0})
    );
    assert_eq!(v["updateTwin"]["properties"]["desired"]["fw"], "2.0");
    assert!(v.get("failureReason").is_none());
}

#[test]
fn a_page_of_devices_processed_in_one_go_moves_from_pending_to_the_outcomes() {
    let mut job = Job::new(parse("p", twin_request("p")), T0);
    assert!(job.begin(T0));
    job.discovered(5);
    job.devices_done(4, 1);
    job.discovered(2);
    let s = job.stats;
    assert_eq!(
        (s.device_count, s.succeeded_count, s.failed_count, s.running_count, s.pending_count),
        (7, 4, 1, 0, 2)
    );
}

#[test]
fn a_future_job_is_scheduled_and_can_be_cancelled_before_it_starts() {
    let mut job = Job::new(parse("m", method_request("m")), T0);
    assert_eq!(job.status, JobStatus::Scheduled);
    assert_eq!(job.due_at(), T0 + 10_000);
    assert_eq!(job.to_json()["startTime"], "2026-01-01T00:00:10.000Z");
    assert!(job.cancel(T0 + 1));
    assert!(!job.begin(T0 + 10_000), "a cancelled job never starts");
    assert_eq!(job.to_json()["status"], "cancelled");
    assert_eq!(job.to_json()["cloudToDeviceMethod"]["methodName"], "reboot");
    assert_eq!(job.stats, DeviceJobStatistics::default());
}

#[test]
fn failing_abandons_devices_in_flight() {
    let mut job = Job::new(parse("j", twin_request("j")), T0);
    job.begin(T0);
    job.discovered(5);
    job.device_started();
    job.device_started();
    assert!(job.fail(T0 + 60_000, "maxExecutionTimeInSeconds elapsed"));
    let s = job.stats;
    assert_eq!((s.running_count, s.failed_count, s.pending_count), (0, 2, 3));
    assert_eq!(job.to_json()["failureReason"], "maxExecutionTimeInSeconds elapsed");
    assert!(!job.complete(T0 + 60_001));
    assert_eq!(job.status, JobStatus::Failed);
}

#[test]
fn the_table_refuses_duplicates_and_caps_unfinished_jobs() {
    let mut t = JobTable::new(2, 10);
    t.create(parse("a", twin_request("a")), T0).unwrap();
    let e = t.create(parse("a", twin_request("a")), T0).unwrap_err();
    assert_eq!((e.code, e.code.http_status()), (ErrorCode::JobAlreadyExists, 409));
    t.create(parse("b", method_request("b")), T0).unwrap();
    let e = t.create(parse("c", twin_request("c")), T0).unwrap_err();
    assert_eq!((e.code, e.code.number()), (ErrorCode::ThrottlingMaxActiveJobCountExceeded, 429004));
    assert_eq!(t.active(), 2);
    t.cancel("b", T0 + 1).unwrap();
    assert_eq!(t.active(), 1, "a cancelled job frees its slot");
    t.create(parse("c", twin_request("c")), T0).unwrap();
    let e = t.get("zzz").unwrap_err();
    assert_eq!((e.code, e.code.http_status()), (ErrorCode::JobNotFound, 404));
    assert_eq!(t.cancel("b", T0 + 2).unwrap()["status"], "cancelled", "cancelling twice changes nothing");
}

#[test]
fn history_keeps_the_most_recent_finished_jobs() {
    let mut t = JobTable::new(1, 3);
    for i in 0..5 {
        let id = format!("j{i}");
        t.create(parse(&id, twin_request(&id)), T0 + i).unwrap();
        t.update(&id, |j| {
            j.begin(T0 + i);
            j.complete(T0 + i)
        })
        .unwrap();
    }
    assert_eq!(t.active(), 0);
    assert!(t.get("j0").is_err() && t.get("j1").is_err(), "the oldest finished jobs are forgotten");
    for id in ["j2", "j3", "j4"] {
        assert_eq!(t.get(id).unwrap().status, JobStatus::Completed);
    }
    // Finishing an already finished job again does not record it twice.
    t.update("j4", |j| j.cancel(T0 + 99)).unwrap();
    t.create(parse("j5", twin_request("j5")), T0).unwrap();
    t.update("j5", |j| j.cancel(T0)).unwrap();
    assert!(t.get("j2").is_err());
    assert!(t.get("j3").is_ok() && t.get("j4").is_ok() && t.get("j5").is_ok());
}

#[test]
fn the_query_filters_and_pages_in_creation_order() {
    let mut t = JobTable::new(10, 10);
    for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
        let body = if i % 2 == 0 { twin_request(id) } else { method_request(id) };
        t.create(parse(id, body), T0).unwrap();
    }
    t.cancel("c", T0).unwrap();
    let ids =
        |p: &JobsPage| p.items.iter().map(|v| v["jobId"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let all = t.query(None, None, None, 3).unwrap();
    assert_eq!(ids(&all), ["a", "b", "c"]);
    let next = t.query(None, None, all.continuation.as_deref(), 3).unwrap();
    assert_eq!(ids(&next), ["d"]);
    assert_eq!(next.continuation, None);
    let twins = t.query(Some(JobType::UpdateTwin), None, None, 10).unwrap();
    assert_eq!(ids(&twins), ["a", "c"]);
    let cancelled = t.query(Some(JobType::UpdateTwin), Some(JobStatus::Cancelled), None, 10).unwrap();
    assert_eq!(ids(&cancelled), ["c"]);
    let scheduled = t.query(None, Some(JobStatus::parse("Scheduled").unwrap()), None, 10).unwrap();
    assert_eq!(ids(&scheduled), ["b", "d"]);
    assert!(t.query(None, None, Some("garbage"), 10).unwrap_err().message.contains("x-ms-continuation"));
    assert!(JobStatus::parse("done").unwrap_err().message.contains("jobStatus"));
    assert!(JobType::parse("jobType", "import").unwrap_err().message.contains("jobType 'import'"));
}
