"""The Node client (clients/node/aios_client.js) where a call goes wrong: a kernel draining under a slow reader, a
stream ended early by the caller's mistake, refusals that must not be sent again, messages past grpc-js's
defaults, a closed client. Each against a real kernel over gRPC (an audit of the Node client found each);
skipped, never failed, where Node or the client's packages are not installed.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import NODE_CLIENT, ROOT, start_claims_kernel

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb

CLIENT = str(NODE_CLIENT / "aios_client.js")

# Shared by the scripts below: process.argv[1] is the client, [2] the kernel's address.
PRELUDE = """
const client_module = require(process.argv[1]);
const { KernelClient, KernelError, decisionRequest, statusName } = client_module;
const address = process.argv[2];
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });
const claim = (i) => ({ claim_amount: 300 + (i % 700), customer_tier: 'gold', claim_type: 'auto',
  policy_age_months: 28n, prior_claims: 0n, fraud_score: 0.05, days_since_incident: 3n, has_police_report: true });
const request = (id, i = 0) => decisionRequest('claims_triage', claim(i), {}, { tenant: 'acme', request_id: id });
const failure = (err) => ({ name: err.constructor.name, code: err.code === undefined ? null : statusName(err.code),
  kernel_error: err instanceof KernelError, message: err.message, details: err.details === undefined ? null : err.details });
