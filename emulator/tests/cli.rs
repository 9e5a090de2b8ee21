//! The `iothub-emulator` binary: every flag (and its env-var twin) reaches the running server, the
//! startup lines are printed once the listeners accept, SIGTERM shuts it down cleanly, and bad
//! input gets a clear message and a non-zero exit code.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use iothub_emulator::sas::make_token;

const BIN: &str = env!("CARGO_BIN_EXE_iothub-emulator");

fn temp_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("iothub-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Flags that move every listener to a free port, so tests never collide on fixed ports.
const FREE_PORTS: [&str; 10] =
    ["--https-port", "0", "--http-port", "0", "--amqp-port", "0", "--ftp-port", "0", "--mqtt-port", "0"];

/// [`FREE_PORTS`] without `flag` and its value (clap refuses a flag given twice).
fn free_ports_except(flag: &str) -> Vec<&'static str> {
    FREE_PORTS.chunks(2).filter(|pair| pair[0] != flag).flatten().copied().collect()
}

/// Starts the binary and reads its startup lines up to the connection string (bounded by a deadline).
fn start(args: &[&str], envs: &[(&str, &str)]) -> (Child, Vec<String>) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    while !lines.last().is_some_and(|l: &String| l.starts_with("IOTHUB_CONNECTION_STRING=")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("the emulator printed {lines:?} and no more");
            }
        }
    }
    (child, lines)
}

/// The startup line beginning with `prefix`.
fn line<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines.iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no '{prefix}' line in {lines:?}"))
}

fn terminate(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no exit within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_reach_the_server_and_sigterm_stops_it() {
    let dir = temp_dir();
    let key = "bXkgb3duIGtleSBmb3IgdGVzdHMsIDMyIGJ5dGVzIQ==";
    let mut args = FREE_PORTS.to_vec();
    args.extend([
        "--hostname",
        "MyHub.Test",
        "--data-dir",
        dir.to_str().unwrap(),
        "--owner-key",
        key,
        "--sas-skew-secs",
        "0",
        "--partitions",
        "8",
        "--event-retention",
        "2h",
        "--consumer-group",
        "analytics",
    ]);
    let (child, lines) = start(
        &args,
        &[
            ("IOTHUB_EMULATOR_BIND", "127.0.0.1"),
            ("IOTHUB_EMULATOR_FEEDBACK_INTERVAL_MS", "1"),
            ("IOTHUB_EMULATOR_TLS_SANS", "hub.compose,10.1.2.3"),
            ("IOTHUB_EMULATOR_EVENT_MEMORY_MIB", "64"),
            ("IOTHUB_EMULATOR_AMQP_PLAIN_PORT", "0"),
        ],
    );
    let https = line(&lines, "https://MyHub.Test:");
    let http = line(&lines, "http://127.0.0.1:").to_string();
    line(&lines, "amqps://MyHub.Test:");
    // The plain AMQP listener (load tests) answers a bare AMQP header with its own, no TLS.
    let amqp_plain = line(&lines, "amqp://127.0.0.1:").strip_prefix("amqp://").unwrap().to_string();
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&amqp_plain).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"AMQP\x00\x01\x00\x00").unwrap();
        let mut header = [0u8; 8];
        s.read_exact(&mut header).unwrap();
        assert_eq!(&header, b"AMQP\x00\x01\x00\x00");
    }
    line(&lines, "mqtts://MyHub.Test:");
    line(&lines, "ftp://127.0.0.1:");
    let ca_path = line(&lines, "CA certificate: ").strip_prefix("CA certificate: ").unwrap();
    assert!(ca_path.starts_with(dir.canonicalize().unwrap().to_str().unwrap()), "{ca_path}");
    assert_eq!(
        lines.last().unwrap(),
        &format!(
            "IOTHUB_CONNECTION_STRING=HostName=MyHub.Test;SharedAccessKeyName=iothubowner;SharedAccessKey={key}"
        )
    );
    let https_port: u16 = https.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(reqwest::get(format!("{http}/health")).await.unwrap().status(), 200);
    let amqp_port = line(&lines, "amqps://MyHub.Test:").rsplit(':').next().unwrap().to_string();
    assert_eq!(
        line(&lines, "EVENTHUB_CONNECTION_STRING="),
        format!(
            "EVENTHUB_CONNECTION_STRING=Endpoint=sb://MyHub.Test:{amqp_port}/;SharedAccessKeyName=iothubowner;\
             SharedAccessKey={key};EntityPath=MyHub"
        )
    );
    // --partitions, --event-retention, IOTHUB_EMULATOR_EVENT_MEMORY_MIB and --consumer-group.
    let eh: serde_json::Value =
        reqwest::get(format!("{http}/emulator/event-hub")).await.unwrap().json().await.unwrap();
    assert_eq!(eh["partitionIds"].as_array().map(Vec::len), Some(8), "{eh}");
    assert_eq!(eh["retentionMs"], 2 * 3600 * 1000, "{eh}");
    assert_eq!(eh["memoryBudgetBytes"], 64 * 1024 * 1024, "{eh}");
    assert_eq!(eh["consumerGroups"], serde_json::json!(["$Default", "analytics"]), "{eh}");

    // --owner-key and --hostname: a token signed with the custom key for MyHub.Test works.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let client = reqwest::Client::new();
    let token = make_token("MyHub.Test", key, Some("iothubowner"), now + 60).unwrap();
    let ok = client.get(format!("{http}/devices")).header("authorization", token).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    // --sas-skew-secs 0: a token that expired a few seconds ago is refused.
    let stale = make_token("MyHub.Test", key, Some("iothubowner"), now - 5).unwrap();
    let refused = client.get(format!("{http}/devices")).header("authorization", stale).send().await.unwrap();
    assert_eq!(refused.status(), 401);

    // The HTTPS certificate covers the host name, and the printed CA verifies it.
    let ca = std::fs::read(ca_path).unwrap();
    let tls = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve("myhub.test", format!("127.0.0.1:{https_port}").parse().unwrap())
        .build()
        .unwrap();
    let resp = tls.get(format!("https://myhub.test:{https_port}/devices")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "TLS handshake succeeded and the API answered");
    // IOTHUB_EMULATOR_TLS_SANS (--tls-san): the extra names are in the certificate too; others are not.
    for (name, covered) in [("hub.compose", true), ("other.compose", false)] {
        let tls = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .resolve(name, format!("127.0.0.1:{https_port}").parse().unwrap())
            .build()
            .unwrap();
        let resp = tls.get(format!("https://{name}:{https_port}/devices")).send().await;
        assert_eq!(resp.is_ok(), covered, "{name}: {resp:?}");
    }

    let status = terminate(child);
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    let _ = std::fs::remove_dir_all(dir);
}

