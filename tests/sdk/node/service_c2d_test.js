// Service-side C2D over AMQP with the unmodified Node `azure-iothub` Client (rhea, no SASL layer, CBS).
//
// Client.open + getFeedbackReceiver; Client.send with ack `full`, message id, correlation id, content
// type and an application property; a device on the azure-iot-device-http transport receives and
// completes it; the feedback receiver gets a Success record and completes the batch. Negatives: a send
// to a missing device is rejected with amqp:not-found (DeviceNotFoundError) and the same connection
// keeps sending; the 51st pending message is rejected with amqp:resource-limit-exceeded; a client whose
// key is forged fails its CBS put-token (UnauthorizedError) and cannot send. The same Client with the
// AmqpWs transport (AMQP over WebSockets: wss://host:443/$iothub/websocket, subprotocol AMQPWSB10) sends a
// message the device receives and gets DeviceNotFoundError for a missing device.
// Run by the Rust harness as `node tests/sdk/node/service_c2d_test.js`.
'use strict';

const crypto = require('crypto');
const { AmqpWs, Client: ServiceClient, Registry } = require('azure-iothub');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { NoRetry } = require('azure-iot-common');
const { check, checkEqual, delay, fail, finish, hubConfig, startWatchdog, withTimeout } = require('./common');

const SCRIPT = 'service_c2d_test';
const WATCHDOG_S = 120;
const SDK_CALL_MS = 15000;
const RECEIVE_MS = 20000;
/** The hub cuts feedback batches at most every 15 s (IoT Hub's interval); allow two windows. */
const FEEDBACK_MS = 40000;
/** C2D messages a device queue holds (reference §3.1); the next send is refused. */
const QUEUE_DEPTH = 50;
const RECEIVE_POLICY = { interval: 0.2, drain: false };

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  const registry = Registry.fromConnectionString(hub.connectionString);
  const deviceId = `${hub.devicePrefix}amqp-c2d`;
  const fullId = `${hub.devicePrefix}amqp-full`;
  const device = await create(registry, deviceId);
  await create(registry, fullId);

  const service = ServiceClient.fromConnectionString(hub.connectionString);
  service.setRetryPolicy(new NoRetry());
  await withTimeout(service.open(), SDK_CALL_MS, 'service Client.open (TLS, AMQP header, CBS put-token)');
  check('service Client.open over AMQP (rhea, CBS put-token accepted)', true);
  const feedback = await openFeedback(service);

  const sent = message(`c2d-${crypto.randomBytes(4).toString('hex')}`);
  const result = await withTimeout(service.send(deviceId, sent), SDK_CALL_MS, 'Client.send');
  checkEqual('Client.send result', result && result.result && result.result.constructor.name, 'MessageEnqueued');

  await checkMissingDevice(service, hub);
  const again = message(`c2d-again-${crypto.randomBytes(4).toString('hex')}`);
  await withTimeout(service.send(deviceId, again), SDK_CALL_MS, 'Client.send after a refused send');
  check('the same connection keeps sending after a refused send', true);

  await receiveAndComplete(hub, deviceId, device, [sent, again]);
  await waitForFeedback(feedback, [sent.messageId, again.messageId], deviceId);
  await checkQueueDepth(service, fullId);
  await checkForgedKey(hub, deviceId);
  await checkAmqpOverWebSockets(hub, deviceId, device);

  await withTimeout(service.close(), SDK_CALL_MS, 'service Client.close');
  await withTimeout(registry.delete(deviceId), SDK_CALL_MS, 'Registry.delete');
  await withTimeout(registry.delete(fullId), SDK_CALL_MS, 'Registry.delete');
  finish(SCRIPT);
}

async function create(registry, deviceId) {
  const r = await withTimeout(registry.create({ deviceId }), SDK_CALL_MS, `Registry.create ${deviceId}`);
  checkEqual(`Registry.create ${deviceId}: HTTP status`, r.httpResponse.statusCode, 200);
  return r.responseBody;
}

function message(messageId) {
  const m = new Message(`payload of ${messageId}`);
  m.messageId = messageId;
  m.correlationId = `corr-${messageId}`;
  m.ack = 'full';
  m.contentType = 'text/plain';
  m.contentEncoding = 'utf-8';
  m.properties.add('color', 'blue');
  return m;
}

