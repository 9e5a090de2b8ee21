//! The official Azure IoT SDKs, unmodified, against the hub (scripts under `tests/sdk/`).
//! Each test starts its own hub on a separate loopback address with the SDKs' fixed ports.

use iothub_emulator_tests::{Sdk, run_sdk_script, run_sdk_script_with_azurite};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_x509_devices_self_signed_and_ca_signed_send_telemetry_and_receive_c2d() {
    iothub_emulator_tests::run_sdk_script_x509(Sdk::Python, "device_x509_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_x509_devices_self_signed_and_ca_signed_send_telemetry_and_receive_c2d() {
    iothub_emulator_tests::run_sdk_script_x509(Sdk::Node, "device_x509_test.js").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_pnp_device_model_id_shows_in_its_twin_and_is_queryable() {
    run_sdk_script(Sdk::Python, "pnp_model_id_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_module_client_twin_methods_and_telemetry_through_the_registry_manager() {
    run_sdk_script(Sdk::Python, "module_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_module_client_over_mqtt_twin_methods_and_telemetry() {
    run_sdk_script(Sdk::Node, "module_test.js").await.unwrap();
}

/// A hub throttling as IoT Hub S1 × 1 unit (reference §5.1).
fn s1_hub() -> iothub_emulator::HubConfig {
    let tier = iothub_emulator::throttle::Tier::new(iothub_emulator::throttle::Sku::S1, 1).expect("tier");
    iothub_emulator::HubConfig { throttle: Some(tier), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_service_sdk_gets_429_throttling_and_succeeds_on_retry() {
    iothub_emulator_tests::run_sdk_script_with(Sdk::Node, "throttle_test.js", s1_hub()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_service_sdk_rides_out_429_throttling_and_retries_what_it_surfaces() {
    iothub_emulator_tests::run_sdk_script_with(Sdk::Python, "throttle_test.py", s1_hub()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_event_hubs_sdk_receives_device_telemetry_and_follows_the_redirect() {
    run_sdk_script(Sdk::Python, "eventhub_receive_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_event_processor_with_blob_checkpoints_in_azurite_resumes_after_a_restart() {
    run_sdk_script_with_azurite("eventhub_checkpoint_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_event_hubs_sdk_subscribes_from_a_time_in_two_groups_follows_the_redirect_and_owner_levels_evict()
 {
    run_sdk_script(Sdk::Node, "eventhub_test.js").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_dps_group_enrollment_registers_and_the_device_connects_to_its_assigned_hub() {
    run_sdk_script(Sdk::Python, "dps_symmetric_key_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_dps_group_over_mqtt_individual_over_https_and_the_enrollment_service_client() {
    run_sdk_script(Sdk::Node, "dps_test.js").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_dps_x509_group_and_individual_enrollments_provision_and_connect() {
    iothub_emulator_tests::run_sdk_script_x509(Sdk::Python, "dps_x509_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_configuration_manager_applies_desired_content_to_matching_twins_and_counts_them() {
    run_sdk_script(Sdk::Python, "configurations_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_module_configuration_writes_matching_module_twins_and_counts_them() {
    run_sdk_script(Sdk::Python, "module_configurations_test.py").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registry_configurations_apply_update_and_remove() {
    run_sdk_script(Sdk::Node, "configurations_test.js").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_c2d_to_an_offline_device_survives_sigkill_of_a_persist_hub() {
    iothub_emulator_tests::run_sdk_script_across_hub_kill("persist_restart_test.py").await.unwrap();
}
