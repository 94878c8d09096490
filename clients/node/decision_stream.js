'use strict';
// DecisionStream: one open DecideStream of clients/node/aios_client.js (KernelClient.decideStream/decideMany).

const { closedError, isChannelClosed, wrapError } = require('./errors');
const { checkDecisionRequest } = require('./requests');
const { abortError, resolveDeadline, toMetadata } = require('./call_options');

// The answers a DecideStream holds received but unread before write() waits for the reader (the kernel
// itself holds at most about as many requests of one stream unanswered, so memory stays bounded).
const ANSWER_HIGH_WATER = 1024; // answers

// An open DecideStream. Iterate it (for await) for the answers, in the order they arrive.
//
// Answers are taken from grpc-js as they arrive ('data', flowing mode) into the stream's own queue, never
// left with grpc-js: when a call ends with a status other than OK, grpc-js throws away the messages it had
// received but not yet handed over (subchannel-call.js maybeOutputStatus does not wait for them then), and
// the kernel's drain status says "every request this stream answered was decided; the requests it did not
// answer were not read, so not decided: send them again" — an answer lost there is a decision made twice.
// Backpressure is therefore on the write side: write(), and the pump of `requests`, wait while
// ANSWER_HIGH_WATER answers wait unread, so a slow reader slows the writer and the queue stays bounded. A
// failure (the stream's status, or a request the pump could not send) is thrown only once every answer
// received before it has been read. (grpc-js still hands messages up one per tick, so answers arriving in the
// same network read as an error status could still be dropped inside it, grpc/grpc-node#2764; the kernel's
// drain status has come apart from its last answers in every drain tried: tests/test_node_client_faults.py.)
//
// write(request) resolves once the stream can take the next (await it: that is the backpressure); a caller
// that writes without reading waits for ever once the queue is full, unless the stream has a deadline.
// end() says no more requests will come (write() after it throws); cancel() ends the stream at once (the
// iteration then ends quietly, answers not yet read dropped); breaking out of a for-await loop cancels it
// too. `sent` counts requests written; `status` is the call's status once it came. The grpc-js call is
// `stream.call` (its 'status' and 'metadata' events); do not read from it yourself.
class DecisionStream {
  constructor(client, requests, options = {}) {
    const deadlineMs = resolveDeadline(options.deadlineMs, client.streamDeadlineMs);
    const callOptions = deadlineMs === null ? {} : { deadline: new Date(Date.now() + deadlineMs) };
    if (client.closed) throw closedError();
    try {
      this.call = client.decisions.DecideStream(toMetadata(client.metadata, options.metadata), callOptions);
    } catch (err) { // the channel closed under the client (client.channel.close())
      throw isChannelClosed(err) ? closedError() : err;
    }
    this.sent = 0;
    this.drainWaits = 0; // writes that waited for the stream to drain (gRPC's write backpressure)
    this.readerWaits = 0; // writes that waited for the reader to take answers (ANSWER_HIGH_WATER)
    this.status = null;
    this._answers = []; // received, not yet read: _answers[_head..]
    this._head = 0;
    this._error = null; // the first failure: the stream's (a KernelError), or a request the pump could not send
    this._statusSeen = false; // grpc-js gave the status
    this._readEnded = false; // ... and every message before it ('end')
    this._closed = false;
    this._ended = false; // end() was called
    this._cancelled = false;
    this._signal = options.signal || null;
    this._readers = []; // next() waiting for an answer or the end
    this._writers = []; // write() waiting for room (the reader's or gRPC's)
    this.call.on('data', (answer) => { this._answers.push(answer); this._wake(this._readers); });
    this.call.on('end', () => { this._readEnded = true; this._wakeAll(); });
    this.call.on('close', () => {
      // (After the status, always; without one only where grpc-js destroyed the call: say so, never end quietly.)
      if (!this._statusSeen && !this._error && !this._cancelled) {
        this._error = new Error('the DecideStream closed without a status: requests it did not answer may have been decided');
      }
      this._closed = true;
      this._wakeAll();
    });
    this.call.on('drain', () => this._wake(this._writers));
    this.call.on('error', (err) => { if (!this._error) this._error = wrapError(err); this._wakeAll(); });
    this.call.on('status', (status) => { this.status = status; this._statusSeen = true; this._wakeAll(); });
    if (this._signal) {
      this._onAbort = () => this.cancel();
      if (this._signal.aborted) this.cancel();
      else this._signal.addEventListener('abort', this._onAbort, { once: true });
    }
    if (requests !== undefined && requests !== null) this._pump(requests);
  }

