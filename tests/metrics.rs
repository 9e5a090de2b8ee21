//! `GET /metrics` over real sockets: scrape, act (registry, C2D over MQTT and HTTPS with every
//! settlement, telemetry, refused connects), scrape again, and check each counter moved by exactly
//! what was done.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use iothub_emulator_tests::TestHub;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck};

use crate::mqtt::Device;

/// One scrape: every sample line as `name{labels}` → value, after checking the format.
pub(crate) async fn scrape(hub: &TestHub) -> Result<BTreeMap<String, f64>> {
    let resp = reqwest::get(format!("{}/metrics", hub.http_url())).await?;
    if resp.status() != 200 {
        bail!("/metrics: {}", resp.status());
    }
    let ct = resp.headers()["content-type"].to_str()?.to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = resp.text().await?;
    let mut samples = BTreeMap::new();
    let mut typed = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context("TYPE line")?;
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').with_context(|| format!("bad line {line:?}"))?;
        let name = series.split('{').next().unwrap_or_default();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.get(*f).is_some_and(|k| k == "histogram")))
            .unwrap_or(name);
        assert!(typed.contains_key(family), "{line:?} before its TYPE");
        let v = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().with_context(|| format!("bad value in {line:?}"))?,
        };
        samples.insert(series.to_string(), v);
    }
    Ok(samples)
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| panic!("no {series} in the scrape"))
}

/// Device `id`'s HTTPS C2D receive: the lock token (ETag) of the next message.
async fn receive_https(hub: &TestHub, dev: &Device<'_>, key: &str) -> Result<String> {
    let url = format!("{}/devices/{}/messages/deviceBound?api-version=2021-04-12", hub.https_url(), dev.id);
    let resp = hub.client.get(url).header("authorization", hub.device_token(&dev.id, key)).send().await?;
    if resp.status() != 200 {
        bail!("receive: {}", resp.status());
    }
    Ok(resp.headers()["etag"].to_str()?.trim_matches('"').to_string())
}

