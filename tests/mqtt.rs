//! The MQTT device endpoint over real sockets (the hub's plain MQTT listener on port 0), driven by a
//! minimal client on the `rumqttc` v4 codec so each test controls exactly which packets go out
//! (including the PUBACKs it withholds). Service-side calls go over HTTPS like an SDK's.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use iothub_emulator_tests::{TestHub, unique};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for any one packet before failing.
const WAIT: Duration = Duration::from_secs(10);

pub(crate) struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    pub(crate) async fn open(addr: SocketAddr) -> Result<Self> {
        Ok(Self { stream: TcpStream::connect(addr).await?, buf: BytesMut::new() })
    }

    pub(crate) async fn send(&mut self, p: Packet) -> Result<()> {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// The next packet, or `None` when the hub closed the connection.
    pub(crate) async fn next(&mut self) -> Result<Option<Packet>> {
        tokio::time::timeout(WAIT, async {
            loop {
                match Packet::read(&mut self.buf, 1 << 20) {
                    Ok(p) => return Ok(Some(p)),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => bail!("bad packet from the hub: {e}"),
                }
                if self.stream.read_buf(&mut self.buf).await? == 0 {
                    return Ok(None);
                }
            }
        })
        .await
        .context("no packet from the hub in time")?
    }

    pub(crate) async fn expect(&mut self) -> Result<Packet> {
        self.next().await?.context("the hub closed the connection")
    }

    pub(crate) async fn expect_publish(&mut self) -> Result<Publish> {
        match self.expect().await? {
            Packet::Publish(p) => Ok(p),
            other => bail!("expected PUBLISH, got {other:?}"),
        }
    }

    pub(crate) async fn expect_closed(&mut self) -> Result<()> {
        match self.next().await? {
            None => Ok(()),
            Some(p) => bail!("expected the hub to close the connection, got {p:?}"),
        }
    }

    pub(crate) async fn subscribe(&mut self, filters: &[&str]) -> Result<Vec<SubscribeReasonCode>> {
        let mut sub = Subscribe::new(filters[0], QoS::AtLeastOnce);
        for f in &filters[1..] {
            sub.add(f.to_string(), QoS::AtLeastOnce);
        }
        sub.pkid = 1;
        self.send(Packet::Subscribe(sub)).await?;
        match self.expect().await? {
            Packet::SubAck(ack) => Ok(ack.return_codes),
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }

    pub(crate) async fn publish(&mut self, topic: &str, qos: QoS, payload: &[u8]) -> Result<()> {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        if qos != QoS::AtMostOnce {
            p.pkid = 9;
        }
        self.send(Packet::Publish(p)).await
    }
}

pub(crate) struct Device<'a> {
    pub(crate) hub: &'a TestHub,
    pub(crate) id: String,
    key: String,
}

impl<'a> Device<'a> {
    pub(crate) async fn create(hub: &'a TestHub, prefix: &str) -> Result<Self> {
        let id = unique(prefix);
        let key = hub.create_device(&id).await?;
        Ok(Self { hub, id, key })
    }

    pub(crate) fn connect_packet(&self, password: &str, clean: bool, keep_alive: u16) -> Connect {
        let mut c = Connect::new(self.id.clone());
        c.clean_session = clean;
        c.keep_alive = keep_alive;
        let user =
            format!("{}/{}/?api-version=2021-04-12&DeviceClientType=rust-test", self.hub.hostname(), self.id);
        c.set_login(user, password);
        c
    }

