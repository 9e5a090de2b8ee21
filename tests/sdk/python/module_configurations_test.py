"""Automatic module management (module configurations) with the unmodified Python `azure-iot-hub` 2.7.0 SDK and
`azure-iot-device` 2.14.0 (reference-2 section 6).

Three module identities are created with `IoTHubRegistryManager.create_module_with_sas` and tagged through
`update_module_twin`: `sensor` on device a (env test), `sensor` on device b (env prod), `other` on device a (env
test). `IoTHubConfigurationManager.create_configuration` creates a configuration whose `moduleContent` sets
`properties.desired.settings` on the module twins selected by `FROM devices.modules WHERE moduleId = 'sensor' AND
tags.env = 'test'`: only a/sensor gets it (read with `get_module_twin`), a connected `IoTHubModuleClient` receives it
as a desired-properties patch, the other module twins and the device twin are untouched, a query over
`devices.modules` finds the twin by `configurations.[[id]].status = 'Applied'`, and `systemMetrics` count
targeted = applied = 1; a custom metric over `devices.modules` counts the module that reported the settings.
`test_configuration_queries` accepts a module condition. A configuration with both `deviceContent` and
`moduleContent`, and module content with a device condition, are refused (400). Retagging the module takes the
settings back (the client gets `settings: null`), and after `delete_configuration` nothing targets it. Prints one
line per check; exits 1 on the first failure.
"""

import queue
import sys

from azure.iot.device import IoTHubModuleClient
from azure.iot.hub.models import (
    Configuration,
    ConfigurationContent,
    ConfigurationMetrics,
    ConfigurationQueriesTestInput,
    QuerySpecification,
    Twin,
)

from common import check, check_equal, env, expect_http_error, registry_manager, run_main
from configurations_test import configuration_manager, take_patch_with, wait_for

SCRIPT = "module_configurations_test"
WATCHDOG_S = 120


def desired_settings(rm, device_id, module_id):
    return (rm.get_module_twin(device_id, module_id).properties.desired or {}).get("settings")


def run():
    hub_cs = env("IOTHUB_CONNECTION_STRING")
    host = dict(p.split("=", 1) for p in hub_cs.split(";"))["HostName"]
    rm = registry_manager(hub_cs)
    cm = configuration_manager(hub_cs)
    prefix = env("TEST_DEVICE_PREFIX")
    a, b = f"{prefix}-ma", f"{prefix}-mb"
    for device_id in (a, b):
        rm.create_device_with_sas(device_id, None, None, "enabled")
    modules = ((a, "sensor", "test"), (b, "sensor", "prod"), (a, "other", "test"))
    for device_id, module_id, env_tag in modules:
        rm.create_module_with_sas(device_id, module_id, None, None, None)
        rm.update_module_twin(device_id, module_id, Twin(tags={"env": env_tag, "run": prefix}), "*")
    rm.update_twin(a, Twin(tags={"env": "test", "run": prefix}), "*")

    key = rm.get_module(a, "sensor").authentication.symmetric_key.primary_key
    client = IoTHubModuleClient.create_from_connection_string(
        f"HostName={host};DeviceId={a};ModuleId=sensor;SharedAccessKey={key}", connection_retry=False
    )
    inbox = queue.Queue()
    client.connect()
    client.on_twin_desired_properties_patch_received = inbox.put
    try:
        run_with_module(rm, cm, prefix, (a, b), client, inbox)
    finally:
        client.shutdown()


