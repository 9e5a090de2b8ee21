"""Automatic device management (configurations) with the unmodified Python `azure-iot-hub` 2.7.0 SDK and
`azure-iot-device` 2.14.0 (reference-2 section 6).

`IoTHubConfigurationManager.create_configuration` creates a configuration whose `deviceContent` sets
`properties.desired.firmware` on devices tagged `env = 'test'`. The two matching twins get it (read through
`IoTHubRegistryManager.get_twin`), a connected `IoTHubDeviceClient` receives it as a desired-properties patch,
the device tagged `prod` is untouched, and `systemMetrics` count targeted = applied = 2; a custom metric query
counts the device that reported the new firmware. `test_configuration_queries` reports query errors;
`get_configurations` lists it; `update_configuration` changes the priority and labels with the etag, refuses a
stale etag (412) and a content change (400); creating the same id again is refused (409); IoT Edge deployment
content (`modulesContent`) is refused (501; module configurations have their own test,
module_configurations_test.py). `delete_configuration` takes the setting back from the twins and the device is told (a patch
with `firmware: null`). Prints one line per check; exits 1 on the first failure.
"""

import queue
import sys
import time

from azure.iot.device import IoTHubDeviceClient
from azure.iot.hub import IoTHubConfigurationManager
from azure.iot.hub.models import (
    Configuration,
    ConfigurationContent,
    ConfigurationMetrics,
    ConfigurationQueriesTestInput,
    Twin,
)

from common import (
    REQUEST_TIMEOUT_S,
    CheckFailed,
    check,
    check_equal,
    env,
    expect_http_error,
    registry_manager,
    run_main,
)

SCRIPT = "configurations_test"
WATCHDOG_S = 120
WAIT_S = 20


def configuration_manager(connection_string):
    """The SDK client with msrest's silent retries off and a per-request timeout (see common.registry_manager)."""
    manager = IoTHubConfigurationManager.from_connection_string(connection_string)
    manager.protocol.config.retry_policy.retries = 0
    manager.protocol.config.connection.timeout = REQUEST_TIMEOUT_S
    return manager


