//! The official Azure IoT SDKs, unmodified, against the hub (scripts under `tests/sdk/`).
//! Each test starts its own hub on a separate loopback address with the SDKs' fixed ports.

use iothub_emulator_tests::{Sdk, run_sdk_script};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_service_sdk_registry_and_twins() {
    run_sdk_script(Sdk::Python, "registry_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_device_http_receive_complete_reject_abandon() {
    run_sdk_script(Sdk::Node, "device_http_test.js").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_device_mqtt_offline_c2d_twin_methods() {
    run_sdk_script(Sdk::Python, "device_mqtt_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_device_mqtt_offline_c2d_dropped_socket_twin_methods() {
    run_sdk_script(Sdk::Node, "device_mqtt_test.js").await.unwrap();
}
