//! Registry and twin REST API against a hub on port 0, with a Rust HTTPS client trusting the hub's CA.

use iothub_emulator_tests::{TestHub, unique};
use serde_json::{Value, json};

struct Api<'a> {
    hub: &'a TestHub,
}

impl Api<'_> {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, String)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .hub
            .client
            .request(method, format!("{}{path}", self.hub.https_url()))
            .header("authorization", self.hub.owner_token());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() };
        (status, headers, body)
    }
}

fn error_code(headers: &reqwest::header::HeaderMap) -> String {
    headers.get("iothub-errorcode").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn device_crud_etags_and_errors() {
    let hub = TestHub::start().await.unwrap();
    let api = Api { hub: &hub };
    let id = unique("crud");
    let (s, h, created) = api.call(reqwest::Method::PUT, &format!("/devices/{id}?api-version=2021-04-12"),
        Some(json!({"deviceId": id, "status": "enabled", "authentication": {"symmetricKey": {}, "type": "sas"}})), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h.get("content-type").unwrap(), "application/json; charset=utf-8");
    let pk = created["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    assert_eq!(pk.len(), 44, "generated keys are 32 bytes of base64");
    assert_eq!(created["connectionState"], "Disconnected");
    assert_eq!(created["generationId"].as_str().unwrap().len(), 18);

    let (s, h, body) = api.call(reqwest::Method::PUT, &format!("/devices/{id}"), Some(json!({})), &[]).await;
    assert_eq!((s, error_code(&h).as_str()), (409, "DeviceAlreadyExists"), "{body}");

    let etag = created["etag"].as_str().unwrap().to_string();
    let (s, h, _) = api
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{id}"),
            Some(json!({"status": "disabled"})),
            &[("if-match", "\"stale\"".to_string())],
        )
        .await;
    assert_eq!((s, error_code(&h).as_str()), (412, "PreconditionFailed"));
    let (s, _, updated) = api
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{id}"),
            Some(json!({"status": "disabled", "statusReason": "maintenance"})),
            &[("if-match", format!("\"{etag}\""))],
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(updated["status"], "disabled");
    assert_ne!(updated["etag"], created["etag"]);
    assert_eq!(updated["generationId"], created["generationId"]);

    // Paths are case-insensitive, ids are not.
    let (s, _, got) = api.call(reqwest::Method::GET, &format!("/DEVICES/{id}"), None, &[]).await;
    assert_eq!((s, got["deviceId"].as_str()), (200, Some(id.as_str())));
    let (s, h, _) =
        api.call(reqwest::Method::GET, &format!("/devices/{}", id.to_uppercase()), None, &[]).await;
    assert_eq!((s, error_code(&h).as_str()), (404, "DeviceNotFound"));

    let (s, h, body) = api.call(reqwest::Method::PUT, "/devices/bad%20id", Some(json!({})), &[]).await;
    assert_eq!((s, error_code(&h).as_str()), (400, "ArgumentInvalid"), "{body}");
    let (s, _, body) = api
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{}", unique("k")),
            Some(json!({"authentication": {"symmetricKey": {"primaryKey": "not base64!"}}})),
            &[],
        )
        .await;
    assert_eq!(s, 400, "{body}");

    let (s, _, list) = api.call(reqwest::Method::GET, "/devices/?top=5", None, &[]).await;
    assert_eq!(s, 200);
    assert!(list.as_array().unwrap().iter().any(|d| d["deviceId"] == id.as_str()));

    let (s, h, _) = api
        .call(reqwest::Method::DELETE, &format!("/devices/{id}"), None, &[("if-match", "\"nope\"".into())])
        .await;
    assert_eq!((s, error_code(&h).as_str()), (412, "PreconditionFailed"));
    let (s, _, _) =
        api.call(reqwest::Method::DELETE, &format!("/devices/{id}"), None, &[("if-match", "*".into())]).await;
    assert_eq!(s, 204);
    let (s, h, _) = api.call(reqwest::Method::DELETE, &format!("/devices/{id}"), None, &[]).await;
    assert_eq!((s, error_code(&h).as_str()), (404, "DeviceNotFound"));

    // Import/export jobs (blob storage) are not emulated; scheduled jobs (/jobs/v2) are.
    let (s, h, _) = api.call(reqwest::Method::POST, "/jobs/create", Some(json!({})), &[]).await;
    assert_eq!((s, error_code(&h).as_str()), (501, "NotImplemented"));
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn bulk_import_query_paging_and_count() {
    let hub = TestHub::start().await.unwrap();
    let api = Api { hub: &hub };
    let prefix = unique("bulk");
    for batch in 0..11 {
        let ops: Vec<Value> = (0..100)
            .map(|i| {
                json!({"id": format!("{prefix}-{:04}", batch * 100 + i), "importMode": "create",
                "tags": {"group": if i % 2 == 0 { "even" } else { "odd" }}})
            })
            .collect();
        let (s, _, body) = api.call(reqwest::Method::POST, "/devices", Some(Value::Array(ops)), &[]).await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["isSuccessful"], true);
    }
    // A bulk call with one failing op reports it and still applies the rest.
    let ops = json!([{"id": format!("{prefix}-0000"), "importMode": "create"}, {"id": format!("{prefix}-x"), "importMode": "create"}]);
    let (s, _, body) = api.call(reqwest::Method::POST, "/devices", Some(ops), &[]).await;
    assert_eq!(s, 400);
    assert_eq!(body["errors"][0]["errorCode"], "DeviceAlreadyExists");
    let dup = json!([{"id": "a", "importMode": "create"}, {"id": "a", "importMode": "delete"}]);
    let (s, h, _) = api.call(reqwest::Method::POST, "/devices", Some(dup), &[]).await;
    assert_eq!((s, error_code(&h).as_str()), (400, "DeviceDefinedMultipleTimes"));

    // Page through all 1,101 devices with x-ms-continuation; each appears exactly once.
    let query = json!({"query": format!("SELECT * FROM devices WHERE deviceId >= '{prefix}' AND deviceId < '{prefix}-~'")});
    let mut seen = std::collections::BTreeSet::new();
    let mut continuation: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut headers = vec![("x-ms-max-item-count", "400".to_string())];
        if let Some(c) = &continuation {
            headers.push(("x-ms-continuation", c.clone()));
        }
        let (s, h, page) =
            api.call(reqwest::Method::POST, "/devices/query", Some(query.clone()), &headers).await;
        assert_eq!(s, 200, "{page}");
        assert_eq!(h.get("x-ms-item-type").unwrap(), "Twin");
        let items = page.as_array().unwrap();
        assert!(items.len() <= 400);
        for t in items {
            assert!(seen.insert(t["deviceId"].as_str().unwrap().to_string()), "duplicate {t}");
        }
        pages += 1;
        continuation = h.get("x-ms-continuation").map(|v| v.to_str().unwrap().to_string());
        if continuation.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 1101);
    assert!(pages >= 3);

    let count = json!({"query": "SELECT COUNT() AS n FROM devices WHERE tags.group = 'even'"});
    let (s, _, body) = api.call(reqwest::Method::POST, "/devices/query", Some(count), &[]).await;
    assert_eq!((s, &body), (200, &json!([{"n": 550}])));
    let bad = json!({"query": "SELECT * FROM devices WHERE"});
    let (s, h, body) = api.call(reqwest::Method::POST, "/devices/query", Some(bad), &[]).await;
    assert_eq!((s, error_code(&h).as_str()), (400, "ArgumentInvalid"), "{body}");

    let (s, _, stats) = api.call(reqwest::Method::GET, "/statistics/devices", None, &[]).await;
    assert_eq!(s, 200);
    assert_eq!(stats["totalDeviceCount"], 1101);
    assert_eq!(stats["enabledDeviceCount"], 1101);
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn twins_patch_replace_and_etags() {
    let hub = TestHub::start().await.unwrap();
    let api = Api { hub: &hub };
    let id = unique("twin");
    hub.create_device(&id).await.unwrap();
    let (s, _, twin) = api.call(reqwest::Method::GET, &format!("/twins/{id}"), None, &[]).await;
    assert_eq!(s, 200);
    assert_eq!(twin["properties"]["desired"]["$version"], 1);
    let etag = twin["etag"].as_str().unwrap().to_string();

    let patch = json!({"tags": {"site": "lab"}, "properties": {"desired": {"fw": {"version": "2.0"}}}});
    let (s, _, twin) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/twins/{id}"),
            Some(patch.clone()),
            &[("if-match", format!("\"{etag}\""))],
        )
        .await;
    assert_eq!(s, 200, "{twin}");
    assert_eq!(twin["tags"]["site"], "lab");
    assert_eq!(twin["properties"]["desired"]["fw"]["version"], "2.0");
    assert_eq!(twin["properties"]["desired"]["$version"], 2);
    let (s, h, _) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/twins/{id}"),
            Some(patch),
            &[("if-match", format!("\"{etag}\""))],
        )
        .await;
    assert_eq!((s, error_code(&h).as_str()), (412, "PreconditionFailed"));

    let (s, _, twin) = api
        .call(
            reqwest::Method::PUT,
            &format!("/twins/{id}"),
            Some(json!({"properties": {"desired": {"mode": "eco"}}})),
            &[],
        )
        .await;
    assert_eq!(s, 200);
    assert!(twin["tags"].as_object().unwrap().is_empty());
    assert_eq!(twin["properties"]["desired"]["mode"], "eco");
    assert!(twin["properties"]["desired"].get("fw").is_none());
    assert_eq!(twin["properties"]["desired"]["$version"], 3);

    let (s, _, body) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/twins/{id}"),
            Some(json!({"properties": {"reported": {"x": 1}}})),
            &[],
        )
        .await;
    assert_eq!(s, 400, "{body}");
    hub.stop().await.unwrap();
}
