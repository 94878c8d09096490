'use strict';
// A promise-based client for the AIOS kernel over @grpc/grpc-js (no other dependency than
// @grpc/proto-loader). The .proto files are loaded at run time from the repository's proto/ folder
// (the source of truth) rather than generated into JavaScript: nothing to regenerate when a message
// grows, and the cross-language check exercises exactly the protos the Python stubs come from.
//
// ── 64-bit integers ────────────────────────────────────────────────────────────────────────────
// A JS number is a double: integers past 2^53 (9,007,199,254,740,992) lose their low bits. The
// protos are therefore loaded with `longs: String`, and EVERY int64/uint64 field this client returns
// is a decimal string, never a number or a Long object:
//   - wall-clock nanoseconds, which are already ~1.8e18, far past 2^53: every `*_unix_ns`
//     (Task.created_unix_ns / updated_unix_ns, TaskTransition.at_unix_ns, Review.*_unix_ns,
//     AuditRecord / Checkpoint time_unix_ns);
//   - audit sequences and tree sizes (Decision.audit_sequence, links_to_audit_sequence,
//     Task.audit_from_sequence, AuditRecord.sequence, tree_size, ...): small today, uint64 by contract;
//   - Decision.phase_timings_ns values, model shapes (ModelMetadata shape: ["1", "14"]), statistics
//     counters. Convert with BigInt(s) to compute, Number(s) only where the value is known to be small.
// The `aios-audit-sequence` trailer is likewise returned as a string (auditSequence(err)).
// Going out, an integer field value is asked for with a BigInt (28n -> Value.int_value, sent as a
// decimal string); a BigInt outside int64 is refused with a RangeError naming the field (protobufjs
// would otherwise wrap it modulo 2^64 without a word: 2n**64n + 5n would arrive as 5). A JS number
// goes out as Value.number_value (the kernel takes a whole number for an integer field).
// bytes fields (raw_input_contents, AuditRecord.payload, UploadPipeline's *_toml, ...) are Buffers
// both ways: send Buffer.from(text) for a TOML file, not the string.
// ───────────────────────────────────────────────────────────────────────────────────────────────
//
//   const { KernelClient, decisionRequest, retryAfterMs } = require('./aios_client');
//   const client = new KernelClient('127.0.0.1:8001', { deadlineMs: 5000 });
//   const d = await client.decide(decisionRequest('claims_triage', { claim_amount: 800, prior_claims: 0n }),
//                                 { retries: 3, metadata: { 'x-trace-id': 'abc' } });
//   for await (const answer of client.decideStream(requests)) { ... }   // answers as they arrive
//
// Errors: a failed call rejects with a KernelError, which keeps grpc-js's `code`, `details` and
// `metadata` (the trailers) and adds `status` ("ABORTED"), `retryAfterMs` (the kernel's
// `retry-after-ms` hint, a number, or null) and `auditSequence` (the `aios-audit-sequence` trailer: the
// decision WAS recorded at that sequence, as a string; or null). README "Retrying: which answers to
// send again" says what to do with each code; decide({ retries }) follows it as the Python client does
// (maySendAgain(err, request): an UNAVAILABLE without the kernel's `aios-not-decided` trailer may have been
// decided, and is sent again only with an idempotency_key).

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');

const LOADER_OPTIONS = Object.freeze({
  keepCase: true, // field names as in the .proto (model_name), as every other client spells them
  longs: String, // int64/uint64 as decimal strings: see "64-bit integers" above
  enums: String, // Outcome etc. as their names ("AUTOMATED"), not numbers
  defaults: true, // absent scalars read as their zero value, as in Python
  includeDirs: [PROTO_ROOT, __dirname], // health.proto lives beside this file (see its header)
});

const definition = protoLoader.loadSync(
  ['inference/grpc_service.proto', 'aios/kernel/v1/kernel.proto', 'health.proto'], LOADER_OPTIONS);
