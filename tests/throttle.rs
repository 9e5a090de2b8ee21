//! Tier throttling over real sockets with a Rust client: the daily message quota answers `403
//! IotHubQuotaExceeded` once used up and a hub-time jump to the next UTC day resets it; a burst of
//! queries is partly shaped and partly refused with `429 ThrottlingException` and `Retry-After`,
//! while requests whose token does not verify get `401` without spending the rate.
//! (The official SDKs' side is in `sdk.rs`: `throttle_test.js`, `throttle_test.py`.)

use iothub_emulator::HubConfig;
use iothub_emulator::throttle::{Sku, Tier};
use iothub_emulator_tests::{TestHub, unique};

async fn hub(sku: Sku) -> TestHub {
    let tier = Tier::new(sku, 1).unwrap();
    TestHub::start_with(HubConfig { throttle: Some(tier), ..HubConfig::default() }).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_f1_daily_quota_refuses_with_403002_until_the_next_utc_day() {
    let hub = hub(Sku::F1).await;
    let id = unique("quota");
    let key = hub.create_device(&id).await.unwrap();
    let url = format!("{}/devices/{id}/messages/events?api-version=2020-09-30", hub.https_url());
    // F1: 8,000 messages of 0.5 KB a day; a 256 KB message counts as 512 of them, so 15 fit.
    let body = vec![b'x'; 256 * 1024];
    let send =
        || hub.client.post(&url).header("authorization", hub.device_token(&id, &key)).body(body.clone());
    for i in 0..15 {
        assert_eq!(send().send().await.unwrap().status(), 204, "message {i}");
    }
    let refused = send().send().await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.headers()["iothub-errorcode"], "IotHubQuotaExceeded");
    let text = refused.text().await.unwrap();
    assert!(text.contains("ErrorCode:IotHubQuotaExceeded;"), "{text}");
    let stats: serde_json::Value =
        reqwest::get(format!("{}/emulator/throttle", hub.http_url())).await.unwrap().json().await.unwrap();
    assert_eq!(stats["quota"]["usedToday"], 15 * 512);
    assert_eq!(stats["quota"]["refused"], 1);
    // A day later (in hub time) the quota starts afresh.
    hub.running.hub.advance_time(24 * 3_600_000).unwrap();
    assert_eq!(send().send().await.unwrap().status(), 204);
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_burst_is_shaped_then_refused_with_429_and_retry_after() {
    let hub = hub(Sku::S1).await;
    let url = format!("{}/devices/query?api-version=2021-04-12", hub.https_url());
    let token = hub.owner_token();
    // S1 × 1: 20 queries a minute. At one instant the first passes, two are shaped (3 s and 5 s
    // later in hub time), the rest are refused.
    let query = || {
        hub.client
            .post(&url)
            .header("authorization", &token)
            .json(&serde_json::json!({"query": "SELECT * FROM devices"}))
            .send()
    };
    // Requests whose token does not verify get their 401 and spend nothing.
    for _ in 0..30 {
        let forged = hub
            .client
            .post(&url)
            .header("authorization", "SharedAccessSignature sr=x&sig=y&se=1&skn=iothubowner")
            .json(&serde_json::json!({"query": "SELECT * FROM devices"}))
            .send()
            .await
            .unwrap();
        assert_eq!(forged.status(), 401);
    }
    let answers = futures_util::future::join_all((0..5).map(|_| query())).await;
    let statuses: Vec<u16> = answers.iter().map(|r| r.as_ref().unwrap().status().as_u16()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");
    let refused = answers.into_iter().map(Result::unwrap).find(|r| r.status() == 429).expect("a 429");
    assert_eq!(refused.headers()["iothub-errorcode"], "ThrottlingException");
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=6).contains(&retry_after), "{retry_after}");
    // The metrics count the two shaped and the two refused queries (the forged ones are not
    // throttled).
    let m = crate::metrics::scrape(&hub).await.unwrap();
    let throttled = |outcome: &str| {
        m[&format!("iothub_throttled_requests_total{{operation=\"queries\",outcome=\"{outcome}\"}}")]
    };
    assert_eq!((throttled("shaped"), throttled("refused")), (2.0, 2.0));
    // Time travel past the backlog: the next query passes at once.
    hub.running.hub.advance_time(60_000).unwrap();
    assert_eq!(query().await.unwrap().status(), 200);
    hub.stop().await.unwrap();
}
