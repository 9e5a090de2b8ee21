// Device-side HTTP C2D against the emulator with the unmodified Node SDKs.
//
// azure-iothub's Registry creates the device over REST; the emulator's REST extension
// (`POST /devices/{id}/messages/deviceBound`) enqueues three C2D messages with `iothub-ack: full`;
// azure-iot-device with the azure-iot-device-http `Http` transport receives them and completes,
// rejects, and abandons-then-completes them; the HTTP feedback endpoint must then report
// Success / Rejected / Success. Run by the Rust harness as `node tests/sdk/node/device_http_test.js`.
'use strict';

const crypto = require('crypto');
const { Registry } = require('azure-iothub');
const { Client } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { NoRetry } = require('azure-iot-common');
const {
  check,
  checkEqual,
  checkHubError,
  delay,
  fail,
  finish,
  hubConfig,
  jsonBody,
  rest,
  startWatchdog,
  withTimeout,
} = require('./common');

const SCRIPT = 'device_http_test';
const WATCHDOG_S = 90;
const SDK_CALL_MS = 15000;
const RECEIVE_MS = 20000;
/** Feedback batches may wait up to 15 s behind an earlier batch, so allow well over two windows. */
const FEEDBACK_MS = 40000;
const FEEDBACK_POLL_MS = 500;
/**
 * Receive policy for the Http transport: poll every 200 ms, one GET per tick. The default is
 * `{ interval: 1, drain: true }` (azure-iot-device-http/dist/http.js:35-44); `client.setOptions` with
 * `http.receivePolicy` reaches `_setReceiverOptions` (http.js:328-330), whose `interval` is in seconds
 * and only has to be a number > 0 (http.js:724-730); `enableC2D` turns it into `setInterval` (http.js:463-465).
 */
const RECEIVE_POLICY = { interval: 0.2, drain: false };
const APP_PROP = 'seq';
/** Set once the client is closed: a poll still in flight may then legitimately fail (device deleted). */
let deviceClosed = false;

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  const deviceId = `${hub.devicePrefix}node-http`;
  const registry = Registry.fromConnectionString(hub.connectionString);

  await checkMissingDevice(hub, registry);
  const device = await createDevice(registry, deviceId);
  const sent = await sendThree(hub, deviceId);
  const { client, inbox } = await openDeviceClient(hub, deviceId, device);
  await settleAll(client, inbox, sent, deviceId);
  await checkFeedback(hub, deviceId, sent);
  checkDeliveryCounts(inbox, sent);
  await withTimeout(client.close(), SDK_CALL_MS, 'device client close');
  deviceClosed = true;
  await withTimeout(registry.delete(deviceId), SDK_CALL_MS, 'Registry.delete');
  check(`Registry.delete removed ${deviceId}`, true);
  finish(SCRIPT);
}

/** C2D to an unknown device: 404 in IoT Hub's error shape; Registry.get maps it to DeviceNotFoundError. */
async function checkMissingDevice(hub, registry) {
  const missing = `${hub.devicePrefix}node-missing`;
  const res = await rest(hub, 'POST', `/devices/${encodeURIComponent(missing)}/messages/deviceBound`, {
    headers: { 'Content-Type': 'application/octet-stream' },
    body: 'nobody home',
  });
  checkHubError('C2D send to a missing device', res, 404, 'DeviceNotFound');
  const err = await withTimeout(registry.get(missing), SDK_CALL_MS, 'Registry.get').then(
    () => null,
    (e) => e,
  );
  check('Registry.get of a missing device rejects', err !== null);
  checkEqual('Registry.get of a missing device: error type', err.name, 'DeviceNotFoundError');
}

/** Registry.create with no keys: the hub must generate two 32-byte base64 keys and answer 200. */
async function createDevice(registry, deviceId) {
  const result = await withTimeout(registry.create({ deviceId }), SDK_CALL_MS, 'Registry.create');
  const device = result.responseBody;
  checkEqual('Registry.create: HTTP status', result.httpResponse.statusCode, 200);
  checkEqual('Registry.create: deviceId', device.deviceId, deviceId);
  for (const which of ['primaryKey', 'secondaryKey']) {
    const key = device.authentication.symmetricKey[which];
    check(`Registry.create generated ${which} (44-char base64)`, isKey(key), key);
  }
  return device;
}

