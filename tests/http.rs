//! The HTTP front end under hostile or sloppy clients, over real sockets: slowloris connections
//! are closed at the header-read deadline, idle keep-alive connections at the idle deadline, a
//! slow but complete client is still served, oversize WebSocket frames close only their own
//! connection, malformed JSON bodies get IoT Hub's 400, and `--disable-admin-api` hides the
//! emulator's own routes.

use std::time::{Duration, Instant};

use iothub_emulator::HubConfig;
use iothub_emulator::limits::Timeouts;
use iothub_emulator_tests::TestHub;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A hub whose HTTP deadlines are `header_read` and `idle`.
async fn hub_with_timeouts(header_read: Duration, idle: Duration) -> TestHub {
    let timeouts = Timeouts { http_header_read: header_read, http_idle: idle, ..Timeouts::default() };
    TestHub::start_with(HubConfig { timeouts, ..HubConfig::default() }).await.unwrap()
}

/// Reads until the server closes `stream` (EOF or reset), failing if that takes past `deadline`.
/// Returns what was read.
async fn until_closed(stream: &mut TcpStream, deadline: Instant) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!("the server did not close the connection in time (read {got:?})"),
            Ok(Ok(0) | Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one response with a `content-length` body from `stream`; returns its status and body.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                return (status, String::from_utf8_lossy(&got[end + 4..end + 4 + len]).to_string());
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) => got.extend_from_slice(&buf[..n]),
            other => panic!("no complete response ({other:?}); read {:?}", String::from_utf8_lossy(&got)),
        }
    }
}

