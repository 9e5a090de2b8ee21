// Device Provisioning Service with the unmodified Node SDKs: azure-iot-provisioning-service creates an
// enrollment group (symmetric key, initial twin) and an individual enrollment (its own key and device id) through
// the emulator's DPS service API; azure-iot-provisioning-device with azure-iot-provisioning-device-mqtt and
// azure-iot-security-symmetric-key registers a group device with its derived key, and with
// azure-iot-provisioning-device-http registers the individual one; each then connects to the returned assignedHub
// with azure-iot-device-mqtt and sends telemetry. Also: the group device's twin carries the initial tags, the
// service queries and deletes enrollments, and a key not derived for the registration id is refused. Run by the
// Rust harness as `node tests/sdk/node/dps_test.js`.
'use strict';

const crypto = require('crypto');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt: ProvMqtt } = require('azure-iot-provisioning-device-mqtt');
const { Http: ProvHttp } = require('azure-iot-provisioning-device-http');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { Registry } = require('azure-iothub');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { check, checkEqual, env, fail, finish, startWatchdog, withTimeout } = require('./common');

const SCRIPT = 'dps_test';
const WATCHDOG_S = 120;
const SDK_CALL_MS = 30000;

const derive = (groupKey, registrationId) =>
  crypto.createHmac('sha256', Buffer.from(groupKey, 'base64')).update(registrationId, 'utf8').digest('base64');

function register(host, scope, Transport, registrationId, key) {
  const client = ProvisioningDeviceClient.create(host, scope, new Transport(), new SymmetricKeySecurityClient(registrationId, key));
  return withTimeout(client.register(), SDK_CALL_MS, `register ${registrationId}`);
}

async function connectAndSend(result, key, what) {
  const cs = `HostName=${result.assignedHub};DeviceId=${result.deviceId};SharedAccessKey=${key}`;
  const client = Client.fromConnectionString(cs, Mqtt);
  await withTimeout(client.open(), SDK_CALL_MS, `${what}: open`);
  check(`${what}: connected to the assigned hub`, true);
  await withTimeout(client.sendEvent(new Message(JSON.stringify({ from: what }))), SDK_CALL_MS, `${what}: sendEvent`);
  check(`${what}: telemetry accepted`, true);
  await client.close();
}

async function main() {
  startWatchdog(WATCHDOG_S);
  const host = env('IOTHUB_HOSTNAME');
  const scope = env('DPS_ID_SCOPE');
  const prefix = env('TEST_DEVICE_PREFIX');
  const service = ProvisioningServiceClient.fromConnectionString(env('DPS_CONNECTION_STRING'));
  const registry = Registry.fromConnectionString(env('IOTHUB_CONNECTION_STRING'));

  const groupKey = crypto.createHash('sha256').update(prefix).digest('base64');
  const groupId = `${prefix}-group`;
  const { responseBody: group } = await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId: groupId,
    attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: groupKey, secondaryKey: groupKey } },
    provisioningStatus: 'enabled',
    initialTwin: { tags: { fleet: 'node' }, properties: { desired: { mode: 'eco' } } },
  });
  checkEqual('createOrUpdateEnrollmentGroup: stored', group.enrollmentGroupId, groupId);
  const { responseBody: fetched } = await service.getEnrollmentGroup(groupId);
  checkEqual('getEnrollmentGroup: the key', fetched.attestation.symmetricKey.primaryKey, groupKey);

  const registrationId = `${prefix}-mqtt-1`;
  const deviceKey = derive(groupKey, registrationId);
  const assigned = await register(host, scope, ProvMqtt, registrationId, deviceKey);
  checkEqual('MQTT register: status', assigned.status, 'assigned');
  checkEqual('MQTT register: assignedHub', assigned.assignedHub, host);
  checkEqual('MQTT register: deviceId', assigned.deviceId, registrationId);
  await connectAndSend(assigned, deviceKey, 'group device');
  const { responseBody: twin } = await registry.getTwin(registrationId);
  checkEqual('group device twin: initial tags', twin.tags.fleet, 'node');
  checkEqual('group device twin: initial desired', twin.properties.desired.mode, 'eco');

  const individualId = `${prefix}-http-1`;
  const { responseBody: individual } = await service.createOrUpdateIndividualEnrollment({
    registrationId: individualId,
    deviceId: `${prefix}-thermo`,
    attestation: { type: 'symmetricKey' },
  });
  const individualKey = individual.attestation.symmetricKey.primaryKey;
  check('createOrUpdateIndividualEnrollment: a key was generated', typeof individualKey === 'string' && individualKey.length > 0);
  const httpAssigned = await register(host, scope, ProvHttp, individualId, individualKey);
  checkEqual('HTTP register: deviceId from the individual enrollment', httpAssigned.deviceId, `${prefix}-thermo`);
  await connectAndSend(httpAssigned, individualKey, 'individual device');

  const query = service.createIndividualEnrollmentQuery({ query: '*' });
  const { responseBody: page } = await query.next();
  check('individual enrollment query lists it', page.some((e) => e.registrationId === individualId), page);
  await service.deleteIndividualEnrollment(individualId);
  let gone;
  try {
    await service.getIndividualEnrollment(individualId);
  } catch (err) {
    gone = err;
  }
  check('deleted individual enrollment: get fails', gone !== undefined, 'getIndividualEnrollment succeeded');

  let refused;
  try {
    await register(host, scope, ProvMqtt, `${prefix}-mqtt-2`, groupKey);
  } catch (err) {
    refused = err;
  }
  check(`a key not derived for the registration is refused (${refused && refused.name})`, refused !== undefined, 'register succeeded');
  await service.deleteEnrollmentGroup(groupId);
  finish(SCRIPT);
}

main().catch((err) => fail('unexpected error', err));
