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
async fn python_service_sdk_send_c2d_over_amqp() {
    run_sdk_script(Sdk::Python, "c2d_send_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_service_sdk_send_c2d_and_feedback_over_amqp() {
    run_sdk_script(Sdk::Node, "service_c2d_test.js").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_release_step_lists_sends_and_collects_feedback_for_25_devices() {
    run_sdk_script(Sdk::Node, "release_test.js").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_device_mqtt_offline_c2d_twin_methods() {
    run_sdk_script(Sdk::Python, "device_mqtt_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_device_mqtt_offline_c2d_dropped_socket_twin_methods() {
    run_sdk_script(Sdk::Node, "device_mqtt_test.js").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_job_client_twin_update_job_query_cancel() {
    run_sdk_script(Sdk::Node, "jobs_test.js").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_job_manager_create_get_cancel_scheduled_jobs() {
    run_sdk_script(Sdk::Python, "jobs_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_time_travel_expires_an_offline_devices_notice_with_expired_feedback() {
    run_sdk_script(Sdk::Node, "time_travel_test.js").await.unwrap();
}