/// A TLS connection to the HTTPS port, trusting the hub's CA.
async fn tls_connect(hub: &TestHub) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut hub.running.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(hub.running.https_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n";

#[tokio::test]
async fn slowloris_connections_are_closed_at_the_header_read_deadline() {
    let hub = hub_with_timeouts(Duration::from_millis(300), Duration::from_secs(30)).await;
    let addr = hub.running.http_addr;
    // Partial request lines and heads, a partial HTTP/2 preface (before hyper knows the version)
    // and connections that send nothing at all.
    let partials: [&[u8]; 4] =
        [b"GET /health HTTP/1.1\r\nhost: localhost\r\nx-slow: ", b"GET /hea", b"PRI * HTTP/2", b""];
    let mut conns = Vec::new();
    for i in 0..52 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(partials[i % partials.len()]).await.unwrap();
        conns.push((i, s));
    }
    // The same over TLS on the HTTPS port.
    let mut tls = tls_connect(&hub).await;
    tls.write_all(b"GET /devices HTTP/1.1\r\nhost: localhost\r\n").await.unwrap();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    for (i, s) in &mut conns {
        let got = until_closed(s, deadline).await;
        assert!(!String::from_utf8_lossy(&got).contains(" 200 "), "connection {i} was answered: {got:?}");
    }
    let mut rest = Vec::new();
    let read = tokio::time::timeout_at(deadline.into(), tls.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the TLS connection is still open");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(5), "closed after {elapsed:?}; the deadline is 300 ms");
    let health = reqwest::get(format!("{}/health", hub.http_url())).await.unwrap();
    assert_eq!(health.status(), 200);
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_at_the_idle_deadline_not_the_header_deadline() {
    let idle = Duration::from_millis(1500);
    let hub = hub_with_timeouts(Duration::from_millis(300), idle).await;
    let mut s = TcpStream::connect(hub.running.http_addr).await.unwrap();
    s.write_all(HEALTH).await.unwrap();
    let (status, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    let answered = Instant::now();
    let rest = until_closed(&mut s, answered + Duration::from_secs(10)).await;
    let open_for = answered.elapsed();
    assert!(rest.is_empty(), "{rest:?}");
    // Not at the 300 ms header-read deadline (the wait between requests is not a header read),
    // and not never.
    assert!(open_for >= idle - Duration::from_millis(100), "closed after {open_for:?}");
    assert!(open_for < idle + Duration::from_secs(3), "closed after {open_for:?}");
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn an_idle_http2_connection_gets_goaway_at_the_idle_deadline() {
    let idle = Duration::from_millis(1500);
    let hub = hub_with_timeouts(Duration::from_millis(300), idle).await;
    let mut s = TcpStream::connect(hub.running.http_addr).await.unwrap();
    // Prior-knowledge HTTP/2: the preface, empty SETTINGS, and GET /health on stream 1 (HPACK:
    // indexed :method GET, :scheme http, literal :path and :authority with indexed names).
    let mut block = vec![0x82, 0x86, 0x04, 7];
    block.extend_from_slice(b"/health");
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"localhost");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&[0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1]);
    out.extend_from_slice(&block);
    s.write_all(&out).await.unwrap();
    // Read frames until GOAWAY: the response must come first, the GOAWAY at the idle deadline.
    let sent = Instant::now();
    let deadline = sent + Duration::from_secs(10);
    let (mut got, mut frames, mut at) = (Vec::new(), Vec::new(), 0);
    let mut buf = [0u8; 4096];
    while !frames.iter().any(|f: &(u8, u32)| f.0 == 0x7) {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) => got.extend_from_slice(&buf[..n]),
            other => panic!("no GOAWAY ({other:?}); frames {frames:?}"),
        }
        while at + 9 <= got.len() {
            let len =
                (usize::from(got[at]) << 16) | (usize::from(got[at + 1]) << 8) | usize::from(got[at + 2]);
            if at + 9 + len > got.len() {
                break;
            }
            frames.push((
                got[at + 3],
                u32::from_be_bytes([got[at + 5], got[at + 6], got[at + 7], got[at + 8]]),
            ));
            at += 9 + len;
        }
    }
    let open_for = sent.elapsed();
    assert!(frames.contains(&(0x1, 1)), "no HEADERS response on stream 1: {frames:?}");
    assert!(open_for >= idle - Duration::from_millis(100), "GOAWAY after {open_for:?}");
    assert!(open_for < idle + Duration::from_secs(3), "GOAWAY after {open_for:?}");
    // A client that does not answer the GOAWAY's ping is dropped after the close grace.
    until_closed(&mut s, deadline).await;
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_but_complete_client_is_served_and_may_pause_between_requests() {
    let header_read = Duration::from_millis(1000);
    let hub = hub_with_timeouts(header_read, Duration::from_secs(10)).await;
    let mut s = TcpStream::connect(hub.running.http_addr).await.unwrap();
    // The head in five pieces 100 ms apart: slow, but complete within the deadline.
    for piece in HEALTH.chunks(HEALTH.len().div_ceil(5)) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "{body}");
    // A pause longer than the header-read deadline, well within the idle one, then another
    // request on the same connection.
    tokio::time::sleep(header_read + Duration::from_millis(500)).await;
    s.write_all(HEALTH).await.unwrap();
    let (status, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "{body}");
    hub.stop().await.unwrap();
}

/// Upgrades a plain-port connection to WebSocket with subprotocol `mqtt`.
async fn websocket(hub: &TestHub) -> TcpStream {
    let mut s = TcpStream::connect(hub.running.http_addr).await.unwrap();
    let upgrade = "GET /$iothub/websocket HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\n\
                   connection: Upgrade\r\nsec-websocket-version: 13\r\n\
                   sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-protocol: mqtt\r\n\r\n";
    s.write_all(upgrade.as_bytes()).await.unwrap();
    let (status, body) = read_response(&mut s).await;
    assert_eq!(status, 101, "{body}");
    s
}

