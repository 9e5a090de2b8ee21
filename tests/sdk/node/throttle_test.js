// Tier throttling (reference §5.1) against a hub started as IoT Hub S1 × 1 unit, with the unmodified
// Node `azure-iothub` SDK.
//
// Registry (100 ops/min): a burst of concurrent Registry.get calls is partly shaped (answered late)
// and partly refused with HTTP 429 `ThrottlingException`, which the SDK surfaces as `ThrottlingError`
// (common-http/rest_api_client.js translateError, no retry in Registry) with a `Retry-After` header;
// retrying each refused call after it succeeds. C2D sends over AMQP (100/min): with `NoRetry` a burst
// gets `ThrottlingError` from the rejected-delivery condition `com.microsoft:device-container-throttled`
// (common-amqp/amqp_common_errors.js); with the SDK's own ExponentialBackOffWithJitter (its throttled
// back-off shortened from 10 s) every send of a burst ends `MessageEnqueued`, and the hub's counters show
// it refused some first. Time travel between the phases empties the buckets (hub time refills them).
// Run by the Rust harness as `node tests/sdk/node/throttle_test.js`.
'use strict';

const { Client: ServiceClient, Registry } = require('azure-iothub');
const { ExponentialBackOffWithJitter, Message, NoRetry } = require('azure-iot-common');
const { admin, check, checkEqual, delay, env, fail, finish, hubConfig, startWatchdog, withTimeout } = require('./common');

const SCRIPT = 'throttle_test';
const WATCHDOG_S = 150;
const SDK_CALL_MS = 20000;
/** More than S1 × 1 lets through at once: 1 s of burst + 5 s of backlog at 100/min is 11 operations. */
const BURST = 20;

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  const adminUrl = env('IOTHUB_HTTP_URL');
  const stats = await admin(adminUrl, 'GET', '/emulator/throttle');
  checkEqual('the hub throttles as S1', stats.tier, 'S1');
  checkEqual('with 1 unit', stats.units, 1);

  const registry = Registry.fromConnectionString(hub.connectionString);
  const deviceId = `${hub.devicePrefix}throttled`;
  await withTimeout(registry.create({ deviceId }), SDK_CALL_MS, 'Registry.create');
  await registryBurst(registry, deviceId);

  await admin(adminUrl, 'POST', '/emulator/time', { advance: '1m' });
  await c2dBurstWithoutRetry(hub, deviceId);

  await admin(adminUrl, 'POST', '/emulator/time', { advance: '1m' });
  const refusedBefore = (await admin(adminUrl, 'GET', '/emulator/throttle')).operations.c2dSends.refused;
  await c2dBurstWithSdkRetry(hub, deviceId);
  const after = (await admin(adminUrl, 'GET', '/emulator/throttle')).operations.c2dSends;
  check('the hub refused some of those sends before the SDK retried them', after.refused > refusedBefore, after);
  finish(SCRIPT);
}

/** A burst of Registry.get: some 429 ThrottlingError with Retry-After, each then retried successfully. */
async function registryBurst(registry, deviceId) {
  const started = Date.now();
  const results = await Promise.allSettled(
    Array.from({ length: BURST }, () => withTimeout(registry.get(deviceId), SDK_CALL_MS, 'Registry.get')),
  );
  const ok = results.filter((r) => r.status === 'fulfilled');
  const refused = results.filter((r) => r.status === 'rejected').map((r) => r.reason);
  check(`${ok.length} of ${BURST} concurrent Registry.get calls were answered (burst plus shaping backlog)`, ok.length >= 5);
  check(`${refused.length} of ${BURST} were refused`, refused.length >= 1);
  check('answered calls return the device', ok.every((r) => r.value.responseBody.deviceId === deviceId));
  check('some answered calls were shaped (held for their turn)', Date.now() - started >= 1000);
  for (const err of refused) {
    if (err.name !== 'ThrottlingError') fail('a refused Registry.get is a ThrottlingError', err);
  }
  check('every refusal is the SDK ThrottlingError', true);
  const err = refused[0];
  checkEqual('the refusal is HTTP 429', err.response && err.response.statusCode, 429);
  checkEqual('iothub-errorcode header', err.response.headers['iothub-errorcode'], 'ThrottlingException');
  check('legacy body names ThrottlingException', String(err.responseBody).includes('ErrorCode:ThrottlingException;'), err.responseBody);
  const retryAfter = Number(err.response.headers['retry-after']);
  check('a Retry-After header in whole seconds', Number.isInteger(retryAfter) && retryAfter >= 1, err.response.headers);
  // The caller's retry: one at a time, each after the Retry-After the hub gave.
  for (const e of refused) {
    await delay(Number(e.response.headers['retry-after']) * 1000);
    const res = await withTimeout(registry.get(deviceId), SDK_CALL_MS, 'Registry.get retried after Retry-After');
    if (res.responseBody.deviceId !== deviceId) fail('a retried Registry.get returns the device', res.responseBody);
  }
  check(`all ${refused.length} refused calls succeed when retried after Retry-After`, true);
}

