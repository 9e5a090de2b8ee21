"""Durable hub state (`--persist`, issue 15) with the unmodified Python SDKs, in two runs around a kill -9.

`send` (before the kill): the service (`azure-iot-hub` 2.7.0) registers a device, patches its twin's
desired properties and sends it a C2D message over AMQP with `IoTHubRegistryManager.send_c2d_message`
while the device is offline; the AMQP disposition (accepted) is the hub saying the message is kept. The
device id and its primary key go to stdout as `DEVICE_ID=`/`DEVICE_KEY=` for the harness.

The harness then kills the hub with SIGKILL and starts it again on the same data directory with
`--persist`.

`receive` (after the restart): the device (`azure-iot-device` 2.14.0) connects over MQTT/TLS with its
old key (`DEVICE_ID`, `DEVICE_KEY` from the first run) and receives the message with its payload and
properties; its twin still holds the desired property; the service still lists the device with the same
generation id. Run by the Rust harness as `python3 tests/sdk/python/persist_restart_test.py send|receive`.
Prints one line per check; exits 1 on the first failure.
"""

import queue
import sys
import uuid

from azure.iot.device import IoTHubDeviceClient
from azure.iot.hub.models import Twin, TwinProperties

from common import CheckFailed, check, check_equal, env, registry_manager, run_main

SCRIPT = "persist_restart_test"
WATCHDOG_S = 90
RECEIVE_S = 20
BODY = "defrost before the restart"


def send():
    connection_string = env("IOTHUB_CONNECTION_STRING")
    env("SSL_CERT_FILE")
    device_id = env("TEST_DEVICE_PREFIX") + "py-persist"
    rm = registry_manager(connection_string)
    device = rm.create_device_with_sas(device_id, None, None, "enabled")
    key = device.authentication.symmetric_key.primary_key
    check("device registered", bool(key))
    twin = rm.update_twin(device_id, Twin(properties=TwinProperties(desired={"mode": "eco"})), "*")
    check_equal("desired property patched", twin.properties.desired.get("mode"), "eco")
    message_id = f"py-persist-{uuid.uuid4()}"
    rm.send_c2d_message(device_id, BODY, {"messageId": message_id, "color": "blue"})
    check("send_c2d_message to the offline device accepted over AMQP", True)
    print(f"DEVICE_ID={device_id}", flush=True)
    print(f"DEVICE_KEY={key}", flush=True)
    print(f"MESSAGE_ID={message_id}", flush=True)
    print(f"GENERATION_ID={device.generation_id}", flush=True)


def receive():
    connection_string = env("IOTHUB_CONNECTION_STRING")
    host = env("IOTHUB_HOSTNAME")
    env("SSL_CERT_FILE")
    device_id = env("DEVICE_ID")
    key = env("DEVICE_KEY")
    rm = registry_manager(connection_string)
    device = rm.get_device(device_id)
    check_equal("the device survived the kill: same generation id", device.generation_id, env("GENERATION_ID"))
    check_equal("one C2D message is still queued", device.cloud_to_device_message_count, 1)
    inbox = queue.Queue()
    cs = f"HostName={host};DeviceId={device_id};SharedAccessKey={key}"
    client = IoTHubDeviceClient.create_from_connection_string(cs, connection_retry=False)
    client.on_message_received = inbox.put
    try:
        client.connect()
        check("device connected over MQTT/TLS with its old key", client.connected)
        try:
            message = inbox.get(timeout=RECEIVE_S)
        except queue.Empty:
            raise CheckFailed(f"the C2D message sent before the kill did not arrive within {RECEIVE_S} s") from None
        check_equal("C2D payload", message.data.decode(), BODY)
        check_equal("C2D message id", message.message_id, env("MESSAGE_ID"))
        check_equal("C2D application property", message.custom_properties.get("color"), "blue")
        twin = client.get_twin()
        check_equal("the desired property survived", twin["desired"].get("mode"), "eco")
    finally:
        client.shutdown()


if __name__ == "__main__":
    phases = {"send": send, "receive": receive}
    if len(sys.argv) != 2 or sys.argv[1] not in phases:
        print("usage: persist_restart_test.py send|receive", flush=True)
        sys.exit(2)
    sys.exit(run_main(f"{SCRIPT} {sys.argv[1]}", WATCHDOG_S, phases[sys.argv[1]]))
