"""The MQTT device endpoint with the unmodified Python `azure-iot-device` 2.14.0 SDK (and `azure-iot-hub`
for the service side).

The device connects over MQTT/TLS on 8883 (clean_session=0, as the SDK always does), subscribes to C2D,
direct methods and desired-property patches by setting handlers, sends telemetry, patches reported
properties and reads its twin. It then disconnects; a C2D message is sent while it is offline (through the
emulator's REST extension `POST /devices/{id}/messages/deviceBound`, since the service SDK sends C2D over
AMQP only); after `connect()` the SDK sends no SUBSCRIBE, so the message must arrive through the hub's
persisted session, with its payload and properties. Then the service patches desired properties and
invokes a direct method, which the device answers. Last, a second client uses MQTT over WebSocket on 443. Run by the Rust harness as
`python3 tests/sdk/python/device_mqtt_test.py`. Prints one line per check; exits 1 on the first failure.
"""

import base64
import hashlib
import hmac
import queue
import sys
import time
import urllib.parse
import uuid

import requests
from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

from common import REQUEST_TIMEOUT_S, CheckFailed, check, check_equal, env, registry_manager, run_main

SCRIPT = "device_mqtt_test"
WATCHDOG_S = 120
RECEIVE_S = 20

def parse_connection_string(cs):
    return dict(part.split("=", 1) for part in cs.split(";") if part)


