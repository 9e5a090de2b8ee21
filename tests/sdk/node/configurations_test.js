// Configurations (automatic device management) with the unmodified Node `azure-iothub` Registry
// (iothub-reference-2.md §6): addConfiguration (the SDK fills in schemaVersion "1.0"), the desired
// content reaching the tagged twin and not the other one, the twin's `configurations` status, the
// system metrics, getConfigurations (no `top`), updateConfiguration with the quoted etag and forced
// with "*", removeConfiguration taking the setting back, getConfiguration of a removed id failing
// with 404 ConfigurationNotFound, and a module configuration (moduleContent, FROM devices.modules)
// reaching the tagged module twin only (getModuleTwin) and counted in its metrics. Run by the Rust
// harness as `node tests/sdk/node/configurations_test.js`.
'use strict';

const { Registry } = require('azure-iothub');
const { check, checkEqual, delay, finish, hubConfig, startWatchdog, withTimeout } = require('./common');

const SCRIPT = 'configurations_test';
const WATCHDOG_S = 90;
const SDK_CALL_MS = 15000;
const WAIT_MS = 20000;

/** Asserts that two JSON values are equal (key order of objects counts, as the hub keeps it). */
function checkJson(what, actual, expected) {
  checkEqual(what, JSON.stringify(actual), JSON.stringify(expected));
}

/** Polls `probe` (async) until it returns a truthy value; fails the check after WAIT_MS. */
async function waitFor(what, probe) {
  const until = Date.now() + WAIT_MS;
  for (;;) {
    const value = await probe();
    if (value) {
      check(what, true);
      return value;
    }
    check(`${what} (within ${WAIT_MS} ms)`, Date.now() < until);
    await delay(50);
  }
}

async function main() {
  startWatchdog(WATCHDOG_S);
  const hub = hubConfig();
  const registry = Registry.fromConnectionString(hub.connectionString);
  const call = (p, what) => withTimeout(p, SDK_CALL_MS, what);
  const [tagged, other] = ['t', 'o'].map((s) => `${hub.devicePrefix}-cfg-${s}`);
  for (const id of [tagged, other]) {
    await call(registry.create({ deviceId: id }), 'Registry.create');
  }
  await call(registry.updateTwin(tagged, { tags: { ring: hub.devicePrefix } }, '*'), 'Registry.updateTwin');

  const id = `${hub.devicePrefix}-interval`.toLowerCase();
  const config = {
    id,
    content: { deviceContent: { 'properties.desired.telemetry': { interval: 7 } } },
    targetCondition: `tags.ring = '${hub.devicePrefix}'`,
    priority: 5,
    labels: { owner: 'node-test' },
    metrics: { queries: { tagged: `SELECT deviceId FROM devices WHERE tags.ring = '${hub.devicePrefix}'` } },
  };
  const added = await call(registry.addConfiguration(config), 'Registry.addConfiguration');
  checkEqual('addConfiguration: HTTP status', added.httpResponse.statusCode, 200);
  checkEqual('addConfiguration: schemaVersion the SDK filled in', added.responseBody.schemaVersion, '1.0');
  checkEqual('addConfiguration: priority', added.responseBody.priority, 5);

  const desired = async (dev) => (await call(registry.getTwin(dev), 'Registry.getTwin')).responseBody;
  const twin = await waitFor('the tagged twin gets desired.telemetry', async () => {
    const t = await desired(tagged);
    return t.properties.desired.telemetry ? t : null;
  });
  checkJson('desired.telemetry is the content', twin.properties.desired.telemetry, { interval: 7 });
  checkJson('twin configurations status', twin.configurations && twin.configurations[id], { status: 'applied' });
  checkEqual('the other twin is untouched', (await desired(other)).properties.desired.telemetry, undefined);

  const got = await waitFor('systemMetrics count the tagged device', async () => {
    const c = (await call(registry.getConfiguration(id), 'Registry.getConfiguration')).responseBody;
    return c.systemMetrics.results.appliedCount === 1 ? c : null;
  });
  checkJson('systemMetrics.results', got.systemMetrics.results, { targetedCount: 1, appliedCount: 1 });
  checkJson('custom metric', got.metrics.results, { tagged: 1 });

  const all = (await call(registry.getConfigurations(), 'Registry.getConfigurations')).responseBody;
  check('getConfigurations lists it', Array.isArray(all) && all.some((c) => c.id === id), all);

  got.labels = { owner: 'node-test', step: 'updated' };
  const updated = (await call(registry.updateConfiguration(got), 'Registry.updateConfiguration')).responseBody;
  checkJson('updateConfiguration (quoted etag): labels', updated.labels, got.labels);
  updated.priority = 6;
  const forced = (await call(registry.updateConfiguration(updated, true), 'Registry.updateConfiguration(force)'))
    .responseBody;
  checkEqual('updateConfiguration (forced, If-Match "*"): priority', forced.priority, 6);

  const removed = await call(registry.removeConfiguration(id), 'Registry.removeConfiguration');
  checkEqual('removeConfiguration: HTTP status', removed.httpResponse.statusCode, 204);
  await waitFor('the setting leaves the twin', async () => (await desired(tagged)).properties.desired.telemetry === undefined);
  const err = await call(registry.getConfiguration(id), 'Registry.getConfiguration').then(
    (r) => check('getConfiguration after remove rejects', false, r),
    (e) => e,
  );
  checkEqual('getConfiguration after remove: HTTP 404', err.response && err.response.statusCode, 404);
  check('getConfiguration after remove: ConfigurationNotFound', String(err.responseBody).includes('ErrorCode:ConfigurationNotFound;'), err.responseBody);

  await moduleConfiguration(registry, call, hub.devicePrefix, tagged);

  for (const dev of [tagged, other]) {
    await call(registry.delete(dev), 'Registry.delete');
  }
  finish(SCRIPT);
}