const report = (value) => { process.stdout.write(JSON.stringify(value) + '\\n'); };
"""


@pytest.fixture(scope="module")
def kernel(node, claims_models, tmp_path_factory):
    server = start_claims_kernel(claims_models, tmp_path_factory.mktemp("node-faults"))
    yield server
    server.stop(grace=1)


def run_node(node: str, script: str, address: str, *args: str, timeout: float = 60) -> dict:
    """What the script reported (its one JSON line)."""
    run = subprocess.run([node, "-e", PRELUDE + script, CLIENT, address, *args],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def decided(server, prefix: str) -> list[str]:
    """The request_ids of the decisions recorded whose id starts with ``prefix`` (one per decision made)."""
    return [r.request_id for r in server.decisions.audit.read(from_sequence=0, kind=kpb.DECISION)
            if r.request_id.startswith(prefix)]


# ── H1: a DecideStream that ends with an error status loses no answer the kernel decided ──────────────────

SLOW_READER = """
(async () => {
  const c = new KernelClient(address);
  let stop = false;
  async function* requests() { for (let i = 0; !stop; i += 1) yield request(`h1-${i}`, i); }
  const stream = c.decideStream(requests());
  const got = [];
  let error = null;
  let gotAtError = null;
  try {
    for await (const answer of stream) {
      got.push([answer.request_id, answer.error_code]);
      if (got.length === 300) process.stderr.write('read 300\\n');  // the test stops the kernel now
      await sleep(1);  // a slow reader: answers pile up unread
    }
  } catch (err) {
    error = failure(err);
    gotAtError = got.length;
  }
  stop = true;
  report({ got, error, gotAtError, sent: stream.sent, readerWaits: stream.readerWaits });
  c.close();
})();
"""


def test_a_drained_stream_delivers_every_decided_answer_before_its_error(node, claims_models, tmp_path):
    """(Node client audit H1) grpc-js read in paused mode holds answers it received but did not push; a stream
    ending with a non-OK status discards them. The kernel's drain status says what the stream did not answer was
    not decided, so a caller resent decided requests: 108 decided twice. Every decision must reach the caller,
    then the drain's error."""
    from claims_support import copy_pipelines

    from kernel.audit import RecordFilter, iter_directory
    from kernel.pipelines.stream_drains import DRAINED
    from kernel.testing.processes import ServeProcess

    pipelines, data_dir = copy_pipelines(tmp_path / "pipelines"), tmp_path / "data"
    server = ServeProcess(claims_models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    caller = subprocess.Popen([node, "-e", PRELUDE + SLOW_READER, CLIENT, server.address],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert caller.stderr.readline().strip() == "read 300"
        code, err = server.stop()  # SIGTERM: the kernel drains, ending the stream with DRAINED
        assert code == 0, err
        out, err = caller.communicate(timeout=60)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.communicate()
    assert caller.returncode == 0, err
    got = json.loads(out)
    assert got["error"] is not None and got["error"]["code"] == "UNAVAILABLE", got["error"]
    assert got["error"]["details"] == DRAINED and got["error"]["kernel_error"]
    assert got["gotAtError"] == len(got["got"])  # the error came after every answer
    answered = [request_id for request_id, error_code in got["got"] if not error_code]
    recorded = [r.request_id for r in iter_directory(data_dir / "audit", 0, RecordFilter(kind=kpb.DECISION))]
    assert len(recorded) > 300
    assert sorted(answered) == sorted(recorded)  # every decision made reached the caller, once
    assert got["readerWaits"] > 0  # the writer waited for the slow reader (the queue stayed bounded)


# ── M2 and M3: a stream the caller ends early still delivers what was sent ──────────────────────────────────

WRITE_AFTER_END = """
(async () => {
  const c = new KernelClient(address);
  const stream = c.decideStream(undefined);
  for (let i = 0; i < 3; i += 1) await stream.write(request(`m2-${i}`, i));
  stream.end();
  let late = null;
  try { await stream.write(request('m2-late')); } catch (err) { late = failure(err); }
  const answers = [];
  const hung = Symbol('hung');
  const iterate = (async () => { for await (const a of stream) answers.push(a.request_id); })();
  const outcome = await Promise.race([iterate.then(() => 'ended', (err) => failure(err)), sleep(15000).then(() => hung)]);
  report({ late, answers, outcome: outcome === hung ? 'hung' : outcome, status: stream.status && statusName(stream.status.code) });
  c.close();
  process.exit(0);
})();
"""


def test_write_after_end_throws_and_the_stream_still_ends(node, kernel):
    """(M2) write() after end() resolved; grpc-js then destroyed the call (ERR_STREAM_WRITE_AFTER_END), its status
    never came and the iteration hung, the answers to what was written before lost."""
    got = run_node(node, WRITE_AFTER_END, f"127.0.0.1:{kernel.port}")
    assert got["late"] is not None and "after end()" in got["late"]["message"], got
    assert got["outcome"] == "ended" and got["status"] == "OK", got
    assert sorted(got["answers"]) == ["m2-0", "m2-1", "m2-2"]
    assert sorted(decided(kernel, "m2-")) == ["m2-0", "m2-1", "m2-2"]  # the late one was not sent


BAD_REQUEST_MIDWAY = """
(async () => {
  const c = new KernelClient(address);
  const [how, prefix] = process.argv.slice(3);
  async function* requests() {
    for (let i = 0; i < 300; i += 1) yield request(`${prefix}-${i}`, i);
    if (how === 'throws') throw new Error('the source of requests failed');
    yield { pipeline: 'claims_triage', request_id: `${prefix}-bad`, fields: { prior_claims: { int_value: 2n ** 64n } } };
  }
  const out = {};
  const stream = c.decideStream(requests());
  const answers = [];
  try { for await (const a of stream) answers.push(a.request_id); out.stream = null; } catch (err) { out.stream = failure(err); }
  out.stream_answers = answers;
  try { await c.decideMany(requests()); out.many = null; } catch (err) {
    out.many = failure(err);
    out.many_answers = (err.answers || []).map((a) => a.request_id);
  }
  report(out);
  c.close();
})();
"""


@pytest.mark.parametrize("how", ["bad-request", "throws"])
def test_a_request_that_cannot_be_sent_ends_the_stream_after_the_answers_to_those_sent(node, kernel, how):
    """(M3) a bad request (or a failing async generator) midway cancelled the call, throwing away answers to
    requests already sent and decided (300 sent and decided, 298 delivered). Now the stream is half-closed, every
    answer delivered, then the error thrown; decideMany's rejection holds every answer."""
    prefix = f"m3-{how}"
    got = run_node(node, BAD_REQUEST_MIDWAY, f"127.0.0.1:{kernel.port}", how, prefix)
    expected = sorted(f"{prefix}-{i}" for i in range(300))
    for case in ("stream", "many"):
        if how == "throws":
            assert got[case]["name"] == "Error" and "source of requests failed" in got[case]["message"], got[case]
        else:
            assert got[case]["name"] == "RangeError" and "prior_claims" in got[case]["message"], got[case]
    assert sorted(got["stream_answers"]) == expected
    assert sorted(got["many_answers"]) == expected
    assert sorted(decided(kernel, f"{prefix}-")) == sorted(expected * 2)  # each sent twice (two streams), no more


# ── M1: call() refuses a streaming RPC at once ──────────────────────────────────────────────────────────────

STREAMING_CALL = """
(async () => {
  const c = new KernelClient(address);
  const out = {};
  const methods = [['tasks', 'WatchTask'], ['reviews', 'WatchReviews'], ['audit', 'StreamAudit'],
    ['decisions', 'DecideStream'], ['inference', 'ModelStreamInfer'], ['health', 'Watch'], ['metadata', 'get'],
    ['decisions', 'close']];
  for (const [service, method] of methods) {
    try { c.call(service, method, {}); out[method] = null; } catch (err) { out[method] = failure(err); }
  }
  out.unary = (await c.call('admin', 'ListPipelines', {})).pipelines.map((p) => p.name);
  report(out);
  c.close();
})();
"""


def test_call_refuses_a_streaming_rpc_naming_what_to_use(node, kernel):
    """(M1) call() with a streaming method never settled, then crashed the process with an unhandled 'error'."""
    got = run_node(node, STREAMING_CALL, f"127.0.0.1:{kernel.port}", timeout=30)
    for method in ("WatchTask", "WatchReviews", "StreamAudit", "DecideStream", "ModelStreamInfer", "Watch"):
        assert got[method]["name"] == "TypeError", (method, got[method])
        assert method in got[method]["message"] and "streaming" in got[method]["message"]
    assert "decideStream" in got["DecideStream"]["message"]
    assert "client.tasks.WatchTask(" in got["WatchTask"]["message"]
    assert got["get"]["name"] == got["close"]["name"] == "TypeError"  # not an RPC: never called
    assert "claims_triage" in got["unary"]


# ── call() refuses a request key protobufjs would drop ─────────────────────────────────────────────────────

CALL_KEYS = """
(async () => {
  const c = new KernelClient(address);
  const out = {};
  const attempt = (name, service, method, request) => {
    try { c.call(service, method, request).catch(() => {}); out[name] = null; } catch (err) { out[name] = failure(err); }
  };
  attempt('page_token', 'tasks', 'ListTasks', { tenant: 'keys', page_size: 1, pageToken: 'x' });
  attempt('task_key', 'tasks', 'StartTask', { request: { ...request('keys-task'), idempotencyKey: 'keys-k' } });
  attempt('bogus', 'reviews', 'ListReviews', { bogus: 1 });
  // Spelled as in the .proto: sent, and answered.
  for (let i = 0; i < 2; i += 1) await c.call('tasks', 'StartTask', { request: request(`keys-task-${i}`, i) });
  const first = await c.call('tasks', 'ListTasks', { tenant: 'acme', page_size: 1 });
  const second = await c.call('tasks', 'ListTasks', { tenant: 'acme', page_size: 1, page_token: first.next_page_token });
  out.pages_differ = first.tasks[0].task_id !== second.tasks[0].task_id;
  report(out);
  c.close();
})();
"""


def test_call_refuses_a_request_key_that_is_not_a_field_of_the_rpcs_request(node, kernel):
    """protobufjs drops a key it does not know without a word: ListTasks with `pageToken` answered the first page
    for ever, and a hand-built StartTask with `idempotencyKey` started a task without its key (a retry then starts
    another, where decide() refused the same request). call() refuses such a key, naming it."""
    got = run_node(node, CALL_KEYS, f"127.0.0.1:{kernel.port}", timeout=30)
    assert got["page_token"]["name"] == "TypeError" and "did you mean 'page_token'" in got["page_token"]["message"]
    assert got["task_key"]["name"] == "TypeError" and "did you mean 'idempotency_key'" in got["task_key"]["message"]
    assert got["bogus"]["name"] == "TypeError" and "ListReviewsRequest" in got["bogus"]["message"]
    assert got["pages_differ"] is True


# ── M4: the client's own RESOURCE_EXHAUSTED is not sent again ───────────────────────────────────────────────

DECIDE_TOO_LARGE_ANSWER = """
(async () => {
  const c = new KernelClient(address, { channelOptions: { 'grpc.max_receive_message_length': 64 } });
  const call = c.call.bind(c);
  let sent = 0;
  c.call = (...args) => { if (args[1] === 'Decide') sent += 1; return call(...args); };
  try { await c.decide(request('m4-too-large'), { retries: 3 }); report({ code: 'OK', sent }); } catch (err) {
    report({ ...failure(err), sent, may_send_again: client_module.maySendAgain(err, request('m4-too-large')) });
  }
  c.close();
})();
"""


def test_decide_does_not_resend_a_resource_exhausted_without_the_kernels_hint(node, kernel):
    """(M4) decide({retries}) retried any RESOURCE_EXHAUSTED, the client's own "Received message larger than max"
    too: a request already decided was decided 4 times."""
    got = run_node(node, DECIDE_TOO_LARGE_ANSWER, f"127.0.0.1:{kernel.port}")
    assert got["code"] == "RESOURCE_EXHAUSTED" and "larger than max" in got["details"], got
    assert got["sent"] == 1 and got["may_send_again"] is False
    assert decided(kernel, "m4-too-large") == ["m4-too-large"]  # decided once


KERNEL_REFUSAL_RETRIED = """
(async () => {
  const { grpc, maySendAgain } = client_module;
  const hinted = new grpc.Metadata();
  hinted.set('retry-after-ms', '20');
  const negative = new grpc.Metadata();
  negative.set('retry-after-ms', '-5');
  const notDecided = new grpc.Metadata();
  notDecided.set('aios-not-decided', '1');
  const made = (metadata, details = 'queue full') => new KernelError({ code: grpc.status.RESOURCE_EXHAUSTED, details, message: details, metadata });
  report({
    hinted: maySendAgain(made(hinted), {}), not_decided: maySendAgain(made(notDecided), {}),
    call_limit: maySendAgain(made(new grpc.Metadata(), 'Concurrent RPC limit exceeded!'), {}),
    bare: maySendAgain(made(new grpc.Metadata()), { idempotency_key: 'k' }), negative_hint: maySendAgain(made(negative), {}),
  });
})();
"""


def test_a_resource_exhausted_with_the_kernels_hint_is_still_sent_again(node):
    """As the README's table and kernel/decision_client.py's may_send_again: the kernel's (a hint, aios-not-decided)
    and gRPC's call limit (never run) are sent again; one without either, or with a negative hint, is not."""
    got = run_node(node, KERNEL_REFUSAL_RETRIED, "unused")
    assert got == {"hinted": True, "not_decided": True, "call_limit": True, "bare": False, "negative_hint": False}


# ── M5: answers past grpc-js's 4 MiB default ────────────────────────────────────────────────────────────────

LARGE_ANSWER = """
(async () => {
  const out = {};
  const text = Buffer.alloc(5 * 1024 * 1024, 'a');
  const inputs = [['f32', 'FP32', 12], ['f16', 'FP16', 4], ['f64', 'FP64', 16], ['i32', 'INT32', 8],
    ['i64', 'INT64', 16], ['i8', 'INT8', 2], ['u8', 'UINT8', 2], ['flag', 'BOOL', 2]];
  const length = Buffer.alloc(4);
  length.writeUInt32LE(text.length);
  const infer = {
    model_name: 'identity', id: 'm5',
    inputs: [...inputs.map(([name, datatype, bytes]) => ({ name, datatype, shape: ['1', String(bytes / ({ FP32: 4, FP16: 2, FP64: 8, INT32: 4, INT64: 8 }[datatype] || 1))] })),
      { name: 'text', datatype: 'BYTES', shape: ['1', '1'] }],
    raw_input_contents: [...inputs.map(([, , bytes]) => Buffer.alloc(bytes)), Buffer.concat([length, text])],
  };
  for (const [name, options] of [['default', {}], ['limited', { channelOptions: { 'grpc.max_receive_message_length': 4 * 1024 * 1024 } }]]) {
    const c = new KernelClient(address, options);
    try {
      const answer = await c.modelInfer(infer);
      const echoed = answer.raw_output_contents[answer.outputs.findIndex((o) => o.name === 'text_out')];
      out[name] = { code: 'OK', echoed: echoed.length };
    } catch (err) { out[name] = failure(err); }
    c.close();
  }
  report(out);
})();
"""


def test_answers_up_to_the_kernels_message_limit_are_received(node, model_repo):
    """(M5) the client kept grpc-js's 4 MiB receive limit while the kernel answers up to 64 MiB (ListReviews pages
    up to 16 MiB): a 5 MiB answer was refused. 64 MiB by default now; channelOptions still set it."""
    from conftest import start_kernel

    server = start_kernel(model_repo)
    try:
        got = run_node(node, LARGE_ANSWER, f"127.0.0.1:{server.port}")
    finally:
        server.stop(grace=1)
    assert got["default"] == {"code": "OK", "echoed": 4 + 5 * 1024 * 1024}, got["default"]
    assert got["limited"]["code"] == "RESOURCE_EXHAUSTED", got["limited"]


# ── M7: decisionRequest refuses what it would drop or change ────────────────────────────────────────────────

REQUEST_REFUSALS = """
(async () => {
  const out = {};
  const attempt = (name, build) => { try { build(); out[name] = null; } catch (err) { out[name] = failure(err); } };
  const fields = claim(0);
  attempt('camel_idempotency', () => decisionRequest('claims_triage', fields, {}, { idempotencyKey: 'k1' }));
  attempt('camel_request_id', () => decisionRequest('claims_triage', fields, {}, { requestId: 'r1' }));
  attempt('bogus', () => decisionRequest('claims_triage', fields, {}, { bogus: 1 }));
  attempt('timeout_negative', () => decisionRequest('claims_triage', fields, {}, { timeout_ms: -5 }));
  attempt('priority_word', () => decisionRequest('claims_triage', fields, {}, { priority: 'high' }));
  attempt('priority_negative', () => decisionRequest('claims_triage', fields, {}, { priority: -1 }));
  attempt('text_null', () => decisionRequest('claims_triage', fields, { description: null }));
  attempt('text_number', () => decisionRequest('claims_triage', fields, { description: 12 }));
  attempt('valid', () => decisionRequest('claims_triage', fields, { description: 'hail' },
    { tenant: 'acme', request_id: 'm7-valid', idempotency_key: 'm7-key', priority: 1, timeout_ms: 5000n }));
  const c = new KernelClient(address);
  const raw = { ...request('m7-raw'), idempotencyKey: 'm7-raw-key' };  // a hand-built request: refused too
  try { await c.decide(raw); out.decide_raw = null; } catch (err) { out.decide_raw = failure(err); }
  // Hand-built fields that are not one-kind Values: grpc-js's INTERNAL "serialization failure", both kinds sent,
  // a misspelt kind dropped. Refused before sending, naming the field.
  const handBuilt = { plain: { claim_amount: 800 }, null_value: { claim_amount: null },
    two_kinds: { claim_amount: { number_value: 800, string_value: '800' } }, camel_kind: { claim_amount: { numberValue: 800 } } };
  for (const [name, fields] of Object.entries(handBuilt)) {
    try { await c.decide({ pipeline: 'claims_triage', request_id: `m7-${name}`, fields }); out[name] = null; } catch (err) { out[name] = failure(err); }
  }
  const good = decisionRequest('claims_triage', fields, { description: 'hail' },
    { tenant: 'acme', request_id: 'm7-valid', idempotency_key: 'm7-key', priority: 1, timeout_ms: 5000n });
  const first = await c.decide(good);
  const again = await c.decide({ ...good, request_id: 'm7-valid-again' });
  out.idempotent = { replayed: again.replayed, same: first.audit_sequence === again.audit_sequence };
  report(out);
  c.close();
})();
"""


def test_decision_request_refuses_keys_and_values_it_would_drop_or_change(node, kernel):
    """(M7) unknown option keys were dropped without a word (camelCase idempotencyKey: idempotency silently lost)
    and values changed (timeout_ms -5 sent as 0, priority 'high' as 0 and -1 as 4294967295, text null as "null")."""
    got = run_node(node, REQUEST_REFUSALS, f"127.0.0.1:{kernel.port}")
    assert got["camel_idempotency"]["name"] == "TypeError" and "'idempotency_key'" in got["camel_idempotency"]["message"]
    assert "idempotencyKey" in got["camel_idempotency"]["message"]
    assert got["camel_request_id"]["name"] == "TypeError" and "'request_id'" in got["camel_request_id"]["message"]
    assert got["bogus"]["name"] == "TypeError" and "bogus" in got["bogus"]["message"]
    assert got["timeout_negative"]["name"] == "RangeError" and "timeout_ms" in got["timeout_negative"]["message"]
    assert got["priority_word"]["name"] == "TypeError" and "priority" in got["priority_word"]["message"]
    assert got["priority_negative"]["name"] == "RangeError" and "priority" in got["priority_negative"]["message"]
    for case in ("text_null", "text_number"):
        assert got[case]["name"] == "TypeError" and "description" in got[case]["message"], got[case]
    assert got["valid"] is None
    assert got["decide_raw"]["name"] == "TypeError" and "idempotency_key" in got["decide_raw"]["message"]
    assert decided(kernel, "m7-raw") == []  # refused before sending
    for case in ("plain", "null_value", "two_kinds", "camel_kind"):
        assert got[case]["name"] == "TypeError" and "claim_amount" in got[case]["message"], got[case]
        assert decided(kernel, f"m7-{case}") == []
    assert "string_value and number_value" in got["two_kinds"]["message"]
    assert "did you mean 'number_value'" in got["camel_kind"]["message"]
    assert got["idempotent"] == {"replayed": True, "same": True}


# ── L4: a closed client fails with a KernelError ────────────────────────────────────────────────────────────

AFTER_CLOSE = """
(async () => {
  const c = new KernelClient(address);
  await c.decide(request('l4-before'));
  c.close();
  const out = {};
  try { await c.decide(request('l4-after'), { retries: 3 }); out.decide = null; } catch (err) { out.decide = failure(err); }
  try { await c.decideMany([request('l4-many')]); out.many = null; } catch (err) { out.many = failure(err); }
  try { await c.serverLive(); out.live = null; } catch (err) { out.live = failure(err); }
  report(out);
})();
"""


def test_calls_after_close_fail_with_a_kernel_error(node, kernel):
    """(L4) after close() decide rejected with grpc-js's plain Error("Channel has been shut down"), no code."""
    got = run_node(node, AFTER_CLOSE, f"127.0.0.1:{kernel.port}", timeout=30)
    for case in ("decide", "many", "live"):
        assert got[case]["kernel_error"] and got[case]["code"] == "UNAVAILABLE", (case, got[case])
        assert "shut down" in got[case]["details"]
    assert decided(kernel, "l4-") == ["l4-before"]


# ── keepalive: an idle watch outlives a client's keepalive pings ────────────────────────────────────────────

KEEPALIVE_WATCH = """
(async () => {
  // Pings every 1.2 s (gRPC's server default takes one at most every 5 minutes while nothing is sent, and
  // ends the connection at the third sooner: GOAWAY too_many_pings, here after ~6 s).
  const c = new KernelClient(address, { channelOptions: { 'grpc.keepalive_time_ms': 1200, 'grpc.keepalive_timeout_ms': 10000 } });
  const watch = c.reviews.WatchReviews({ tenant: 'keepalive' });
  const events = [];
  let error = null;
  watch.on('data', (review) => { events.push(review.state); });
  watch.on('error', (err) => { error = failure(err); });
  await sleep(10000);  // idle: nothing matches the watch
  const idle = error;
  if (!idle) {
    await c.decide(decisionRequest('claims_triage', { ...claim(0), claim_amount: 90000 }, {}, { tenant: 'keepalive' }));
    for (let i = 0; i < 100 && !events.length && !error; i += 1) await sleep(50);
  }
  watch.cancel();
  report({ idle, events });
  c.close();
})();
"""


def test_an_idle_watch_survives_the_clients_keepalive_pings(node, kernel):
    """A reviewer's idle WatchReviews from a Node client that pings to keep its connection through a NAT or load
    balancer: gRPC's server default closed the connection at the third ping within 5 minutes, ending the watch
    RESOURCE_EXHAUSTED "Bandwidth exhausted". It must stay open and deliver the next review."""
    got = run_node(node, KEEPALIVE_WATCH, f"127.0.0.1:{kernel.port}", timeout=60)
    assert got["idle"] is None, got["idle"]
    assert got["events"] == ["OPEN"], got
