//! The release command's service side against a real hub: the device query pages past 1,000,
//! every selected device gets an update notice with `iothub-ack: full` over AMQP (one case over
//! REST), and the summary counts what the feedback says. Devices settle their messages directly on
//! the hub here, so every outcome (completed, rejected, purged) is exercised deterministically.
//! The AMQP client's error mapping is checked against the hub too.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use iothub_emulator::HubConfig;
use iothub_emulator::c2d::Settlement;
use iothub_emulator_tests::{TestHub, unique};
use simulated_devices::amqp_client::{AmqpError, AmqpService};
use simulated_devices::fleet::{self, IdPattern, Shard};
use simulated_devices::notice::UpdateNotice;
use simulated_devices::release::{ReleaseOptions, notify_devices};
use simulated_devices::service_client::C2dSend;

use crate::fleet::{amqp_endpoint, service};

/// More than one query page (IoT Hub pages at 1,000).
const DEVICES: u64 = 1_050;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_over_amqp_reaches_every_device_past_one_query_page_and_counts_the_feedback() -> Result<()> {
    let hub =
        TestHub::start_with(HubConfig { feedback_batch_interval_ms: 50, ..HubConfig::default() }).await?;
    let svc = service(&hub)?;
    let pattern: IdPattern = format!("{}-{{n:04}}", unique("rel")).parse()?;
    let ids = fleet::device_ids(&pattern, DEVICES, Shard::default());
    fleet::seed(&svc, "c2VlZC1mb3ItdGhlLXJlbGVhc2UtdGVzdA==", &ids, 4).await?;
    ensure!(svc.device_ids(None).await?.len() == DEVICES as usize, "seeding registered every device");

    let notice = UpdateNotice {
        version: "2.0.0".into(),
        url: "ftp://h/app-2.0.0.tar.gz".into(),
        sha256: "ab".into(),
        size: 1,
        name: None,
    };
    let opts = ReleaseOptions {
        timeout: Duration::from_secs(30),
        poll_interval: Duration::from_millis(50),
        amqp: Some(amqp_endpoint(&hub)),
        ..Default::default()
    };
    let run = {
        let (svc, notice) = (svc.clone(), notice.clone());
        tokio::spawn(async move { notify_devices(&svc, &notice, &opts).await })
    };

    // Settle each device's notice as it arrives: a third complete, a third reject, a third purged.
    let h = &hub.running.hub;
    let mut pending: Vec<(usize, &String)> = ids.iter().enumerate().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !pending.is_empty() {
        ensure!(tokio::time::Instant::now() < deadline, "{} notices never arrived", pending.len());
        let mut left = Vec::new();
        for (k, id) in pending {
            if k % 3 == 2 {
                if h.purge_c2d(id)? == 0 {
                    left.push((k, id));
                }
                continue;
            }
            match h.receive_c2d(id, 60_000)? {
                Some(d) => {
                    let body: UpdateNotice =
                        serde_json::from_slice(&d.message.body).context("the body is a notice")?;
                    ensure!(body == notice, "device {id} got {body:?}");
                    ensure!(d.message.ack == iothub_emulator::c2d::AckMode::Full, "ack full is asked for");
                    let how = if k % 3 == 0 { Settlement::Complete } else { Settlement::Reject };
                    h.settle_c2d(id, d.lock_token, how)?;
                }
                None => left.push((k, id)),
            }
        }
        pending = left;
        tokio::task::yield_now().await;
    }

    let summary = run.await??;
    let third = DEVICES as usize / 3;
    ensure!(summary.targeted == DEVICES as usize && summary.sent == DEVICES as usize, "{summary}");
    ensure!(
        summary.completed == third && summary.rejected == third && summary.dead_lettered == third,
        "{summary}"
    );
    ensure!(summary.expired == 0 && summary.not_final == 0 && summary.send_failed == 0, "{summary}");
    hub.stop().await
}

