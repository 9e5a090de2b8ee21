//! The hub image (`iothub-emulator:dev`, built by `docker/build.sh`) as a [testcontainers] image,
//! for integration tests that want a real IoT Hub emulator process in a container.
//!
//! [`IotHubEmulator`] is both the builder (host name, owner key, devices to seed, image tag, fixed
//! host ports, network) and the testcontainers [`Image`]. [`IotHubEmulator::run`] starts it,
//! publishing only the hub's five ports (random host ports unless fixed with
//! [`IotHubEmulator::host_port`]), waits for the startup line that follows the listeners' bind,
//! fetches the CA from `/ca.pem`, registers the seeded devices through the REST API on the plain
//! port and returns an [`IotHubEmulatorContainer`] with the accessors a test needs. The container
//! is removed when that value is dropped.
//!
//! ```no_run
//! # async fn demo() -> Result<(), iothub_emulator::testcontainers::Error> {
//! use iothub_emulator::testcontainers::IotHubEmulator;
//! let hub = IotHubEmulator::default().device("fridge-1").run().await?;
//! let device_cs = hub.device_connection_string("fridge-1").await?; // HostName=localhost;DeviceId=…
//! let mqtt = (hub.host(), hub.mqtt_port()); // MQTT over TLS, trusting hub.ca_pem()
//! # Ok(()) }
//! ```
//!
//! Prefer `run` to starting the [`Image`] through testcontainers' `AsyncRunner`: without explicit
//! bindings testcontainers publishes every port the image exposes, the 200 FTP passive ports too.
//!
//! This module owns no hub state: everything goes through the container's public ports.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::testcontainers::core::{ContainerPort, IntoContainerPort, WaitFor};
use ::testcontainers::runners::AsyncRunner;
use ::testcontainers::{ContainerAsync, ContainerRequest, Image, ImageExt, TestcontainersError};

use crate::hub::DEFAULT_OWNER_KEY;
use crate::limits::{
    DEFAULT_AMQP_PORT, DEFAULT_FTP_PORT, DEFAULT_HTTP_PORT, DEFAULT_HTTPS_PORT, DEFAULT_MQTT_PORT,
};
use crate::sas::{decode_key, make_token};
use crate::tls::subject_alt_names;

/// The Docker host's address when a started container showed it is not one the certificate names
/// by default (learnt once per process; see [`IotHubEmulator::run`]).
static DOCKER_HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The image `docker/build.sh` builds.
pub const IMAGE_NAME: &str = "iothub-emulator";
/// Its default tag.
pub const IMAGE_TAG: &str = "dev";

/// The hub's ports inside the container (the image's defaults), in the order they are published.
const PORTS: [ContainerPort; 5] = [
    ContainerPort::Tcp(DEFAULT_HTTPS_PORT),
    ContainerPort::Tcp(DEFAULT_MQTT_PORT),
    ContainerPort::Tcp(DEFAULT_AMQP_PORT),
    ContainerPort::Tcp(DEFAULT_HTTP_PORT),
    ContainerPort::Tcp(DEFAULT_FTP_PORT),
];

/// The line the hub prints last once every listener is bound and accepting.
const READY_LINE: &str = "IOTHUB_CONNECTION_STRING=";

/// How long the container may take to start and print [`READY_LINE`].
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on each REST call the module makes (CA download, device registration).
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Lifetime of the SAS tokens the module signs for its own REST calls.
const TOKEN_LIFETIME_SECS: u64 = 3600;

/// The api-version sent on REST calls (the hub accepts every version).
const API_VERSION: &str = "2021-04-12";

/// Why the container could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A builder option is unusable.
    #[error("invalid IotHubEmulator option: {0}")]
    Config(String),
    /// Docker refused or the hub never got ready (a missing image shows up here: build it with
    /// `docker/build.sh`).
    #[error("starting {image} (a local image: build it with docker/build.sh): {source}")]
    Start {
        /// `name:tag`.
        image: String,
        /// The cause.
        source: TestcontainersError,
    },
    /// Docker did not report a host port for a hub port.
    #[error("the host port of container port {port}: {source}")]
    Port {
        /// The container port.
        port: u16,
        /// The cause.
        source: TestcontainersError,
    },
    /// A REST call to the hub failed on the wire.
    #[error("{what}: {source}")]
    Http {
        /// The call.
        what: String,
        /// The cause.
        source: reqwest::Error,
    },
    /// The hub answered a REST call with an error.
    #[error("{what}: HTTP {status}: {body}")]
    Api {
        /// The call.
        what: String,
        /// The status code.
        status: u16,
        /// The hub's error body.
        body: String,
    },
}

