//! The official SDKs the tests drive, set up by the tests themselves (issue 17): on first use the
//! pinned Python packages (`tests/sdk/python/requirements.txt`) are installed with pip into
//! `target/sdk-cache/python-<hash>` and the Node packages (`tests/sdk/node/package-lock.json`) with
//! `npm ci` into `target/sdk-cache/node-<hash>`; scripts run with `PYTHONPATH` / `NODE_PATH`
//! pointing there. The hash covers the pin files and the interpreter's version, so a changed pin
//! installs afresh and an unchanged one is reused. A file lock serialises installs across test
//! processes; a directory is used only once its install finished (`.complete`).
//!
//! Policy (`IOTHUB_SDK_TESTS`): unset or `required`, an SDK test that cannot run fails with the
//! reason; `skip` is the explicit opt-out: such a test passes without running, says so on the
//! terminal at once, and the test process ends with a count of the skipped ones and why.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::{Sdk, repo_root};

/// How long an install may take before the test fails (pip builds nothing: the pins have wheels).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether SDK tests that cannot run fail (the default) or are skipped (`IOTHUB_SDK_TESTS=skip`).
pub fn skip_allowed() -> bool {
    std::env::var("IOTHUB_SDK_TESTS").is_ok_and(|v| v == "skip")
}

/// What a script needs in its environment to find its SDK.
#[derive(Debug, Clone)]
pub struct SdkPaths {
    /// `PYTHONPATH` or `NODE_PATH`.
    pub var: &'static str,
    /// The installed packages.
    pub dir: PathBuf,
}

/// The SDK's packages, installed on first use; `Err` says why they cannot be.
pub fn ensure(sdk: Sdk) -> Result<SdkPaths, String> {
    static PYTHON: OnceLock<Result<SdkPaths, String>> = OnceLock::new();
    static NODE: OnceLock<Result<SdkPaths, String>> = OnceLock::new();
    match sdk {
        Sdk::Python => PYTHON.get_or_init(install_python).clone(),
        Sdk::Node => NODE.get_or_init(install_node).clone(),
    }
}

/// `target/` of this build: test binaries live in `target/<profile>/deps/`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.parent().map(Path::to_path_buf))
        .filter(|t| t.join("CACHEDIR.TAG").exists() || t.ends_with("target"))
        .unwrap_or_else(|| repo_root().join("target"))
}

fn version_of(program: &str) -> Result<String, String> {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .map_err(|e| format!("{program} is not installed or not on PATH ({e})"))?;
    if !out.status.success() {
        return Err(format!("`{program} --version` failed"));
    }
    Ok(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        .trim()
        .to_string())
}

/// FNV-1a over the pin files and the interpreter version: the cache key.
fn cache_key(files: &[PathBuf], version: &str) -> Result<String, String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for f in files {
        feed(&std::fs::read(f).map_err(|e| format!("reading {}: {e}", f.display()))?);
    }
    feed(version.as_bytes());
    Ok(format!("{h:016x}"))
}

/// Runs `install(tmp)` into `<cache>/<name>` unless it is complete already, under the cache lock.
fn cached(name: &str, install: impl FnOnce(&Path) -> Result<(), String>) -> Result<PathBuf, String> {
    let cache = target_dir().join("sdk-cache");
    let dir = cache.join(name);
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    // Another user's cache (root's, say) can still be locked: flock works on a read-only descriptor.
    let lock_path = cache.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .or_else(|_| std::fs::File::open(&lock_path))
        .map_err(|e| format!("opening the cache lock {}: {e}", lock_path.display()))?;
    // flock(2): `File::lock` is newer than the workspace's MSRV. Released when `lock` closes.
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(format!("locking {}: {}", cache.display(), std::io::Error::last_os_error()));
    }
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let tmp = cache.join(format!("{name}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    loud(&format!("setting up the official SDKs' {name} in {} (first run only)", cache.display()));
    install(&tmp)?;
    std::fs::write(tmp.join(".complete"), b"").map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| format!("moving {} into place: {e}", tmp.display()))?;
    Ok(dir)
}

