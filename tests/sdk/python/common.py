"""Shared helpers for the Python SDK test scripts run by the Rust harness (tests/sdk/python/*.py).

Owns the harness contract: environment variables, one output line per check, a whole-run watchdog, and
exit 1 on the first failure (with the SDK's HTTP status and body when a call raised). The scripts import
it as `common` (Python puts the script's own folder on sys.path).
"""

import faulthandler
import os
import sys
import threading
import traceback

from azure.iot.hub import IoTHubRegistryManager
from msrest.exceptions import HttpOperationError

# Per-request bound (msrest's default is 100 s: msrest/universal_http/__init__.py ClientConnection).
REQUEST_TIMEOUT_S = 15

_checks_passed = 0


class CheckFailed(Exception):
    """A check did not hold; the message says which and why."""


def check(what, ok, detail=None):
    """Records one passed check (one output line) or raises CheckFailed."""
    global _checks_passed
    if not ok:
        raise CheckFailed(what if detail is None else f"{what}: {detail}")
    _checks_passed += 1
    print(f"ok - {what}", flush=True)


def check_equal(what, actual, expected):
    check(what, actual == expected, f"expected {expected!r}, got {actual!r}")


def expect_http_error(what, call, status, code):
    """Runs `call`, which must raise HttpOperationError with `status` and IoT Hub error `code`.

    Checks the `iothub-errorcode` header and the legacy body `{"Message":"ErrorCode:<code>;..."}`
    (iothub-reference.md section 2.9).
    """
    try:
        result = call()
    except HttpOperationError as err:
        response = err.response
    else:
        raise CheckFailed(f"{what}: expected HTTP {status}, but the call returned {result!r}")
    check_equal(f"{what}: HTTP status", response.status_code, status)
    check_equal(f"{what}: iothub-errorcode header", response.headers.get("iothub-errorcode"), code)
    try:
        message = response.json().get("Message")
    except ValueError:
        message = None
    check(
        f'{what}: body Message starts with "ErrorCode:{code};"',
        isinstance(message, str) and message.startswith(f"ErrorCode:{code};"),
        response.text[:300],
    )


def env(name):
    value = os.environ.get(name)
    if not value:
        raise CheckFailed(f"environment variable {name} is required (set by the Rust SDK test harness)")
    return value


def start_watchdog(seconds):
    """Bounds the whole run: prints a failure and every thread's stack, then exits 1."""

    def expire():
        print(f"FAIL - watchdog: script exceeded {seconds} s overall", flush=True)
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
        sys.stdout.flush()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def registry_manager(connection_string):
    """The SDK client, with msrest's silent retries off and a per-request timeout.

    msrest retries 408 and most 5xx three times with backoff (msrest/universal_http/requests.py:341-352);
    the harness wants a failing call to fail once, visibly. Both knobs are public configuration.
    """
    manager = IoTHubRegistryManager.from_connection_string(connection_string)
    manager.protocol.config.retry_policy.retries = 0
    manager.protocol.config.connection.timeout = REQUEST_TIMEOUT_S
    return manager


def run_main(script, watchdog_s, run):
    """Runs `run()` under the watchdog; returns the process exit code (0 when every check passed)."""
    start_watchdog(watchdog_s)
    try:
        run()
    except CheckFailed as err:
        print(f"FAIL - {err}", flush=True)
        return 1
    except Exception as err:  # an SDK call failed where success was expected
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        body = getattr(response, "text", "")[:300] if response is not None else ""
        print(f"FAIL - unexpected {type(err).__name__}: {err} (HTTP {status}) {body}", flush=True)
        print(traceback.format_exc(), end="", flush=True)
        return 1
    print(f"{script}: all {_checks_passed} checks passed", flush=True)
    return 0
