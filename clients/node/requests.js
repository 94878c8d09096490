'use strict';
// What a caller sends: a DecisionRequest built from plain JS values (decisionRequest) and the checks that refuse
// what protobufjs would otherwise send silently wrong (checkDecisionRequest), naming the field. No gRPC here;
// clients/node/aios_client.js exports all of it.

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;

// A lone surrogate (half an emoji after a slice at a UTF-16 index) cannot be encoded as UTF-8: protobufjs
// would send bytes the kernel can only refuse as "String field had bad UTF-8", without saying which field.
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

function checkString(s, field) {
  const wellFormed = typeof s.isWellFormed === 'function' ? s.isWellFormed() : !LONE_SURROGATE.test(s);
  if (!wellFormed) {
    const at = s.search(LONE_SURROGATE);
    throw new TypeError(`${field} is not well-formed UTF-16 (a lone surrogate at index ${at}), so it cannot be `
      + 'sent as UTF-8; cut strings at code points (Array.from(s)), or use s.toWellFormed()');
  }
  return s;
}

function checkInt64(x, field) {
  if (x < INT64_MIN || x > INT64_MAX) {
    throw new RangeError(`${field} = ${x} is outside int64 (-(2^63) .. 2^63 - 1): it would be sent wrapped modulo 2^64`);
  }
  return x;
}

// A protobuf Value from a JS value. JS has one number type, so an int64 is asked for explicitly with a
// BigInt (28n) and sent as a decimal string (longs: String); `field` names the field in errors.
function toValue(x, field = 'value') {
  switch (typeof x) {
    case 'boolean': return { bool_value: x };
    case 'bigint': return { int_value: checkInt64(x, field).toString() };
    case 'number': return { number_value: Object.is(x, -0) ? 0 : x }; // -0 and 0 are one value to a caller
    case 'string': return { string_value: checkString(x, field) };
    default:
      throw new TypeError(`${field}: a field value must be boolean, bigint, number or string, got ${x === null ? 'null' : typeof x}`);
  }
}

// A DecisionRequest from plain objects: {claim_amount: 800, prior_claims: 0n, ...} and
// {description: '...'}; `options` any other DecisionRequest field (tenant, request_id, idempotency_key,
// priority, timeout_ms), spelled as in the .proto: an unknown key (idempotencyKey) is refused, not dropped.
function decisionRequest(pipeline, fields, textFields = {}, options = {}) {
  if (fields === null || typeof fields !== 'object') throw new TypeError('fields must be an object of field values');
  const typed = {};
  for (const [name, value] of Object.entries(fields)) {
    checkString(name, `a field name (${JSON.stringify(name)})`);
    typed[name] = toValue(value, `field '${name}'`);
  }
  for (const key of Object.keys(options || {})) {
    if (key === 'pipeline' || key === 'fields' || key === 'text_fields') {
      throw new TypeError(`options.${key}: give ${key} as decisionRequest's own argument, not as an option`);
    }
  }
  const request = { pipeline, fields: typed, text_fields: { ...(textFields || {}) }, ...(options || {}) };
  checkDecisionRequest(request);
  return request;
}

// The kinds a Value holds one of (kernel.proto's oneof). A hand-built request with a plain value (claim_amount: 800)
// failed in protobufjs as grpc-js's INTERNAL "Request message serialization failure", which reads as the kernel's
// fault; one with two kinds set went out with both, and the kernel read only the last; a misspelt kind
// (numberValue) was dropped, leaving an empty Value.
const VALUE_KINDS = ['string_value', 'number_value', 'int_value', 'bool_value'];

function checkValueShape(value, label) {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    const shown = value === null ? 'null' : Array.isArray(value) ? 'an array' : `${typeof value} ${String(value)}`;
    throw new TypeError(`${label} must be a Value object ({ number_value: 800 }, { int_value: '28' }, { string_value: 'gold' } `
      + `or { bool_value: true }), got ${shown}; decisionRequest() and toValue() build them from plain values`);
  }
  for (const key of Object.keys(value)) {
    if (VALUE_KINDS.includes(key)) continue;
    const spelled = snakeCase(key);
    const hint = VALUE_KINDS.includes(spelled) ? `; did you mean '${spelled}'?` : '';
    throw new TypeError(`${label}: '${key}' is not a Value kind${hint} (the kinds are ${VALUE_KINDS.join(', ')})`);
  }
  const kinds = VALUE_KINDS.filter((kind) => value[kind] !== undefined && value[kind] !== null);
  if (kinds.length > 1) {
    throw new TypeError(`${label} sets ${kinds.join(' and ')}: a Value holds one kind (both would be sent, and the kernel `
      + 'would read only the last)');
  }
}

const REQUEST_STRINGS = ['pipeline', 'tenant', 'request_id', 'idempotency_key'];
// Every DecisionRequest field (kernel.proto): protobufjs drops any other key without a word, so a
// caller's `idempotencyKey` would silently go out without its idempotency.
const REQUEST_KEYS = new Set([...REQUEST_STRINGS, 'fields', 'text_fields', 'priority', 'timeout_ms']);
const UINT32_MAX = 2n ** 32n - 1n;
const UINT64_MAX = 2n ** 64n - 1n;

