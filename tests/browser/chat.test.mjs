// End-to-end: the server example's chat page in headless Chromium, beside the Rust
// chat example as a TCP client, all on one broker.
//
//     cd tests/browser && npm ci && npm test
//
// The test builds the `server` and `chat` examples (release profile; set
// SWITCHBOARD_PROFILE=debug for a debug build), starts the server on free ports, and
// drives two pages (alice and bob) and one terminal client (carol) through a room
// conversation and direct messages both ways. It saves a screenshot of a page to
// docs/images/chat.png, then checks the JavaScript client's promises and notices and
// that pages reconnect and re-join their rooms after the server restarts.
//
// It needs Debian's Chromium at /usr/bin/chromium (or the path in CHROMIUM) and fails
// when it is missing: it is never skipped.

import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const PROFILE = process.env.SWITCHBOARD_PROFILE === "debug" ? "debug" : "release";
const SCREENSHOT = join(ROOT, "docs/images/chat.png");

/** How long any one expected thing may take to show up. */
const WAIT_MS = 10_000;

// Playwright gives each launch a fresh --user-data-dir of its own and removes it
// afterwards (it refuses one in `args`); everything that could reach past localhost is
// switched off.
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** Builds the examples the test runs and returns the folder that holds them. */
function buildExamples() {
  const args = ["build", "--example", "server", "--example", "chat"];
  if (PROFILE === "release") args.push("--release");
  execFileSync("cargo", args, { cwd: ROOT, stdio: ["ignore", "ignore", "inherit"] });
  const metadata = JSON.parse(
    execFileSync("cargo", ["metadata", "--format-version", "1", "--no-deps"], {
      cwd: ROOT,
      maxBuffer: 64 << 20,
    }),
  );
  return join(metadata.target_directory, PROFILE, "examples");
}

/**
 * A child process whose stdout lines are kept, so that a test can wait for a line,
 * and whose stderr is kept to explain a failure.
 */
class Proc {
  constructor(name, exe, args) {
    this.name = name;
    this.lines = [];
    this.stderr = "";
    this.waiters = [];
    this.child = spawn(exe, args, { stdio: ["pipe", "pipe", "pipe"] });
    this.exited = new Promise((resolve) => this.child.once("exit", (code, signal) => resolve({ code, signal })));
    createInterface({ input: this.child.stdout }).on("line", (line) => {
      this.lines.push(line);
      this.waiters = this.waiters.filter((waiter) => !waiter(line));
    });
    this.child.stderr.on("data", (chunk) => (this.stderr += chunk));
  }

  /** Resolves with the first line, seen already or to come, that `match` accepts. */
  waitFor(match, what = String(match)) {
    const test = typeof match === "string" ? (line) => line.includes(match) : (line) => match.test(line);
    const seen = this.lines.find(test);
    if (seen !== undefined) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new Error(`${this.name}: no line with ${what} within ${WAIT_MS} ms; stdout:\n` +
          `${this.lines.join("\n")}\nstderr:\n${this.stderr}`));
      }, WAIT_MS);
      this.waiters.push((line) => {
        if (!test(line)) return false;
        clearTimeout(timer);
        resolve(line);
        return true;
      });
    });
  }

  write(line) {
    this.child.stdin.write(`${line}\n`);
  }

  /** Signals the process and waits for it to exit; kills it if it will not. */
  async stop(signal = "SIGTERM") {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return this.exited;
    this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill("SIGKILL"), WAIT_MS);
    const status = await this.exited;
    clearTimeout(timer);
    return status;
  }
}

/** Starts the server example and reads both addresses from its startup lines. */
async function startServer(bin, tcp = "127.0.0.1:0", ws = "127.0.0.1:0") {
  const server = new Proc("server", join(bin, "server"), ["--listen", tcp, "--ws", ws]);
  const tcpLine = await server.waitFor(/^switchboard: listening tcp=\S+/, "the tcp line");
  const wsLine = await server.waitFor(/^switchboard: listening ws=\S+/, "the ws line");
  server.tcp = tcpLine.match(/tcp=(\S+)/)[1];
  server.ws = wsLine.match(/ws=(\S+)/)[1];
  return server;
}