def run_with_module(rm, cm, prefix, devices, client, inbox):
    a, b = devices
    config_id = f"{prefix}-sensors".lower()
    condition = f"FROM devices.modules WHERE moduleId = 'sensor' AND tags.env = 'test' AND tags.run = '{prefix}'"
    settings = {"interval": 5, "unit": "celsius"}
    metric = f"SELECT deviceId, moduleId FROM devices.modules WHERE properties.reported.settingsVersion = 2 AND tags.run = '{prefix}'"
    config = Configuration(
        id=config_id,
        labels={"kind": "module"},
        content=ConfigurationContent(module_content={"properties.desired.settings": settings}),
        target_condition=condition,
        priority=10,
        metrics=ConfigurationMetrics(queries={"reporting": metric}),
    )
    created = cm.create_configuration(config)
    check_equal("create_configuration: id", created.id, config_id)
    check_equal("create_configuration: moduleContent echoed", created.content.module_content, {"properties.desired.settings": settings})
    check_equal("create_configuration: no deviceContent", created.content.device_content, None)
    check_equal("create_configuration: targetCondition echoed", created.target_condition, condition)
    check_equal(
        "create_configuration: systemMetrics.queries.appliedCount over devices.modules",
        created.system_metrics.queries.get("appliedCount"),
        f"select deviceId, moduleId from devices.modules where configurations.[[{config_id}]].status = 'Applied'",
    )

    got = wait_for(f"{a}/sensor: desired settings from the configuration", lambda: desired_settings(rm, a, "sensor"))
    check_equal(f"get_module_twin {a}/sensor: desired.settings is the configuration's", got, settings)
    patch = take_patch_with(inbox, "connected module", lambda p: "settings" in p)
    check_equal("IoTHubModuleClient received the desired patch", patch["settings"], settings)
    check("the patch carries a $version", isinstance(patch.get("$version"), int), patch)
    check_equal("the module client's twin has it", client.get_twin()["desired"].get("settings"), settings)
    check_equal(f"get_module_twin {b}/sensor (tagged prod): untouched", desired_settings(rm, b, "sensor"), None)
    check_equal(f"get_module_twin {a}/other (another module id): untouched", desired_settings(rm, a, "other"), None)
    check_equal(f"get_twin {a} (the device twin): untouched", (rm.get_twin(a).properties.desired or {}).get("settings"), None)

    applied_query = QuerySpecification(
        query=f"SELECT * FROM devices.modules WHERE configurations.[[{config_id}]].status = 'Applied'"
    )
    found = [(t.device_id, t.module_id) for t in rm.query_iot_hub(applied_query).items]
    check_equal("query_iot_hub devices.modules by configurations.[[id]].status", found, [(a, "sensor")])

    def metrics_are(targeted, applied):
        got = cm.get_configuration(config_id).system_metrics.results
        return got if got == {"targetedCount": targeted, "appliedCount": applied} else None

    wait_for("systemMetrics targeted 1, applied 1", lambda: metrics_are(1, 1))
    check("get_configuration: systemMetrics targetedCount = appliedCount = 1 (module twins)", True)
    client.patch_twin_reported_properties({"settingsVersion": 2})
    check_equal(
        "custom metric over devices.modules counts the module that reported",
        cm.get_configuration(config_id).metrics.results,
        {"reporting": 1},
    )

    tested = cm.test_configuration_queries(ConfigurationQueriesTestInput(target_condition=condition, custom_metric_queries={"ok": metric}))
    check_equal("test_configuration_queries: a module condition is valid", tested.target_condition_error or "", "")
    check_equal("test_configuration_queries: a metric over devices.modules is valid", tested.custom_metric_query_errors or {}, {})
    tested = cm.test_configuration_queries(ConfigurationQueriesTestInput(target_condition="FROM devices.modules WHERE tags.env = "))
    check("test_configuration_queries: a broken module condition is reported", bool(tested.target_condition_error), tested.target_condition_error)

    both = Configuration(
        id=f"{config_id}-both",
        content=ConfigurationContent(device_content={"properties.desired.x": 1}, module_content={"properties.desired.y": 1}),
        target_condition="",
    )
    expect_http_error("deviceContent and moduleContent together", lambda: cm.create_configuration(both), 400, "ArgumentInvalid")
    device_condition = Configuration(
        id=f"{config_id}-devcond",
        content=ConfigurationContent(module_content={"properties.desired.y": 1}),
        target_condition="tags.env = 'test'",
    )
    expect_http_error("moduleContent with a device condition", lambda: cm.create_configuration(device_condition), 400, "ArgumentInvalid")

    rm.update_module_twin(a, "sensor", Twin(tags={"env": "prod"}), "*")
    wait_for(f"{a}/sensor: settings taken back when it leaves scope", lambda: desired_settings(rm, a, "sensor") is None)
    check(f"get_module_twin {a}/sensor: desired.settings gone after retagging", True)
    take_patch_with(inbox, "connected module after leaving scope", lambda p: "settings" in p and p["settings"] is None)
    check("IoTHubModuleClient received settings: null", True)
    wait_for("systemMetrics targeted 0, applied 0", lambda: metrics_are(0, 0))
    check("get_configuration: nothing targeted after retagging", True)

    cm.delete_configuration(config_id)
    expect_http_error("get_configuration after delete", lambda: cm.get_configuration(config_id), 404, "ConfigurationNotFound")


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