#[tokio::test]
async fn an_oversize_websocket_frame_closes_only_its_connection() {
    let hub = TestHub::start().await.unwrap();
    let bystander = websocket(&hub).await;
    let mut s = websocket(&hub).await;
    // A masked binary frame announcing 2 MiB (the limit is 1 MiB), and its first bytes.
    let len = 2u64 * 1024 * 1024;
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[0u8; 1024]);
    s.write_all(&frame).await.unwrap();
    until_closed(&mut s, Instant::now() + Duration::from_secs(10)).await;
    // The hub still serves HTTP and new upgrades; the other WebSocket is still open.
    assert_eq!(reqwest::get(format!("{}/health", hub.http_url())).await.unwrap().status(), 200);
    drop(websocket(&hub).await);
    let mut probe = [0u8; 1];
    let still_open = tokio::time::timeout(Duration::from_millis(200), bystander.peek(&mut probe)).await;
    assert!(still_open.is_err(), "the bystander's connection ended: {still_open:?}");
    hub.stop().await.unwrap();
}

/// Sends `body` (raw bytes, JSON content type) with `method` to `path` on the plain port as the
/// owner; returns the status, the `iothub-errorcode` header and the JSON body.
async fn send_json(hub: &TestHub, method: &str, path: &str, body: &str) -> (u16, String, serde_json::Value) {
    let resp = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("{}{path}", hub.http_url()))
        .header("authorization", hub.owner_token())
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let code = resp.headers().get("iothub-errorcode").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    (status, code, resp.json().await.unwrap_or_default())
}