function isKey(key) {
  return typeof key === 'string' && key.length === 44 && Buffer.from(key, 'base64').length === 32;
}

/** Enqueues three messages through the emulator's REST C2D extension. */
async function sendThree(hub, deviceId) {
  const tag = crypto.randomBytes(4).toString('hex');
  const sent = [1, 2, 3].map((n) => ({
    messageId: `c2d-${n}-${tag}`,
    payload: `payload #${n} for ${deviceId}`,
    seq: String(n),
    correlationId: `corr-${n}-${tag}`,
  }));
  for (const m of sent) {
    const res = await rest(hub, 'POST', `/devices/${encodeURIComponent(deviceId)}/messages/deviceBound`, {
      headers: {
        'Content-Type': 'application/octet-stream',
        'iothub-messageid': m.messageId,
        'iothub-correlationid': m.correlationId,
        'iothub-ack': 'full',
        'iothub-expiry': new Date(Date.now() + 10 * 60 * 1000).toISOString(),
        [`iothub-app-${APP_PROP}`]: m.seq,
      },
      body: m.payload,
    });
    checkEqual(`C2D send ${m.messageId} (ack=full): HTTP status`, res.status, 204);
  }
  return sent;
}

/**
 * Opens the device client on the Http transport. The transport is built by a small factory so the
 * script can listen to its 'error' events: the client itself only debug-logs them
 * (azure-iot-device/dist/internal_client.js:39-43), which would turn a failing poll into a silent timeout.
 */
async function openDeviceClient(hub, deviceId, device) {
  const key = device.authentication.symmetricKey.primaryKey;
  const deviceCs = `HostName=${hub.host};DeviceId=${deviceId};SharedAccessKey=${key}`;
  function ObservedHttp(authenticationProvider) {
    const transport = new Http(authenticationProvider);
    transport.on('error', (err) => deviceClosed || fail('device Http transport: C2D receive failed', err));
    return transport;
  }
  const client = Client.fromConnectionString(deviceCs, ObservedHttp);
  client.setRetryPolicy(new NoRetry());
  client.on('error', (err) => fail('device client error', err));
  await withTimeout(client.setOptions({ http: { receivePolicy: RECEIVE_POLICY } }), SDK_CALL_MS, 'setOptions');
  await withTimeout(client.open(), SDK_CALL_MS, 'device client open');
  const inbox = { pending: [], deliveries: new Map() };
  client.on('message', (msg) => {
    inbox.pending.push(msg);
    inbox.deliveries.set(msg.messageId, (inbox.deliveries.get(msg.messageId) || 0) + 1);
  });
  check(`device client opened over HTTP with receivePolicy ${JSON.stringify(RECEIVE_POLICY)}`, true);
  return { client, inbox };
}

/** Waits (with a deadline) for the next delivery of `messageId` and removes it from the inbox. */
async function take(inbox, messageId) {
  const deadline = Date.now() + RECEIVE_MS;
  for (;;) {
    const i = inbox.pending.findIndex((m) => m.messageId === messageId);
    if (i >= 0) return inbox.pending.splice(i, 1)[0];
    if (Date.now() > deadline) {
      const seen = inbox.pending.map((m) => m.messageId);
      fail(`receive ${messageId}`, `not delivered within ${RECEIVE_MS} ms (pending: ${JSON.stringify(seen)})`);
    }
    await delay(25);
  }
}

function checkReceived(label, msg, expected, deviceId) {
  checkEqual(`${label}: payload`, msg.getData().toString(), expected.payload);
  checkEqual(`${label}: messageId`, msg.messageId, expected.messageId);
  checkEqual(`${label}: correlationId`, msg.correlationId, expected.correlationId);
  checkEqual(`${label}: app property iothub-app-${APP_PROP}`, msg.properties.getValue(`iothub-app-${APP_PROP}`), expected.seq);
  checkEqual(`${label}: exactly one app property`, msg.properties.count(), 1);
  check(`${label}: lockToken from ETag is set`, typeof msg.lockToken === 'string' && msg.lockToken.length > 0, msg.lockToken);
  checkEqual(`${label}: iothub-to`, String(msg.to).toLowerCase(), `/devices/${deviceId}/messages/devicebound`.toLowerCase());
  check(`${label}: iothub-expiry is set`, typeof msg.expiryTimeUtc === 'string' && msg.expiryTimeUtc.length > 0, msg.expiryTimeUtc);
}