/** Attaches the feedback receiver; records every feedback record and completes every batch. */
async function openFeedback(service) {
  const receiver = await withTimeout(callbackResult((cb) => service.getFeedbackReceiver(cb)), SDK_CALL_MS, 'getFeedbackReceiver');
  const state = { records: [], batches: 0, contentTypes: new Set() };
  receiver.on('error', (err) => fail('feedback receiver error', err));
  receiver.on('message', (msg) => {
    state.batches += 1;
    state.contentTypes.add(msg.contentType);
    let records;
    try {
      records = JSON.parse(msg.getData().toString('utf8'));
    } catch (err) {
      fail('feedback batch body is JSON', err);
    }
    check('feedback batch is a non-empty JSON array', Array.isArray(records) && records.length > 0, records);
    state.records.push(...records);
    receiver.complete(msg, (err) => err && fail('feedback receiver complete', err));
  });
  check('getFeedbackReceiver attached /messages/serviceBound/feedback', true);
  const files = await withTimeout(
    callbackResult((cb) => service.getFileNotificationReceiver(cb)),
    SDK_CALL_MS,
    'getFileNotificationReceiver',
  );
  files.on('message', (msg) => fail('the file-notification link stays idle', msg));
  check('getFileNotificationReceiver attached /messages/serviceBound/filenotifications', true);
  return state;
}

/** The receiver an azure-iothub callback API yields (its promise form wraps it in a result object). */
function callbackResult(start) {
  return new Promise((resolve, reject) => start((err, value) => (err ? reject(err) : resolve(value))));
}

/** A send to a device that does not exist: IoT Hub's amqp:not-found, which the SDK maps to DeviceNotFoundError. */
async function checkMissingDevice(service, hub) {
  const missing = `${hub.devicePrefix}amqp-missing`;
  const err = await withTimeout(service.send(missing, message('to-nobody')), SDK_CALL_MS, 'Client.send to a missing device').then(
    () => null,
    (e) => e,
  );
  check('Client.send to a missing device is refused', err !== null);
  checkEqual('Client.send to a missing device: error type', err.name, 'DeviceNotFoundError');
  checkEqual('Client.send to a missing device: AMQP condition', err.amqpError && err.amqpError.condition, 'amqp:not-found');
}

/** The device receives both messages over HTTP with every property the service set, and completes them. */
async function receiveAndComplete(hub, deviceId, device, sent) {
  const key = device.authentication.symmetricKey.primaryKey;
  const client = DeviceClient.fromConnectionString(`HostName=${hub.host};DeviceId=${deviceId};SharedAccessKey=${key}`, Http);
  client.setRetryPolicy(new NoRetry());
  client.on('error', (err) => fail('device client error', err));
  await withTimeout(client.setOptions({ http: { receivePolicy: RECEIVE_POLICY } }), SDK_CALL_MS, 'setOptions');
  const inbox = [];
  client.on('message', (msg) => inbox.push(msg));
  await withTimeout(client.open(), SDK_CALL_MS, 'device client open');
  for (const expected of sent) {
    const deadline = Date.now() + RECEIVE_MS;
    let got;
    while (!(got = inbox.find((m) => m.messageId === expected.messageId))) {
      if (Date.now() > deadline) fail(`device receives ${expected.messageId}`, `not delivered within ${RECEIVE_MS} ms`);
      await delay(25);
    }
    const label = `device received ${expected.messageId}`;
    checkEqual(`${label}: payload`, got.getData().toString(), expected.getData().toString());
    checkEqual(`${label}: correlationId`, got.correlationId, expected.correlationId);
    checkEqual(`${label}: app property color`, got.properties.getValue('iothub-app-color'), 'blue');
    checkEqual(`${label}: to`, String(got.to).toLowerCase(), `/devices/${deviceId}/messages/devicebound`.toLowerCase());
    await withTimeout(client.complete(got), SDK_CALL_MS, 'device complete');
  }
  await withTimeout(client.close(), SDK_CALL_MS, 'device client close');
}

