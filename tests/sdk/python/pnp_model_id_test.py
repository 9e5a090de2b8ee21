"""IoT Plug and Play model id with the unmodified Python `azure-iot-device` 2.14.0 SDK (and `azure-iot-hub`).

A device connects over MQTT with `product_info` set to a DTMI: the SDK then switches to api-version 2020-09-30
and adds `model-id=dtmi%3A...` to its MQTT username (reference-2 section 5). The service's
`IoTHubRegistryManager.get_twin` must show it as the twin's `modelId`, and the query
`SELECT * FROM devices WHERE modelId = '...'` must find exactly that device; a device that announced none has
an empty `modelId`; its telemetry carries the model id as `dt-dataschema`. azure-iot-hub 2.7.0's `Twin` model has no `model_id` attribute (msrest drops the field), so
the script reads the twin JSON through the same SDK operations with msrest's public `raw=True`. Prints one line
per check; exits 1 on the first failure.
"""

import sys
import urllib.parse

import requests
from azure.iot.device import IoTHubDeviceClient, Message
from azure.iot.hub.models import QuerySpecification

from common import REQUEST_TIMEOUT_S, check, check_equal, env, registry_manager, run_main

SCRIPT = "pnp_model_id_test"
WATCHDOG_S = 90
MODEL_ID = "dtmi:com:example:Thermostat;1"


def twin_json(rm, device_id):
    """`IoTHubRegistryManager.get_twin`'s call (`protocol.devices.get_twin`), with the JSON it received."""
    raw = rm.protocol.devices.get_twin(device_id, raw=True)
    check_equal(f"get_twin {device_id}: HTTP status", raw.response.status_code, 200)
    return raw.response.json()


def run():
    hub_cs = env("IOTHUB_CONNECTION_STRING")
    host = dict(p.split("=", 1) for p in hub_cs.split(";"))["HostName"]
    rm = registry_manager(hub_cs)
    prefix = env("TEST_DEVICE_PREFIX")
    pnp_id, plain_id = f"{prefix}-thermostat", f"{prefix}-plain"
    for device_id in (pnp_id, plain_id):
        rm.create_device_with_sas(device_id, None, None, "enabled")

    key = rm.get_device(pnp_id).authentication.symmetric_key.primary_key
    cs = f"HostName={host};DeviceId={pnp_id};SharedAccessKey={key}"
    client = IoTHubDeviceClient.create_from_connection_string(cs, product_info=MODEL_ID, connection_retry=False)
    client.connect()
    try:
        check("device with product_info=<DTMI> connected", client.connected)
        check_equal("get_twin (SDK model) still parses", rm.get_twin(pnp_id).device_id, pnp_id)
        check_equal("get_twin: modelId is the announced DTMI", twin_json(rm, pnp_id).get("modelId"), MODEL_ID)
        client.send_message(Message('{"temperature": 20.5}'))
        url = f"{env('IOTHUB_HTTP_URL')}/emulator/telemetry?deviceId={urllib.parse.quote(pnp_id)}"
        seen = requests.get(url, timeout=REQUEST_TIMEOUT_S).json()
        check_equal("telemetry: dt-dataschema is the model id", [m["systemProperties"].get("dt-dataschema") for m in seen], [MODEL_ID])
    finally:
        client.shutdown()
    check_equal("get_twin after disconnect: modelId kept", twin_json(rm, pnp_id).get("modelId"), MODEL_ID)
    check_equal("get_twin of a device that announced none: modelId empty", twin_json(rm, plain_id).get("modelId"), "")

    spec = QuerySpecification(query=f"SELECT * FROM devices WHERE modelId = '{MODEL_ID}'")
    result = rm.query_iot_hub(spec)
    found = [t.device_id for t in result.items if t.device_id.startswith(prefix)]
    check_equal("query_iot_hub by modelId: exactly the PnP device", found, [pnp_id])
    raw = rm.protocol.query.get_twins(spec, raw=True).response.json()
    check_equal("query result carries modelId", [t.get("modelId") for t in raw if t["deviceId"] == pnp_id], [MODEL_ID])


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