const proto = grpc.loadPackageDefinition(definition);

// Every unary call gets a deadline unless told otherwise: a caller must fail, not hang, when the
// kernel does not answer. Streams have none by default (a stream of many requests may run long).
const DEFAULT_DEADLINE_MS = 10000;
const DEFAULT_STREAM_DEADLINE_MS = null;

// Refusals a caller may simply send again (README "Retrying"): a full queue or busy kernel
// (RESOURCE_EXHAUSTED, with a retry-after-ms hint), the same idempotency key in flight (ABORTED, with
// a hint), a kernel draining (UNAVAILABLE). DEADLINE_EXCEEDED only with an idempotency key: without
// one a retry may decide twice. The same rule as kernel/decision_client.py.
const RETRYABLE = new Set([grpc.status.RESOURCE_EXHAUSTED, grpc.status.ABORTED, grpc.status.UNAVAILABLE]);
const DEFAULT_BACKOFF_MS = 50; // when a refusal carries no hint (UNAVAILABLE), doubled per attempt

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;

// The gRPC status name of a code ("INVALID_ARGUMENT"), as Python's exc.code().name gives it.
function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

function firstTrailer(metadata, key) {
  if (!metadata || typeof metadata.get !== 'function') return undefined;
  const values = metadata.get(key);
  return values.length ? String(values[0]) : undefined;
}

// A failed call: grpc-js's ServiceError (code, details, metadata) plus what the kernel's trailers say.
class KernelError extends Error {
  constructor(serviceError) {
    super(serviceError.message);
    this.name = 'KernelError';
    this.code = serviceError.code;
    this.details = serviceError.details;
    this.metadata = serviceError.metadata || new grpc.Metadata();
    this.status = statusName(this.code);
    this.retryAfterMs = parseRetryAfter(firstTrailer(this.metadata, 'retry-after-ms'));
    this.auditSequence = parseSequence(firstTrailer(this.metadata, 'aios-audit-sequence'));
    this.cause = serviceError;
  }
}

// README "Retrying": whether `request` may be sent again after `err` without deciding it twice (its
// idempotency_key, if any, makes a retry return a decision already made). An UNAVAILABLE whose decision was
// recorded all the same (it carries an audit sequence) is never sent again: nothing was kept under its key.
// A keyless UNAVAILABLE only when it proves nothing was decided: the kernel said so (its aios-not-decided
// trailer) or the channel never reached a kernel; gRPC's own UNAVAILABLE ending a call in progress
// ("Cancelling all calls" at the end of a drain, a connection lost) proves nothing. As
// kernel/decision_client.py's may_send_again.
function maySendAgain(err, request) {
  const keyed = Boolean(request.idempotency_key);
  if (err.code === grpc.status.DEADLINE_EXCEEDED) return keyed;
  if (!RETRYABLE.has(err.code) || err.auditSequence !== null) return false;
  if (keyed || err.code !== grpc.status.UNAVAILABLE) return true;
  // (grpc-js says "No connection established" where it never reached the server; grpc-core "failed to connect".)
  return firstTrailer(err.metadata, 'aios-not-decided') !== undefined
    || /No connection established|failed to connect/i.test(err.details || '');
}

function parseRetryAfter(text) {
  return text !== undefined && /^[0-9]{1,15}$/.test(text) ? Number(text) : null;
}

function parseSequence(text) {
  return text !== undefined && /^[0-9]{1,20}$/.test(text) ? text : null;
}

// The kernel's retry-after-ms hint in milliseconds, or null: from a KernelError, a raw grpc-js
// ServiceError, or a DecideStream error answer (its error_message says "retry after N ms").
function retryAfterMs(errOrAnswer) {
  if (!errOrAnswer) return null;
  if (errOrAnswer instanceof KernelError) return errOrAnswer.retryAfterMs;
  if (errOrAnswer.metadata) return parseRetryAfter(firstTrailer(errOrAnswer.metadata, 'retry-after-ms'));
  if (errOrAnswer.error_code) {
    const m = /retry after ([0-9]{1,15}) ms/.exec(errOrAnswer.error_message || '');
    return m ? Number(m[1]) : null;
  }
  return null;
}

