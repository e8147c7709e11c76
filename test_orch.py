"""Tests for orch.py, against a real tmux server and real processes.

Every test gets a private tmux server (`-L` unique name, socket folder under
/tmp, no $TMUX), a private HOME and state file.  Stand-in agents are small
scripts written here.  Tests marked `e2e` run the real Claude Code CLI against
the fake Messages API below (`make e2e`).
"""

import http.server
import json
import os
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ORCH = os.path.join(HERE, "orch.py")
sys.path.insert(0, HERE)
import orch  # noqa: E402


# ###########################################################################
# Helpers
# ###########################################################################

def retry_until(check, timeout=15.0, interval=0.05):
    """Poll check() until it returns a true value; fail the test on timeout."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError("condition not met within %ss: %s" % (timeout, check))
        time.sleep(interval)


# ###########################################################################
# A fake Anthropic Messages API, enough for Claude Code to run offline
# ###########################################################################

def sse(event, data):
    return ("event: %s\ndata: %s\n\n" % (event, json.dumps(data))).encode("utf-8")


class FakeAPI(object):
    """Serve /v1/messages on 127.0.0.1; record what each agent really received.

    Trigger words in the user's text shape the reply: SLOW-N waits N seconds
    before answering (a busy agent on demand); TOOL asks for a Bash tool call
    that needs permission (a permission dialog on demand).
    """

    def __init__(self):
        self.requests = []
        self.lock = threading.Lock()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.reply_json({})

            def do_HEAD(self):
                self.reply_json({})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b"{}"
                try:
                    data = json.loads(body.decode("utf-8"))
                except ValueError:
                    data = {}
                if self.path.startswith("/v1/messages/count_tokens"):
                    return self.reply_json({"input_tokens": 42})
                if not self.path.startswith("/v1/messages"):
                    return self.reply_json({})
                api.handle_messages(self, data)

            def reply_json(self, obj):
                payload = json.dumps(obj).encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def user_text(data):
        """The user's own words: text blocks of the last user message, minus reminders."""
        for message in reversed(data.get("messages") or []):
            if message.get("role") != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                return content, False
            texts, tool_result = [], False
            for block in content or []:
                if block.get("type") == "tool_result":
                    tool_result = True
                elif block.get("type") == "text" and not block.get("text", "").startswith(
                        "<system-reminder>"):
                    texts.append(block["text"])
            return "\n".join(texts), tool_result
        return "", False

    def handle_messages(self, handler, data):
        text, tool_result = self.user_text(data)
        side = ("<session>" in text or "Write the title" in text
                or not data.get("tools") and "Write" in text[:200])
        record = {"text": text, "side": side, "tool_result": tool_result,
                  "session": handler.headers.get("x-claude-code-session-id"),
                  "time": time.time()}
        with self.lock:
            self.requests.append(record)
            n = len(self.requests)
        reply, tool = "reply %d: ok" % n, None
        if not side and not tool_result:
            if "TOOL" in text:
                tool = {"command": "touch orch-tool-ran-%d" % n, "description": "make a file"}
            for word in text.split():
                if word.startswith("SLOW-") and word[5:].isdigit():
                    time.sleep(int(word[5:]))
        if tool_result:
            reply = "tool finished"
        if data.get("stream"):
            self.stream(handler, reply, tool, data.get("model", "claude-test"))
        else:
            handler.reply_json({
                "id": "msg_%d" % n, "type": "message", "role": "assistant",
                "model": data.get("model", "claude-test"),
                "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 5}})

    def stream(self, handler, reply, tool, model):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        out = handler.wfile
        out.write(sse("message_start", {"type": "message_start", "message": {
            "id": "msg_%s" % uuid.uuid4().hex[:12], "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1}}}))
        out.write(sse("content_block_start", {"type": "content_block_start", "index": 0,
                                              "content_block": {"type": "text", "text": ""}}))
        out.write(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": reply}}))
        out.write(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        stop = "end_turn"
        if tool:
            stop = "tool_use"
            out.write(sse("content_block_start", {
                "type": "content_block_start", "index": 1, "content_block": {
                    "type": "tool_use", "id": "toolu_%s" % uuid.uuid4().hex[:12],
                    "name": "Bash", "input": {}}}))
            out.write(sse("content_block_delta", {
                "type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": json.dumps(tool)}}))
            out.write(sse("content_block_stop", {"type": "content_block_stop", "index": 1}))
        out.write(sse("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 5}}))
        out.write(sse("message_stop", {"type": "message_stop"}))
        out.flush()
        handler.close_connection = True

    def texts(self, session=None):
        """What the agent's user typed, in order, side requests and tool results left out."""
        with self.lock:
            found = [r for r in self.requests if not r["side"] and not r["tool_result"]
                     and (session is None or r["session"] == session)]
        # Claude re-sends the conversation on each request; a text counts once per turn.
        return [r["text"] for r in found]


if __name__ == "__main__":
    # Run the fake API by hand: python3 test_orch.py PORT
    api = FakeAPI()
    api.server.server_close()
    api.__init__()
    print(api.url, flush=True)
    api.start()
    try:
        while True:
            time.sleep(1)
            for r in api.requests[len(getattr(api, "_shown", [])):]:
                print(json.dumps(r)[:300], flush=True)
            api._shown = list(api.requests)
    except KeyboardInterrupt:
        pass