def service_sas(host, key_name, key, ttl_s=3600):
    """A hub-scoped service SAS, signed as azure-iot-hub signs its REST calls."""
    expiry = int(time.time()) + ttl_s
    resource = urllib.parse.quote_plus(host)
    digest = hmac.new(base64.b64decode(key), f"{resource}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = urllib.parse.quote(base64.b64encode(digest), safe="")
    return f"SharedAccessSignature sr={resource}&sig={signature}&se={expiry}&skn={key_name}"


def send_c2d(hub, device_id, message_id, body, properties):
    """The emulator's REST C2D extension (what AMQP `send_c2d_message` does, without AMQP)."""
    headers = {
        "Authorization": service_sas(hub["HostName"], hub["SharedAccessKeyName"], hub["SharedAccessKey"]),
        "Content-Type": "application/octet-stream",
        "iothub-messageid": message_id,
        "iothub-ack": "positive",
    }
    headers.update({f"iothub-app-{k}": v for k, v in properties.items()})
    url = f"https://{hub['HostName']}/devices/{urllib.parse.quote(device_id)}/messages/deviceBound?api-version=2021-04-12"
    response = requests.post(url, data=body.encode(), headers=headers, timeout=REQUEST_TIMEOUT_S)
    check_equal(f"C2D send {message_id} while the device is offline: HTTP status", response.status_code, 204)


def take(q, what):
    try:
        return q.get(timeout=RECEIVE_S)
    except queue.Empty:
        raise CheckFailed(f"{what}: nothing arrived within {RECEIVE_S} s") from None


def open_device(hub, device_id, key):
    cs = f"HostName={hub['HostName']};DeviceId={device_id};SharedAccessKey={key}"
    client = IoTHubDeviceClient.create_from_connection_string(cs, connection_retry=False)
    inbox = {"c2d": queue.Queue(), "desired": queue.Queue(), "methods": queue.Queue()}

    def on_method(request):
        inbox["methods"].put(request)
        payload = {"rebooted": True, "delay": (request.payload or {}).get("delay")}
        client.send_method_response(MethodResponse.create_from_method_request(request, 201, payload))

    client.connect()
    check("device connected over MQTT/TLS on 8883", client.connected)
    client.on_message_received = inbox["c2d"].put
    client.on_twin_desired_properties_patch_received = inbox["desired"].put
    client.on_method_request_received = on_method
    return client, inbox


def check_telemetry(client, device_id):
    msg = Message('{"temperature": 21.5}', message_id="telemetry-1", content_type="application/json")
    msg.custom_properties["room"] = "kitchen"
    client.send_message(msg)
    url = f"{env('IOTHUB_HTTP_URL')}/emulator/telemetry?deviceId={urllib.parse.quote(device_id)}"
    seen = requests.get(url, timeout=REQUEST_TIMEOUT_S).json()
    check_equal("telemetry recorded once", len(seen), 1)
    check_equal("telemetry body", seen[0]["body"], '{"temperature": 21.5}')
    check_equal("telemetry app property", seen[0]["properties"].get("room"), "kitchen")
    check_equal("telemetry message id", seen[0]["systemProperties"].get("message-id"), "telemetry-1")


def check_twin(client):
    client.patch_twin_reported_properties({"firmware": "1.2.3", "battery": 97})
    check("patch_twin_reported_properties answered (204)", True)
    twin = client.get_twin()
    check_equal("get_twin: reported firmware", twin["reported"].get("firmware"), "1.2.3")
    check("get_twin: reported $version moved past 1", twin["reported"].get("$version", 0) >= 2, twin)
    check("get_twin: desired has $version", isinstance(twin["desired"].get("$version"), int), twin)


def check_offline_c2d(hub, client, inbox, device_id):
    client.disconnect()
    check("device disconnected", not client.connected)
    tag = uuid.uuid4().hex[:8]
    send_c2d(hub, device_id, f"offline-{tag}", f"sent while offline {tag}", {"color": "blue", "seq": "1"})
    client.connect()
    check("device reconnected (clean_session=0, no new SUBSCRIBE)", client.connected)
    msg = take(inbox["c2d"], "C2D sent while offline")
    check_equal("offline C2D: payload", msg.data.decode(), f"sent while offline {tag}")
    check_equal("offline C2D: message id", msg.message_id, f"offline-{tag}")
    check_equal("offline C2D: app property color", msg.custom_properties.get("color"), "blue")
    check_equal("offline C2D: app property seq", msg.custom_properties.get("seq"), "1")
    check_equal("offline C2D: ack property", msg.ack, "positive")


def check_desired_and_method(rm, inbox, device_id):
    twin = rm.get_twin(device_id)
    rm.update_twin(device_id, Twin(properties=TwinProperties(desired={"interval": 5})), twin.etag)
    # The SDK may also hand over a synthetic patch of the whole desired section after a reconnect
    # (its "ensure desired properties" GET); wait for the one carrying this update.
    patch = take(inbox["desired"], "desired-properties patch")
    while patch.get("interval") != 5:
        patch = take(inbox["desired"], "desired-properties patch with interval=5")
    check_equal("desired patch: interval", patch.get("interval"), 5)
    check("desired patch: carries $version", isinstance(patch.get("$version"), int), patch)

    request = CloudToDeviceMethod(method_name="reboot", payload={"delay": 3}, response_timeout_in_seconds=15)
    result = rm.invoke_device_method(device_id, request)
    seen = take(inbox["methods"], "direct method request")
    check_equal("direct method: name on the device", seen.name, "reboot")
    check_equal("direct method: payload on the device", seen.payload, {"delay": 3})
    check_equal("direct method: status from the device", result.status, 201)
    check_equal("direct method: payload from the device", result.payload, {"rebooted": True, "delay": 3})


def check_websocket(hub, device_id, key):
    """MQTT over WebSocket on 443 (`/$iothub/websocket`, subprotocol `mqtt`): the SDK's `websockets=True`."""
    cs = f"HostName={hub['HostName']};DeviceId={device_id};SharedAccessKey={key}"
    client = IoTHubDeviceClient.create_from_connection_string(cs, websockets=True, connection_retry=False)
    try:
        client.connect()
        check("device connected over MQTT/WebSocket on 443", client.connected)
        twin = client.get_twin()
        check_equal("get_twin over WebSocket: reported firmware", twin["reported"].get("firmware"), "1.2.3")
        client.send_message(Message("over websocket"))
        check("telemetry over WebSocket PUBACKed", True)
    finally:
        client.shutdown()


def run():
    connection_string = env("IOTHUB_CONNECTION_STRING")
    hub = parse_connection_string(connection_string)
    device_id = env("TEST_DEVICE_PREFIX") + "-py-mqtt"
    rm = registry_manager(connection_string)
    device = rm.create_device_with_sas(device_id, None, None, "enabled")
    key = device.authentication.symmetric_key.primary_key
    check_equal("device created", device.device_id, device_id)

    client, inbox = open_device(hub, device_id, key)
    try:
        check_equal("registry: connectionState while connected", rm.get_device(device_id).connection_state, "Connected")
        check_telemetry(client, device_id)
        check_twin(client)
        check_offline_c2d(hub, client, inbox, device_id)
        check_desired_and_method(rm, inbox, device_id)
        check_equal("registry: no C2D left pending", rm.get_device(device_id).cloud_to_device_message_count, 0)
    finally:
        client.shutdown()
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while rm.get_device(device_id).connection_state != "Disconnected" and time.monotonic() < deadline:
        time.sleep(0.05)
    check_equal("registry: connectionState after shutdown", rm.get_device(device_id).connection_state, "Disconnected")
    check_websocket(hub, device_id, key)
    rm.delete_device(device_id)


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
