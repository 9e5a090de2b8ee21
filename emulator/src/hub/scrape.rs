//! `GET /metrics`: the hub's state in Prometheus text format. Owns nothing: the gauges come from
//! their owners' live counters (registered and connected devices, the dashboard's feedback counts,
//! the event log's appended count), the rest from [`crate::metrics::Metrics`]. A scrape takes no
//! shard lock and walks no devices; it locks the event log once to read one number.

use crate::metrics::{Encoder, FEEDBACK_STATUSES};

use super::Hub;

impl Hub {
    /// The exposition `GET /metrics` answers with (content type [`crate::metrics::CONTENT_TYPE`]).
    pub fn prometheus_text(&self) -> String {
        let mut e = Encoder::new();
        let devices = self.device_count() as u64;
        e.family("iothub_registered_devices", "Devices in the identity registry.", "gauge");
        e.sample("iothub_registered_devices", &[], devices as f64);
        e.family(
            "iothub_connected_devices",
            "Devices with an open connection (MQTT, over TCP or WebSocket).",
            "gauge",
        );
        e.sample("iothub_connected_devices", &[], self.connected_count() as f64);
        let name = "iothub_telemetry_messages_received_total";
        e.family(name, "Device-to-cloud messages recorded in the event log (MQTT, HTTPS, Wills).", "counter");
        e.sample(name, &[], self.event_log().appended() as f64);
        let name = "iothub_feedback_records_total";
        e.family(name, "C2D feedback records emitted, by status.", "counter");
        let counts = self.feedback_counts();
        for (status, n) in FEEDBACK_STATUSES.iter().zip(counts) {
            e.sample(name, &[("status", status.as_str())], n as f64);
        }
        self.metrics().encode(&mut e, devices);
        e.finish()
    }
}