#[tokio::test]
async fn json_bodies_of_the_wrong_shape_get_400_in_iot_hubs_error_shape() {
    let hub = TestHub::start().await.unwrap();
    let id = iothub_emulator_tests::unique("shape");
    hub.create_device(&id).await.unwrap();
    let twin = format!("/twins/{id}");
    let (status, _, _) =
        send_json(&hub, "PATCH", &twin, r#"{"tags":{"room":"k"},"properties":{"desired":{"t":1}}}"#).await;
    assert_eq!(status, 200);
    for method in ["PATCH", "PUT"] {
        for body in [r#""a string""#, "42", "true", "null", r#"[{"tags":{}}]"#, r#"{"properties":"x"}"#] {
            let (status, code, json) = send_json(&hub, method, &twin, body).await;
            assert_eq!((status, code.as_str()), (400, "ArgumentInvalid"), "{method} {body}: {json}");
            assert!(json["Message"].as_str().is_some_and(|m| m.contains("ArgumentInvalid")), "{json}");
        }
    }
    // Nothing was applied: the twin still has its tags and desired properties.
    let resp =
        hub.client.get(format!("{}{twin}", hub.https_url())).header("authorization", hub.owner_token());
    let got: serde_json::Value = resp.send().await.unwrap().json().await.unwrap();
    assert_eq!(got["tags"]["room"], "k", "{got}");
    assert_eq!(got["properties"]["desired"]["t"], 1, "{got}");

    // The other JSON routes refuse non-objects (or, for bulk, non-arrays) the same way.
    let device = format!("/devices/{id}");
    let job = format!("/jobs/v2/{}", iothub_emulator_tests::unique("job"));
    for (method, path, body, want) in [
        ("PUT", device.as_str(), "42", "IotHubFormatError"),
        ("POST", "/devices", r#"{"id":"x"}"#, "IotHubFormatError"),
        ("POST", "/devices/query", r#""SELECT * FROM devices""#, "ArgumentInvalid"),
        ("POST", &format!("{twin}/methods"), "[]", "ArgumentInvalid"),
        ("PUT", job.as_str(), r#""scheduleUpdateTwin""#, "ArgumentInvalid"),
        ("PUT", "/emulator/ftp/faults", "7", "ArgumentInvalid"),
        ("POST", "/emulator/time", "7", "ArgumentInvalid"),
        ("POST", "/emulator/time", r#"{"advanceMs":-5}"#, "ArgumentInvalid"),
        ("POST", "/emulator/time", r#"{"advance":"yesterday"}"#, "ArgumentInvalid"),
        ("POST", "/emulator/time", r#"{"advance":"1h","advanceMs":1}"#, "ArgumentInvalid"),
        ("POST", "/emulator/time", r#"{"rewind":"1h"}"#, "ArgumentInvalid"),
        ("POST", "/emulator/time", r#"{"advance":"100years"}"#, "ArgumentInvalid"),
        ("PATCH", &twin, "{not json", "IotHubFormatError"),
        ("GET", "/emulator/dashboard/devices?limit=many", "", "ArgumentInvalid"),
        ("GET", "/emulator/dashboard/device", "", "ArgumentInvalid"),
    ] {
        let (status, code, json) = send_json(&hub, method, path, body).await;
        assert_eq!((status, code.as_str()), (400, want), "{method} {path} {body}: {json}");
    }
    hub.stop().await.unwrap();
}

/// The dashboard's JSON over HTTP: devices page by id with a cursor, one device in detail with its
/// telemetry, the overview's live counts; the page itself is HTML with no external assets.
#[tokio::test]
async fn the_dashboard_json_pages_devices_and_details_one() {
    let hub = TestHub::start().await.unwrap();
    let prefix = iothub_emulator_tests::unique("dash");
    for i in 0..5 {
        hub.create_device(&format!("{prefix}-{i}")).await.unwrap();
    }
    let page = |after: &str| format!("/emulator/dashboard/devices?prefix={prefix}&limit=3&after={after}");
    let (status, _, first) = send_json(&hub, "GET", &page(""), "").await;
    assert_eq!(status, 200, "{first}");
    let ids = |v: &serde_json::Value| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["deviceId"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&first), (0..3).map(|i| format!("{prefix}-{i}")).collect::<Vec<_>>());
    let next = first["next"].as_str().expect("a cursor to the next page").to_string();
    let (_, _, second) = send_json(&hub, "GET", &page(&next), "").await;
    assert_eq!(ids(&second), [format!("{prefix}-3"), format!("{prefix}-4")]);
    assert!(second["next"].is_null(), "{second}");
    assert_eq!(second["items"][0]["connectionState"], "Disconnected");
    let (status, _, one) =
        send_json(&hub, "GET", &format!("/emulator/dashboard/device?id={prefix}-1"), "").await;
    assert_eq!((status, one["c2dQueueDepth"].as_u64()), (200, Some(0)), "{one}");
    assert!(one["recentTelemetry"].as_array().is_some_and(Vec::is_empty), "{one}");
    let (status, code, _) = send_json(&hub, "GET", "/emulator/dashboard/device?id=nobody-here", "").await;
    assert_eq!((status, code.as_str()), (404, "DeviceNotFound"));
    let (_, _, overview) = send_json(&hub, "GET", "/emulator/dashboard/overview", "").await;
    assert!(overview["devices"]["registered"].as_u64().is_some_and(|n| n >= 5), "{overview}");
    let html = reqwest::get(format!("{}/", hub.http_url())).await.unwrap();
    assert_eq!(html.url().path(), "/dashboard", "/ redirects to the dashboard");
    assert!(html.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let text = html.text().await.unwrap();
    assert!(text.contains("/emulator/dashboard/overview"));
    assert!(!text.contains("src=\"http") && !text.contains("href=\"http"), "no external assets");

    // An external scenario runner publishes its status for the page (bounded, an object only).
    let scenario = "/emulator/dashboard/scenario";
    assert_eq!(send_json(&hub, "GET", scenario, "").await.2, serde_json::Value::Null);
    let status = r#"{"name":"quickstart","phase":"before the first event","devices":20,"timeline":[]}"#;
    assert_eq!(send_json(&hub, "PUT", scenario, status).await.0, 204);
    let (_, _, overview) = send_json(&hub, "GET", "/emulator/dashboard/overview", "").await;
    assert_eq!(overview["scenario"]["name"], "quickstart", "{overview}");
    assert_eq!(send_json(&hub, "GET", scenario, "").await.2["devices"], 20);
    let (status, code, _) = send_json(&hub, "PUT", scenario, "[1,2]").await;
    assert_eq!((status, code.as_str()), (400, "ArgumentInvalid"));
    let big =
        format!(r#"{{"name":"{}"}}"#, "x".repeat(iothub_emulator::hub::dashboard::SCENARIO_STATUS_MAX_BYTES));
    let (status, code, _) = send_json(&hub, "PUT", scenario, &big).await;
    assert_eq!((status, code.as_str()), (413, "MessageTooLarge"));
    assert_eq!(
        send_json(&hub, "GET", scenario, "").await.2["name"],
        "quickstart",
        "a refused PUT changes nothing"
    );
    assert_eq!(send_json(&hub, "POST", scenario, "{}").await.0, 405);
    assert_eq!(send_json(&hub, "DELETE", scenario, "").await.0, 204);
    let (_, _, overview) = send_json(&hub, "GET", "/emulator/dashboard/overview", "").await;
    assert!(overview["scenario"].is_null(), "{overview}");
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn consumer_groups_are_managed_at_emulator_consumer_groups_in_arms_shape() {
    let hub = TestHub::start_with(HubConfig {
        events: iothub_emulator::hub::EventsConfig {
            consumer_groups: vec!["startup".into()],
            ..Default::default()
        },
        ..HubConfig::default()
    })
    .await
    .unwrap();
    let names = |json: &serde_json::Value| -> Vec<String> {
        json["value"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap().to_string()).collect()
    };
    let (status, _, list) = send_json(&hub, "GET", "/emulator/consumer-groups", "").await;
    assert_eq!((status, names(&list)), (200, vec!["$Default".to_string(), "startup".to_string()]));
    let (status, _, g) = send_json(&hub, "PUT", "/emulator/consumer-groups/analytics", "").await;
    assert_eq!(status, 201, "{g}");
    assert_eq!(g["name"], "analytics");
    assert_eq!(g["type"], "Microsoft.Devices/IotHubs/EventHubEndpoints/ConsumerGroups");
    assert!(g["properties"]["created"].as_str().is_some(), "{g}");
    let (status, _, _) = send_json(&hub, "PUT", "/emulator/consumer-groups/Analytics", "").await;
    assert_eq!(status, 200, "exists (names match case-insensitively): idempotent");
    let (status, _, g) = send_json(&hub, "GET", "/emulator/consumer-groups/ANALYTICS", "").await;
    assert_eq!((status, g["name"].as_str()), (200, Some("analytics")));
    let (status, code, _) = send_json(&hub, "PUT", "/emulator/consumer-groups/bad%20name", "").await;
    assert_eq!((status, code.as_str()), (400, "ArgumentInvalid"));
    let (status, code, _) = send_json(&hub, "DELETE", "/emulator/consumer-groups/$Default", "").await;
    assert_eq!((status, code.as_str()), (400, "ArgumentInvalid"));
    let (status, _, _) = send_json(&hub, "DELETE", "/emulator/consumer-groups/analytics", "").await;
    assert_eq!(status, 200);
    let (status, _, _) = send_json(&hub, "DELETE", "/emulator/consumer-groups/analytics", "").await;
    assert_eq!(status, 204, "already gone");
    let (status, code, _) = send_json(&hub, "GET", "/emulator/consumer-groups/analytics", "").await;
    assert_eq!((status, code.as_str()), (404, "NotFound"));
    let (status, _, cs) = send_json(&hub, "GET", "/emulator/connection-strings", "").await;
    assert_eq!(status, 200);
    let amqp_port = hub.running.amqp_addr.port();
    let key = cs["iothubowner"].as_str().unwrap().rsplit("SharedAccessKey=").next().unwrap().to_string();
    assert_eq!(
        cs["eventHubCompatible"],
        format!(
            "Endpoint=sb://{}:{amqp_port}/;SharedAccessKeyName=iothubowner;SharedAccessKey={key};EntityPath={}",
            hub.hostname(),
            hub.running.hub.event_hub_name()
        )
    );
    assert_eq!(cs["eventHubCompatibleName"], hub.running.hub.event_hub_name());
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn with_the_admin_api_off_the_emulator_routes_answer_404_and_health_stays() {
    let on = TestHub::start().await.unwrap();
    let off = TestHub::start_with(HubConfig { admin_api: false, ..HubConfig::default() }).await.unwrap();
    let routes = [
        ("GET", "/emulator/connection-strings", ""),
        ("GET", "/emulator/consumer-groups", ""),
        ("GET", "/emulator/consumer-groups/$Default", ""),
        ("GET", "/emulator/telemetry", ""),
        ("GET", "/emulator/telemetry?waitMs=10", ""),
        ("GET", "/emulator/ftp/faults", ""),
        ("PUT", "/emulator/ftp/faults", r#"{"dropTimes":1}"#),
        ("GET", "/emulator/time", ""),
        ("POST", "/emulator/time", r#"{"advance":"1s"}"#),
        ("GET", "/", ""),
        ("GET", "/dashboard", ""),
        ("GET", "/emulator/dashboard/overview", ""),
        ("GET", "/emulator/dashboard/devices?prefix=a", ""),
    ];
    for (method, path, body) in routes {
        let (status, _, _) = send_json(&on, method, path, body).await;
        assert_eq!(status, 200, "{method} {path} with the admin API on");
        let (status, code, json) = send_json(&off, method, path, body).await;
        assert_eq!((status, code.as_str()), (404, "NotFound"), "{method} {path}: {json}");
        assert!(json["Message"].as_str().is_some_and(|m| m.contains("NotFound")), "{json}");
    }
    assert_eq!(off.running.ftp_faults.settings(), Default::default(), "the PUT changed nothing");
    for path in ["/health", "/ca.pem"] {
        assert_eq!(reqwest::get(format!("{}{path}", off.http_url())).await.unwrap().status(), 200, "{path}");
    }
    on.stop().await.unwrap();
    off.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_that_never_finishes_gets_408_and_the_connection_closes() {
    let idle = Duration::from_millis(800);
    let hub = hub_with_timeouts(Duration::from_millis(300), idle).await;
    let mut s = TcpStream::connect(hub.running.http_addr).await.unwrap();
    let head = format!(
        "PUT /devices/slow HTTP/1.1\r\nhost: localhost\r\nauthorization: {}\r\ncontent-type: application/json\r\n\
         content-length: 100\r\n\r\n{{\"deviceId\":",
        hub.owner_token()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let sent = Instant::now();
    let got = until_closed(&mut s, sent + Duration::from_secs(10)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(sent.elapsed() >= idle - Duration::from_millis(100), "answered after {:?}", sent.elapsed());
    assert_eq!(reqwest::get(format!("{}/health", hub.http_url())).await.unwrap().status(), 200);
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn time_travel_moves_hub_time_forward_by_what_it_is_asked() {
    let hub = TestHub::start().await.unwrap();
    let (status, _, before) = send_json(&hub, "GET", "/emulator/time", "").await;
    assert_eq!((status, before["offsetMs"].as_u64()), (200, Some(0)), "{before}");
    let (status, _, after) = send_json(&hub, "POST", "/emulator/time", r#"{"advance":"2h"}"#).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["offsetMs"], 7_200_000, "{after}");
    assert!(after["nowMs"].as_u64().unwrap() >= before["nowMs"].as_u64().unwrap() + 7_200_000, "{after}");
    assert_eq!(hub.running.hub.time_offset_ms(), 7_200_000);
    hub.stop().await.unwrap();
}