/// The hub image and the options it runs with. [`Default`] is the development setup: host name
/// `localhost`, the published owner key, no devices, random host ports.
#[derive(Debug, Clone)]
pub struct IotHubEmulator {
    tag: String,
    hostname: String,
    owner_key: String,
    devices: Vec<String>,
    /// `(container port, host port)` pairs that must not be random.
    fixed_ports: Vec<(u16, u16)>,
    network: Option<String>,
    container_name: Option<String>,
    /// Extra certificate names (`--tls-san`), the Docker host's address among them once known.
    tls_names: Vec<String>,
    /// Tier throttling (`--tier`, `--units`), off when `None`.
    tier: Option<crate::throttle::Tier>,
    /// The flags' env twins, built from the options above (what [`Image::env_vars`] returns).
    env: Vec<(String, String)>,
}

impl Default for IotHubEmulator {
    fn default() -> Self {
        let mut image = Self {
            tag: IMAGE_TAG.into(),
            hostname: "localhost".into(),
            owner_key: DEFAULT_OWNER_KEY.into(),
            devices: Vec::new(),
            fixed_ports: Vec::new(),
            network: None,
            container_name: None,
            tls_names: Vec::new(),
            tier: None,
            env: Vec::new(),
        };
        image.refresh_env();
        image
    }
}

