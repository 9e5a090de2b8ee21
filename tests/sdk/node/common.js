// Shared helpers for the Node SDK test scripts run by the Rust harness (tests/sdk/node/*.js).
//
// Owns the harness contract (environment variables, one output line per check, a whole-run watchdog,
// exit 1 on the first failure) and the few raw REST calls the SDKs cannot make: the emulator's C2D
// send extension and HTTP feedback. Everything else in the scripts goes through the unmodified SDKs.
'use strict';

const http = require('http');
const https = require('https');

/** How long one call to the admin API may take. */
const ADMIN_CALL_MS = 30000;
const { ConnectionString, SharedAccessSignature, anHourFromNow, endpoint } = require('azure-iot-common');

/** api-version the Node SDKs send (`2021-04-12`, azure-iot-common/dist/endpoint.js:7). */
const API_VERSION = endpoint.apiVersion;

/** Per-request bound for raw REST calls, so one stuck request fails fast with a clear message. */
const REQUEST_TIMEOUT_MS = 15000;

let checksPassed = 0;

/** Prints a failure line and exits 1; the single exit path for every failed check. */
function fail(what, detail) {
  const extra = detail === undefined ? '' : ': ' + describe(detail);
  process.stdout.write(`FAIL - ${what}${extra}\n`);
  process.exit(1);
}

function describe(detail) {
  if (detail instanceof Error) {
    const status = detail.response && detail.response.statusCode;
    const body = detail.responseBody ? ` body=${String(detail.responseBody).slice(0, 300)}` : '';
    return `${detail.name}: ${detail.message}${status ? ` (HTTP ${status})` : ''}${body}`;
  }
  return typeof detail === 'string' ? detail : JSON.stringify(detail);
}

/** Records one passed check (one output line), or fails the run when `ok` is false. */
function check(what, ok, detail) {
  if (!ok) fail(what, detail);
  checksPassed += 1;
  process.stdout.write(`ok - ${what}\n`);
}

/** Asserts strict equality with a message that shows both values. */
function checkEqual(what, actual, expected) {
  check(what, actual === expected, `expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
}

/** Ends the run successfully after printing how many checks passed. */
function finish(script) {
  process.stdout.write(`${script}: all ${checksPassed} checks passed\n`);
  process.exit(0);
}

/** Returns a required environment variable or fails naming it. */
function env(name) {
  const value = process.env[name];
  if (!value) fail(`environment variable ${name} is required (set by the Rust SDK test harness)`);
  return value;
}

/** Bounds the whole script: after `seconds` it fails instead of hanging the harness. */
function startWatchdog(seconds) {
  const timer = setTimeout(() => fail(`watchdog: script exceeded ${seconds} s overall`), seconds * 1000);
  process.on('unhandledRejection', (err) => fail('unhandled promise rejection', err));
  process.on('uncaughtException', (err) => fail('uncaught exception', err));
  return timer;
}

/** Races `promise` against a deadline so a hung SDK call names itself instead of tripping the watchdog. */
function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Resolves after `ms`; used only as the pause between polls that have their own deadline. */
function delay(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Hub settings derived from the harness environment. */
function hubConfig() {
  const connectionString = env('IOTHUB_CONNECTION_STRING');
  let cn;
  try {
    cn = ConnectionString.parse(connectionString, ['HostName', 'SharedAccessKeyName', 'SharedAccessKey']);
  } catch (err) {
    fail('IOTHUB_CONNECTION_STRING is not a service connection string', err);
  }
  env('NODE_EXTRA_CA_CERTS');
  return {
    connectionString,
    host: env('IOTHUB_HOSTNAME'),
    keyName: cn.SharedAccessKeyName,
    key: cn.SharedAccessKey,
    devicePrefix: env('TEST_DEVICE_PREFIX'),
  };
}

/** A hub-scoped service SAS signed exactly as azure-iothub signs its own REST calls. */
function serviceSas(hub) {
  return SharedAccessSignature.create(hub.host, hub.keyName, hub.key, anHourFromNow()).toString();
}

/**
 * One HTTPS request to the hub on port 443 (trusting the CA through NODE_EXTRA_CA_CERTS).
 * Resolves with `{ status, headers, body }` (body is a Buffer); never retries.
 */
function rest(hub, method, path, { headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const sep = path.includes('?') ? '&' : '?';
    const req = https.request(
      {
        host: hub.host,
        port: 443,
        method,
        path: `${path}${sep}api-version=${API_VERSION}`,
        headers: { Authorization: serviceSas(hub), ...headers },
        agent: false,
        timeout: REQUEST_TIMEOUT_MS,
      },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${path} timed out after ${REQUEST_TIMEOUT_MS} ms`)));
    req.on('error', reject);
    req.end(body === undefined ? undefined : body);
  });
}

/** Parses a JSON body or fails naming the request. */
function jsonBody(what, res) {
  try {
    return JSON.parse(res.body.toString('utf8'));
  } catch (err) {
    return fail(`${what}: body is not JSON`, res.body.toString('utf8').slice(0, 300));
  }
}

/**
 * Checks an IoT Hub error response: the HTTP status, the `iothub-errorcode` header and the legacy body
 * `{"Message":"ErrorCode:<code>;...","ExceptionMessage":"..."}` (iothub-reference.md §2.9).
 */
function checkHubError(what, res, status, code) {
  checkEqual(`${what}: HTTP status`, res.status, status);
  checkEqual(`${what}: iothub-errorcode header`, res.headers['iothub-errorcode'], code);
  const body = jsonBody(what, res);
  check(`${what}: body is a JSON object`, body !== null && typeof body === 'object', body);
  const message = body.Message;
  check(
    `${what}: body Message starts with "ErrorCode:${code};"`,
    typeof message === 'string' && message.startsWith(`ErrorCode:${code};`),
    body,
  );
  check(`${what}: body has a string ExceptionMessage`, typeof body.ExceptionMessage === 'string', body);
}

/**
 * One call to the emulator's admin API on the plain HTTP port `base`: resolves with the JSON body
 * (or `{status, text}` when a status other than 200 is expected), rejects on any other status.
 */
function admin(base, method, path, body, expectStatus = 200) {
  return withTimeout(
    new Promise((resolve, reject) => {
      const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
      const req = http.request(
        `${base}${path}`,
        { method, headers: data ? { 'content-type': 'application/json', 'content-length': data.length } : {} },
        (res) => {
          const chunks = [];
          res.on('data', (c) => chunks.push(c));
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            if (res.statusCode !== expectStatus) {
              reject(new Error(`${method} ${path}: HTTP ${res.statusCode} (expected ${expectStatus}): ${text}`));
            } else if (expectStatus !== 200) {
              resolve({ status: res.statusCode, text });
            } else {
              resolve(JSON.parse(text));
            }
          });
        },
      );
      req.on('error', reject);
      req.end(data);
    }),
    ADMIN_CALL_MS,
    `${method} ${path}`,
  );
}

module.exports = {
  admin,
  API_VERSION,
  check,
  checkEqual,
  checkHubError,
  delay,
  env,
  fail,
  finish,
  hubConfig,
  jsonBody,
  rest,
  serviceSas,
  startWatchdog,
  withTimeout,
};