    pub(crate) async fn connect_with(&self, c: Connect) -> Result<(Client, ConnAck)> {
        let addr = self.hub.running.mqtt_plain_addr.context("the plain MQTT listener is off")?;
        let mut client = Client::open(addr).await?;
        client.send(Packet::Connect(c)).await?;
        match client.expect().await? {
            Packet::ConnAck(ack) => Ok((client, ack)),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    pub(crate) async fn connect(&self, clean: bool) -> Result<(Client, ConnAck)> {
        let token = self.hub.device_token(&self.id, &self.key);
        let (client, ack) = self.connect_with(self.connect_packet(&token, clean, 60)).await?;
        if ack.code != ConnectReturnCode::Success {
            bail!("CONNECT refused: {ack:?}");
        }
        Ok((client, ack))
    }

    pub(crate) fn c2d_topic(&self) -> String {
        format!("devices/{}/messages/devicebound/#", self.id)
    }

    pub(crate) async fn send_c2d(&self, message_id: &str, body: &str) -> Result<()> {
        let resp = self
            .hub
            .client
            .post(format!(
                "{}/devices/{}/messages/deviceBound?api-version=2021-04-12",
                self.hub.https_url(),
                self.id
            ))
            .header("authorization", self.hub.owner_token())
            .header("iothub-messageid", message_id)
            .header("iothub-correlationid", "corr 1")
            .header("iothub-ack", "full")
            .header("iothub-app-color", "blue/green")
            .body(body.to_string())
            .send()
            .await?;
        if resp.status() != 204 {
            bail!("C2D send: {} {}", resp.status(), resp.text().await?);
        }
        Ok(())
    }

    pub(crate) async fn registry(&self) -> Result<Value> {
        let url = format!("{}/devices/{}?api-version=2021-04-12", self.hub.https_url(), self.id);
        let resp = self.hub.client.get(url).header("authorization", self.hub.owner_token()).send().await?;
        Ok(resp.json().await?)
    }

    pub(crate) async fn service(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<(u16, Value)> {
        let url = format!("{}/twins/{}{path}?api-version=2021-04-12", self.hub.https_url(), self.id);
        let resp = self
            .hub
            .client
            .request(method, url)
            .header("authorization", self.hub.owner_token())
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }
}

fn bag(topic: &str) -> Vec<(String, String)> {
    let (_, bag) = topic.rsplit_once('/').unwrap_or(("", ""));
    bag.split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
            (dec(k), dec(v))
        })
        .collect()
}

async fn offline_message_arrives_after_reconnect_with_payload_and_properties(hub: TestHub) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-offline").await?;
    let (mut c, ack) = dev.connect(false).await?;
    assert!(!ack.session_present);
    assert_eq!(c.subscribe(&[&dev.c2d_topic()]).await?, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    assert_eq!(dev.registry().await?["connectionState"], "Connected");
    c.send(Packet::Disconnect).await?;
    c.expect_closed().await?;
    assert_eq!(dev.registry().await?["connectionState"], "Disconnected");

    dev.send_c2d("offline-1", "hello while you slept").await?;
    assert_eq!(dev.registry().await?["cloudToDeviceMessageCount"], 1);
    let (mut c, ack) = dev.connect(false).await?;
    assert!(ack.session_present, "clean_session=0 keeps the subscription");
    let p = c.expect_publish().await?;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(&p.payload[..], b"hello while you slept");
    assert!(p.topic.starts_with(&format!("devices/{}/messages/devicebound/", dev.id)), "{}", p.topic);
    let props = bag(&p.topic);
    let get = |k: &str| props.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("$.mid"), Some("offline-1"));
    assert_eq!(get("$.cid"), Some("corr 1"));
    assert_eq!(get("$.to"), Some(format!("/devices/{}/messages/devicebound", dev.id).as_str()));
    assert_eq!(get("iothub-ack"), Some("full"));
    assert_eq!(get("color"), Some("blue/green"));
    c.send(Packet::PubAck(PubAck::new(p.pkid))).await?;
    c.send(Packet::PingReq).await?;
    assert_eq!(c.expect().await?, Packet::PingResp);
    let device = dev.registry().await?;
    assert_eq!(device["cloudToDeviceMessageCount"], 0, "the PUBACK completed the message");
    assert_ne!(device["lastActivityTime"], "0001-01-01T00:00:00Z");
    hub.stop().await
}

