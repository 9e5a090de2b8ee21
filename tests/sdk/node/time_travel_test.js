// Time travel with the unmodified Node SDKs: a C2D message with a one-hour expiry waits for a device
// that is offline; the test moves hub time two hours forward (`POST /emulator/time` on the plain port,
// the emulator's own endpoint); the device then connects over MQTT and never sees the expired message
// (a second message, sent after the jump, arrives first and alone), and the service's feedback receiver
// (AMQP) gets `Expired` for the first message and `Success` for the second. The device's SAS token,
// signed on this machine's clock, still works after the jump (tokens are checked on the wall clock).
// Run by the Rust harness as `node tests/sdk/node/time_travel_test.js`.
'use strict';

const crypto = require('crypto');
const { Client: ServiceClient, Registry } = require('azure-iothub');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { NoRetry } = require('azure-iot-common');
const { admin, check, checkEqual, delay, env, fail, finish, hubConfig, startWatchdog, withTimeout } = require('./common');

const SCRIPT = 'time_travel_test';
const WATCHDOG_S = 120;
const SDK_CALL_MS = 15000;
const RECEIVE_MS = 20000;
const FEEDBACK_MS = 40000;
const HOUR_MS = 3600 * 1000;

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  const adminUrl = env('IOTHUB_HTTP_URL');
  const registry = Registry.fromConnectionString(hub.connectionString);
  const deviceId = `${hub.devicePrefix}fridge`;
  const created = await withTimeout(registry.create({ deviceId }), SDK_CALL_MS, 'Registry.create');
  const key = created.responseBody.authentication.symmetricKey.primaryKey;
  const deviceCs = `HostName=${hub.host};DeviceId=${deviceId};SharedAccessKey=${key}`;

  const service = ServiceClient.fromConnectionString(hub.connectionString);
  service.setRetryPolicy(new NoRetry());
  await withTimeout(service.open(), SDK_CALL_MS, 'service Client.open');
  const feedback = await openFeedback(service);

  const before = await admin(adminUrl, 'GET', '/emulator/time');
  const update = notice(`update-${crypto.randomBytes(4).toString('hex')}`);
  update.expiryTimeUtc = before.nowMs + HOUR_MS;
  await withTimeout(service.send(deviceId, update), SDK_CALL_MS, 'Client.send (1-hour expiry)');
  check('Client.send queued a notice with a one-hour expiry for the offline device', true);

  const after = await admin(adminUrl, 'POST', '/emulator/time', { advance: '2h' });
  check('POST /emulator/time moved hub time forward by at least two hours', after.nowMs - before.nowMs >= 2 * HOUR_MS, after);
  check('GET /emulator/time reports the offset', (await admin(adminUrl, 'GET', '/emulator/time')).offsetMs >= 2 * HOUR_MS);
  const back = await admin(adminUrl, 'POST', '/emulator/time', { advanceMs: -1 }, 400);
  checkEqual('time never goes backwards: 400 ArgumentInvalid', back.status, 400);

  const inbox = [];
  const device = DeviceClient.fromConnectionString(deviceCs, Mqtt);
  device.on('error', (err) => fail('device client error', err));
  device.on('message', (msg) => {
    inbox.push(msg.messageId);
    device.complete(msg, (err) => err && fail(`complete ${msg.messageId}`, err));
  });
  await withTimeout(device.open(), SDK_CALL_MS, 'device client open (SAS signed before the jump)');
  check('the device connects after the jump with its SAS token', true);

  const later = notice(`later-${crypto.randomBytes(4).toString('hex')}`);
  await withTimeout(service.send(deviceId, later), SDK_CALL_MS, 'Client.send (after the jump)');
  const deadline = Date.now() + RECEIVE_MS;
  while (!inbox.includes(later.messageId)) {
    if (Date.now() > deadline) fail('receive the post-jump message', `inbox ${JSON.stringify(inbox)}`);
    await delay(25);
  }
  checkEqual('the device got only the post-jump message (the expired notice is gone)', JSON.stringify(inbox), JSON.stringify([later.messageId]));

  // Feedback batches are cut every 15 s of hub time: travel past the next cut instead of waiting.
  await admin(adminUrl, 'POST', '/emulator/time', { advance: '16s' });
  const until = Date.now() + FEEDBACK_MS;
  const status = (id) => (feedback.records.find((r) => r.originalMessageId === id) || {}).statusCode;
  while (!status(update.messageId) || !status(later.messageId)) {
    if (Date.now() > until) fail('feedback', `records ${JSON.stringify(feedback.records)}`);
    await delay(50);
  }
  checkEqual('feedback for the expired notice', status(update.messageId), 'Expired');
  checkEqual('feedback for the delivered message', status(later.messageId), 'Success');

  await withTimeout(device.close(), SDK_CALL_MS, 'device client close');
  await withTimeout(service.close(), SDK_CALL_MS, 'service Client.close');
  await withTimeout(registry.delete(deviceId), SDK_CALL_MS, 'Registry.delete');
  finish(SCRIPT);
}

function notice(messageId) {
  const m = new Message(JSON.stringify({ version: '2.0.0' }));
  m.messageId = messageId;
  m.ack = 'full';
  m.contentType = 'application/json';
  return m;
}

/** Attaches the feedback receiver; records every feedback record and completes every batch. */
async function openFeedback(service) {
  const receiver = await withTimeout(
    new Promise((resolve, reject) => service.getFeedbackReceiver((err, r) => (err ? reject(err) : resolve(r)))),
    SDK_CALL_MS,
    'getFeedbackReceiver',
  );
  const state = { records: [] };
  receiver.on('error', (err) => fail('feedback receiver error', err));
  receiver.on('message', (msg) => {
    state.records.push(...JSON.parse(msg.getData().toString('utf8')));
    receiver.complete(msg, (err) => err && fail('feedback receiver complete', err));
  });
  return state;
}

main().catch((err) => fail('unexpected error', err));