// The audit sequence (a decimal string) a refused call's decision was nevertheless recorded at, or
// null: from a KernelError, a raw ServiceError, or a DecideStream error answer (its audit_sequence).
function auditSequence(errOrAnswer) {
  if (!errOrAnswer) return null;
  if (errOrAnswer instanceof KernelError) return errOrAnswer.auditSequence;
  if (errOrAnswer.metadata) return parseSequence(firstTrailer(errOrAnswer.metadata, 'aios-audit-sequence'));
  if (errOrAnswer.error_code) {
    const seq = String(errOrAnswer.audit_sequence || '0');
    return seq !== '0' ? seq : null;
  }
  return null;
}

function wrapError(err) {
  return err instanceof KernelError || err == null || typeof err.code !== 'number' ? err : new KernelError(err);
}

// ── what a caller sends ──────────────────────────────────────────────────────────────────────────

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
// priority, timeout_ms).
function decisionRequest(pipeline, fields, textFields = {}, options = {}) {
  const typed = {};
  for (const [name, value] of Object.entries(fields)) {
    checkString(name, `a field name (${JSON.stringify(name)})`);
    typed[name] = toValue(value, `field '${name}'`);
  }
  const request = { pipeline, fields: typed, text_fields: { ...textFields }, ...options };
  checkDecisionRequest(request);
  return request;
}

const REQUEST_STRINGS = ['pipeline', 'tenant', 'request_id', 'idempotency_key'];

// What protobufjs would send silently wrong, refused here with the field's name: lone surrogates in any
// string, an int_value outside int64 (a BigInt, a decimal string, or a number that is not a safe integer).
function checkDecisionRequest(request, where = 'request') {
  if (request === null || typeof request !== 'object') throw new TypeError(`${where} must be a DecisionRequest object`);
  for (const key of REQUEST_STRINGS) {
    if (typeof request[key] === 'string') checkString(request[key], `${where}.${key}`);
  }
  for (const [name, value] of Object.entries(request.fields || {})) {
    checkString(name, `${where}.fields key ${JSON.stringify(name)}`);
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
    if (typeof text === 'string') checkString(text, `text field '${name}'`);
  }
  return request;
}

// ── calls ────────────────────────────────────────────────────────────────────────────────────────

function toMetadata(...sources) {
  const md = new grpc.Metadata();
  for (const source of sources) {
    if (!source) continue;
    if (source instanceof grpc.Metadata) {
      for (const [key, values] of Object.entries(source.toJSON())) {
        md.remove(key);
        for (const v of values) md.add(key, v);
      }
    } else {
      for (const [key, value] of Object.entries(source)) {
        md.remove(key);
        for (const v of Array.isArray(value) ? value : [value]) md.add(key, Buffer.isBuffer(v) ? v : String(v));
      }
    }
  }
  return md;
}

// A deadline in ms from now: undefined takes the default; null or Infinity: none.
function resolveDeadline(ms, fallback) {
  const value = ms === undefined ? fallback : ms;
  if (value === null || value === Infinity) return null;
  if (typeof value !== 'number' || !(value >= 0)) throw new TypeError(`deadlineMs must be a number >= 0 or null, got ${value}`);
  return value;
}

function abortError(signal) {
  return signal.reason !== undefined ? signal.reason : Object.assign(new Error('This operation was aborted'), { name: 'AbortError' });
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) { reject(abortError(signal)); return; }
    const onAbort = () => { clearTimeout(timer); reject(abortError(signal)); };
    const timer = setTimeout(() => { if (signal) signal.removeEventListener('abort', onAbort); resolve(); }, ms);
    if (signal) signal.addEventListener('abort', onAbort, { once: true });
  });
}