def wait_for(what, probe):
    """Polls `probe()` until it returns a truthy value (the hub applies configurations in the background)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not seen within {WAIT_S} s")
        time.sleep(0.1)


def desired_firmware(rm, device_id):
    return (rm.get_twin(device_id).properties.desired or {}).get("firmware")


def take_patch_with(inbox, what, pred):
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            patch = inbox.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise CheckFailed(f"{what}: no such desired patch within {WAIT_S} s") from None
        if pred(patch):
            return patch


def run():
    hub_cs = env("IOTHUB_CONNECTION_STRING")
    host = dict(p.split("=", 1) for p in hub_cs.split(";"))["HostName"]
    rm = registry_manager(hub_cs)
    cm = configuration_manager(hub_cs)
    prefix = env("TEST_DEVICE_PREFIX")
    a, b, c = f"{prefix}-a", f"{prefix}-b", f"{prefix}-c"
    for device_id, env_tag in ((a, "test"), (b, "test"), (c, "prod")):
        rm.create_device_with_sas(device_id, None, None, "enabled")
        rm.update_twin(device_id, Twin(tags={"env": env_tag, "run": prefix}), "*")

    key = rm.get_device(a).authentication.symmetric_key.primary_key
    client = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={host};DeviceId={a};SharedAccessKey={key}", connection_retry=False
    )
    inbox = queue.Queue()
    client.connect()
    client.on_twin_desired_properties_patch_received = inbox.put
    try:
        run_with_device(rm, cm, prefix, (a, b, c), client, inbox)
    finally:
        client.shutdown()


def run_with_device(rm, cm, prefix, devices, client, inbox):
    a, b, c = devices
    config_id = f"{prefix}-fw".lower()
    condition = f"tags.env = 'test' AND tags.run = '{prefix}'"
    firmware = {"version": "2.0.0", "url": "https://example.invalid/fw-2.0.0.bin"}
    metric = "SELECT deviceId FROM devices WHERE properties.reported.firmware = '2.0.0'"
    config = Configuration(
        id=config_id,
        labels={"release": "2.0.0"},
        content=ConfigurationContent(device_content={"properties.desired.firmware": firmware}),
        target_condition=condition,
        priority=10,
        metrics=ConfigurationMetrics(queries={"current": metric}),
    )
    created = cm.create_configuration(config)
    check_equal("create_configuration: id", created.id, config_id)
    check_equal("create_configuration: targetCondition echoed", created.target_condition, condition)
    check_equal("create_configuration: content echoed", created.content.device_content, {"properties.desired.firmware": firmware})
    check("create_configuration: etag and createdTimeUtc set", bool(created.etag) and created.created_time_utc is not None)
    check_equal(
        "create_configuration: systemMetrics.queries.appliedCount",
        created.system_metrics.queries.get("appliedCount"),
        f"select deviceId from devices where configurations.[[{config_id}]].status = 'Applied'",
    )

    for device_id in (a, b):
        got = wait_for(f"{device_id}: desired firmware from the configuration", lambda d=device_id: desired_firmware(rm, d))
        check_equal(f"get_twin {device_id}: desired.firmware is the configuration's", got, firmware)
    check_equal(f"get_twin {c} (tagged prod): untouched", desired_firmware(rm, c), None)
    patch = take_patch_with(inbox, "connected device", lambda p: "firmware" in p)
    check_equal("IoTHubDeviceClient received the desired patch", patch["firmware"], firmware)
    check("the patch carries a $version", isinstance(patch.get("$version"), int), patch)

    def metrics_are(targeted, applied):
        got = cm.get_configuration(config_id).system_metrics.results
        return got if got == {"targetedCount": targeted, "appliedCount": applied} else None

    wait_for("systemMetrics targeted 2, applied 2", lambda: metrics_are(2, 2))
    check("get_configuration: systemMetrics targetedCount = appliedCount = 2", True)
    client.patch_twin_reported_properties({"firmware": "2.0.0"})
    check_equal("custom metric 'current' counts the device that reported 2.0.0", cm.get_configuration(config_id).metrics.results, {"current": 1})

    tested = cm.test_configuration_queries(
        ConfigurationQueriesTestInput(target_condition="tags.env = ", custom_metric_queries={"ok": metric, "bad": "SELECT FROM"})
    )
    check("test_configuration_queries: targetConditionError set", bool(tested.target_condition_error), tested.target_condition_error)
    check_equal("test_configuration_queries: only 'bad' has an error", sorted(tested.custom_metric_query_errors), ["bad"])

    listed = [x.id for x in cm.get_configurations(100)]
    check("get_configurations lists it", config_id in listed, listed)

    current = cm.get_configuration(config_id)
    current.priority = 20
    current.labels = {"release": "2.0.0", "ring": "all"}
    updated = cm.update_configuration(current, current.etag)
    check_equal("update_configuration: priority", updated.priority, 20)
    check_equal("update_configuration: labels", updated.labels, {"release": "2.0.0", "ring": "all"})
    check("update_configuration: new etag", updated.etag != current.etag, updated.etag)
    check_equal("update_configuration: createdTimeUtc kept", updated.created_time_utc, current.created_time_utc)
    expect_http_error("update_configuration with a stale etag", lambda: cm.update_configuration(current, current.etag), 412, "PreconditionFailed")
    updated.content = ConfigurationContent(device_content={"properties.desired.firmware": {"version": "3.0.0"}})
    expect_http_error("update_configuration changing content", lambda: cm.update_configuration(updated, "*"), 400, "ArgumentInvalid")
    expect_http_error("create_configuration over an existing id", lambda: cm.create_configuration(config), 409, "ConfigurationAlreadyExists")
    module_config = Configuration(
        id=f"{config_id}-modules",
        content=ConfigurationContent(modules_content={"$edgeAgent": {"properties.desired": {}}}),
        target_condition="*",
    )
    expect_http_error("module configuration (modulesContent)", lambda: cm.create_configuration(module_config), 501, "NotImplemented")

    cm.delete_configuration(config_id)
    expect_http_error("get_configuration after delete", lambda: cm.get_configuration(config_id), 404, "ConfigurationNotFound")
    for device_id in (a, b):
        wait_for(f"{device_id}: firmware taken back after delete", lambda d=device_id: desired_firmware(rm, d) is None)
        check(f"get_twin {device_id}: desired.firmware gone after delete", True)
    take_patch_with(inbox, "connected device after delete", lambda p: "firmware" in p and p["firmware"] is None)
    check("IoTHubDeviceClient received firmware: null after delete", True)


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