  _wake(waiters) { for (const w of waiters.splice(0)) w(); }

  _wakeAll() { this._wake(this._readers); this._wake(this._writers); }

  _wait(waiters) { return new Promise((resolve) => { waiters.push(resolve); }); }

  // Answers received and not yet read.
  get queued() { return this._answers.length - this._head; }

  // The call is over for writing: its status came (or it closed), or the caller cancelled it.
  _over() { return this._statusSeen || this._closed || this._cancelled; }

  // Every answer there will be is in the queue (the status and all messages before it came).
  _done() { return (this._statusSeen && this._readEnded) || this._closed; }

  async _pump(requests) {
    try {
      for await (const request of requests) {
        if (this._over()) return;
        await this.write(request);
      }
      this.end();
    } catch (err) {
      if (this._cancelled || this._error) return; // cancelled, or the stream failed first: its status says why
      // A request that cannot be sent (a RangeError, a failing generator): send no more, let the kernel answer
      // those sent (they may be decided: their answers must reach the caller), then throw this after them.
      if (!this._error) this._error = err;
      this.end();
      this._wakeAll();
    }
  }

  // Writes one request; resolves when the stream can take the next. Throws after end() or once the call is
  // over, and for a request it would send wrong (checkDecisionRequest), sending nothing.
  async write(request) {
    this._checkWritable();
    checkDecisionRequest(request, `request #${this.sent}`);
    if (this.queued >= ANSWER_HIGH_WATER) { // the reader is behind: wait for it before asking for more answers
      this.readerWaits += 1;
      while (this.queued >= ANSWER_HIGH_WATER && !this._over()) await this._wait(this._writers);
      this._checkWritable();
    }
    this.sent += 1;
    if (this.call.write(request)) return;
    this.drainWaits += 1;
    while (this.call.writableNeedDrain && !this._over()) await this._wait(this._writers);
  }

  _checkWritable() {
    // (grpc-js given a write after end() destroys the call: no status, an iteration that never ends.)
    if (this._ended) throw new Error('write() after end(): the stream takes no more requests');
    if (this._over()) throw this._error || new Error('the stream has ended');
  }

  // No more requests: the kernel answers those sent, then ends the stream.
  end() {
    if (this._ended) return;
    this._ended = true;
    if (!this._over() && !this.call.writableEnded) this.call.end();
  }

  cancel() {
    if (this._cancelled) return;
    this._cancelled = true;
    if (!this._statusSeen) this.call.cancel();
    this._wakeAll();
  }

  async next() {
    for (;;) {
      if (this._cancelled) { // by the caller: the iteration ends quietly (an abort signal's reason thrown)
        this._finish();
        if (this._signal && this._signal.aborted) throw abortError(this._signal);
        return { value: undefined, done: true };
      }
      if (this.queued > 0) return { value: this._take(), done: false };
      if (this._done()) { // nothing more will come: now the failure, if any
        this._finish();
        if (this._error) throw this._error;
        return { value: undefined, done: true };
      }
      await this._wait(this._readers);
    }
  }

  _take() {
    const answer = this._answers[this._head];
    this._answers[this._head] = undefined;
    this._head += 1;
    if (this._head === this._answers.length) {
      this._answers = [];
      this._head = 0;
    } else if (this._head >= ANSWER_HIGH_WATER && this._head * 2 >= this._answers.length) {
      this._answers = this._answers.slice(this._head);
      this._head = 0;
    }
    if (this._writers.length && this.queued < ANSWER_HIGH_WATER) this._wake(this._writers);
    return answer;
  }

  _finish() { if (this._signal && this._onAbort) this._signal.removeEventListener('abort', this._onAbort); }

  async return() { // a for-await loop left early: cancel the stream
    if (!this._done()) this.cancel();
    this._finish();
    return { value: undefined, done: true };
  }

  [Symbol.asyncIterator]() { return this; }
}

module.exports = { DecisionStream, ANSWER_HIGH_WATER };
