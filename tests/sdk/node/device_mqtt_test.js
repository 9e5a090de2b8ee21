// The MQTT device endpoint with the unmodified Node SDKs (azure-iot-device + azure-iot-device-mqtt, and
// azure-iothub for the service side).
//
// The device connects over MQTT/TLS through a small TCP relay in this script (the connection string's
// GatewayHostName points mqtt.js at it; HostName, and so the MQTT username and SAS audience, stay the
// hub's), so the script can cut the device's socket at a chosen moment. It sends telemetry, patches
// reported properties, reads its twin, receives a desired-properties patch and answers a direct method;
// gets a C2D message sent while it was closed (REST extension `POST /devices/{id}/messages/deviceBound`);
// and, for a message whose delivery is cut before the PUBACK can leave, gets it again after the SDK
// reconnects by itself. Run by the Rust harness as `node tests/sdk/node/device_mqtt_test.js`.
'use strict';

const crypto = require('crypto');
const net = require('net');
const { Registry, Client: ServiceClient } = require('azure-iothub');
const { Client } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { check, checkEqual, delay, env, fail, finish, hubConfig, jsonBody, rest, startWatchdog, withTimeout } =
  require('./common');

const SCRIPT = 'device_mqtt_test';
const WATCHDOG_S = 120;
const SDK_CALL_MS = 15000;
const RECEIVE_MS = 20000;
const HUB_MQTT_PORT = 8883;

/** A TCP relay from an ephemeral port to the hub's MQTT port; `cut()` drops every relayed connection. */
function startRelay(host) {
  const pairs = new Set();
  const server = net.createServer((inbound) => {
    const outbound = net.connect(HUB_MQTT_PORT, host);
    const pair = { inbound, outbound };
    pairs.add(pair);
    inbound.pipe(outbound);
    outbound.pipe(inbound);
    const end = () => {
      pairs.delete(pair);
      inbound.destroy();
      outbound.destroy();
    };
    inbound.on('error', end).on('close', end);
    outbound.on('error', end).on('close', end);
  });
  return new Promise((resolve, reject) => {
    server.on('error', reject);
    server.listen(0, host, () => {
      resolve({
        port: server.address().port,
        connections: () => pairs.size,
        cut() {
          for (const { inbound, outbound } of pairs) {
            outbound.destroy();
            inbound.destroy();
          }
          pairs.clear();
        },
        close: () => server.close(),
      });
    });
  });
}

async function sendC2d(hub, deviceId, messageId, payload) {
  const res = await rest(hub, 'POST', `/devices/${encodeURIComponent(deviceId)}/messages/deviceBound`, {
    headers: {
      'Content-Type': 'application/octet-stream',
      'iothub-messageid': messageId,
      'iothub-ack': 'none',
      'iothub-app-color': 'blue',
    },
    body: payload,
  });
  checkEqual(`C2D send ${messageId}: HTTP status`, res.status, 204);
}

async function deviceRecord(hub, deviceId) {
  const res = await rest(hub, 'GET', `/devices/${encodeURIComponent(deviceId)}`);
  checkEqual('registry get: HTTP status', res.status, 200);
  return jsonBody('registry get', res);
}

/** Waits (with a deadline) until `inbox` holds a delivery of `messageId`, and removes it. */
async function take(inbox, messageId) {
  const deadline = Date.now() + RECEIVE_MS;
  for (;;) {
    const i = inbox.findIndex((m) => m.messageId === messageId);
    if (i >= 0) return inbox.splice(i, 1)[0];
    if (Date.now() > deadline) fail(`receive ${messageId}`, `not delivered within ${RECEIVE_MS} ms`);
    await delay(25);
  }
}

async function openDevice(deviceCs, inbox, onMessage) {
  const client = Client.fromConnectionString(deviceCs, Mqtt);
  client.on('error', (err) => fail('device client error', err));
  client.on('message', (msg) => {
    inbox.push(msg);
    onMessage(msg, client);
  });
  await withTimeout(client.open(), SDK_CALL_MS, 'device client open');
  return client;
}

