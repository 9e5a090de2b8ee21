//! The hub's dashboard in a real browser: `testbench run` plays a small scenario on its embedded
//! hub (60 fridges connecting over 20 s, release 2.0.0 at 24 s), Debian's headless `chromium`
//! driven through `chromedriver` (WebDriver, via `fantoccini`) opens the dashboard URL the run
//! prints, and the test asserts what the page shows as devices connect and the release runs: the
//! scenario panel, registered and connected counts, app versions, installs, feedback, device
//! search, paging and one device's detail. Every wait polls the DOM until a deadline.
//!
//! Needs `chromium` and `chromedriver` on `PATH` (`apt-get install chromium chromium-driver`;
//! `.ci/run` installs them). Without them the test fails with that instruction, unless
//! `IOTHUB_BROWSER_TESTS=skip`, which skips it with a notice printed past the output capture.
//! `DASHBOARD_SCREENSHOT=<file>` saves the page as PNG (`bench/dashboard-screenshot.sh` renews
//! `docs/dashboard-screenshot.png` that way).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// How long the page may take to show each expected state (the release runs in real time).
const STEP: Duration = Duration::from_secs(60);
/// Between two looks at the DOM.
const POLL: Duration = Duration::from_millis(100);

const SCENARIO: &str = r#"
name = "dashboard-demo"
description = "60 fridges connect over 20 s; release 2.0.0 at 24 s; release 3.0.0 far ahead keeps the hub up."
seed = 7
time_limit = "10m"
time = "real"

[hub]
feedback_interval = "1s"

[fleet]
devices = 60
id_pattern = "fridge-{n}"
connect_ramp = "20s"
initial_version = "1.0.0"

[[package]]
version = "2.0.0"
size = "64KiB"

[[package]]
version = "3.0.0"
size = "64KiB"

[[event]]
at = "24s"
action = "release"
version = "2.0.0"

[[event]]
at = "9m"
action = "release"
version = "3.0.0"
"#;

/// A child process killed when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prints past the test harness's output capture.
fn loud(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `name` on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// Lines of `child`'s stdout, read on a thread.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line from `rx` for which `pick` says something, within `limit`; panics with what
/// was seen otherwise.
fn first<T>(rx: &mpsc::Receiver<String>, limit: Duration, what: &str, pick: impl Fn(&str) -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(v) = pick(&line) {
                    return v;
                }
                seen.push(line);
            }
            Err(e) => panic!("no {what} within {limit:?} ({e}); output so far:\n{}", seen.join("\n")),
        }
    }
}