/** Complete #1, reject #2, abandon #3, then receive #3 again and complete it. */
async function settleAll(client, inbox, sent, deviceId) {
  const [m1, m2, m3] = sent;
  const r1 = await take(inbox, m1.messageId);
  checkReceived('message #1', r1, m1, deviceId);
  await settle(client, 'complete', r1, 'MessageCompleted');
  const r2 = await take(inbox, m2.messageId);
  checkReceived('message #2', r2, m2, deviceId);
  await settle(client, 'reject', r2, 'MessageRejected');
  const r3 = await take(inbox, m3.messageId);
  checkReceived('message #3', r3, m3, deviceId);
  await settle(client, 'abandon', r3, 'MessageAbandoned');
  const again = await take(inbox, m3.messageId);
  checkReceived('message #3 after abandon', again, m3, deviceId);
  await settle(client, 'complete', again, 'MessageCompleted');
}

async function settle(client, action, msg, resultName) {
  const result = await withTimeout(client[action](msg), SDK_CALL_MS, `client.${action}`).catch((err) =>
    fail(`client.${action}(${msg.messageId})`, err),
  );
  checkEqual(`client.${action}(${msg.messageId}) result`, result && result.constructor.name, resultName);
}

/** Reads HTTP feedback batches (completing each) until all three expected records have been seen. */
async function checkFeedback(hub, deviceId, sent) {
  const expected = new Map([
    [sent[0].messageId, 'Success'],
    [sent[1].messageId, 'Rejected'],
    [sent[2].messageId, 'Success'],
  ]);
  const seen = new Map();
  const deadline = Date.now() + FEEDBACK_MS;
  while (seen.size < expected.size) {
    if (Date.now() > deadline) {
      fail('feedback', `only saw ${JSON.stringify([...seen])} within ${FEEDBACK_MS} ms`);
    }
    const res = await rest(hub, 'GET', '/messages/serviceBound/feedback');
    if (res.status === 204) {
      await delay(FEEDBACK_POLL_MS);
      continue;
    }
    checkEqual('feedback receive: HTTP status', res.status, 200);
    const lockToken = String(res.headers.etag || '').replace(/^"|"$/g, '');
    check('feedback batch has an ETag lock token', lockToken.length > 0, res.headers);
    const records = jsonBody('feedback batch', res);
    check('feedback batch is a non-empty JSON array', Array.isArray(records) && records.length > 0, records);
    records.filter((r) => r.deviceId === deviceId).forEach((r) => recordFeedback(r, expected, seen));
    const done = await rest(hub, 'DELETE', `/messages/serviceBound/feedback/${encodeURIComponent(lockToken)}`);
    checkEqual('feedback batch complete (DELETE): HTTP status', done.status, 204);
  }
}

function recordFeedback(record, expected, seen) {
  const id = record.originalMessageId;
  const label = `feedback for ${id}`;
  check(`${label}: is one of ours`, expected.has(id), record);
  check(`${label}: first record for this message`, !seen.has(id), record);
  checkEqual(`${label}: statusCode`, record.statusCode, expected.get(id));
  check(`${label}: has enqueuedTimeUtc`, typeof record.enqueuedTimeUtc === 'string', record);
  seen.set(id, record.statusCode);
}

/** Polling kept running during the feedback wait: nothing may have been redelivered meanwhile. */
function checkDeliveryCounts(inbox, sent) {
  const counts = sent.map((m) => inbox.deliveries.get(m.messageId) || 0);
  checkEqual('deliveries per message (#1, #2, #3)', counts.join(','), '1,1,2');
  checkEqual('no unexpected deliveries pending', inbox.pending.length, 0);
}

main().catch((err) => fail('unexpected error', err));
