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