/// Messages sent while the device is connected and subscribed reach it at once, in order: the
/// first handed over at send time (with the drivers, published from the sender's thread), the
/// next ones from the queue as each PUBACK makes room; each PUBACK completes its message.
async fn messages_sent_while_connected_arrive_in_order(hub: TestHub) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-online").await?;
    let (mut c, _) = dev.connect(false).await?;
    c.subscribe(&[&dev.c2d_topic()]).await?;
    for round in 0..2 {
        let ids: Vec<String> = (0..3).map(|i| format!("online-{round}-{i}")).collect();
        for id in &ids {
            dev.send_c2d(id, &format!("body of {id}")).await?;
        }
        for id in &ids {
            let p = c.expect_publish().await?;
            assert_eq!(String::from_utf8_lossy(&p.payload), format!("body of {id}"));
            let props = bag(&p.topic);
            assert_eq!(props.iter().find(|(k, _)| k == "$.mid").map(|(_, v)| v.as_str()), Some(id.as_str()));
            c.send(Packet::PubAck(PubAck::new(p.pkid))).await?;
        }
        c.send(Packet::PingReq).await?;
        assert_eq!(c.expect().await?, Packet::PingResp);
        assert_eq!(
            dev.registry().await?["cloudToDeviceMessageCount"],
            0,
            "round {round}: every PUBACK completed"
        );
    }
    hub.stop().await
}

async fn a_message_whose_puback_never_came_is_redelivered(hub: TestHub) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-redeliver").await?;
    dev.send_c2d("m-1", "deliver me twice").await?;
    let (mut c, _) = dev.connect(false).await?;
    c.subscribe(&[&dev.c2d_topic()]).await?;
    let first = c.expect_publish().await?;
    assert_eq!(&first.payload[..], b"deliver me twice");
    drop(c);

    let (mut c, ack) = dev.connect(false).await?;
    assert!(ack.session_present);
    let again = c.expect_publish().await?;
    assert_eq!(&again.payload[..], b"deliver me twice");
    assert_eq!(bag(&again.topic), bag(&first.topic));
    c.send(Packet::PubAck(PubAck::new(again.pkid))).await?;
    c.send(Packet::PingReq).await?;
    assert_eq!(c.expect().await?, Packet::PingResp);
    assert_eq!(dev.registry().await?["cloudToDeviceMessageCount"], 0);
    hub.stop().await
}

async fn refused_connects_get_their_connack_codes(hub: TestHub) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-refused").await?;
    let other = Device::create(&hub, "mqtt-other").await?;

    let forged = hub.device_token(&dev.id, &other.key);
    let (mut c, ack) = dev.connect_with(dev.connect_packet(&forged, false, 60)).await?;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    c.expect_closed().await?;

    let token = hub.device_token(&dev.id, &dev.key);
    let mut wrong_user = dev.connect_packet(&token, false, 60);
    wrong_user.login.as_mut().unwrap().username = format!("{}/{}/?api-version=1", hub.hostname(), other.id);
    assert_eq!(dev.connect_with(wrong_user).await?.1.code, ConnectReturnCode::BadUserNamePassword);

    // MQTT 3.1 (protocol name MQIsdp, level 3): unacceptable protocol version.
    let mut c = Client::open(hub.running.mqtt_plain_addr.unwrap()).await?;
    let v31: &[u8] = &[0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 0];
    c.stream.write_all(v31).await?;
    match c.expect().await? {
        Packet::ConnAck(ack) => assert_eq!(ack.code, ConnectReturnCode::RefusedProtocolVersion),
        other => bail!("expected CONNACK, got {other:?}"),
    }
    assert_eq!(dev.registry().await?["connectionState"], "Disconnected");
    hub.stop().await
}

