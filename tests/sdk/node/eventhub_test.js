// The built-in Event Hub-compatible endpoint with the unmodified Node `@azure/event-hubs` SDK, fed by a
// device using the unmodified `azure-iot-device-mqtt` SDK.
//
// 1. The device sends a first batch; the latest enqueued time over all partitions (from
//    `getPartitionProperties`) is taken; the device sends a second batch. `EventHubConsumerClient.subscribe`
//    starting from that enqueued time must see exactly the second batch, with bodies, application
//    properties and the IoT Hub annotations.
// 2. Two consumer groups (`$Default` and one created through the emulator's REST route) each see every
//    message from the start.
// 3. The IoT Hub connection string is turned into the Event Hubs one by following IoT Hub's
//    `amqp:link:redirect`, exactly as the SDK's `iothubConnectionString.ts` sample does (rhea-promise,
//    SASL PLAIN, source `amqps://{host}/messages/events/$management`); a consumer from it sees the messages.
// 4. Owner level: a receiver with ownerLevel 2 on the device's partition evicts one with ownerLevel 1,
//    whose processError gets `ReceiverDisconnectedError` (amqp:link:stolen).
//
// Run by the Rust harness as `node tests/sdk/node/eventhub_test.js`; one line per check, exit 1 on the
// first failure.
'use strict';

const crypto = require('crypto');
const { Registry } = require('azure-iothub');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { EventHubConsumerClient, earliestEventPosition } = require('@azure/event-hubs');
const { Connection, ReceiverEvents, parseConnectionString, isAmqpError } = require('rhea-promise');
const { admin, check, checkEqual, env, fail, finish, hubConfig, startWatchdog, withTimeout, delay } =
  require('./common');

const SCRIPT = 'eventhub_test';
const SDK_CALL_MS = 30000;
const RECEIVE_MS = 30000;
const BATCH = 3;
const GROUP = 'backend';

async function sendBatch(client, deviceId, tag) {
  for (let i = 0; i < BATCH; i += 1) {
    const m = new Message(JSON.stringify({ tag, i }));
    m.messageId = `${deviceId}-${tag}-${i}`;
    m.contentType = 'application/json';
    m.contentEncoding = 'utf-8';
    m.properties.add('batch', tag);
    m.properties.add('firmwareChannel', 'beta');
    await withTimeout(client.sendEvent(m), SDK_CALL_MS, `sendEvent ${tag}-${i}`);
  }
  check(`device ${deviceId} sent batch ${tag} over MQTT`, true);
}

/** Subscribes to every partition from `startPosition` until `want` events of `deviceId` arrived. */
async function collect(ehCs, group, startPosition, deviceId, want, what) {
  const client = new EventHubConsumerClient(group, ehCs);
  const got = [];
  let done;
  const finished = new Promise((resolve) => { done = resolve; });
  const subscription = client.subscribe(
    {
      processEvents: async (events) => {
        for (const e of events) {
          if (e.systemProperties && e.systemProperties['iothub-connection-device-id'] === deviceId) got.push(e);
        }
        if (got.length >= want) done();
      },
      processError: async (err, ctx) => fail(`${what}: processError on partition ${ctx.partitionId}`, err),
    },
    { startPosition, maxWaitTimeInSeconds: 1 },
  );
  await Promise.race([finished, delay(RECEIVE_MS)]);
  await subscription.close();
  await client.close();
  checkEqual(`${what}: events received from ${deviceId}`, got.length, want);
  return got;
}

function checkEvent(what, e, tag, i, deviceId) {
  checkEqual(`${what}: body`, JSON.stringify(e.body), JSON.stringify({ tag, i }));
  checkEqual(`${what}: application property batch`, e.properties && e.properties.batch, tag);
  checkEqual(`${what}: application property firmwareChannel keeps its case`, e.properties && e.properties.firmwareChannel, 'beta');
  checkEqual(`${what}: message id`, e.messageId, `${deviceId}-${tag}-${i}`);
  checkEqual(`${what}: content type`, e.contentType, 'application/json');
  checkEqual(`${what}: iothub-message-source`, e.systemProperties['iothub-message-source'], 'Telemetry');
  check(`${what}: iothub-connection-auth-method`, /"scope":"device"/.test(e.systemProperties['iothub-connection-auth-method']),
    e.systemProperties);
  check(`${what}: enqueued time`, e.enqueuedTimeUtc instanceof Date, e.enqueuedTimeUtc);
  check(`${what}: offset and sequence number`, typeof e.offset !== 'undefined' && Number.isInteger(e.sequenceNumber), e);
}