/// --dps-id-scope (and its env twin) reaches the provisioning service: printed before the final
/// line, listed at /emulator/connection-strings; without it a `0ne` + 8 hex scope is generated; a
/// malformed one exits 2 naming the flag.
#[tokio::test]
async fn dps_id_scope_from_flag_and_env_and_a_generated_default() {
    for (args, envs, expected) in [
        (vec!["--dps-id-scope", "0neCAFE0001"], vec![], Some("0neCAFE0001")),
        (vec![], vec![("IOTHUB_EMULATOR_DPS_ID_SCOPE", "0neBEEF0002")], Some("0neBEEF0002")),
        (vec![], vec![], None),
    ] {
        let dir = temp_dir();
        let mut all = FREE_PORTS.to_vec();
        all.extend(["--data-dir", dir.to_str().unwrap()]);
        all.extend(args);
        let (child, lines) = start(&all, &envs);
        let scope = line(&lines, "DPS_ID_SCOPE=").strip_prefix("DPS_ID_SCOPE=").unwrap().to_string();
        match expected {
            Some(e) => assert_eq!(scope, e),
            None => assert!(
                scope.len() == 11
                    && scope.starts_with("0ne")
                    && scope[3..].bytes().all(|b| b.is_ascii_hexdigit()),
                "{scope}"
            ),
        }
        let dps_cs = line(&lines, "DPS_CONNECTION_STRING=");
        assert!(dps_cs.contains("SharedAccessKeyName=provisioningserviceowner;"), "{dps_cs}");
        let http = line(&lines, "http://127.0.0.1:").to_string();
        let listed: serde_json::Value =
            reqwest::get(format!("{http}/emulator/connection-strings")).await.unwrap().json().await.unwrap();
        assert_eq!(listed["dpsIdScope"], scope.as_str());
        assert_eq!(
            listed["provisioningserviceowner"],
            dps_cs.strip_prefix("DPS_CONNECTION_STRING=").unwrap()
        );
        stop(child);
        let _ = std::fs::remove_dir_all(dir);
    }
    let out = Command::new(BIN).args(FREE_PORTS).args(["--dps-id-scope", "bad/scope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dps-id-scope"), "{out:?}");
}