class KernelClient {
  // new KernelClient(address, {
  //   deadlineMs: 10000,        // each unary call's deadline unless the call gives its own (null: none)
  //   streamDeadlineMs: null,   // a stream's whole deadline (decideStream/decideMany); null: none
  //   metadata: {},             // sent with every call (a grpc.Metadata or {key: value}); a call's own adds to it
  //   credentials,              // grpc.credentials.createSsl(...) etc.; default insecure
  //   channelOptions: {},       // grpc-js channel options ('grpc.max_receive_message_length', keepalive, ...)
  //   interceptors: [],         // grpc-js client interceptors, on every call
  // })
  // A number as second argument is taken as deadlineMs (the earlier signature).
  constructor(address, options = {}) {
    const opts = typeof options === 'number' ? { deadlineMs: options } : { ...options };
    this.deadlineMs = resolveDeadline(opts.deadlineMs, DEFAULT_DEADLINE_MS);
    this.streamDeadlineMs = resolveDeadline(opts.streamDeadlineMs, DEFAULT_STREAM_DEADLINE_MS);
    this.metadata = toMetadata(opts.metadata);
    const credentials = opts.credentials || grpc.credentials.createInsecure();
    // One channel (one connection) shared by every service.
    this.channel = new grpc.Channel(address, credentials, opts.channelOptions || {});
    const clientOptions = { channelOverride: this.channel, interceptors: opts.interceptors || [] };
    const v1 = proto.aios.kernel.v1;
    this.inference = new proto.inference.GRPCInferenceService(address, credentials, clientOptions);
    this.decisions = new v1.DecisionService(address, credentials, clientOptions);
    this.tasks = new v1.TaskService(address, credentials, clientOptions);
    this.reviews = new v1.ReviewService(address, credentials, clientOptions);
    this.audit = new v1.AuditService(address, credentials, clientOptions);
    this.admin = new v1.AdminService(address, credentials, clientOptions);
    this.health = new proto.grpc.health.v1.Health(address, credentials, clientOptions);
  }

  // Any unary RPC on one of the stubs above: client.call('tasks', 'StartTask', {request}, {deadlineMs}).
  // options: deadlineMs (default the client's; null: none), metadata (added to the client's), signal
  // (an AbortSignal that cancels the call). Rejects with a KernelError.
  call(service, method, request, options = {}) {
    const stub = this[service];
    if (!stub || typeof stub[method] !== 'function') throw new TypeError(`no RPC ${service}.${method}`);
    const { signal } = options;
    if (signal && signal.aborted) return Promise.reject(abortError(signal));
    const deadlineMs = resolveDeadline(options.deadlineMs, this.deadlineMs);
    const callOptions = deadlineMs === null ? {} : { deadline: new Date(Date.now() + deadlineMs) };
    return new Promise((resolve, reject) => {
      let onAbort = null;
      const call = stub[method](request, toMetadata(this.metadata, options.metadata), callOptions, (err, response) => {
        if (onAbort) signal.removeEventListener('abort', onAbort);
        if (err) reject(signal && signal.aborted ? abortError(signal) : wrapError(err));
        else resolve(response);
      });
      if (signal) {
        onAbort = () => call.cancel();
        signal.addEventListener('abort', onAbort, { once: true });
      }
    });
  }

  serverLive(options) { return this.call('inference', 'ServerLive', {}, options); }

  modelMetadata(name, version = '', options = {}) {
    return this.call('inference', 'ModelMetadata', { name, version }, options);
  }

  modelInfer(request, options) { return this.call('inference', 'ModelInfer', request, options); }

  healthCheck(service = '', options = {}) { return this.call('health', 'Check', { service }, options); }

