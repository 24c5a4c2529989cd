// switchboard.js: a browser client for a switchboard broker, speaking the JSON form of
// the protocol (docs/protocol.md) over a WebSocket.
//
// An ES module with no dependencies and no build step:
//
//     import { Switchboard } from "/switchboard.js";
//
// clients/js/README.md documents the API. This file keeps to what every current browser
// has (WebSocket, TextEncoder, Promise), so it also runs anywhere else those exist.

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;

/**
 * Error codes from the broker, by name. Codes below 100 end the connection; codes
 * from 100 refuse one request and the connection goes on.
 */
export const ErrorCode = Object.freeze({
  Normal: 0,
  Malformed: 1,
  FrameTooLarge: 2,
  UnknownKind: 3,
  HandshakeRequired: 4,
  UnsupportedVersion: 5,
  Refused: 6,
  TooManyConnections: 7,
  IdleTimeout: 8,
  HandshakeTimeout: 9,
  SlowConsumer: 10,
  ShuttingDown: 11,
  Replaced: 12,
  Truncated: 13,
  ClosedByHost: 14,
  InvalidId: 100,
  TooManySessions: 101,
  RateLimited: 102,
  Unavailable: 103,
});

// Closes after which connecting again cannot help or would undo someone's decision:
// the client sent something the broker cannot read, the host refused the user, a newer
// connection of the same user took over, or the host closed this one on purpose.
// Everything else (a restart, an idle or slow-consumer close, a full broker, a lost
// network) is worth another try.
const FINAL_CODES = new Set([
  ErrorCode.Malformed,
  ErrorCode.FrameTooLarge,
  ErrorCode.UnknownKind,
  ErrorCode.HandshakeRequired,
  ErrorCode.UnsupportedVersion,
  ErrorCode.Refused,
  ErrorCode.Replaced,
  ErrorCode.Truncated,
  ErrorCode.ClosedByHost,
  ErrorCode.InvalidId,
]);

const DEFAULTS = Object.freeze({
  token: "",
  reconnect: true,
  minDelayMs: 500,
  maxDelayMs: 30000,
  closeTimeoutMs: 2000,
});

const utf8 = new TextEncoder();

/** A refusal or a close from the broker, or a local failure, with the broker's code. */
export class SwitchboardError extends Error {
  /**
   * @param {string} message
   * @param {number} code one of ErrorCode, or -1 for a failure on this side
   * @param {number} request the request it answers, or 0
   */
  constructor(message, code = -1, request = 0) {
    super(message);
    this.name = "SwitchboardError";
    this.code = code;
    this.request = request;
  }
}

/**
 * One client: one user's connection to a broker, connected again after it drops.
 *
 * Callbacks are plain properties (`onMessage`, `onNotice`, `onOpen`, `onClose`,
 * `onError`), set on the instance or passed in the options.
 */
export class Switchboard {
  /**
   * @param {string} url the broker's WebSocket address; in a page a path such as
   *   "/ws" is taken relative to the page, with ws: or wss: to match http: or https:
   * @param {object} options
   * @param {string} options.user the user id to ask for
   * @param {string} [options.token] credentials for the host's on_connect hook
   * @param {boolean} [options.reconnect] connect again after a connection drops
   *   (default true)
   * @param {number} [options.minDelayMs] first reconnect delay (default 500)
   * @param {number} [options.maxDelayMs] longest reconnect delay (default 30000)
   * @param {Function} [options.WebSocket] a WebSocket constructor, where there is no
   *   global one
   */
  constructor(url, options = {}) {
    if (!options.user) throw new TypeError("Switchboard: options.user is required");
    this.url = resolveUrl(url);
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) {
      throw new TypeError("Switchboard: no WebSocket here; pass options.WebSocket");
    }

    /** Called with each message: {id, kind, sender, target, sentAt, payload}. */
    this.onMessage = options.onMessage || null;
    /** Called with each notice: {kind, request, count, subject, text}. */
    this.onNotice = options.onNotice || null;
    /** Called after each handshake: {user, connection, heartbeatMs, maxFrame, reconnected}. */
    this.onOpen = options.onOpen || null;
    /** Called when a connection ends: {code, reason, reconnecting}. */
    this.onClose = options.onClose || null;
    /** Called with a SwitchboardError that answers no pending promise. */
    this.onError = options.onError || null;

    /** The user id the broker named in its welcome; null before the first one. */
    this.user = null;
    /**
     * The sessions this client joined with subscribe() and has not left, including
     * those still being joined; each is joined again after a reconnect. Sessions the
     * host added the connection to are not in it.
     */
    this.sessions = new Set();