/// Runs `cmd`, failing with its output (and `hint`) unless it exits 0 within [`INSTALL_TIMEOUT`].
fn run(mut cmd: Command, what: &str, hint: &str) -> Result<(), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let readers = std::thread::spawn(move || {
        let mut o = String::new();
        let mut e = String::new();
        if let Some(s) = out.as_mut() {
            let _ = std::io::Read::read_to_string(s, &mut o);
        }
        if let Some(s) = err.as_mut() {
            let _ = std::io::Read::read_to_string(s, &mut e);
        }
        (o, e)
    });
    let deadline = std::time::Instant::now() + INSTALL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Ok(None) => {
                let _ = child.kill();
                return Err(format!("{what}: no result within {} s ({hint})", INSTALL_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    let (o, e) = readers.join().unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        let tail = |s: &str| {
            s.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        Err(format!("{what} failed ({status}; {hint}):\n{}\n{}", tail(&o), tail(&e)))
    }
}

fn install_python() -> Result<SdkPaths, String> {
    let version = version_of("python3")?;
    let pins = repo_root().join("tests/sdk/python/requirements.txt");
    let key = cache_key(std::slice::from_ref(&pins), &version)?;
    let dir = cached(&format!("python-{key}"), |tmp| {
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--target",
        ])
        .arg(tmp)
        .arg("-r")
        .arg(&pins)
        .env("PIP_ROOT_USER_ACTION", "ignore");
        run(cmd, "pip install -r tests/sdk/python/requirements.txt", "needs pip and access to PyPI")
    })?;
    let check = Command::new("python3")
        .args(["-c", "import azure.iot.hub, azure.iot.device"])
        .env("PYTHONPATH", &dir)
        .output()
        .map_err(|e| e.to_string())?;
    if !check.status.success() {
        return Err(format!(
            "the SDKs installed in {} do not import: {}",
            dir.display(),
            String::from_utf8_lossy(&check.stderr).trim()
        ));
    }
    Ok(SdkPaths { var: "PYTHONPATH", dir })
}

fn install_node() -> Result<SdkPaths, String> {
    let version = version_of("node")?;
    version_of("npm")?;
    let src = repo_root().join("tests/sdk/node");
    let pins = [src.join("package.json"), src.join("package-lock.json")];
    let key = cache_key(&pins, &version)?;
    let dir = cached(&format!("node-{key}"), |tmp| {
        for f in &pins {
            std::fs::copy(f, tmp.join(f.file_name().expect("a file name"))).map_err(|e| e.to_string())?;
        }
        let mut cmd = Command::new("npm");
        cmd.args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]).current_dir(tmp);
        run(cmd, "npm ci (tests/sdk/node's lock file)", "needs npm and access to the npm registry")
    })?;
    let modules = dir.join("node_modules");
    if !modules.join("azure-iothub").exists() {
        return Err(format!("npm ci left no azure-iothub in {}", modules.display()));
    }
    Ok(SdkPaths { var: "NODE_PATH", dir: modules })
}

/// The SDK tests skipped in this process, with why.
static SKIPPED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Records and announces a skipped SDK test (only with [`skip_allowed`]). The first skip arranges
/// for the count to be printed when the test process exits, after libtest's own summary.
pub fn note_skip(script: &str, why: &str) {
    let mut s = SKIPPED.lock().unwrap_or_else(|p| p.into_inner());
    if s.is_empty() {
        // SAFETY: `print_skips` is a plain `extern "C" fn` with no arguments, as atexit requires.
        unsafe { libc::atexit(print_skips) };
    }
    s.push((script.to_string(), why.to_string()));
    loud(&format!("SKIPPED {script} (IOTHUB_SDK_TESTS=skip): {why}"));
}

extern "C" fn print_skips() {
    let s = SKIPPED.lock().unwrap_or_else(|p| p.into_inner());
    let mut reasons: Vec<(&str, usize)> = Vec::new();
    for (_, why) in s.iter() {
        match reasons.iter_mut().find(|(w, _)| *w == why) {
            Some((_, n)) => *n += 1,
            None => reasons.push((why, 1)),
        }
    }
    let mut text = format!("\n{} official-SDK test(s) SKIPPED, not run (IOTHUB_SDK_TESTS=skip):\n", s.len());
    for (why, n) in reasons {
        text.push_str(&format!("  {n} × {why}\n"));
    }
    loud(&text);
}

/// Writes to the terminal past libtest's output capture (which only takes `print!` and friends).
fn loud(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}
