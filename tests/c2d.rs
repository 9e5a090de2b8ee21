//! Cloud-to-device messaging over HTTPS: the service send extension, device receive with a lock,
//! complete / reject / abandon, the 50-message queue limit, expiry, purge and feedback.

use iothub_emulator::HubConfig;
use iothub_emulator_tests::{TestHub, unique};
use serde_json::Value;

struct Device<'a> {
    hub: &'a TestHub,
    id: String,
    token: String,
}

impl<'a> Device<'a> {
    async fn new(hub: &'a TestHub) -> Device<'a> {
        let id = unique("c2d");
        let key = hub.create_device(&id).await.unwrap();
        let token = hub.device_token(&id, &key);
        Device { hub, id, token }
    }

    async fn send(&self, body: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self
            .hub
            .client
            .post(format!("{}/devices/{}/messages/deviceBound", self.hub.https_url(), self.id))
            .header("authorization", self.hub.owner_token())
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    async fn receive(&self) -> reqwest::Response {
        let url = format!(
            "{}/devices/{}/messages/devicebound?api-version=2021-04-12",
            self.hub.https_url(),
            self.id
        );
        self.hub.client.get(url).header("authorization", &self.token).send().await.unwrap()
    }

    async fn settle(&self, lock: &str, how: &str) -> u16 {
        let base = format!("{}/devices/{}/messages/deviceBound/{lock}", self.hub.https_url(), self.id);
        let req = match how {
            "complete" => self.hub.client.delete(base),
            "reject" => self.hub.client.delete(format!("{base}?api-version=2021-04-12&reject")),
            _ => self.hub.client.post(format!("{base}/abandon")),
        };
        req.header("authorization", &self.token)
            .header("if-match", lock)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

async fn feedback(hub: &TestHub) -> Vec<Value> {
    let url = format!("{}/messages/serviceBound/feedback", hub.https_url());
    let mut records = Vec::new();
    loop {
        let resp = hub.client.get(&url).header("authorization", hub.owner_token()).send().await.unwrap();
        if resp.status() == 204 {
            return records;
        }
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "content-type"), "application/vnd.microsoft.iothub.feedback.json");
        let lock = header(&resp, "etag").trim_matches('"').to_string();
        let batch: Vec<Value> = resp.json().await.unwrap();
        records.extend(batch);
        let done = hub
            .client
            .delete(format!("{url}/{lock}"))
            .header("authorization", hub.owner_token())
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 204);
    }
}

#[tokio::test]
async fn receive_settle_and_feedback() {
    let hub = TestHub::start_with(HubConfig { feedback_batch_interval_ms: 0, ..HubConfig::default() })
        .await
        .unwrap();
    let dev = Device::new(&hub).await;
    assert_eq!(dev.receive().await.status(), 204, "empty queue");
    for (n, ack) in [("m1", "full"), ("m2", "negative"), ("m3", "positive")] {
        let resp = dev
            .send(
                &format!("body-{n}"),
                &[("iothub-messageid", n), ("iothub-ack", ack), ("iothub-app-color", "red")],
            )
            .await;
        assert_eq!(resp.status(), 204);
    }
    let m1 = dev.receive().await;
    assert_eq!(m1.status(), 200);
    assert_eq!(header(&m1, "iothub-messageid"), "m1");
    assert_eq!(header(&m1, "iothub-app-color"), "red");
    assert_eq!(header(&m1, "iothub-ack"), "full");
    assert_eq!(header(&m1, "iothub-sequencenumber"), "1");
    assert_eq!(header(&m1, "iothub-to"), format!("/devices/{}/messages/deviceBound", dev.id));
    let lock1 = header(&m1, "etag").trim_matches('"').to_string();
    assert_eq!(m1.text().await.unwrap(), "body-m1");

    let m2 = dev.receive().await;
    assert_eq!(header(&m2, "iothub-messageid"), "m2", "m1 is locked, so m2 comes next");
    let lock2 = header(&m2, "etag").trim_matches('"').to_string();
    assert_eq!(dev.settle(&lock1, "complete").await, 204);
    assert_eq!(dev.settle(&lock1, "complete").await, 412, "a settled lock is gone");
    assert_eq!(dev.settle(&lock2, "abandon").await, 204);
    let again = dev.receive().await;
    assert_eq!(header(&again, "iothub-messageid"), "m2");
    assert_eq!(header(&again, "iothub-deliverycount"), "1");
    let lock2b = header(&again, "etag").trim_matches('"').to_string();
    assert_eq!(dev.settle(&lock2b, "reject").await, 204);
    let m3 = dev.receive().await;
    let lock3 = header(&m3, "etag").trim_matches('"').to_string();
    assert_eq!(dev.settle(&lock3, "complete").await, 204);
    assert_eq!(dev.receive().await.status(), 204);

    // Abandoning a feedback batch makes it come back with the same records.
    let url = format!("{}/messages/serviceBound/feedback", hub.https_url());
    let first = hub.client.get(&url).header("authorization", hub.owner_token()).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let lock = header(&first, "etag").trim_matches('"').to_string();
    let first_body: Value = first.json().await.unwrap();
    let abandon = hub
        .client
        .post(format!("{url}/{lock}/abandon"))
        .header("authorization", hub.owner_token())
        .send()
        .await
        .unwrap();
    assert_eq!(abandon.status(), 204);
    let again = hub.client.get(&url).header("authorization", hub.owner_token()).send().await.unwrap();
    assert_eq!(header(&again, "iothub-deliverycount"), "1");
    let again_lock = header(&again, "etag").trim_matches('"').to_string();
    assert_eq!(again.json::<Value>().await.unwrap(), first_body);
    let retry =
        hub.client.post(format!("{url}/{lock}/abandon")).header("authorization", hub.owner_token()).send();
    assert_eq!(retry.await.unwrap().status(), 412, "the old lock token is gone");
    let abandon =
        hub.client.post(format!("{url}/{again_lock}/abandon")).header("authorization", hub.owner_token());
    assert_eq!(abandon.send().await.unwrap().status(), 204);

    let mut fb = feedback(&hub).await;
    fb.sort_by_key(|r| r["originalMessageId"].as_str().unwrap().to_string());
    let got: Vec<(&str, &str)> = fb
        .iter()
        .map(|r| (r["originalMessageId"].as_str().unwrap(), r["statusCode"].as_str().unwrap()))
        .collect();
    assert_eq!(got, vec![("m1", "Success"), ("m2", "Rejected"), ("m3", "Success")]);
    assert!(fb.iter().all(|r| r["deviceId"] == dev.id.as_str()));
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn queue_limit_expiry_and_purge() {
    let hub = TestHub::start_with(HubConfig { feedback_batch_interval_ms: 0, ..HubConfig::default() })
        .await
        .unwrap();
    let dev = Device::new(&hub).await;
    for i in 0..50 {
        assert_eq!(
            dev.send(&format!("{i}"), &[("iothub-ack", "negative"), ("iothub-messageid", &format!("q{i}"))])
                .await
                .status(),
            204
        );
    }
    let refused = dev.send("51st", &[]).await;
    assert_eq!(refused.status(), 403);
    assert_eq!(header(&refused, "iothub-errorcode"), "DeviceMaximumQueueDepthExceeded");
    let twin = hub.running.hub.get_device(&dev.id).unwrap();
    assert_eq!(twin["cloudToDeviceMessageCount"], 50);

    let purge = hub
        .client
        .delete(format!("{}/devices/{}/commands", hub.https_url(), dev.id))
        .header("authorization", hub.owner_token())
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 200);
    let body: Value = purge.json().await.unwrap();
    assert_eq!(body["totalMessagesPurged"], 50);
    let fb = feedback(&hub).await;
    assert_eq!(fb.len(), 50);
    assert!(fb.iter().all(|r| r["statusCode"] == "Purged"));

    // An expiry in the past: never delivered, Expired feedback.
    let resp = dev
        .send(
            "late",
            &[
                ("iothub-expiry", "2020-01-01T00:00:00Z"),
                ("iothub-ack", "full"),
                ("iothub-messageid", "late"),
            ],
        )
        .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(dev.receive().await.status(), 204);
    let fb = feedback(&hub).await;
    assert_eq!(fb.len(), 1);
    assert_eq!(
        (fb[0]["originalMessageId"].as_str(), fb[0]["statusCode"].as_str()),
        (Some("late"), Some("Expired"))
    );

    // An expiry beyond 2 days is refused; a huge message is refused.
    let far = dev.send("x", &[("iothub-expiry", "2999-01-01T00:00:00Z")]).await;
    assert_eq!(
        (far.status().as_u16(), header(&far, "iothub-errorcode")),
        (403, "InvalidMessageExpiryTime".into())
    );
    let big = dev.send(&"x".repeat(70 * 1024), &[]).await;
    assert_eq!((big.status().as_u16(), header(&big, "iothub-errorcode")), (413, "MessageTooLarge".into()));
    let missing = hub
        .client
        .post(format!("{}/devices/{}/messages/deviceBound", hub.https_url(), unique("missing")))
        .header("authorization", hub.owner_token())
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (missing.status().as_u16(), header(&missing, "iothub-errorcode")),
        (404, "DeviceNotFound".into())
    );
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn device_http_telemetry_is_recorded() {
    let hub = TestHub::start().await.unwrap();
    let dev = Device::new(&hub).await;
    let resp = hub
        .client
        .post(format!("{}/devices/{}/messages/events?api-version=2021-04-12", hub.https_url(), dev.id))
        .header("authorization", &dev.token)
        .header("iothub-messageid", "t1")
        .header("iothub-app-temp", "21")
        .body("{\"t\":21}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let read =
        reqwest::get(format!("{}/emulator/telemetry?deviceId={}", hub.http_url(), dev.id)).await.unwrap();
    let items: Vec<Value> = read.json().await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["body"], "{\"t\":21}");
    assert_eq!(items[0]["properties"]["temp"], "21");
    assert_eq!(items[0]["systemProperties"]["message-id"], "t1", "the same name MQTT telemetry uses");
    hub.stop().await.unwrap();
}

/// Sends `request` on a fresh plain-port connection and returns the response's head, byte for byte.
async fn raw_exchange(hub: &TestHub, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(hub.running.http_addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the hub closed after {:?}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test]
async fn application_property_names_keep_their_case_over_http_both_ways() {
    let hub = TestHub::start().await.unwrap();
    let dev = Device::new(&hub).await;
    // D2C: the names are recorded as the device spelled them.
    let body = "{}";
    let d2c = format!(
        "POST /devices/{}/messages/events?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: {}\r\niothub-app-firmwareChannel: Beta\r\nIOTHUB-APP-MixedCase: x\r\n\
         iothub-app-lower: y\r\nContent-Length: {}\r\n\r\n{body}",
        dev.id,
        dev.token,
        body.len()
    );
    let head = raw_exchange(&hub, &d2c).await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    let got = hub.running.hub.read_telemetry(Some(&dev.id), 0, 10);
    assert_eq!(got.len(), 1);
    let names: Vec<&str> = got[0].properties.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["firmwareChannel", "MixedCase", "lower"]);
    let json: Vec<Value> = reqwest::get(format!("{}/emulator/telemetry?deviceId={}", hub.http_url(), dev.id))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json[0]["properties"]["firmwareChannel"], "Beta");