  // grpc.health.v1 List: {statuses: {service: {status}}}. (Rejects UNIMPLEMENTED from a server without it.)
  healthList(options) { return this.call('health', 'List', {}, options); }

  // One decision. options: deadlineMs (shared by all attempts), metadata, signal, and retries: how many
  // times to send it again after a refusal README "Retrying" says to retry (maySendAgain:
  // RESOURCE_EXHAUSTED, ABORTED, UNAVAILABLE — one gRPC sent ending a call in progress only with an
  // idempotency_key —; DEADLINE_EXCEEDED too when the request has an idempotency_key, so the retry
  // returns the decision made late instead of a second one), waiting the kernel's retry-after-ms (else
  // 50 ms, doubled each time), never past the deadline. Rejects with the last KernelError.
  async decide(request, options = {}) {
    checkDecisionRequest(request);
    const retries = options.retries === undefined ? 0 : options.retries;
    if (!Number.isInteger(retries) || retries < 0) throw new TypeError(`retries must be an integer >= 0, got ${retries}`);
    const deadlineMs = resolveDeadline(options.deadlineMs, this.deadlineMs);
    const end = deadlineMs === null ? Infinity : Date.now() + deadlineMs;
    let backoff = DEFAULT_BACKOFF_MS;
    for (let attempt = 0; ; attempt += 1) {
      const left = end === Infinity ? null : Math.max(0, end - Date.now());
      try {
        return await this.call('decisions', 'Decide', request, { ...options, deadlineMs: left });
      } catch (err) {
        if (!(err instanceof KernelError)) throw err; // aborted by the caller's signal
        const retryable = maySendAgain(err, request);
        let pause = err.retryAfterMs;
        if (pause === null) { pause = backoff; backoff *= 2; }
        if (attempt >= retries || !retryable || Date.now() + pause >= end) throw err;
        await sleep(pause, options.signal);
      }
    }
  }

  // Many decisions on one DecideStream. `requests`: an array, iterable or async iterable of
  // DecisionRequests (or nothing, then write() them yourself and end()). Returns a DecisionStream: an
  // async iterator of the answers as they arrive (completion order; set request_id to match them; a
  // bad request is an answer with error_code and the stream goes on). options: deadlineMs (the whole
  // stream's; default the client's streamDeadlineMs, none unless set), metadata, signal.
  decideStream(requests, options = {}) {
    return new DecisionStream(this, requests, options);
  }

  // All `requests` on one stream, written as fast as the stream takes them (write() backpressure
  // respected); resolves with every answer, in the order they came. If the stream itself fails (its
  // deadline, a cancel, the kernel going away), rejects with the KernelError, whose `answers` holds
  // every answer received before it.
  async decideMany(requests, options = {}) {
    const stream = this.decideStream(requests, options);
    const answers = [];
    try {
      for await (const answer of stream) answers.push(answer);
    } catch (err) {
      if (err && typeof err === 'object') err.answers = answers;
      throw err;
    }
    return answers;
  }

  close() {
    this.channel.close(); // every stub shares it
  }
}