function snakeCase(key) { return key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`); }

// An unsigned integer field as protobufjs would NOT change it: it sends priority 'high' as 0 and -1 as
// 4294967295, timeout_ms -5 as 0, without a word. priority (uint32): a whole number; timeout_ms (uint64): a
// whole number, a BigInt or a decimal string. Absent (undefined or null) is the field's default.
function checkUnsigned(value, max, field, wide) {
  if (value === undefined || value === null) return; // absent, as protobufjs reads null
  let big;
  if (typeof value === 'number' && Number.isSafeInteger(value)) big = BigInt(value);
  else if (wide && typeof value === 'bigint') big = value;
  else if (wide && typeof value === 'string' && /^[0-9]{1,20}$/.test(value)) big = BigInt(value);
  else {
    const shown = typeof value === 'string' ? JSON.stringify(value) : `${String(value)}${typeof value === 'bigint' ? 'n' : ''}`;
    throw new TypeError(`${field} must be a whole number >= 0${wide ? ' (a number, a BigInt or a decimal string)' : ''}, got ${shown}`);
  }
  if (big < 0n || big > max) throw new RangeError(`${field} = ${big} is outside 0 .. ${max}`);
}

// What protobufjs would send silently wrong (or fail to send, as a misleading INTERNAL), refused here with the
// field's name: a key that is not a DecisionRequest field, a field value that is not a Value of one kind, lone
// surrogates in any string, a string field or text value that is not a string, a priority or timeout_ms that is
// not a whole number in range, an int_value outside int64 (a BigInt, a decimal string, or a number that is not a
// safe integer).
function checkDecisionRequest(request, where = 'request') {
  if (request === null || typeof request !== 'object') throw new TypeError(`${where} must be a DecisionRequest object`);
  for (const key of Object.keys(request)) {
    if (REQUEST_KEYS.has(key)) continue;
    const spelled = snakeCase(key);
    const hint = REQUEST_KEYS.has(spelled) ? `; did you mean '${spelled}'? (field names are spelled as in the .proto)` : '';
    throw new TypeError(`${where}: '${key}' is not a DecisionRequest field${hint}; the fields are ${[...REQUEST_KEYS].join(', ')}`);
  }
  for (const key of REQUEST_STRINGS) {
    const value = request[key];
    if (value === undefined || value === null) continue; // absent, as protobufjs reads null
    if (typeof value !== 'string') throw new TypeError(`${where}.${key} must be a string, got ${value === null ? 'null' : typeof value}`);
    checkString(value, `${where}.${key}`);
  }
  checkUnsigned(request.priority, UINT32_MAX, `${where}.priority`, false);
  checkUnsigned(request.timeout_ms, UINT64_MAX, `${where}.timeout_ms`, true);
  for (const [name, value] of Object.entries(request.fields || {})) {
    checkString(name, `${where}.fields key ${JSON.stringify(name)}`);
    checkValueShape(value, `field '${name}'`);
    if (value && typeof value === 'object') {
      const label = `field '${name}'`;
      if (typeof value.string_value === 'string') checkString(value.string_value, label);
      const iv = value.int_value;
      if (typeof iv === 'bigint') checkInt64(iv, label);
      else if (typeof iv === 'number' && !Number.isSafeInteger(iv)) {
        throw new RangeError(`${label}: int_value ${iv} is not a safe integer; send a BigInt or a decimal string`);
      } else if (typeof iv === 'string') {
        if (!/^-?[0-9]{1,20}$/.test(iv)) throw new RangeError(`${label}: int_value ${JSON.stringify(iv)} is not a decimal integer`);
        checkInt64(BigInt(iv), label);
      }
    }
  }
  for (const [name, text] of Object.entries(request.text_fields || {})) {
    checkString(name, `${where}.text_fields key ${JSON.stringify(name)}`);
    if (typeof text !== 'string') {
      throw new TypeError(`text field '${name}' must be a string, got ${text === null ? 'null' : typeof text} (it would be sent as ${JSON.stringify(String(text))})`);
    }
    checkString(text, `text field '${name}'`);
  }
  return request;
}

// call()'s request, checked at its top level against the RPC's request message (`definition`: the grpc-js method
// definition's requestType, as @grpc/proto-loader describes it): protobufjs drops a key it does not know without a
// word, so ListTasks' `pageToken` asked for the first page again and again, and StartTask's request is a
// DecisionRequest, held to checkDecisionRequest as decide() holds its own.
function checkRequestKeys(definition, request, rpc) {
  if (request === null || typeof request !== 'object' || !definition || !definition.type) return;
  const fields = definition.type.field.map((field) => field.name);
  for (const key of Object.keys(request)) {
    if (fields.includes(key)) continue;
    const spelled = snakeCase(key);
    const hint = fields.includes(spelled) ? `; did you mean '${spelled}'? (field names are spelled as in the .proto)` : '';
    throw new TypeError(`${rpc}: '${key}' is not a field of ${definition.type.name}${hint}; its fields are `
      + `${fields.join(', ') || '(none)'}`);
  }
  if (definition.type.name === 'StartTaskRequest' && request.request) checkDecisionRequest(request.request, 'request.request');
}

module.exports = { decisionRequest, checkDecisionRequest, checkRequestKeys, toValue, checkString, checkInt64 };