// From the SDK sample (samples-dev/iothubConnectionString.ts), unchanged but for the connection string
// source and the CA trust (NODE_EXTRA_CA_CERTS).
function generateSasToken(resourceUri, signingKey, policyName, expiresInMins) {
  resourceUri = encodeURIComponent(resourceUri);
  const expiresInSeconds = Math.ceil(Date.now() / 1000 + expiresInMins * 60);
  const toSign = resourceUri + '\n' + expiresInSeconds;
  const hmac = crypto.createHmac('sha256', Buffer.from(signingKey, 'base64'));
  hmac.update(toSign);
  const base64UriEncoded = encodeURIComponent(hmac.digest('base64'));
  return `SharedAccessSignature sr=${resourceUri}&sig=${base64UriEncoded}&se=${expiresInSeconds}&skn=${policyName}`;
}

async function convertIotHubToEventHubsConnectionString(connectionString) {
  const { HostName, SharedAccessKeyName, SharedAccessKey } = parseConnectionString(connectionString);
  const [iotHubName] = HostName.split('.');
  const token = generateSasToken(`${HostName}/messages/events`, SharedAccessKey, SharedAccessKeyName, 5);
  const connection = new Connection({
    transport: 'tls',
    host: HostName,
    hostname: HostName,
    username: `${SharedAccessKeyName}@sas.root.${iotHubName}`,
    port: 5671,
    reconnect: false,
    password: token,
  });
  await connection.open();
  const receiver = await connection.createReceiver({
    source: { address: `amqps://${HostName}/messages/events/$management` },
  });
  return new Promise((resolve, reject) => {
    receiver.on(ReceiverEvents.receiverError, (context) => {
      const error = context.receiver && context.receiver.error;
      if (isAmqpError(error) && error.condition === 'amqp:link:redirect' && error.info) {
        const hostname = error.info.hostname;
        const iotAddress = error.info.address;
        const regex = /:\d+\/(.*)\/\$management/i;
        const regexResults = regex.exec(iotAddress);
        if (!hostname || !regexResults) {
          reject(error);
        } else {
          const eventHubName = regexResults[1];
          resolve(
            `Endpoint=sb://${hostname}/;EntityPath=${eventHubName};SharedAccessKeyName=${SharedAccessKeyName};SharedAccessKey=${SharedAccessKey}`,
          );
        }
      } else {
        reject(error);
      }
      connection.close().catch(() => {});
    });
  });
}

async function ownerLevel(ehCs, partitionId) {
  const first = new EventHubConsumerClient('$Default', ehCs);
  const second = new EventHubConsumerClient('$Default', ehCs);
  let evicted;
  const evictedError = new Promise((resolve) => { evicted = resolve; });
  let firstRead;
  const firstReading = new Promise((resolve) => { firstRead = resolve; });
  const sub1 = first.subscribe(
    partitionId,
    {
      processEvents: async (events) => { if (events.length) firstRead(); },
      processError: async (err) => evicted(err),
    },
    { ownerLevel: 1, startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 },
  );
  // Events arriving prove the ownerLevel 1 link is attached before the second one comes.
  await withTimeout(firstReading, SDK_CALL_MS, 'the ownerLevel 1 receiver reading');
  check('ownerLevel 1 receiver: reads the partition', true);
  let secondGot;
  const secondEvents = new Promise((resolve) => { secondGot = resolve; });
  const sub2 = second.subscribe(
    partitionId,
    {
      processEvents: async (events) => { if (events.length) secondGot(events.length); },
      processError: async (err) => fail('the ownerLevel 2 receiver got an error', err),
    },
    { ownerLevel: 2, startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 },
  );
  const err = await withTimeout(evictedError, SDK_CALL_MS, 'the ownerLevel 1 receiver being evicted');
  checkEqual('ownerLevel 1 receiver: evicted with ReceiverDisconnectedError', err.code || err.name, 'ReceiverDisconnectedError');
  const n = await withTimeout(secondEvents, SDK_CALL_MS, 'the ownerLevel 2 receiver reading');
  check('ownerLevel 2 receiver: reads the partition', n > 0, n);
  await sub1.close();
  await sub2.close();
  await first.close();
  await second.close();
}

