"""Device Provisioning Service with the unmodified Python `azure-iot-device` 2.14.0 SDK (reference-2 section 2).

An enrollment group with a symmetric key (and an initial twin) is created through the emulator's DPS service API
(`PUT /enrollmentGroups/{id}`, a `provisioningserviceowner` SAS token: no Python provisioning service SDK is
published). `ProvisioningDeviceClient.create_from_symmetric_key` then registers a device with the key derived from
the group key (MQTT on 8883, `$dps/registrations/...`), and `IoTHubDeviceClient.create_from_symmetric_key` connects
to the returned `assigned_hub` with the same key and sends telemetry. Also: the twin carries the enrollment's
initial tags and desired properties, the provisioning payload's `modelId` becomes the twin's `modelId`, a second
registration returns the same device, a wrong key is refused, and a disabled group refuses registration. Prints
one line per check; exits 1 on the first failure.
"""

import base64
import hashlib
import hmac
import sys
import time
import urllib.parse

import requests
from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient

from common import REQUEST_TIMEOUT_S, check, check_equal, env, registry_manager, run_main

SCRIPT = "dps_symmetric_key_test"
WATCHDOG_S = 120
MODEL_ID = "dtmi:com:example:Thermostat;1"


def derive(group_key, registration_id):
    """The documented derivation: base64(HMAC-SHA256(base64decode(groupKey), registrationId))."""
    mac = hmac.new(base64.b64decode(group_key), registration_id.encode("utf-8"), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def service_token(cs):
    parts = dict(p.split("=", 1) for p in cs.split(";"))
    expiry = int(time.time()) + 3600
    sr = urllib.parse.quote(parts["HostName"], safe="")
    sig = base64.b64encode(
        hmac.new(base64.b64decode(parts["SharedAccessKey"]), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    ).decode()
    return (
        f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}"
        f"&skn={parts['SharedAccessKeyName']}"
    )


def put_group(host, token, group_id, key, status):
    body = {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}},
        "provisioningStatus": status,
        "initialTwin": {"tags": {"site": "lab-7"}, "properties": {"desired": {"telemetryInterval": 5}}},
    }
    r = requests.put(
        f"https://{host}/enrollmentGroups/{group_id}?api-version=2021-10-01",
        json=body,
        headers={"Authorization": token},
        timeout=REQUEST_TIMEOUT_S,
    )
    check_equal(f"PUT /enrollmentGroups/{group_id} ({status}): HTTP status", r.status_code, 200)
    return r.json()


def provisioning_client(host, registration_id, scope, key):
    return ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=host, registration_id=registration_id, id_scope=scope, symmetric_key=key
    )


def run():
    host = env("IOTHUB_HOSTNAME")
    scope = env("DPS_ID_SCOPE")
    token = service_token(env("DPS_CONNECTION_STRING"))
    rm = registry_manager(env("IOTHUB_CONNECTION_STRING"))
    prefix = env("TEST_DEVICE_PREFIX")
    group_key = base64.b64encode(hashlib.sha256(prefix.encode()).digest()).decode()
    group_id = f"{prefix}-group"
    stored = put_group(host, token, group_id, group_key, "enabled")
    check_equal("the group's stored key", stored["attestation"]["symmetricKey"]["primaryKey"], group_key)

    registration_id = f"{prefix}-dev-1"
    device_key = derive(group_key, registration_id)
    pdc = provisioning_client(host, registration_id, scope, device_key)
    pdc.provisioning_payload = {"modelId": MODEL_ID}
    result = pdc.register()
    check_equal("register: status", result.status, "assigned")
    state = result.registration_state
    check_equal("register: assigned_hub is the emulator's host", state.assigned_hub, host)
    check_equal("register: device_id is the registration id", state.device_id, registration_id)
    check_equal("register: substatus", state.sub_status, "initialAssignment")

    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=device_key, hostname=state.assigned_hub, device_id=state.device_id, connection_retry=False
    )
    client.connect()
    try:
        check("the provisioned device connected to the assigned hub", client.connected)
        client.send_message(Message('{"temperature": 21.5}'))
        url = f"{env('IOTHUB_HTTP_URL')}/emulator/telemetry?deviceId={urllib.parse.quote(state.device_id)}"
        seen = requests.get(url, timeout=REQUEST_TIMEOUT_S).json()
        check_equal("its telemetry reached the hub", [m["body"] for m in seen], ['{"temperature": 21.5}'])
        twin = client.get_twin()
        check_equal("device twin: desired from the enrollment's initialTwin", twin["desired"].get("telemetryInterval"), 5)
    finally:
        client.shutdown()

    twin = rm.get_twin(state.device_id)
    check_equal("service twin: tags from the enrollment's initialTwin", twin.tags, {"site": "lab-7"})
    raw = rm.protocol.devices.get_twin(state.device_id, raw=True).response.json()
    check_equal("service twin: modelId from the provisioning payload", raw.get("modelId"), MODEL_ID)

    again = provisioning_client(host, registration_id, scope, device_key).register()
    check_equal("re-provisioning: same device", again.registration_state.device_id, registration_id)
    check_equal("re-provisioning: the device kept its key",
                rm.get_device(registration_id).authentication.symmetric_key.primary_key, device_key)

    ws_id = f"{prefix}-ws-1"
    ws = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=host, registration_id=ws_id, id_scope=scope, symmetric_key=derive(group_key, ws_id),
        websockets=True,
    ).register()
    check_equal("register over MQTT on WebSocket (443): device id", ws.registration_state.device_id, ws_id)

    try:
        provisioning_client(host, f"{prefix}-dev-2", scope, group_key).register()
    except Exception as err:  # the SDK raises its own error type for the refused CONNECT
        check(f"a key not derived for the registration is refused ({type(err).__name__})", True)
    else:
        check("a key not derived for the registration is refused", False, "register() succeeded")

    put_group(host, token, group_id, group_key, "disabled")
    other = f"{prefix}-dev-3"
    try:
        provisioning_client(host, other, scope, derive(group_key, other)).register()
    except Exception as err:
        check(f"a disabled enrollment group refuses registration ({type(err).__name__})", True)
    else:
        check("a disabled enrollment group refuses registration", False, "register() succeeded")


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
