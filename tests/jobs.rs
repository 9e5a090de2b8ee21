//! Scheduled jobs end to end (reference §2.10): `PUT /jobs/v2/{id}` over HTTPS like a service SDK,
//! devices on the plain MQTT listener answering methods and receiving desired-property patches,
//! and the job's progress read back with `GET /jobs/v2/{id}` and the jobs query.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use iothub_emulator::clock::{Clock, SystemClock, iso8601};
use iothub_emulator_tests::{TestHub, unique};
use reqwest::Method;
use rumqttc::mqttbytes::QoS;
use serde_json::{Value, json};

use crate::mqtt::Device;

/// How long a test waits for a job to reach a state.
const JOB_WAIT: Duration = Duration::from_secs(20);

async fn call(hub: &TestHub, method: Method, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
    call_as(hub, &hub.owner_token(), method, path, body).await
}

async fn call_as(
    hub: &TestHub,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let sep = if path.contains('?') { '&' } else { '?' };
    let url = format!("{}{path}{sep}api-version=2021-04-12", hub.https_url());
    let mut req = hub.client.request(method, url).header("authorization", token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

async fn set_tags(hub: &TestHub, id: &str, tags: Value) -> Result<()> {
    let (status, body) =
        call(hub, Method::PATCH, &format!("/twins/{id}"), Some(json!({ "tags": tags }))).await?;
    if status != 200 {
        bail!("tagging {id}: {status} {body}");
    }
    Ok(())
}

async fn twin(hub: &TestHub, id: &str) -> Result<Value> {
    Ok(call(hub, Method::GET, &format!("/twins/{id}"), None).await?.1)
}

async fn schedule(hub: &TestHub, job: Value) -> Result<Value> {
    let id = job["jobId"].as_str().context("jobId")?.to_string();
    let (status, body) = call(hub, Method::PUT, &format!("/jobs/v2/{id}"), Some(job)).await?;
    if status != 200 {
        bail!("scheduling {id}: {status} {body}");
    }
    Ok(body)
}

/// Polls `GET /jobs/v2/{id}` until the job's status is `want`.
async fn wait_for_status(hub: &TestHub, id: &str, want: &str) -> Result<Value> {
    let poll = async {
        loop {
            let (status, job) = call(hub, Method::GET, &format!("/jobs/v2/{id}"), None).await?;
            if status != 200 {
                bail!("GET job {id}: {status} {job}");
            }
            if job["status"] == want {
                return Ok(job);
            }
            if ["completed", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or_default()) {
                bail!("job {id} ended as {} instead of {want}: {job}", job["status"]);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(JOB_WAIT, poll).await.with_context(|| format!("job {id} never became {want}"))?
}

fn stats(job: &Value) -> (u64, u64, u64, u64, u64) {
    let s = &job["deviceJobStatistics"];
    let n = |k: &str| s[k].as_u64().unwrap_or(u64::MAX);
    (n("deviceCount"), n("succeededCount"), n("failedCount"), n("runningCount"), n("pendingCount"))
}

#[tokio::test]
async fn twin_update_job_reaches_only_matching_devices_and_notifies_connected_ones() -> Result<()> {
    let hub = TestHub::start().await?;
    let group = unique("canary");
    let online = Device::create(&hub, "job-twin-on").await?;
    let offline = Device::create(&hub, "job-twin-off").await?;
    let other = Device::create(&hub, "job-twin-other").await?;
    for d in [&online, &offline] {
        set_tags(&hub, &d.id, json!({ "group": group })).await?;
    }
    set_tags(&hub, &other.id, json!({ "group": "stable" })).await?;
    let (mut mqtt, _) = online.connect(true).await?;
    mqtt.subscribe(&["$iothub/twin/PATCH/properties/desired/#"]).await?;

    let job_id = unique("fw-rollout");
    let created = schedule(
        &hub,
        json!({
            "jobId": job_id,
            "type": "scheduleUpdateTwin",
            "updateTwin": {"etag": "*", "tags": {"rolled": true}, "properties": {"desired": {"firmwareVersion": "2.0"}}},
            "queryCondition": format!("tags.group = '{group}'"),
            "startTime": iso8601(SystemClock.now_ms()),
            "maxExecutionTimeInSeconds": 60,
        }),
    )
    .await?;
    assert_eq!(created["jobId"], job_id.as_str());
    assert_eq!(created["type"], "scheduleUpdateTwin");
    assert!(
        ["queued", "running", "completed"].contains(&created["status"].as_str().unwrap_or_default()),
        "{created}"
    );

    let patch = mqtt.expect_publish().await?;
    assert!(patch.topic.starts_with("$iothub/twin/PATCH/properties/desired/?$version="), "{}", patch.topic);
    let body: Value = serde_json::from_slice(&patch.payload)?;
    assert_eq!(body["firmwareVersion"], "2.0", "{body}");

    let done = wait_for_status(&hub, &job_id, "completed").await?;
    assert_eq!(stats(&done), (2, 2, 0, 0, 0), "{done}");
    assert!(done["endTime"].is_string(), "{done}");
    for d in [&online, &offline] {
        let t = twin(&hub, &d.id).await?;
        assert_eq!(t["properties"]["desired"]["firmwareVersion"], "2.0", "{t}");
        assert_eq!(t["tags"]["rolled"], true, "{t}");
        assert_eq!(t["tags"]["group"], group.as_str(), "the patch merges into the tags");
    }
    let t = twin(&hub, &other.id).await?;
    assert!(t["properties"]["desired"].get("firmwareVersion").is_none(), "{t}");
    assert!(t["tags"].get("rolled").is_none(), "{t}");
    hub.stop().await
}

#[tokio::test]
async fn method_job_counts_the_answering_device_and_fails_the_offline_one() -> Result<()> {
    let hub = TestHub::start().await?;
    let group = unique("reboot");
    let online = Device::create(&hub, "job-m-on").await?;
    let offline = Device::create(&hub, "job-m-off").await?;
    for d in [&online, &offline] {
        set_tags(&hub, &d.id, json!({ "group": group })).await?;
    }
    let (mut mqtt, _) = online.connect(true).await?;
    mqtt.subscribe(&["$iothub/methods/POST/#"]).await?;

    let job_id = unique("reboot-job");
    schedule(
        &hub,
        json!({
            "jobId": job_id,
            "type": "scheduleDeviceMethod",
            "cloudToDeviceMethod": {"methodName": "reboot", "payload": {"delay": 1}, "responseTimeoutInSeconds": 10},
            "queryCondition": format!("tags.group = '{group}'"),
        }),
    )
    .await?;
    let req = mqtt.expect_publish().await?;
    assert!(req.topic.starts_with("$iothub/methods/POST/reboot/?$rid="), "{}", req.topic);
    assert_eq!(serde_json::from_slice::<Value>(&req.payload)?, json!({"delay": 1}));
    let rid = req.topic.rsplit_once("$rid=").map(|(_, r)| r.to_string()).context("no $rid")?;
    mqtt.publish(&format!("$iothub/methods/res/200/?$rid={rid}"), QoS::AtMostOnce, br#"{"ok":true}"#).await?;

    let done = wait_for_status(&hub, &job_id, "completed").await?;
    assert_eq!(stats(&done), (2, 1, 1, 0, 0), "{done}");
    assert_eq!(done["cloudToDeviceMethod"]["methodName"], "reboot");
    hub.stop().await
}

#[tokio::test]
async fn a_cancelled_scheduled_job_never_runs() -> Result<()> {
    let hub = TestHub::start().await?;
    let group = unique("later");
    let dev = Device::create(&hub, "job-later").await?;
    set_tags(&hub, &dev.id, json!({ "group": group })).await?;
    let condition = format!("tags.group = '{group}'");
    let start = SystemClock.now_ms() + 1500;

    let cancelled_id = unique("cancel-me");
    let created = schedule(
        &hub,
        json!({
            "jobId": cancelled_id,
            "type": "scheduleUpdateTwin",
            "updateTwin": {"properties": {"desired": {"fromCancelled": 1}}},
            "queryCondition": condition,
            "startTime": iso8601(start),
        }),
    )
    .await?;
    assert_eq!(created["status"], "scheduled", "{created}");
    assert_eq!(created["startTime"], iso8601(start));
    let (status, body) = call(&hub, Method::POST, &format!("/jobs/v2/{cancelled_id}/cancel"), None).await?;
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")), "{body}");

    // A second job due just after the cancelled one: once it has completed, the first one's
    // start time has passed too, so its absence of effect is observed, not hoped for.
    let witness_id = unique("witness");
    schedule(
        &hub,
        json!({
            "jobId": witness_id,
            "type": "scheduleUpdateTwin",
            "updateTwin": {"properties": {"desired": {"fromWitness": 1}}},
            "queryCondition": condition,
            "startTime": iso8601(start + 100),
        }),
    )
    .await?;
    let witness = wait_for_status(&hub, &witness_id, "completed").await?;
    assert_eq!(stats(&witness), (1, 1, 0, 0, 0), "{witness}");
    let desired = &twin(&hub, &dev.id).await?["properties"]["desired"];
    assert_eq!(desired["fromWitness"], 1, "{desired}");
    assert!(desired.get("fromCancelled").is_none(), "the cancelled job ran: {desired}");
    let (_, job) = call(&hub, Method::GET, &format!("/jobs/v2/{cancelled_id}"), None).await?;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(stats(&job), (0, 0, 0, 0, 0), "{job}");

    // The jobs query sees both, filtered and paged like the SDKs ask.
    let (status, list) =
        call(&hub, Method::GET, "/jobs/v2/query?jobType=scheduleUpdateTwin&jobStatus=cancelled", None)
            .await?;
    assert_eq!(status, 200);
    let ids: Vec<&str> =
        list.as_array().context("array")?.iter().filter_map(|j| j["jobId"].as_str()).collect();
    assert_eq!(ids, [cancelled_id.as_str()]);
    let url = format!("{}/jobs/v2/query?api-version=2021-04-12", hub.https_url());
    let first =
        hub.client.get(&url).header("authorization", hub.owner_token()).header("x-ms-max-item-count", "1");
    let first = first.send().await?;
    assert_eq!(first.headers()["x-ms-item-type"], "JobResponse");
    let token = first.headers().get("x-ms-continuation").context("a continuation after page 1")?.clone();
    assert_eq!(first.json::<Value>().await?[0]["jobId"], cancelled_id.as_str());
    let second =
        hub.client.get(&url).header("authorization", hub.owner_token()).header("x-ms-continuation", token);
    let second = second.send().await?;
    assert!(second.headers().get("x-ms-continuation").is_none());
    assert_eq!(second.json::<Value>().await?[0]["jobId"], witness_id.as_str());
    hub.stop().await
}

#[tokio::test]
async fn job_errors_use_iot_hub_codes() -> Result<()> {
    let hub = TestHub::start().await?;
    let code = |body: &Value| {
        body["Message"].as_str().unwrap_or_default().split(';').next().unwrap_or("").to_string()
    };

    let (status, body) = call(&hub, Method::GET, "/jobs/v2/no-such-job", None).await?;
    assert_eq!((status, code(&body)), (404, "ErrorCode:JobNotFound".into()), "{body}");
    let (status, body) = call(&hub, Method::POST, "/jobs/v2/no-such-job/cancel", None).await?;
    assert_eq!((status, code(&body)), (404, "ErrorCode:JobNotFound".into()), "{body}");

    let later = iso8601(SystemClock.now_ms() + 3_600_000);
    let job = |id: &str| {
        json!({
            "jobId": id, "type": "scheduleUpdateTwin", "updateTwin": {"tags": {"a": 1}},
            "queryCondition": "tags.none = 1", "startTime": later,
        })
    };
    let dup = unique("dup");
    schedule(&hub, job(&dup)).await?;
    let (status, body) = call(&hub, Method::PUT, &format!("/jobs/v2/{dup}"), Some(job(&dup))).await?;
    assert_eq!((status, code(&body)), (409, "ErrorCode:JobAlreadyExists".into()), "{body}");

    let mut bad = job("bad");
    bad["queryCondition"] = json!("tags.a = = 1");
    let (status, body) = call(&hub, Method::PUT, "/jobs/v2/bad", Some(bad)).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body["Message"].as_str().unwrap_or_default().contains("queryCondition"), "{body}");

    // Reading needs RegistryRead; a method job needs ServiceConnect.
    let read = hub.policy_token("registryRead");
    let (status, _) = call_as(&hub, &read, Method::GET, &format!("/jobs/v2/{dup}"), None).await?;
    assert_eq!(status, 200);
    let (status, _) = call_as(&hub, &read, Method::PUT, "/jobs/v2/by-reader", Some(job("by-reader"))).await?;
    assert_eq!(status, 401);
    let mut method = job("m-by-registry-writer");
    method["type"] = json!("scheduleDeviceMethod");
    method["cloudToDeviceMethod"] = json!({"methodName": "reboot"});
    let rw = hub.policy_token("registryReadWrite");
    let (status, _) = call_as(&hub, &rw, Method::PUT, "/jobs/v2/m-by-registry-writer", Some(method)).await?;
    assert_eq!(status, 401);

    // Ten unfinished jobs at most (an S3 hub); the eleventh is throttled until one ends.
    for i in 1..10 {
        schedule(&hub, job(&format!("cap-{i}"))).await?;
    }
    let (status, body) = call(&hub, Method::PUT, "/jobs/v2/cap-10", Some(job("cap-10"))).await?;
    assert_eq!(
        (status, code(&body)),
        (429, "ErrorCode:ThrottlingMaxActiveJobCountExceeded".into()),
        "{body}"
    );
    call(&hub, Method::POST, "/jobs/v2/cap-1/cancel", None).await?;
    schedule(&hub, job("cap-10")).await?;
    hub.stop().await
}

#[tokio::test]
async fn a_method_job_past_its_max_execution_time_fails_and_counts_the_call_in_flight() -> Result<()> {
    let hub = TestHub::start().await?;
    let group = unique("slow");
    let dev = Device::create(&hub, "job-slow").await?;
    set_tags(&hub, &dev.id, json!({ "group": group })).await?;
    let (mut mqtt, _) = dev.connect(true).await?;
    mqtt.subscribe(&["$iothub/methods/POST/#"]).await?;
    let job_id = unique("slow-job");
    schedule(
        &hub,
        json!({
            "jobId": job_id,
            "type": "scheduleDeviceMethod",
            "cloudToDeviceMethod": {"methodName": "hang", "responseTimeoutInSeconds": 300},
            "queryCondition": format!("tags.group = '{group}'"),
            "maxExecutionTimeInSeconds": 1,
        }),
    )
    .await?;
    // The device receives the call and never answers.
    let req = mqtt.expect_publish().await?;
    assert!(req.topic.starts_with("$iothub/methods/POST/hang/"), "{}", req.topic);
    let job = tokio::time::timeout(JOB_WAIT, async {
        loop {
            let (_, job) = call(&hub, Method::GET, &format!("/jobs/v2/{job_id}"), None).await?;
            if job["status"] != "running" {
                return anyhow::Ok(job);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await??;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["failureReason"].as_str().unwrap_or_default().contains("maxExecutionTimeInSeconds"), "{job}");
    assert_eq!(stats(&job), (1, 0, 1, 0, 0), "{job}");
    hub.stop().await
}

#[tokio::test]
async fn the_hubs_shutdown_stops_unfinished_jobs() -> Result<()> {
    let hub = TestHub::start().await?;
    let job_id = unique("at-shutdown");
    schedule(
        &hub,
        json!({
            "jobId": job_id, "type": "scheduleUpdateTwin", "updateTwin": {"tags": {"a": 1}},
            "queryCondition": "tags.none = 1", "startTime": iso8601(SystemClock.now_ms() + 3_600_000),
        }),
    )
    .await?;
    let state = hub.running.hub.clone();
    hub.stop().await?;
    let job = tokio::time::timeout(JOB_WAIT, async {
        loop {
            let job = state.get_job(&job_id)?;
            if job["status"] != "scheduled" {
                return anyhow::Ok(job);
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .context("the job's task did not notice the shutdown")??;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["failureReason"].as_str().unwrap_or_default().contains("shut down"), "{job}");
    Ok(())
}

/// A twin job over 10,000 matching devices (ten query pages across every registry shard) among
/// 12,000, created through the hub's API to keep the setup fast; prints how long the job ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twin_job_walks_ten_thousand_devices_page_by_page() -> Result<()> {
    use iothub_emulator::hub::DeviceInput;
    let hub = TestHub::start().await?;
    let state = hub.running.hub.clone();
    let group = unique("big");
    for i in 0..12_000 {
        let id = format!("{group}-{i}");
        state.put_device(&id, DeviceInput::default(), None)?;
        let tag = if i % 6 == 5 { "small" } else { group.as_str() };
        state.update_twin(&id, &json!({ "tags": { "group": tag } }), None, false)?;
    }
    let job_id = unique("big-job");
    let started = std::time::Instant::now();
    schedule(
        &hub,
        json!({
            "jobId": job_id, "type": "scheduleUpdateTwin",
            "updateTwin": {"properties": {"desired": {"fw": "3.0"}}},
            "queryCondition": format!("tags.group = '{group}'"),
        }),
    )
    .await?;
    let done = wait_for_status(&hub, &job_id, "completed").await?;
    println!("twin job over 10,000 of 12,000 devices: {:?} (debug build)", started.elapsed());
    assert_eq!(stats(&done), (10_000, 10_000, 0, 0, 0), "{done}");
    let (_, count) = call(
        &hub,
        Method::POST,
        "/devices/query",
        Some(json!({"query": "SELECT COUNT() AS n FROM devices WHERE properties.desired.fw = '3.0'"})),
    )
    .await?;
    assert_eq!(count[0]["n"], 10_000, "{count}");
    hub.stop().await
}

/// A method job keeps at most 64 calls in flight: 65 connected devices that hold their answers see
/// 64 requests (the job reports 64 running, 1 pending) until one answers. The devices are in-process
/// connections on the hub's link API, the same mailbox an MQTT connection reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_job_keeps_at_most_64_calls_in_flight() -> Result<()> {
    use iothub_emulator::hub::link::subscriptions;
    use iothub_emulator::hub::{DeviceInput, LinkEvent, MethodCall, MethodReply};
    let hub = TestHub::start().await?;
    let state = hub.running.hub.clone();
    let group = unique("wide");
    let mut links = Vec::new();
    for i in 0..65 {
        let id = format!("{group}-{i}");
        state.put_device(&id, DeviceInput::default(), None)?;
        state.update_twin(&id, &json!({ "tags": { "group": group } }), None, false)?;
        let link = state.attach_link(&id, true)?;
        state.save_session(&id, link.conn_id, subscriptions::METHODS);
        links.push(link);
    }
    let job_id = unique("wide-job");
    schedule(
        &hub,
        json!({
            "jobId": job_id, "type": "scheduleDeviceMethod",
            "cloudToDeviceMethod": {"methodName": "ping", "responseTimeoutInSeconds": 60},
            "queryCondition": format!("tags.group = '{group}'"),
        }),
    )
    .await?;
    let mut held: Vec<MethodCall> = Vec::new();
    let collect = |held: &mut Vec<MethodCall>| {
        for link in &links {
            while let Some(event) = link.events.try_recv() {
                if let LinkEvent::Method(call) = event {
                    held.push(*call);
                }
            }
        }
    };
    let job = tokio::time::timeout(JOB_WAIT, async {
        loop {
            collect(&mut held);
            let job = state.get_job(&job_id)?;
            if stats(&job).3 == 64 && held.len() == 64 {
                return anyhow::Ok(job);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("64 calls never came out")??;
    assert_eq!(stats(&job), (65, 0, 0, 64, 1), "{job}");

    let reply = |call: MethodCall| call.reply.send(MethodReply { status: 200, payload: "{}".into() });
    let _ = reply(held.remove(0));
    tokio::time::timeout(JOB_WAIT, async {
        while held.len() < 64 {
            collect(&mut held);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("the 65th call never came out after one answer")?;
    for call in held.drain(..) {
        let _ = reply(call);
    }
    let done = wait_for_status(&hub, &job_id, "completed").await?;
    assert_eq!(stats(&done), (65, 65, 0, 0, 0), "{done}");
    drop(links);
    hub.stop().await
}
