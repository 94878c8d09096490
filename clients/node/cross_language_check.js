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
  KernelClient, KernelError, decisionRequest, toValue, statusName, retryAfterMs, auditSequence,
  fp32ToBytes, bytesToFp32, grpc, proto,
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

// What building a request threw (a caller's mistake caught before sending): {error, message}, or none.
function thrown(build) {
  try {
    build();
    return { error: null, message: '' };
  } catch (err) {
    return { error: err.constructor.name, message: err.message };
  }
}

// A KernelError as the report shows it (everything a caller can act on, and its types).
function refusal(err) {
  return {
    kernel_error: err instanceof KernelError, code: statusName(err.code), numeric_code: err.code,
    details: err.details, has_metadata: err.metadata instanceof grpc.Metadata,
    retry_after_ms: err.retryAfterMs, retry_after_ms_helper: retryAfterMs(err),
    audit_sequence: err.auditSequence, audit_sequence_helper: auditSequence(err),
    audit_sequence_type: typeof err.auditSequence,
  };
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// A grpc-js interceptor that notes each call's method, deadline (ms left, or null) and metadata.
function recorder(seen) {
  return (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      const { deadline } = options;
      const left = deadline === undefined || deadline === Infinity ? null : new Date(deadline).getTime() - Date.now();
      seen.push({ method: options.method_definition.path, deadline_ms: left, metadata: metadata.getMap() });
      next(metadata, listener);
    },
  });
}

// Point 1: values JS would send wrong are refused here, naming the field; -0 goes out as 0.
async function checkValues(client) {
  const out = {
    too_large: thrown(() => decisionRequest(PIPELINE, claim({ prior_claims: 2n ** 64n + 5n }))),
    int64_max_plus_one: thrown(() => decisionRequest(PIPELINE, claim({ prior_claims: 2n ** 63n }))),
    lone_surrogate_text: thrown(() => decisionRequest(PIPELINE, claim(), { description: 'hail damage \u{1F600}'.slice(0, 13) })),
    lone_surrogate_field: thrown(() => decisionRequest(PIPELINE, claim({ customer_tier: '\uDC00gold' }))),
    minus_zero_is_zero: Object.is(toValue(-0).number_value, 0),
  };
  // A raw request's int_value (a decimal string) is held to int64 too: decide() rejects before sending.
  out.raw_int_value_too_large = await client.decide({ pipeline: PIPELINE, fields: { prior_claims: { int_value: (2n ** 64n).toString() } } })
    .then(() => ({ error: null, message: '' }), (err) => ({ error: err.constructor.name, message: err.message }));
  // int64's own edge goes out exact (not wrapped): the kernel refuses it for the field's range, quoting it.
  out.int64_min = await failure(client.decide(decisionRequest(PIPELINE, claim({ prior_claims: -(2n ** 63n) }), {}, { tenant: 'acme' })));
  // -0 and 0 are one value: the decision's input_hash is that of 0.0 (Python compares).
  const minusZero = decisionRequest(PIPELINE, claim({ fraud_score: -0 }), {}, { tenant: 'acme', request_id: 'node-minus-zero' });
  out.minus_zero_request = asJson(minusZero);
  out.minus_zero_input_hash = (await client.decide(minusZero)).input_hash;
  return out;
}

