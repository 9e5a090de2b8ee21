"""Scheduled jobs with the unmodified Python `azure-iot-hub` IoTHubJobManager (iothub-reference.md 2.10).

Creates a device tagged with this run's group, then: create_scheduled_job for a twin update an hour
ahead (status `scheduled`), get_scheduled_job, cancel_scheduled_job (`cancelled`); a second job due
now, polled with get_scheduled_job until `completed`, whose patch must be on the twin while the
cancelled job's is not; get_scheduled_job of an unknown id (404 JobNotFound) and a duplicate id (409).

query_scheduled_jobs: IoT Hub answers the jobs query with a JSON array (like the twin query), which
this SDK's generated code cannot deserialize into its QueryResult model (the bug its
query_iot_hub had, azure-iot-sdk-python issue #423). The script checks that the SDK call fails that
way and reads the same route through the SDK's own authenticated pipeline instead.
Run by the Rust harness as `python3 tests/sdk/python/jobs_test.py`.
"""

import datetime
import sys
import time

from azure.iot.hub import IoTHubJobManager
from azure.iot.hub.models import JobRequest, Twin, TwinProperties
from msrest.exceptions import DeserializationError

from common import (
    REQUEST_TIMEOUT_S,
    CheckFailed,
    check,
    check_equal,
    env,
    expect_http_error,
    registry_manager,
    run_main,
)

SCRIPT = "jobs_test"
WATCHDOG_S = 90
JOB_WAIT_S = 20


def job_manager(connection_string):
    """The SDK client with msrest's silent retries off and a per-request timeout (see common.py)."""
    manager = IoTHubJobManager.from_connection_string(connection_string)
    manager.protocol.config.retry_policy.retries = 0
    manager.protocol.config.connection.timeout = REQUEST_TIMEOUT_S
    return manager


def twin_job(job_id, group, desired, start):
    return JobRequest(
        job_id=job_id,
        type="scheduleUpdateTwin",
        update_twin=Twin(etag="*", properties=TwinProperties(desired=desired)),
        query_condition=f"tags.group = '{group}'",
        start_time=start,
        max_execution_time_in_seconds=60,
    )


def run():
    connection_string = env("IOTHUB_CONNECTION_STRING")
    prefix = env("TEST_DEVICE_PREFIX")
    rm = registry_manager(connection_string)
    jm = job_manager(connection_string)
    device_id = f"{prefix}-job"
    group = f"{prefix}-group"
    rm.create_device_with_sas(device_id, None, None, "enabled")
    rm.update_twin(device_id, Twin(tags={"group": group}), "*")
    check("device created and tagged", True)

    now = datetime.datetime.now(datetime.timezone.utc)
    later_id = f"{prefix}-later"
    later = jm.create_scheduled_job(later_id, twin_job(later_id, group, {"fromLater": 1}, now + datetime.timedelta(hours=1)))
    check_equal("create_scheduled_job an hour ahead: status", later.status, "scheduled")
    check_equal("create_scheduled_job: job_id", later.job_id, later_id)
    check_equal("create_scheduled_job: type", later.type, "scheduleUpdateTwin")
    check("create_scheduled_job: start_time is an hour ahead",
          later.start_time is not None and later.start_time > now + datetime.timedelta(minutes=59), later.start_time)
    fetched = jm.get_scheduled_job(later_id)
    check_equal("get_scheduled_job: status", fetched.status, "scheduled")
    check_equal("get_scheduled_job: query_condition", fetched.query_condition, f"tags.group = '{group}'")
    cancelled = jm.cancel_scheduled_job(later_id)
    check_equal("cancel_scheduled_job: status", cancelled.status, "cancelled")
    check_equal("get_scheduled_job after cancel: status", jm.get_scheduled_job(later_id).status, "cancelled")

    now_id = f"{prefix}-now"
    job = jm.create_scheduled_job(now_id, twin_job(now_id, group, {"fromNow": 2}, now))
    deadline = time.monotonic() + JOB_WAIT_S
    while job.status != "completed" and time.monotonic() < deadline:
        check(f"job is not {job.status}", job.status not in ("failed", "cancelled"), job.status_message)
        time.sleep(0.1)
        job = jm.get_scheduled_job(now_id)
    check_equal("get_scheduled_job: the job due now completed", job.status, "completed")
    stats = job.device_job_statistics
    check_equal("device_job_statistics: device_count", stats.device_count, 1)
    check_equal("device_job_statistics: succeeded_count", stats.succeeded_count, 1)
    check("end_time is set", job.end_time is not None, job.end_time)
    desired = rm.get_twin(device_id).properties.desired
    check_equal("the completed job patched the twin", desired.get("fromNow"), 2)
    check_equal("the cancelled job never ran", desired.get("fromLater"), None)

    expect_http_error("get_scheduled_job of an unknown id", lambda: jm.get_scheduled_job(f"{prefix}-nope"), 404,
                      "JobNotFound")
    expect_http_error("create_scheduled_job with a used id",
                      lambda: jm.create_scheduled_job(now_id, twin_job(now_id, group, {"x": 1}, now)), 409,
                      "JobAlreadyExists")

    try:
        result = jm.query_scheduled_jobs("scheduleUpdateTwin", "cancelled")
    except DeserializationError as err:
        check("query_scheduled_jobs: the SDK cannot deserialize IoT Hub's array answer", "list" in str(err), err)
    else:
        raise CheckFailed(f"query_scheduled_jobs: expected the SDK's DeserializationError, got {result!r}")
    client = jm.protocol._client
    request = client.get("/jobs/v2/query", {"api-version": jm.protocol.api_version, "jobType": "scheduleUpdateTwin",
                                            "jobStatus": "cancelled"})
    response = client.send(request, stream=False)
    check_equal("jobs query through the SDK pipeline: HTTP status", response.status_code, 200)
    ids = [j.get("jobId") for j in response.json()]
    check_equal("jobs query: the cancelled job only", ids, [later_id])

    rm.delete_device(device_id)


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