function message(i) {
  const m = new Message(JSON.stringify({ n: i }));
  m.messageId = `throttled-${i}-${Date.now()}`;
  return m;
}

/** With NoRetry, a burst of sends shows the throttled rejection as the SDK reports it. */
async function c2dBurstWithoutRetry(hub, deviceId) {
  const service = ServiceClient.fromConnectionString(hub.connectionString);
  service.setRetryPolicy(new NoRetry());
  await withTimeout(service.open(), SDK_CALL_MS, 'service Client.open');
  const results = await Promise.allSettled(
    Array.from({ length: BURST }, (_, i) => withTimeout(service.send(deviceId, message(i)), SDK_CALL_MS, 'Client.send')),
  );
  const refused = results.filter((r) => r.status === 'rejected').map((r) => r.reason);
  const enqueued = results.filter((r) => r.status === 'fulfilled');
  check(`${enqueued.length} of ${BURST} sends enqueued, ${refused.length} refused (NoRetry)`, refused.length >= 1 && enqueued.length >= 5);
  for (const err of refused) {
    if (err.name !== 'ThrottlingError') fail('a refused send is a ThrottlingError', err);
  }
  check('every refused send is the SDK ThrottlingError', true);
  checkEqual(
    'its AMQP condition',
    refused[0].amqpError && refused[0].amqpError.condition,
    'com.microsoft:device-container-throttled',
  );
  // At most 11 + 20 messages reach the device's queue (50 deep) over both bursts.
  await withTimeout(service.close(), SDK_CALL_MS, 'Client.close');
}

/** With the SDK's own retry policy (throttled back-off shortened), every send of a burst succeeds. */
async function c2dBurstWithSdkRetry(hub, deviceId) {
  const service = ServiceClient.fromConnectionString(hub.connectionString);
  const policy = new ExponentialBackOffWithJitter();
  // The SDK waits at least 10 s (cMin) before retrying a ThrottlingError; keep its formula, shorten it.
  policy.throttledParameters.cMin = 1000;
  policy.throttledParameters.c = 1000;
  policy.throttledParameters.cMax = 4000;
  service.setRetryPolicy(policy);
  await withTimeout(service.open(), SDK_CALL_MS, 'service Client.open');
  const results = await Promise.allSettled(
    Array.from({ length: BURST }, (_, i) =>
      withTimeout(service.send(deviceId, message(100 + i)), 90000, 'Client.send with the SDK retry policy'),
    ),
  );
  const failed = results.filter((r) => r.status === 'rejected');
  if (failed.length > 0) fail('every send of the burst succeeds with the SDK retry policy', failed[0].reason);
  check(
    `all ${BURST} sends of a burst end MessageEnqueued through the SDK's own retries`,
    results.every((r) => r.value && r.value.result && r.value.result.constructor.name === 'MessageEnqueued'),
  );
  await withTimeout(service.close(), SDK_CALL_MS, 'Client.close');
}

main().catch((err) => fail('unexpected error', err));