async function waitForFeedback(state, messageIds, deviceId) {
  const deadline = Date.now() + FEEDBACK_MS;
  for (;;) {
    const ours = state.records.filter((r) => messageIds.includes(r.originalMessageId));
    if (ours.length >= messageIds.length) {
      for (const r of ours) {
        checkEqual(`feedback for ${r.originalMessageId}: statusCode`, r.statusCode, 'Success');
        checkEqual(`feedback for ${r.originalMessageId}: deviceId`, r.deviceId, deviceId);
      }
      checkEqual('feedback records: one per message', ours.length, messageIds.length);
      check('feedback content type', state.contentTypes.has('application/vnd.microsoft.iothub.feedback.json'), [...state.contentTypes]);
      return;
    }
    if (Date.now() > deadline) fail('feedback', `only ${JSON.stringify(ours)} within ${FEEDBACK_MS} ms`);
    await delay(100);
  }
}

/** 50 pending messages fill a device queue; the 51st is refused with amqp:resource-limit-exceeded. */
async function checkQueueDepth(service, deviceId) {
  for (let i = 0; i < QUEUE_DEPTH; i += 1) {
    await withTimeout(service.send(deviceId, `fill ${i}`), SDK_CALL_MS, `Client.send #${i + 1}`);
  }
  check(`${QUEUE_DEPTH} messages queued for ${deviceId}`, true);
  const err = await withTimeout(service.send(deviceId, 'one too many'), SDK_CALL_MS, 'Client.send #51').then(
    () => null,
    (e) => e,
  );
  check('the 51st pending message is refused', err !== null);
  checkEqual('51st message: AMQP condition', err.amqpError && err.amqpError.condition, 'amqp:resource-limit-exceeded');
  checkEqual('51st message: error type', err.name, 'DeviceMaximumQueueDepthExceededError');
}

/** A key that is not the policy's: the CBS put-token gets 401 and nothing can be sent. */
async function checkForgedKey(hub, deviceId) {
  const forgedKey = crypto.randomBytes(32).toString('base64');
  const cs = `HostName=${hub.host};SharedAccessKeyName=${hub.keyName};SharedAccessKey=${forgedKey}`;
  const forged = ServiceClient.fromConnectionString(cs);
  forged.setRetryPolicy(new NoRetry());
  const openErr = await withTimeout(forged.open(), SDK_CALL_MS, 'forged Client.open').then(
    () => null,
    (e) => e,
  );
  check('a forged key fails the CBS put-token', openErr !== null);
  // azure-iothub wraps the CBS failure: Error('AMQP Transport: Could not connect') with the cause in amqpError.
  checkEqual('forged key: put-token refusal', openErr.amqpError && openErr.amqpError.name, 'UnauthorizedError');
  const sendErr = await withTimeout(forged.send(deviceId, 'forged'), SDK_CALL_MS, 'forged Client.send').then(
    () => null,
    (e) => e,
  );
  check('a forged key cannot send', sendErr !== null);
  checkEqual('forged key: send refusal', sendErr.amqpError && sendErr.amqpError.name, 'UnauthorizedError');
  await forged.close().catch(() => {});
}

/** AmqpWs: the WebSocket upgrade on 443, then the same AMQP session (CBS, sender link, outcomes). */
async function checkAmqpOverWebSockets(hub, deviceId, device) {
  const ws = ServiceClient.fromConnectionString(hub.connectionString, AmqpWs);
  ws.setRetryPolicy(new NoRetry());
  await withTimeout(ws.open(), SDK_CALL_MS, 'AmqpWs Client.open (WebSocket upgrade on 443, CBS put-token)');
  check('service Client.open over AMQP on WebSockets (AMQPWSB10)', true);
  const sent = message(`c2d-ws-${crypto.randomBytes(4).toString('hex')}`);
  const result = await withTimeout(ws.send(deviceId, sent), SDK_CALL_MS, 'AmqpWs Client.send');
  checkEqual('AmqpWs Client.send result', result && result.result && result.result.constructor.name, 'MessageEnqueued');
  await checkMissingDevice(ws, hub);
  await receiveAndComplete(hub, deviceId, device, [sent]);
  await withTimeout(ws.close(), SDK_CALL_MS, 'AmqpWs Client.close');
}

main().catch((err) => fail('unexpected error', err));