#[test]
fn bad_input_exits_non_zero_with_a_clear_message() {
    let out = Command::new(BIN)
        .args(["--owner-key", "not-base64!", "--https-port", "0", "--http-port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--owner-key"), "{err}");

    // A certificate name that is neither an address nor a DNS name is refused before anything binds.
    let out = Command::new(BIN).args(FREE_PORTS).args(["--tls-san", "two words"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-san") && err.contains("neither an IP address nor a DNS name"), "{err}");

    // A port that is already taken names the listener and the flag that moves it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = temp_dir();
    let out = Command::new(BIN)
        .args(free_ports_except("--http-port"))
        .args(["--http-port", &port, "--data-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plain HTTP") && err.contains("--http-port"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs `iothub-emulator healthcheck` with `args` and `envs`; returns (exit code, stdout, stderr).
fn healthcheck(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("healthcheck")
        .args(args)
        .env_remove("IOTHUB_EMULATOR_HTTP_PORT")
        .env_remove("IOTHUB_EMULATOR_BIND");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn healthcheck_exits_0_for_a_healthy_hub_and_1_with_a_reason_otherwise() {
    let dir = temp_dir();
    let mut args = FREE_PORTS.to_vec();
    args.extend(["--data-dir", dir.to_str().unwrap()]);
    let (child, lines) = start(&args, &[]);
    let http = line(&lines, "http://127.0.0.1:");
    let port = http.rsplit(':').next().unwrap().to_string();

    let (code, stdout, stderr) = healthcheck(&["--http-port", &port], &[]);
    assert_eq!(code, Some(0), "stdout {stdout} stderr {stderr}");
    assert!(stdout.contains("healthy"), "{stdout}");
    // The env twin (what a container's ENV sets) and the flag before the subcommand work too.
    assert_eq!(healthcheck(&[], &[("IOTHUB_EMULATOR_HTTP_PORT", &port)]).0, Some(0));
    let out = Command::new(BIN).args(["--http-port", &port, "healthcheck"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // A hub bound to 0.0.0.0 is probed on loopback.
    assert_eq!(healthcheck(&["--http-port", &port, "--bind", "0.0.0.0"], &[]).0, Some(0));
    let status = terminate(child);
    assert!(status.success());

    // The hub is gone: nothing listens on its port any more.
    let (code, stdout, stderr) = healthcheck(&["--http-port", &port], &[]);
    assert_eq!(code, Some(1), "stdout {stdout} stderr {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("unhealthy: cannot connect to 127.0.0.1:") && stderr.contains(&port),
        "{stderr}"
    );

    // Something that is not the hub listens: it reads the request and closes without an answer.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port().to_string();
    let acceptor = std::thread::spawn(move || {
        let (stream, _) = other.accept().unwrap();
        let mut request = String::new();
        let mut reader = BufReader::new(stream);
        while reader.read_line(&mut request).unwrap() > 0 && !request.ends_with("\r\n\r\n") {}
    });
    let (code, _, stderr) = healthcheck(&["--http-port", &other_port], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("closed without an answer"), "{stderr}");
    acceptor.join().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs `iothub-emulator token` with `args`; returns the token it printed.
fn token(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("token")
        .args(args)
        .env_remove("IOTHUB_EMULATOR_HOSTNAME")
        .env_remove("IOTHUB_EMULATOR_OWNER_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "token {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prints_policy_and_connection_string_tokens_the_hub_accepts() {
    let dir = temp_dir();
    let key = "dG9rZW4gc3ViY29tbWFuZCB0ZXN0IGtleSAzMiBieXRlcw==";
    let mut args = FREE_PORTS.to_vec();
    args.extend(["--hostname", "Token.Hub", "--data-dir", dir.to_str().unwrap(), "--owner-key", key]);
    let (child, lines) = start(&args, &[]);
    let http = line(&lines, "http://127.0.0.1:").to_string();
    let client = reqwest::Client::new();
    let hub = ["--hostname", "Token.Hub", "--owner-key", key];

    // The owner token (the default policy) creates a device.
    let owner = token(&hub);
    assert!(
        owner.starts_with("SharedAccessSignature sr=Token.Hub&sig=") && owner.ends_with("&skn=iothubowner")
    );
    let created: serde_json::Value = client
        .put(format!("{http}/devices/fridge-1"))
        .header("authorization", &owner)
        .json(&serde_json::json!({ "deviceId": "fridge-1" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let device_key = created["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_string();

    // registryRead (the flag after the subcommand, any case) reads the registry but cannot write it.
    let read_only = token(&["--policy", "registryread", "--hostname", "Token.Hub", "--owner-key", key]);
    let get = client.get(format!("{http}/devices/fridge-1")).header("authorization", &read_only);
    assert_eq!(get.send().await.unwrap().status(), 200);
    let put = client
        .put(format!("{http}/devices/fridge-2"))
        .header("authorization", &read_only)
        .json(&serde_json::json!({ "deviceId": "fridge-2" }));
    assert_eq!(put.send().await.unwrap().status(), 401);

    // A device connection string's token receives that device's C2D messages (none yet: 204).
    let cs = format!("HostName=Token.Hub;DeviceId=fridge-1;SharedAccessKey={device_key}");
    let device = token(&["--connection-string", &cs, "--ttl-secs", "60"]);
    assert!(device.starts_with("SharedAccessSignature sr=Token.Hub%2Fdevices%2Ffridge-1&"), "{device}");
    let receive =
        client.get(format!("{http}/devices/fridge-1/messages/deviceBound")).header("authorization", &device);
    assert_eq!(receive.send().await.unwrap().status(), 204);
    // A token signed with another hub's key is refused.
    let other = token(&["--hostname", "Token.Hub"]);
    let refused = client.get(format!("{http}/devices")).header("authorization", other);
    assert_eq!(refused.send().await.unwrap().status(), 401);

    // Bad input: an unknown policy lists the real ones; a keyless device string says what it lacks.
    let out = Command::new(BIN).args(["token", "--policy", "nope"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"nope\"") && err.contains("registryReadWrite"), "{err}");
    let out =
        Command::new(BIN).args(["token", "--connection-string", "HostName=h;DeviceId=d"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SharedAccessKey"), "{out:?}");

    assert!(terminate(child).success());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_admin_api_hides_the_emulator_routes_from_flag_and_env() {
    for (flag, env) in
        [(Some("--disable-admin-api"), None), (None, Some(("IOTHUB_EMULATOR_DISABLE_ADMIN_API", "true")))]
    {
        let dir = temp_dir();
        let mut args = FREE_PORTS.to_vec();
        args.extend(["--data-dir", dir.to_str().unwrap()]);
        args.extend(flag);
        let envs: Vec<(&str, &str)> = env.into_iter().collect();
        let (child, lines) = start(&args, &envs);
        let http = line(&lines, "http://127.0.0.1:").to_string();
        for path in ["/emulator/connection-strings", "/emulator/telemetry", "/emulator/ftp/faults"] {
            let resp = reqwest::get(format!("{http}{path}")).await.unwrap();
            assert_eq!(resp.status(), 404, "{flag:?} {env:?} {path}");
            assert_eq!(resp.headers()["iothub-errorcode"], "NotFound");
        }
        assert_eq!(reqwest::get(format!("{http}/health")).await.unwrap().status(), 200);
        assert_eq!(reqwest::get(format!("{http}/ca.pem")).await.unwrap().status(), 200);
        assert!(terminate(child).success());
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_and_units_reach_the_throttle_from_flag_and_env() {
    for (flags, envs) in [
        (vec!["--tier", "s3", "--units", "4"], vec![]),
        (vec![], vec![("IOTHUB_EMULATOR_TIER", "S3"), ("IOTHUB_EMULATOR_UNITS", "4")]),
    ] {
        let dir = temp_dir();
        let mut args = FREE_PORTS.to_vec();
        args.extend(["--data-dir", dir.to_str().unwrap()]);
        args.extend(flags.iter().copied());
        let (child, lines) = start(&args, &envs);
        assert!(lines.iter().any(|l| l.starts_with("throttling as IoT Hub S3 × 4 units")), "{lines:?}");
        let http = line(&lines, "http://127.0.0.1:").to_string();
        let stats: serde_json::Value =
            reqwest::get(format!("{http}/emulator/throttle")).await.unwrap().json().await.unwrap();
        assert_eq!((stats["tier"].as_str(), stats["units"].as_u64()), (Some("S3"), Some(4)), "{stats}");
        assert_eq!(stats["quota"]["messagesPerDay"], 1_200_000_000u64);
        stop(child);
        let _ = std::fs::remove_dir_all(dir);
    }
    // Without --tier, nothing is throttled.
    let dir = temp_dir();
    let mut args = FREE_PORTS.to_vec();
    args.extend(["--data-dir", dir.to_str().unwrap()]);
    let (child, lines) = start(&args, &[]);
    let http = line(&lines, "http://127.0.0.1:").to_string();
    let stats: serde_json::Value =
        reqwest::get(format!("{http}/emulator/throttle")).await.unwrap().json().await.unwrap();
    assert!(stats["tier"].is_null(), "{stats}");
    stop(child);
    let _ = std::fs::remove_dir_all(dir);
}

/// Ends a hub with SIGTERM, which must shut it down cleanly even right after its startup lines.
fn stop(child: Child) {
    let status = terminate(child);
    assert!(status.success(), "SIGTERM right after the startup lines: {status}");
}

#[test]
fn sigterm_right_after_the_startup_lines_shuts_down_cleanly() {
    // The handlers are registered before the lines are printed: a supervisor that signals as
    // soon as it reads them must get a clean shutdown, not the default action (killed).
    for _ in 0..5 {
        let dir = temp_dir();
        let mut args = FREE_PORTS.to_vec();
        args.extend(["--data-dir", dir.to_str().unwrap()]);
        let (child, _) = start(&args, &[]);
        stop(child);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn bad_tiers_and_units_exit_2_with_a_clear_message() {
    for (args, expect) in [
        (vec!["--tier", "B1"], "not one of F1, S1, S2, S3"),
        (vec!["--tier", "F1", "--units", "2"], "F1 takes 1 to 1 units; got 2"),
        (vec!["--tier", "S3", "--units", "11"], "S3 takes 1 to 10 units; got 11"),
        (vec!["--tier", "S1", "--units", "0"], "S1 takes 1 to 200 units; got 0"),
        (vec!["--units", "3"], "--tier"),
        (vec!["--partitions", "1"], "--partitions"),
        (vec!["--partitions", "33"], "--partitions"),
        (vec!["--event-retention", "soon"], "is not a duration"),
        (vec!["--consumer-group", "no spaces"], "consumer group name 'no spaces' is not valid"),
    ] {
        let out = Command::new(BIN).args(FREE_PORTS).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}

/// Runs `iothub-emulator cert` with `args`: (exit code, stdout, stderr).
fn cert(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).arg("cert").args(args).env("RUST_BACKTRACE", "0").output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_issues_a_ca_and_device_certificates_and_x509_ca_makes_the_hub_trust_it() {
    use iothub_emulator::x509::{Thumbprints, TrustedCas, leaf_identity};
    let dir = temp_dir();
    let out = dir.to_str().unwrap();
    let (code, stdout, stderr) = cert(&["ca", "--out", out, "--name", "CLI Test CA"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("--x509-ca"), "{stdout}");
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();

    let (code, stdout, stderr) = cert(&["device", "fridge-9", "--out", out, "--ca-dir", out]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("\"type\":\"certificateAuthority\""), "{stdout}");
    let leaf_pem = std::fs::read_to_string(dir.join("fridge-9.pem")).unwrap();
    let leaf = rustls_pemfile::certs(&mut leaf_pem.as_bytes()).next().unwrap().unwrap();
    assert_eq!(leaf_identity(&leaf).unwrap().common_name.as_deref(), Some("fridge-9"));
    let cas = TrustedCas::default();
    cas.add_pem(&ca_pem).unwrap();
    assert!(cas.anchor(&[leaf]).is_some(), "the device certificate chains to the CA");

    let (code, stdout, stderr) = cert(&["device", "fridge-10", "--out", out]);
    assert_eq!(code, Some(0), "{stderr}");
    let pem = std::fs::read_to_string(dir.join("fridge-10.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap();
    let sha1 = Thumbprints::of(&der).sha1_hex();
    assert!(stdout.contains(&format!("SHA-1 thumbprint: {sha1}")), "{stdout}");
    assert!(stdout.contains(&format!("\"primaryThumbprint\":\"{sha1}\"")), "{stdout}");

    let (code, _, stderr) = cert(&["device", "fridge-10", "--out", out]);
    assert_eq!(code, Some(1), "an existing certificate is not replaced");
    assert!(stderr.contains("not replaced"), "{stderr}");
    let (code, _, stderr) = cert(&["device", "bad id", "--out", out]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("invalid"), "{stderr}");

    // --x509-ca: a device certificate is no CA and stops the start; the CA is trusted.
    let not_ca = dir.join("fridge-10.pem");
    let refused = Command::new(BIN)
        .args(FREE_PORTS)
        .args(["--data-dir", out, "--x509-ca", not_ca.to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--x509-ca") && stderr.contains("not a CA certificate"), "{stderr}");

    let ca_path = dir.join("ca.pem");
    let mut args = FREE_PORTS.to_vec();
    args.extend(["--data-dir", out]);
    let (child, lines) = start(&args, &[("IOTHUB_EMULATOR_X509_CAS", ca_path.to_str().unwrap())]);
    let http = line(&lines, "http://127.0.0.1:").to_string();
    let listed: serde_json::Value =
        reqwest::get(format!("{http}/emulator/x509-cas")).await.unwrap().json().await.unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert!(listed[0]["subject"].as_str().unwrap().contains("CLI Test CA"), "{listed}");
    assert!(terminate(child).success());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_prints_new_telemetry_of_one_device_in_monitor_events_shape() {
    let dir = temp_dir();
    let mut args = FREE_PORTS.to_vec();
    args.extend(["--data-dir", dir.to_str().unwrap()]);
    let (hub, lines) = start(&args, &[]);
    let http = line(&lines, "http://127.0.0.1:").to_string();
    let port = http.rsplit(':').next().unwrap().to_string();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let owner =
        make_token("localhost", iothub_emulator::hub::DEFAULT_OWNER_KEY, Some("iothubowner"), now + 600)
            .unwrap();
    let client = reqwest::Client::new();
    let send = |id: &'static str, body: &'static str| {
        let req = client
            .post(format!("{http}/devices/{id}/messages/events"))
            .header("authorization", &owner)
            .header("iothub-app-kind", "reading")
            .body(body);
        async move { assert_eq!(req.send().await.unwrap().status(), 204) }
    };
    for id in ["mon-a", "mon-b"] {
        let put = client
            .put(format!("{http}/devices/{id}"))
            .header("authorization", &owner)
            .json(&serde_json::json!({ "deviceId": id }));
        assert_eq!(put.send().await.unwrap().status(), 200);
    }
    send("mon-a", r#"{"old":true}"#).await;

    let mut monitor = Command::new(BIN)
        .args(["monitor", "--http-port", &port, "--device", "mon-a", "--properties", "--max-events", "2"])
        .args(["--timeout-secs", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Messages sent once it says it started are the ones it prints (not the one before).
    let mut stderr = BufReader::new(monitor.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    assert!(first.starts_with("Starting event monitor") && first.contains("mon-a"), "{first}");
    send("mon-b", r#"{"other":1}"#).await;
    send("mon-a", r#"{"t":21}"#).await;
    send("mon-a", "plain text").await;
    let out = tokio::task::spawn_blocking(move || monitor.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let events: Vec<serde_json::Value> =
        serde_json::Deserializer::from_str(&stdout).into_iter().map(Result::unwrap).collect();
    assert_eq!(events.len(), 2, "{stdout}");
    assert_eq!(events[0]["event"]["origin"], "mon-a");
    assert_eq!(events[0]["event"]["payload"], serde_json::json!({"t": 21}));
    assert_eq!(events[0]["event"]["properties"]["application"]["kind"], "reading");
    assert_eq!(events[1]["event"]["payload"], "plain text");
    stop(hub);
    let _ = std::fs::remove_dir_all(dir);
}