// Point 2 and 3: refusals carry their trailers; decide({retries}) follows README "Retrying".
async function checkRefusals(address) {
  const seen = [];
  const client = new KernelClient(address, { interceptors: [recorder(seen)] });
  const out = {};
  try {
    // Same idempotency key, many calls at once, no retries: all but the first are ABORTED with a hint.
    for (let round = 0; round < 10 && !out.aborted; round += 1) {
      const request = decisionRequest(PIPELINE, claim(), {}, { tenant: 'acme', idempotency_key: `node-race-${Date.now()}-${round}` });
      const settled = await Promise.allSettled(Array.from({ length: 12 }, () => client.decide(request)));
      const rejected = settled.filter((r) => r.status === 'rejected').map((r) => r.reason);
      if (rejected.length) out.aborted = refusal(rejected.find((e) => e.code === grpc.status.ABORTED) || rejected[0]);
    }
    // The same race with retries: every call gets the one decision (replayed but for one). On a loaded
    // machine the twelve calls can arrive one after another (none ABORTED, nothing retried): race again.
    for (let round = 0; round < 10 && !(out.retried && out.retried.attempts > out.retried.calls); round += 1) {
      const request = decisionRequest(PIPELINE, claim(), {}, { tenant: 'acme', idempotency_key: `node-race-retried-${Date.now()}-${round}` });
      const before = seen.length;
      const settled = await Promise.allSettled(Array.from({ length: 12 }, () => client.decide(request, { retries: 8 })));
      out.retried = {
        calls: 12,
        attempts: seen.slice(before).filter((s) => s.method.endsWith('/Decide')).length,
        results: settled.map((r) => (r.status === 'fulfilled'
          ? { code: 'OK', replayed: r.value.replayed, audit_sequence: r.value.audit_sequence }
          : { code: statusName(r.reason.code), details: r.reason.details })),
      };
    }
    // A decision made after the request's own timeout_ms: DEADLINE_EXCEEDED, recorded at the trailer's sequence.
    // Which timeout lands there depends on the machine's load (a loaded one expires every 1 ms request before
    // the model runs, recording nothing): the timeout grows after an expiry that recorded nothing and shrinks
    // after an answer in time, so it settles where decisions finish just late.
    const lateTimeout = { ms: 1 };
    const adapt = (outcome) => {
      lateTimeout.ms = outcome === 'in-time' ? Math.max(1, lateTimeout.ms * 0.7) : Math.min(2000, lateTimeout.ms * 1.5);
    };
    const lateRequest = (key) => decisionRequest(PIPELINE, claim(), {}, {
      tenant: 'acme', timeout_ms: Math.max(1, Math.round(lateTimeout.ms)), idempotency_key: key });
    for (let i = 0; i < 300 && !out.late; i += 1) {
      const late = lateRequest(`node-late-${Date.now()}-${i}`);
      try {
        await client.decide(late);
        adapt('in-time');
      } catch (err) {
        if (err.code === grpc.status.DEADLINE_EXCEEDED && err.auditSequence === null) adapt('expired');
        if (err.auditSequence !== null) {
          const replay = await client.decide({ ...late, timeout_ms: 0 });
          out.late = { ...refusal(err), replay: { replayed: replay.replayed, audit_sequence: replay.audit_sequence } };
        }
      }
    }
    // DEADLINE_EXCEEDED is retried with an idempotency key (the retry returns what was recorded) ...
    // A first attempt that expired before it was decided records nothing, and its retries (same timeout)
    // may expire too on a loaded machine: look for a call whose retry found a recorded decision (two retries
    // each, so a loaded machine's misses stay cheap: 50 and 100 ms pauses), with the timeout found above.
    out.late_retried = null;
    for (let i = 0; i < 50 && !(out.late_retried && out.late_retried.code === 'OK'); i += 1) {
      const late = lateRequest(`node-late-retry-${Date.now()}-${i}`);
      const mark = seen.length;
      const result = await client.decide(late, { retries: 2 }).then(
        (d) => ({ code: 'OK', replayed: d.replayed }), (e) => ({ code: statusName(e.code), details: e.details }));
      const attempts = seen.length - mark;
      if (attempts > 1) out.late_retried = { ...result, attempts };
      else if (result.code === 'OK') adapt('in-time'); // answered in time at once: nothing was retried
    }
    // ... and never without one (a retry could decide twice).
    out.unkeyed_deadline = null;
    for (let i = 0; i < 100 && !out.unkeyed_deadline; i += 1) {
      const late = decisionRequest(PIPELINE, claim(), {}, { tenant: 'acme', timeout_ms: 1 });
      const mark = seen.length;
      try {
        await client.decide(late, { retries: 5 });
      } catch (err) {
        if (err.code === grpc.status.DEADLINE_EXCEEDED) out.unkeyed_deadline = { code: err.status, attempts: seen.length - mark };
      }
    }
    // Per-call options: a call's deadline and metadata (added to the client's), and the defaults.
    const custom = new KernelClient(address, { deadlineMs: 7000, metadata: { 'x-aios-client': 'node-check' }, interceptors: [recorder(seen)] });
    try {
      let mark = seen.length;
      await custom.serverLive();
      out.defaults = seen[mark];
      mark = seen.length;
      await custom.decide(decisionRequest(PIPELINE, claim(), {}, { tenant: 'acme' }), { deadlineMs: 2500, metadata: { 'x-request-tag': 'call-1' } });
      out.per_call = seen[mark];
      out.tiny_deadline = await failure(custom.decide(decisionRequest(PIPELINE, claim(), {}, { tenant: 'acme' }), { deadlineMs: 0 }));
    } finally {
      custom.close();
    }
  } finally {
    client.close();
  }
  return out;
}