async fn subscriptions_to_another_devices_topic_are_refused_and_clean_session_keeps_nothing(
    hub: TestHub,
) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-acl").await?;
    let other = Device::create(&hub, "mqtt-victim").await?;
    let (mut c, _) = dev.connect(true).await?;
    let codes = c.subscribe(&[&other.c2d_topic(), &dev.c2d_topic(), "$iothub/#"]).await?;
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure
        ]
    );
    other.send_c2d("not-yours", "secret").await?;
    c.send(Packet::Disconnect).await?;
    c.expect_closed().await?;

    dev.send_c2d("later", "sent after a clean session ended").await?;
    let (mut c, ack) = dev.connect(false).await?;
    assert!(!ack.session_present, "clean_session=1 kept nothing");
    c.send(Packet::PingReq).await?;
    assert_eq!(c.expect().await?, Packet::PingResp, "no C2D without a subscription");
    c.publish(&format!("devices/{}/messages/events/", other.id), QoS::AtLeastOnce, b"spoof").await?;
    c.expect_closed().await?;
    hub.stop().await
}

async fn telemetry_twins_desired_notifications_and_direct_methods(hub: TestHub) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-twin").await?;
    let (mut c, _) = dev.connect(false).await?;

    // A long-polling reader started before the device sends gets the message as soon as it lands.
    let url = format!("{}/emulator/telemetry?deviceId={}&after=0&waitMs=10000", hub.http_url(), dev.id);
    let reader = tokio::spawn(hub.client.get(url).send());
    let topic =
        format!("devices/{}/messages/events/%24.mid=t1&%24.ct=application%2Fjson&room=kitchen", dev.id);
    c.publish(&topic, QoS::AtLeastOnce, br#"{"t":21.5}"#).await?;
    assert_eq!(c.expect().await?, Packet::PubAck(PubAck::new(9)));
    let seen: Value = reader.await??.json().await?;
    assert_eq!(seen[0]["properties"]["room"], "kitchen", "{seen}");
    assert_eq!(seen[0]["systemProperties"]["message-id"], "t1", "{seen}");

    c.publish("$iothub/twin/PATCH/properties/reported/?$rid=1", QoS::AtMostOnce, br#"{"fw":"2.0"}"#).await?;
    let res = c.expect_publish().await?;
    assert_eq!(res.topic, "$iothub/twin/res/204/?$rid=1&$version=2");
    c.publish("$iothub/twin/GET/?$rid=2", QoS::AtMostOnce, b" ").await?;
    let res = c.expect_publish().await?;
    assert_eq!(res.topic, "$iothub/twin/res/200/?$rid=2");
    let twin: Value = serde_json::from_slice(&res.payload)?;
    assert_eq!(twin["reported"]["fw"], "2.0");

    let codes = c.subscribe(&["$iothub/twin/PATCH/properties/desired/#", "$iothub/methods/POST/#"]).await?;
    assert!(codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_))));
    let (status, _) =
        dev.service(reqwest::Method::PATCH, "", json!({"properties": {"desired": {"interval": 5}}})).await?;
    assert_eq!(status, 200);
    let patch = c.expect_publish().await?;
    assert_eq!(patch.topic, "$iothub/twin/PATCH/properties/desired/?$version=2");
    assert_eq!(serde_json::from_slice::<Value>(&patch.payload)?, json!({"interval": 5, "$version": 2}));

    let call = dev.service(
        reqwest::Method::POST,
        "/methods",
        json!({"methodName": "reboot", "payload": {"delay": 3}, "responseTimeoutInSeconds": 10}),
    );
    let device = async {
        let req = c.expect_publish().await?;
        let rid = req.topic.rsplit_once("$rid=").map(|(_, r)| r.to_string()).context("no $rid")?;
        assert!(req.topic.starts_with("$iothub/methods/POST/reboot/?$rid="), "{}", req.topic);
        assert_eq!(serde_json::from_slice::<Value>(&req.payload)?, json!({"delay": 3}));
        c.publish(&format!("$iothub/methods/res/202/?$rid={rid}"), QoS::AtMostOnce, br#"{"rebooting":true}"#)
            .await
    };
    let (answer, device) = tokio::join!(call, device);
    device?;
    assert_eq!(answer?, (200, json!({"status": 202, "payload": {"rebooting": true}})));
    hub.stop().await
}

