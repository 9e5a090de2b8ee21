//! The hub image (`iothub-emulator:dev`, built by `docker/build.sh`) started with the crate's
//! testcontainers module: a Rust MQTT client over TLS and the official Node device MQTT SDK reach
//! it through the published ports, and C2D messages sent through the service side arrive.
//!
//! Skipped with a message when Docker or the image is missing, unless
//! `IOTHUB_CONTAINER_TESTS=required` (CI), which turns a skip into a failure.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use iothub_emulator::testcontainers::{IMAGE_NAME, IMAGE_TAG, IotHubEmulator, IotHubEmulatorContainer};
use iothub_emulator_tests::{
    Sdk, container_tests_required, container_unavailable, run_script_with_env, sdk_tests_required,
    sdk_unavailable, unique,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use simulated_devices::amqp_client::{AmqpEndpoint, AmqpService};
use simulated_devices::service_client::C2dSend;

/// A non-default owner key (base64 of 32 bytes).
const OWNER_KEY: &str = "Y29udGFpbmVyLXRlc3Qtb3duZXIta2V5LTMyLWJ5dGU=";

/// How long a test waits for the MQTT events it expects.
const WAIT: Duration = Duration::from_secs(20);

/// Whether the container tests can run here; otherwise prints why `test` is skipped and returns
/// false, or panics when they are required.
fn can_run(test: &str) -> bool {
    let image = format!("{IMAGE_NAME}:{IMAGE_TAG}");
    match container_unavailable(&image) {
        None => true,
        Some(why) if container_tests_required() => panic!("IOTHUB_CONTAINER_TESTS=required but {why}"),
        Some(why) => {
            eprintln!("skipped {test}: {why} (IOTHUB_CONTAINER_TESTS=required makes this a failure)");
            false
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The `SharedAccessKey` of a device connection string.
fn key_of(cs: &str) -> Result<String> {
    cs.split(';')
        .find_map(|part| part.strip_prefix("SharedAccessKey="))
        .map(str::to_string)
        .with_context(|| format!("no SharedAccessKey in {cs}"))
}

/// A device MQTT client (rumqttc, the fleet agent's client) over TLS to the container's mapped
/// MQTT port, trusting the container's CA.
fn mqtt_client(
    hub: &IotHubEmulatorContainer,
    id: &str,
    key: &str,
) -> Result<(AsyncClient, rumqttc::EventLoop)> {
    let tls = simulated_devices::agent::tls_config(hub.ca_pem()).map_err(anyhow::Error::msg)?;
    let token = simulated_devices::sas::device_token(hub.hostname(), id, key, now_secs() + 3600)?;
    let mut options = MqttOptions::new(id, hub.host(), hub.mqtt_port());
    options
        .set_credentials(format!("{}/{id}/?api-version=2021-04-12", hub.hostname()), token)
        .set_keep_alive(Duration::from_secs(60))
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    Ok(AsyncClient::new(options, 10))
}

/// Polls `eventloop` until `want` picks something out of an incoming packet (bounded by [`WAIT`]).
async fn wait_for<T>(
    eventloop: &mut rumqttc::EventLoop,
    what: &str,
    mut want: impl FnMut(&Packet) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, eventloop.poll())
            .await
            .with_context(|| format!("no {what} within {WAIT:?}"))?
            .with_context(|| format!("MQTT connection failed while waiting for {what}"))?;
        if let Event::Incoming(packet) = event
            && let Some(found) = want(&packet)
        {
            return Ok(found);
        }
    }
}

async fn c2d_reaches_a_rust_mqtt_client() -> Result<()> {
    let id = unique("ctr");
    // A host name and owner key of our own: the seeding, the tokens below and the TLS names only
    // work if both reached the container.
    let hub = IotHubEmulator::default()
        .hostname("iothub-under-test")
        .owner_key(OWNER_KEY)
        .device(&id)
        .run()
        .await?;
    assert_eq!(
        hub.service_connection_string(),
        format!("HostName=iothub-under-test;SharedAccessKeyName=iothubowner;SharedAccessKey={OWNER_KEY}")
    );
    let device_cs = hub.device_connection_string(&id).await?;
    assert!(device_cs.starts_with(&format!("HostName=iothub-under-test;DeviceId={id};")), "{device_cs}");
    let key = key_of(&device_cs)?;

    let (client, mut eventloop) = mqtt_client(&hub, &id, &key)?;
    wait_for(&mut eventloop, "CONNACK", |p| match p {
        Packet::ConnAck(ack) if ack.code == rumqttc::ConnectReturnCode::Success => Some(()),
        _ => None,
    })
    .await?;
    client.subscribe(format!("devices/{id}/messages/devicebound/#"), QoS::AtLeastOnce).await?;
    wait_for(&mut eventloop, "SUBACK", |p| matches!(p, Packet::SubAck(_)).then_some(())).await?;

    // The service side the way a service SDK sends C2D: AMQP over TLS on the mapped 5671 port.
    let endpoint = AmqpEndpoint {
        addr: tokio::net::lookup_host((hub.host(), hub.amqp_port()))
            .await?
            .next()
            .context("the Docker host does not resolve")?,
        server_name: hub.hostname().to_string(),
        ca_pem: hub.ca_pem().to_string(),
    };
    let service = AmqpService::connect(&endpoint, hub.hostname(), &hub.owner_token()).await?;
    let message_id = unique("msg");
    let body = format!("hello container {message_id}");
    let send = C2dSend {
        body: body.clone().into_bytes(),
        message_id: message_id.clone(),
        ack: "none",
        content_type: None,
        expiry_ms: None,
    };
    service.send_c2d(&id, &send).await?;

    let publish = wait_for(&mut eventloop, "the C2D PUBLISH", |p| match p {
        Packet::Publish(p) if p.topic.starts_with(&format!("devices/{id}/messages/devicebound/")) => {
            Some(p.clone())
        }
        _ => None,
    })
    .await?;
    assert_eq!(publish.payload, body.as_bytes());
    assert!(publish.topic.contains(&format!("%24.mid={message_id}")), "{}", publish.topic);

    // rumqttc PUBACKs it; the hub then completes the message and the device's queue is empty.
    let deadline = Instant::now() + WAIT;
    let http = reqwest::Client::new();
    loop {
        let device: serde_json::Value = http
            .get(format!("{}/devices/{id}?api-version=2021-04-12", hub.http_url()))
            .header("authorization", hub.owner_token())
            .send()
            .await?
            .json()
            .await?;
        if device["cloudToDeviceMessageCount"] == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the C2D message was not completed after the PUBACK: {device}");
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), eventloop.poll()).await;
    }

    // Time travel through the testcontainers handle: hub time moves forward by what was asked.
    let before = hub.hub_time().await?;
    let after = hub.advance_time(Duration::from_secs(7200)).await?;
    assert!(after >= before + 7_200_000, "advance_time: {before} -> {after}");
    assert!(hub.hub_time().await? >= after, "hub time never goes back");
    client.disconnect().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_container_registers_a_device_and_delivers_c2d_to_a_rust_mqtt_client() {
    if !can_run("hub_container_registers_a_device_and_delivers_c2d_to_a_rust_mqtt_client") {
        return;
    }
    c2d_reaches_a_rust_mqtt_client().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_container_with_the_node_device_mqtt_sdk_on_the_mapped_port() {
    let test = "hub_container_with_the_node_device_mqtt_sdk_on_the_mapped_port";
    if !can_run(test) {
        return;
    }
    if let Some(why) = sdk_unavailable(Sdk::Node) {
        if sdk_tests_required() || container_tests_required() {
            panic!("the container SDK test is required but {why}");
        }
        iothub_emulator_tests::sdk_setup::note_skip(test, &why);
        return;
    }
    let id = unique("ctr-node");
    let hub = IotHubEmulator::default().device(&id).run().await.unwrap();
    let device_cs = hub.device_connection_string(&id).await.unwrap();
    let ca_file = std::env::temp_dir().join(format!("{}.pem", unique("container-ca")));
    std::fs::write(&ca_file, hub.ca_pem()).unwrap();
    let ca = ca_file.display().to_string();
    let env = [
        ("IOTHUB_CONNECTION_STRING", hub.service_connection_string()),
        ("IOTHUB_HOSTNAME", hub.hostname().to_string()),
        ("IOTHUB_HTTP_URL", hub.http_url()),
        // The SDK dials GatewayHostName (the mapped port); HostName stays the hub's.
        (
            "IOTHUB_DEVICE_CONNECTION_STRING",
            format!("{device_cs};GatewayHostName={}:{}", hub.host(), hub.mqtt_port()),
        ),
        ("NODE_EXTRA_CA_CERTS", ca),
    ];
    let result = run_script_with_env(Sdk::Node, "container_device_mqtt_test.js", &env).await;
    let _ = std::fs::remove_file(&ca_file);
    result.unwrap();
}

/// Removes a container started with the docker CLI, also when the test fails.
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "--force", &self.0])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// What the README suggests for clients that dial fixed ports: put them in a container on the hub's
/// network. A `fleet run` container reaches the hub by its container name (REST seeding, MQTT over
/// TLS to the unmapped 8883 with `HostName=<name>`), and the device shows up connected.
async fn a_fleet_container_reaches_the_hub_by_name() -> Result<()> {
    let network = unique("iot-net");
    let name = unique("hub");
    let hub = IotHubEmulator::default().network(&network).container_name(&name).hostname(&name).run().await?;
    let ca_file = std::env::temp_dir().join(format!("{}.pem", unique("container-ca")));
    std::fs::write(&ca_file, hub.ca_pem())?;
    let prefix = unique("net");
    let out = std::process::Command::new("docker")
        .args(["run", "--detach", "--network", &network])
        .arg("--volume")
        .arg(format!("{}:/ca.pem:ro", ca_file.display()))
        .arg(format!("{IMAGE_NAME}-fleet:{IMAGE_TAG}"))
        .args(["fleet", "run", "--count", "1", "--ca-file", "/ca.pem"])
        .arg(format!("--id-pattern={prefix}-{{n}}"))
        .arg(format!("--connection-string={}", hub.service_connection_string()))
        .arg(format!("--service-endpoint=http://{name}:8080"))
        .arg(format!("--mqtt-host={name}"))
        .arg(format!("--ftp-addr={name}:2121"))
        .output()?;
    if !out.status.success() {
        bail!("docker run of the fleet image failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let fleet = RemoveOnDrop(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let id = format!("{prefix}-0");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    let result = loop {
        let resp = http
            .get(format!("{}/devices/{id}?api-version=2021-04-12", hub.http_url()))
            .header("authorization", hub.owner_token())
            .send()
            .await?;
        let device: serde_json::Value =
            if resp.status() == 200 { resp.json().await? } else { serde_json::Value::Null };
        if device["connectionState"] == "Connected" {
            break Ok(());
        }
        if Instant::now() > deadline {
            let logs = std::process::Command::new("docker").args(["logs", &fleet.0]).output()?;
            break Err(anyhow::anyhow!(
                "{id} not connected within {WAIT:?} (registry: {device}); fleet container says:\n{}{}",
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(fleet);
    let _ = std::fs::remove_file(&ca_file);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_container_on_the_hub_network_connects_by_the_hub_container_name() {
    let test = "a_fleet_container_on_the_hub_network_connects_by_the_hub_container_name";
    if !can_run(test) {
        return;
    }
    let fleet_image = format!("{IMAGE_NAME}-fleet:{IMAGE_TAG}");
    if let Some(why) = container_unavailable(&fleet_image) {
        if container_tests_required() {
            panic!("IOTHUB_CONTAINER_TESTS=required but {why}");
        }
        eprintln!("skipped {test}: {why}");
        return;
    }
    a_fleet_container_reaches_the_hub_by_name().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_an_error_that_says_how_to_build_it() {
    if !can_run("a_missing_image_is_an_error_that_says_how_to_build_it") {
        return;
    }
    let tag = unique("no-such-tag");
    let err = IotHubEmulator::default().tag(&tag).run().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("{IMAGE_NAME}:{tag}")) && text.contains("docker/build.sh"), "{text}");
}
