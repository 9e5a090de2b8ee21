//! SAS authentication over HTTPS: forged, expired, wrongly scoped and disabled-device tokens are
//! refused with 401 and IoT Hub's error body; rights are enforced per policy.

use iothub_emulator_tests::{TestHub, now_secs, unique};
use serde_json::Value;

async fn assert_401(resp: reqwest::Response, what: &str) -> Value {
    assert_eq!(resp.status(), 401, "{what}");
    let code = resp.headers().get("iothub-errorcode").map(|v| v.to_str().unwrap().to_string());
    let body: Value = resp.json().await.unwrap();
    let message = body["Message"].as_str().unwrap_or_default();
    assert!(message.starts_with("ErrorCode:IotHubUnauthorized"), "{what}: {body}");
    assert_eq!(code.as_deref(), message.strip_prefix("ErrorCode:").and_then(|m| m.split(';').next()));
    assert!(body["ExceptionMessage"].as_str().unwrap().starts_with("Tracking ID:"), "{what}: {body}");
    body
}

#[tokio::test]
async fn refused_tokens_get_401_with_iothub_error_body() {
    let hub = TestHub::start().await.unwrap();
    let id = unique("auth");
    let key = hub.create_device(&id).await.unwrap();
    let url = format!("{}/devices/{id}/messages/deviceBound?api-version=2021-04-12", hub.https_url());
    let get = |token: String| hub.client.get(&url).header("authorization", token).send();

    // The device's own valid token works (204: nothing queued).
    assert_eq!(get(hub.device_token(&id, &key)).await.unwrap().status(), 204);

    // Forged: signed with a key that is not the device's.
    let forged = hub.device_token(&id, &iothub_emulator::sas::generate_key());
    assert_401(get(forged).await.unwrap(), "forged").await;

    // Expired beyond the skew (default 5 minutes).
    let expired = hub.device_token_at(&id, &key, now_secs() - 600);
    let body = assert_401(get(expired).await.unwrap(), "expired").await;
    assert!(body["Message"].as_str().unwrap().contains("expired"), "{body}");

    // Within the skew still works.
    assert_eq!(get(hub.device_token_at(&id, &key, now_secs() - 60)).await.unwrap().status(), 204);

    // Wrongly scoped: another device's valid token.
    let other = unique("auth-other");
    let other_key = hub.create_device(&other).await.unwrap();
    assert_401(get(hub.device_token(&other, &other_key)).await.unwrap(), "other device").await;

    // Tampered signature text.
    let mut tampered = hub.device_token(&id, &key);
    tampered = tampered.replacen("sig=", "sig=A", 1);
    assert_401(get(tampered).await.unwrap(), "tampered").await;

    // No Authorization header at all.
    assert_401(hub.client.get(&url).send().await.unwrap(), "missing").await;

    // Disabled device: its valid token is refused.
    let dev = hub.running.hub.get_device(&id).unwrap();
    let etag = dev["etag"].as_str().unwrap().to_string();
    let resp = hub
        .client
        .put(format!("{}/devices/{id}", hub.https_url()))
        .header("authorization", hub.owner_token())
        .header("if-match", format!("\"{etag}\""))
        .json(&serde_json::json!({"deviceId": id, "status": "disabled",
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = assert_401(get(hub.device_token(&id, &key)).await.unwrap(), "disabled").await;
    assert!(body["Message"].as_str().unwrap().contains("disabled"), "{body}");
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn secondary_key_and_policy_rights() {
    let hub = TestHub::start().await.unwrap();
    let id = unique("rights");
    hub.create_device(&id).await.unwrap();
    let dev = hub.running.hub.get_device(&id).unwrap();
    let secondary = dev["authentication"]["symmetricKey"]["secondaryKey"].as_str().unwrap().to_string();
    let url = format!("{}/devices/{id}/messages/deviceBound", hub.https_url());
    let resp = hub.client.get(&url).header("authorization", hub.device_token(&id, &secondary)).send().await;
    assert_eq!(resp.unwrap().status(), 204, "the secondary key authenticates too");

    // registryRead may read but not write; service may not read the registry list's keys... but may
    // query twins; device policy may not call service APIs.
    let devices = format!("{}/devices/{id}", hub.https_url());
    let read =
        hub.client.get(&devices).header("authorization", hub.policy_token("registryRead")).send().await;
    assert_eq!(read.unwrap().status(), 200);
    let write = hub
        .client
        .put(format!("{}/devices/{}", hub.https_url(), unique("nope")))
        .header("authorization", hub.policy_token("registryRead"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_401(write, "registryRead writing").await;
    let rw = hub
        .client
        .put(format!("{}/devices/{}", hub.https_url(), unique("ok")))
        .header("authorization", hub.policy_token("registryReadWrite"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(rw.status(), 200);
    let dev_policy =
        hub.client.get(&devices).header("authorization", hub.policy_token("device")).send().await;
    assert_401(dev_policy.unwrap(), "device policy on the registry").await;

    // A device-policy token scoped to the device may act as that device.
    let p = hub.running.hub.policies().iter().find(|p| p.name == "device").unwrap().clone();
    let scoped = iothub_emulator::sas::make_token(
        &format!("{}/devices/{id}", hub.hostname()),
        &p.primary_key,
        Some("device"),
        now_secs() + 60,
    )
    .unwrap();
    let resp = hub.client.get(&url).header("authorization", scoped).send().await.unwrap();
    assert_eq!(resp.status(), 204);

    // A token for another hub name is refused.
    let owner = hub.running.hub.policies().iter().find(|p| p.name == "iothubowner").unwrap().clone();
    let foreign = iothub_emulator::sas::make_token(
        "otherhub.azure-devices.net",
        &owner.primary_key,
        Some("iothubowner"),
        now_secs() + 60,
    )
    .unwrap();
    assert_401(
        hub.client.get(&devices).header("authorization", foreign).send().await.unwrap(),
        "foreign hub",
    )
    .await;
    hub.stop().await.unwrap();
}
