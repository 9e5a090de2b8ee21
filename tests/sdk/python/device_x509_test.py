"""X.509 device authentication with the unmodified Python `azure-iot-device` 2.14.0 SDK (and `azure-iot-hub`
for the registry).

The Rust harness issues the certificates (`iothub_emulator::x509::issue`, what `iothub-emulator cert` uses) into
X509_DIR: a self-signed device certificate (`self.pem`), a test CA (`ca.pem`) and a device certificate it signed
for `x509-ca` (`ca-signed.pem`), and two that must be refused: another self-signed one (`wrong.pem`) and one
with CN `x509-ca` signed by a CA the hub does not trust (`rogue.pem`). The script registers a `selfSigned`
device by the SHA-1 thumbprint it computes itself, another by the SHA-256 one, and a `certificateAuthority`
device, all through `IoTHubRegistryManager`; it trusts the CA through the emulator's `POST /emulator/x509-cas`.
Each device connects with `IoTHubDeviceClient.create_from_x509_certificate` (MQTT/TLS on 8883, the CA device
also over WebSocket on 443), sends telemetry and receives a C2D message; the wrong certificates get
`CredentialError` (CONNACK 5). Prints one line per check; exits 1 on the first failure.
"""

import hashlib
import os
import queue
import ssl
import sys
import urllib.parse
import uuid

import requests
from azure.iot.device import IoTHubDeviceClient, Message, X509
from azure.iot.device.exceptions import CredentialError

from common import REQUEST_TIMEOUT_S, CheckFailed, check, check_equal, env, registry_manager, run_main
from device_mqtt_test import parse_connection_string, service_sas, take

SCRIPT = "device_x509_test"
WATCHDOG_S = 150


def cert_path(name):
    return os.path.join(env("X509_DIR"), name)


def thumbprint(name, algorithm):
    with open(cert_path(f"{name}.pem")) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return hashlib.new(algorithm, der).hexdigest().upper()


def x509(name):
    return X509(cert_file=cert_path(f"{name}.pem"), key_file=cert_path(f"{name}-key.pem"))


def connect(device_id, cert, websockets=False):
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509(cert),
        hostname=env("IOTHUB_HOSTNAME"),
        device_id=device_id,
        websockets=websockets,
        connection_retry=False,
    )
    inbox = queue.Queue()
    client.connect()
    client.on_message_received = inbox.put
    return client, inbox


def send_c2d(hub, device_id, message_id, body):
    """The emulator's REST C2D extension (what the service SDK's AMQP `send_c2d_message` does)."""
    headers = {
        "Authorization": service_sas(hub["HostName"], hub["SharedAccessKeyName"], hub["SharedAccessKey"]),
        "iothub-messageid": message_id,
        "iothub-app-kind": "x509",
    }
    url = f"https://{hub['HostName']}/devices/{urllib.parse.quote(device_id)}/messages/deviceBound?api-version=2021-04-12"
    response = requests.post(url, data=body.encode(), headers=headers, timeout=REQUEST_TIMEOUT_S)
    check_equal(f"C2D {message_id} to {device_id}: HTTP status", response.status_code, 204)


def telemetry_and_c2d(hub, device_id, cert, websockets=False):
    how = f"{device_id} with {cert}.pem" + (" over WebSocket" if websockets else "")
    client, inbox = connect(device_id, cert, websockets)
    try:
        check(f"{how}: connected", client.connected)
        tag = uuid.uuid4().hex[:8]
        client.send_message(Message(f"reading {tag}", message_id=f"d2c-{tag}"))
        url = f"{env('IOTHUB_HTTP_URL')}/emulator/telemetry?deviceId={urllib.parse.quote(device_id)}"
        seen = [m for m in requests.get(url, timeout=REQUEST_TIMEOUT_S).json() if m["body"] == f"reading {tag}"]
        check_equal(f"{how}: telemetry recorded", len(seen), 1)
        send_c2d(hub, device_id, f"c2d-{tag}", f"command {tag}")
        msg = take(inbox, f"{how}: C2D")
        check_equal(f"{how}: C2D payload", msg.data.decode(), f"command {tag}")
        check_equal(f"{how}: C2D app property", msg.custom_properties.get("kind"), "x509")
    finally:
        client.shutdown()


def refused(device_id, cert, why):
    try:
        client, _ = connect(device_id, cert)
    except CredentialError:
        check(f"{device_id} with {cert}.pem refused ({why}): CredentialError", True)
        return
    client.shutdown()
    raise CheckFailed(f"{device_id} with {cert}.pem ({why}) connected")


def run():
    hub_cs = env("IOTHUB_CONNECTION_STRING")
    hub = parse_connection_string(hub_cs)
    rm = registry_manager(hub_cs)

    sha1 = thumbprint("self", "sha1")
    created = rm.create_device_with_x509("x509-self", sha1, None, "enabled")
    check_equal("create_device_with_x509: authentication type", created.authentication.type, "selfSigned")
    check_equal(
        "create_device_with_x509: primary thumbprint as sent",
        created.authentication.x509_thumbprint.primary_thumbprint,
        sha1,
    )
    got = rm.get_device("x509-self")
    check_equal("get_device: thumbprint round-trips", got.authentication.x509_thumbprint.primary_thumbprint, sha1)
    check_equal("get_device: no symmetric key", got.authentication.symmetric_key.primary_key, None)
    sha256 = thumbprint("self", "sha256").lower()
    rm.create_device_with_x509("x509-sha256", sha256, None, "enabled")
    ca_device = rm.create_device_with_certificate_authority("x509-ca", "enabled")
    check_equal(
        "create_device_with_certificate_authority: type", ca_device.authentication.type, "certificateAuthority"
    )

    telemetry_and_c2d(hub, "x509-self", "self")
    telemetry_and_c2d(hub, "x509-sha256", "self")
    refused("x509-self", "wrong", "thumbprint not registered")

    refused("x509-ca", "ca-signed", "the CA is not trusted yet")
    with open(cert_path("ca.pem"), "rb") as f:
        response = requests.post(f"{env('IOTHUB_HTTP_URL')}/emulator/x509-cas", data=f.read(), timeout=REQUEST_TIMEOUT_S)
    check_equal("POST /emulator/x509-cas: HTTP status", response.status_code, 201)
    telemetry_and_c2d(hub, "x509-ca", "ca-signed")
    telemetry_and_c2d(hub, "x509-ca", "ca-signed", websockets=True)
    refused("x509-ca", "rogue", "signed by an untrusted CA")
    refused("x509-self", "ca-signed", "CA-signed certificate for a selfSigned device")


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