/** Opens the chat page as `user`, connects and joins `room`. */
async function openChat(browser, base, user, room) {
  const context = await browser.newContext({ viewport: { width: 960, height: 620 } });
  const page = await context.newPage();
  page.on("pageerror", (error) => console.error(`${user}'s page: ${error.message}`));
  await page.goto(base);
  await page.fill("#user", user);
  await page.click("#connect");
  await expectStatus(page, "online");
  await page.fill("#room", room);
  await page.click("#join");
  await expectLine(page, `joined ${room}`);
  return page;
}

async function expectStatus(page, state) {
  await page.locator(`#status[data-state="${state}"]`).waitFor({ timeout: WAIT_MS });
}

/** Waits for a message-list line that contains `text`. */
async function expectLine(page, text) {
  await page.locator("#messages li", { hasText: text }).first().waitFor({ timeout: WAIT_MS });
}

async function say(page, line) {
  await page.fill("#line", line);
  await page.press("#line", "Enter");
}

async function lines(page) {
  return page.locator("#messages li").allTextContents();
}

describe("the chat page and the JavaScript client", () => {
  let bin, server, browser, carol, alice, bob;

  before(async () => {
    if (!existsSync(CHROMIUM)) {
      throw new Error(
        `no Chromium at ${CHROMIUM}: install Debian's (apt-get install -y chromium ` +
          `chromium-driver) or set CHROMIUM; this test is never skipped`,
      );
    }
    bin = buildExamples();
    server = await startServer(bin);
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  });

  after(async () => {
    await browser?.close();
    await carol?.stop();
    const status = await server?.stop();
    if (status && status.code !== 0) {
      console.error(`server exited with ${JSON.stringify(status)}; stderr:\n${server.stderr}`);
    }
  });

  it("serves the page and the client", async () => {
    const page = await fetch(`http://${server.ws}/`);
    assert.equal(page.status, 200);
    assert.match(page.headers.get("content-type"), /^text\/html/);
    const script = await fetch(`http://${server.ws}/switchboard.js`);
    assert.equal(script.status, 200);
    assert.match(script.headers.get("content-type"), /^text\/javascript/);
    assert.match(await script.text(), /export class Switchboard/);
    const plain = await fetch(`http://${server.ws}/ws`);
    assert.equal(plain.status, 400, "a GET without an upgrade is refused");
  });

  it("two pages and a TCP client chat in one room", async () => {
    const base = `http://${server.ws}/`;
    alice = await openChat(browser, base, "alice", "lobby");
    bob = await openChat(browser, base, "bob", "lobby");
    carol = new Proc("carol", join(bin, "chat"), ["--user", "carol", "--addr", server.tcp]);
    await carol.waitFor("[info] connected");
    carol.write("/join lobby");
    await carol.waitFor("[info] joined lobby");

    await say(alice, "hi bob! did the deploy go out?");
    await expectLine(bob, "[lobby] alice: hi bob! did the deploy go out?");
    await carol.waitFor("[lobby] alice: hi bob! did the deploy go out?");

    await say(bob, "yes, 10 minutes ago. all green so far");
    await expectLine(alice, "[lobby] bob: yes, 10 minutes ago. all green so far");
    await carol.waitFor("[lobby] bob: yes, 10 minutes ago. all green so far");

    carol.write("watching the graphs from the terminal");
    await expectLine(alice, "[lobby] carol: watching the graphs from the terminal");
    await expectLine(bob, "[lobby] carol: watching the graphs from the terminal");

    // The page shows its own lines too; the broker never sends them back.
    await expectLine(alice, "[lobby] alice: hi bob! did the deploy go out?");
    const own = (await lines(alice)).filter((line) => line.includes("alice: hi bob!"));
    assert.equal(own.length, 1, "alice's own message shows once");
  });

  it("a direct message crosses from a page to the TCP client and back", async () => {
    await say(alice, "/dm carol can you check the error rate?");
    await carol.waitFor("[dm] alice: can you check the error rate?");

    carol.write("/dm alice 0.02%, same as yesterday");
    await expectLine(alice, "[dm] carol: 0.02%, same as yesterday");

    await say(alice, "great, thanks both");
    await expectLine(bob, "[lobby] alice: great, thanks both");
    await carol.waitFor("[lobby] alice: great, thanks both");

    // Bob is in the room but not a party to the direct messages; his page has seen
    // alice's later room message, so anything sent before it has arrived.
    const bobs = (await lines(bob)).join("\n");
    assert.doesNotMatch(bobs, /error rate|0\.02%/);

    mkdirSync(dirname(SCREENSHOT), { recursive: true });
    await alice.screenshot({ path: SCREENSHOT });
  });

  it("the client's promises, request ids and notices", async () => {
    // A second client in alice's page, from the same module the page serves.
    const result = await alice.evaluate(async () => {
      const { Switchboard, ErrorCode } = await import("/switchboard.js");
      const notices = [];
      const client = new Switchboard("/ws", { user: "dave", onNotice: (n) => notices.push(n) });
      const welcome = await client.connect();
      await client.subscribe("lobby");
      let refused = null;
      try {
        await client.subscribe("");
      } catch (error) {
        refused = { code: error.code, name: error.name };
      }
      const request = client.direct("nobody", "hello?");
      const deadline = Date.now() + 5000;
      while (!notices.length && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      await client.unsubscribe("lobby");
      const sessions = [...client.sessions];
      await client.close();
      return {
        welcome, refused, invalidId: ErrorCode.InvalidId, request, notices, sessions,
        connected: client.connected,
      };
    });
    assert.equal(result.welcome.user, "dave");
    assert.equal(result.welcome.reconnected, false);
    assert.ok(result.welcome.heartbeatMs > 0 && result.welcome.maxFrame > 0);
    assert.deepEqual(result.refused, { code: result.invalidId, name: "SwitchboardError" });
    assert.equal(result.notices.length, 1);
    assert.equal(result.notices[0].kind, "not_delivered");
    assert.equal(result.notices[0].request, result.request);
    assert.equal(result.notices[0].subject, "nobody");
    assert.deepEqual(result.sessions, []);
    assert.equal(result.connected, false);
  });

  it("pages reconnect and re-join their rooms after the server restarts", async () => {
    // Same ports, so the pages' address still holds.
    const { tcp, ws } = server;
    const status = await server.stop("SIGTERM");
    assert.equal(status.code, 0, `the server exits 0 on SIGTERM; stderr:\n${server.stderr}`);
    await carol.waitFor("[closed]");
    await carol.stop();
    await expectStatus(alice, "connecting");
    await expectStatus(bob, "connecting");

    server = await startServer(bin, tcp, ws);
    await expectStatus(alice, "online");
    await expectStatus(bob, "online");
    await expectLine(alice, "reconnected; rejoining rooms");

    // The re-join may still be on its way when the page shows it is online; a
    // message is tried until one arrives.
    let arrived = false;
    for (let attempt = 0; attempt < 20 && !arrived; attempt++) {
      await say(alice, `back after the restart (${attempt})`);
      arrived = await bob
        .locator("#messages li", { hasText: "[lobby] alice: back after the restart" })
        .first()
        .waitFor({ timeout: 500 })
        .then(() => true, () => false);
    }
    assert.ok(arrived, "bob receives alice's room message after both reconnected");
  });

  it("Disconnect closes the page's client for good", async () => {
    await bob.click("#connect");
    await expectStatus(bob, "offline");
    await expectLine(bob, "disconnected: closed by the client");
    assert.equal(await bob.inputValue("#user"), "bob");

    // Nobody answers for bob now, and his page stays away.
    await say(alice, "/dm bob are you there?");
    await expectLine(alice, "bob is not connected");
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.equal(await bob.getAttribute("#status", "data-state"), "offline");
  });
});