impl IotHubEmulator {
    /// The hub's host name (`--hostname`): `HostName` in connection strings, the SAS audience and
    /// a certificate name. Default `localhost` (the certificate always covers `localhost` and
    /// `127.0.0.1`, so clients on the Docker host can dial the mapped ports either way).
    pub fn hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = hostname.into();
        self.refresh_env();
        self
    }

    /// The `iothubowner` key (base64 of 16 to 64 bytes); the other policies derive from it.
    pub fn owner_key(mut self, key: impl Into<String>) -> Self {
        self.owner_key = key.into();
        self.refresh_env();
        self
    }

    /// A device registered (with generated keys) once the hub is up.
    pub fn device(mut self, id: impl Into<String>) -> Self {
        self.devices.push(id.into());
        self
    }

    /// Devices registered once the hub is up.
    pub fn devices(mut self, ids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.devices.extend(ids.into_iter().map(Into::into));
        self
    }

    /// Throttle as this IoT Hub tier (`--tier`, `--units`): its operation rates and daily message
    /// quota (off by default).
    pub fn tier(mut self, tier: crate::throttle::Tier) -> Self {
        self.tier = Some(tier);
        self.refresh_env();
        self
    }

    /// The image tag (default `dev`).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = tag.into();
        self
    }

    /// Publishes `container_port` (443, 8883, 5671, 8080 or 2121) on a fixed `host_port` instead
    /// of a random one: the official SDKs dial 443, 8883 and 5671 and cannot be told otherwise.
    pub fn host_port(mut self, container_port: u16, host_port: u16) -> Self {
        self.fixed_ports.retain(|(c, _)| *c != container_port);
        self.fixed_ports.push((container_port, host_port));
        self
    }

    /// Joins the Docker network `name` (created if missing), so other containers on it (an SDK
    /// client, say) reach the hub by its container name on the unmapped ports.
    pub fn network(mut self, name: impl Into<String>) -> Self {
        self.network = Some(name.into());
        self
    }

    /// The container's name, which is also its DNS name on a user-defined [`network`](Self::network).
    pub fn container_name(mut self, name: impl Into<String>) -> Self {
        self.container_name = Some(name.into());
        self
    }

    fn refresh_env(&mut self) {
        self.env = vec![
            ("IOTHUB_EMULATOR_HOSTNAME".into(), self.hostname.clone()),
            ("IOTHUB_EMULATOR_OWNER_KEY".into(), self.owner_key.clone()),
        ];
        if !self.tls_names.is_empty() {
            self.env.push(("IOTHUB_EMULATOR_TLS_SANS".into(), self.tls_names.join(",")));
        }
        if let Some(t) = self.tier {
            self.env.push(("IOTHUB_EMULATOR_TIER".into(), t.sku.name().into()));
            self.env.push(("IOTHUB_EMULATOR_UNITS".into(), t.units.to_string()));
        }
    }

    fn descriptor(&self) -> String {
        format!("{IMAGE_NAME}:{}", self.tag)
    }

    /// Another name the server certificate covers (a DNS name or address clients dial), besides
    /// the host name, `localhost`, `127.0.0.1`, `::1` and the Docker host's address, which
    /// [`run`](Self::run) adds by itself.
    pub fn tls_san(mut self, name: impl Into<String>) -> Self {
        self.add_tls_name(&name.into());
        self
    }

    fn add_tls_name(&mut self, name: &str) {
        if !self.covers(name) {
            self.tls_names.push(name.to_ascii_lowercase());
            self.refresh_env();
        }
    }

    /// Whether the certificate the container issues covers `host` (`[::1]` in URL form too).
    fn covers(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        subject_alt_names(&self.hostname, &self.tls_names).contains(&host)
    }

    /// Starts the container with these options and returns it with the host its ports are
    /// published on.
    async fn start_container(&self) -> Result<(ContainerAsync<Self>, String), Error> {
        let image = self.descriptor();
        let (network, name) = (self.network.clone(), self.container_name.clone());
        let mut request: ContainerRequest<Self> = self.clone().with_startup_timeout(STARTUP_TIMEOUT);
        // Explicit bindings publish these five ports only (not the image's FTP passive range);
        // host port 0 lets Docker choose.
        for port in PORTS {
            let n = port.as_u16();
            let host = self.fixed_ports.iter().find(|(c, _)| *c == n).map_or(0, |(_, h)| *h);
            request = request.with_mapped_port(host, port);
        }
        if let Some(network) = network {
            request = request.with_network(network);
        }
        if let Some(name) = name {
            request = request.with_container_name(name);
        }
        let container = request.start().await.map_err(|source| Error::Start { image, source })?;
        let host = container
            .get_host()
            .await
            .map_err(|source| Error::Port { port: DEFAULT_HTTP_PORT, source })?
            .to_string();
        Ok((container, host))
    }

    /// Starts the container, waits until the hub accepts, downloads its CA and registers the
    /// seeded devices.
    pub async fn run(self) -> Result<IotHubEmulatorContainer, Error> {
        decode_key(&self.owner_key)
            .map_err(|e| Error::Config(format!("owner_key is not usable: {e} (base64 of 16 to 64 bytes)")))?;
        if let Some((c, _)) = self.fixed_ports.iter().find(|(c, _)| !PORTS.contains(&c.tcp())) {
            return Err(Error::Config(format!(
                "host_port: container port {c} is not one of the hub's ports 443, 8883, 5671, 8080, 2121"
            )));
        }
        // The certificate must cover the address testcontainers reports for the Docker host:
        // `localhost` usually, but the bridge network's gateway (172.17.0.1) when the tests run in
        // a container themselves. The first start learns it; a start that finds it uncovered is
        // replaced by one whose certificate names it, and later starts name it from the outset.
        let mut options = self;
        if let Some(host) = DOCKER_HOST.get() {
            options.add_tls_name(host);
        }
        let (container, host) = options.start_container().await?;
        let (container, host) = if options.covers(&host) {
            (container, host)
        } else {
            let _ = DOCKER_HOST.set(host.clone());
            options.add_tls_name(&host);
            container.rm().await.map_err(|source| Error::Start { image: options.descriptor(), source })?;
            options.start_container().await?
        };
        let mut mapped = [0u16; 5];
        for (slot, port) in mapped.iter_mut().zip(PORTS) {
            *slot = container
                .get_host_port_ipv4(port)
                .await
                .map_err(|source| Error::Port { port: port.as_u16(), source })?;
        }
        let [https_port, mqtt_port, amqp_port, http_port, ftp_port] = mapped;
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .build()
            .map_err(|source| Error::Http { what: "building the HTTP client".into(), source })?;
        let mut hub = IotHubEmulatorContainer {
            hostname: options.hostname.clone(),
            owner_key: options.owner_key.clone(),
            host,
            https_port,
            mqtt_port,
            amqp_port,
            http_port,
            ftp_port,
            ca_pem: String::new(),
            http,
            container,
        };
        hub.ca_pem = hub.fetch_ca().await?;
        for id in &options.devices {
            hub.register_device(id).await?;
        }
        Ok(hub)
    }
}

impl Image for IotHubEmulator {
    fn name(&self) -> &str {
        IMAGE_NAME
    }

    fn tag(&self) -> &str {
        &self.tag
    }

    fn ready_conditions(&self) -> Vec<WaitFor> {
        vec![WaitFor::message_on_stdout(READY_LINE)]
    }

    fn env_vars(&self) -> impl IntoIterator<Item = (impl Into<Cow<'_, str>>, impl Into<Cow<'_, str>>)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    fn expose_ports(&self) -> &[ContainerPort] {
        &PORTS
    }
}

/// A running hub container; removed on drop.
pub struct IotHubEmulatorContainer {
    hostname: String,
    owner_key: String,
    host: String,
    https_port: u16,
    mqtt_port: u16,
    amqp_port: u16,
    http_port: u16,
    ftp_port: u16,
    ca_pem: String,
    http: reqwest::Client,
    container: ContainerAsync<IotHubEmulator>,
}