async function checkTwinAndMethods(hub, registry, client, deviceId) {
  const twin = await withTimeout(client.getTwin(), SDK_CALL_MS, 'client.getTwin');
  check('getTwin: desired has $version', typeof twin.properties.desired.$version === 'number', twin.properties);
  await withTimeout(
    new Promise((resolve, reject) =>
      twin.properties.reported.update({ firmware: '2.0.1' }, (err) => (err ? reject(err) : resolve())),
    ),
    SDK_CALL_MS,
    'reported.update',
  );
  check('reported properties patched (204)', true);
  const service = await withTimeout(registry.getTwin(deviceId), SDK_CALL_MS, 'Registry.getTwin');
  checkEqual('service sees reported firmware', service.responseBody.properties.reported.firmware, '2.0.1');

  // The listener makes the SDK subscribe in the background, with no completion signal; IoT Hub only
  // notifies devices already subscribed. So patch until a patch reaches the device (bounded).
  const seen = [];
  twin.on('properties.desired', (p) => seen.push(p.interval));
  let delivered = null;
  for (let attempt = 1; attempt <= 10 && delivered === null; attempt += 1) {
    const interval = 100 + attempt;
    await withTimeout(
      registry.updateTwin(deviceId, { properties: { desired: { interval } } }, '*'),
      SDK_CALL_MS,
      'Registry.updateTwin',
    );
    const until = Date.now() + 1000;
    while (Date.now() < until && !seen.includes(interval)) await delay(20);
    if (seen.includes(interval)) delivered = interval;
  }
  check('desired patch reached the device once it was subscribed', delivered !== null, seen);

  client.onDeviceMethod('reboot', (request, response) => {
    checkEqual('method payload on the device', JSON.stringify(request.payload), '{"delay":2}');
    response.send(200, { rebooting: true }, (err) => err && fail('method response send', err));
  });
  const serviceClient = ServiceClient.fromConnectionString(hub.connectionString);
  const result = await withTimeout(
    // connectTimeoutInSeconds: the hub waits for the device's (background) methods subscription.
    serviceClient.invokeDeviceMethod(deviceId, {
      methodName: 'reboot',
      payload: { delay: 2 },
      responseTimeoutInSeconds: 15,
      connectTimeoutInSeconds: 10,
    }),
    SDK_CALL_MS,
    'invokeDeviceMethod',
  );
  checkEqual('direct method: status from the device', result.result.status, 200);
  checkEqual('direct method: payload from the device', JSON.stringify(result.result.payload), '{"rebooting":true}');
}

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  env('IOTHUB_HTTP_URL');
  const deviceId = `${hub.devicePrefix}-node-mqtt`;
  const registry = Registry.fromConnectionString(hub.connectionString);
  const created = await withTimeout(registry.create({ deviceId }), SDK_CALL_MS, 'Registry.create');
  const key = created.responseBody.authentication.symmetricKey.primaryKey;
  const relay = await startRelay(hub.host);
  const deviceCs = `HostName=${hub.host};DeviceId=${deviceId};SharedAccessKey=${key};GatewayHostName=${hub.host}:${relay.port}`;
  const tag = crypto.randomBytes(4).toString('hex');
  const inbox = [];
  const deliveries = new Map();
  const dropId = `drop-${tag}`;
  const onMessage = (msg, client) => {
    const n = (deliveries.get(msg.messageId) || 0) + 1;
    deliveries.set(msg.messageId, n);
    // The first delivery of dropId: cut the socket before mqtt.js can write the PUBACK (it sends it
    // right after this synchronous 'message' event), so the hub never sees it.
    if (msg.messageId === dropId && n === 1) relay.cut();
    else client.complete(msg, (err) => err && fail(`complete ${msg.messageId}`, err));
  };

  let client = await openDevice(deviceCs, inbox, onMessage);
  check('device connected over MQTT/TLS (through the relay)', relay.connections() === 1);
  checkEqual('registry: connectionState', (await deviceRecord(hub, deviceId)).connectionState, 'Connected');
  await withTimeout(client.sendEvent(new (require('azure-iot-device').Message)('{"t":1}')), SDK_CALL_MS, 'sendEvent');
  check('telemetry sent (PUBACKed)', true);
  await checkTwinAndMethods(hub, registry, client, deviceId);

  await withTimeout(client.close(), SDK_CALL_MS, 'device client close');
  const offlineId = `offline-${tag}`;
  await sendC2d(hub, deviceId, offlineId, `sent while closed ${tag}`);
  client = await openDevice(deviceCs, inbox, onMessage);
  const offline = await take(inbox, offlineId);
  checkEqual('offline C2D: payload', offline.getData().toString(), `sent while closed ${tag}`);
  checkEqual('offline C2D: app property color', offline.properties.getValue('color'), 'blue');

  await sendC2d(hub, deviceId, dropId, `cut mid-delivery ${tag}`);
  const first = await take(inbox, dropId);
  checkEqual('dropped delivery: payload', first.getData().toString(), `cut mid-delivery ${tag}`);
  const again = await take(inbox, dropId);
  checkEqual('redelivered after the SDK reconnected: payload', again.getData().toString(), `cut mid-delivery ${tag}`);
  checkEqual('deliveries of the cut message', deliveries.get(dropId), 2);

  const deadline = Date.now() + RECEIVE_MS;
  while ((await deviceRecord(hub, deviceId)).cloudToDeviceMessageCount !== 0) {
    if (Date.now() > deadline) fail('C2D queue empty after the PUBACKs', await deviceRecord(hub, deviceId));
    await delay(50);
  }
  check('C2D queue empty after the PUBACKs', true);
  await withTimeout(client.close(), SDK_CALL_MS, 'device client close');
  relay.close();
  await withTimeout(registry.delete(deviceId), SDK_CALL_MS, 'Registry.delete');
  finish(SCRIPT);
}

main().catch((err) => fail('unexpected error', err));
