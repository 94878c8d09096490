'use strict';
// A small promise-based client for the AIOS kernel over @grpc/grpc-js.
//
// The .proto files are loaded at run time from the repository's proto/ folder
// (the source of truth) rather than generated into JavaScript: nothing to
// regenerate here when a message grows, and the check below exercises exactly
// the protos the Python stubs are generated from.

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');

const definition = protoLoader.loadSync(
  ['inference/grpc_service.proto', 'aios/kernel/v1/kernel.proto', 'health.proto'],
  {
    keepCase: true, // field names as in the .proto (model_name), as every other client spells them
    longs: String, // int64/uint64 (shapes, audit_sequence) as decimal strings: a JS number loses bits past 2^53
    enums: String, // Outcome etc. as their names ("AUTOMATED"), not numbers
    defaults: true, // absent scalars read as their zero value, as in Python
    includeDirs: [PROTO_ROOT, __dirname], // health.proto lives beside this file (see its header)
  },
);
const proto = grpc.loadPackageDefinition(definition);

// Every call gets a deadline: a test must fail, not hang, when the kernel does not answer.
const DEFAULT_DEADLINE_MS = 10000;

function deadline(ms) {
  return new Date(Date.now() + (ms || DEFAULT_DEADLINE_MS));
}

// A unary call as a promise; a failure rejects with grpc-js's ServiceError (.code, .details).
function unary(client, method, request, deadlineMs) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(deadlineMs) }, (err, response) =>
      err ? reject(err) : resolve(response));
  });
}

// A protobuf Value from a JS value. JS has one number type, so an int64 is asked
// for explicitly with a BigInt (28n) and sent as a decimal string (longs: String).
function toValue(x) {
  switch (typeof x) {
    case 'boolean': return { bool_value: x };
    case 'bigint': return { int_value: x.toString() };
    case 'number': return { number_value: x };
    case 'string': return { string_value: x };
    default: throw new TypeError(`a field value must be boolean, bigint, number or string, got ${typeof x}`);
  }
}

// A DecisionRequest from plain objects: {claim_amount: 800, ...} and {description: '...'}.
function decisionRequest(pipeline, fields, textFields = {}, options = {}) {
  const typed = {};
  for (const [name, value] of Object.entries(fields)) typed[name] = toValue(value);
  return { pipeline, fields: typed, text_fields: textFields, ...options };
}

// The gRPC status name of a ServiceError ("INVALID_ARGUMENT"), as Python's exc.code().name gives it.
function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

class KernelClient {
  constructor(address, deadlineMs = DEFAULT_DEADLINE_MS) {
    const credentials = grpc.credentials.createInsecure();
    this.deadlineMs = deadlineMs;
    this.inference = new proto.inference.GRPCInferenceService(address, credentials);
    // One channel per client object in grpc-js; sharing it keeps the calls on one connection.
    const shared = { channelOverride: this.inference.getChannel() };
    this.decisions = new proto.aios.kernel.v1.DecisionService(address, credentials, shared);
    this.health = new proto.grpc.health.v1.Health(address, credentials, shared);
  }

  serverLive() { return unary(this.inference, 'ServerLive', {}, this.deadlineMs); }

  modelMetadata(name, version = '') {
    return unary(this.inference, 'ModelMetadata', { name, version }, this.deadlineMs);
  }

  modelInfer(request) { return unary(this.inference, 'ModelInfer', request, this.deadlineMs); }

  decide(request) { return unary(this.decisions, 'Decide', request, this.deadlineMs); }

  healthCheck(service = '') { return unary(this.health, 'Check', { service }, this.deadlineMs); }

  // All `requests` written to one DecideStream at once (so they are in flight together);
  // resolves with the answers in the order they came, once the kernel ends the stream.
  decideMany(requests) {
    return new Promise((resolve, reject) => {
      const call = this.decisions.DecideStream({ deadline: deadline(this.deadlineMs) });
      const answers = [];
      call.on('data', (decision) => answers.push(decision));
      call.on('error', reject);
      call.on('end', () => resolve(answers));
      for (const request of requests) call.write(request);
      call.end();
    });
  }

  close() {
    this.inference.close(); // closes the channel the other two share
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
  KernelClient, decisionRequest, toValue, statusName, fp32ToBytes, bytesToFp32, grpc,
};