impl std::fmt::Debug for IotHubEmulatorContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotHubEmulatorContainer")
            .field("id", &self.container.id())
            .field("hostname", &self.hostname)
            .field("host", &self.host)
            .field("http_port", &self.http_port)
            .finish_non_exhaustive()
    }
}

impl IotHubEmulatorContainer {
    /// The hub's host name (`HostName` in connection strings).
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Where the Docker host publishes the ports: `localhost`, or the bridge network's gateway
    /// (such as `172.17.0.1`) when this process runs in a container. The hub's certificate
    /// covers it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Host port of HTTPS (container 443): IoT Hub's REST API.
    pub fn https_port(&self) -> u16 {
        self.https_port
    }

    /// Host port of MQTT over TLS (container 8883).
    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_port
    }

    /// Host port of AMQP over TLS (container 5671).
    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// Host port of plain HTTP (container 8080): `/health`, `/ca.pem`, the REST API without TLS.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// Host port of the FTP package server (container 2121).
    pub fn ftp_port(&self) -> u16 {
        self.ftp_port
    }

    /// `host:port` of the FTP package server. Passive data connections go to the address the
    /// server announces in `PASV` (the container's own IP, ports 50000–50199), which the Docker
    /// host reaches directly on Linux; the client must dial that address, not this host.
    pub fn ftp_addr(&self) -> String {
        format!("{}:{}", self.host, self.ftp_port)
    }

    /// `http://host:port` of the plain port.
    pub fn http_url(&self) -> String {
        format!("http://{}:{}", self.host, self.http_port)
    }

    /// `https://host:port` of the REST API (trust [`ca_pem`](Self::ca_pem)).
    pub fn https_url(&self) -> String {
        format!("https://{}:{}", self.host, self.https_port)
    }

    /// The hub's CA certificate (PEM) clients must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The `iothubowner` connection string.
    pub fn service_connection_string(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
            self.hostname, self.owner_key
        )
    }

    /// An `iothubowner` SAS token for this hub, valid for an hour.
    pub fn owner_token(&self) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        // The key was checked in `run`, so signing cannot fail.
        make_token(&self.hostname, &self.owner_key, Some("iothubowner"), now + TOKEN_LIFETIME_SECS)
            .unwrap_or_default()
    }

    /// The testcontainers handle (logs, exec, stop).
    pub fn container(&self) -> &ContainerAsync<IotHubEmulator> {
        &self.container
    }

    /// Registers `id` with generated keys and returns its connection string.
    pub async fn register_device(&self, id: &str) -> Result<String, Error> {
        let what = format!("registering device {id}");
        let resp = self
            .http
            .put(self.device_url(id))
            .header("authorization", self.owner_token())
            .json(&serde_json::json!({ "deviceId": id }))
            .send()
            .await
            .map_err(|source| Error::Http { what: what.clone(), source })?;
        let device = Self::json(resp, &what).await?;
        self.connection_string_from(id, &device, &what)
    }

    /// The connection string of the registered device `id` (its primary key).
    pub async fn device_connection_string(&self, id: &str) -> Result<String, Error> {
        let what = format!("reading device {id}");
        let resp = self
            .http
            .get(self.device_url(id))
            .header("authorization", self.owner_token())
            .send()
            .await
            .map_err(|source| Error::Http { what: what.clone(), source })?;
        let device = Self::json(resp, &what).await?;
        self.connection_string_from(id, &device, &what)
    }

    /// Moves the hub's time forward by `by` (`POST /emulator/time`): queued C2D messages expire,
    /// locks lapse, jobs start and feedback batches are cut as if that much time had passed.
    /// SAS tokens are not affected. Returns the new hub time (Unix milliseconds).
    pub async fn advance_time(&self, by: std::time::Duration) -> Result<u64, Error> {
        let body = serde_json::json!({ "advanceMs": by.as_millis() as u64 });
        let req = self.http.post(format!("{}/emulator/time", self.http_url())).json(&body);
        Self::time_call(req, format!("advancing hub time by {by:?}")).await
    }

    /// The hub's time (`GET /emulator/time`), Unix milliseconds.
    pub async fn hub_time(&self) -> Result<u64, Error> {
        let req = self.http.get(format!("{}/emulator/time", self.http_url()));
        Self::time_call(req, "reading hub time".to_string()).await
    }

    /// Sends a `/emulator/time` request and returns the `nowMs` it answers with.
    async fn time_call(req: reqwest::RequestBuilder, what: String) -> Result<u64, Error> {
        let resp = req.send().await.map_err(|source| Error::Http { what: what.clone(), source })?;
        let body = Self::json(resp, &what).await?;
        body["nowMs"].as_u64().ok_or_else(|| Error::Api { what, status: 200, body: body.to_string() })
    }

    fn device_url(&self, id: &str) -> String {
        let id = percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC);
        format!("{}/devices/{id}?api-version={API_VERSION}", self.http_url())
    }

    fn connection_string_from(
        &self,
        id: &str,
        device: &serde_json::Value,
        what: &str,
    ) -> Result<String, Error> {
        let key = device.pointer("/authentication/symmetricKey/primaryKey").and_then(|k| k.as_str());
        match key {
            Some(key) => Ok(format!("HostName={};DeviceId={id};SharedAccessKey={key}", self.hostname)),
            None => Err(Error::Api {
                what: what.into(),
                status: 200,
                body: format!("no primary key in {device}"),
            }),
        }
    }

    async fn json(resp: reqwest::Response, what: &str) -> Result<serde_json::Value, Error> {
        let status = resp.status();
        let body = resp.text().await.map_err(|source| Error::Http { what: what.into(), source })?;
        if !status.is_success() {
            return Err(Error::Api { what: what.into(), status: status.as_u16(), body });
        }
        serde_json::from_str(&body).map_err(|e| Error::Api {
            what: what.into(),
            status: status.as_u16(),
            body: format!("not JSON ({e}): {body}"),
        })
    }

    async fn fetch_ca(&self) -> Result<String, Error> {
        let what = "downloading /ca.pem".to_string();
        let resp = self
            .http
            .get(format!("{}/ca.pem", self.http_url()))
            .send()
            .await
            .map_err(|source| Error::Http { what: what.clone(), source })?;
        let status = resp.status();
        let body = resp.text().await.map_err(|source| Error::Http { what: what.clone(), source })?;
        if !status.is_success() || !body.contains("BEGIN CERTIFICATE") {
            return Err(Error::Api { what, status: status.as_u16(), body });
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_env_twins_and_ports() {
        let image = IotHubEmulator::default().hostname("hub").owner_key("a2V5LWtleS1rZXkta2V5LWtleQ==");
        let env: Vec<(String, String)> = image.env.clone();
        assert!(env.contains(&("IOTHUB_EMULATOR_HOSTNAME".into(), "hub".into())));
        assert!(env.contains(&("IOTHUB_EMULATOR_OWNER_KEY".into(), "a2V5LWtleS1rZXkta2V5LWtleQ==".into())));
        assert_eq!(image.descriptor(), "iothub-emulator:dev");
        assert_eq!(Image::expose_ports(&image).len(), 5);
        let tier = crate::throttle::Tier::new(crate::throttle::Sku::S2, 3).unwrap();
        let image = image.tier(tier);
        assert!(image.env.contains(&("IOTHUB_EMULATOR_TIER".into(), "S2".into())));
        assert!(image.env.contains(&("IOTHUB_EMULATOR_UNITS".into(), "3".into())));
        let fixed = image.host_port(8883, 18883).host_port(8883, 28883);
        assert_eq!(fixed.fixed_ports, vec![(8883, 28883)], "the last mapping of a port wins");
    }

    #[test]
    fn the_certificate_names_cover_the_docker_host_once_added() {
        let image = IotHubEmulator::default().hostname("Hub-Under-Test");
        for host in ["localhost", "127.0.0.1", "[::1]", "::1", "hub-under-test"] {
            assert!(image.covers(host), "{host}");
        }
        assert!(!image.covers("172.17.0.1"));
        assert!(!image.env.iter().any(|(k, _)| k == "IOTHUB_EMULATOR_TLS_SANS"), "no extra names by default");
        let image = image.tls_san("172.17.0.1").tls_san("hub.compose").tls_san("localhost");
        assert!(image.covers("172.17.0.1") && image.covers("HUB.compose"));
        assert_eq!(image.tls_names, ["172.17.0.1", "hub.compose"], "names already covered are not repeated");
        assert!(image.env.contains(&("IOTHUB_EMULATOR_TLS_SANS".into(), "172.17.0.1,hub.compose".into())));
    }

    #[tokio::test]
    async fn bad_options_are_refused_before_docker_is_asked() {
        let err = IotHubEmulator::default().owner_key("not base64!").run().await.unwrap_err();
        assert!(err.to_string().contains("owner_key"), "{err}");
        let err = IotHubEmulator::default().host_port(1234, 1234).run().await.unwrap_err();
        assert!(err.to_string().contains("1234"), "{err}");
    }
}
