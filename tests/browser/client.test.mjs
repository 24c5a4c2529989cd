// The JavaScript client against a scripted stand-in for a WebSocket, for what is slow
// or awkward to bring about with a real broker: heartbeats, a broker that goes
// silent, backoff between attempts, a refused handshake, requests made while
// disconnected. chat.test.mjs covers the client against the real broker.
//
//     cd tests/browser && node --test client.test.mjs

import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Switchboard, ErrorCode, SwitchboardError } from "../../clients/js/switchboard.js";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `condition` until it holds, failing after `ms`. */
async function until(condition, what, ms = 2000) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** Builds a WebSocket class whose instances the test drives by hand. */
function fakeWebSocket() {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.OPEN = 1;
      this.readyState = 0;
      this.sent = [];
      this.createdAt = Date.now();
      sockets.push(this);
    }
    send(text) {
      assert.equal(this.readyState, 1, "send only on an open socket");
      this.sent.push(JSON.parse(text));
    }
    close() {
      this.end(1005, "");
    }
    // What the broker's side does:
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    receive(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    welcome(user, heartbeatMs = 20000) {
      this.receive({
        type: "welcome", version: 1, connection: sockets.indexOf(this) + 1, user,
        heartbeat_ms: heartbeatMs, max_frame: 1024,
      });
    }
    end(code = 1006, reason = "") {
      if (this.readyState === 3) return;
      this.readyState = 3;
      queueMicrotask(() => this.onclose?.({ code, reason }));
    }
    sentOf(type) {
      return this.sent.filter((frame) => frame.type === type);
    }
  }
  return { FakeSocket, sockets };
}

/** A client on a fake socket, connected and welcomed. */
async function connected(options = {}) {
  const { FakeSocket, sockets } = fakeWebSocket();
  const client = new Switchboard("ws://broker/ws", {
    user: "alice", token: "t", WebSocket: FakeSocket, minDelayMs: 20, maxDelayMs: 200,
    closeTimeoutMs: 50, ...options,
  });
  const welcomed = client.connect();
  sockets[0].open();
  sockets[0].welcome("alice", options.heartbeatMs);
  await welcomed;
  return { client, sockets };
}

