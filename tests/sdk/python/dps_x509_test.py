"""Device Provisioning Service with X.509 attestation and the unmodified Python `azure-iot-device` 2.14.0 SDK.

The Rust harness issues certificates into X509_DIR (see device_x509_test.py): `ca.pem` (a test CA), `ca-signed.pem`
(CN x509-ca, signed by it), `self.pem` (self-signed, CN x509-self) and `rogue.pem` (CN x509-ca, from a CA nobody
trusts). Through the emulator's DPS service API the script creates an enrollment group whose signing certificate is
`ca.pem` and an individual enrollment holding `self.pem`. `ProvisioningDeviceClient.create_from_x509_certificate`
then registers each device (MQTT, TLS client certificate), and `IoTHubDeviceClient.create_from_x509_certificate`
connects to the assigned hub and sends telemetry: the group device as a certificateAuthority device, the individual
one as a selfSigned device. The rogue certificate is refused. Prints one line per check; exits 1 on the first failure.
"""

import os
import sys
import urllib.parse

import requests
from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient, X509

from common import REQUEST_TIMEOUT_S, check, check_equal, env, registry_manager, run_main
from dps_symmetric_key_test import service_token

SCRIPT = "dps_x509_test"
WATCHDOG_S = 120


def path(name):
    return os.path.join(env("X509_DIR"), name)


def x509(name):
    return X509(cert_file=path(f"{name}.pem"), key_file=path(f"{name}-key.pem"))


def put(host, token, kind, enrollment_id, body):
    r = requests.put(
        f"https://{host}/{kind}/{enrollment_id}?api-version=2021-10-01",
        json=body,
        headers={"Authorization": token},
        timeout=REQUEST_TIMEOUT_S,
    )
    check_equal(f"PUT /{kind}/{enrollment_id}: HTTP status", r.status_code, 200)


def provision_and_send(host, scope, registration_id, cert, rm, auth_type):
    pdc = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=host, registration_id=registration_id, id_scope=scope, x509=x509(cert)
    )
    result = pdc.register()
    check_equal(f"{registration_id}: register status", result.status, "assigned")
    state = result.registration_state
    check_equal(f"{registration_id}: device id", state.device_id, registration_id)
    check_equal(f"{registration_id}: hub identity type", rm.get_device(registration_id).authentication.type, auth_type)
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509(cert), hostname=state.assigned_hub, device_id=state.device_id, connection_retry=False
    )
    client.connect()
    try:
        client.send_message(Message(f'{{"from": "{registration_id}"}}'))
        url = f"{env('IOTHUB_HTTP_URL')}/emulator/telemetry?deviceId={urllib.parse.quote(registration_id)}"
        seen = requests.get(url, timeout=REQUEST_TIMEOUT_S).json()
        check_equal(f"{registration_id}: telemetry reached the hub", len(seen), 1)
    finally:
        client.shutdown()


def run():
    host = env("IOTHUB_HOSTNAME")
    scope = env("DPS_ID_SCOPE")
    token = service_token(env("DPS_CONNECTION_STRING"))
    rm = registry_manager(env("IOTHUB_CONNECTION_STRING"))
    prefix = env("TEST_DEVICE_PREFIX")
    with open(path("ca.pem")) as f:
        ca_pem = f.read()
    with open(path("self.pem")) as f:
        self_pem = f.read()
    put(host, token, "enrollmentGroups", f"{prefix}-cas", {
        "enrollmentGroupId": f"{prefix}-cas",
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": ca_pem}}}},
    })
    put(host, token, "enrollments", "x509-self", {
        "registrationId": "x509-self",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": self_pem}}}},
    })
    provision_and_send(host, scope, "x509-ca", "ca-signed", rm, "certificateAuthority")
    provision_and_send(host, scope, "x509-self", "self", rm, "selfSigned")
    try:
        ProvisioningDeviceClient.create_from_x509_certificate(
            provisioning_host=host, registration_id="x509-ca", id_scope=scope, x509=x509("rogue")
        ).register()
    except Exception as err:
        check(f"a certificate from an untrusted CA is refused ({type(err).__name__})", True)
    else:
        check("a certificate from an untrusted CA is refused", False, "register() succeeded")


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
