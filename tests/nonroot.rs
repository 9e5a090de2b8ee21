//! The SDK tests' fixed ports (443, 8883, 5671) without root, the two ways the README gives, each
//! tested for real as the unprivileged user `nobody` inside a network namespace of its own (so
//! nothing here touches the host's sysctls or ports, and the fixed ports never collide with
//! another test run): the hub binary binds its default ports on 127.0.0.1 and the official Node
//! device SDK test (`tests/sdk/node/device_mqtt_test.js`: MQTT on 8883, then MQTT over WebSocket on
//! 443) passes against it.
//!
//! - **sysctl**: `net.ipv4.ip_unprivileged_port_start=443` (what a user sets once with sudo), set
//!   here by root inside a fresh network namespace, then the user drops to `nobody`.
//! - **user + network namespace**: `unshare --user --map-root-user --net`, which any user may run
//!   where unprivileged user namespaces are enabled: inside it the user may bind any port of the
//!   namespace's own loopback. Run by `nobody` directly.
//!
//! Python is not run as `nobody` here: this machine's `python3` lives under `/root` (mode 700).
//! When the pieces are missing (not root, no `unshare`/`setpriv`, user namespaces disabled, no
//! Node SDK) the test fails with the reason, like every SDK test, unless `IOTHUB_SDK_TESTS=skip`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use iothub_emulator::hub::DEFAULT_OWNER_KEY;
use iothub_emulator_tests::sdk_setup::{ensure, note_skip, skip_allowed};
use iothub_emulator_tests::{Sdk, repo_root};

/// `nobody`.
const NOBODY: &str = "65534";
/// Longest one namespace run may take.
const RUN_WITHIN: Duration = Duration::from_secs(240);

/// What runs as `nobody` inside the namespace: the hub on its default ports, polled until healthy,
/// then the Node SDK script; the hub is stopped either way and the script's status returned.
fn inner_script() -> String {
    format!(
        r#"set -u
data="$(mktemp -d)"
"$HUB_BIN" --bind 127.0.0.1 --hostname 127.0.0.1 --data-dir "$data" --no-ftp >"$data/hub.log" 2>&1 &
hub=$!
healthy=0
for _ in $(seq 1 200); do
    if "$HUB_BIN" healthcheck --bind 127.0.0.1 --timeout-ms 500 >/dev/null 2>&1; then healthy=1; break; fi
    kill -0 "$hub" 2>/dev/null || break
    sleep 0.1
done
if [ "$healthy" != 1 ]; then echo "the hub did not become healthy as $(id -un 2>/dev/null || id -u):"; cat "$data/hub.log"; kill "$hub" 2>/dev/null; exit 90; fi
echo "hub up as uid $(id -u) on 443/8883/5671"
IOTHUB_CONNECTION_STRING="HostName=127.0.0.1;SharedAccessKeyName=iothubowner;SharedAccessKey={DEFAULT_OWNER_KEY}" \
IOTHUB_HOSTNAME=127.0.0.1 IOTHUB_HTTP_URL=http://127.0.0.1:8080 NODE_EXTRA_CA_CERTS="$data/certs/ca.pem" \
TEST_DEVICE_PREFIX=nonroot HOME="$data" node tests/sdk/node/device_mqtt_test.js
rc=$?
kill "$hub"; wait "$hub" 2>/dev/null
rm -rf "$data"
exit $rc
"#
    )
}

/// Why this cannot run here, if so.
fn unavailable() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("the test switches to `nobody`, which needs root".into());
    }
    let hub = repo_root().join("target/debug/iothub-emulator");
    if !hub.is_file() {
        return Some(format!("{} is missing (cargo build -p iothub-emulator)", hub.display()));
    }
    for tool in ["unshare", "setpriv", "ip", "sysctl"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` is not installed (util-linux, iproute2, procps)"));
        }
    }
    ensure(Sdk::Node).err()
}

/// Runs `args` (a command that ends in `sh -c <inner_script>`) and fails with its output unless
/// it exits 0 within [`RUN_WITHIN`].
async fn run(what: &str, args: &[String]) -> Result<String> {
    let node = ensure(Sdk::Node).map_err(anyhow::Error::msg)?;
    let mut cmd = tokio::process::Command::new(&args[0]);
    cmd.args(&args[1..])
        .current_dir(repo_root())
        .env("HUB_BIN", repo_root().join("target/debug/iothub-emulator"))
        .env("NODE_PATH", &node.dir)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(RUN_WITHIN, cmd.output())
        .await
        .with_context(|| format!("{what}: not done within {RUN_WITHIN:?}"))??;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{what} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Skips (with `IOTHUB_SDK_TESTS=skip`) or fails when the pieces are missing.
fn can_run(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) if skip_allowed() => {
            note_skip(test, &why);
            false
        }
        Some(why) => panic!("{test} cannot run: {why} (IOTHUB_SDK_TESTS=skip skips it)"),
    }
}

#[tokio::test]
async fn sdk_ports_as_nobody_with_the_unprivileged_port_sysctl() {
    if !can_run("sdk_ports_as_nobody_with_the_unprivileged_port_sysctl") {
        return;
    }
    // Root makes the namespace and lowers the sysctl in it only, then becomes nobody.
    let setup = format!(
        "ip link set lo up && sysctl -qw net.ipv4.ip_unprivileged_port_start=443 && \
         exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- sh -c \"$INNER\""
    );
    let mut args = owned(&["unshare", "--net", "--", "sh", "-c", &setup]);
    args.insert(0, "env".into());
    args.insert(1, format!("INNER={}", inner_script()));
    let out = run("the sysctl way", &args).await.unwrap();
    assert!(out.contains("hub up as uid 65534"), "{out}");
    assert!(out.contains("all") && out.contains("checks passed"), "{out}");
}

#[tokio::test]
async fn sdk_ports_as_nobody_in_a_user_and_network_namespace() {
    if !can_run("sdk_ports_as_nobody_in_a_user_and_network_namespace") {
        return;
    }
    // Nobody makes the namespaces itself: no root involved past dropping to nobody.
    let inner = format!("ip link set lo up && {}", inner_script());
    let args = owned(&[
        "setpriv",
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--",
        "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "--",
        "sh",
        "-c",
        &inner,
    ]);
    let out = run("the namespace way", &args).await.unwrap();
    // Inside its user namespace nobody is uid 0; outside it stays 65534.
    assert!(out.contains("hub up as uid 0"), "{out}");
    assert!(out.contains("all") && out.contains("checks passed"), "{out}");
}