describe("the JavaScript client", () => {
  it("says hello with the user and token, and resolves on welcome", async () => {
    const { client, sockets } = await connected();
    assert.deepEqual(sockets[0].sent[0], { type: "hello", version: 1, user: "alice", token: "t" });
    assert.equal(client.connected, true);
    assert.equal(client.user, "alice");
    await client.close();
  });

  it("matches ok and error to subscribe and unsubscribe by request id", async () => {
    const { client, sockets } = await connected();
    const ws = sockets[0];
    const first = client.subscribe("lobby");
    const second = client.subscribe("x".repeat(300));
    const [a, b] = ws.sentOf("subscribe");
    assert.notEqual(a.request, b.request);
    // Answers in the other order still find their promises.
    ws.receive({ type: "error", request: b.request, code: 100, reason: "session id is too long" });
    ws.receive({ type: "ok", request: a.request });
    await first;
    await assert.rejects(second, (error) => error instanceof SwitchboardError && error.code === ErrorCode.InvalidId);
    assert.deepEqual([...client.sessions], ["lobby"]);

    const left = client.unsubscribe("lobby");
    ws.receive({ type: "ok", request: ws.sentOf("unsubscribe")[0].request });
    await left;
    assert.deepEqual([...client.sessions], []);
    await client.close();
  });

  it("delivers messages and notices, text and bytes", async () => {
    const messages = [];
    const notices = [];
    const { client, sockets } = await connected({
      onMessage: (m) => messages.push(m), onNotice: (n) => notices.push(n),
    });
    const ws = sockets[0];
    ws.receive({ type: "deliver", id: 7, kind: "session", sent_at_us: 1_700_000_000_000_000, sender: "bob", target: "lobby", payload: "hi" });
    ws.receive({ type: "deliver", id: 8, kind: "direct", sent_at_us: 1_700_000_000_000_000, sender: "bob", target: "alice", payload_base64: "/wA=" });
    assert.deepEqual(messages[0], {
      id: 7, kind: "session", sender: "bob", target: "lobby",
      sentAt: new Date(Date.UTC(2023, 10, 14, 22, 13, 20)), payload: "hi",
    });
    assert.deepEqual([...messages[1].payload], [0xff, 0]);

    const request = client.direct("nobody", new Uint8Array([1, 2, 255]));
    assert.deepEqual(ws.sentOf("direct")[0], { type: "direct", request, user: "nobody", payload_base64: "AQL/" });
    ws.receive({ type: "notice", kind: "not_delivered", request, count: 0, subject: "nobody", text: "gone" });
    assert.equal(notices[0].request, request);

    const published = client.publish("lobby", "hello");
    assert.deepEqual(ws.sentOf("publish")[0], { type: "publish", request: published, session: "lobby", payload: "hello" });
    assert.throws(() => client.publish("lobby", "x".repeat(2000)), (e) => e.code === ErrorCode.FrameTooLarge);
    await client.close();
  });

  it("answers ping with pong and pings after heartbeat_ms of quiet", async () => {
    const { client, sockets } = await connected({ heartbeatMs: 150 });
    const ws = sockets[0];
    ws.receive({ type: "ping" });
    assert.equal(ws.sentOf("pong").length, 1);

    const quietSince = Date.now();
    await until(() => ws.sentOf("ping").length > 0, "a ping");
    assert.ok(Date.now() - quietSince >= 140, "no ping before the heartbeat interval");

    // Sending keeps the heartbeat quiet.
    const pings = ws.sentOf("ping").length;
    for (let i = 0; i < 4; i++) {
      await sleep(25);
      client.publish("lobby", "tick");
      ws.receive({ type: "pong" });
    }
    assert.equal(ws.sentOf("ping").length, pings);
    await client.close();
  });

  it("gives up on a silent broker and reconnects, re-joining its sessions", async () => {
    const opened = [];
    const closed = [];
    const { client, sockets } = await connected({
      heartbeatMs: 40, onOpen: (w) => opened.push(w), onClose: (c) => closed.push(c),
    });
    opened.length = 0; // the test's own connect
    const joined = client.subscribe("lobby");
    sockets[0].receive({ type: "ok", request: sockets[0].sentOf("subscribe")[0].request });
    await joined;

    // Nothing from the broker for three heartbeats: the socket is dropped.
    await until(() => sockets.length === 2, "a second socket", 1000);
    assert.equal(sockets[0].readyState, 3);
    assert.deepEqual(closed[0].reconnecting, true);

    // A subscribe made while disconnected waits for the next connection.
    const later = client.subscribe("news");
    let settled = false;
    later.then(() => (settled = true));
    await sleep(10);
    assert.equal(settled, false);

    const ws = sockets[1];
    ws.open();
    ws.welcome("alice", 40);
    assert.equal(opened[0].reconnected, true);
    const joins = ws.sentOf("subscribe");
    assert.deepEqual(joins.map((j) => j.session).sort(), ["lobby", "news"]);
    for (const join of joins) ws.receive({ type: "ok", request: join.request });
    await later;
    await client.close();
  });

  it("backs off between failed attempts, with jitter, up to the ceiling", async () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new Switchboard("ws://broker/ws", {
      user: "alice", WebSocket: FakeSocket, minDelayMs: 20, maxDelayMs: 320,
    });
    const connecting = client.connect();
    // Five attempts fail before the socket even opens.
    for (let i = 0; i < 5; i++) {
      await until(() => sockets.length === i + 1, `attempt ${i + 1}`);
      sockets[i].end();
    }
    await until(() => sockets.length === 6, "attempt 6");
    const gaps = sockets.slice(1).map((s, i) => s.createdAt - sockets[i].createdAt);
    // Attempt n waits between half and all of min(320, 20 * 2^n) ms. The upper bound
    // leaves room for a busy machine's late timers.
    const ceilings = [20, 40, 80, 160, 320];
    gaps.forEach((gap, i) => {
      assert.ok(gap >= ceilings[i] / 2 - 2, `gap ${i} of ${gap} ms is at least half of ${ceilings[i]}`);
      assert.ok(gap <= ceilings[i] + 100, `gap ${i} of ${gap} ms is near at most ${ceilings[i]}`);
    });

    // The sixth gets through: connect() resolves, and the backoff starts over.
    sockets[5].open();
    sockets[5].welcome("alice");
    await connecting;
    sockets[5].end();
    await until(() => sockets.length === 7, "a reconnect");
    // Without the reset this wait would be 160 ms or more.
    assert.ok(sockets[6].createdAt - sockets[5].createdAt <= 120, "backoff starts over after a welcome");
    await client.close();
  });

  it("stops on a refused handshake and does not reconnect", async () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const closed = [];
    const client = new Switchboard("ws://broker/ws", {
      user: "mallory", WebSocket: FakeSocket, minDelayMs: 5, onClose: (c) => closed.push(c),
    });
    const connecting = client.connect();
    sockets[0].open();
    sockets[0].receive({ type: "error", request: 0, code: 6, reason: "no such user" });
    sockets[0].receive({ type: "close", code: 6, reason: "no such user" });
    sockets[0].end(1005);
    await assert.rejects(connecting, (e) => e.code === ErrorCode.Refused && e.message === "no such user");
    await sleep(50);
    assert.equal(sockets.length, 1);
    assert.deepEqual(closed, [{ code: 6, reason: "no such user", reconnecting: false }]);
  });

  it("close() sends close, waits for the broker's, and stops reconnecting", async () => {
    const { client, sockets } = await connected();
    const pending = client.subscribe("lobby");
    const closing = client.close();
    assert.deepEqual(sockets[0].sentOf("close")[0], { type: "close", code: 0, reason: "closed by the client" });
    sockets[0].receive({ type: "close", code: 0, reason: "closed by the client" });
    sockets[0].end(1005);
    await closing;
    await assert.rejects(pending, /closed/);
    await sleep(50);
    assert.equal(sockets.length, 1);
    assert.throws(() => client.publish("lobby", "late"), /not connected/);
    await assert.rejects(client.connect(), /closed/);
  });
});