async function main() {
  startWatchdog(170);
  const hub = hubConfig();
  const base = env('IOTHUB_HTTP_URL');
  const deviceId = `${hub.devicePrefix}-ehnode`;
  const registry = Registry.fromConnectionString(hub.connectionString);
  const created = await withTimeout(registry.create({ deviceId }), SDK_CALL_MS, 'Registry.create');
  const key = created.responseBody.authentication.symmetricKey.primaryKey;
  const device = Client.fromConnectionString(`HostName=${hub.host};DeviceId=${deviceId};SharedAccessKey=${key}`, Mqtt);
  await withTimeout(device.open(), SDK_CALL_MS, 'device open');

  const strings = await admin(base, 'GET', '/emulator/connection-strings');
  const ehCs = strings.eventHubCompatible;
  check('the emulator lists an Event Hub-compatible connection string', /^Endpoint=sb:\/\//.test(ehCs), strings);
  await admin(base, 'PUT', `/emulator/consumer-groups/${GROUP}`, undefined, 201);
  check(`consumer group ${GROUP} created`, true);

  await sendBatch(device, deviceId, 'old');
  const probe = new EventHubConsumerClient('$Default', ehCs);
  const ids = await withTimeout(probe.getPartitionIds(), SDK_CALL_MS, 'getPartitionIds');
  checkEqual('getPartitionIds', JSON.stringify(ids), JSON.stringify(['0', '1', '2', '3']));
  let since = new Date(0);
  let devicePartition;
  for (const id of ids) {
    const p = await withTimeout(probe.getPartitionProperties(id), SDK_CALL_MS, `getPartitionProperties ${id}`);
    if (!p.isEmpty && p.lastEnqueuedOnUtc > since) {
      since = p.lastEnqueuedOnUtc;
      devicePartition = id;
    }
  }
  const props = await withTimeout(probe.getEventHubProperties(), SDK_CALL_MS, 'getEventHubProperties');
  check('getEventHubProperties: name and created time', props.name.length > 0 && props.createdOn instanceof Date, props);
  await probe.close();
  check('the device batch is in a partition with an enqueued time', devicePartition !== undefined, since);
  // Enqueued times have millisecond resolution: start the second batch on a later millisecond.
  await delay(20);
  await sendBatch(device, deviceId, 'new');
  await device.close();

  const fresh = await collect(ehCs, '$Default', { enqueuedOn: since }, deviceId, BATCH, 'subscribe from an enqueued time');
  fresh.forEach((e, i) => checkEvent(`event new-${i}`, e, 'new', i, deviceId));

  for (const group of ['$Default', GROUP]) {
    const all = await collect(ehCs, group, earliestEventPosition, deviceId, 2 * BATCH, `consumer group ${group} from the start`);
    checkEqual(`consumer group ${group}: first event is old-0`, all[0].messageId, `${deviceId}-old-0`);
  }

  const redirected = await withTimeout(convertIotHubToEventHubsConnectionString(hub.connectionString), SDK_CALL_MS,
    'following the IoT Hub redirect');
  const want = parseConnectionString(ehCs);
  const gotCs = parseConnectionString(redirected);
  checkEqual('the redirect names the Event Hub-compatible host', gotCs.Endpoint, want.Endpoint);
  checkEqual('the redirect names the Event Hub-compatible entity', gotCs.EntityPath, want.EntityPath);
  await collect(redirected, '$Default', earliestEventPosition, deviceId, 2 * BATCH, 'a consumer built from the redirect');

  await ownerLevel(ehCs, devicePartition);
  finish(SCRIPT);
}

main().catch((err) => fail('unexpected error', err));