// Point 4: streams have their own deadline (none by default), yield answers as they come, can be
// cancelled, and keep the answers they got when they fail.
async function checkStreams(address) {
  const seen = [];
  const out = {};
  const UNARY_MS = 50;
  const client = new KernelClient(address, { deadlineMs: UNARY_MS, interceptors: [recorder(seen)] });
  const req = (i, extra = {}) => decisionRequest(PIPELINE, claim({ claim_amount: 100 + (i % 500) }), {}, { tenant: 'acme', request_id: `node-many-${i}`, ...extra });
  try {
    const N = 1500;
    const started = Date.now();
    const answers = await client.decideMany(Array.from({ length: N }, (_, i) => req(i)));
    out.many = {
      unary_deadline_ms: UNARY_MS, requests: N, elapsed_ms: Date.now() - started, answers: answers.length,
      distinct_ids: new Set(answers.map((a) => a.request_id)).size,
      errors: answers.filter((a) => a.error_code).length,
      stream_deadline_ms: seen.find((s) => s.method.endsWith('/DecideStream')).deadline_ms,
      audit_sequence_types: [...new Set(answers.map((a) => typeof a.audit_sequence))],
    };
    // A stream's own deadline: 3 answers, then the caller waits past it; the rejection keeps the 3.
    async function* slow() {
      for (let i = 0; i < 3; i += 1) yield req(i);
      await sleep(1500);
      yield req(3);
    }
    try {
      await client.decideMany(slow(), { deadlineMs: 700 });
      out.stream_deadline = { code: 'OK' };
    } catch (err) {
      out.stream_deadline = { code: statusName(err.code), answers: (err.answers || []).length };
    }
    // Answers as they arrive; cancel after 5 of 2,000: the iteration ends quietly, the call is CANCELLED.
    const stream = client.decideStream(Array.from({ length: 2000 }, (_, i) => req(i)));
    const status = new Promise((resolve) => { stream.call.on('status', (s) => resolve(statusName(s.code))); });
    let got = 0;
    let threw = null;
    try {
      for await (const answer of stream) {
        got += answer ? 1 : 0;
        if (got === 5) stream.cancel();
      }
    } catch (err) {
      threw = String(err);
    }
    out.cancelled = { got, threw, status: await status };
    // Leaving a for-await loop early cancels the stream too.
    const left = client.decideStream(Array.from({ length: 2000 }, (_, i) => req(i)));
    const leftStatus = new Promise((resolve) => { left.call.on('status', (s) => resolve(statusName(s.code))); });
    for await (const answer of left) if (answer) break; // eslint-disable-line no-unreachable-loop
    out.broke_out = { status: await leftStatus };
    // write() backpressure: big requests fill the stream's buffer; each write waits for room, all are answered.
    const big = 'x'.repeat(256 * 1024);
    const manual = client.decideStream(undefined);
    const writer = (async () => {
      for (let i = 0; i < 32; i += 1) {
        await manual.write(decisionRequest(PIPELINE, claim(), { description: big }, { tenant: 'acme', request_id: `node-big-${i}` }));
      }
      manual.end();
    })();
    const bigAnswers = [];
    for await (const answer of manual) bigAnswers.push(answer);
    await writer;
    out.backpressure = {
      written: manual.sent, drain_waits: manual.drainWaits, answers: bigAnswers.length,
      distinct_ids: new Set(bigAnswers.map((a) => a.request_id)).size,
    };
    // A request that cannot be sent ends the stream with the reason, naming the field.
    async function* bad() {
      yield req(0);
      yield { pipeline: PIPELINE, request_id: 'node-bad', fields: { prior_claims: { int_value: 2n ** 64n } } };
    }
    try {
      await client.decideMany(bad());
      out.bad_request = { error: null };
    } catch (err) {
      out.bad_request = { error: err.constructor.name, message: err.message };
    }
  } finally {
    client.close();
  }
  return out;
}

// Point 5 and 6: credentials and channel options reach the channel; the Health service has List.
async function checkChannel(address) {
  const out = { health_methods: Object.keys(proto.grpc.health.v1.Health.service) };
  const explicit = new KernelClient(address, { credentials: grpc.credentials.createInsecure(), channelOptions: { 'grpc.primary_user_agent': 'aios-node-check' } });
  try {
    out.explicit_insecure_live = (await explicit.serverLive()).live;
    try {
      const listed = await explicit.healthList();
      out.health_list = { code: 'OK', statuses: Object.fromEntries(Object.entries(listed.statuses).map(([k, v]) => [k, v.status])) };
    } catch (err) {
      out.health_list = { code: statusName(err.code), details: err.details };
    }
  } finally {
    explicit.close();
  }
  const tiny = new KernelClient(address, { channelOptions: { 'grpc.max_receive_message_length': 64 } });
  try {
    out.max_receive_64 = await failure(tiny.modelMetadata(MODEL));
  } finally {
    tiny.close();
  }
  return out;
}

// Point 7: int64 fields come back as exact decimal strings (a task's created_unix_ns is past 2^53).
async function checkInt64(client) {
  const task = await client.call('tasks', 'StartTask', {
    request: decisionRequest(PIPELINE, claim(), {}, { tenant: 'acme', request_id: 'node-task-1' }),
  });
  return {
    task_id: task.task_id, created_unix_ns: task.created_unix_ns, created_type: typeof task.created_unix_ns,
    audit_from_sequence_type: typeof task.audit_from_sequence,
  };
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

    // Each part reports its own failure ({error}) so one broken part does not hide what the others saw.
    const part = (run) => run().catch((err) => ({ error: String(err && err.stack ? err.stack : err) }));
    report.values = await part(() => checkValues(client));
    report.refusals = await part(() => checkRefusals(address));
    report.streams = await part(() => checkStreams(address));
    report.channel = await part(() => checkChannel(address));
    report.int64 = await part(() => checkInt64(client));
    report.decide.phase_timing_types = [...new Set(Object.values(decision.phase_timings_ns).map((v) => typeof v))];
  } finally {
    client.close();
  }
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main().catch((err) => {
  process.stderr.write(`cross_language_check: ${err.stack || err}\n`);
  process.exit(1);
});
