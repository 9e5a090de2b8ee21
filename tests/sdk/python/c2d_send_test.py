"""C2D send over AMQP with the unmodified Python `azure-iot-hub` 2.7.0 SDK (uamqp: SASL MSSBCBS, CBS put-token
with a ulong message-id, target `amqps://{host}/messages/devicebound`, rcv-settle-mode second).

`IoTHubRegistryManager.send_c2d_message` sends two messages with system and application properties; a send
to a device that does not exist is refused (IoT Hub answers amqp:not-found, which uamqp reports as a send
failure) and the same manager keeps sending. The device side reads the queue over device HTTP (raw requests
signed with the device key: the Python device SDK has no HTTP receive) and checks every property survived.
Run by the Rust harness as `python3 tests/sdk/python/c2d_send_test.py`; SSL_CERT_FILE makes uamqp trust the
hub's CA and REQUESTS_CA_BUNDLE makes requests trust it. Prints one line per check; exits 1 on the first failure.
"""

import base64
import hashlib
import hmac
import sys
import time
import urllib.parse
import uuid

import requests
from azure.iot.hub import IoTHubRegistryManager

from common import CheckFailed, check, check_equal, env, run_main

SCRIPT = "c2d_send_test"
WATCHDOG_S = 90
REQUEST_TIMEOUT_S = 15
DEVICE_API_VERSION = "2020-09-30"


def device_sas(host, device_id, key, ttl_s=3600):
    """A device SAS signed exactly as the device SDKs sign theirs (reference section 1.2)."""
    sr = urllib.parse.quote(f"{host}/devices/{device_id}", safe="")
    se = int(time.time()) + ttl_s
    digest = hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    sig = urllib.parse.quote(base64.b64encode(digest).decode(), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}"


def receive(host, device_id, key):
    """One device-HTTP receive: (headers, body) of the next message, or None when the queue is empty."""
    url = f"https://{host}/devices/{urllib.parse.quote(device_id, safe='')}/messages/devicebound"
    auth = {"Authorization": device_sas(host, device_id, key)}
    r = requests.get(url, params={"api-version": DEVICE_API_VERSION}, headers=auth, timeout=REQUEST_TIMEOUT_S)
    if r.status_code == 204:
        return None
    check_equal("device HTTP receive: status", r.status_code, 200)
    lock = r.headers["ETag"].strip('"')
    done = requests.delete(f"{url}/{lock}", params={"api-version": DEVICE_API_VERSION},
                           headers={**auth, "If-Match": lock}, timeout=REQUEST_TIMEOUT_S)
    check_equal("device HTTP complete: status", done.status_code, 204)
    return r.headers, r.content


def run():
    connection_string = env("IOTHUB_CONNECTION_STRING")
    host = env("IOTHUB_HOSTNAME")
    env("SSL_CERT_FILE")
    env("REQUESTS_CA_BUNDLE")
    device_id = env("TEST_DEVICE_PREFIX") + "py-c2d"
    rm = IoTHubRegistryManager.from_connection_string(connection_string)
    device = rm.create_device_with_sas(device_id, None, None, "enabled")
    key = device.authentication.symmetric_key.primary_key

    first_id = f"py-c2d-{uuid.uuid4()}"
    expiry_ms = int(time.time() * 1000) + 10 * 60 * 1000
    rm.send_c2d_message(device_id, "hello from python", {
        "messageId": first_id,
        "correlationId": "corr-py",
        "contentType": "application/json",
        "contentEncoding": "utf-8",
        "expiryTimeUtc": expiry_ms,
        "iothub-ack": "full",
        "color": "blue",
    })
    check("send_c2d_message over AMQP (SASL MSSBCBS, CBS put-token, settled accepted disposition)", True)

    missing = env("TEST_DEVICE_PREFIX") + "py-missing"
    try:
        rm.send_c2d_message(missing, "nobody home")
    except Exception as err:  # uamqp reports any rejected disposition as a send failure
        check("send_c2d_message to a missing device raises", "send failure" in str(err), err)
    else:
        raise CheckFailed("send_c2d_message to a missing device: expected an exception")

    rm.send_c2d_message(device_id, "second", {"messageId": "py-c2d-second"})
    check("send_c2d_message still works after a refused send", True)

    got = receive(host, device_id, key)
    check("the device receives the first message", got is not None)
    headers, body = got
    check_equal("first message: body", body, b"hello from python")
    check_equal("first message: iothub-messageid", headers.get("iothub-messageid"), first_id)
    check_equal("first message: iothub-correlationid", headers.get("iothub-correlationid"), "corr-py")
    check_equal("first message: iothub-ack", headers.get("iothub-ack"), "full")
    check_equal("first message: iothub-app-color", headers.get("iothub-app-color"), "blue")
    check("first message: iothub-expiry is set", bool(headers.get("iothub-expiry")), headers)
    got = receive(host, device_id, key)
    check("the device receives the second message", got is not None)
    check_equal("second message: body", got[1], b"second")
    check_equal("second message: iothub-messageid", got[0].get("iothub-messageid"), "py-c2d-second")
    check_equal("nothing else is queued (the refused send queued nothing)", receive(host, device_id, key), None)
    rm.delete_device(device_id)


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
