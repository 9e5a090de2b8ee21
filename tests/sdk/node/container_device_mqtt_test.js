// The unmodified Node device MQTT SDK (azure-iot-device + azure-iot-device-mqtt) against the hub
// running in a container (tests/containers.rs starts it with the testcontainers module).
//
// The container's ports are published on random host ports, and the service SDKs always dial 443,
// so the service side here is the hub's REST API on the plain port (IOTHUB_HTTP_URL, SAS-signed as
// azure-iothub signs): register nothing (the harness seeded the device), send C2D with the
// emulator's `POST /devices/{id}/messages/deviceBound`, read the registry. The device side is the
// SDK alone: its connection string carries GatewayHostName=<host>:<mapped 8883>, which mqtt.js
// dials while HostName (the MQTT username and SAS audience) stays the hub's. It connects over TLS
// trusting the container's CA (NODE_EXTRA_CA_CERTS), sends telemetry, reads its twin and patches
// reported properties, receives a C2D message and completes it.
'use strict';

const crypto = require('crypto');
const http = require('http');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { API_VERSION, check, checkEqual, delay, env, fail, finish, hubConfig, serviceSas, startWatchdog, withTimeout } =
  require('./common');

const SCRIPT = 'container_device_mqtt_test';
const WATCHDOG_S = 90;
const SDK_CALL_MS = 15000;
const RECEIVE_MS = 20000;
const REQUEST_TIMEOUT_MS = 15000;

/** One request to the hub's plain HTTP port; resolves with `{ status, body }`. Never retries. */
function plain(hub, base, method, path, { headers = {}, body } = {}) {
  const url = new URL(`${path}?api-version=${API_VERSION}`, base);
  return new Promise((resolve, reject) => {
    const req = http.request(
      url,
      { method, headers: { Authorization: serviceSas(hub), ...headers }, agent: false, timeout: REQUEST_TIMEOUT_MS },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks) }));
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${path} timed out after ${REQUEST_TIMEOUT_MS} ms`)));
    req.on('error', reject);
    req.end(body);
  });
}

async function deviceRecord(hub, base, deviceId) {
  const res = await plain(hub, base, 'GET', `/devices/${encodeURIComponent(deviceId)}`);
  checkEqual('registry get: HTTP status', res.status, 200);
  return JSON.parse(res.body.toString('utf8'));
}

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  const base = env('IOTHUB_HTTP_URL');
  const deviceCs = env('IOTHUB_DEVICE_CONNECTION_STRING');
  const deviceId = /DeviceId=([^;]+)/.exec(deviceCs)[1];
  check('device connection string names a gateway (the mapped MQTT port)', /GatewayHostName=[^;]+:\d+/.test(deviceCs));

  const inbox = [];
  const client = Client.fromConnectionString(deviceCs, Mqtt);
  client.on('error', (err) => fail('device client error', err));
  client.on('message', (msg) => {
    inbox.push(msg);
    client.complete(msg, (err) => err && fail(`complete ${msg.messageId}`, err));
  });
  await withTimeout(client.open(), SDK_CALL_MS, 'device client open');
  checkEqual('registry: connectionState', (await deviceRecord(hub, base, deviceId)).connectionState, 'Connected');

  await withTimeout(client.sendEvent(new Message('{"t":1}')), SDK_CALL_MS, 'sendEvent');
  check('telemetry sent (PUBACKed)', true);
  const twin = await withTimeout(client.getTwin(), SDK_CALL_MS, 'client.getTwin');
  check('getTwin: desired has $version', typeof twin.properties.desired.$version === 'number', twin.properties);
  await withTimeout(
    new Promise((resolve, reject) =>
      twin.properties.reported.update({ firmware: 'container' }, (err) => (err ? reject(err) : resolve())),
    ),
    SDK_CALL_MS,
    'reported.update',
  );
  check('reported properties patched', true);

  // The 'message' listener subscribes in the background; a C2D message sent before the subscription
  // is kept in the device's queue and delivered once it lands, so one send is enough.
  const messageId = `c2d-${crypto.randomBytes(4).toString('hex')}`;
  const sent = await plain(hub, base, 'POST', `/devices/${encodeURIComponent(deviceId)}/messages/deviceBound`, {
    headers: { 'Content-Type': 'application/octet-stream', 'iothub-messageid': messageId, 'iothub-ack': 'none' },
    body: `hello from the container test ${messageId}`,
  });
  checkEqual('C2D send: HTTP status', sent.status, 204);
  const deadline = Date.now() + RECEIVE_MS;
  while (!inbox.some((m) => m.messageId === messageId)) {
    if (Date.now() > deadline) fail(`receive ${messageId}`, `not delivered within ${RECEIVE_MS} ms`);
    await delay(25);
  }
  const got = inbox.find((m) => m.messageId === messageId);
  checkEqual('C2D payload', got.getData().toString(), `hello from the container test ${messageId}`);
  while ((await deviceRecord(hub, base, deviceId)).cloudToDeviceMessageCount !== 0) {
    if (Date.now() > deadline) fail('C2D queue empty after the completion', await deviceRecord(hub, base, deviceId));
    await delay(50);
  }
  check('C2D queue empty after the completion', true);
  await withTimeout(client.close(), SDK_CALL_MS, 'device client close');
  finish(SCRIPT);
}

main().catch((err) => fail('unexpected error', err));
