"""Tier throttling (reference section 5.1) against a hub started as IoT Hub S1 x 1 unit, with the unmodified
Python `azure-iot-hub` 2.7.0 SDK and its default retry configuration.

What the SDK does on throttling, read from its installed sources:
* REST goes through msrest + requests + urllib3. msrest's ClientRetryPolicy (msrest/universal_http/requests.py)
  does not list 429 in its status_forcelist, but urllib3's Retry retries a 429 that carries `Retry-After` for
  idempotent methods (GET, PUT, DELETE: Retry.DEFAULT_ALLOWED_METHODS, RETRY_AFTER_STATUS_CODES), sleeping
  `Retry-After` seconds, at most 3 times. POST (query) and PATCH (twin update) are not retried: the caller gets
  `HttpOperationError` with the 429 response.
* C2D goes through uamqp. A rejected delivery whose condition is not an AMQP one (here
  `com.microsoft:device-container-throttled`) is retried by uamqp's ErrorPolicy at once, 3 times
  (uamqp/errors.py on_unrecognized_error, uamqp/client.py _on_message_sent); then `send_c2d_message` raises
  a bare `Exception("C2D message send failure")`.

So: a burst of `get_device` calls all succeed (urllib3 waited out Retry-After; the hub's counters and
urllib3's own "Retry:" log show the 429s); a burst of `query_iot_hub` calls surfaces 429
`ThrottlingException` with Retry-After, and retrying after it succeeds; a burst of `send_c2d_message` from
several managers has some sends fail after uamqp's retries, and retrying them later succeeds.
Time travel between phases empties the buckets. Run by the Rust harness as
`python3 tests/sdk/python/throttle_test.py`.
"""

import concurrent.futures
import json
import logging
import sys
import threading
import time
import urllib.request

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import QuerySpecification
from msrest.exceptions import HttpOperationError

from common import REQUEST_TIMEOUT_S, check, check_equal, env, run_main

SCRIPT = "throttle_test"
WATCHDOG_S = 150
# S1 x 1 registry: 100/min; 1 s burst + 5 s backlog lets 11 through at once (one is the create); the
# 3 refused at once need at most 2 of urllib3's 3 retries, a Retry-After (1 s) apart.
REGISTRY_BURST = 13
# S1 x 1 queries: 20/min; 3 pass at once (one at once, two shaped), the rest are refused.
QUERY_BURST = 5
# S1 x 1 C2D sends: 100/min, 11 at once; each manager opens its own AMQP connection.
C2D_BURST = 20


class RetryLog(logging.Handler):
    """Counts urllib3's `Retry: <url>` debug lines: each is one retry after a retryable status."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.retries = 0

    def emit(self, record):
        if record.getMessage().startswith("Retry:"):
            self.retries += 1


def manager(connection_string):
    """An SDK manager with the SDK's default retry policy and a per-request timeout."""
    m = IoTHubRegistryManager.from_connection_string(connection_string)
    m.protocol.config.connection.timeout = REQUEST_TIMEOUT_S
    return m


def admin(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}{path}", data=data, method=method,
                                 headers={"content-type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
        return json.loads(resp.read())


def burst(n, call):
    """Runs `call(i)` on n threads at once (released together); returns [(result, exception)] in order."""
    start = threading.Barrier(n)

    def guarded(i):
        start.wait(timeout=REQUEST_TIMEOUT_S)
        try:
            return call(i), None
        except Exception as err:  # noqa: BLE001 - the test inspects what the SDK raised
            return None, err

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(guarded, range(n)))


