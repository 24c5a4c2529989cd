#!/usr/bin/env python3
"""The JSON form of the switchboard protocol, spoken by an independent client.

Python's `websockets` library (from PyPI) talks to a running broker over WebSocket text
messages, as docs/protocol.md ("The JSON form") describes, and checks each answer:

    python3 tests/interop/ws_json.py ws://127.0.0.1:7879/ws

It prints one line per step and ends with `interop: N passed, N failed`; it exits
non-zero when any step fails. Every wait is bounded.
"""

import asyncio
import base64
import inspect
import json
import sys
import uuid

try:
    from websockets.asyncio.client import connect
except ImportError:  # websockets before 13.0
    from websockets import connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 5.0


class StepFailed(Exception):
    pass


def check(condition, what):
    if not condition:
        raise StepFailed(what)


async def open_connection(url):
    options = {"open_timeout": TIMEOUT, "compression": None}
    if "proxy" in inspect.signature(connect).parameters:
        options["proxy"] = None  # a loopback broker is never behind a proxy
    try:
        return await connect(url, **options)
    except (OSError, asyncio.TimeoutError) as e:
        raise StepFailed(f"cannot open {url}: {e!r}")


async def send(ws, obj):
    await asyncio.wait_for(ws.send(json.dumps(obj)), TIMEOUT)


async def recv(ws, what):
    """The next JSON object from the broker; its heartbeat pings are answered."""
    while True:
        try:
            message = await asyncio.wait_for(ws.recv(), TIMEOUT)
        except asyncio.TimeoutError:
            raise StepFailed(f"no {what} within {TIMEOUT} s")
        except ConnectionClosed as e:
            raise StepFailed(f"the connection closed while waiting for {what}: {e}")
        check(isinstance(message, str), f"expected a text message for {what}, got binary")
        try:
            obj = json.loads(message)
        except ValueError:
            raise StepFailed(f"{what}: the broker sent invalid JSON: {message!r}")
        check(isinstance(obj, dict), f"{what}: not a JSON object: {message!r}")
        if obj.get("type") == "ping":
            await send(ws, {"type": "pong"})
            continue
        return obj


async def expect(ws, kind, what):
    obj = await recv(ws, what)
    check(obj.get("type") == kind, f"expected {kind} for {what}, got {obj}")
    return obj


async def expect_closed(ws, what):
    """The WebSocket closes: nothing but the close arrives within the timeout."""
    try:
        message = await asyncio.wait_for(ws.recv(), TIMEOUT)
    except ConnectionClosed:
        return
    except asyncio.TimeoutError:
        raise StepFailed(f"the connection stayed open after {what}")
    raise StepFailed(f"expected the connection to close after {what}, got {message!r}")


async def quiet(ws, what):
    """Nothing is waiting for `ws`: a ping's pong is the next thing it receives."""
    await send(ws, {"type": "ping"})
    obj = await recv(ws, f"the pong that shows {what}")
    check(obj == {"type": "pong"}, f"{what}: got {obj} before the pong")


