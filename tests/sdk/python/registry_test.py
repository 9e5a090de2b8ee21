"""Registry and twin REST against the emulator with the unmodified Python `azure-iot-hub` 2.7.0 SDK.

Drives `IoTHubRegistryManager.from_connection_string` through device create (generated keys), duplicate
create (409), get, list, query (by id and by tag), twin get / update / stale-etag update (412) / replace,
device disable with its etag (and a stale etag, 412), registry statistics, delete, and get-after-delete
(404), asserting on what the SDK returns. Run by the Rust harness as
`python3 tests/sdk/python/registry_test.py` with the environment described in tests/sdk (the hub's CA
is trusted through REQUESTS_CA_BUNDLE). Prints one line per check; exits 1 on the first failure.
"""

import base64
import sys

from azure.iot.hub.models import QuerySpecification, Twin, TwinProperties
from common import check, check_equal, env, expect_http_error, registry_manager, run_main

SCRIPT = "registry_test"
WATCHDOG_S = 90


def is_key(key):
    """A generated key: 44 base64 characters decoding to 32 bytes."""
    if not isinstance(key, str) or len(key) != 44:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 32
    except ValueError:
        return False


def check_create(rm, device_id):
    device = rm.create_device_with_sas(device_id, None, None, "enabled")
    check_equal("create_device_with_sas: deviceId", device.device_id, device_id)
    check_equal("create_device_with_sas: status", device.status, "enabled")
    keys = device.authentication.symmetric_key
    check("create_device_with_sas: primary key generated", is_key(keys.primary_key), keys.primary_key)
    check("create_device_with_sas: secondary key generated", is_key(keys.secondary_key), keys.secondary_key)
    check("create_device_with_sas: keys differ", keys.primary_key != keys.secondary_key)
    check("create_device_with_sas: etag is set", bool(device.etag), device.etag)
    expect_http_error(
        "create_device_with_sas again",
        lambda: rm.create_device_with_sas(device_id, None, None, "enabled"),
        409,
        "DeviceAlreadyExists",
    )
    return device


def check_reads(rm, device_id, created):
    device = rm.get_device(device_id)
    check_equal("get_device: deviceId", device.device_id, device_id)
    check_equal("get_device: same primary key", device.authentication.symmetric_key.primary_key,
                created.authentication.symmetric_key.primary_key)
    check_equal("get_device: same etag", device.etag, created.etag)
    ids = [d.device_id for d in rm.get_devices()]
    check("get_devices: contains the device", device_id in ids, ids)
    result = rm.query_iot_hub(QuerySpecification(query=f"SELECT * FROM devices WHERE deviceId = '{device_id}'"))
    found = [t.device_id for t in result.items]
    check_equal("query_iot_hub by deviceId: exactly the device", found, [device_id])
    check("query_iot_hub: x-ms-item-type is twin (any case) or absent",
          result.type is None or result.type.lower() == "twin", result.type)


def desired_version(twin):
    return twin.properties.desired.get("$version")


def check_twin_update(rm, device_id, tag_value):
    """get_twin, then update_twin with tags + desired and the twin etag; returns (updated, old etag)."""
    twin = rm.get_twin(device_id)
    check_equal("get_twin: deviceId", twin.device_id, device_id)
    check("get_twin: etag is set", bool(twin.etag), twin.etag)
    before = desired_version(twin)
    check("get_twin: desired $version is an integer", isinstance(before, int), twin.properties.desired)
    patch = Twin(tags={"site": tag_value}, properties=TwinProperties(desired={"interval": 30, "mode": "eco"}))
    updated = rm.update_twin(device_id, patch, twin.etag)
    check_equal("update_twin: tag set", updated.tags.get("site"), tag_value)
    check_equal("update_twin: desired.interval", updated.properties.desired.get("interval"), 30)
    check_equal("update_twin: desired.mode", updated.properties.desired.get("mode"), "eco")
    after = desired_version(updated)
    check("update_twin: desired $version grew", isinstance(after, int) and after > before, f"{before} -> {after}")
    check("update_twin: twin etag changed", bool(updated.etag) and updated.etag != twin.etag, updated.etag)
    return updated, twin.etag


def check_twin_conflicts_and_replace(rm, device_id, tag_value, updated, stale_etag):
    result = rm.query_iot_hub(QuerySpecification(query=f"SELECT * FROM devices WHERE tags.site = '{tag_value}'"))
    check_equal("query_iot_hub by tag: exactly the device", [t.device_id for t in result.items], [device_id])
    expect_http_error(
        "update_twin with a stale etag",
        lambda: rm.update_twin(device_id, Twin(tags={"site": "stale"}), stale_etag),
        412,
        "PreconditionFailed",
    )
    replacement = Twin(tags={"owner": "replaced"}, properties=TwinProperties(desired={"mode": "performance"}))
    replaced = rm.replace_twin(device_id, replacement, updated.etag)
    check_equal("replace_twin: tags replaced wholesale", replaced.tags, {"owner": "replaced"})
    desired = {k: v for k, v in replaced.properties.desired.items() if not k.startswith("$")}
    check_equal("replace_twin: desired replaced wholesale", desired, {"mode": "performance"})
    before, after = desired_version(updated), desired_version(replaced)
    check("replace_twin: desired $version grew", isinstance(after, int) and after > before, f"{before} -> {after}")


def check_disable(rm, device_id):
    current = rm.get_device(device_id)
    keys = current.authentication.symmetric_key
    disabled = rm.update_device_with_sas(device_id, current.etag, keys.primary_key, keys.secondary_key, "disabled")
    check_equal("update_device_with_sas(etag): status", disabled.status, "disabled")
    check_equal("update_device_with_sas(etag): keys kept", disabled.authentication.symmetric_key.primary_key,
                keys.primary_key)
    check("update_device_with_sas(etag): etag changed", bool(disabled.etag) and disabled.etag != current.etag,
          disabled.etag)
    check_equal("get_device after disable: status", rm.get_device(device_id).status, "disabled")
    expect_http_error(
        "update_device_with_sas with a stale etag",
        lambda: rm.update_device_with_sas(device_id, current.etag, keys.primary_key, keys.secondary_key, "enabled"),
        412,
        "PreconditionFailed",
    )


def check_statistics(rm):
    stats = rm.get_device_registry_statistics()
    total, enabled, disabled = stats.total_device_count, stats.enabled_device_count, stats.disabled_device_count
    check("get_device_registry_statistics: counts present", None not in (total, enabled, disabled), stats)
    check("get_device_registry_statistics: at least our disabled device", total >= 1 and disabled >= 1,
          f"total={total} disabled={disabled}")
    check_equal("get_device_registry_statistics: total = enabled + disabled", total, enabled + disabled)


def check_delete(rm, device_id):
    check_equal("delete_device: returns None (204)", rm.delete_device(device_id), None)
    expect_http_error("get_device after delete", lambda: rm.get_device(device_id), 404, "DeviceNotFound")


def run():
    connection_string = env("IOTHUB_CONNECTION_STRING")
    env("REQUESTS_CA_BUNDLE")
    device_id = env("TEST_DEVICE_PREFIX") + "py-registry"
    tag_value = "site-" + device_id
    rm = registry_manager(connection_string)
    created = check_create(rm, device_id)
    check_reads(rm, device_id, created)
    updated, stale_etag = check_twin_update(rm, device_id, tag_value)
    check_twin_conflicts_and_replace(rm, device_id, tag_value, updated, stale_etag)
    check_disable(rm, device_id)
    check_statistics(rm)
    check_delete(rm, device_id)


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
