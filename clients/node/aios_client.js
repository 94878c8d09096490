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
//     Task.audit_from_sequence, AuditRecord.sequence, tree_size, Review.sequence, ...): small today, uint64 by
//     contract (send WatchReviewsRequest.from_sequence back as the same string, or a BigInt);
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
// decided, and is sent again only with an idempotency_key; a RESOURCE_EXHAUSTED without the kernel's
// `retry-after-ms` or `aios-not-decided` came from gRPC, and is not sent again). A call on a closed client
// rejects with a KernelError too (UNAVAILABLE).

// The parts, each exported from here too: errors.js (KernelError, maySendAgain, the trailers), requests.js
// (decisionRequest and the checks on what is sent), call_options.js (metadata, deadlines, abort signals),
// decision_stream.js (DecisionStream, an open DecideStream).

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const {
  KernelError, RETRYABLE, statusName, maySendAgain, retryAfterMs, auditSequence, wrapError, isChannelClosed, closedError,
} = require('./errors');
const { decisionRequest, checkDecisionRequest, checkRequestKeys, toValue } = require('./requests');
const { toMetadata, resolveDeadline, abortError, sleep } = require('./call_options');
const { DecisionStream, ANSWER_HIGH_WATER } = require('./decision_stream');

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

const DEFAULT_BACKOFF_MS = 50; // when a refusal carries no hint (UNAVAILABLE), doubled per attempt

// grpc-js refuses an answer past 4 MiB by default, but the kernel pages ListReviews up to 16 MiB and takes
// messages up to its max_message_bytes (64 MiB by default): the same limit both ways unless channelOptions
// say otherwise.
const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

// The stubs call() reaches, by the name a caller gives (`call('tasks', 'StartTask', ...)`).
const SERVICES = ['inference', 'decisions', 'tasks', 'reviews', 'audit', 'admin', 'health'];

class KernelClient {
  // new KernelClient(address, {
  //   deadlineMs: 10000,        // each unary call's deadline unless the call gives its own (null: none)
  //   streamDeadlineMs: null,   // a stream's whole deadline (decideStream/decideMany); null: none
  //   metadata: {},             // sent with every call (a grpc.Metadata or {key: value}); a call's own adds to it
  //   credentials,              // grpc.credentials.createSsl(...) etc.; default insecure
  //   channelOptions: {},       // grpc-js channel options (keepalive, ...); message limits 64 MiB both ways
  //                             // unless set here ('grpc.max_receive_message_length', ..._send_...)
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
    const channelOptions = {
      'grpc.max_receive_message_length': DEFAULT_MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': DEFAULT_MAX_MESSAGE_BYTES,
      ...(opts.channelOptions || {}),
    };
    this.channel = new grpc.Channel(address, credentials, channelOptions);
    this.closed = false;
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
  // (an AbortSignal that cancels the call). Rejects with a KernelError. A streaming RPC is refused at once
  // (TypeError): its answer is a stream, not one message, so it would never settle; so is a request key that is
  // not a field of the RPC's request (`pageToken` for `page_token`: protobufjs would drop it without a word).
  call(service, method, request, options = {}) {
    const stub = SERVICES.includes(service) ? this[service] : undefined;
    const rpc = stub && Object.prototype.hasOwnProperty.call(stub.constructor.service, method) ? stub[method] : undefined;
    if (typeof rpc !== 'function') {
      const known = stub ? Object.keys(stub.constructor.service).join(', ') : SERVICES.join(', ');
      throw new TypeError(`no RPC ${service}.${method} (${stub ? `${service}'s RPCs` : 'the services'}: ${known})`);
    }
    if (rpc.requestStream || rpc.responseStream) {
      const instead = method === 'DecideStream' ? 'client.decideStream(requests) or client.decideMany(requests)'
        : `the grpc-js stub itself: client.${service}.${method}(${rpc.requestStream ? '' : 'request, '}metadata, options) returns the stream`;
      throw new TypeError(`${service}.${method} is a streaming RPC, which call() cannot make (it answers one message); use ${instead}`);
    }
    checkRequestKeys(stub.constructor.service[method].requestType, request, `${service}.${method}`);
    const { signal } = options;
    if (signal && signal.aborted) return Promise.reject(abortError(signal));
    if (this.closed) return Promise.reject(closedError());
    const deadlineMs = resolveDeadline(options.deadlineMs, this.deadlineMs);
    const callOptions = deadlineMs === null ? {} : { deadline: new Date(Date.now() + deadlineMs) };
    return new Promise((resolve, reject) => {
      let onAbort = null;
      let call;
      try {
        call = rpc.call(stub, request, toMetadata(this.metadata, options.metadata), callOptions, (err, response) => {
          if (onAbort) signal.removeEventListener('abort', onAbort);
          if (err) reject(signal && signal.aborted ? abortError(signal) : wrapError(err));
          else resolve(response);
        });
      } catch (err) { // the channel closed under the client (client.channel.close())
        reject(isChannelClosed(err) ? closedError() : err);
        return;
      }
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
        if (!(err instanceof KernelError) || this.closed) throw err; // aborted by the caller's signal; closed
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

  // Closes the channel: calls in progress end UNAVAILABLE, later ones are refused with a KernelError.
  close() {
    this.closed = true;
    this.channel.close(); // every stub shares it
  }
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
  ANSWER_HIGH_WATER, DEFAULT_MAX_MESSAGE_BYTES,
};