// An open DecideStream. Iterate it (for await) for the answers; reading pulls from grpc-js, so a
// consumer that stops reading stops the stream from reading (and the kernel pushes back on its side).
// write(request) resolves once the stream has room again (await it: that is the write backpressure);
// end() says no more requests will come; cancel() ends the stream at once (the iteration then ends
// quietly); breaking out of a for-await loop cancels it too. `sent` counts requests written. The grpc-js
// call is `stream.call` (its 'status' and 'metadata' events); do not add a 'data' listener to it.
class DecisionStream {
  constructor(client, requests, options = {}) {
    const deadlineMs = resolveDeadline(options.deadlineMs, client.streamDeadlineMs);
    const callOptions = deadlineMs === null ? {} : { deadline: new Date(Date.now() + deadlineMs) };
    this.call = client.decisions.DecideStream(toMetadata(client.metadata, options.metadata), callOptions);
    this.sent = 0;
    this.drainWaits = 0; // writes that waited for the stream to drain (write backpressure at work)
    this._error = null; // the stream's failure (a KernelError), or a request that could not be sent
    this._done = false; // the status arrived: nothing more will be pushed
    this._cancelled = false;
    this._signal = options.signal || null;
    this._waiters = [];
    const wake = () => { for (const w of this._waiters.splice(0)) w(); };
    this._wakeAll = wake;
    this.call.on('readable', wake);
    this.call.on('drain', wake);
    this.call.on('error', (err) => { if (!this._error) this._error = wrapError(err); wake(); });
    this.call.on('status', () => { this._done = true; wake(); });
    if (this._signal) {
      this._onAbort = () => this.cancel();
      if (this._signal.aborted) this.cancel();
      else this._signal.addEventListener('abort', this._onAbort, { once: true });
    }
    if (requests !== undefined && requests !== null) this._pump(requests);
  }

  _waitForEvent() { return new Promise((resolve) => { this._waiters.push(resolve); }); }

  async _pump(requests) {
    try {
      for await (const request of requests) {
        if (this._done || this._cancelled) return;
        await this.write(request);
      }
      this.end();
    } catch (err) {
      // A request that cannot be sent (a RangeError, a failing generator): stop, and say why.
      if (!this._error) this._error = err;
      this._abandon();
    }
  }

  _abandon() {
    if (!this._done) this.call.cancel();
    this._wakeAll();
  }

  // Writes one request; resolves when the stream can take the next (write() backpressure).
  async write(request) {
    if (this._done || this._cancelled) throw this._error || new Error('the stream has ended');
    checkDecisionRequest(request, `request #${this.sent}`);
    this.sent += 1;
    if (this.call.write(request)) return;
    this.drainWaits += 1;
    while (this.call.writableNeedDrain && !this._done && !this._cancelled) {
      await new Promise((resolve) => {
        const done = () => { this.call.off('drain', done); this.call.off('status', done); resolve(); };
        this.call.on('drain', done);
        this.call.on('status', done);
        if (this._cancelled) done();
      });
    }
  }

  end() { if (!this._done && !this.call.writableEnded) this.call.end(); }

  cancel() {
    if (this._cancelled) return;
    this._cancelled = true;
    this._abandon();
  }

  async next() {
    for (;;) {
      const answer = this.call.read();
      if (answer !== null) return { value: answer, done: false };
      if (this._done) { // the status arrived (after a cancel too): nothing more will come
        this._finish();
        if (this._signal && this._signal.aborted) throw abortError(this._signal);
        if (this._error && !(this._cancelled && this._error.code === grpc.status.CANCELLED)) throw this._error;
        return { value: undefined, done: true };
      }
      await this._waitForEvent();
    }
  }

  _finish() { if (this._signal && this._onAbort) this._signal.removeEventListener('abort', this._onAbort); }

  async return() { // a for-await loop left early: cancel the stream
    if (!this._done) this.cancel();
    this._finish();
    return { value: undefined, done: true };
  }

  [Symbol.asyncIterator]() { return this; }
}

// ModelInfer's FP32 tensors travel as little-endian bytes in raw_*_contents.
function fp32ToBytes(values) {
  const buf = Buffer.alloc(4 * values.length);
  values.forEach((v, i) => buf.writeFloatLE(v, 4 * i));
  return buf;
}

function bytesToFp32(buf) {
  const out = [];
  for (let i = 0; i + 4 <= buf.length; i += 4) out.push(buf.readFloatLE(i));
  return out;
}

module.exports = {
  KernelClient, DecisionStream, KernelError, decisionRequest, checkDecisionRequest, toValue, statusName,
  retryAfterMs, auditSequence, maySendAgain, fp32ToBytes, bytesToFp32, grpc, proto, LOADER_OPTIONS, PROTO_ROOT, RETRYABLE,
};