    // C2D sent through the REST extension with mixed-case names comes back to an HTTP device with
    // the same spellings, exactly.
    let send = format!(
        "POST /devices/{}/messages/deviceBound HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\n\
         iothub-app-firmwareChannel: Beta\r\niothub-app-lower: z\r\nContent-Length: 2\r\n\r\nhi",
        dev.id,
        hub.owner_token()
    );
    let head = raw_exchange(&hub, &send).await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    let receive = format!(
        "GET /devices/{}/messages/devicebound?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: {}\r\n\r\n",
        dev.id, dev.token
    );
    let head = raw_exchange(&hub, &receive).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("\r\niothub-app-firmwareChannel: Beta\r\n"), "{head}");
    assert!(head.contains("\r\niothub-app-lower: z\r\n"), "{head}");
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn http_batches_land_in_the_devices_partition_in_order_with_runtime_information() {
    let hub = TestHub::start().await.unwrap();
    let dev = Device::new(&hub).await;
    let batch = serde_json::json!([
        {"body": "b25l", "properties": {"iothub-app-Seq": "1"}},
        {"body": "dHdv", "properties": {"Seq": "2"}},
    ]);
    let resp = hub
        .client
        .post(format!("{}/devices/{}/messages/events?api-version=2021-04-12", hub.https_url(), dev.id))
        .header("authorization", &dev.token)
        .header("content-type", "application/vnd.microsoft.iothub.json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let partition = iothub_emulator::hub::events::partition_for(&dev.id, hub.running.hub.partition_count());
    let items: Vec<Value> =
        reqwest::get(format!("{}/emulator/telemetry?deviceId={}", hub.http_url(), dev.id))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let bodies: Vec<&str> = items.iter().map(|m| m["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["one", "two"]);
    assert_eq!(items[0]["properties"]["Seq"], "1", "batch property names keep their case too");
    for (k, m) in items.iter().enumerate() {
        assert_eq!(m["eventHub"]["partitionId"], partition.to_string(), "{m}");
        assert_eq!(m["eventHub"]["sequenceNumber"], k, "the first records of that partition: {m}");
    }
    let eh: Value =
        reqwest::get(format!("{}/emulator/event-hub", hub.http_url())).await.unwrap().json().await.unwrap();
    let p = &eh["partitions"][partition];
    assert_eq!(p["lastEnqueuedSequenceNumber"], 1, "{eh}");
    assert_eq!(p["lastEnqueuedOffset"], items[1]["eventHub"]["offset"], "{eh}");
    assert_eq!(p["isEmpty"], false, "{eh}");
    assert_eq!(eh["lastTelemetrySequenceNumber"], items[1]["sequenceNumber"], "{eh}");
    hub.stop().await.unwrap();
}