async def run(url):
    state = {}
    room = f"py-room-{uuid.uuid4().hex[:8]}"
    nobody = f"py-nobody-{uuid.uuid4().hex[:8]}"

    async def handshake():
        for user in ("py-a", "py-b"):
            ws = await open_connection(url)
            state[user] = ws
            await send(ws, {"type": "hello", "version": 1, "user": user})
            welcome = await expect(ws, "welcome", f"{user}'s welcome")
            check(welcome.get("user") == user, f"welcome names {welcome.get('user')!r}")
            check(welcome.get("version") == 1, f"welcome has version {welcome.get('version')}")
            for field in ("connection", "heartbeat_ms", "max_frame"):
                check(isinstance(welcome.get(field), int), f"welcome lacks {field}: {welcome}")

    async def join():
        for request, user in ((1, "py-a"), (2, "py-b")):
            await send(state[user], {"type": "subscribe", "request": request, "session": room})
            ok = await recv(state[user], f"the answer to {user}'s subscribe")
            check(ok == {"type": "ok", "request": request}, f"expected ok, got {ok}")

    async def publish_and_receive():
        a, b = state["py-a"], state["py-b"]
        await send(a, {"type": "publish", "session": room, "payload": "hello from py-a ☕"})
        got = await expect(b, "deliver", "py-a's publication")
        want = {"kind": "session", "sender": "py-a", "target": room, "payload": "hello from py-a ☕"}
        for key, value in want.items():
            check(got.get(key) == value, f"deliver has {key}={got.get(key)!r}, not {value!r}")
        raw = bytes([0, 1, 2, 0xFF])
        encoded = base64.b64encode(raw).decode()
        await send(a, {"type": "publish", "session": room, "payload_base64": encoded})
        got = await expect(b, "deliver", "py-a's binary publication")
        check(got.get("payload_base64") == encoded, f"binary payload came back as {got}")
        check("payload" not in got, f"a binary payload also came as text: {got}")
        await quiet(a, "py-a did not receive its own publications")

    async def direct():
        a, b = state["py-a"], state["py-b"]
        await send(b, {"type": "direct", "request": 7, "user": "py-a", "payload": "psst"})
        got = await expect(a, "deliver", "py-b's direct message")
        want = {"kind": "direct", "sender": "py-b", "target": "py-a", "payload": "psst"}
        for key, value in want.items():
            check(got.get(key) == value, f"deliver has {key}={got.get(key)!r}, not {value!r}")
        await quiet(b, "py-b got no notice for a delivered message")

    async def not_delivered():
        a = state["py-a"]
        await send(a, {"type": "direct", "request": 8, "user": nobody, "payload": "anyone?"})
        notice = await expect(a, "notice", "the not_delivered notice")
        check(notice.get("kind") == "not_delivered", f"notice of kind {notice.get('kind')!r}")
        check(notice.get("request") == 8, f"notice names request {notice.get('request')}")
        check(notice.get("subject") == nobody, f"notice names {notice.get('subject')!r}")

    async def invalid_message():
        a, b = state["py-a"], state["py-b"]
        await asyncio.wait_for(b.send('{"type": "subscribe", "session": '), TIMEOUT)
        error = await expect(b, "error", "the answer to invalid JSON")
        check(error.get("code") == 1, f"error code {error.get('code')}, not 1 (Malformed)")
        check(error.get("request") == 0, f"error names request {error.get('request')}")
        check(error.get("reason"), "the error gives no reason")
        close = await expect(b, "close", "the close after the error")
        check(close.get("code") == 1, f"close code {close.get('code')}, not 1")
        await expect_closed(b, "the close")
        # The other connection carries on.
        await quiet(a, "py-a still works")

    steps = [
        ("handshake: py-a and py-b get welcome", handshake),
        (f"join: both subscribe to {room}", join),
        ("publish: py-b receives py-a's text and binary payloads, py-a nothing", publish_and_receive),
        ("direct: py-b to py-a", direct),
        ("direct to a missing user: not_delivered notice", not_delivered),
        ("invalid message: error, close, end; py-a unaffected", invalid_message),
    ]
    passed = failed = 0
    try:
        for name, step in steps:
            try:
                await step()
            except StepFailed as e:
                failed += 1
                print(f"FAIL {name}: {e}", flush=True)
                break  # later steps build on this one
            passed += 1
            print(f"ok   {name}", flush=True)
    finally:
        for ws in state.values():
            try:
                await asyncio.wait_for(ws.close(), TIMEOUT)
            except Exception:
                pass
    skipped = len(steps) - passed - failed
    summary = f"interop: {passed} passed, {failed} failed"
    print(summary + (f", {skipped} skipped" if skipped else ""), flush=True)
    return failed == 0


def main():
    if len(sys.argv) != 2:
        print("usage: ws_json.py ws://HOST:PORT/PATH", file=sys.stderr)
        return 2
    return 0 if asyncio.run(run(sys.argv[1])) else 1


if __name__ == "__main__":
    sys.exit(main())
