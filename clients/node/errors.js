'use strict';
// What a failed call says, and whether its request may be sent again (README "Retrying: which answers to send
// again"): KernelError, maySendAgain and the trailer helpers of clients/node/aios_client.js, which exports them.

const grpc = require('@grpc/grpc-js');

// Refusals a caller may simply send again (README "Retrying"): a full queue or busy kernel
// (RESOURCE_EXHAUSTED, with a retry-after-ms hint), the same idempotency key in flight (ABORTED, with
// a hint), a kernel draining (UNAVAILABLE). DEADLINE_EXCEEDED only with an idempotency key: without
// one a retry may decide twice. The same rule as kernel/decision_client.py.
const RETRYABLE = new Set([grpc.status.RESOURCE_EXHAUSTED, grpc.status.ABORTED, grpc.status.UNAVAILABLE]);
// grpcio's own RESOURCE_EXHAUSTED for a call past the kernel's `workers` (threaded front end): never run.
const GRPC_CALL_LIMIT = 'Concurrent RPC limit exceeded!';
const CLOSED_DETAILS = 'Channel has been shut down (KernelClient.close() was called)';

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
// ("Cancelling all calls" at the end of a drain, a connection lost) proves nothing. A RESOURCE_EXHAUSTED only
// when it is the kernel's (its retry-after-ms or aios-not-decided trailer) or gRPC's call limit (never run). As
// kernel/decision_client.py's may_send_again.
function maySendAgain(err, request) {
  const keyed = Boolean(request.idempotency_key);
  if (err.code === grpc.status.DEADLINE_EXCEEDED) return keyed;
  if (!RETRYABLE.has(err.code) || err.auditSequence !== null) return false;
  if (err.code === grpc.status.RESOURCE_EXHAUSTED) {
    // The kernel's refusals say when to come back (retry-after-ms) or that nothing was decided; gRPC's own
    // refusal of a call past the threaded front end's `workers` never ran it. Any other came from gRPC, such as
    // this client's own "Received message larger than max" about the answer to a request the kernel DID
    // decide: sent again, it would be decided again (a client audit: one request decided 4 times).
    return parseRetryAfter(firstTrailer(err.metadata, 'retry-after-ms')) !== null
      || firstTrailer(err.metadata, 'aios-not-decided') !== undefined
      || err.details === GRPC_CALL_LIMIT;
  }
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
// ServiceError, or a DecideStream error answer (its retry_after_ms; from a kernel older than that field,
// its error_message's "retry after N ms").
function retryAfterMs(errOrAnswer) {
  if (!errOrAnswer) return null;
  if (errOrAnswer instanceof KernelError) return errOrAnswer.retryAfterMs;
  if (errOrAnswer.metadata) return parseRetryAfter(firstTrailer(errOrAnswer.metadata, 'retry-after-ms'));
  if (errOrAnswer.error_code) {
    if (errOrAnswer.retry_after_ms) return Number(errOrAnswer.retry_after_ms);
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

// A call on a closed client: grpc-js throws a plain Error("Channel has been shut down"), with no code; the
// caller gets a KernelError like any other failure (UNAVAILABLE, as grpc-js answers a call the close cut
// before it started; nothing was sent, and decide() does not send it again: the channel stays closed).
function isChannelClosed(err) {
  return err instanceof Error && typeof err.code !== 'number' && /Channel has been shut down/.test(err.message);
}

function closedError() {
  return new KernelError({ code: grpc.status.UNAVAILABLE, details: CLOSED_DETAILS, message: `${grpc.status.UNAVAILABLE} UNAVAILABLE: ${CLOSED_DETAILS}`, metadata: new grpc.Metadata() });
}

module.exports = {
  KernelError, RETRYABLE, statusName, firstTrailer, maySendAgain, retryAfterMs, auditSequence, wrapError,
  isChannelClosed, closedError,
};
