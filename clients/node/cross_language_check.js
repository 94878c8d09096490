'use strict';
// Calls a running kernel from Node (@grpc/grpc-js) and prints ONE JSON object on
// stdout with what came back: tests/test_node_client.py compares it with what
// onnxruntime and the Python client get, so this script reports, it does not judge.
// It sends what it reports: the requests go into the JSON too, in the proto's JSON
// form, so the Python side can repeat exactly the same calls.
//
//   node clients/node/cross_language_check.js --address 127.0.0.1:8001
//
// Exits 1 (with the error on stderr) only when a call that should succeed fails.

const {
  KernelClient, decisionRequest, statusName, fp32ToBytes, bytesToFp32,
} = require('./aios_client');

const MODEL = 'claims_triage';
const PIPELINE = 'claims_triage';

function parseArgs(argv) {
  const i = argv.indexOf('--address');
  if (i < 0 || !argv[i + 1]) {
    process.stderr.write('usage: node cross_language_check.js --address HOST:PORT\n');
    process.exit(2);
  }
  return { address: argv[i + 1] };
}

// A claim the demo's README decides automatically (fast track). Integer fields are BigInts
// so they go out as int_value; the others as number_value, string_value and bool_value.
function claim(overrides = {}) {
  return {
    claim_amount: 800, customer_tier: 'gold', claim_type: 'auto', policy_age_months: 28n,
    prior_claims: 0n, fraud_score: 0.05, days_since_incident: 3n, has_police_report: true,
    ...overrides,
  };
}

// The request in the form the Python side parses back (json_format.ParseDict): BigInts as strings.
function asJson(request) {
  return JSON.parse(JSON.stringify(request, (key, v) => (typeof v === 'bigint' ? v.toString() : v)));
}

// An expected failure as {code, details}; an unexpected success is reported as code "OK".
async function failure(promise) {
  try {
    await promise;
    return { code: 'OK', details: '' };
  } catch (err) {
    return { code: statusName(err.code), details: err.details };
  }
}

function provenance(decision) {
  const { model_name, model_version, confidence, class_scores } = decision.model || {};
  return { model_name, model_version, confidence, class_scores };
}

async function main() {
  const { address } = parseArgs(process.argv.slice(2));
  const client = new KernelClient(address);
  const report = {};
  try {
    report.live = (await client.serverLive()).live;
    report.health = {
      server: (await client.healthCheck('')).status,
      decision_service: (await client.healthCheck('aios.kernel.v1.DecisionService')).status,
    };

    const meta = await client.modelMetadata(MODEL);
    report.metadata = {
      name: meta.name, versions: meta.versions, platform: meta.platform,
      inputs: meta.inputs, outputs: meta.outputs,
    };

    // FP32 [1, N], N from the metadata's per-row shape (its last dim; shapes are strings: longs: String).
    const input = meta.inputs[0];
    const n = Number(input.shape[input.shape.length - 1]);
    const row = Array.from({ length: n }, (_, i) => ((i * 7) % 11 - 5) / 4); // varied, exact in FP32
    const inferred = await client.modelInfer({
      model_name: MODEL,
      id: 'node-infer-1',
      inputs: [{ name: input.name, datatype: 'FP32', shape: [1, n] }],
      raw_input_contents: [fp32ToBytes(row)],
    });
    const out = inferred.outputs[0];
    report.infer = {
      input_name: input.name, input: row, id: inferred.id, model_version: inferred.model_version,
      output_name: out.name, output_datatype: out.datatype, output_shape: out.shape.map(Number),
      output: bytesToFp32(inferred.raw_output_contents[0]),
    };

    const request = decisionRequest(PIPELINE, claim(), { description: 'hail damage to the windshield' },
      { tenant: 'acme', request_id: 'node-decide-1' });
    const decision = await client.decide(request);
    report.decide = {
      request: asJson(request), request_id: decision.request_id, action: decision.action,
      outcome: decision.outcome, reasons: decision.reasons, audit_sequence: decision.audit_sequence,
      policy_name: decision.policy_name, model: provenance(decision),
    };

    // customer_tier is a string field: a number there is the caller's error, and says which field.
    report.bad_field = await failure(client.decide(
      decisionRequest(PIPELINE, claim({ customer_tier: 3 }), {}, { tenant: 'acme' })));
    report.unknown_pipeline = await failure(client.decide(
      decisionRequest('no_such_pipeline', claim(), {}, { tenant: 'acme' })));

    // Five claims on one stream, all written before any answer is read; answers may come in any
    // order, so each is matched to its request by request_id (amounts differ so answers can too).
    const amounts = [800, 90000, 2500, 15000, 120];
    const streamed = amounts.map((amount, i) => decisionRequest(
      PIPELINE, claim({ claim_amount: amount }), {}, { tenant: 'acme', request_id: `node-stream-${i}` }));
    const answers = await client.decideMany(streamed);
    report.stream = {
      requests: streamed.map(asJson),
      answers: answers.map((d) => ({
        request_id: d.request_id, action: d.action, outcome: d.outcome,
        error_code: d.error_code, error_message: d.error_message,
      })),
    };
  } finally {
    client.close();
  }
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main().catch((err) => {
  process.stderr.write(`cross_language_check: ${err.stack || err}\n`);
  process.exit(1);
});
