//! `--persist` through the server (issue 15): a graceful restart on the same data directory keeps
//! what was answered, and an answer waits for the state journal: a failed journal turns success
//! into `500 ServerError` instead.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use iothub_emulator::HubConfig;
use iothub_emulator::persist::SyncMode;
use iothub_emulator::server::{ListenConfig, RunningHub};
use iothub_emulator_tests::{now_secs, unique};
use serde_json::{Value, json};

async fn start(dir: &Path) -> (RunningHub, reqwest::Client) {
    let config = HubConfig { persist: Some(SyncMode::Write), ..HubConfig::default() };
    let listen = ListenConfig::ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let hub = RunningHub::start(config, &listen, dir).await.unwrap();
    (hub, reqwest::Client::new())
}

fn owner(hub: &RunningHub) -> String {
    let p = hub.hub.policies().iter().find(|p| p.name == "iothubowner").unwrap();
    iothub_emulator::sas::make_token("localhost", &p.primary_key, Some("iothubowner"), now_secs() + 3600)
        .unwrap()
}

async fn put_device(hub: &RunningHub, client: &reqwest::Client, id: &str) -> reqwest::Response {
    client
        .put(format!("http://{}/devices/{id}?api-version=2021-04-12", hub.http_addr))
        .header("authorization", owner(hub))
        .json(&json!({ "deviceId": id }))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_what_was_answered_and_a_failed_journal_fails_the_answer() {
    let dir = std::env::temp_dir().join(unique("iothub-persist"));
    let (hub, client) = start(&dir).await;
    let id = unique("p");
    assert_eq!(put_device(&hub, &client, &id).await.status(), 200);
    let sent = client
        .post(format!("http://{}/devices/{id}/messages/deviceBound", hub.http_addr))
        .header("authorization", owner(&hub))
        .header("iothub-messageid", "kept")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 204);
    let patched = client
        .patch(format!("http://{}/twins/{id}?api-version=2021-04-12", hub.http_addr))
        .header("authorization", owner(&hub))
        .json(&json!({ "tags": { "site": "a" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    hub.stop().await.unwrap();

    let (hub, client) = start(&dir).await;
    let got: Value = client
        .get(format!("http://{}/twins/{id}?api-version=2021-04-12", hub.http_addr))
        .header("authorization", owner(&hub))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["tags"], json!({ "site": "a" }));
    assert_eq!(got["cloudToDeviceMessageCount"], 1);

    // The journal stops (as if the disk failed): a change is no longer answered as done.
    hub.hub.halt_persistence();
    let refused = put_device(&hub, &client, &unique("p")).await;
    assert_eq!(refused.status(), 500);
    assert_eq!(refused.headers()["iothub-errorcode"], "ServerError");
    // Reads still work.
    let read = client
        .get(format!("http://{}/devices/{id}?api-version=2021-04-12", hub.http_addr))
        .header("authorization", owner(&hub))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    hub.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A service call with the owner's token; returns the status and the JSON body (`null` if none).
async fn call(
    hub: &RunningHub,
    client: &reqwest::Client,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let url = format!("http://{}{path}?api-version=2021-04-12", hub.http_addr);
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client.request(method.clone(), url).header("authorization", owner(hub));
    if method != reqwest::Method::GET {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_and_configurations_survive_a_restart() {
    let dir = std::env::temp_dir().join(unique("iothub-persist"));
    let (hub, client) = start(&dir).await;
    let (d, d2) = (unique("pm"), unique("pm"));
    assert_eq!(put_device(&hub, &client, &d).await.status(), 200);
    let tags = json!({ "tags": { "env": "persist" } });
    assert_eq!(call(&hub, &client, "PATCH", &format!("/twins/{d}"), tags.clone()).await.0, 200);
    let (status, module) = call(&hub, &client, "PUT", &format!("/devices/{d}/modules/m1"), json!({})).await;
    assert_eq!(status, 201);
    let desired = json!({ "properties": { "desired": { "rate": 5 } } });
    assert_eq!(call(&hub, &client, "PATCH", &format!("/twins/{d}/modules/m1"), desired).await.0, 200);
    let config = json!({
        "content": { "deviceContent": { "properties.desired.firmware": "2.0" } },
        "targetCondition": "tags.env = 'persist'",
        "priority": 3,
    });
    let cid = unique("cfg").to_ascii_lowercase();
    let (status, created) = call(&hub, &client, "PUT", &format!("/configurations/{cid}"), config).await;
    assert_eq!(status, 200, "{created}");
    hub.hub.settle_configurations();
    hub.stop().await.unwrap();

    let (hub, client) = start(&dir).await;
    let (status, got) = call(&hub, &client, "GET", &format!("/devices/{d}/modules/m1"), Value::Null).await;
    assert_eq!(status, 200);
    for key in ["generationId", "etag", "authentication"] {
        assert_eq!(got[key], module[key], "{key}");
    }
    let (_, twin) = call(&hub, &client, "GET", &format!("/twins/{d}/modules/m1"), Value::Null).await;
    assert_eq!(twin["properties"]["desired"]["rate"], 5);
    let (status, got) = call(&hub, &client, "GET", &format!("/configurations/{cid}"), Value::Null).await;
    assert_eq!(status, 200);
    for key in ["etag", "content", "targetCondition", "priority", "createdTimeUtc"] {
        assert_eq!(got[key], created[key], "{key}");
    }
    assert_eq!(got["systemMetrics"]["results"], json!({ "targetedCount": 1, "appliedCount": 1 }));
    // A device that starts matching after the restart gets the recovered configuration's content.
    assert_eq!(put_device(&hub, &client, &d2).await.status(), 200);
    assert_eq!(call(&hub, &client, "PATCH", &format!("/twins/{d2}"), tags).await.0, 200);
    hub.hub.settle_configurations();
    let (_, twin) = call(&hub, &client, "GET", &format!("/twins/{d2}"), Value::Null).await;
    assert_eq!(twin["properties"]["desired"]["firmware"], "2.0");
    hub.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