def registry_phase(cs, admin_url, device_id):
    retry_log = RetryLog()
    logging.getLogger("urllib3.connectionpool").addHandler(retry_log)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.DEBUG)
    refused_before = admin(admin_url, "GET", "/emulator/throttle")["operations"]["registryOperations"]["refused"]
    managers = [manager(cs) for _ in range(REGISTRY_BURST)]
    results = burst(REGISTRY_BURST, lambda i: managers[i].get_device(device_id))
    errors = [e for _, e in results if e is not None]
    check(f"all {REGISTRY_BURST} concurrent get_device calls succeed", not errors, repr(errors[:1]))
    check("each returned the device", all(r.device_id == device_id for r, _ in results))
    refused = admin(admin_url, "GET", "/emulator/throttle")["operations"]["registryOperations"]["refused"]
    check(f"the hub answered 429 to {refused - refused_before} of them first", refused > refused_before)
    check(f"urllib3 retried after Retry-After ({retry_log.retries} retries)", retry_log.retries >= 1)
    logging.getLogger("urllib3.connectionpool").removeHandler(retry_log)


def query_phase(cs):
    managers = [manager(cs) for _ in range(QUERY_BURST)]
    spec = QuerySpecification(query="SELECT * FROM devices")
    results = burst(QUERY_BURST, lambda i: managers[i].query_iot_hub(spec))
    refused = [e for _, e in results if e is not None]
    answered = [r for r, e in results if e is None]
    check(f"{len(answered)} of {QUERY_BURST} concurrent queries answered, {len(refused)} refused",
          len(answered) >= 1 and len(refused) >= 1)
    for err in refused:
        check("a refused query raises HttpOperationError", isinstance(err, HttpOperationError), repr(err))
    response = refused[0].response
    check_equal("HTTP status", response.status_code, 429)
    check_equal("iothub-errorcode header", response.headers.get("iothub-errorcode"), "ThrottlingException")
    check("legacy body names ThrottlingException",
          str(response.json().get("Message", "")).startswith("ErrorCode:ThrottlingException;"), response.text)
    retry_after = response.headers.get("Retry-After", "")
    check("a Retry-After header in whole seconds", retry_after.isdigit() and int(retry_after) >= 1, retry_after)
    for err in refused:
        time.sleep(int(err.response.headers["Retry-After"]))
        result = managers[0].query_iot_hub(spec)
        check("a refused query succeeds when retried after Retry-After", len(result.items) >= 1)


def c2d_phase(cs, admin_url, device_id):
    managers = [manager(cs) for _ in range(C2D_BURST)]
    try:
        results = burst(C2D_BURST, lambda i: managers[i].send_c2d_message(device_id, f"burst {i}"))
        failed = [i for i, (_, e) in enumerate(results) if e is not None]
        check(f"{C2D_BURST - len(failed)} of {C2D_BURST} concurrent sends enqueued, {len(failed)} failed "
              "after uamqp's own retries", len(failed) >= 1 and C2D_BURST - len(failed) >= 5)
        check("uamqp reports the failure as its bare send-failure Exception",
              all(str(results[i][1]) == "C2D message send failure" for i in failed), repr(results[failed[0]][1]))
        stats = admin(admin_url, "GET", "/emulator/throttle")["operations"]["c2dSends"]
        check("the hub refused those sends (device-container-throttled)", stats["refused"] >= len(failed), stats)
        for i in failed:
            time.sleep(1)
            managers[i].send_c2d_message(device_id, f"retry {i}")
        check(f"all {len(failed)} failed sends succeed when retried a second apart", True)
    finally:
        for m in managers:
            m.amqp_svc_client.disconnect_sync()


def run():
    cs = env("IOTHUB_CONNECTION_STRING")
    admin_url = env("IOTHUB_HTTP_URL")
    env("SSL_CERT_FILE")
    env("REQUESTS_CA_BUNDLE")
    device_id = env("TEST_DEVICE_PREFIX") + "py-throttled"
    stats = admin(admin_url, "GET", "/emulator/throttle")
    check_equal("the hub throttles as", (stats["tier"], stats["units"]), ("S1", 1))
    manager(cs).create_device_with_sas(device_id, None, None, "enabled")
    registry_phase(cs, admin_url, device_id)
    admin(admin_url, "POST", "/emulator/time", {"advance": "1m"})
    query_phase(cs)
    admin(admin_url, "POST", "/emulator/time", {"advance": "1m"})
    c2d_phase(cs, admin_url, device_id)


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