#[tokio::test]
async fn release_over_rest_with_a_where_filter_only_targets_matching_devices_and_reports_unsettled_ones()
-> Result<()> {
    let hub =
        TestHub::start_with(HubConfig { feedback_batch_interval_ms: 50, ..HubConfig::default() }).await?;
    let svc = service(&hub)?;
    let prefix = unique("flt");
    let ids = fleet::device_ids(&format!("{prefix}-{{n}}").parse()?, 5, Shard::default());
    fleet::seed(&svc, "c2VlZC1mb3ItdGhlLXJlbGVhc2UtdGVzdA==", &ids, 1).await?;
    let notice = UpdateNotice {
        version: "3.0.0".into(),
        url: "ftp://h/x".into(),
        sha256: "00".into(),
        size: 1,
        name: None,
    };
    let opts = ReleaseOptions {
        where_clause: Some(format!("deviceId IN ['{}', '{}']", ids[1], ids[3])),
        timeout: Duration::from_millis(300),
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let summary = notify_devices(&svc, &notice, &opts).await?;
    ensure!(
        summary.targeted == 2 && summary.sent == 2 && summary.not_final == 2 && summary.completed == 0,
        "{summary}"
    );
    for (k, id) in ids.iter().enumerate() {
        let queued = hub.running.hub.receive_c2d(id, 1_000)?.is_some();
        ensure!(queued == (k == 1 || k == 3), "device {k} queued={queued}");
    }
    hub.stop().await
}

#[tokio::test]
async fn amqp_client_reports_a_missing_device_as_not_found_and_keeps_the_connection() -> Result<()> {
    let hub = TestHub::start().await?;
    let svc = service(&hub)?;
    let ids = fleet::device_ids(&format!("{}-{{n}}", unique("amq")).parse()?, 1, Shard::default());
    fleet::seed(&svc, "c2VlZC1mb3ItdGhlLXJlbGVhc2UtdGVzdA==", &ids, 1).await?;
    let amqp = AmqpService::connect(&amqp_endpoint(&hub), svc.hub_host(), &svc.token()?).await?;
    let msg = |id: &str| C2dSend {
        body: b"hello".to_vec(),
        message_id: id.into(),
        ack: "full",
        ..C2dSend::default()
    };
    let ghost = unique("ghost");
    match amqp.send_c2d(&ghost, &msg("m-ghost")).await {
        Err(AmqpError::Rejected { condition, description }) => {
            ensure!(condition == "amqp:not-found", "{condition}: {description}");
            ensure!(description.contains("DeviceNotFound"), "{description}");
        }
        other => anyhow::bail!("a send to a missing device gave {other:?}"),
    }
    // The same connection still sends.
    amqp.send_c2d(&ids[0], &msg("m-ok")).await?;
    let d = hub.running.hub.receive_c2d(&ids[0], 60_000)?.context("the message is queued")?;
    ensure!(d.message.message_id.as_deref() == Some("m-ok") && &d.message.body[..] == b"hello");
    ensure!(d.message.ack == iothub_emulator::c2d::AckMode::Full);

    // A refused token is reported with the CBS status.
    let bad = "SharedAccessSignature sr=localhost&sig=bad&se=9999999999&skn=iothubowner";
    match AmqpService::connect(&amqp_endpoint(&hub), svc.hub_host(), bad).await {
        Err(AmqpError::Cbs { status, .. }) => ensure!(status == 401, "status {status}"),
        other => anyhow::bail!("a bad token gave {other:?}"),
    }
    hub.stop().await
}

/// Mints `iothubowner` tokens that expire `lifetime_secs` from when each is made.
fn short_tokens(hub: &TestHub, lifetime_secs: u64) -> simulated_devices::amqp_client::TokenSource {
    let key = hub
        .running
        .hub
        .policies()
        .iter()
        .find(|p| p.name == "iothubowner")
        .expect("owner policy")
        .primary_key
        .clone();
    let host = hub.hostname().to_string();
    std::sync::Arc::new(move || {
        iothub_emulator::sas::make_token(
            &host,
            &key,
            Some("iothubowner"),
            iothub_emulator_tests::now_secs() + lifetime_secs,
        )
        .map_err(|e| e.to_string())
    })
}

#[tokio::test]
async fn amqp_client_renews_its_cbs_token_and_keeps_sending_past_the_first_tokens_expiry() -> Result<()> {
    // No skew: a token is refused the second after its `se`.
    let hub = TestHub::start_with(HubConfig { sas_skew_secs: 0, ..HubConfig::default() }).await?;
    let svc = service(&hub)?;
    let ids = fleet::device_ids(&format!("{}-{{n}}", unique("renew")).parse()?, 1, Shard::default());
    fleet::seed(&svc, "c2VlZC1mb3ItdGhlLXJlbGVhc2UtdGVzdA==", &ids, 1).await?;
    let msg =
        |id: &str| C2dSend { body: b"hi".to_vec(), message_id: id.into(), ack: "none", ..C2dSend::default() };
    let source = short_tokens(&hub, 2);
    let first_expiry = iothub_emulator_tests::now_secs() + 2;
    let renewing = AmqpService::connect_renewing(
        &amqp_endpoint(&hub),
        svc.hub_host(),
        source.clone(),
        Duration::from_millis(300),
    )
    .await?;
    let fixed =
        AmqpService::connect(&amqp_endpoint(&hub), svc.hub_host(), &source().map_err(anyhow::Error::msg)?)
            .await?;
    renewing.send_c2d(&ids[0], &msg("before")).await?;
    fixed.send_c2d(&ids[0], &msg("before-fixed")).await?;
    // Wait (by the wall clock the hub checks tokens against) until the first tokens have expired.
    while iothub_emulator_tests::now_secs() <= first_expiry {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    renewing.send_c2d(&ids[0], &msg("after")).await.context("the renewed token authorizes the send")?;
    match fixed.send_c2d(&ids[0], &msg("after-fixed")).await {
        Err(AmqpError::Rejected { condition, description }) => {
            ensure!(condition == "amqp:unauthorized-access", "{condition}: {description}");
        }
        other => anyhow::bail!("a send on an expired token gave {other:?}"),
    }
    hub.stop().await
}