    this._ws = null;
    this._welcome = null; // the current connection's welcome, once it came
    this._nextRequest = 1;
    this._pending = new Map(); // request id -> {op, session, resolve, reject}
    this._connecting = null; // {promise, resolve, reject} while connect() is unsettled
    this._closing = null; // {promise, resolve} once close() was called
    this._attempts = 0; // failed connections since the last welcome
    this._everOpened = false;
    this._lastClose = null; // the broker's ERROR or CLOSE before the socket ended
    this._retryTimer = null;
    this._heartbeatTimer = null;
    this._closeTimer = null;
    this._lastSent = 0;
    this._lastReceived = 0;
  }

  /** True between a welcome and the end of that connection. */
  get connected() {
    return this._welcome !== null;
  }

  /**
   * Connects, and resolves with the broker's welcome once the handshake succeeds. With
   * `reconnect` on, a failed attempt is retried with backoff and the promise waits;
   * it rejects only when the broker refuses the user (or another close that
   * reconnecting cannot mend), or when close() is called first.
   *
   * @returns {Promise<{user: string, connection: number, heartbeatMs: number,
   *   maxFrame: number, reconnected: boolean}>}
   */
  connect() {
    if (this._closing) return Promise.reject(new SwitchboardError("client is closed"));
    if (this._welcome) return Promise.resolve(this._welcome);
    if (!this._connecting) {
      let resolve, reject;
      const promise = new Promise((res, rej) => {
        resolve = res;
        reject = rej;
      });
      this._connecting = { promise, resolve, reject };
      if (!this._ws && !this._retryTimer) this._open();
    }
    return this._connecting.promise;
  }

  /**
   * Joins a session. Resolves when the broker says OK, rejects with a
   * SwitchboardError when it refuses. The session is re-joined after every reconnect;
   * a call made while disconnected waits for the next connection.
   *
   * @param {string} session
   * @returns {Promise<void>}
   */
  subscribe(session) {
    this.sessions.add(session);
    return this._request("subscribe", session).catch((error) => {
      this.sessions.delete(session);
      throw error;
    });
  }

  /**
   * Leaves a session. Resolves when the broker says OK, or at once when disconnected:
   * a new connection is a member of nothing until it joins.
   *
   * @param {string} session
   * @returns {Promise<void>}
   */
  unsubscribe(session) {
    this.sessions.delete(session);
    if (!this._welcome) return Promise.resolve();
    return this._request("unsubscribe", session);
  }

  /**
   * Sends `payload` (a string, or a Uint8Array for bytes) to every other member of
   * `session`. Returns the request id, which an onError refusal would name.
   *
   * @throws {SwitchboardError} when not connected or when the message is over the
   *   broker's max_frame
   */
  publish(session, payload) {
    const request = this._takeRequestId();
    this._send({ type: "publish", request, session, ...encodePayload(payload) });
    return request;
  }

  /**
   * Sends `payload` to every connection of `user`. Returns the request id; when no
   * connection took the message, onNotice gets a "not_delivered" notice naming it.
   *
   * @throws {SwitchboardError} when not connected or the message is too large
   */
  direct(user, payload) {
    const request = this._takeRequestId();
    this._send({ type: "direct", request, user, ...encodePayload(payload) });
    return request;
  }

  /**
   * Closes the connection and stops reconnecting. Messages the broker already queued
   * for this client still arrive before the returned promise resolves.
   *
   * @returns {Promise<void>}
   */
  close() {
    if (this._closing) return this._closing.promise;
    let resolve;
    const promise = new Promise((res) => (resolve = res));
    this._closing = { promise, resolve };

    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const ws = this._ws;
    if (!ws) {
      this._settleClosed();
      return promise;
    }
    if (ws.readyState === ws.OPEN && this._welcome) {
      this._sendRaw({ type: "close", code: ErrorCode.Normal, reason: "closed by the client" });
      // The broker answers with its own CLOSE and ends the socket; one that does not
      // is not waited for past the timeout.
      this._closeTimer = setTimeout(() => ws.close(), this.options.closeTimeoutMs);
    } else {
      ws.close();
    }
    return promise;
  }

  // --- one connection -----------------------------------------------------------

  _open() {
    let ws;
    try {
      ws = new this.WebSocket(this.url);
    } catch (error) {
      // A malformed address, or one the page may not reach: no retry mends that.
      const failure = new SwitchboardError(`cannot open ${this.url}: ${error.message}`);
      if (this._connecting) {
        this._connecting.reject(failure);
        this._connecting = null;
      } else {
        this._call(this.onError, failure);
      }
      return;
    }
    this._ws = ws;
    this._lastClose = null;
    ws.onopen = () => {
      this._lastReceived = Date.now();
      this._sendRaw({
        type: "hello",
        version: PROTOCOL_VERSION,
        user: this.options.user,
        token: this.options.token,
      });
    };
    ws.onmessage = (event) => this._receive(event.data);
    // A failed socket also fires close, which does the work.
    ws.onerror = () => {};
    ws.onclose = (event) => this._ended(ws, event);
  }

  _receive(data) {
    this._lastReceived = Date.now();
    if (typeof data !== "string") return; // this client asked for JSON; binary is not ours
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }

    switch (frame.type) {
      case "welcome":
        return this._welcomed(frame);
      case "deliver":
        return this._call(this.onMessage, {
          id: frame.id,
          kind: frame.kind,
          sender: frame.sender,
          target: frame.target,
          sentAt: new Date(frame.sent_at_us / 1000),
          payload: decodePayload(frame),
        });
      case "ok":
        return this._answered(frame.request, null);
      case "error":
        return this._refused(frame);
      case "notice":
        // The host took this connection out of a session: joining it again on the
        // next connection would undo that.
        if (frame.kind === "left" || frame.kind === "session_closed") {
          this.sessions.delete(frame.subject);
        }
        return this._call(this.onNotice, {
          kind: frame.kind,
          request: frame.request,
          count: frame.count,
          subject: frame.subject,
          text: frame.text,
        });
      case "ping":
        return this._sendRaw({ type: "pong" });
      case "close":
        this._lastClose = { code: frame.code, reason: frame.reason };
        return;
      default:
        return; // pong, or a type a later version added
    }
  }

  _welcomed(frame) {
    this._welcome = {
      user: frame.user,
      connection: frame.connection,
      heartbeatMs: frame.heartbeat_ms,
      maxFrame: frame.max_frame,
      reconnected: this._everOpened,
    };
    this.user = frame.user;
    this._everOpened = true;
    this._attempts = 0;
    this._armHeartbeat();

    // Requests left from the connection that dropped, or made while there was none.
    // A new connection is a member of nothing: an unsubscribe is done, and a
    // subscribe is answered by the join below.
    const waiting = new Map();
    for (const entry of this._pending.values()) {
      if (entry.op === "unsubscribe") {
        entry.resolve();
      } else {
        if (!waiting.has(entry.session)) waiting.set(entry.session, []);
        waiting.get(entry.session).push(entry);
      }
    }
    this._pending.clear();

    // Join every session again.
    for (const session of this.sessions) {
      const entries = waiting.get(session) || [];
      waiting.delete(session);
      const request = this._takeRequestId();
      this._pending.set(request, {
        op: "subscribe",
        session,
        resolve: () => entries.forEach((entry) => entry.resolve()),
        reject: (error) => entries.forEach((entry) => entry.reject(error)),
      });
      this._sendRaw({ type: "subscribe", request, session });
    }
    // A subscribe whose session was left again before this connection came.
    for (const entries of waiting.values()) {
      const error = new SwitchboardError("unsubscribed before the join was sent");
      entries.forEach((entry) => entry.reject(error));
    }

    if (this._connecting) {
      this._connecting.resolve(this._welcome);
      this._connecting = null;
    }
    this._call(this.onOpen, this._welcome);
  }

  _answered(request, error) {
    const entry = this._pending.get(request);
    if (!entry) return false;
    this._pending.delete(request);
    if (error) entry.reject(error);
    else entry.resolve();
    return true;
  }

  _refused(frame) {
    const error = new SwitchboardError(frame.reason, frame.code, frame.request);
    if (frame.code < 100) {
      // The connection is about to close; the CLOSE that follows says the same.
      this._lastClose = { code: frame.code, reason: frame.reason };
      return;
    }
    if (!this._answered(frame.request, error)) this._call(this.onError, error);
  }

  _ended(ws, event) {
    if (ws !== this._ws) return;
    const wasOpen = this._welcome !== null;
    this._ws = null;
    this._welcome = null;
    clearTimeout(this._heartbeatTimer);
    this._heartbeatTimer = null;
    clearTimeout(this._closeTimer);
    this._closeTimer = null;

    const close = this._lastClose || {
      code: event.code === 1000 ? ErrorCode.Normal : -1,
      reason: event.reason || "connection lost",
    };
    const final =
      this._closing !== null || !this.options.reconnect || FINAL_CODES.has(close.code);
    // An attempt that never got a welcome is not reported while retrying, so a broker
    // that is down for a while does not produce a close per attempt.
    if (wasOpen || final) {
      this._call(this.onClose, { code: close.code, reason: close.reason, reconnecting: !final });
    }

    if (!final) {
      this._retry();
      return;
    }
    const error = new SwitchboardError(close.reason, close.code);
    for (const entry of this._pending.values()) entry.reject(error);
    this._pending.clear();
    if (this._connecting) {
      this._connecting.reject(error);
      this._connecting = null;
    }
    if (this._closing) this._settleClosed();
  }

  // Exponential backoff with jitter: the n-th retry waits between half and all of
  // min(maxDelay, minDelay * 2^n), so that clients dropped together by a restart do
  // not all come back in the same millisecond.
  _retry() {
    const { minDelayMs, maxDelayMs } = this.options;
    const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(this._attempts, 30));
    const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    this._attempts += 1;
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (!this._closing) this._open();
    }, delay);
  }

  _settleClosed() {
    const error = new SwitchboardError("client is closed");
    for (const entry of this._pending.values()) entry.reject(error);
    this._pending.clear();
    if (this._connecting) {
      this._connecting.reject(error);
      this._connecting = null;
    }
    this._closing.resolve();
  }

  // --- heartbeats ---------------------------------------------------------------

  // One timer, set for whichever comes first: a PING after heartbeat_ms without
  // sending, or giving the broker up after three heartbeats without hearing from it
  // (it writes at least every two).
  _armHeartbeat() {
    clearTimeout(this._heartbeatTimer);
    const welcome = this._welcome;
    if (!welcome || !(welcome.heartbeatMs > 0)) return;
    const now = Date.now();
    const pingAt = this._lastSent + welcome.heartbeatMs;
    const deadAt = this._lastReceived + 3 * welcome.heartbeatMs;
    this._heartbeatTimer = setTimeout(() => {
      this._heartbeatTimer = null;
      const now = Date.now();
      if (now >= this._lastReceived + 3 * welcome.heartbeatMs) {
        // Closing the socket leads to _ended, which reconnects.
        if (this._ws) this._ws.close();
        return;
      }
      if (now >= this._lastSent + welcome.heartbeatMs) this._sendRaw({ type: "ping" });
      this._armHeartbeat();
    }, Math.max(0, Math.min(pingAt, deadAt) - now));
  }

  // --- sending ------------------------------------------------------------------

  _request(op, session) {
    return new Promise((resolve, reject) => {
      if (this._closing) {
        reject(new SwitchboardError("client is closed"));
        return;
      }
      const entry = { op, session, resolve, reject };
      if (!this._welcome) {
        // Not connected: the next welcome sends it with the re-joins.
        this._pending.set(-this._takeRequestId(), entry);
        return;
      }
      const request = this._takeRequestId();
      this._pending.set(request, entry);
      this._sendRaw({ type: op, request, session });
    });
  }

  _send(frame) {
    if (!this._welcome) throw new SwitchboardError("not connected");
    const text = JSON.stringify(frame);
    // The broker ends a connection that sends more than max_frame bytes; refusing
    // here keeps the connection. A UTF-16 unit is at most 3 bytes of UTF-8, so most
    // messages need no encoding to know they fit.
    const max = this._welcome.maxFrame;
    if (text.length * 3 > max) {
      const bytes = utf8.encode(text).length;
      if (bytes > max) {
        throw new SwitchboardError(
          `message of ${bytes} bytes is over the broker's limit of ${max}`,
          ErrorCode.FrameTooLarge,
        );
      }
    }
    this._ws.send(text);
    this._lastSent = Date.now();
  }

  _sendRaw(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== ws.OPEN) return;
    ws.send(JSON.stringify(frame));
    this._lastSent = Date.now();
  }

  _takeRequestId() {
    const id = this._nextRequest;
    // Request ids are u32 and 0 means "no request", so they wrap from 2^32 - 1 to 1.
    this._nextRequest = id >= 0xffffffff ? 1 : id + 1;
    return id;
  }

  // A throwing callback must not break the client's own bookkeeping.
  _call(callback, value) {
    if (!callback) return;
    try {
      callback.call(this, value);
    } catch (error) {
      setTimeout(() => {
        throw error;
      });
    }
  }
}

function resolveUrl(url) {
  const location = globalThis.location;
  if (!location || /^wss?:/i.test(url)) return url;
  const resolved = new URL(url, location.href);
  resolved.protocol = resolved.protocol === "https:" ? "wss:" : "ws:";
  return resolved.href;
}

function encodePayload(payload) {
  if (typeof payload === "string") return { payload };
  if (payload instanceof Uint8Array) return { payload_base64: toBase64(payload) };
  if (payload instanceof ArrayBuffer) return { payload_base64: toBase64(new Uint8Array(payload)) };
  throw new TypeError("Switchboard: a payload is a string, a Uint8Array or an ArrayBuffer");
}

function decodePayload(frame) {
  if (typeof frame.payload_base64 === "string") return fromBase64(frame.payload_base64);
  return typeof frame.payload === "string" ? frame.payload : "";
}

function toBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
