//! The pipeline examples in `docs/ci/` run here as their CI would run them: each YAML file is
//! parsed, the hub's service container is started from the locally built image with the ports
//! (on random loopback ports), env and volume the file gives, and every shell step is executed in
//! order under bash with the CI's placeholders mapped to local values. A step that exits non-zero
//! fails the test with its output; steps marked to run always (`if: always()`,
//! `condition: succeededOrFailed()`) still run after a failure, as in CI.
//!
//! What is not run: `uses:` / `task:` steps and the steps named "Set up …" (toolchains, `cargo
//! build`, `npm ci`): the harness provides their results, the binaries `cargo test --workspace`
//! builds in `target/debug` and the pinned Node SDK from `target/sdk-cache` (`NODE_PATH`). Azure's
//! PublishTestResults@2 is checked instead: it must name the JUnit file the scenario wrote, and that
//! file must report every expectation met.
//!
//! Gated like the other container tests: skipped with a message when Docker, the image
//! (`docker/build.sh`; tag `IOTHUB_EMULATOR_TAG`, default `dev`) or the binaries are missing, unless
//! `IOTHUB_CONTAINER_TESTS=required` (CI), which makes that a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use iothub_emulator::testcontainers::{IMAGE_NAME, IMAGE_TAG};
use iothub_emulator_tests::{Sdk, container_tests_required, container_unavailable, repo_root, unique};
use yaml_rust2::{Yaml, YamlLoader};

/// The volume source both examples mount as the hub's `/data`; mapped to a fresh local directory.
const DATA_PLACEHOLDER: &str = "/tmp/iothub-data";
/// Longest a step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest the hub container may take to report healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

/// Which CI a file is for: how its steps run and which placeholders it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ci {
    GithubActions,
    AzurePipelines,
}

/// The hub's service container as the file declares it.
#[derive(Debug, Default)]
struct Service {
    image: String,
    ports: Vec<u16>,
    env: Vec<(String, String)>,
    /// `(source, target)`.
    volumes: Vec<(String, String)>,
}

#[derive(Debug)]
struct Step {
    name: String,
    script: String,
    env: Vec<(String, String)>,
    /// Runs after an earlier step failed too.
    always: bool,
}

#[derive(Debug)]
struct Pipeline {
    ci: Ci,
    service: Service,
    /// Job-level env (GitHub) or variables (Azure).
    env: Vec<(String, String)>,
    steps: Vec<Step>,
    /// Steps left to the harness, by name (for the log).
    provided: Vec<String>,
    /// PublishTestResults@2's `testResultsFiles` (Azure).
    junit: Option<String>,
}

fn text(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        Yaml::Real(r) => Some(r.clone()),
        _ => None,
    }
}

fn map(y: &Yaml) -> Result<Vec<(String, String)>> {
    match y {
        Yaml::BadValue | Yaml::Null => Ok(Vec::new()),
        Yaml::Hash(h) => h
            .iter()
            .map(|(k, v)| {
                Ok((text(k).context("a key")?, text(v).with_context(|| format!("value of {k:?}"))?))
            })
            .collect(),
        other => bail!("expected a mapping, got {other:?}"),
    }
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[], Vec::as_slice)
}

/// A service's `ports` entry: `8080`, `"8080/tcp"` or `"8080:8080"` (the container port).
fn container_port(y: &Yaml) -> Result<u16> {
    let s = text(y).context("a port")?;
    let s = s.split('/').next().unwrap_or_default();
    let port = s.rsplit(':').next().unwrap_or_default();
    port.parse().with_context(|| format!("port {s:?}"))
}

fn volumes(y: &Yaml) -> Result<Vec<(String, String)>> {
    list(y)
        .iter()
        .map(|v| {
            let s = text(v).context("a volume")?;
            let (src, dst) = s.split_once(':').with_context(|| format!("volume {s:?} is not SRC:DST"))?;
            Ok((src.to_string(), dst.to_string()))
        })
        .collect()
}

fn parse_github(doc: &Yaml) -> Result<Pipeline> {
    let jobs = doc["jobs"].as_hash().context("jobs")?;
    ensure!(jobs.len() == 1, "one job expected");
    let job = jobs.values().next().context("a job")?;
    let hub = &job["services"]["hub"];
    let service = Service {
        image: text(&hub["image"]).context("services.hub.image")?,
        ports: list(&hub["ports"]).iter().map(container_port).collect::<Result<_>>()?,
        env: map(&hub["env"])?,
        volumes: volumes(&hub["volumes"])?,
    };
    let mut steps = Vec::new();
    let mut provided = Vec::new();
    for s in list(&job["steps"]) {
        let name = text(&s["name"]).or_else(|| text(&s["uses"])).unwrap_or_default();
        match text(&s["run"]) {
            Some(script) if !name.starts_with("Set up") => steps.push(Step {
                name,
                script,
                env: map(&s["env"])?,
                always: text(&s["if"]).is_some_and(|c| c.contains("always()")),
            }),
            _ => provided.push(name),
        }
    }
    Ok(Pipeline { ci: Ci::GithubActions, service, env: map(&job["env"])?, steps, provided, junit: None })
}