/// The text of the element at `css`, or "" while it is missing.
async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Polls `css`'s text until `ok` accepts it; returns every distinct text seen, in order.
async fn until(c: &Client, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + STEP;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let t = text(c, css).await;
        if seen.last() != Some(&t) {
            seen.push(t.clone());
        }
        if ok(&t) {
            return seen;
        }
        if Instant::now() > deadline {
            let page = text(c, "body").await;
            panic!(
                "the dashboard never showed {what} at {css} within {STEP:?}; it showed {seen:?}\npage:\n{page}"
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn number(t: &str) -> Option<u64> {
    t.replace(',', "").trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_devices_connecting_and_a_release_in_headless_chromium() {
    let (Some(chromium), Some(chromedriver)) = (on_path("chromium"), on_path("chromedriver")) else {
        let why =
            "chromium and chromedriver must be on PATH (Debian: apt-get install chromium chromium-driver)";
        if std::env::var("IOTHUB_BROWSER_TESTS").is_ok_and(|v| v == "skip") {
            loud(&format!("SKIPPED the dashboard browser test (IOTHUB_BROWSER_TESTS=skip): {why}"));
            return;
        }
        panic!("{why}; set IOTHUB_BROWSER_TESTS=skip to skip this test instead");
    };
    let dir = tempfile::tempdir().unwrap();
    let file = common::write(dir.path(), "dashboard-demo.toml", SCENARIO);
    let mut run = Command::new(env!("CARGO_BIN_EXE_testbench"));
    for var in
        ["IOTHUB_EMULATOR_CONNECTION_STRING", "IOTHUB_EMULATOR_HTTP_URL", "IOTHUB_EMULATOR_FLEET_EXTERNAL"]
    {
        run.env_remove(var);
    }
    let mut run = run
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(dir.path().join("out"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("testbench runs");
    let run_lines = lines(&mut run);
    let _run = Killed(run);
    let url = first(&run_lines, Duration::from_secs(60), "dashboard URL from testbench run", |l| {
        l.strip_prefix("dashboard: ").map(str::to_string)
    });

    let mut driver = Command::new(&chromedriver)
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver_lines = lines(&mut driver);
    let _driver = Killed(driver);
    let port: u16 = first(&driver_lines, Duration::from_secs(30), "chromedriver port", |l| {
        let rest = l.split("started successfully on port ").nth(1)?;
        rest.trim_end_matches('.').trim().parse().ok()
    });
    let caps = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100"],
        }
    });
    let serde_json::Value::Object(caps) = caps else { unreachable!() };
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a WebDriver session in headless chromium");
    let result = check_page(&c, &url).await;
    let _ = c.close().await;
    result.unwrap();
}

async fn check_page(c: &Client, url: &str) -> Result<(), fantoccini::error::CmdError> {
    c.goto(url).await?;
    assert!(c.title().await?.contains("IoT Hub emulator"));

    // The fleet as it connects (the page opens while the runner registers it), then the
    // scenario panel.
    let connected = until(c, "#connected", "60 connected devices", |t| t == "60").await;
    assert!(
        connected.iter().filter_map(|t| number(t)).any(|n| n < 60),
        "the connected count should have moved while the fleet ramped up: {connected:?}"
    );
    until(c, "#registered", "60 registered devices", |t| t == "60").await;
    until(c, "#scenario-name", "the scenario's name", |t| t == "dashboard-demo").await;
    until(c, "#scenario-connected", "the runner's connected count", |t| number(t).is_some()).await;
    let v1 = "#versions g[data-value='1.0.0'] .count";
    until(c, v1, "60 devices on 1.0.0", |t| t == "60").await;
    assert_eq!(text(c, "#scenario-installed").await, "0", "nothing installed before the release");
    let first_event = c.find(Locator::Css("#scenario-timeline li")).await?;
    assert!(first_event.text().await?.contains("release 2.0.0"));

    // Paging: 50 per page, sorted by id.
    until(c, "#page-info", "page 1", |t| t.starts_with("page 1")).await;
    let rows = c.find_all(Locator::Css("#devices-body tr")).await?;
    assert_eq!(rows.len(), 50);
    c.find(Locator::Css("#next")).await?.click().await?;
    until(c, "#page-info", "page 2", |t| t.starts_with("page 2")).await;
    assert_eq!(c.find_all(Locator::Css("#devices-body tr")).await?.len(), 10);
    c.find(Locator::Css("#prev")).await?.click().await?;
    until(c, "#page-info", "page 1 again", |t| t.starts_with("page 1")).await;

    // The release: installs counted by the runner, versions from the twins, feedback.
    let installed = until(c, "#scenario-installed", "60 installs", |t| t == "60").await;
    assert!(installed.len() > 1, "the installed count should have moved: {installed:?}");
    until(c, "#scenario-targeted", "60 targeted", |t| t == "60").await;
    until(c, "#versions g[data-value='2.0.0'] .count", "60 devices on 2.0.0", |t| t == "60").await;
    until(c, "#states g[data-value='installed'] .count", "60 installed states", |t| t == "60").await;
    until(c, "#feedback-detail", "60 Success feedback records", |t| t.contains("Success 60")).await;
    until(c, "#telemetry-total", "telemetry received", |t| {
        number(t.trim_end_matches(" received")).is_some_and(|n| n > 0)
    })
    .await;
    let done = c.find(Locator::Css("#scenario-timeline li")).await?.attr("class").await?;
    assert_eq!(done.as_deref(), Some("done"), "the release is marked done on the timeline");

    // Search by prefix, then one device's detail.
    c.find(Locator::Css("#search")).await?.send_keys("fridge-5").await?;
    until(c, "#devices-body tr:first-child td:first-child", "fridge-5…", |t| t.starts_with("fridge-5")).await;
    for row in c.find_all(Locator::Css("#devices-body tr td:first-child")).await? {
        let id = row.text().await?;
        assert!(id.starts_with("fridge-5"), "search by prefix shows only matches: {id}");
    }
    c.find(Locator::Css("#devices-body tr:first-child")).await?.click().await?;
    until(c, "#detail-id", "the device detail", |t| t.starts_with("fridge-5")).await;
    until(c, "#detail-reported", "its reported version", |t| t.contains("\"appVersion\": \"2.0.0\"")).await;
    until(c, "#detail-telemetry", "its recent telemetry", |t| t.contains("installed")).await;

    let png = c.screenshot().await?;
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a PNG screenshot of the page");
    if let Some(path) = std::env::var_os("DASHBOARD_SCREENSHOT") {
        std::fs::write(&path, &png).expect("writing the screenshot");
        loud(&format!("dashboard screenshot written to {}", Path::new(&path).display()));
    }
    Ok(())
}
