//! `rumqttd-peer --listen ADDR --max-connections N`: a rumqttd 0.19 broker with one plain MQTT
//! 3.1.1 listener and limits sized for the fan-out bench (no TLS, no websockets, no console, no
//! metrics, no connection throttle), run until killed. `--version` prints `rumqttd <version>`.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

const RUMQTTD_VERSION: &str = "0.19.0";

fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut max_connections = 20_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--version" => {
                println!("rumqttd {RUMQTTD_VERSION}");
                return;
            }
            "--listen" => listen = args.next().and_then(|v| v.parse().ok()),
            "--max-connections" => {
                max_connections = args.next().and_then(|v| v.parse().ok()).unwrap_or(max_connections)
            }
            other => {
                eprintln!(
                    "unknown argument {other:?}; usage: rumqttd-peer --listen ADDR [--max-connections N]"
                );
                std::process::exit(2);
            }
        }
    }
    let Some(listen) = listen else {
        eprintln!("usage: rumqttd-peer --listen ADDR [--max-connections N]");
        std::process::exit(2);
    };
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 64 * 1024,
        // The publishers keep 64 QoS 1 messages in flight; devices get one each.
        max_inflight_count: 1024,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        // rumqttd's sample configuration waits 1 ms between accepts; that caps connects at 1,000/s.
        next_connection_delay_ms: 0,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            // Per-connection outgoing queue; the bench sends each device one message.
            max_outgoing_packet_count: 1024,
            // rumqttd's sample configuration: segments of up to 100 MiB, 10 of them per filter.
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    if let Err(e) = broker.start() {
        eprintln!("rumqttd: {e}");
        std::process::exit(1);
    }
}