async fn methods_on_offline_devices_fail_with_device_not_online(hub: TestHub) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-offline-method").await?;
    let (status, body) =
        dev.service(reqwest::Method::POST, "/methods", json!({"methodName": "ping"})).await?;
    assert_eq!(status, 404);
    assert!(body["Message"].as_str().unwrap_or_default().starts_with("ErrorCode:DeviceNotOnline;"), "{body}");
    hub.stop().await
}

async fn keep_alive_is_enforced_and_a_new_connection_replaces_the_old(hub: TestHub) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-keepalive").await?;
    let token = hub.device_token(&dev.id, &dev.key);
    let will_topic = format!("devices/{}/messages/events/", dev.id);
    let with_will = |mut c: Connect, payload: &str| {
        c.last_will = Some(LastWill::new(&will_topic, payload, QoS::AtMostOnce, false));
        c
    };
    let (mut quiet, ack) =
        dev.connect_with(with_will(dev.connect_packet(&token, false, 1), "silent")).await?;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let started = std::time::Instant::now();
    quiet.expect_closed().await?;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1400), "closed after {waited:?}, before 1.5 × keep-alive");
    let seen = telemetry(&dev, 0, 0).await?;
    assert_eq!(seen.len(), 1, "a keep-alive lapse records the Will: {seen:?}");
    assert_eq!(seen[0]["body"], "silent");

    // A token inside the hub's clock-skew allowance that lapses a second from now: disconnected then.
    let skew = hub.running.hub.config().sas_skew_secs;
    let lapsing = hub.device_token_at(&dev.id, &dev.key, iothub_emulator_tests::now_secs() + 1 - skew);
    let (mut expiring, ack) =
        dev.connect_with(with_will(dev.connect_packet(&lapsing, false, 60), "expired")).await?;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    expiring.expect_closed().await?;
    let seen = telemetry(&dev, 0, 0).await?;
    assert_eq!(seen.len(), 2, "a token expiry records the Will: {seen:?}");
    assert_eq!(seen[1]["body"], "expired");

    let (mut first, _) = dev.connect(false).await?;
    let (mut second, _) = dev.connect(false).await?;
    first.expect_closed().await?;
    second.send(Packet::PingReq).await?;
    assert_eq!(second.expect().await?, Packet::PingResp);
    assert_eq!(dev.registry().await?["connectionState"], "Connected");
    hub.stop().await
}

/// The device's recorded telemetry after sequence `after`, waiting up to `wait_ms` for some.
async fn telemetry(dev: &Device<'_>, after: u64, wait_ms: u64) -> Result<Vec<Value>> {
    let url = format!(
        "{}/emulator/telemetry?deviceId={}&after={after}&waitMs={wait_ms}",
        dev.hub.http_url(),
        dev.id
    );
    let seen: Value = dev.hub.client.get(url).send().await?.json().await?;
    seen.as_array().cloned().context("the telemetry read is not an array")
}

async fn a_dropped_connection_forwards_its_will_and_a_clean_disconnect_does_not(hub: TestHub) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-will").await?;
    let token = hub.device_token(&dev.id, &dev.key);
    let topic = format!("devices/{}/messages/events/%24.mid=w1&state=offline", dev.id);
    let with_will = |payload: &str| {
        let mut c = dev.connect_packet(&token, false, 60);
        c.last_will = Some(LastWill::new(&topic, payload, QoS::AtLeastOnce, false));
        c
    };

    // DISCONNECT discards the Will. The hub closes the socket only after the session ended, so
    // a Will it wrongly recorded would already be readable.
    let (mut clean, ack) = dev.connect_with(with_will("clean")).await?;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    clean.send(Packet::Disconnect).await?;
    clean.expect_closed().await?;
    assert_eq!(telemetry(&dev, 0, 0).await?, Vec::<Value>::new(), "a clean DISCONNECT sends no Will");

    // The TCP connection drops without DISCONNECT: the Will arrives as telemetry.
    let (dropped, ack) = dev.connect_with(with_will("gone")).await?;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    drop(dropped);
    let seen = telemetry(&dev, 0, 10_000).await?;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["body"], "gone");
    assert_eq!(seen[0]["properties"], json!({"state": "offline", "iothub-MessageType": "Will"}));
    assert_eq!(seen[0]["systemProperties"]["message-id"], "w1");

    // A new connection for the same device closes the old one, which is not a DISCONNECT either.
    let after = seen[0]["sequenceNumber"].as_u64().context("no sequenceNumber")?;
    let (mut replaced, _) = dev.connect_with(with_will("replaced")).await?;
    let (_current, _) = dev.connect(false).await?;
    replaced.expect_closed().await?;
    let seen = telemetry(&dev, after, 10_000).await?;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["body"], "replaced");
    assert_eq!(seen[0]["properties"]["iothub-MessageType"], "Will");
    hub.stop().await
}

