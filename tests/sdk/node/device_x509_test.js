// X.509 device authentication with the unmodified Node SDKs (azure-iot-device + azure-iot-device-mqtt for the
// device, azure-iothub for the registry and for C2D over AMQP).
//
// The Rust harness issues the certificates into X509_DIR (see tests/sdk/python/device_x509_test.py): `self.pem`
// (self-signed), `ca.pem` and `ca-signed.pem` (CN x509-ca), and `wrong.pem` / `rogue.pem`, which must be
// refused. The script registers a device by its SHA-1 thumbprint without saying its type (Node's Registry
// leaves that to the hub) and a certificateAuthority device, trusts the CA through the emulator's
// `POST /emulator/x509-cas`, then each device connects with `HostName=…;DeviceId=…;x509=true` and
// `setOptions({cert, key})`, sends telemetry and receives a C2D message the service client sends over AMQP.
// The wrong certificates fail `open()`. Run by the Rust harness as `node tests/sdk/node/device_x509_test.js`.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const path = require('path');
const { Registry, Client: ServiceClient } = require('azure-iothub');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { check, checkEqual, env, fail, finish, hubConfig, startWatchdog, withTimeout } = require('./common');

const SCRIPT = 'device_x509_test';
const WATCHDOG_S = 120;
const SDK_CALL_MS = 15000;
const RECEIVE_MS = 20000;

const pem = (name) => fs.readFileSync(path.join(env('X509_DIR'), name), 'utf8');

function sha1Thumbprint(name) {
  const der = Buffer.from(pem(`${name}.pem`).replace(/-----[^-]+-----/g, '').replace(/\s+/g, ''), 'base64');
  return crypto.createHash('sha1').update(der).digest('hex').toUpperCase();
}

/** A raw POST to the emulator's plain port (the CA route is an emulator extension). */
function postText(url, text) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: 'POST', headers: { 'content-type': 'application/x-pem-file' } }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    });
    req.on('error', reject);
    req.end(text);
  });
}

function getJson(url) {
  return new Promise((resolve, reject) => {
    http.get(url, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve(JSON.parse(Buffer.concat(chunks).toString('utf8'))));
    }).on('error', reject);
  });
}

function device(hub, deviceId, cert) {
  const client = Client.fromConnectionString(`HostName=${hub.host};DeviceId=${deviceId};x509=true`, Mqtt);
  client.setOptions({ cert: pem(`${cert}.pem`), key: pem(`${cert}-key.pem`) });
  return client;
}

async function telemetryAndC2d(hub, service, deviceId, cert) {
  const how = `${deviceId} with ${cert}.pem`;
  const client = device(hub, deviceId, cert);
  const received = new Promise((resolve) => client.on('message', resolve));
  await withTimeout(client.open(), SDK_CALL_MS, `${how}: open`);
  check(`${how}: connected over MQTT/TLS`, true);
  const tag = crypto.randomBytes(4).toString('hex');
  await withTimeout(client.sendEvent(new Message(`reading ${tag}`)), SDK_CALL_MS, `${how}: sendEvent`);
  const seen = await getJson(`${env('IOTHUB_HTTP_URL')}/emulator/telemetry?deviceId=${encodeURIComponent(deviceId)}`);
  checkEqual(`${how}: telemetry recorded`, seen.filter((m) => m.body === `reading ${tag}`).length, 1);
  const msg = new Message(`command ${tag}`);
  msg.messageId = `c2d-${tag}`;
  await withTimeout(service.send(deviceId, msg), SDK_CALL_MS, `${how}: service send over AMQP`);
  const got = await withTimeout(received, RECEIVE_MS, `${how}: C2D`);
  checkEqual(`${how}: C2D payload`, got.data.toString(), `command ${tag}`);
  await withTimeout(client.complete(got), SDK_CALL_MS, `${how}: complete`);
  await withTimeout(client.close(), SDK_CALL_MS, `${how}: close`);
}

async function refused(hub, deviceId, cert, why) {
  const client = device(hub, deviceId, cert);
  try {
    await withTimeout(client.open(), SDK_CALL_MS, `${deviceId} with ${cert}.pem: open`);
  } catch (err) {
    check(`${deviceId} with ${cert}.pem refused (${why}): ${err.name}`, err.name === 'UnauthorizedError', err);
    return;
  }
  await client.close();
  fail(`${deviceId} with ${cert}.pem (${why}) connected`);
}

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  const registry = Registry.fromConnectionString(hub.connectionString);
  const sha1 = sha1Thumbprint('self');
  const selfSigned = { deviceId: 'x509-self', authentication: { x509Thumbprint: { primaryThumbprint: sha1 } } };
  const created = (await registry.create(selfSigned)).responseBody;
  checkEqual('Registry.create with a thumbprint: type', created.authentication.type, 'selfSigned');
  checkEqual('Registry.create: thumbprint as sent', created.authentication.x509Thumbprint.primaryThumbprint, sha1);
  const ca = (await registry.create({ deviceId: 'x509-ca', authentication: { type: 'certificateAuthority' } })).responseBody;
  checkEqual('Registry.create certificateAuthority: type', ca.authentication.type, 'certificateAuthority');
  checkEqual('POST /emulator/x509-cas', await postText(`${env('IOTHUB_HTTP_URL')}/emulator/x509-cas`, pem('ca.pem')), 201);

  const service = ServiceClient.fromConnectionString(hub.connectionString);
  await withTimeout(service.open(), SDK_CALL_MS, 'service client open');
  await telemetryAndC2d(hub, service, 'x509-self', 'self');
  await telemetryAndC2d(hub, service, 'x509-ca', 'ca-signed');
  await service.close();
  await refused(hub, 'x509-self', 'wrong', 'thumbprint not registered');
  await refused(hub, 'x509-ca', 'rogue', 'signed by an untrusted CA');
  finish(SCRIPT);
}

main().catch((err) => fail('unexpected error', err));