fn parse_azure(doc: &Yaml) -> Result<Pipeline> {
    let containers = list(&doc["resources"]["containers"]);
    let jobs = list(&doc["jobs"]);
    ensure!(jobs.len() == 1, "one job expected");
    let job = &jobs[0];
    let alias = text(&job["services"]["hub"]).context("jobs[0].services.hub")?;
    let hub = containers
        .iter()
        .find(|c| text(&c["container"]).as_deref() == Some(alias.as_str()))
        .with_context(|| format!("no container resource '{alias}'"))?;
    let service = Service {
        image: text(&hub["image"]).context("image")?,
        ports: list(&hub["ports"]).iter().map(container_port).collect::<Result<_>>()?,
        env: map(&hub["env"])?,
        volumes: volumes(&hub["volumes"])?,
    };
    let mut steps = Vec::new();
    let mut provided = Vec::new();
    let mut junit = None;
    for s in list(&job["steps"]) {
        let name = text(&s["displayName"])
            .or_else(|| text(&s["task"]))
            .or_else(|| text(&s["checkout"]).map(|c| format!("checkout: {c}")))
            .unwrap_or_default();
        if text(&s["task"]).as_deref() == Some("PublishTestResults@2") {
            ensure!(text(&s["inputs"]["testResultsFormat"]).as_deref() == Some("JUnit"), "JUnit results");
            junit = Some(text(&s["inputs"]["testResultsFiles"]).context("testResultsFiles")?);
        }
        match text(&s["script"]) {
            Some(script) if !name.starts_with("Set up") => steps.push(Step {
                name,
                script,
                env: map(&s["env"])?,
                always: text(&s["condition"])
                    .is_some_and(|c| c.contains("succeededOrFailed") || c == "always()"),
            }),
            _ => provided.push(name),
        }
    }
    Ok(Pipeline { ci: Ci::AzurePipelines, service, env: map(&job["variables"])?, steps, provided, junit })
}

fn load(file: &str) -> Result<Pipeline> {
    let path = repo_root().join("docs/ci").join(file);
    let source = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let docs = YamlLoader::load_from_str(&source).with_context(|| format!("{file} is not YAML"))?;
    let doc = docs.first().context("an empty YAML file")?;
    if file.starts_with("github") { parse_github(doc) } else { parse_azure(doc) }
}