#[tokio::test]
async fn counters_move_by_what_was_done() -> Result<()> {
    let hub = TestHub::start().await?;
    let before = scrape(&hub).await?;

    // Registry: two devices.
    let a = Device::create(&hub, "metrics-a").await?;
    let b = Device::create(&hub, "metrics-b").await?;
    let b_key = {
        let json = b.registry().await?;
        json.pointer("/authentication/symmetricKey/primaryKey").and_then(|k| k.as_str()).unwrap().to_string()
    };

    // MQTT: A connects, subscribes, gets 2 messages and completes them; sends 2 telemetry messages.
    let (mut c, _) = a.connect(true).await?;
    c.subscribe(&[&a.c2d_topic()]).await?;
    a.send_c2d("m1", "one").await?;
    a.send_c2d("m2", "two").await?;
    for _ in 0..2 {
        let p = c.expect_publish().await?;
        c.send(Packet::PubAck(PubAck::new(p.pkid))).await?;
    }
    let topic = format!("devices/{}/messages/events/", a.id);
    for i in 0..2 {
        c.publish(&topic, QoS::AtLeastOnce, format!("t{i}").as_bytes()).await?;
        match c.expect().await? {
            Packet::PubAck(_) => {}
            other => bail!("expected PUBACK, got {other:?}"),
        }
    }

    // HTTPS: B (never connected) gets 4 messages: one rejected, one abandoned then completed (it
    // comes back first), two purged.
    for i in 0..4 {
        b.send_c2d(&format!("b{i}"), "x").await?;
    }
    let mid = scrape(&hub).await?;
    let bucket = |m: &BTreeMap<String, f64>, le: &str| {
        get(m, &format!("iothub_c2d_queue_depth_bucket{{le=\"{le}\"}}"))
    };
    assert_eq!(get(&mid, "iothub_c2d_queue_depth_sum") - get(&before, "iothub_c2d_queue_depth_sum"), 4.0);
    assert_eq!(bucket(&mid, "2") - bucket(&mid, "1"), 0.0, "B holds 4: not in le=2");
    assert!(bucket(&mid, "5") - bucket(&mid, "2") >= 1.0, "B holds 4: in le=5");
    let base = format!("{}/devices/{}/messages/deviceBound", hub.https_url(), b.id);
    let token = hub.device_token(&b.id, &b_key);
    let lock = receive_https(&hub, &b, &b_key).await?;
    let r = hub
        .client
        .delete(format!("{base}/{lock}?reject&api-version=2021-04-12"))
        .header("authorization", &token)
        .send()
        .await?;
    assert_eq!(r.status(), 204);
    let lock = receive_https(&hub, &b, &b_key).await?;
    let r = hub
        .client
        .post(format!("{base}/{lock}/abandon?api-version=2021-04-12"))
        .header("authorization", &token)
        .send()
        .await?;
    assert_eq!(r.status(), 204);
    let lock = receive_https(&hub, &b, &b_key).await?;
    let r = hub
        .client
        .delete(format!("{base}/{lock}?api-version=2021-04-12"))
        .header("authorization", &token)
        .send()
        .await?;
    assert_eq!(r.status(), 204);
    let purge = format!("{}/devices/{}/commands?api-version=2021-04-12", hub.https_url(), b.id);
    let r = hub.client.delete(purge).header("authorization", hub.owner_token()).send().await?;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);

    // Refused connects: a forged token, a wrong user name.
    let other = Device::create(&hub, "metrics-other").await?;
    let forged = hub.device_token(&a.id, "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=");
    let (_c2, ack) = other.connect_with(other.connect_packet(&forged, true, 60)).await?;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    let mut wrong_user = other.connect_packet(&forged, true, 60);
    wrong_user.login.as_mut().unwrap().username = "nobody".into();
    assert_eq!(other.connect_with(wrong_user).await?.1.code, ConnectReturnCode::BadUserNamePassword);

    let after = scrape(&hub).await?;
    let delta = |series: &str| get(&after, series) - get(&before, series);
    assert_eq!(delta("iothub_registered_devices"), 3.0, "a, b, other");
    assert_eq!(get(&after, "iothub_connected_devices"), 1.0);
    assert_eq!(get(&after, "iothub_device_connections{protocol=\"mqtt\"}"), 1.0);
    assert_eq!(delta("iothub_c2d_messages_sent_total"), 6.0);
    assert_eq!(delta("iothub_c2d_messages_delivered_total"), 5.0, "2 over MQTT, 3 over HTTPS");
    assert_eq!(delta("iothub_c2d_messages_completed_total"), 3.0);
    assert_eq!(delta("iothub_c2d_messages_rejected_total"), 1.0);
    assert_eq!(delta("iothub_c2d_messages_abandoned_total"), 1.0);
    assert_eq!(delta("iothub_c2d_messages_purged_total"), 2.0);
    assert_eq!(delta("iothub_c2d_messages_expired_total"), 0.0);
    assert_eq!(delta("iothub_c2d_messages_dead_lettered_total"), 0.0);
    assert_eq!(get(&after, "iothub_c2d_queue_depth_sum"), get(&before, "iothub_c2d_queue_depth_sum"));
    assert_eq!(get(&after, "iothub_c2d_queue_depth_count"), get(&after, "iothub_registered_devices"));
    // Every message asked for full feedback.
    assert_eq!(delta("iothub_feedback_records_total{status=\"Success\"}"), 3.0);
    assert_eq!(delta("iothub_feedback_records_total{status=\"Rejected\"}"), 1.0);
    assert_eq!(delta("iothub_feedback_records_total{status=\"Purged\"}"), 2.0);
    assert_eq!(delta("iothub_telemetry_messages_received_total"), 2.0);
    let refused =
        |reason: &str| format!("iothub_connections_refused_total{{protocol=\"mqtt\",reason=\"{reason}\"}}");
    assert_eq!(delta(&refused("not_authorized")), 1.0);
    assert_eq!(delta(&refused("bad_username_password")), 1.0);
    assert_eq!(delta(&refused("throttled")), 0.0);
    // Latency: every HTTPS C2D send and the MQTT telemetry were timed.
    let count = |p: &str, o: &str| {
        after
            .get(&format!("iothub_request_duration_seconds_count{{protocol=\"{p}\",operation=\"{o}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    assert_eq!(count("https", "c2d_send"), 6.0);
    assert_eq!(count("https", "c2d_receive"), 3.0);
    assert_eq!(count("https", "c2d_settle"), 3.0);
    assert_eq!(count("mqtt", "d2c_send"), 2.0);
    assert_eq!(count("mqtt", "c2d_settle"), 2.0);
    assert_eq!(count("mqtt", "connect"), 3.0, "one accepted, two refused");
    assert_eq!(count("https", "registry_write"), 3.0);
    assert_eq!(count("https", "registry_read"), 1.0, "b.registry()");
    let inf = after["iothub_request_duration_seconds_bucket{protocol=\"https\",operation=\"c2d_send\",le=\"+Inf\"}"];
    assert_eq!(inf, 6.0);
    drop(c);
    hub.stop().await
}
