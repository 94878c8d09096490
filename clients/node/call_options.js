'use strict';
// The options every call takes: metadata merged from the client's and the call's, a deadline in ms, an
// AbortSignal.

const grpc = require('@grpc/grpc-js');

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

module.exports = { toMetadata, resolveDeadline, abortError, sleep };