/// Removes the container when the test ends, also on failure.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "--force", "--volumes", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn docker(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("docker").args(args).output().context("running docker")?;
    if !out.status.success() {
        bail!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The local values the placeholders map to.
struct Local {
    image: String,
    data_dir: PathBuf,
    temp_dir: PathBuf,
    /// Container port → host port.
    ports: BTreeMap<u16, u16>,
    node_path: PathBuf,
    root: bool,
}

impl Local {
    /// `s` with every placeholder of `ci` replaced; fails on a GitHub expression it does not know.
    fn map(&self, ci: Ci, s: &str) -> Result<String> {
        let mut out = s.replace(DATA_PLACEHOLDER, &self.data_dir.display().to_string());
        if self.root {
            // Hosted runners run steps as a user with passwordless sudo; this test runs as root.
            out = out.replace("sudo ", "");
        }
        let temp = self.temp_dir.display().to_string();
        match ci {
            Ci::GithubActions => {
                for (c, h) in &self.ports {
                    out = out.replace(&format!("${{{{ job.services.hub.ports['{c}'] }}}}"), &h.to_string());
                }
                out = out.replace("${{ runner.temp }}", &temp);
                if let Some(i) = out.find("${{") {
                    bail!("no local value for the expression at {:?}", &out[i..]);
                }
            }
            Ci::AzurePipelines => {
                for (c, h) in &self.ports {
                    out = out.replace(&format!("$(agent.services.hub.ports.{c})"), &h.to_string());
                }
                let root = repo_root().display().to_string();
                out = out
                    .replace("$(Agent.TempDirectory)", &temp)
                    .replace("$(Build.SourcesDirectory)", &root)
                    .replace("$(Build.BuildId)", &std::process::id().to_string());
            }
        }
        Ok(out)
    }
}

/// Starts the service container as the CI would, with its ports on random loopback ports; waits
/// until it is healthy (both CIs wait for a service's health check).
fn start_service(p: &Pipeline, local: &mut Local) -> Result<Container> {
    let name = unique("ci-hub");
    let mut args: Vec<String> = vec!["run".into(), "--detach".into(), "--name".into(), name.clone()];
    for port in &p.service.ports {
        args.extend(["--publish".into(), format!("127.0.0.1::{port}")]);
    }
    for (k, v) in &p.service.env {
        args.extend(["--env".into(), format!("{k}={}", local.map(p.ci, v)?)]);
    }
    for (src, dst) in &p.service.volumes {
        args.extend(["--volume".into(), format!("{}:{dst}", local.map(p.ci, src)?)]);
    }
    args.push(local.image.clone());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&refs)?;
    let container = Container(name.clone());
    for port in &p.service.ports {
        let mapped = docker(&["port", &name, &format!("{port}/tcp")])?;
        let host_port = mapped
            .lines()
            .next()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("docker port {port}: {mapped:?}"))?;
        local.ports.insert(*port, host_port);
    }
    let deadline = Instant::now() + HEALTHY_WITHIN;
    loop {
        let health = docker(&["inspect", "--format", "{{.State.Health.Status}}", &name])?;
        if health == "healthy" {
            return Ok(container);
        }
        if Instant::now() > deadline {
            let logs = docker(&["logs", &name]).unwrap_or_default();
            bail!("the hub container is {health} after {HEALTHY_WITHIN:?}; its log:\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Reads a `GITHUB_ENV` file (`KEY=VALUE` lines) into `env`.
fn read_github_env(path: &Path, env: &mut BTreeMap<String, String>) -> Result<()> {
    let content = std::fs::read_to_string(path).unwrap_or_default();
    for line in content.lines().filter(|l| !l.trim().is_empty()) {
        ensure!(!line.contains("<<"), "multi-line GITHUB_ENV values are not supported here: {line}");
        let (k, v) = line.split_once('=').with_context(|| format!("GITHUB_ENV line {line:?}"))?;
        env.insert(k.to_string(), v.to_string());
    }
    Ok(())
}

/// Runs one step's script as the CI runs it; returns its combined output, or an error naming the
/// step with its output.
async fn run_step(ci: Ci, step: &Step, script: &str, env: &BTreeMap<String, String>) -> Result<String> {
    let mut cmd = tokio::process::Command::new("bash");
    match ci {
        // GitHub: `bash --noprofile --norc -eo pipefail {0}`.
        Ci::GithubActions => cmd.args(["--noprofile", "--norc", "-eo", "pipefail", "-c", script]),
        // Azure: `bash --noprofile --norc <file>`; the script sets its own options.
        Ci::AzurePipelines => cmd.args(["--noprofile", "--norc", "-c", script]),
    };
    // Nothing of the developer's hub settings leaks into the steps.
    for (k, _) in std::env::vars() {
        if k.starts_with("IOTHUB_") && k != "IOTHUB_CONTAINER_TESTS" && k != "IOTHUB_SDK_TESTS" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env).current_dir(repo_root()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = cmd.spawn().context("starting bash")?;
    let out = tokio::time::timeout(STEP_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("step '{}' did not finish within {STEP_TIMEOUT:?}", step.name))??;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("step '{}' failed ({}):\n{script}\n--- output ---\n{text}", step.name, out.status);
    }
    Ok(text)
}

/// Whether the harness can run here: `None`, or why not (then the test is skipped, or fails when
/// required).
fn unavailable(image: &str) -> Option<String> {
    if let Some(why) = container_unavailable(image) {
        return Some(why);
    }
    for bin in ["testbench", "iothub-emulator"] {
        let path = repo_root().join("target/debug").join(bin);
        if !path.is_file() {
            return Some(format!(
                "{} is missing (cargo build -p testbench -p iothub-emulator --bins)",
                path.display()
            ));
        }
    }
    iothub_emulator_tests::sdk_setup::ensure(Sdk::Node)
        .err()
        .map(|e| format!("the Node SDK cannot be set up: {e}"))
}

async fn run_pipeline(file: &str) -> Result<()> {
    let p = load(file)?;
    ensure!(!p.steps.is_empty(), "{file}: no steps to run");
    let tag = std::env::var("IOTHUB_EMULATOR_TAG").unwrap_or_else(|_| IMAGE_TAG.to_string());
    let image = format!("{IMAGE_NAME}:{tag}");
    ensure!(
        p.service.image.ends_with(&format!("/{IMAGE_NAME}:dev")),
        "{file}: the hub image is {}",
        p.service.image
    );
    if let Some(why) = unavailable(&image) {
        if container_tests_required() {
            bail!("IOTHUB_CONTAINER_TESTS=required but {why}");
        }
        eprintln!("skipped the {file} example: {why} (IOTHUB_CONTAINER_TESTS=required makes this a failure)");
        return Ok(());
    }
    let node = iothub_emulator_tests::sdk_setup::ensure(Sdk::Node).map_err(anyhow::Error::msg)?;
    let scratch = tempfile::tempdir()?;
    let mut local = Local {
        image,
        data_dir: scratch.path().join("data"),
        temp_dir: scratch.path().join("runner-temp"),
        ports: BTreeMap::new(),
        node_path: node.dir,
        root: unsafe { libc::geteuid() } == 0,
    };
    std::fs::create_dir_all(&local.data_dir)?;
    std::fs::create_dir_all(&local.temp_dir)?;
    eprintln!("{file}: left to the harness: {:?}", p.provided);
    let _container = start_service(&p, &mut local)?;

    let mut env = BTreeMap::new();
    for (k, v) in &p.env {
        env.insert(k.clone(), local.map(p.ci, v)?);
    }
    // What the "Set up" steps would have left behind.
    env.insert("NODE_PATH".into(), local.node_path.display().to_string());
    let github_env = local.temp_dir.join("github-env");
    if p.ci == Ci::GithubActions {
        env.insert("RUNNER_TEMP".into(), local.temp_dir.display().to_string());
        env.insert("GITHUB_WORKSPACE".into(), repo_root().display().to_string());
        env.insert("GITHUB_RUN_ID".into(), std::process::id().to_string());
        env.insert("GITHUB_RUN_ATTEMPT".into(), "1".into());
        env.insert("CI".into(), "true".into());
    }

    let mut failed: Option<anyhow::Error> = None;
    for step in &p.steps {
        if failed.is_some() && !step.always {
            eprintln!("{file}: skipped '{}' (an earlier step failed)", step.name);
            continue;
        }
        let script = local.map(p.ci, &step.script)?;
        let mut step_env = env.clone();
        for (k, v) in &step.env {
            step_env.insert(k.clone(), local.map(p.ci, v)?);
        }
        if p.ci == Ci::GithubActions {
            std::fs::write(&github_env, "")?;
            step_env.insert("GITHUB_ENV".into(), github_env.display().to_string());
        }
        let started = Instant::now();
        match run_step(p.ci, step, &script, &step_env).await {
            Ok(out) => {
                eprintln!("{file}: '{}' passed in {:.1} s", step.name, started.elapsed().as_secs_f64());
                let tail: Vec<&str> = out.lines().rev().take(5).collect();
                eprintln!("  … {}", tail.into_iter().rev().collect::<Vec<_>>().join("\n  … "));
            }
            Err(e) => {
                eprintln!("{file}: {e:#}");
                failed.get_or_insert(e);
            }
        }
        if p.ci == Ci::GithubActions {
            read_github_env(&github_env, &mut env)?;
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some(junit) = &p.junit {
        let path = local.map(p.ci, junit)?;
        let xml = std::fs::read_to_string(&path).with_context(|| {
            format!("PublishTestResults@2 names {path}, which the scenario did not write")
        })?;
        ensure!(xml.contains("<testsuite") && xml.contains("failures=\"0\""), "{path}: {xml}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_github_actions_example_runs_against_the_hub_image() {
    run_pipeline("github-actions.yml").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_pipelines_example_runs_against_the_hub_image() {
    run_pipeline("azure-pipelines.yml").await.unwrap();
}

/// The parsers see what the files say (this part needs no Docker).
#[test]
fn both_examples_parse_into_a_service_and_steps() {
    for file in ["github-actions.yml", "azure-pipelines.yml"] {
        let p = load(file).unwrap();
        assert_eq!(p.service.ports, [443, 8883, 5671, 8080, 2121], "{file}");
        assert!(p.service.volumes.iter().any(|(s, d)| s == DATA_PLACEHOLDER && d == "/data"), "{file}");
        let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
        assert!(names.iter().any(|n| n.starts_with("Scenario")), "{file}: {names:?}");
        assert!(names.iter().any(|n| n.starts_with("Official SDK test")), "{file}: {names:?}");
        assert!(p.steps.iter().any(|s| s.script.contains("--junit")), "{file}");
        assert!(p.provided.iter().any(|n| n.starts_with("Set up")), "{file}: {:?}", p.provided);
    }
    let azure = load("azure-pipelines.yml").unwrap();
    assert_eq!(azure.junit.as_deref(), Some("$(Agent.TempDirectory)/testbench-junit.xml"));
}
