// Module identities with the unmodified Node SDKs: azure-iothub's Registry (addModule, getModule,
// getModulesOnDevice, getModuleTwin, updateModuleTwin, removeModule) and Client.invokeDeviceMethod with a
// module id; azure-iot-device's ModuleClient.fromConnectionString over the Mqtt transport (client id
// `{device}/{module}`, a SAS for `{host}/devices/{device}/modules/{module}` signed with the module key).
// The module reads its twin, patches reported properties, receives a desired patch, answers a module
// method and sends telemetry the hub records with `iothub-connection-module-id`.
// Run by the Rust harness as `node tests/sdk/node/module_test.js`.
'use strict';

const { Registry, Client: ServiceClient } = require('azure-iothub');
const { ModuleClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { check, checkEqual, delay, env, fail, finish, hubConfig, startWatchdog, withTimeout } = require('./common');

const SCRIPT = 'module_test';
const WATCHDOG_S = 120;
const SDK_CALL_MS = 15000;

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  const httpUrl = env('IOTHUB_HTTP_URL');
  const deviceId = `${hub.devicePrefix}-node-edge`;
  const moduleId = 'filter';
  const registry = Registry.fromConnectionString(hub.connectionString);
  await withTimeout(registry.create({ deviceId }), SDK_CALL_MS, 'Registry.create');
  await withTimeout(registry.addModule({ deviceId, moduleId }), SDK_CALL_MS, 'Registry.addModule');
  const got = (await withTimeout(registry.getModule(deviceId, moduleId), SDK_CALL_MS, 'Registry.getModule'))
    .responseBody;
  checkEqual('getModule: moduleId', got.moduleId, moduleId);
  const key = got.authentication.symmetricKey.primaryKey;
  check('getModule: a generated primary key', typeof key === 'string' && key.length > 0, got);
  const list = (await withTimeout(registry.getModulesOnDevice(deviceId), SDK_CALL_MS, 'getModulesOnDevice'))
    .responseBody;
  checkEqual('getModulesOnDevice: the module', JSON.stringify(list.map((m) => m.moduleId)), `["${moduleId}"]`);

  const cs = `HostName=${hub.host};DeviceId=${deviceId};ModuleId=${moduleId};SharedAccessKey=${key}`;
  const client = ModuleClient.fromConnectionString(cs, Mqtt);
  client.on('error', (err) => fail('module client error', err));
  await withTimeout(client.open(), SDK_CALL_MS, 'ModuleClient.open');
  check('ModuleClient opened over MQTT', true);

  const twin = await withTimeout(client.getTwin(), SDK_CALL_MS, 'ModuleClient.getTwin');
  check('module getTwin: desired has $version', typeof twin.properties.desired.$version === 'number', twin.properties);
  await withTimeout(
    new Promise((resolve, reject) =>
      twin.properties.reported.update({ mode: 'strict' }, (err) => (err ? reject(err) : resolve())),
    ),
    SDK_CALL_MS,
    'reported.update',
  );
  const service = await withTimeout(registry.getModuleTwin(deviceId, moduleId), SDK_CALL_MS, 'getModuleTwin');
  checkEqual('getModuleTwin: reported mode from the module', service.responseBody.properties.reported.mode, 'strict');

  // The listener makes the SDK subscribe in the background, with no completion signal: patch until one arrives.
  const seen = [];
  twin.on('properties.desired', (p) => seen.push(p.threshold));
  let delivered = null;
  for (let attempt = 1; attempt <= 10 && delivered === null; attempt += 1) {
    const threshold = 10 + attempt;
    await withTimeout(
      registry.updateModuleTwin(deviceId, moduleId, { properties: { desired: { threshold } } }, '*'),
      SDK_CALL_MS,
      'updateModuleTwin',
    );
    const until = Date.now() + 1000;
    while (Date.now() < until && !seen.includes(threshold)) await delay(20);
    if (seen.includes(threshold)) delivered = threshold;
  }
  check('desired patch reached the module once it was subscribed', delivered !== null, seen);

  client.onMethod('reset', (request, response) => {
    response.send(200, { reset: request.payload.level }, (err) => err && fail('method response send', err));
  });
  const serviceClient = ServiceClient.fromConnectionString(hub.connectionString);
  const result = await withTimeout(
    serviceClient.invokeDeviceMethod(deviceId, moduleId, {
      methodName: 'reset',
      payload: { level: 3 },
      responseTimeoutInSeconds: 15,
      connectTimeoutInSeconds: 10,
    }),
    SDK_CALL_MS,
    'invokeDeviceMethod(deviceId, moduleId, …)',
  );
  checkEqual('module method: status from the module', result.result.status, 200);
  checkEqual('module method: payload from the module', JSON.stringify(result.result.payload), '{"reset":3}');

  await withTimeout(client.sendEvent(new Message('{"ok":true}')), SDK_CALL_MS, 'ModuleClient.sendEvent');
  const res = await fetch(`${httpUrl}/emulator/telemetry?deviceId=${encodeURIComponent(deviceId)}`);
  const events = await res.json();
  checkEqual('telemetry: one message', events.length, 1);
  checkEqual('telemetry: iothub-connection-module-id', events[0].moduleId, moduleId);
  await withTimeout(client.close(), SDK_CALL_MS, 'ModuleClient.close');

  await withTimeout(registry.removeModule(deviceId, moduleId), SDK_CALL_MS, 'Registry.removeModule');
  const after = (await withTimeout(registry.getModulesOnDevice(deviceId), SDK_CALL_MS, 'getModulesOnDevice'))
    .responseBody;
  checkEqual('removeModule: no modules left', after.length, 0);
  await withTimeout(registry.delete(deviceId), SDK_CALL_MS, 'Registry.delete');
  finish(SCRIPT);
}

main().catch((err) => fail('unexpected error', err));