async fn a_will_outside_the_devices_telemetry_topic_is_refused_with_not_authorized(
    hub: TestHub,
) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-will-bad").await?;
    let token = hub.device_token(&dev.id, &dev.key);
    for topic in ["devices/someone-else/messages/events/", "$iothub/twin/GET/?$rid=1", "status/offline"] {
        let mut c = dev.connect_packet(&token, false, 60);
        c.last_will = Some(LastWill::new(topic, "bye", QoS::AtMostOnce, false));
        let (mut client, ack) = dev.connect_with(c).await?;
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{topic}");
        client.expect_closed().await?;
    }
    assert_eq!(dev.registry().await?["connectionState"], "Disconnected");
    hub.stop().await
}

async fn the_hubs_shutdown_records_no_will(hub: TestHub) -> Result<()> {
    let dev = Device::create(&hub, "mqtt-will-shutdown").await?;
    let token = hub.device_token(&dev.id, &dev.key);
    let mut c = dev.connect_packet(&token, false, 60);
    c.last_will =
        Some(LastWill::new(format!("devices/{}/messages/events/", dev.id), "bye", QoS::AtMostOnce, false));
    let (mut client, ack) = dev.connect_with(c).await?;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let id = dev.id.clone();
    let core = hub.running.hub.clone();
    // `stop` returns once the hub's connection tasks have ended, so a Will would be recorded by then.
    hub.stop().await?;
    client.expect_closed().await?;
    assert_eq!(core.get_device(&id)?["connectionState"], "Disconnected", "the connection did end");
    assert!(core.read_telemetry(Some(&id), 0, 10).is_empty(), "shutdown is not the device going offline");
    Ok(())
}

/// Runs a test against a hub serving the plain MQTT port each way: a task per connection
/// (`tasks`) and the task-less drivers (`drivers`, `--mqtt-plain-driver`).
macro_rules! both_ways {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn tasks() -> anyhow::Result<()> {
                super::$name(iothub_emulator_tests::TestHub::start_with_mqtt_tasks(Default::default()).await?).await
            }

            #[tokio::test]
            async fn drivers() -> anyhow::Result<()> {
                super::$name(iothub_emulator_tests::TestHub::start_with_mqtt_drivers(Default::default()).await?).await
            }
        }
    )*};
}

both_ways!(
    messages_sent_while_connected_arrive_in_order,
    offline_message_arrives_after_reconnect_with_payload_and_properties,
    a_message_whose_puback_never_came_is_redelivered,
    refused_connects_get_their_connack_codes,
    subscriptions_to_another_devices_topic_are_refused_and_clean_session_keeps_nothing,
    telemetry_twins_desired_notifications_and_direct_methods,
    methods_on_offline_devices_fail_with_device_not_online,
    keep_alive_is_enforced_and_a_new_connection_replaces_the_old,
    a_dropped_connection_forwards_its_will_and_a_clean_disconnect_does_not,
    a_will_outside_the_devices_telemetry_topic_is_refused_with_not_authorized,
    the_hubs_shutdown_records_no_will,
);
