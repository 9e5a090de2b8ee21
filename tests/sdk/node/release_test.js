// The seed's release step against the emulator, with the unmodified Node SDKs (reference §6):
// `Registry.list()` finds every device, `Client.send` sends each one a C2D message with ack `full`,
// and the feedback receiver collects the results.
//
// 25 devices are registered first; each receives through azure-iot-device with the
// azure-iot-device-http transport (fast receivePolicy) and completes its message. Every message
// must be delivered exactly once and every feedback record must say Success.
// Run by the Rust harness as `node tests/sdk/node/release_test.js`.
'use strict';

const crypto = require('crypto');
const { Client: ServiceClient, Registry } = require('azure-iothub');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { NoRetry } = require('azure-iot-common');
const { check, checkEqual, delay, fail, finish, hubConfig, startWatchdog, withTimeout } = require('./common');

const SCRIPT = 'release_test';
const WATCHDOG_S = 150;
const DEVICES = 25;
const SDK_CALL_MS = 15000;
const RECEIVE_MS = 30000;
/** Feedback is cut into batches at most every 15 s (IoT Hub's interval): allow a few windows. */
const FEEDBACK_MS = 60000;
const RECEIVE_POLICY = { interval: 0.2, drain: false };

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  const registry = Registry.fromConnectionString(hub.connectionString);
  const ids = Array.from({ length: DEVICES }, (_, i) => `${hub.devicePrefix}rel-${String(i).padStart(2, '0')}`);
  const devices = new Map();
  for (const deviceId of ids) {
    const r = await withTimeout(registry.create({ deviceId }), SDK_CALL_MS, `Registry.create ${deviceId}`);
    devices.set(deviceId, r.responseBody);
  }
  check(`registered ${DEVICES} devices`, devices.size === DEVICES);

  // The release step itself: list, open, feedback receiver, send to each listed device.
  const listed = await withTimeout(registry.list(), SDK_CALL_MS, 'Registry.list');
  const targets = listed.responseBody.map((d) => d.deviceId).filter((id) => devices.has(id));
  checkEqual('Registry.list returns every registered device', [...targets].sort().join(','), [...ids].sort().join(','));
  const service = ServiceClient.fromConnectionString(hub.connectionString);
  service.setRetryPolicy(new NoRetry());
  await withTimeout(service.open(), SDK_CALL_MS, 'service Client.open');
  const feedback = await openFeedback(service);
  const tag = crypto.randomBytes(4).toString('hex');
  const sent = new Map();
  for (const deviceId of targets) {
    const m = new Message(JSON.stringify({ release: tag, deviceId }));
    m.messageId = `release-${tag}-${deviceId}`;
    m.ack = 'full';
    const r = await withTimeout(service.send(deviceId, m), SDK_CALL_MS, `Client.send ${deviceId}`);
    if (!r || !r.result || r.result.constructor.name !== 'MessageEnqueued') fail(`Client.send ${deviceId}`, r);
    sent.set(m.messageId, deviceId);
  }
  check(`Client.send enqueued ${sent.size} messages with ack full`, sent.size === DEVICES);

  const delivered = await receiveEverywhere(hub, devices, sent);
  checkEqual('every device received exactly its message, once', delivered, DEVICES);
  await waitForFeedback(feedback, sent);
  await withTimeout(service.close(), SDK_CALL_MS, 'service Client.close');
  for (const deviceId of ids) await withTimeout(registry.delete(deviceId), SDK_CALL_MS, `Registry.delete ${deviceId}`);
  finish(SCRIPT);
}

function openFeedback(service) {
  return withTimeout(
    new Promise((resolve, reject) => {
      service.getFeedbackReceiver((err, receiver) => {
        if (err) return reject(err);
        const records = [];
        receiver.on('error', (e) => fail('feedback receiver error', e));
        receiver.on('message', (msg) => {
          records.push(...JSON.parse(msg.getData().toString('utf8')));
          receiver.complete(msg, (e) => e && fail('feedback complete', e));
        });
        resolve(records);
      });
    }),
    SDK_CALL_MS,
    'getFeedbackReceiver',
  );
}

/** Opens one Http device client per device; each completes what it gets. Resolves with the delivery count. */
async function receiveEverywhere(hub, devices, sent) {
  const received = new Map();
  const clients = [];
  for (const [deviceId, device] of devices) {
    const key = device.authentication.symmetricKey.primaryKey;
    const client = DeviceClient.fromConnectionString(`HostName=${hub.host};DeviceId=${deviceId};SharedAccessKey=${key}`, Http);
    client.setRetryPolicy(new NoRetry());
    client.on('error', (err) => fail(`device ${deviceId} error`, err));
    client.on('message', (msg) => {
      checkEqual(`${deviceId} got its own message`, sent.get(msg.messageId), deviceId);
      if (received.has(msg.messageId)) fail(`${msg.messageId} delivered twice`);
      received.set(msg.messageId, deviceId);
      client.complete(msg, (err) => err && fail(`${deviceId} complete`, err));
    });
    await withTimeout(client.setOptions({ http: { receivePolicy: RECEIVE_POLICY } }), SDK_CALL_MS, 'setOptions');
    await withTimeout(client.open(), SDK_CALL_MS, `device ${deviceId} open`);
    clients.push(client);
  }
  const deadline = Date.now() + RECEIVE_MS;
  while (received.size < sent.size) {
    if (Date.now() > deadline) fail('deliveries', `only ${received.size}/${sent.size} within ${RECEIVE_MS} ms`);
    await delay(50);
  }
  await Promise.all(clients.map((c) => withTimeout(c.close(), SDK_CALL_MS, 'device close')));
  return received.size;
}

async function waitForFeedback(records, sent) {
  const deadline = Date.now() + FEEDBACK_MS;
  for (;;) {
    const ours = records.filter((r) => sent.has(r.originalMessageId));
    if (ours.length >= sent.size) {
      const unique = new Set(ours.map((r) => r.originalMessageId));
      checkEqual('feedback: one record per message', unique.size, sent.size);
      const notSuccess = ours.filter((r) => r.statusCode !== 'Success');
      checkEqual('feedback: every record is Success', JSON.stringify(notSuccess), '[]');
      const wrongDevice = ours.filter((r) => sent.get(r.originalMessageId) !== r.deviceId);
      checkEqual('feedback: every record names its device', JSON.stringify(wrongDevice), '[]');
      return;
    }
    if (Date.now() > deadline) fail('feedback', `only ${ours.length}/${sent.size} records within ${FEEDBACK_MS} ms`);
    await delay(100);
  }
}

main().catch((err) => fail('unexpected error', err));