/** A module configuration (`moduleContent`, a condition over `devices.modules`): the tagged module twin of
 * `device` gets the content, its sibling does not, the system metrics count module twins, and removing the
 * configuration takes the content back. */
async function moduleConfiguration(registry, call, prefix, device) {
  for (const moduleId of ['m-tagged', 'm-other']) {
    await call(registry.addModule({ deviceId: device, moduleId }), 'Registry.addModule');
  }
  await call(registry.updateModuleTwin(device, 'm-tagged', { tags: { ring: prefix } }, '*'), 'Registry.updateModuleTwin');
  const id = `${prefix}-module`.toLowerCase();
  const config = {
    id,
    content: { moduleContent: { 'properties.desired.sampling': { rate: 3 } } },
    targetCondition: `FROM devices.modules WHERE tags.ring = '${prefix}'`,
    priority: 1,
    metrics: { queries: { tagged: `SELECT deviceId, moduleId FROM devices.modules WHERE tags.ring = '${prefix}'` } },
  };
  const added = await call(registry.addConfiguration(config), 'Registry.addConfiguration(moduleContent)');
  checkJson('addConfiguration: moduleContent echoed', added.responseBody.content, config.content);
  const moduleTwin = async (m) => (await call(registry.getModuleTwin(device, m), 'Registry.getModuleTwin')).responseBody;
  const twin = await waitFor('the tagged module twin gets desired.sampling', async () => {
    const t = await moduleTwin('m-tagged');
    return t.properties.desired.sampling ? t : null;
  });
  checkJson('module twin desired.sampling is the content', twin.properties.desired.sampling, { rate: 3 });
  checkJson('module twin configurations status', twin.configurations && twin.configurations[id], { status: 'applied' });
  checkEqual('the sibling module twin is untouched', (await moduleTwin('m-other')).properties.desired.sampling, undefined);
  const got = await waitFor('systemMetrics count the module twin', async () => {
    const c = (await call(registry.getConfiguration(id), 'Registry.getConfiguration')).responseBody;
    return c.systemMetrics.results.appliedCount === 1 ? c : null;
  });
  checkJson('module configuration systemMetrics.results', got.systemMetrics.results, { targetedCount: 1, appliedCount: 1 });
  checkJson('module configuration custom metric over devices.modules', got.metrics.results, { tagged: 1 });
  await call(registry.removeConfiguration(id), 'Registry.removeConfiguration(module)');
  await waitFor('the setting leaves the module twin', async () => (await moduleTwin('m-tagged')).properties.desired.sampling === undefined);
}

main().catch((err) => {
  check('unexpected error', false, err);
});
