// Scheduled jobs with the unmodified Node `azure-iothub` JobClient (iothub-reference.md §2.10).
//
// Registry creates three devices and tags two of them with this run's canary group; JobClient
// schedules a twin update over `tags.group = '<group>'`, polls getJob until the job completes, and the
// twins are read back: the two canaries changed, the third did not. Also: the jobs query
// (createQuery().next()) finds the job, getJob of an unknown id and a duplicate id fail with IoT
// Hub's codes, and cancelJob of a job scheduled an hour ahead answers `cancelled`.
// Run by the Rust harness as `node tests/sdk/node/jobs_test.js`.
'use strict';

const { JobClient, Registry } = require('azure-iothub');
const { check, checkEqual, delay, finish, hubConfig, startWatchdog, withTimeout } = require('./common');

const SCRIPT = 'jobs_test';
const WATCHDOG_S = 90;
const SDK_CALL_MS = 15000;
const JOB_WAIT_MS = 20000;

/** Resolves with the error a promise rejects with, or fails the check when it resolves. */
async function rejection(what, promise) {
  const err = await withTimeout(promise, SDK_CALL_MS, what).then(
    (r) => check(`${what} rejects`, false, r),
    (e) => e,
  );
  check(`${what} rejects`, err instanceof Error, err);
  return err;
}

/** The IoT Hub error code in the legacy error body of a failed SDK call. */
function hubErrorCode(err) {
  try {
    return JSON.parse(err.responseBody).Message.split(';')[0];
  } catch (e) {
    return `unparsable body: ${err.responseBody}`;
  }
}

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  const registry = Registry.fromConnectionString(hub.connectionString);
  const jobs = JobClient.fromConnectionString(hub.connectionString);
  const group = `${hub.devicePrefix}-canary`;
  const ids = ['a', 'b', 'c'].map((s) => `${hub.devicePrefix}-job-${s}`);
  for (const id of ids) {
    await withTimeout(registry.create({ deviceId: id }), SDK_CALL_MS, 'Registry.create');
  }
  for (const id of ids.slice(0, 2)) {
    await withTimeout(registry.updateTwin(id, { tags: { group } }, '*'), SDK_CALL_MS, 'Registry.updateTwin');
  }
  check('three devices created, two tagged with the canary group', true);

  const jobId = `${hub.devicePrefix}-fw`;
  const patch = { etag: '*', tags: { rolled: true }, properties: { desired: { firmwareVersion: '2.0' } } };
  const scheduled = await withTimeout(
    jobs.scheduleTwinUpdate(jobId, `tags.group = '${group}'`, patch),
    SDK_CALL_MS,
    'JobClient.scheduleTwinUpdate',
  );
  checkEqual('scheduleTwinUpdate: HTTP status', scheduled.response.statusCode, 200);
  checkEqual('scheduleTwinUpdate: jobId', scheduled.jobStatus.jobId, jobId);
  checkEqual('scheduleTwinUpdate: type', scheduled.jobStatus.type, 'scheduleUpdateTwin');

  let job = scheduled.jobStatus;
  const until = Date.now() + JOB_WAIT_MS;
  while (job.status !== 'completed' && Date.now() < until) {
    check(`job is not ${job.status}`, !['failed', 'cancelled'].includes(job.status), job);
    await delay(100);
    job = (await withTimeout(jobs.getJob(jobId), SDK_CALL_MS, 'JobClient.getJob')).jobStatus;
  }
  checkEqual('getJob: the job completed', job.status, 'completed');
  const stats = job.deviceJobStatistics;
  checkEqual('getJob: deviceCount', stats.deviceCount, 2);
  checkEqual('getJob: succeededCount', stats.succeededCount, 2);
  checkEqual('getJob: failedCount', stats.failedCount, 0);
  check('getJob: endTime is set', typeof job.endTime === 'string', job);

  for (const id of ids.slice(0, 2)) {
    const twin = (await withTimeout(registry.getTwin(id), SDK_CALL_MS, 'Registry.getTwin')).responseBody;
    checkEqual(`${id}: desired firmwareVersion`, twin.properties.desired.firmwareVersion, '2.0');
    checkEqual(`${id}: tag rolled`, twin.tags.rolled, true);
  }
  const untouched = (await withTimeout(registry.getTwin(ids[2]), SDK_CALL_MS, 'Registry.getTwin')).responseBody;
  checkEqual('the device outside the group is untouched', untouched.properties.desired.firmwareVersion, undefined);

  const page = await withTimeout(
    jobs.createQuery('scheduleUpdateTwin', 'completed').next(),
    SDK_CALL_MS,
    'JobClient.createQuery().next',
  );
  check('jobs query returns an array', Array.isArray(page.result), page.result);
  check('jobs query finds the completed job', page.result.some((j) => j.jobId === jobId), page.result);

  const missing = await rejection('getJob of an unknown job', jobs.getJob(`${hub.devicePrefix}-nope`));
  checkEqual('getJob of an unknown job: HTTP 404', missing.response && missing.response.statusCode, 404);
  checkEqual('getJob of an unknown job: error code', hubErrorCode(missing), 'ErrorCode:JobNotFound');

  const dup = await rejection(
    'scheduleTwinUpdate with a used job id',
    jobs.scheduleTwinUpdate(jobId, `tags.group = '${group}'`, patch),
  );
  checkEqual('duplicate job id: HTTP 409', dup.response && dup.response.statusCode, 409);

  const laterId = `${hub.devicePrefix}-later`;
  const later = await withTimeout(
    jobs.scheduleDeviceMethod(laterId, `tags.group = '${group}'`, { methodName: 'reboot' }, new Date(Date.now() + 3600e3), 600),
    SDK_CALL_MS,
    'JobClient.scheduleDeviceMethod',
  );
  checkEqual('a job an hour ahead is scheduled', later.jobStatus.status, 'scheduled');
  const cancelled = await withTimeout(jobs.cancelJob(laterId), SDK_CALL_MS, 'JobClient.cancelJob');
  checkEqual('cancelJob: status', cancelled.jobStatus.status, 'cancelled');

  for (const id of ids) {
    await withTimeout(registry.delete(id), SDK_CALL_MS, 'Registry.delete');
  }
  finish(SCRIPT);
}

main().catch((err) => {
  check('unexpected error', false, err);
});
