"""Tests for orch.py, against a real tmux server and real processes.

Every test gets a private tmux server (`-L` unique name, socket folder under
/tmp, no $TMUX), a private HOME and state file.  Stand-in agents are small
scripts written here.  Tests named test_e2e_* run the real Claude Code CLI
against the fake Messages API below (`make e2e`); tests named test_cli_* run
orch.py as a separate process, once per interpreter in `make test-pythons`.
"""

import argparse
import calendar
import hashlib
import http.server
import io
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import socketserver
import stat
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

def retry_until(check, timeout=30.0, interval=0.05):
    """Poll check() until it returns a true value; fail the test on timeout.

    The timeout only bounds a failure: a loaded machine must not make a pass fail.
    """
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError("condition not met within %ss: %s" % (timeout, check))
        time.sleep(interval)


# ###########################################################################
# Stand-in agent: behaves like Claude Code where orch depends on it
# ###########################################################################

FAKE_AGENT = r"""#!PYTHON
# Stand-in for claude: raw tty, bracketed paste, hooks from --settings, and
# trigger words: SLOW-N (busy N s), ASK (permission dialog; a digit or Enter
# answers it), ASKSLOW-N (the approved tool runs N s), OTHERTOOL (the dialog
# shows another command than its hook names; FAKE_DIALOG_GUARD=S ignores a
# digit in the dialog's first S seconds), EXIT-N (exit N),
# SWALLOW (the first Enter after it is lost); FAKE_REDRAW_LATE=S (the input box
# empties S seconds after the hook, as on a busy machine); /model (a picker, no
# hook, own status "dialog open"); FAKE_UPSELL=1 (a turn ends in 2.1.332's renderer
# prompt unless --settings names "tui"); RETRYING-N (busy N s, its screen retrying
# a 429); APIFAIL-TYPE (an API error ends the turn:
# StopFailure, no Stop); LIMIT-N (a usage limit that resets in N s, recorded
# in the transcript as 2.1.332 does; LIMITSAID-N: only said, as 2.1.197);
# FAKE_APIKEY=1 (2.1.332's API-key question,
# choices without digits, before any hook).  Logs to $FAKE_LOG/<pid>.jsonl.
# Versions differ; by default it acts like Claude Code 2.1.197.  Like 2.1.330:
# FAKE_QUEUE=immediate (a message typed during a turn fires UserPromptSubmit at
# once, with the running turn's prompt_id; its turn fires none), FAKE_PASTE_WRAP=1
# (a long or many-line paste arrives wrapped in <pasted_content> tags),
# FAKE_DEFAULT_MODE=auto, FAKE_SLASH_AFTER_BLANKS=1 (" /x" is still the command /x).
import json, os, re, select, signal, subprocess, sys, termios, time, tty, uuid

args = sys.argv[1:]
if args == ["--version"]:
    print(os.environ.get("FAKE_VERSION", "2.1.197") + " (Claude Code)")
    sys.exit(0)
opts, prompt = {}, None
i = 0
while i < len(args):
    if args[i] == "--":
        prompt = args[i + 1] if i + 1 < len(args) else None
        break
    if args[i] in ("--session-id", "--resume", "--name", "--settings", "--permission-mode"):
        opts[args[i]] = args[i + 1]
        i += 2
    else:
        i += 1
session = opts.get("--resume") or opts.get("--session-id") or "none"
SETTINGS = json.loads(opts.get("--settings", "{}"))
hooks = SETTINGS.get("hooks", {})
# Like claude (measured): disableAllHooks silences --settings hooks too; a
# project's setting wins over the user's.
for path in (os.path.join(os.getcwd(), ".claude", "settings.local.json"),
             os.path.join(os.getcwd(), ".claude", "settings.json"),
             os.path.join(os.environ["HOME"], ".claude", "settings.json")):
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        continue
    if "disableAllHooks" in found:
        hooks = {} if found["disableAllHooks"] is True else hooks
        break
if os.environ.get("FAKE_NO_HOOKS"):     # hooks off by a setting orch cannot read
    hooks = {}
MODE = opts.get("--permission-mode") or os.environ.get("FAKE_DEFAULT_MODE") or "default"
# What each answer reports using, as claude's API does (cache reads and writes apart).
USAGE = {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100,
         "cache_creation_input_tokens": 20}
IMMEDIATE = os.environ.get("FAKE_QUEUE") == "immediate"
LOG = os.path.join(os.environ["FAKE_LOG"], "%d.jsonl" % os.getpid())

def log(kind, **fields):
    fields.update(kind=kind, t=time.time(), session=session, name=opts.get("--name"),
                  pid=os.getpid())
    with open(LOG, "a") as f:
        f.write(json.dumps(fields) + "\n")

TRANSCRIPT = os.path.join(os.environ["HOME"], ".claude", "projects",
                          re.sub("[^A-Za-z0-9]", "-", os.getcwd()), session + ".jsonl")

def transcript(kind, **fields):
    # Claude's transcript: API-shaped messages among its own bookkeeping entries.
    os.makedirs(os.path.dirname(TRANSCRIPT), exist_ok=True)
    fields.update(type=kind, sessionId=session)
    with open(TRANSCRIPT, "a") as f:
        f.write(json.dumps(fields) + "\n")

def hook(event, **fields):
    fields.update(session_id=session, hook_event_name=event, cwd=os.getcwd(),
                  transcript_path=TRANSCRIPT)
    if event in ("UserPromptSubmit", "Stop", "PreToolUse", "PermissionRequest"):
        fields.setdefault("prompt_id", state["turn_id"])
        fields["permission_mode"] = "default" if MODE == "manual" else MODE
    for group in hooks.get(event, []):
        for h in group["hooks"]:
            subprocess.run(h["command"], shell=True, input=json.dumps(fields).encode())

def set_status(status, waiting=None):
    folder = os.path.join(os.environ["HOME"], ".claude", "sessions")
    os.makedirs(folder, exist_ok=True)
    data = {"pid": os.getpid(), "sessionId": session, "status": status,
            "statusUpdatedAt": int(time.time() * 1000)}
    if waiting:
        data["waitingFor"] = waiting
    with open(os.path.join(folder, "%d.json" % os.getpid()), "w") as f:
        json.dump(data, f)

def say(line):
    sys.stdout.write(line.replace("\n", "\r\n") + "\r\n")
    sys.stdout.flush()

def on_term(signum, frame):
    hook("SessionEnd", reason="other")
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)

signal.signal(signal.SIGTERM, on_term)
if os.environ.get("FAKE_DIE_AT_START"):
    sys.stderr.write("error: unknown option (stand-in dies at start)\n")
    sys.exit(int(os.environ["FAKE_DIE_AT_START"]))
log("start", argv=sys.argv[1:], env=dict(os.environ), cwd=os.getcwd())
fd = sys.stdin.fileno()
tty.setraw(fd)
sys.stdout.write("\x1b[?2004h")     # ask for bracketed paste, as claude does
state = {"mode": "idle", "until": 0, "queue": [], "swallow": False, "turn_id": None,
         "prompt": ""}

def trusted():
    # Like claude (measured): trusting a folder trusts its subfolders.
    try:
        with open(os.path.join(os.environ["HOME"], ".claude.json")) as f:
            projects = json.load(f)["projects"]
    except Exception:
        return False
    folder = os.getcwd()
    while True:
        if (projects.get(folder) or {}).get("hasTrustDialogAccepted") is True:
            return True
        if folder == os.path.dirname(folder):
            return False
        folder = os.path.dirname(folder)

LONG_REPLY = "\n".join("answer line %d: %s \u00e9" % (i, "x" * 60) for i in range(100))

def start():
    time.sleep(float(os.environ.get("FAKE_START_DELAY") or 0))
    hook("SessionStart", source="resume" if "--resume" in opts else "startup")
    set_status("idle")
    say("fake agent ready")
    say("\u276f ")
    if prompt is not None:
        submit(prompt)

def submit(text, hooked=False):
    if text.strip() == "/model":    # a person opened a picker: no hook, claude says "dialog open"
        open_picker("Select model", ["Default (recommended)", "Opus", "Haiku"],
                    "Enter to save \u00b7 Esc to cancel")
        return
    if (text.lstrip() if os.environ.get("FAKE_SLASH_AFTER_BLANKS") else text)[:1] in ("/", "!"):
        log("command", text=text)       # claude would run it: tests assert this never happens
        say("ran command " + text)
        say("\u276f ")
        return
    log("message", text=text)
    transcript("user", message={"role": "user", "content": text})
    transcript("attachment", attachment={"type": "todo"})
    transcript("user", isSidechain=True, message={"role": "user", "content": "subagent task"})
    state["prompt"] = text
    if not hooked:
        state["turn_id"] = str(uuid.uuid4())
        hook("UserPromptSubmit", prompt=text.strip())
    set_status("busy")
    words = text.split()
    for w in words:
        if w.startswith("EXIT-"):
            hook("SessionEnd", reason="prompt_input_exit")
            sys.exit(int(w[5:]))
        if w.startswith("LIMIT-") or w.startswith("LIMITSAID-"):
            resets = int(time.time()) + int(w.split("-")[1])
            message = "You've hit your session limit \u00b7 resets %s (UTC)" % time.strftime(
                "%I:%M%p", time.gmtime(resets)).lstrip("0").lower()
            entry = {"message": {"id": str(uuid.uuid4()), "model": "<synthetic>",
                                 "role": "assistant", "content": [{"type": "text",
                                                                   "text": message}]},
                     "isApiErrorMessage": True, "error": "rate_limit"}
            if w.startswith("LIMIT-"):
                entry.update(apiError="usage_limit_reached", quotaLimits={
                    "status": "rejected", "resetsAt": resets, "rateLimitType": "five_hour"})
            transcript("assistant", **entry)
            say("  \u23bf  " + message)
            state["mode"] = "idle"
            set_status("idle")
            hook("StopFailure", error="rate_limit", last_assistant_message=message)
            say("\u276f ")
            return
        if w.startswith("APIFAIL-"):    # like claude when an API error ends the turn
            message = ("API Error: Request rejected (429) \u00b7 over the limit\n"
                       "$(touch pwned) `touch pwned2` \"dq\" 'sq'")
            say("\u25cf " + message)
            state["mode"] = "idle"
            set_status("idle")
            hook("StopFailure", error=w[8:], last_assistant_message=message)
            say("\u276f ")
            return
        if w.startswith("SLOW-"):
            state.update(mode="busy", until=time.time() + float(w[5:]))
            say("* Working... (esc to interrupt)")
            redraw_box()
            return
        if w.startswith("RETRYING-"):   # busy N s, retrying an API error as claude shows it
            state.update(mode="busy", until=time.time() + float(w[9:]))
            say("\u273b 429 rate limited \u00b7 retrying in 7s \u00b7 attempt 2/10")
            redraw_box()
            return
    for w in words:
        if w.startswith("ASKSLOW-"):    # a dialog, then the approved tool runs N s
            state["tool_time"] = float(w[8:])
            words = words + ["ASK"]
    if "ASK" in words or "QUESTION" in words:
        tool = "Bash" if "ASK" in words else "AskUserQuestion"
        command = "touch x" if "OTHERTOOL" not in words else "rm -rf y"
        transcript("assistant", message={"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": tool, "input": {"command": command}}]})
        hook("PreToolUse", tool_name=tool)
        set_status("waiting", "permission prompt")
        hook("PermissionRequest", tool_name=tool,
             tool_input={"command": "touch x", "description": "make a file"})
        # Claude sends this one 6 s into the dialog; it names no tool.
        hook("Notification", notification_type="permission_prompt",
             message="Claude needs your permission")
        state["mode"] = "dialog"
        state["dialog_at"] = time.time()
        # OTHERTOOL: the screen asks about another command than the hook said.
        say(" Bash command\n\n   %s\n   make a file\n" % command)
        if os.environ.get("FAKE_NO_OPTION") == "4":     # 2.1.330's options
            say(" Do you want to proceed?\n \u276f 1. Yes\n   2. Yes, and always allow access"
                "\n   3. Yes, and switch to auto mode\n   4. No\n\n Esc to cancel")
        else:
            say(" Do you want to proceed?\n \u276f 1. Yes\n   2. Yes, and always allow\n"
                "   3. No\n\n Esc to cancel")
        return
    finish("reply: " + " ".join(words)[:60])

def open_picker(question, choices, keys):
    state.update(mode="picker", picker={"question": question, "choices": choices, "cursor": 1,
                                        "keys": keys})
    time.sleep(0.01)    # claude writes its status well after the last hook (ms in the file)
    set_status("waiting", "dialog open")
    draw_picker()

def draw_picker():
    picker = state["picker"]
    say("\x1b[2J\x1b[H" + "\u2500" * 40)
    say("  " + picker["question"] + "\n")
    for n, choice in enumerate(picker["choices"], 1):
        say(("  \u276f %d. %s" if n == picker["cursor"] else "    %d. %s") % (n, choice))
    say("\n  " + picker["keys"])

def picker_key(key):
    picker = state["picker"]
    if key in ("up", "down"):
        picker["cursor"] = max(1, min(len(picker["choices"]),
                                      picker["cursor"] + (1 if key == "down" else -1)))
        draw_picker()
        return
    if key == "enter":
        log("picked", question=picker["question"],
            choice=picker["choices"][picker["cursor"] - 1])
    else:
        log("dialog cancelled", question=picker["question"])
    state["mode"] = "idle"
    set_status("idle")
    say("\x1b[2J\x1b[H" + "\u2500" * 40 + "\n\u276f \n" + "\u2500" * 40)

def redraw_box():
    # Like claude: the input box empties once a message is taken; FAKE_REDRAW_LATE=S
    # draws it S seconds late, after the hook, as a busy machine does.
    late = float(os.environ.get("FAKE_REDRAW_LATE") or 0)
    if late:
        state["redraw_at"] = time.time() + late
    else:
        say("\u276f ")

def finish(reply):
    if state.pop("after_tool", False):
        hook("PostToolUse", tool_name="Bash")
        reply = "tool ran"
    if "LONGREPLY" in (state.get("prompt") or ""):
        reply = LONG_REPLY
    say("\u25cf " + reply)
    log("finished", reply=reply)
    state["turns"] = state.get("turns", 0) + 1
    message_id = "msg_%d" % state["turns"]
    transcript("assistant", message={"id": message_id, "role": "assistant", "content": [
        {"type": "thinking", "thinking": "hm"}], "usage": dict(USAGE, output_tokens=1)})
    transcript("assistant", message={"id": message_id, "role": "assistant", "content": [
        {"type": "text", "text": reply}], "usage": USAGE})
    transcript("cost-state", totalCostUSD=0.25 * state["turns"])
    state["mode"] = "idle"
    hook("Stop", last_assistant_message=reply)
    transcript("system", subtype="turn_duration", durationMs=1500)     # claude: ~50 ms after Stop
    if os.environ.get("FAKE_UPSELL") and "tui" not in SETTINGS and not state["queue"]:
        # Like 2.1.332 resuming an older claude's session, unless a setting names the renderer.
        open_picker("Try the new fullscreen renderer?", ["Yes, try it", "Not now"],
                    "Enter to confirm \u00b7 Esc to cancel")
        return
    if IMMEDIATE or not state["queue"]:
        set_status("idle")      # 2.1.330 shows idle for a moment even with a queued turn next
    if state["queue"]:
        set_status("busy")
        queued, state["queue"] = state["queue"], []
        # Both versions run every queued message as one turn.
        state["turn_id"] = str(uuid.uuid4())
        if not IMMEDIATE:
            for text in queued:     # 2.1.197: one hook each as the turn starts
                state["turn_id"] = str(uuid.uuid4())
                hook("UserPromptSubmit", prompt=text.strip())
        submit("\n\n".join(queued), hooked=True)
    else:
        redraw_box()

def draw_key_question():
    say("\x1b[2J\x1b[H" + "\u2500" * 40)
    say("  Detected a custom API key in your environment\n")
    say("  Do you want to use this API key?\n")
    for n, choice in enumerate(["Yes", "No (recommended)"], 1):
        say(("  \u276f %s" if n == state["key_cursor"] else "    %s") % choice)
    say("\n  Enter to confirm \u00b7 Esc to cancel")

def answer_key_question(answer):
    log("api key", answer=answer)
    state["mode"] = "idle"
    say("\x1b[2J\x1b[H")
    start()

def enter(text):
    mode = state["mode"]
    if mode == "apikey":
        answer_key_question(["Yes", "No"][state["key_cursor"] - 1])
        return
    if mode == "trust":
        if text in ("", "1"):
            state["mode"] = "idle"
            start()
        elif text == "2":
            sys.exit(1)
        return
    if mode == "dialog":
        approve()
        return
    if mode == "picker":
        picker_key("enter")     # typed text is lost: the dialog has no input box
        return
    if not text:
        return
    if mode == "busy":
        state["queue"].append(text)
        if IMMEDIATE:
            hook("UserPromptSubmit", prompt=text.strip())
        say("  \u276f " + text)
        say("\u276f Press up to edit queued messages")
        return
    submit(text)

def approve(always=False):
    log("always allowed" if always else "approved")
    say("\x1b[2J\x1b[H")     # like claude: the dialog leaves the screen
    set_status("busy")
    if state.get("tool_time"):
        state.update(mode="busy", until=time.time() + state.pop("tool_time"), after_tool=True)
        say("* Running... (esc to interrupt)")
        return
    hook("PostToolUse", tool_name="Bash")
    finish("tool ran")

def dialog_key(key):
    # Like claude: a digit picks its option at once; "No" is the last one.
    last = "4" if os.environ.get("FAKE_NO_OPTION") == "4" else "3"
    if time.time() - state["dialog_at"] < float(os.environ.get("FAKE_DIALOG_GUARD") or 0):
        log("key ignored")      # 2.1.330 ignores a key pressed as its dialog appears
        return
    if key == "1":
        approve()
    elif key == last:
        log("refused")
        state["mode"] = "idle"
        set_status("idle")
        say("\x1b[2J\x1b[H")
        say("\u276f ")
    elif key in "23":
        approve(always=True)

def escape():
    global typed
    if state["mode"] == "picker":
        picker_key("escape")
        return
    if state["mode"] in ("busy", "dialog"):
        log("interrupted")
        restore = state["mode"] == "busy"
        state["mode"] = "idle"
        set_status("idle")              # like claude: no hook fires for this
        say("Interrupted")
        if not restore:
            say("\x1b[2J\x1b[H")     # the dialog leaves the screen
        if restore:     # like claude: the interrupted prompt is back in the input box
            typed = state["prompt"]
            say("\u276f\u00a0" + typed)
        else:
            say("\u276f ")
    elif state["mode"] == "trust":
        sys.exit(1)
    elif state["mode"] == "apikey":
        answer_key_question("No")

if os.environ.get("FAKE_APIKEY"):
    state.update(mode="apikey", key_cursor=2)
    draw_key_question()
elif os.environ.get("FAKE_TRUST") and not trusted():
    state["mode"] = "trust"
    say("Is this a project you created or one you trust?")
    say("\u276f 1. Yes, I trust this folder\n  2. No, exit\n Enter to confirm \u00b7 Esc to cancel")
else:
    start()

data, pasted, pasting = b"", b"", False
typed = ""
while True:
    due = [state["until"]] if state["mode"] == "busy" else []
    due += [state["redraw_at"]] if state.get("redraw_at") else []
    timeout = max(0.0, min(due) - time.time()) if due else None
    ready, _, _ = select.select([fd], [], [], timeout)
    if state.get("redraw_at") and time.time() >= state["redraw_at"]:
        state["redraw_at"] = None
        say("\u276f ")
    if state["mode"] == "busy" and time.time() >= state["until"]:
        finish("slow reply done")
    if not ready:
        continue
    data += os.read(fd, 65536)
    while data:
        if data.startswith(b"\x1b[200~"):
            pasting, data = True, data[6:]
        elif data.startswith(b"\x1b[201~"):
            pasting, data = False, data[6:]
            say("\u276f " + typed.split("\n")[0])
        elif pasting:
            end = data.find(b"\x1b[201~")
            if end < 0:
                # Keep a tail that may be the start of the end marker; wait for more.
                pasted, data = pasted + data[:-6], data[-6:]
                break
            pasted, data = pasted + data[:end], data[end:]
            text = pasted.decode("utf-8").replace("\r", "\n")
            if os.environ.get("FAKE_PASTE_WRAP") and (len(text) >= 1000 or text.count("\n") >= 4):
                text = '\n\n<pasted_content id="5d93">\n%s\n</pasted_content id="5d93">\n' % text
            typed += text
            pasted = b""
        elif data[:1] == b"\r":
            data = data[1:]
            if "SWALLOW" in typed and not state["swallow"]:
                state["swallow"] = True     # lose this Enter, as claude sometimes does
                continue
            text, typed = typed, ""
            enter(text)
        elif data[:3] in (b"\x1b[A", b"\x1bOA", b"\x1b[B", b"\x1bOB"):
            key, data = ("up" if data[2:3] == b"A" else "down"), data[3:]
            if state["mode"] == "picker":
                picker_key(key)
            elif state["mode"] == "apikey":
                state["key_cursor"] = 1 if key == "up" else 2
                draw_key_question()
        elif data[:1] == b"\x1b":
            data = data[1:]
            escape()
        elif state["mode"] == "dialog" and data[:1].isdigit():
            key, data = data[:1].decode(), data[1:]
            dialog_key(key)
        elif data[:1] == b"\x03":
            data = data[1:]
            typed = ""
            if state.get("ctrl_c"):
                log("quit by ctrl-c")
                sys.exit(130)
            state["ctrl_c"] = True      # "Press Ctrl-C again to exit"
        elif data[:1] == b"\x15":        # Ctrl-U empties the input box
            data, typed = data[1:], ""
            say("\u276f\u00a0")
        else:
            typed += data[:1].decode("latin-1")
            data = data[1:]
            if not pasting:
                say("\u276f\u00a0" + typed)      # a person typing: the box shows it
"""


def write_fake_agent(folder):
    path = os.path.join(folder, "fake-claude")
    with open(path, "w") as f:
        f.write(FAKE_AGENT.replace("#!PYTHON", "#!" + sys.executable, 1))
    os.chmod(path, 0o755)
    return path


def tmux_cmd(*args):
    """Run tmux against the test's private server; return stdout."""
    socket = os.environ["ORCH_TMUX_SOCKET"]
    env = dict(os.environ)
    env.pop("TMUX", None)
    return subprocess.run(["tmux", "-L", socket] + list(args), env=env, check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True).stdout


class Env(object):
    """One test's private world: HOME, state, tmux server, stand-in agent."""

    def __init__(self, root, monkeypatch):
        self.root = root
        self.home = os.path.join(root, "home")
        self.work = os.path.join(root, "work")
        self.logs = os.path.join(root, "logs")
        for folder in (self.home, self.work, self.logs):
            os.makedirs(folder)
        self.fake = write_fake_agent(root)
        self.tmux = shutil.which("tmux")
        self.socket = "orcht%d%s" % (os.getpid(), uuid.uuid4().hex[:8])
        # Short socket folder: a Unix socket path must fit in ~100 bytes.
        self.tmpdir = tempfile.mkdtemp(prefix="ot", dir="/tmp")
        for var in ("TMUX", "TMUX_PANE", "CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT",
                    "ORCH_SESSION", "ORCH_TRACE", "ORCH_BACKEND", "FAKE_TRUST",
                    "FAKE_DIE_AT_START", "FAKE_START_DELAY", "FAKE_QUEUE", "FAKE_PASTE_WRAP",
                    "FAKE_DEFAULT_MODE", "FAKE_SLASH_AFTER_BLANKS", "FAKE_VERSION",
                    "FAKE_NO_HOOKS", "FAKE_NO_OPTION", "FAKE_DIALOG_GUARD", "FAKE_REDRAW_LATE",
                    "FAKE_UPSELL", "FAKE_APIKEY", "ORCH_CODEX", "ORCH_GEMINI", "ORCH_AGENT",
                    "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "CODEX_HOME", "OPENAI_API_KEY"):
            monkeypatch.delenv(var, raising=False)
        env = {"HOME": self.home, "ORCH_STATE": os.path.join(root, "state.json"),
               "ORCH_TMUX_SOCKET": self.socket, "TMUX_TMPDIR": self.tmpdir,
               "ORCH_CLAUDE": self.fake, "FAKE_LOG": self.logs, "SHELL": "/bin/sh",
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC", "ORCH_KILL_GRACE": "3"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(self.work)
        self.conf = os.path.join(root, "tmux.conf")
        with open(self.conf, "w") as f:
            f.write("set -g history-limit 5000\n")

    def start_server(self, **extra_env):
        """Start the private server from a bare environment, as a login shell might have."""
        env = {"PATH": os.environ["PATH"], "HOME": self.home, "TMUX_TMPDIR": self.tmpdir}
        env.update(extra_env)
        subprocess.run(["tmux", "-L", self.socket, "-f", self.conf, "new-session", "-d",
                        "-s", "keep", "sleep", "100000"], env=env, check=True)

    def stop(self):
        stop_watcher(os.path.join(self.root, "state.d"))
        env = dict(os.environ)
        env.pop("TMUX", None)
        # The test's own server, and the default one of its private TMUX_TMPDIR
        # (tests that unset ORCH_TMUX_SOCKET, or records with no socket, start that one).
        default = os.path.join(self.tmpdir, "tmux-%d" % os.getuid(), "default")
        for where in (["-L", self.socket], ["-S", default]):
            subprocess.run([self.tmux] + where + ["kill-server"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def records(self, kind=None):
        """Everything the stand-in agents logged, oldest first."""
        found = []
        for name in sorted(os.listdir(self.logs)):
            with open(os.path.join(self.logs, name)) as f:
                found += [json.loads(line) for line in f if line.strip()]
        found.sort(key=lambda r: r["t"])
        return [r for r in found if kind is None or r["kind"] == kind]

    def messages(self, name=None):
        return [r["text"] for r in self.records("message") if name is None or r["name"] == name]

    def state(self):
        with open(os.environ["ORCH_STATE"]) as f:
            return json.load(f)


def stop_watcher(folder):
    """End the notification watcher of a data folder, by the pid it wrote (never by name)."""
    try:
        with open(os.path.join(folder, "watch.pid")) as f:
            pid = int(f.read())
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            if b"_watch" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        return
    retry_until(lambda: not os.path.exists("/proc/%d" % pid) or zombie(pid), 10)


def zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def env(tmp_path, monkeypatch):
    world = Env(str(tmp_path), monkeypatch)
    world.start_server()
    yield world
    world.stop()


def run(capsys, *args, stdin=None):
    """Run orch in this process; return (exit code, stdout, stderr)."""
    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        try:
            code = orch.main(list(args))
        except SystemExit as e:
            code = e.code
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return code, out, err


def cli(*args, stdin=None, python=None, env_extra=None, env=None, cwd=None):
    """Run orch.py as its own process (exit codes, stderr, other interpreters)."""
    env = dict(os.environ if env is None else env)
    env.update(env_extra or {})
    proc = subprocess.run([python or sys.executable, ORCH] + list(args), env=env, cwd=cwd,
                          input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def status(capsys, name):
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0
    return {row["name"]: row for row in json.loads(out)}[name]


def wait_status(capsys, name, wanted, timeout=15):
    return retry_until(lambda: status(capsys, name)["status"] == wanted and status(capsys, name),
                       timeout)


# ###########################################################################
# Pure functions, tested with literal strings
# ###########################################################################

def test_parse_tmux_version():
    assert orch.parse_tmux_version("tmux 3.3a") == (3, 3)
    assert orch.parse_tmux_version("tmux 3.0") == (3, 0)
    assert orch.parse_tmux_version("tmux 2.9a") < orch.MIN_TMUX
    assert orch.parse_tmux_version("tmux next-3.5") == (3, 5)
    assert orch.parse_tmux_version("tmux master") >= orch.MIN_TMUX


def test_parse_panes_keeps_separator_inside_fields_apart():
    line = orch.SEP.join(["%3", "42", "1", "7", "", "@2", "orch", "1700000000", "9", "0", "/bin/sh x"])
    panes = orch.parse_panes(line + "\nnot a pane line\n")
    assert list(panes) == ["%3"]
    assert panes["%3"]["pane_dead_status"] == "7" and panes["%3"]["pid"] == "9"


def test_exit_code_of_signal_death():
    assert orch.exit_code_of({"pane_dead_status": "", "pane_dead_signal": "15"}) == 143
    assert orch.exit_code_of({"pane_dead_status": "3", "pane_dead_signal": ""}) == 3
    assert orch.exit_code_of({"pane_dead_status": "", "pane_dead_signal": "",
                              "pane_pid": str(os.getpid())}) is None


def test_zombie_exit_code_from_proc():
    proc = subprocess.Popen(["sh", "-c", "exit 7"])
    retry_until(lambda: orch.zombie_exit_code(proc.pid) is not None)
    assert orch.zombie_exit_code(proc.pid) == 7
    proc.wait()
    killed = subprocess.Popen(["sleep", "100"])
    killed.terminate()
    retry_until(lambda: orch.zombie_exit_code(killed.pid) is not None)
    assert orch.zombie_exit_code(killed.pid) == 143
    killed.wait()


def test_parse_state_refuses_corrupt_and_newer():
    with pytest.raises(orch.OrchError, match="corrupt"):
        orch.parse_state("{not json", "/x/state.json")
    with pytest.raises(orch.OrchError, match="newer"):
        orch.parse_state(json.dumps({"version": orch.STATE_VERSION + 1, "agents": {}}), "/x")
    with pytest.raises(orch.OrchError, match="not an orch state file"):
        orch.parse_state("[]", "/x")
    assert orch.parse_state("", "/x") == orch.empty_state()


def test_new_rows_after_scroll_and_redraw():
    assert orch.new_rows(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]
    assert orch.new_rows(["a", "b"], ["a", "b"]) == []
    assert orch.new_rows(["x", "y"], ["p", "y", "q"]) == ["p", "q"]


def test_escape_leading_command_characters():
    assert orch.escape_leading("/compact") == "\\/compact"
    assert orch.escape_leading("!rm -rf x") == "\\!rm -rf x"
    assert orch.escape_leading("  /compact") == "\\  /compact"
    assert orch.escape_leading("plain / text") == "plain / text"


# Screens measured on the real Claude Code (trimmed to their last rows).
RULE = "\u2500" * 60
SCREEN_UPSELL_2_1_332 = [
    "\u276f hello there", "", "\u25cf reply 1: ok", "", "\u273b Brewed for 0s", "", RULE,
    "  Try the new fullscreen renderer?",
    "  \u00b7 Flicker-free output: no more flashing during long responses",
    "  \u00b7 Mouse support: click to move your cursor or expand results", "",
    "  \u276f 1. Yes, try it", "    2. Not now", "",
    "  Enter to confirm \u00b7 Esc to cancel", "", ""]
SCREEN_MODEL_2_1_197 = [
    "\u276f hello", "\u25cf reply 1: ok", "\u276f /model", RULE, "  Select model",
    "  Switch between Claude models. Your pick becomes the default for new sessions.", "",
    "  \u276f 1. Default (recommended) \u2714  Use the default model \u00b7 $5/$25 per Mtok",
    "    2. Opus                     Opus 4.8 with 1M context \u00b7 $5/$25 per Mtok",
    "    3. Sonnet                   Sonnet 5 \u00b7 Efficient for routine tasks", "",
    "  \u25cf High effort (default) \u2190/\u2192 to adjust", "",
    "  Enter to set as default \u00b7 s to use this session only \u00b7 Esc to cancel",
    RULE + " b1 \u2500\u2500"]
SCREEN_MODEL_2_1_330 = [
    "\u276f hello", "\u25cf reply 1: ok", "\u2594" * 60, "  Select model",
    "  Your pick is the default for new sessions. For other models, use --model.", "",
    "  \u276f 1. Default (recommended) \u2714  Use the default model (currently Opus 5.5)",
    "    2. Opus                     Opus 5.5 \u00b7 Best for everyday, complex tasks", "",
    "  \u25d0 Medium effort (default) \u2190/\u2192 to adjust", "",
    "  s to use this session only \u00b7 Enter to save \u00b7 Esc to cancel"]
SCREEN_IDLE_QUOTING_A_DIALOG = [
    "\u276f show me the dialog", "", "\u25cf Here it is:", "  Try the new renderer?",
    "  \u276f 1. Yes, try it", "    2. Not now", "  Enter to confirm \u00b7 Esc to cancel", "",
    RULE + " a1 \u2500", "\u276f ", RULE, "  \u23f8 manual mode on \u00b7 ? for shortcuts"]


SCREEN_MODEL_OVER_THE_BOX_2_1_332 = SCREEN_MODEL_2_1_330[1:] + [
    "", RULE + " a1 \u2500", "\u276f", RULE]


def test_a_dialog_over_the_input_box_counts_only_when_claude_says_one_is_open():
    assert orch.choice_dialog(SCREEN_MODEL_OVER_THE_BOX_2_1_332) is None
    dialog = orch.choice_dialog(SCREEN_MODEL_OVER_THE_BOX_2_1_332, said=True)
    assert (dialog["question"], dialog["cursor"]) == ("Select model", 1)


@pytest.mark.parametrize("rows, question, first, count", [
    (SCREEN_UPSELL_2_1_332, "Try the new fullscreen renderer?", "Yes, try it", 2),
    (SCREEN_MODEL_2_1_197, "Select model", "Default (recommended)", 3),
    (SCREEN_MODEL_2_1_330, "Select model", "Default (recommended)", 2),
])
def test_a_dialog_is_recognised_by_its_shape(rows, question, first, count):
    dialog = orch.choice_dialog(rows)
    assert (dialog["question"], dialog["cursor"], len(dialog["choices"])) == (question, 1, count)
    assert dialog["choices"][1].startswith(first) and "Esc to cancel" in dialog["keys"]


def test_a_reply_that_quotes_a_dialog_is_no_dialog():
    assert orch.choice_dialog(SCREEN_IDLE_QUOTING_A_DIALOG) is None
    assert orch.choice_dialog(SCREEN_UPSELL_2_1_332[:-5]) is None     # no keys line
    moved = [r.replace("\u276f 1.", "  1.") for r in SCREEN_UPSELL_2_1_332]
    assert orch.choice_dialog(moved) is None                        # no cursor


# First screens, captured from the real CLIs in a fresh HOME (2026-12-04): what
# each shows before its input box, with its box, cursor and keys as drawn.
SCREEN_API_KEY_2_1_332 = [
    "", RULE, "  Detected a custom API key in your environment", "",
    "  ANTHROPIC_API_KEY: sk-ant-...0123456789abcdefghij", "", "  Do you want to use this API key?",
    "", "    Yes", "  \u276f No (recommended)", "", "  Enter to confirm \u00b7 Esc to cancel", "", ""]
SCREEN_API_KEY_2_1_197 = [row.replace("    Yes", "    1. Yes").replace("\u276f No", "\u276f 2. No")
                          for row in SCREEN_API_KEY_2_1_332]
SCREEN_TRUST_2_1_332 = [
    RULE, " Accessing workspace:", "", " /tmp/work", "",
    " Quick safety check: Is this a project you created or one you trust? (Like your own code, a "
    "well-known open so", " project, or work from your team). If not, take a moment to review "
    "what's in this folder first.", "", " Claude Code'll be able to read, edit, and execute files "
    "here.", "", " Security guide", "", " \u276f No, exit", "   Yes, I trust this folder", "",
    " Enter to confirm \u00b7 Esc to cancel"]
SCREEN_CODEX_SIGN_IN_0_171 = [
    "  Welcome to Codex, OpenAI's command-line coding agent", "",
    "  Choose how you want to use Codex.", "", "> 1. Sign in with ChatGPT",
    "     Usage included with Plus, Pro, Business, and Enterprise plans", "",
    "  2. Sign in with Device Code", "     Sign in from another device with a one-time code", "",
    "  3. Sign in another way", "     Use an API key or another provider", "",
    "  Press enter to continue", ""]
GEMINI_BOX = "\u2502%-100s\u2502"
SCREEN_GEMINI_AUTH_0_61 = [" Gemini CLI v0.61.0", "", "\u256d" + "\u2500" * 100 + "\u256e"] + [
    GEMINI_BOX % row for row in (
        "", " ? Get started", "", "   How would you like to authenticate for this project?", "",
        "   \u25cf 1. Sign in with Google", "     2. Use Gemini API Key", "     3. Vertex AI", "",
        "   No authentication method selected.", "", "   (Use Enter to select)", "",
        "   Terms of Services and Privacy Notice for Gemini CLI", "",
        "   https://geminicli.com/docs/resources/tos-privacy/", "")] + [
    "\u2570" + "\u2500" * 100 + "\u256f"]


@pytest.mark.parametrize("rows, question, choices, cursor", [
    (SCREEN_API_KEY_2_1_332, "Do you want to use this API key?", ["Yes", "No (recommended)"], 2),
    (SCREEN_API_KEY_2_1_197, "Do you want to use this API key?", ["Yes", "No (recommended)"], 2),
    (SCREEN_TRUST_2_1_332, "Accessing workspace:", ["No, exit", "Yes, I trust this folder"], 1),
    (SCREEN_CODEX_SIGN_IN_0_171, "Welcome to Codex, OpenAI's command-line coding agent",
     ["Sign in with ChatGPT", "Sign in with Device Code", "Sign in another way"], 1),
    (SCREEN_GEMINI_AUTH_0_61, "How would you like to authenticate for this project?",
     ["Sign in with Google", "Use Gemini API Key", "Vertex AI"], 1),
])
def test_first_screens_read_by_their_shape(rows, question, choices, cursor):
    # Numbered or not, boxed or not, with any of the cursors ❯ > ●.
    dialog = orch.choice_dialog(rows)
    assert dialog["question"] == question
    assert [dialog["choices"][n] for n in sorted(dialog["choices"])] == choices
    assert dialog["cursor"] == cursor


@pytest.mark.parametrize("kind, rows, needs, question", [
    (orch.ClaudeKind, SCREEN_API_KEY_2_1_332, "api-key", "Do you want to use this API key?"),
    (orch.ClaudeKind, SCREEN_API_KEY_2_1_197, "api-key", "Do you want to use this API key?"),
    (orch.ClaudeKind, SCREEN_TRUST_2_1_332, "trust",
     "Is this a project you created or one you trust?"),
    (orch.CodexKind, SCREEN_CODEX_SIGN_IN_0_171, "sign-in", "Choose how you want to use Codex."),
    (orch.GeminiKind, SCREEN_GEMINI_AUTH_0_61, "sign-in",
     "How would you like to authenticate for this project?"),
    # A screen no kind knows still stands in the way, under its own question.
    (orch.ClaudeKind, SCREEN_UPSELL_2_1_332[6:], "dialog", "Try the new fullscreen renderer?"),
    (orch.CodexKind, SCREEN_UPSELL_2_1_332[6:], "dialog", "Try the new fullscreen renderer?"),
])
def test_each_kind_names_the_first_screens_it_knows(kind, rows, needs, question):
    assert kind.screen_start(rows) == ("needs-input", needs, question)
    assert kind.first_screen(rows)["keys"] == (kind is not orch.CodexKind or needs != "sign-in")


def test_no_first_screen_where_the_input_box_is():
    assert orch.ClaudeKind.first_screen(SCREEN_IDLE_QUOTING_A_DIALOG) is None
    assert orch.CodexKind.screen_start(CODEX_IDLE) == ("idle", None, None)
    typed = [RULE, "\u276f half typed", "  and more", RULE, "  esc to interrupt"]
    assert orch.choice_dialog(typed) is None        # an input line is no cursor's choice
    boxed = SCREEN_GEMINI_AUTH_0_61 + ["\u2500" * 60, " > Type your message or @path/to/file",
                                       "\u2500" * 60]
    assert orch.GeminiKind.first_screen(boxed) is None
    assert orch.CommandKind.screen_start(SCREEN_API_KEY_2_1_332) is None
    quoted = ["\u276f what did it ask?", "\u25cf It asked: Do you want to use this API key?",
              "  and whether you trust this folder", RULE, "\u276f ", RULE]
    assert orch.ClaudeKind.first_screen(quoted) is None     # a resumed conversation, words only


def test_gemini_trust_has_no_keys_line_and_still_stands_in_the_way():
    rows = ["\u256d" + "\u2500" * 60] + [GEMINI_BOX % row for row in (
        " Do you trust the files in this folder?", "", " Trusting a folder allows Gemini CLI to "
        "load its local configurations", "", " \u25cf 1. Trust folder (work)",
        "   2. Trust parent folder (tmp)", "   3. Don't trust", "")] + ["\u2570" + "\u2500" * 60]
    assert orch.GeminiKind.screen_start(rows) == (
        "needs-input", "trust", "Do you trust the files in this folder?")


@pytest.mark.parametrize("name", ["", "a b", "a.b", "a:b", "a/b", "-a", "_a", "é", "a" * 41,
                                  "a\n", "a;b", "$(x)"])
def test_bad_names_are_refused(name):
    with pytest.raises(orch.OrchError) as e:
        orch.check_name(name)
    assert e.value.code == orch.EXIT_USAGE


@pytest.mark.parametrize("name", ["a", "A1", "fix-tests", "x_y", "9" * 40])
def test_good_names_are_accepted(name):
    assert orch.check_name(name) == name


# ###########################################################################
# spawn
# ###########################################################################

def test_spawn_delivers_prompt_and_records_agent(env, capsys):
    code, out, err = run(capsys, "spawn", "a1", "fix the tests")
    assert code == 0, err
    assert "a1" in out and "orch attach a1" in out
    agent = env.state()["agents"]["a1"]
    start = env.records("start")[0]
    argv = start["argv"]
    assert argv[argv.index("--session-id") + 1] == agent["session_id"]
    assert argv[argv.index("--name") + 1] == "a1"
    assert start["cwd"] == env.work
    assert not [a for a in argv if "fix the tests" in a]     # pasted: argv is public
    assert env.messages() == ["fix the tests"]
    assert wait_status(capsys, "a1", "idle")["last_prompt"] == "fix the tests"


def test_spawn_gives_agent_the_callers_environment(env, capsys, monkeypatch):
    monkeypatch.setenv("ONLY_IN_CALLER", "caller value $(x) 'q'")
    monkeypatch.setenv("CLAUDECODE", "1")
    monkeypatch.setenv("CLAUDE_CODE_ENTRYPOINT", "cli")
    monkeypatch.setenv("TMUX", "/nonexistent/socket,1,0")   # must not redirect orch either
    monkeypatch.setenv("TMUX_PANE", "%99")
    code, _, err = run(capsys, "spawn", "a1")
    assert code == 0, err
    seen = env.records("start")[0]["env"]
    assert seen["ONLY_IN_CALLER"] == "caller value $(x) 'q'"
    for var in ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT", "TMUX", "TMUX_PANE"):
        assert var not in seen


def test_spawn_huge_prompt_with_shell_metacharacters_arrives_exactly(env, capsys):
    unit = "q'uote \"dq\" $(touch pwned) `touch pwned2` ; & | > x < y \\ \u00e9\u6f22\U0001F600\n"
    prompt = (unit * (105000 // len(unit.encode("utf-8")) + 1)).rstrip("\n")
    code, out, err = run(capsys, "spawn", "big", "-", stdin=prompt)
    assert code == 0, err
    assert "submitted" in out
    assert env.messages() == [prompt]
    for path in (env.work, env.root, env.home):
        assert not [n for n in os.listdir(path) if n.startswith("pwned")]


def test_spawn_prompt_with_metacharacters_arrives_exactly(env, capsys):
    prompt = "-leading dash; $(touch pwned) `id` 'single' \"double\"\nsecond line \u2713"
    code, _, err = run(capsys, "spawn", "a1", prompt)
    assert code == 0, err
    assert env.messages() == [prompt]
    assert "--" not in env.records("start")[0]["argv"]
    assert not os.path.exists(os.path.join(env.work, "pwned"))


def test_spawn_prompt_file_and_cwd(env, capsys, tmp_path):
    other = tmp_path / "elsewhere with space"
    other.mkdir()
    (tmp_path / "p.txt").write_text("from a file")
    code, _, err = run(capsys, "spawn", "a1", "--prompt-file", str(tmp_path / "p.txt"),
                       "--cwd", str(other))
    assert code == 0, err
    assert env.messages() == ["from a file"]
    assert env.records("start")[0]["cwd"] == str(other)


def test_spawn_passes_extra_args_after_double_dash(env, capsys):
    code, _, err = run(capsys, "spawn", "a1", "go", "--", "--model", "x", "--allowedTools", "Bash")
    assert code == 0, err
    argv = env.records("start")[0]["argv"]
    assert ["--model", "x", "--allowedTools", "Bash"] == argv[-4:]
    assert env.messages() == ["go"]


def test_spawn_refuses_duplicates(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    code, _, err = run(capsys, "spawn", "a1")
    assert code == 1 and "already running" in err
    run(capsys, "kill", "a1")
    code, _, err = run(capsys, "spawn", "a1")
    assert code == 1 and "orch resume a1" in err and "orch rm a1" in err


def test_spawn_agent_that_dies_at_start_fails(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_DIE_AT_START", "4")
    code, _, err = run(capsys, "spawn", "a1", "task")
    assert code == 1
    assert "exited at start (exit code 4)" in err and "unknown option" in err
    assert status(capsys, "a1")["status"] == "exited"


def test_spawn_missing_cwd_and_program(env, capsys, monkeypatch):
    code, _, err = run(capsys, "spawn", "a1", "--cwd", "/nonexistent/dir")
    assert code == 1 and "/nonexistent/dir" in err and "does not exist" in err
    monkeypatch.setenv("ORCH_CLAUDE", "no-such-claude-program")
    code, _, err = run(capsys, "spawn", "a1")
    assert code == 1 and "no-such-claude-program not found" in err
    code, _, err = run(capsys, "spawn", "a2", "--cmd", "no-such-agent-program --x")
    assert code == 1 and "no-such-agent-program not found" in err
    assert not os.path.exists(os.environ["ORCH_STATE"]) or not env.state()["agents"]


def test_cmd_agent_gets_first_message_and_sends_unconfirmed(env, capsys):
    code, out, err = run(capsys, "spawn", "c1", "first task", "--cmd", env.fake + " --plain")
    assert code == 0, err
    assert "sent (unconfirmed)" in out
    code, out, err = run(capsys, "send", "c1", "/not a command")
    assert code == 0 and "sent (unconfirmed)" in out
    retry_until(lambda: env.messages() == ["first task", "\\/not a command"])
    assert not env.records("command")
    row = status(capsys, "c1")
    assert row["status_source"] == "activity" and row["session_id"] is None


# ###########################################################################
# send
# ###########################################################################

HARD_MESSAGES = [
    "it's \"quoted\" and 'single'",
    "$(touch pwned) and `touch pwned2` and ${HOME}",
    "ends with a semicolon;",
    "line one\nline two\n\nline four",
    "unicode: \u00e9\u00e8 \u6f22\u5b57 \U0001F680",
    "Enter C-m \\; send-keys Escape",
    "ends with a backslash \\",
    "x" * 10240,
]


def test_send_hard_messages_arrive_exactly_once_in_order(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    for message in HARD_MESSAGES:
        code, out, err = run(capsys, "send", "a1", message)
        assert (code, out) == (0, "a1: submitted\n"), err
    received = env.messages()
    assert received[:-1] == HARD_MESSAGES[:-2] + [HARD_MESSAGES[-2] + " "]
    assert received[-1] == HARD_MESSAGES[-1]
    assert not [n for n in os.listdir(env.work) if n.startswith("pwned")]


def test_send_back_to_back_while_the_screen_redraws_late(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_REDRAW_LATE", "1.5")
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    for message in ("second", "SLOW-2 third", "fourth"):
        code, out, err = run(capsys, "send", "a1", message)
        assert code == 0, err
    assert run(capsys, "wait", "a1")[0] == 0
    assert env.messages() == ["first", "second", "SLOW-2 third", "fourth"]


def test_send_refuses_its_own_message_put_back_by_an_interrupt(env, capsys, monkeypatch):
    monkeypatch.setattr(orch, "REDRAW_WAIT", 1.0)
    assert run(capsys, "spawn", "a1", "SLOW-30 long job")[0] == 0
    tmux_cmd("send-keys", "-t", env.state()["agents"]["a1"]["tmux"]["pane"], "Escape")
    wait_status(capsys, "a1", "idle")
    code, out, err = run(capsys, "send", "a1", "next")
    assert code == orch.EXIT_NEEDS_INPUT and one_error(err)
    assert "'SLOW-30 long job'; it still holds orch's last message" in err
    assert env.messages() == ["SLOW-30 long job"]


def test_send_from_stdin(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    code, out, _ = run(capsys, "send", "a1", stdin="from stdin\nsecond line\n")
    assert code == 0 and "submitted" in out
    code, out, _ = run(capsys, "send", "a1", "-", stdin="dash means stdin")
    assert code == 0
    assert env.messages() == ["from stdin\nsecond line", "dash means stdin"]


def test_send_command_characters_as_text_unless_raw(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    assert run(capsys, "send", "a1", "/compact")[0] == 0
    assert run(capsys, "send", "a1", "!touch pwned")[0] == 0
    assert env.messages() == ["\\/compact", "\\!touch pwned"]
    assert not env.records("command")
    code, out, err = run(capsys, "send", "a1", "--raw", "/compact")
    assert code == 0 and "unconfirmed" in out, err      # a slash command fires no hook
    assert [r["text"] for r in env.records("command")] == ["/compact"]


def test_send_retries_enter_when_it_is_lost_and_never_retypes(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    code, out, err = run(capsys, "send", "a1", "SWALLOW this one")
    assert (code, out) == (0, "a1: submitted\n"), err
    assert env.messages() == ["SWALLOW this one"]


def test_send_while_working_is_queued_once(env, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-3 long job")[0] == 0
    code, out, err = run(capsys, "send", "a1", "do this next")
    assert (code, out) == (0, "a1: queued\n"), err
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    retry_until(lambda: env.messages() == ["SLOW-3 long job", "do this next"])
    assert wait_status(capsys, "a1", "idle")["last_prompt"] == "do this next"


def test_send_refused_at_permission_dialog_and_tool_not_approved(env, capsys):
    assert run(capsys, "spawn", "a1", "ASK to run a tool")[0] == 0
    row = wait_status(capsys, "a1", "needs-input")
    assert row["needs"] == "permission"
    code, _, err = run(capsys, "send", "a1", "please continue")
    assert code == orch.EXIT_NEEDS_INPUT
    assert "orch approve a1" in err and "Bash" in err
    assert not env.records("approved")
    assert env.messages() == ["ASK to run a tool"]


def test_interrupt_without_hook_shows_idle(env, capsys):
    assert run(capsys, "spawn", "a1", "ASK to run a tool")[0] == 0
    wait_status(capsys, "a1", "needs-input")
    tmux_cmd("send-keys", "-t", env.state()["agents"]["a1"]["tmux"]["pane"], "Escape")
    retry_until(lambda: env.records("interrupted"))
    row = wait_status(capsys, "a1", "idle")
    assert row["status_source"] == "claude-status"
    assert run(capsys, "send", "a1", "after the interrupt")[0] == 0
    assert env.messages()[-1] == "after the interrupt"


def person_types(name, *keys):
    """Keys typed into the agent's window by a person, as `orch attach` would let them."""
    pane = read_state_or_empty()["agents"][name]["tmux"]["pane"]
    for key in keys:
        tmux_cmd("send-keys", "-t", pane, *(["-l", key[2:]] if key.startswith("l:") else [key]))


def reboot(env=None):
    """What a reboot does to agents: their tmux server goes, and every process of theirs.

    Each recorded agent's process group gets SIGKILL by pid (gemini ignores
    the SIGHUP a dying server sends).  env: the world's environment (default
    this process's): its ORCH_STATE and ORCH_TMUX_SOCKET.
    """
    env = dict(env or os.environ)
    env.pop("TMUX", None)
    try:
        with open(env["ORCH_STATE"]) as f:
            pids = [a["tmux"]["pid"] for a in json.load(f)["agents"].values()]
    except OSError:
        pids = []
    subprocess.run(["tmux", "-L", env["ORCH_TMUX_SOCKET"], "kill-server"], env=env,
                   stderr=subprocess.DEVNULL)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass        # gone with the server


def test_a_dialog_nobody_has_seen_is_needs_input_and_answered_only_on_purpose(env, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    wait_status(capsys, "a1", "idle")
    person_types("a1", "l:/model", "Enter")     # and leaves without choosing
    row = wait_status(capsys, "a1", "needs-input")
    assert (row["needs"], row["detail"]) == ("dialog", "Select model")
    assert "needs-input (dialog: Select model)" in run(capsys, "list")[1]
    assert run(capsys, "status-line")[1] == "orch: 1 needs input\n"
    assert run(capsys, "wait", "a1")[1] == "a1: needs-input (dialog: Select model)\n"
    for args in (["send", "a1", "hi"], ["send", "a1", "hi", "--force"], ["send", "--all", "hi"]):
        code, out, err = run(capsys, *args)
        assert code == orch.EXIT_NEEDS_INPUT, args
        assert '"Select model"' in out + err and "orch deny a1" in out + err
    code, _, err = run(capsys, "approve", "a1")
    assert code == orch.EXIT_NEEDS_INPUT and one_error(err)
    assert "1. Default (recommended), 2. Opus, 3. Haiku" in err and "--choice N" in err
    assert run(capsys, "approve", "a1", "--choice", "7")[0] == orch.EXIT_USAGE
    assert run(capsys, "approve", "a1", "--choice", "0")[0] == orch.EXIT_USAGE
    assert not env.records("picked") and not env.records("dialog cancelled")
    assert env.messages() == ["first"]
    code, out, err = run(capsys, "approve", "a1", "--choice", "3")
    assert (code, out) == (0, 'a1: picked 3. Haiku in the dialog "Select model"\n'), err
    assert [r["choice"] for r in env.records("picked")] == ["Haiku"]
    wait_status(capsys, "a1", "idle")
    person_types("a1", "l:/model", "Enter")
    wait_status(capsys, "a1", "needs-input")
    code, out, err = run(capsys, "deny", "a1")
    assert (code, out) == (0, 'a1: cancelled the dialog "Select model" (Escape)\n'), err
    assert len(env.records("dialog cancelled")) == 1 and len(env.records("picked")) == 1
    wait_status(capsys, "a1", "idle")
    assert run(capsys, "send", "a1", "after")[0] == 0
    assert env.messages() == ["first", "after"]


def test_send_reads_a_dialog_off_the_screen_when_claude_does_not_say(env, capsys, monkeypatch):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    wait_status(capsys, "a1", "idle")
    person_types("a1", "l:/model", "Enter")
    retry_until(lambda: orch.choice_dialog(orch.agent_screen(env.state()["agents"]["a1"])))
    monkeypatch.setattr(orch, "claude_session_file_status", lambda *a, **k: None)
    assert status(capsys, "a1")["status"] == "idle"     # hooks alone cannot tell
    code, _, err = run(capsys, "send", "a1", "hi", "--force")
    assert code == orch.EXIT_NEEDS_INPUT and '"Select model"' in err
    assert run(capsys, "deny", "a1")[0] == 0
    assert env.messages() == ["first"] and len(env.records("dialog cancelled")) == 1


def test_the_upgrade_prompt_is_kept_away_by_the_renderer_setting(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_UPSELL", "1")      # shows it unless --settings names "tui"
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "send", "a1", "second")[0] == 0
    assert wait_status(capsys, "a1", "idle")["needs"] is None
    settings = env.records("start")[0]["argv"]
    assert json.loads(settings[settings.index("--settings") + 1])["tui"] == "default"
    assert env.messages() == ["first", "second"]


def test_question_dialog_is_needs_input_question(env, capsys):
    assert run(capsys, "spawn", "a1", "QUESTION which one")[0] == 0
    row = wait_status(capsys, "a1", "needs-input")
    assert row["needs"] == "question"
    code, _, err = run(capsys, "send", "a1", "the first")
    assert code == orch.EXIT_NEEDS_INPUT and "a question" in err
    code, out, _ = run(capsys, "send", "a1", "--force", "--timeout", "1", "typed anyway")
    assert env.records("approved")      # --force means it: the Enter answered the dialog
    assert code == orch.EXIT_UNCONFIRMED    # and the text itself never became a prompt


def test_starting_agent_waits_then_send_submits(env, capsys):
    slow = dict(os.environ, FAKE_START_DELAY="2")
    spawn = subprocess.Popen([sys.executable, ORCH, "spawn", "a1"], env=slow,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        retry_until(lambda: os.path.exists(os.environ["ORCH_STATE"])
                    and status(capsys, "a1")["status"] == "starting")
        code, out, err = run(capsys, "send", "a1", "as soon as you can")
        assert (code, out) == (0, "a1: submitted\n"), err
    finally:
        assert spawn.wait(timeout=30) == 0
        spawn.stdout.close()
        spawn.stderr.close()
    assert env.messages() == ["as soon as you can"]


def fire_prompt_hook(name, prompt):
    """Run orch's hook script as claude would for a UserPromptSubmit."""
    hook = orch.install_hook_script()
    event = {"hook_event_name": "UserPromptSubmit", "session_id": "s", "prompt": prompt}
    subprocess.run([sys.executable, "-I", "-S", hook, orch.events_path(name), "UserPromptSubmit"],
                   input=json.dumps(event), universal_newlines=True, check=True)


def test_hook_reads_camel_case_payloads_as_their_snake_case_twins(env):
    # copilot's own hook shape: sessionId, toolName, toolInput, transcriptPath.
    hook = orch.install_hook_script()
    os.makedirs(orch.agent_dir("c1"))
    for event, payload in (("PermissionRequest", {"sessionId": "s-1", "toolName": "bash",
                                                  "toolInput": {"command": "make test"}}),
                           ("Stop", {"sessionId": "s-1", "transcriptPath": "/t/events.jsonl"}),
                           ("SessionStart", {"sessionId": "s-1",
                                             "transcriptPath": "/t/events.jsonl"})):
        subprocess.run([sys.executable, "-I", "-S", hook, orch.events_path("c1"), event],
                       input=json.dumps(payload), universal_newlines=True, check=True)
    asked, stop, start = orch.read_events("c1")
    assert (asked["session_id"], asked["tool_name"], asked["tool_input"]) == (
        "s-1", "bash", {"command": "make test"})
    assert stop["session_id"] == "s-1" and "transcript_path" not in stop
    assert start["transcript_path"] == "/t/events.jsonl"


def test_a_retried_api_error_is_working_and_says_so_until_the_turn_goes_on():
    events = hook_events(("UserPromptSubmit", "p1", "go"))
    events.append({"t": 2.0, "event": "Retrying", "attempt": 3,
                   "message": "Rate limit reached for requests"})
    seen = orch.replay_events(events)
    assert (seen["status"], seen["detail"]) == (
        "working", "retrying: Rate limit reached for requests, attempt 3")
    seen = orch.replay_events([{"t": 3.0, "event": "Working"}], seen)
    assert (seen["status"], seen["detail"]) == ("working", None)
    # A retry an hour away (opencode at a retry-after of 3600 s): when it tries again.
    said = time.mktime((2026, 12, 7, 2, 44, 10, 0, 0, -1))
    seen = orch.replay_events([{"t": said, "event": "Retrying", "attempt": 1, "next": said + 3586,
                                "message": "Rate limit reached for requests"}], seen)
    assert seen["detail"] == ("retrying: Rate limit reached for requests, attempt 1, next try "
                              "at 03:43")
    seen = orch.replay_events([{"t": said, "event": "Retrying", "attempt": 2, "next": said + 5,
                                "message": "Rate limit reached for requests"}], seen)
    assert seen["detail"] == "retrying: Rate limit reached for requests, attempt 2"


def test_merged_prompt_confirms_only_messages_orch_sent(env):
    # Claude may merge messages queued during a turn into one prompt.
    agent = {"name": "m1"}
    os.makedirs(orch.agent_dir("m1"))
    for text in ("first queued", "second queued"):
        orch.append_line(orch.hpath("m1", "sent"), json.dumps({"t": time.time(), "prompt": text}))
    fire_prompt_hook("m1", "first queued\n\nsecond   queued")
    assert orch.submitted(agent, "second queued", 0)
    assert orch.submitted(agent, "first queued", 0)
    assert not orch.submitted(agent, "third", 0)
    assert not orch.submitted(agent, "second queued", time.time() + 1)
    # A person's half-typed words joined to the message: submitted, but not alone.
    later = time.time()
    fire_prompt_hook("m1", "half typed second queued")
    with pytest.raises(orch.OrchError) as e:
        orch.submitted(agent, "second queued", later)
    assert e.value.code == orch.EXIT_MIXED and "half typed second queued" in str(e.value)


def test_send_to_exited_agent_says_resume(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    assert run(capsys, "send", "a1", "EXIT-3 bye")[0] in (0, orch.EXIT_NOT_RUNNING)
    row = wait_status(capsys, "a1", "exited")
    assert row["exit_code"] == 3
    code, _, err = run(capsys, "send", "a1", "hello?")
    assert code == orch.EXIT_NOT_RUNNING and "orch resume a1" in err


def test_send_unknown_agent_and_empty_message(env, capsys):
    code, _, err = run(capsys, "send", "ghost", "hi")
    assert code == 1 and "no agent named 'ghost'" in err
    assert run(capsys, "spawn", "a1")[0] == 0
    code, _, err = run(capsys, "send", "a1", "   ")
    assert code == 2 and "empty" in err


# ###########################################################################
# Supervision: answers, and one message to many agents
# ###########################################################################

def test_reply_is_the_whole_last_answer(env, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-2 first")[0] == 0
    code, out, err = run(capsys, "reply", "a1")
    assert (code, out) == (orch.EXIT_NOT_RUNNING, "") and "not finished a turn" in err
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    assert run(capsys, "reply", "a1")[:2] == (0, "slow reply done\n")
    # The round trip a script makes: send, wait, reply.
    assert run(capsys, "send", "a1", "LONGREPLY please")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    code, out, err = run(capsys, "reply", "a1")
    long_reply = "\n".join("answer line %d: %s \u00e9" % (i, "x" * 60) for i in range(100))
    assert (code, out, err) == (0, long_reply + "\n", "")
    assert run(capsys, "send", "a1", "SLOW-5 more")[0] == 0
    code, out, err = run(capsys, "reply", "a1", "--json")
    row = json.loads(out)
    assert (code, row["name"], row["reply"], row["status"]) == (0, "a1", long_reply, "working")
    code, out, err = run(capsys, "reply", "a1")
    assert out == long_reply + "\n" and "a1 is working" in err


def test_reply_without_answers_says_why(env, capsys):
    assert run(capsys, "spawn", "c1", "--cmd", "sleep 100")[0] == 0
    code, out, err = run(capsys, "reply", "c1")
    assert (code, out) == (1, "") and "--cmd" in err and "orch tail c1" in err
    code, _, err = run(capsys, "reply", "ghost")
    assert code == 1 and "no agent named 'ghost'" in err
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    with open(os.path.join(orch.agent_dir("a1"), "reply.json"), "w") as f:
        f.write('{"t": 1e12, "text": ')        # torn by hand: no answer, no traceback
    code, _, err = run(capsys, "reply", "a1")
    assert code == orch.EXIT_NOT_RUNNING and "not finished a turn" in err


def test_log_is_the_conversation_not_the_screen(env, capsys):
    assert run(capsys, "spawn", "a1", "first task")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    assert run(capsys, "send", "a1", "two\nlines")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    code, out, err = run(capsys, "log", "a1")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["> first task", "\u25cf reply: first task",
                                "\u2714 turn done (1.5s)", "> two", "  lines",
                                "\u25cf reply: two lines", "\u2714 turn done (1.5s)"]
    code, out, _ = run(capsys, "log", "a1", "-n", "2", "--json")
    assert [json.loads(l) for l in out.splitlines()] == [
        {"kind": "assistant", "text": "reply: two lines"},
        {"kind": "turn", "ok": True, "seconds": 1.5}]


def test_log_follows_exactly_and_skips_a_half_written_line(env, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    path = orch.conversation_path(env.state()["agents"]["a1"])
    with open(path, "a") as f:
        f.write('{"type": "user", "message": {"role": "user", "content": "half wr')
    assert run(capsys, "log", "a1")[1].splitlines()[-1] == "\u2714 turn done (1.5s)"
    follow = subprocess.Popen([sys.executable, ORCH, "log", "a1", "-f"],
                              stdout=subprocess.PIPE, universal_newlines=True)
    with open(path, "a") as f:
        f.write('itten"}}\n')
    assert run(capsys, "send", "a1", "third")[0] == 0
    assert run(capsys, "send", "a1", "EXIT-0 bye")[0] in (0, orch.EXIT_NOT_RUNNING)
    out = follow.communicate(timeout=30)[0]
    assert out.splitlines() == ["> first", "\u25cf reply: first", "\u2714 turn done (1.5s)",
                                "> half written", "> third", "\u25cf reply: third",
                                "\u2714 turn done (1.5s)", "> EXIT-0 bye"]


def test_log_says_what_it_cannot_read(env, capsys):
    assert run(capsys, "spawn", "c1", "--cmd", "sleep 100")[0] == 0
    code, out, err = run(capsys, "log", "c1")
    assert (code, out) == (1, "") and "--cmd" in err and one_error(err)
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    os.unlink(orch.conversation_path(env.state()["agents"]["a1"]))
    code, out, err = run(capsys, "log", "a1")
    assert (code, out) == (1, "") and "deleted" in err and one_error(err)


def run_in_window(env, *args):
    """Start orch ARGS in a new window of the test's tmux server; return its pane id."""
    keep = ["%s=%s" % (k, os.environ[k]) for k in ("HOME", "ORCH_STATE", "ORCH_TMUX_SOCKET",
                                                   "ORCH_CLAUDE", "FAKE_LOG", "PATH")
            if k in os.environ]
    return tmux_cmd("new-window", "-d", "-P", "-F", "#{pane_id}", "-t", "=orch:", "env",
                    *(keep + ["LC_ALL=C.UTF-8", sys.executable, ORCH] + list(args))).strip()


def screen(pane):
    return tmux_cmd("capture-pane", "-p", "-t", pane)


def test_events_feed_in_a_pane(env, capsys):
    assert run(capsys, "spawn", "a1", "ASK to run a tool")[0] == 0
    wait_status(capsys, "a1", "needs-input")
    pane = run_in_window(env, "events", "--since", "600")
    # --since: the agent's status now, then each change as it happens.
    retry_until(lambda: "a1  - \u2192 needs-input  permission  Bash" in screen(pane))
    tmux_cmd("send-keys", "-t", env.state()["agents"]["a1"]["tmux"]["pane"], "Escape")
    retry_until(lambda: "a1  needs-input \u2192 idle" in screen(pane))
    assert run(capsys, "spawn", "a2", "first")[0] == 0
    retry_until(lambda: "a2  - \u2192 " in screen(pane))       # a new agent
    assert run(capsys, "rm", "a1")[0] == 0
    retry_until(lambda: "a1  idle \u2192 removed" in screen(pane))
    tmux_cmd("kill-pane", "-t", pane)
    code, _, err = run(capsys, "events", "ghost")
    assert code == 1 and "no agent named 'ghost'" in err


def feed_lines(proc):
    """A queue of the lines proc prints, read by a thread (a read never blocks the test)."""
    import queue
    import threading
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in iter(proc.stdout.readline, "")],
                     daemon=True).start()
    return lines


def next_line(lines, timeout=30):
    import queue
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError("no line within %ss" % timeout)


def test_events_json_for_scripts(env, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "spawn", "a2", "first")[0] == 0
    wait_status(capsys, "a1", "idle")
    feed = subprocess.Popen([sys.executable, ORCH, "events", "a1", "--json", "--since", "600"],
                            stdout=subprocess.PIPE, universal_newlines=True)
    try:
        lines = feed_lines(feed)
        first = json.loads(next_line(lines))
        assert (first["name"], first["from"], first["to"]) == ("a1", None, "idle")
        assert run(capsys, "send", "a2", "ASK not watched")[0] == 0     # filtered out
        assert run(capsys, "send", "a1", "ASK to run a tool")[0] == 0
        changes = [json.loads(next_line(lines))]
        while changes[-1]["to"] != "needs-input":
            changes.append(json.loads(next_line(lines)))
        assert set(c["name"] for c in changes) == {"a1"}
        assert (changes[-1]["needs"], changes[-1]["detail"]) == ("permission", "Bash")
        assert abs(changes[-1]["t"] - time.time()) < 3600 and "T" in changes[-1]["time"]
    finally:
        feed.kill()
        feed.communicate()


def test_status_line_counts(env, capsys):
    assert run(capsys, "status-line") == (0, "", "")
    assert run(capsys, "spawn", "a1", "SLOW-30 job")[0] == 0
    assert run(capsys, "spawn", "a2", "ASK to run a tool")[0] == 0
    assert run(capsys, "spawn", "a3", "first")[0] == 0
    wait_status(capsys, "a2", "needs-input")
    wait_status(capsys, "a3", "idle")
    assert run(capsys, "status-line")[:2] == (
        0, "orch: 1 needs input \u00b7 1 working \u00b7 1 idle\n")


def test_list_watch_in_a_pane(env, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "spawn", "a2", "ASK to run a tool")[0] == 0
    wait_status(capsys, "a2", "needs-input")
    pane = run_in_window(env, "list", "--watch")
    rows = retry_until(lambda: [l for l in screen(pane).splitlines() if l[2:4] == "a1"
                                or l[2:4] == "a2"] if "a1" in screen(pane) else None)
    assert rows[0].startswith("! a2") and rows[1].startswith("  a1")
    assert "1 need input" in screen(pane)
    tmux_cmd("send-keys", "-t", pane, "Escape")     # nothing happens: it only draws
    tmux_cmd("send-keys", "-t", env.state()["agents"]["a2"]["tmux"]["pane"], "Escape")
    retry_until(lambda: "0 need input" in screen(pane))
    tmux_cmd("kill-pane", "-t", pane)
    code, _, err = run(capsys, "list", "--watch", "--json")
    assert code == 2 and "events --json" in err
    code, _, err = run(capsys, "list", "--watch")          # stdout is not a terminal here
    assert code == 2 and one_error(err) and "not one" in err


def test_approve_presses_the_yes_that_the_screen_offers_once(versioned, capsys):
    assert run(capsys, "spawn", "a1", "ASK to run a tool")[0] == 0
    wait_status(capsys, "a1", "needs-input")
    assert run(capsys, "approve", "a1", "--tool", "Bash")[:2] == (
        0, "a1: approved Bash (touch x)\n")
    assert [r["kind"] for r in versioned.records() if r["kind"] in (
        "approved", "always allowed", "refused", "interrupted")] == ["approved"]
    assert wait_status(capsys, "a1", "idle")["last_prompt"] == "ASK to run a tool"
    code, _, err = run(capsys, "approve", "a1")          # nothing to approve now
    assert code == orch.EXIT_NEEDS_INPUT and "is idle, not at a permission dialog" in err
    assert one_error(err)


def test_approve_presses_again_only_a_key_claude_ignored(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_DIALOG_GUARD", "1.5")      # longer than orch's settling pause
    assert run(capsys, "spawn", "a1", "ASK to run a tool")[0] == 0
    wait_status(capsys, "a1", "needs-input")
    assert run(capsys, "approve", "a1")[0] == 0
    assert [r["kind"] for r in env.records() if r["kind"] in (
        "approved", "always allowed", "key ignored")] == ["key ignored", "approved"]


def test_deny_cancels_with_escape_and_never_approves(versioned, capsys):
    assert run(capsys, "spawn", "a1", "ASK to run a tool")[0] == 0
    wait_status(capsys, "a1", "needs-input")
    code, out, err = run(capsys, "deny", "a1")
    assert code == 0 and out.startswith("a1: denied Bash (touch x); its turn ended"), err
    assert [r["kind"] for r in versioned.records() if r["kind"] in (
        "approved", "always allowed", "refused", "interrupted")] == ["interrupted"]
    wait_status(capsys, "a1", "idle")
    assert run(capsys, "send", "a1", "do something else")[0] == 0


def test_only_an_unanswered_permission_request_describes_the_dialog(env):
    agent = {"name": "p1", "created": 0}
    os.makedirs(orch.agent_dir("p1"))

    def events(*names):
        with open(orch.events_path("p1"), "w") as f:
            for i, name in enumerate(names):
                f.write(json.dumps({"t": 1.0 + i, "event": name, "tool_name": "Bash",
                                    "n": i}) + "\n")
        request = orch.permission_request(agent)
        return request and request["n"]
    assert events("UserPromptSubmit", "PreToolUse", "PermissionRequest", "Notification") == 2
    # The next dialog's status came first, its hook not yet: the old request is no answer.
    assert events("PreToolUse", "PermissionRequest", "PostToolUse", "Stop",
                  "UserPromptSubmit", "PreToolUse") is None
    assert events("PreToolUse", "PermissionRequest", "PostToolUse", "PreToolUse",
                  "PermissionRequest") == 4


def test_approve_refuses_whatever_it_cannot_vouch_for(env, capsys):
    assert run(capsys, "spawn", "a1", "ASK OTHERTOOL to run a tool")[0] == 0
    assert run(capsys, "spawn", "a2", "ASK to run a tool")[0] == 0
    wait_status(capsys, "a1", "needs-input")
    wait_status(capsys, "a2", "needs-input")
    for args, words in ((("approve", "a1"), "not about Bash (touch x)"),
                        (("deny", "a1"), "not about Bash (touch x)"),
                        (("approve", "a2", "--tool", "Write"), "asks about Bash (touch x), not Write")):
        code, _, err = run(capsys, *args)
        assert code == orch.EXIT_NEEDS_INPUT and words in err and one_error(err), (args, err)
    assert [r for r in env.records() if r["kind"] in ("approved", "refused", "interrupted")] == []
    assert status(capsys, "a2")["status"] == "needs-input"
    assert run(capsys, "spawn", "c1", "--cmd", "sleep 1000")[0] == 0
    code, _, err = run(capsys, "approve", "c1")
    assert code == 1 and "--cmd" in err and one_error(err)
    assert run(capsys, "kill", "a2")[0] == 0
    assert run(capsys, "deny", "a2")[0] == orch.EXIT_NOT_RUNNING


def test_approve_from_copy_mode_and_the_tool_runs_as_working(env, capsys):
    assert run(capsys, "spawn", "a1", "ASKSLOW-30 a slow tool")[0] == 0
    wait_status(capsys, "a1", "needs-input")
    pane = env.state()["agents"]["a1"]["tmux"]["pane"]
    tmux_cmd("copy-mode", "-t", pane)           # a person scrolled back and left
    assert run(capsys, "approve", "a1")[0] == 0
    # No hook fires while an approved tool runs: claude's own file says busy.
    row = wait_status(capsys, "a1", "working")
    assert (row["needs"], row["status_source"]) == (None, "claude-status")
    assert run(capsys, "interrupt", "a1")[0] == 0
    wait_status(capsys, "a1", "idle")


def test_headless_feed_counts_and_no_dialogs(headless, capsys):
    assert run(capsys, "spawn", "h1", "first")[0] == 0
    for verb in ("approve", "deny"):
        code, _, err = run(capsys, verb, "h1")
        assert code == 1 and "runs headless" in err and "--permission-mode" in err
        assert one_error(err)
    wait_status(capsys, "h1", "idle")
    assert run(capsys, "status-line")[:2] == (0, "orch: 1 idle\n")
    feed = subprocess.Popen([sys.executable, ORCH, "events", "--json", "--since", "600"],
                            stdout=subprocess.PIPE, universal_newlines=True)
    try:
        lines = feed_lines(feed)
        assert json.loads(next_line(lines))["to"] == "idle"
        assert run(capsys, "send", "h1", "SLOW-30 busy now")[0] == 0
        change = json.loads(next_line(lines))
        assert (change["name"], change["from"], change["to"]) == ("h1", "idle", "working")
    finally:
        feed.kill()
        feed.communicate()


def test_send_to_many_reports_each_and_exits_with_the_worst(env, capsys):
    for name, prompt in (("a1", "first"), ("a2", "ASK to run a tool"), ("a3", "first")):
        assert run(capsys, "spawn", name, prompt)[0] == 0
    assert run(capsys, "send", "a3", "EXIT-0 bye")[0] in (0, orch.EXIT_NOT_RUNNING)
    wait_status(capsys, "a2", "needs-input")
    wait_status(capsys, "a3", "exited")
    wait_status(capsys, "a1", "idle")
    code, out, err = run(capsys, "send", "--to", "a1,a2,a3,a1", "to three")
    lines = out.splitlines()
    assert lines[0] == "a1: submitted" and len(lines) == 3, (out, err)
    assert lines[1].startswith("a2: error: ") and "asking for permission" in lines[1]
    assert lines[2].startswith("a3: error: ") and "orch resume a3" in lines[2]
    assert code == orch.EXIT_NEEDS_INPUT        # 4 is worse than 3
    assert env.messages().count("to three") == 1 and not env.records("approved")
    # --idle: only a1 is idle; --all: every agent that runs (a3 has exited).
    assert run(capsys, "send", "--idle", "idle ones")[:2] == (0, "a1: submitted\n")
    wait_status(capsys, "a1", "idle")
    code, out, _ = run(capsys, "send", "--all", "everyone")
    assert code == orch.EXIT_NEEDS_INPUT and [l.split(":")[0] for l in out.splitlines()] == [
        "a1", "a2"]
    assert env.messages().count("everyone") == 1 and env.messages().count("idle ones") == 1


def test_send_to_many_bad_input(env, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-10 busy")[0] == 0
    for args, words in ((["--to", "a1,ghost", "x"], "no agent named 'ghost'"),
                        (["--to", "a1,b/c", "x"], "invalid agent name"),
                        (["--to", "a1", "--all", "x"], "one of --to, --all and --idle"),
                        (["a1", "--all", "x"], "not both"),
                        (["--to", "a1", "   "], "empty")):
        code, out, err = run(capsys, "send", *args)
        assert code in (1, 2) and words in err and out == "" and one_error(err), (args, err)
    code, out, err = run(capsys, "send", "--idle", "x")
    assert (code, out) == (0, "") and "no idle agents: nothing sent" in err
    assert env.messages() == ["SLOW-10 busy"]
    assert run(capsys, "send", "--to", "a1", stdin="from stdin\n")[:2] == (0, "a1: queued\n")


# ###########################################################################
# Claude Code versions: each difference pinned, with the stand-in taught both ways
# ###########################################################################

# The environment that makes the stand-in act like each version (see FAKE_AGENT).
VERSION_BEHAVIOUR = {"2.1.197": {}, "2.1.330": {"FAKE_QUEUE": "immediate", "FAKE_PASTE_WRAP": "1",
                                               "FAKE_DEFAULT_MODE": "auto", "FAKE_NO_OPTION": "4",
                                               "FAKE_SLASH_AFTER_BLANKS": "1"}}


@pytest.fixture(params=sorted(VERSION_BEHAVIOUR))
def versioned(env, monkeypatch, request):
    for key, value in VERSION_BEHAVIOUR[request.param].items():
        monkeypatch.setenv(key, value)
    env.version = request.param
    return env


def hook_events(*steps):
    """Hook events as orch's hook records them: (event, prompt_id, prompt) each."""
    return [dict({"t": i, "event": kind}, **dict(
        ([("prompt_id", pid)] if pid else []) + ([("prompt", text)] if text else [])))
        for i, (kind, pid, text) in enumerate(steps)]


# Measured on the real binaries: a SLOW turn, then two messages typed while it runs.
QUEUE_2_1_197 = hook_events(("SessionStart", None, None), ("UserPromptSubmit", "p1", "first"),
                            ("Stop", "p1", None), ("UserPromptSubmit", "p2", "second"),
                            ("UserPromptSubmit", "p3", "third"), ("Stop", "p3", None))
QUEUE_2_1_330 = hook_events(("SessionStart", None, None), ("UserPromptSubmit", "p1", "first"),
                            ("UserPromptSubmit", "p1", "second"), ("UserPromptSubmit", "p1", "third"),
                            ("Stop", "p1", None), ("Stop", "p4", None))


@pytest.mark.parametrize("events, statuses, queued", [
    (QUEUE_2_1_197, ["idle", "working", "idle", "working", "working", "idle"], []),
    (QUEUE_2_1_330, ["idle", "working", "working", "working", "working", "idle"],
     ["second", "third"]),
])
def test_replay_counts_turns_of_queued_messages(events, statuses, queued):
    seen = [orch.replay_events(events[:i + 1])["status"] for i in range(len(events))]
    assert seen == statuses
    orch.replay_events(events)
    assert [e["prompt"] for e in events if e.get("queued")] == queued


def test_replay_keeps_the_tool_while_its_dialog_is_up():
    events = hook_events(("UserPromptSubmit", "p1", "go"), ("PermissionRequest", "p1", None),
                         ("Notification", None, None))
    events[1]["tool_name"] = "Bash"
    events[2]["notification_type"] = "permission_prompt"
    seen = orch.replay_events(events)
    assert (seen["status"], seen["needs"], seen["detail"]) == ("needs-input", "permission", "Bash")


def test_a_permission_notification_that_lands_after_its_answer_is_stale():
    # Hooks run as processes of their own: on a busy machine the dialog's
    # Notification can land after the approved tool ran (seen on 2.1.330).
    events = hook_events(("UserPromptSubmit", "p1", "go"), ("PreToolUse", "p1", None),
                         ("PermissionRequest", "p1", None), ("PostToolUse", "p1", None),
                         ("Notification", None, None))
    events[-1]["notification_type"] = "permission_prompt"
    assert orch.replay_events(events)["status"] == "working"
    again = events + hook_events(("PreToolUse", "p1", None), ("PermissionRequest", "p1", None))
    for n, event in enumerate(again):
        event["t"] = n
    assert orch.replay_events(again)["status"] == "needs-input"     # a new dialog: asked
    alone = [events[0], dict(events[-1], t=9)]      # a dialog told by its Notification only
    assert orch.replay_events(alone)["status"] == "needs-input"


@pytest.mark.parametrize("steps, own, age, expected", [
    # claude's file says waiting a moment before its PermissionRequest hook: name the tool.
    ([("UserPromptSubmit", "p1", "go"), ("PreToolUse", "p1", None)], "waiting", 0,
     ("needs-input", "permission", "Bash")),
    # Escape fires no hook; claude's file goes back to idle: idle once that lasts, for
    # claude writes idle as it fires Stop or StopFailure, which may yet come (a failed turn).
    ([("UserPromptSubmit", "p1", "go")], "idle", 0, ("working", None, None)),
    ([("UserPromptSubmit", "p1", "go")], "idle", orch.SETTLE + 1, ("idle", None, None)),
    # 2.1.330 shows idle for ~30 ms between a turn and its queued messages' turn...
    (QUEUE_2_1_330[:5], "idle", 0, ("working", None, None)),
    # ...but idle that lasts is idle (the queued turn was interrupted).
    (QUEUE_2_1_330[:5], "idle", orch.SETTLE + 1, ("idle", None, None)),
    # 2.1.197 starts the queued turn (file: busy) before its hook fires.
    (QUEUE_2_1_197[:3], "busy", 0, ("working", None, None)),
    # A busy file older than the last Stop is stale once claude had time to write.
    (QUEUE_2_1_197[:3], "busy", -(orch.SETTLE + 1), ("idle", None, None)),
])
def test_cross_check_with_claudes_own_status(tmp_path, steps, own, age, expected):
    events = [dict(e) for e in steps] if isinstance(steps[0], dict) else hook_events(*steps)
    now = time.time()
    for i, event in enumerate(events):
        event["t"] = now - 10 + i
        if event["event"] == "PreToolUse":
            event["tool_name"] = "Bash"
    folder = tmp_path / ".claude" / "sessions"
    folder.mkdir(parents=True)
    changed = (now - age) if age >= 0 else events[-1]["t"] + age
    (folder / "4242.json").write_text(json.dumps({
        "status": own, "waitingFor": "permission prompt" if own == "waiting" else None,
        "statusUpdatedAt": int(changed * 1000)}))
    seen = orch.replay_events(events)
    result = {"status": seen["status"], "needs": seen["needs"], "detail": seen["detail"],
              "since": seen["since"], "tool": seen["tool"], "source": "hooks",
              "pending": seen["turn"] == orch.CONTINUING or seen["waiting"] > 0}
    orch.cross_check({"home": str(tmp_path)}, {"pane_pid": "4242"}, result)
    assert (result["status"], result["needs"], result["detail"]) == expected


def test_queued_message_is_queued_and_wait_outlasts_its_turn(versioned, capsys):
    # Long enough that both sends are confirmed (within 1.5 s each) while it runs.
    assert run(capsys, "spawn", "a1", "SLOW-6 long job")[0] == 0
    code, out, err = run(capsys, "send", "a1", "SLOW-2 do this next")
    assert (code, out) == (0, "a1: queued\n"), err
    code, out, _ = run(capsys, "send", "a1", "and this")
    assert (code, out) == (0, "a1: queued\n")
    code, out, _ = run(capsys, "wait", "a1", "--timeout", "30")
    assert (code, out) == (0, "a1: idle\n")
    # wait returned after the queued messages' turn, not between the two turns.
    assert len(versioned.records("finished")) == 2
    assert versioned.messages() == ["SLOW-6 long job", "SLOW-2 do this next\n\nand this"]


def test_long_and_many_line_pastes_are_confirmed(versioned, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    long_one = ("six kilobytes %s " % versioned.version) * 400
    lines = "\n".join("line %d of ten" % i for i in range(10))
    tagged = '<pasted_content id="x">\nliteral tags\n</pasted_content id="x">'
    for message in (long_one, lines, tagged):
        code, out, err = run(capsys, "send", "a1", message)
        assert (code, out) == (0, "a1: submitted\n"), err
    received = [orch.unwrap_pastes(m).strip() for m in versioned.messages()]
    assert received == [long_one.strip(), lines, orch.unwrap_pastes(tagged)]
    wrapped = [m for m in versioned.messages() if "<pasted_content" in m]
    assert len(wrapped) == (2 if versioned.version == "2.1.330" else 0) + 1


def test_list_shows_permission_mode_and_pid(versioned, capsys):
    assert run(capsys, "spawn", "ask", "hello", "--", "--permission-mode", "manual")[0] == 0
    assert run(capsys, "spawn", "edits", "hello", "--", "--permission-mode", "acceptEdits")[0] == 0
    assert run(capsys, "spawn", "plain", "hello")[0] == 0
    assert run(capsys, "spawn", "quiet")[0] == 0
    modes = {"ask": "default", "edits": "acceptEdits", "quiet": None,
             "plain": "auto" if versioned.version == "2.1.330" else "default"}
    pids = dict((r["name"], r["pid"]) for r in versioned.records("start"))
    for name, mode in modes.items():
        row = wait_status(capsys, name, "idle")
        assert (row["permission_mode"], row["pid"]) == (mode, pids[name])
    table = dict((line.split()[0], line.split()[5]) for line in run(capsys, "list")[1].splitlines())
    assert table == {"NAME": "MODE", "ask": "-", "edits": "acceptEdits", "quiet": "?",
                     "plain": "auto" if versioned.version == "2.1.330" else "-"}
    run(capsys, "kill", "plain")
    assert status(capsys, "plain")["pid"] is None


def test_leading_command_characters_stay_text(versioned, capsys):
    assert run(capsys, "spawn", "a1", "  /compact from argv")[0] == 0
    for message in ("/compact", " /compact", "\n!touch pwned", "#note", "@file"):
        code, out, err = run(capsys, "send", "a1", message)
        assert (code, out) == (0, "a1: submitted\n"), err
    assert not versioned.records("command")
    assert versioned.messages() == ["\\  /compact from argv", "\\/compact", "\\ /compact",
                                    "\\\n!touch pwned", "\\#note", "\\@file"]


def test_control_bytes_never_act_as_keys(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    code, out, err = run(capsys, "send", "a1", "\x1b[201~\x03\x03!touch pwned\r")
    assert (code, out) == (0, "a1: submitted\n"), err
    assert "removed 1 terminal escape sequence and 2 control characters" in err
    code, out, err = run(capsys, "send", "a1", "\x1b[1;31merror\x1b[0m: fix \x1b[32mthis\x1b[0m\x07")
    assert (code, out) == (0, "a1: submitted\n"), err
    assert status(capsys, "a1")["status"] == "idle"
    assert [m.strip() for m in env.messages()] == ["\\!touch pwned", "error: fix this"]
    assert not env.records("quit by ctrl-c") and not env.records("command")
    assert not os.path.exists(os.path.join(env.work, "pwned"))


def test_control_bytes_in_spawn_prompt_and_prompt_file(env, capsys, tmp_path):
    code, _, err = run(capsys, "spawn", "a1", "\x1b]0;title\x07hello\x1b[201~\x03\x03")
    assert code == 0 and "removed 2 terminal escape sequences and 2 control" in err
    (tmp_path / "p.txt").write_text("from \x1b[7mfile\x1b[0m\x04")
    assert run(capsys, "spawn", "a2", "--prompt-file", str(tmp_path / "p.txt"))[0] == 0
    assert env.messages() == ["hello", "from file"]
    code, _, err = run(capsys, "send", "a1", "\x1b[31m\x03")
    assert code == 2 and one_error(err) and "nothing but terminal controls" in err


# ###########################################################################
# list, wait, kill, rm
# ###########################################################################

def test_list_json_keys_and_table(env, capsys):
    assert run(capsys, "spawn", "a1", "hello")[0] == 0
    row = wait_status(capsys, "a1", "idle")
    for key in ("name", "status", "backend", "cwd", "session_id", "created", "exit_code",
                "status_since", "needs", "last_prompt"):
        assert key in row
    assert row["backend"] == "tmux" and row["cwd"] == env.work
    code, out, _ = run(capsys, "ls")
    assert code == 0 and "a1" in out and "idle" in out and "hello" in out


def test_list_reconciles_with_tmux(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    assert run(capsys, "spawn", "a2")[0] == 0
    tmux_cmd("kill-window", "-t", env.state()["agents"]["a1"]["tmux"]["window"])
    assert wait_status(capsys, "a1", "exited")
    assert status(capsys, "a2")["status"] == "idle"
    env.stop()
    assert status(capsys, "a2")["status"] == "exited"


def test_list_makes_one_tmux_call_whatever_the_number_of_agents(env, capsys, monkeypatch):
    for i in range(3):
        assert run(capsys, "spawn", "c%d" % i, "--cmd", "sleep 1000")[0] == 0
    monkeypatch.setenv("ORCH_TRACE", "1")
    code, _, err = run(capsys, "list")
    assert code == 0
    assert err.count("orch: trace: tmux") == 1


def test_wait_until_idle_and_timeout(env, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-2 job")[0] == 0
    assert status(capsys, "a1")["status"] == "working"
    code, out, _ = run(capsys, "wait", "a1", "--timeout", "30")
    assert (code, out) == (0, "a1: idle\n")
    assert run(capsys, "send", "a1", "SLOW-30 long")[0] == 0
    code, out, err = run(capsys, "wait", "a1", "--timeout", "0.5")
    assert code == orch.EXIT_TIMEOUT and "timed out" in err and "a1: working" in out


def test_wait_until_exited(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    run(capsys, "send", "a1", "EXIT-0 done")
    code, out, _ = run(capsys, "wait", "a1", "--until", "exited", "--timeout", "30")
    assert (code, out) == (0, "a1: exited (0)\n")


def test_wait_any_returns_with_the_first_to_settle(env, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-60 long")[0] == 0
    assert run(capsys, "spawn", "a2", "SLOW-2 short")[0] == 0
    assert run(capsys, "spawn", "a3", "ASKSLOW-1 a tool")[0] == 0
    assert wait_status(capsys, "a3", "needs-input")
    code, out, _ = run(capsys, "wait", "--any", "a1", "a3", "--timeout", "30")
    assert (code, out) == (0, "a3: needs-input (permission)\n")
    code, out, _ = run(capsys, "wait", "--any", "a1", "a2", "--timeout", "60")
    assert (code, out) == (0, "a2: idle\n")
    assert status(capsys, "a1")["status"] == "working"
    code, out, err = run(capsys, "wait", "--any", "a1", "--until", "idle", "--timeout", "0")
    assert code == orch.EXIT_TIMEOUT and out == "a1: working\n" and "any of a1" in err
    run(capsys, "kill", "a2")
    code, out, _ = run(capsys, "wait", "--any", "a2", "a1", "--until", "exited")
    assert (code, out) == (0, "a2: exited (143)\n")
    code, out, _ = run(capsys, "wait", "--any", "--all", "--until", "idle", "--timeout", "0")
    assert code == orch.EXIT_TIMEOUT and out == "a1: working\na3: needs-input (permission)\n"
    run(capsys, "approve", "a3")
    code, out, _ = run(capsys, "wait", "--any", "--all", "--until", "idle", "--timeout", "30")
    assert (code, out) == (0, "a3: idle\n")        # a2 has exited: not among the running
    assert run(capsys, "wait")[0] == orch.EXIT_USAGE
    assert run(capsys, "wait", "a1", "--all")[0] == orch.EXIT_USAGE


def test_send_if_idle_and_send_wait(env, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-30 busy")[0] == 0
    code, _, err = run(capsys, "send", "a1", "--if-idle", "not now")
    assert code == orch.EXIT_NEEDS_INPUT and "nothing was typed" in err and "working" in err
    run(capsys, "interrupt", "a1")
    assert wait_status(capsys, "a1", "idle")
    assert run(capsys, "send", "a1", "--if-idle", "now then")[:2] == (0, "a1: submitted\n")
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    code, out, err = run(capsys, "send", "a1", "--wait", "SLOW-2 what is it")
    assert (code, out) == (0, "slow reply done\n"), err
    assert "a1: submitted; waiting for the turn to end" in err
    code, out, err = run(capsys, "send", "a1", "--wait", "ASK may I")
    assert code == orch.EXIT_NEEDS_INPUT and out == "" and "needs-input (permission)" in err
    assert env.messages() == ["SLOW-30 busy", "now then", "SLOW-2 what is it", "ASK may I"]
    assert run(capsys, "send", "--to", "a1", "--wait", "x")[0] == orch.EXIT_USAGE
    assert run(capsys, "spawn", "c1", "--cmd", "cat")[0] == 0
    code, _, err = run(capsys, "send", "c1", "--wait", "x")
    assert code == 1 and "reports no answers" in err


def test_send_when_idle_holds_each_message_for_a_turn_of_its_own(env, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-3 busy")[0] == 0
    assert run(capsys, "send", "a1", "--when-idle", "first held") == (
        0, "a1: held (1 waiting)\n", "")
    assert run(capsys, "send", "a1", "--when-idle", "/second held")[1] == "a1: held (2 waiting)\n"
    assert status(capsys, "a1")["pending"] == 2
    assert "(2 held)" in run(capsys, "list")[1]
    assert env.messages() == ["SLOW-3 busy"]        # never merged into the running turn
    assert retry_until(lambda: len(env.messages()) == 3, 30)
    turns = env.records("message")
    assert [r["text"] for r in turns] == ["SLOW-3 busy", "first held", "\\/second held"]
    assert turns[1]["t"] >= turns[0]["t"] + 3      # typed once the busy turn had ended
    assert retry_until(lambda: status(capsys, "a1")["pending"] == 0, 10)
    assert run(capsys, "send", "a1", "--when-idle", "now")[:2] == (0, "a1: submitted\n")
    assert run(capsys, "spawn", "a2", "SLOW-30 long")[0] == 0
    run(capsys, "send", "a2", "--when-idle", "one")
    run(capsys, "send", "a2", "--when-idle", "two")
    assert run(capsys, "send", "a2", "--cancel-held") == (0, "a2: dropped 2 held messages\n", "")
    assert status(capsys, "a2")["pending"] == 0
    for bad in (["--to", "a1,a2", "--when-idle", "x"], ["a1", "--when-idle", "--wait", "x"],
                ["a1", "--cancel-held", "x"]):
        assert run(capsys, "send", *bad)[0] == orch.EXIT_USAGE, bad
    assert env.messages("a2") == ["SLOW-30 long"]


def test_held_messages_survive_a_killed_watcher_and_a_reboot(env, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-5 busy")[0] == 0
    assert run(capsys, "send", "a1", "--when-idle", "after the reboot")[0] == 0
    stop_watcher(orch.data_dir())
    reboot()
    row = status(capsys, "a1")
    assert (row["status"], row["pending"]) == ("exited", 1)
    code, out, _ = run(capsys, "send", "a1", "--when-idle", "and this")
    assert code == 0 and "held (2 waiting; it is not running" in out
    assert run(capsys, "resume", "a1")[0] == 0
    assert retry_until(lambda: env.messages()[-2:] == ["after the reboot", "and this"], 30)
    assert retry_until(lambda: status(capsys, "a1")["pending"] == 0, 10)
    # A watcher killed while it typed one: the next asks the hooks, and types it only once.
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    before = time.time()
    assert run(capsys, "send", "a1", "typed just before the kill")[0] == 0
    with open(orch.held_path("a1"), "w") as f:
        json.dump([{"t": before, "text": "typed just before the kill", "raw": False,
                    "typing": before}], f)
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    assert run(capsys, "send", "a1", "--when-idle", "the next one")[0] == 0
    assert retry_until(lambda: env.messages()[-1] == "the next one", 30)
    assert env.messages().count("typed just before the kill") == 1
    assert env.messages().count("after the reboot") == 1


def test_a_failed_turn_is_not_a_turn_done(env, capsys, receiver):
    assert run(capsys, "notify", "add", "hook", "--webhook", receiver.url,
               "--on", "done,failed")[0] == 0
    told = os.path.join(env.root, "told")
    assert run(capsys, "notify", "add", "cmd", "--on", "failed", "--exec",
               "cat > '%s.json'; printf %%s \"$ORCH_EVENT_DETAIL\" > '%s.detail'"
               % (told, told))[0] == 0
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    assert run(capsys, "send", "a1", "APIFAIL-rate_limit second")[0] == 0
    code, out, err = run(capsys, "wait", "a1", "--timeout", "30")
    assert (code, out) == (orch.EXIT_FAILED, "a1: idle (failed: rate_limit)\n"), err
    assert "API Error: Request rejected (429)" in err
    row = status(capsys, "a1")
    assert (row["status"], row["error"]) == ("idle", "rate_limit")
    assert row["detail"].startswith("API Error: Request rejected (429)")
    assert "idle (failed: rate_limit)" in run(capsys, "list")[1]
    assert run(capsys, "status-line")[1] == "orch: 1 failed \u00b7 1 idle\n"
    code, out, err = run(capsys, "reply", "a1")        # never the older answer
    assert (code, out) == (orch.EXIT_FAILED, "") and "last turn failed (rate_limit" in err
    code, out, _ = run(capsys, "reply", "a1", "--json")
    assert code == orch.EXIT_FAILED and (json.loads(out)["reply"], json.loads(out)["error"]) == (
        None, "rate_limit")
    code, out, _ = run(capsys, "wait", "--any", "a1", "--timeout", "5")
    assert code == orch.EXIT_FAILED
    code, out, err = run(capsys, "send", "a1", "--wait", "APIFAIL-overloaded again")
    assert (code, out) == (orch.EXIT_FAILED, "") and "ended on an error (overloaded" in err
    found = events_of(receiver, "a1", 2)
    assert [e["event"] for e in found] == ["done", "failed"], [(e["event"], e["detail"], e["time"]) for e in receiver.events()]
    assert found[1]["detail"].startswith("rate_limit: API Error") and found[1]["hint"] == \
        "orch log a1"
    assert run(capsys, "send", "a1", "third")[0] == 0       # the next turn clears it
    assert run(capsys, "wait", "a1", "--timeout", "30")[:2] == (0, "a1: idle\n")
    assert status(capsys, "a1")["error"] is None
    assert run(capsys, "reply", "a1")[:2] == (0, "reply: third\n")
    assert [e["event"] for e in events_of(receiver, "a1", 4)] == [
        "done", "failed", "failed", "done"]
    # A command gets the event's text, newline, $(…) and quotes, as data only.
    def told_detail():
        with open(told + ".detail", encoding="utf-8") as f:
            return f.read()
    assert retry_until(lambda: told_detail().startswith("overloaded"), 30)     # the second
    assert told_detail() == ("overloaded: API Error: Request rejected (429) \u00b7 over the "
                             "limit\n$(touch pwned) `touch pwned2` \"dq\" 'sq'")
    with open(told + ".json", encoding="utf-8") as f:
        assert json.load(f)["detail"].endswith("\"dq\" 'sq'")
    assert not [n for n in os.listdir(env.work) + os.listdir(os.path.expanduser("~"))
                if n.startswith("pwned")]


def test_a_usage_limit_is_limited_until_it_resets(env, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    before = time.time()
    assert run(capsys, "send", "a1", "LIMIT-3600 second")[0] == 0
    code, out, err = run(capsys, "wait", "a1", "--timeout", "30")
    assert code == orch.EXIT_FAILED and out.startswith("a1: limited until "), (out, err)
    assert "a usage limit ended the last turn (You've hit your session limit" in err
    row = status(capsys, "a1")
    assert (row["status"], row["error"]) == ("limited", "rate_limit")
    resets = orch.epoch_of(row["resets_at"])
    assert before + 3600 - 1 <= resets <= time.time() + 3600, row["resets_at"]
    same_day = time.localtime(resets)[:3] == time.localtime()[:3]     # else it names the day
    assert "limited until %s" % time.strftime("%H:%M" if same_day else "%b %d %H:%M",
                                              time.localtime(resets)) in run(capsys, "list")[1]
    assert run(capsys, "status-line")[1] == "orch: 1 limited\n"
    code, _, err = run(capsys, "reply", "a1")
    assert code == orch.EXIT_FAILED and "rate_limit" in err
    # Only said, as 2.1.197 says it: the time is read from its words, to the minute's end.
    assert run(capsys, "send", "a1", "LIMITSAID-7200 third")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == orch.EXIT_FAILED
    said = orch.epoch_of(status(capsys, "a1")["resets_at"])
    assert time.time() + 7200 - 1 <= said <= time.time() + 7200 + 60, said
    # A passing 429 is a failed turn, not a limit.
    assert run(capsys, "send", "a1", "APIFAIL-rate_limit fourth")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[1] == "a1: idle (failed: rate_limit)\n"
    assert run(capsys, "send", "a1", "fifth")[0] == 0       # the next turn clears it
    assert run(capsys, "wait", "a1", "--timeout", "30")[:2] == (0, "a1: idle\n")


def test_on_limit_continue_types_one_continue_after_the_reset(env, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_LIMIT_MARGIN", "1")
    assert run(capsys, "spawn", "a1", "first", "--on-limit", "continue")[0] == 0
    assert run(capsys, "spawn", "a2", "first")[0] == 0         # reports only
    assert run(capsys, "wait", "a1", "a2", "--timeout", "30")[0] == 0
    for name in ("a1", "a2"):
        assert run(capsys, "send", name, "LIMIT-2 second")[0] == 0
    assert run(capsys, "wait", "a1", "a2", "--timeout", "30")[0] == orch.EXIT_FAILED
    assert retry_until(lambda: orch.CONTINUE_MESSAGE in env.messages(), 60)
    assert retry_until(lambda: held_outcomes("a1") == ["submitted"], 30), held_outcomes("a1")
    assert run(capsys, "wait", "a1", "--timeout", "30")[:2] == (0, "a1: idle\n")
    assert env.messages().count(orch.CONTINUE_MESSAGE) == 1
    assert status(capsys, "a2")["status"] == "limited"     # told, not continued
    assert status(capsys, "a1")["status"] == "idle"
    # Killed and resumed, it keeps --on-limit continue; the next limit is continued once too.
    assert run(capsys, "kill", "a1")[0] == 0
    assert run(capsys, "resume", "a1")[0] == 0
    assert run(capsys, "send", "a1", "LIMIT-2 third")[0] == 0
    assert retry_until(lambda: held_outcomes("a1") == ["submitted"] * 2, 60), held_outcomes("a1")
    assert run(capsys, "wait", "a1", "--timeout", "30")[:2] == (0, "a1: idle\n")
    assert env.messages().count(orch.CONTINUE_MESSAGE) == 2


def held_outcomes(name):
    """How each held message the watcher typed into the agent ended."""
    path = os.path.join(orch.agent_dir(name), "held-log.jsonl")
    return [e["outcome"] for e in orch.read_json_lines(path) if "held" in e]


def proc_tree_rss(pid):
    """Resident bytes of a process tree, read another way than orch: VmRSS and children files."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open("/proc/%d/status" % p) as f:
                total += 1024 * int([l for l in f if l.startswith("VmRSS:")][0].split()[1])
            for task in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, task)) as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, IndexError):
            continue
    return total


def test_list_shows_tokens_context_cost_and_memory(env, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "spawn", "c1", "--cmd", "sleep 1000")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    assert run(capsys, "send", "a1", "--wait", "second")[0] == 0
    row = status(capsys, "a1")
    # Two answers as the stand-in reports them (each written twice, the last counts once).
    assert row["tokens"] == {"input": 20, "output": 10, "cache_read": 200, "cache_write": 40}
    assert (row["context_tokens"], row["context_used"], row["cost_usd"]) == (135, None, 0.5)
    assert abs(row["rss_bytes"] - proc_tree_rss(row["pid"])) < 0.1 * row["rss_bytes"]
    other = status(capsys, "c1")
    assert (other["tokens"], other["cost_usd"]) == (None, None) and other["rss_bytes"] > 0
    # Read on from where it was: the cache holds the offset, and rebuilt it says the same.
    assert run(capsys, "send", "a1", "--wait", "third")[0] == 0
    assert status(capsys, "a1")["tokens"]["input"] == 30
    with open(os.path.join(orch.data_dir(), "usage-cache.json")) as f:
        entry = json.load(f)["a1"]
    assert entry["offset"] == os.path.getsize(entry["path"])
    os.remove(os.path.join(orch.data_dir(), "usage-cache.json"))
    assert status(capsys, "a1")["tokens"]["input"] == 30
    table = run(capsys, "list")[1]
    assert re.search(r"CTX +COST +RSS", table.splitlines()[0]), table
    assert re.search(r"a1 .* 135 +\$0.75 +\d+M ", table), table
    assert run(capsys, "kill", "c1")[0] == 0
    assert status(capsys, "c1")["rss_bytes"] is None
    names = [r["name"] for r in json.loads(run(capsys, "list", "--json", "--sort", "rss")[1])]
    assert names == ["a1", "c1"]
    assert run(capsys, "list", "--sort", "ctx")[1].splitlines()[1].startswith("a1 ")
    # Tokens alone say not how near the end of its window an agent is: no ctx in status-line.
    assert "ctx" not in run(capsys, "status-line")[1]


def test_status_line_shows_who_uses_the_most_of_its_context():
    rows = [{"name": "a", "status": "idle", "context_used": 0.31},
            {"name": "b", "status": "working", "context_used": 0.874},
            {"name": "c", "status": "exited", "context_used": 0.99},
            {"name": "d", "status": "idle", "context_used": None, "context_tokens": 190000}]
    assert orch.context_peak(rows) == "ctx 87% b"
    assert orch.context_peak([rows[2], rows[3]]) is None


STATUS_LINE_INPUT = {"session_id": "s", "model": {"id": "claude-test"},
                     "context_window": {"context_window_size": 200000, "used_percentage": 31},
                     "cost": {"total_cost_usd": 1.5},
                     "rate_limits": {"five_hour": {"used_percentage": 100, "resets_at": 2e9}}}


def test_a_users_status_line_prints_exactly_what_it_printed(env, capsys):
    assert json.loads(orch.agent_settings("a0", env.work)).get("statusLine") is None   # none: none
    theirs = ("python3 -c 'import sys, json; d = json.load(sys.stdin); "
              "print(\"MINE \" + d[\"model\"][\"id\"] + \" \u00e9\"); sys.exit(3)'")
    os.makedirs(os.path.join(env.home, ".claude"), exist_ok=True)
    with open(os.path.join(env.home, ".claude", "settings.json"), "w") as f:
        json.dump({"statusLine": {"type": "command", "command": theirs, "padding": 2}}, f)
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    line = json.loads(orch.agent_settings("a1", env.work))["statusLine"]
    assert line["padding"] == 2 and line["command"] != theirs and "a1" in line["command"]
    data = json.dumps(STATUS_LINE_INPUT).encode("utf-8")
    ours, mine = [subprocess.run(command, shell=True, input=data, cwd=env.work,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                  for command in (line["command"], theirs)]
    assert (ours.stdout, ours.stderr, ours.returncode) == (mine.stdout, mine.stderr, 3)
    assert mine.stdout == "MINE claude-test \u00e9\n".encode("utf-8")
    row = status(capsys, "a1")
    assert (row["context_used"], row["cost_usd"]) == (0.31, 1.5)
    # The user's own settings file is theirs: unchanged.
    with open(os.path.join(env.home, ".claude", "settings.json")) as f:
        assert json.load(f)["statusLine"]["command"] == theirs


def test_kill_keeps_record_and_exit_code(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    code, out, _ = run(capsys, "kill", "a1")
    assert code == 0 and "killed" in out
    row = status(capsys, "a1")
    assert row["status"] == "exited" and row["exit_code"] == 143
    assert env.records("start")      # record and window survive for tail
    code, out, _ = run(capsys, "tail", "a1")
    assert code == 0 and "fake agent ready" in out


def test_rm_named_and_exited(env, capsys):
    for name in ("a1", "a2", "a3"):
        assert run(capsys, "spawn", name)[0] == 0
    run(capsys, "kill", "a2")
    code, out, _ = run(capsys, "rm", "--exited")
    assert (code, out) == (0, "removed a2\n")
    code, out, _ = run(capsys, "rm", "a1")
    assert code == 0
    assert list(env.state()["agents"]) == ["a3"]
    panes = tmux_cmd("list-panes", "-a", "-F", "#{window_name}").split()
    assert "a1" not in panes and "a2" not in panes and "a3" in panes
    assert not os.path.exists(orch.agent_dir("a1"))
    code, _, err = run(capsys, "rm", "ghost")
    assert code == 1 and "ghost" in err


# ###########################################################################
# Worktrees: real git repositories in the test's folder
# ###########################################################################

def git_out(cwd, *args, check=True):
    proc = subprocess.run(["git", "-C", cwd] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc.stdout


@pytest.fixture
def repo(env, monkeypatch):
    """A repository with two commits on main; git's config is the test HOME's own."""
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for key, value in (("user.name", "Orch Test"), ("user.email", "orch@test.invalid"),
                       ("init.defaultBranch", "main")):
        subprocess.run(["git", "config", "--global", key, value], check=True)
    path = os.path.join(env.root, "repo")
    git_out(env.root, "init", "-q", path)
    git_out(path, "symbolic-ref", "HEAD", "refs/heads/main")      # git before 2.28 too
    os.makedirs(os.path.join(path, "src"))
    for name, text in (("README", "hello\n"), ("src/app.py", "print(1)\n")):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    git_out(path, "add", ".")
    git_out(path, "commit", "-q", "-m", "first")
    git_out(path, "commit", "-q", "--allow-empty", "-m", "second")
    env.repo = path
    return env


# A --cmd agent that writes a file in its folder and stays.
WRITER = "printf 'from the agent\\n' > new.txt; exec sleep 1000"


def test_worktree_spawn_list_diff_and_rm_keep_work(repo, capsys):
    sub = os.path.join(repo.repo, "src")
    code, out, err = run(capsys, "spawn", "w1", "--worktree", "--cwd", sub, "--cmd", WRITER)
    assert code == 0, err
    row = status(capsys, "w1")
    path = row["worktree"]
    assert (row["branch"], row["base"]) == ("orch/w1", "main")
    assert row["cwd"] == os.path.join(path, "src")        # the same subfolder as --cwd
    assert path.startswith(orch.data_dir() + "/worktrees/repo-")
    retry_until(lambda: os.path.exists(os.path.join(path, "src", "new.txt")))
    assert status(capsys, "w1")["dirty"] is True
    # The user's checkout: no new file, nothing untracked, still on main.
    assert not os.path.exists(os.path.join(sub, "new.txt"))
    assert git_out(repo.repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert git_out(repo.repo, "rev-parse", "--abbrev-ref", "HEAD") == "main\n"
    code, out, _ = run(capsys, "list")
    assert "BRANCH" in out.splitlines()[0] and "orch/w1" in out
    # Committed work and uncommitted work both show, in git's format.
    with open(os.path.join(path, "README"), "a") as f:
        f.write("more\n")
    git_out(path, "commit", "-q", "-am", "agent's commit")
    with open(os.path.join(path, "src", "app.py"), "w") as f:
        f.write("print(2)\n")
    diff = cli("diff", "w1")[1]
    assert "+from the agent" in diff and "+more" in diff and "+print(2)" in diff
    assert "diff --git a/src/new.txt b/src/new.txt" in diff
    code, out, _ = cli("diff", "w1", "--stat")
    assert code == 0 and "3 files changed" in out, out
    # The agent's own index is untouched by diff: new.txt is still untracked there.
    assert "?? src/new.txt" in git_out(path, "status", "--porcelain")
    # rm refuses while anything is uncommitted, and the agent keeps running.
    code, out, err = run(capsys, "rm", "w1")
    assert code == 1 and one_error(err), err
    assert "src/app.py" in err and "src/new.txt" in err and "--force" in err
    assert os.path.exists(os.path.join(path, "src", "new.txt"))
    assert status(capsys, "w1")["status"] == "working"
    git_out(path, "add", "-A")
    git_out(path, "commit", "-q", "-m", "the rest")
    assert status(capsys, "w1")["dirty"] is False
    code, out, err = run(capsys, "rm", "w1")
    assert (code, out) == (0, "removed w1 (kept branch orch/w1)\n"), err
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    assert git_out(repo.repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert "+from the agent" in git_out(repo.repo, "diff", "main", "orch/w1")


def test_worktree_rm_force_delete_branch_and_exited(repo, capsys):
    for name in ("c1", "d1", "u1"):
        assert run(capsys, "spawn", name, "--worktree", "--cwd", repo.repo,
                   "--cmd", "exec sleep 1000")[0] == 0
    paths = dict((n, status(capsys, n)["worktree"]) for n in ("c1", "d1", "u1"))
    with open(os.path.join(paths["d1"], "README"), "w") as f:
        f.write("changed, not committed\n")
    git_out(paths["u1"], "commit", "-q", "--allow-empty", "-m", "not in main")
    for name in ("c1", "d1", "u1"):
        assert run(capsys, "kill", name)[0] == 0
    # --exited goes agent by agent: the clean ones go, the dirty one stays.
    code, out, err = run(capsys, "rm", "--exited", "--delete-branch")
    assert code == 1 and out == "removed c1\n", (out, err)
    errors = err.splitlines()
    assert len(errors) == 2 and "d1" in errors[0] and "(M README)" in errors[0]
    assert "u1" in errors[1] and "not in main" in errors[1], errors
    assert sorted(repo.state()["agents"]) == ["d1", "u1"]
    branches = git_out(repo.repo, "branch", "--format=%(refname:short)").split()
    assert sorted(branches) == ["main", "orch/d1", "orch/u1"]     # c1's, merged, is gone
    with open(os.path.join(paths["d1"], "README")) as f:
        assert f.read() == "changed, not committed\n"
    # Without --delete-branch an unmerged branch is simply kept.
    assert run(capsys, "rm", "u1")[1] == "removed u1 (kept branch orch/u1)\n"
    code, out, err = run(capsys, "rm", "d1", "--force", "--delete-branch")
    assert (code, out) == (0, "removed d1\n"), err
    assert git_out(repo.repo, "branch", "--format=%(refname:short)").split() == ["main", "orch/u1"]
    assert git_out(repo.repo, "status", "--porcelain") == ""
    assert not os.path.exists(os.path.join(orch.data_dir(), "worktrees"))  or \
        os.listdir(os.path.join(orch.data_dir(), "worktrees")) == []


def test_worktree_branches_bases_and_refusals(repo, capsys):
    r = repo.repo
    git_out(r, "branch", "feature", "main~1")
    git_out(r, "tag", "v1", "main~1")
    code, out, err = run(capsys, "spawn", "f1", "--worktree", "--cwd", r, "--branch", "feature",
                         "--cmd", "exec sleep 1000")
    assert code == 0, err
    path = status(capsys, "f1")["worktree"]
    assert git_out(path, "rev-parse", "HEAD") == git_out(r, "rev-parse", "feature")
    # The branch is checked out in f1's worktree: git refuses a second, nothing is left.
    before = set(os.listdir(os.path.dirname(path)))
    code, out, err = run(capsys, "spawn", "f2", "--worktree", "--cwd", r, "--branch", "feature",
                         "--cmd", "exec sleep 1000")
    assert code == 1 and one_error(err) and "feature" in err, err
    assert set(os.listdir(os.path.dirname(path))) == before and "f2" not in repo.state()["agents"]
    code, out, err = run(capsys, "spawn", "t1", "--worktree", "--cwd", r, "--base", "v1",
                         "--cmd", "exec sleep 1000")
    assert code == 0, err
    row = status(capsys, "t1")
    assert (row["branch"], row["base"]) == ("orch/t1", "v1")
    assert git_out(row["worktree"], "rev-parse", "HEAD") == git_out(r, "rev-parse", "v1^{commit}")
    for args, wanted in ((["--branch", "bad..name"], "invalid branch name"),
                         (["--branch=-x"], "invalid branch name"),
                         (["--branch", "x.lock"], "invalid branch name"),
                         (["--base", "nowhere"], "is not a commit"),
                         (["--base=--exec=x"], "invalid --base")):
        code, out, err = run(capsys, "spawn", "b1", "--worktree", "--cwd", r, "--cmd", "true",
                             *args)
        assert code == 2 and one_error(err) and wanted in err, (args, err)
    code, _, err = run(capsys, "spawn", "b1", "--branch", "x", "--cmd", "true")
    assert code == 2 and "--worktree" in err
    # The worktree's place is taken (left by hand): refused, the folder untouched.
    taken = os.path.join(os.path.dirname(path), "b2")
    os.makedirs(taken)
    code, _, err = run(capsys, "spawn", "b2", "--worktree", "--cwd", r, "--cmd", "true")
    assert code == 1 and "already exists" in err and os.listdir(taken) == []
    assert "orch/b2" not in git_out(r, "branch")
    assert sorted(repo.state()["agents"]) == ["f1", "t1"]


def test_worktree_from_odd_repositories(repo, capsys, tmp_path):
    r = repo.repo
    bare, empty, plain = (str(tmp_path / n) for n in ("bare.git", "empty", "plain"))
    git_out(r, "clone", "-q", "--bare", r, bare)
    git_out(r, "init", "-q", empty)
    os.makedirs(plain)
    for cwd, wanted in ((plain, "is not in one"), (bare, "bare repository"),
                        (os.path.join(r, ".git"), "inside a .git folder"),
                        (empty, "no commits yet")):
        code, _, err = run(capsys, "spawn", "o1", "--worktree", "--cwd", cwd, "--cmd", "true")
        assert code == 1 and one_error(err) and wanted in err, (cwd, err)
    assert not os.path.exists(os.environ["ORCH_STATE"])     # nothing was recorded
    # A detached HEAD: the base is that commit.
    head = git_out(r, "rev-parse", "HEAD").strip()
    git_out(r, "checkout", "-q", "--detach", "HEAD~1")
    assert run(capsys, "spawn", "d1", "--worktree", "--cwd", r, "--cmd", "exec sleep 1000")[0] == 0
    row = status(capsys, "d1")
    assert row["base"] == git_out(r, "rev-parse", "HEAD").strip() != head
    # A dirty checkout: the worktree starts from the last commit, and says so.
    git_out(r, "checkout", "-q", "main")
    with open(os.path.join(r, "README"), "w") as f:
        f.write("the user's edit\n")
    code, out, err = run(capsys, "spawn", "e1", "--worktree", "--cwd", r, "--cmd",
                         "exec sleep 1000")
    assert code == 0 and "uncommitted changes in" in err and "not in agent e1's worktree" in err
    with open(os.path.join(status(capsys, "e1")["worktree"], "README")) as f:
        assert f.read() == "hello\n"
    with open(os.path.join(r, "README")) as f:
        assert f.read() == "the user's edit\n"


def test_worktree_resume_and_a_worktree_removed_by_hand(repo, capsys):
    assert run(capsys, "spawn", "w1", "--worktree", "--cwd", repo.repo, "--cmd",
               "pwd > where.txt; exec sleep 1000")[0] == 0
    path = status(capsys, "w1")["worktree"]
    retry_until(lambda: os.path.exists(os.path.join(path, "where.txt")))
    os.unlink(os.path.join(path, "where.txt"))
    assert run(capsys, "kill", "w1")[0] == 0
    code, out, err = run(capsys, "resume", "w1")
    assert code == 0, err
    retry_until(lambda: os.path.exists(os.path.join(path, "where.txt")))
    with open(os.path.join(path, "where.txt")) as f:
        assert f.read().strip() == path
    assert run(capsys, "kill", "w1")[0] == 0
    shutil.rmtree(path)
    code, _, err = run(capsys, "resume", "w1")
    assert code == 1 and one_error(err) and "is gone" in err and "orch rm w1" in err
    code, _, err = run(capsys, "diff", "w1")
    assert code == 1 and "is gone" in err
    # Nothing to lose: rm forgets the agent and clears git's record of the worktree.
    assert run(capsys, "rm", "w1")[1] == "removed w1 (kept branch orch/w1)\n"
    assert git_out(repo.repo, "worktree", "list", "--porcelain").count("worktree ") == 1


def test_worktree_of_a_moved_repository(repo, capsys, tmp_path):
    assert run(capsys, "spawn", "w1", "--worktree", "--cwd", repo.repo, "--cmd", WRITER)[0] == 0
    path = status(capsys, "w1")["worktree"]
    retry_until(lambda: os.path.exists(os.path.join(path, "new.txt")))
    moved = str(tmp_path / "moved")
    os.rename(repo.repo, moved)
    assert status(capsys, "w1")["dirty"] is None        # unknown, not "clean"
    code, _, err = run(capsys, "diff", "w1")
    assert code == 1 and one_error(err) and "git worktree repair" in err, err
    code, _, err = run(capsys, "rm", "w1")
    assert code == 1 and one_error(err) and "--force" in err
    assert os.path.exists(os.path.join(path, "new.txt"))
    git_out(moved, "worktree", "repair", path)
    assert "+from the agent" in cli("diff", "w1")[1]       # orch follows the repair
    os.rename(moved, repo.repo + "-gone")
    shutil.rmtree(repo.repo + "-gone")
    assert run(capsys, "rm", "w1", "--force")[0] == 0
    assert not os.path.exists(path) and repo.state()["agents"] == {}


def test_worktree_spawn_that_fails_takes_its_worktree_back(repo, capsys, monkeypatch):
    os.makedirs(os.path.join(repo.repo, ".claude"))
    with open(os.path.join(repo.repo, ".claude", "settings.json"), "w") as f:
        json.dump({"disableAllHooks": True}, f)
    git_out(repo.repo, "add", ".")
    git_out(repo.repo, "commit", "-q", "-m", "hooks off")
    code, _, err = run(capsys, "spawn", "h1", "hi", "--worktree", "--cwd", repo.repo)
    assert code == 1 and "disableAllHooks" in err
    assert git_out(repo.repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert "orch/h1" not in git_out(repo.repo, "branch")
    assert not os.path.exists(os.path.join(orch.data_dir(), "worktrees", "h1"))
    # A trusted checkout's worktree is trusted: the agent starts with no trust dialog.
    git_out(repo.repo, "rm", "-q", "-r", ".claude")
    git_out(repo.repo, "commit", "-q", "-m", "hooks on")
    monkeypatch.setenv("FAKE_TRUST", "1")
    with open(os.path.join(repo.home, ".claude.json"), "w") as f:
        json.dump({"projects": {repo.repo: {"hasTrustDialogAccepted": True}}}, f)
    code, out, err = run(capsys, "spawn", "t1", "hello", "--worktree", "--cwd", repo.repo)
    assert code == 0, out + err
    assert repo.messages("t1") == ["hello"]
    with open(os.path.join(repo.home, ".claude.json"), "w") as f:
        json.dump({"projects": {}}, f)
    code, out, _ = run(capsys, "spawn", "t2", "hello", "--worktree", "--cwd", repo.repo)
    assert code == orch.EXIT_NEEDS_INPUT and "trust" in out


def test_cli_two_worktree_spawns_at_once_both_succeed(repo):
    procs = [subprocess.Popen([cli_python(), ORCH, "spawn", name, "--worktree", "--cwd",
                               repo.repo, "--cmd", "exec sleep 1000"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for name in ("p1", "p2")]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    assert sorted(repo.state()["agents"]) == ["p1", "p2"]
    listed = git_out(repo.repo, "worktree", "list", "--porcelain")
    assert "orch/p1" in listed and "orch/p2" in listed


def test_cli_git_missing_or_too_old(repo, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    for folder in ("/usr/bin", "/bin"):
        for name in os.listdir(folder):
            if name != "git" and not os.path.lexists(str(shim / name)):
                os.symlink(os.path.join(folder, name), str(shim / name))
    bare = dict(os.environ, PATH=str(shim))
    code, _, err = cli("spawn", "g1", "--worktree", "--cwd", repo.repo, "--cmd", "true", env=bare,
                       python=cli_python())
    assert code == 1 and one_error(err) and "git is not installed" in err, err
    with open(str(shim / "git"), "w") as f:
        f.write("#!/bin/sh\necho 'git version 2.16.4'\n")
    os.chmod(str(shim / "git"), 0o755)
    code, _, err = cli("spawn", "g1", "--worktree", "--cwd", repo.repo, "--cmd", "true", env=bare,
                       python=cli_python())
    assert code == 1 and one_error(err) and "too old" in err and "2.17" in err, err
    assert not os.path.exists(os.environ["ORCH_STATE"])


# ###########################################################################
# Hosts: real sshd servers on 127.0.0.1, one per "host"
# ###########################################################################

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hosts(object):
    """sshd servers whose sessions each get their own orch state and tmux server."""

    def __init__(self, env, names, extra_env=None):
        if not os.access(SSHD, os.X_OK):
            pytest.fail("sshd is not installed: apt-get install openssh-server "
                        "(.ci/run does this)")
        self.env = env
        self.dir = tempfile.mkdtemp(prefix="osh", dir="/tmp")
        self.procs, self.ports, self.sockets = {}, {}, {}
        keys = os.path.join(self.dir, "hostkey"), os.path.join(self.dir, "id")
        for key in keys:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key],
                           check=True)
        shutil.copy(keys[1] + ".pub", os.path.join(self.dir, "authorized_keys"))
        with open(keys[0] + ".pub") as f:
            hostkey = f.read().split()[:2]
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", 0o755)     # sshd's privilege separation folder
        config, known = [], []
        user = pwd.getpwuid(os.getuid()).pw_name
        for name in names:
            port = self.ports[name] = free_port()
            self.sockets[name] = "orchh%s%s" % (name, uuid.uuid4().hex[:6])
            host_env = {"ORCH_STATE": os.path.join(env.root, name, "state.json"),
                        "ORCH_TMUX_SOCKET": self.sockets[name], "TMUX_TMPDIR": env.tmpdir,
                        "HOME": env.home, "ORCH_CLAUDE": env.fake, "FAKE_LOG": env.logs,
                        "LANG": "C.UTF-8", "ORCH_KILL_GRACE": "3"}
            host_env.update(extra_env or {})
            if name == "nopy":
                host_env["PATH"] = "/nonexistent"
            sshd_config = os.path.join(self.dir, "sshd-%s" % name)
            with open(sshd_config, "w") as f:
                f.write("\n".join([
                    "Port %d" % port, "ListenAddress 127.0.0.1", "HostKey " + keys[0],
                    "AuthorizedKeysFile " + os.path.join(self.dir, "authorized_keys"),
                    "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                    "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
                    "PidFile " + os.path.join(self.dir, "sshd-%s.pid" % name),
                    "SetEnv " + " ".join("%s=%s" % kv for kv in sorted(host_env.items())),
                    ""]))
            self.procs[name] = subprocess.Popen([SSHD, "-D", "-e", "-f", sshd_config],
                                                stderr=open(sshd_config + ".log", "w"))
            config += ["Host %s" % name, "  HostName 127.0.0.1", "  Port %d" % port,
                       "  User " + user, "  IdentityFile " + keys[1], "  IdentitiesOnly yes",
                       "  UserKnownHostsFile " + os.path.join(self.dir, "known_hosts"),
                       "  GlobalKnownHostsFile /dev/null", "  StrictHostKeyChecking yes", ""]
            known.append("[127.0.0.1]:%d %s %s" % (port, hostkey[0], hostkey[1]))
        config += ["Host nowhere", "  HostName 127.0.0.1", "  Port %d" % free_port(),
                   "  User " + user, "  IdentityFile " + keys[1], ""]
        self.config = os.path.join(self.dir, "ssh_config")
        with open(self.config, "w") as f:
            f.write("\n".join(config))
        with open(os.path.join(self.dir, "known_hosts"), "w") as f:
            f.write("\n".join(known) + "\n")
        for name in names:
            retry_until(lambda: self.accepts(name), 15)

    def accepts(self, name):
        try:
            socket.create_connection(("127.0.0.1", self.ports[name]), 1).close()
            return True
        except OSError:
            return False

    def stop_sshd(self, name):
        proc = self.procs.pop(name)
        proc.terminate()
        proc.wait(10)

    def down(self, name):
        """The host is gone: its sshd, and the connection orch keeps open to it."""
        self.stop_sshd(name)
        subprocess.run(["ssh", "-F", self.config, "-o", "ControlPath=%s/%%C" % orch.control_dir(),
                        "-O", "exit", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def state(self, name):
        with open(os.path.join(self.env.root, name, "state.json")) as f:
            return json.load(f)

    def stop(self):
        folder = orch.control_dir()
        for sock in os.listdir(folder):     # the connections orch left open
            subprocess.run(["ssh", "-o", "ControlPath=" + os.path.join(folder, sock), "-O",
                            "exit", "x"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name in list(self.procs):
            self.stop_sshd(name)
        for name in self.sockets:
            stop_watcher(os.path.join(self.env.root, name, "state.d"))
        for sock in self.sockets.values():
            subprocess.run(["tmux", "-L", sock, "kill-server"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=dict(os.environ, TMUX_TMPDIR=self.env.tmpdir))
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def hosts(env, monkeypatch):
    # The far end runs the Python under test too (make test-pythons): first on its PATH.
    far = os.path.join(env.root, "farbin")
    os.makedirs(far)
    os.symlink(cli_python(), os.path.join(far, "python3"))
    world = Hosts(env, ["h1", "h2"], {"PATH": far + ":/usr/local/bin:/usr/bin:/bin"})
    monkeypatch.setenv("ORCH_SSH_CONFIG", world.config)
    # A wrapper on PATH counts each ssh orch runs.
    shim = os.path.join(env.root, "sshshim")
    os.makedirs(shim)
    world.ssh_log = os.path.join(env.root, "ssh.log")
    with open(os.path.join(shim, "ssh"), "w") as f:
        f.write("#!/bin/sh\necho x >> %s\nexec %s \"$@\"\n"
                % (shlex.quote(world.ssh_log), shutil.which("ssh")))
    os.chmod(os.path.join(shim, "ssh"), 0o755)
    monkeypatch.setenv("PATH", shim + ":" + os.environ["PATH"])
    yield world
    world.stop()


def ssh_count(hosts):
    try:
        with open(hosts.ssh_log) as f:
            return len(f.read().split())
    except FileNotFoundError:
        return 0


def test_cli_hosts_every_verb_over_ssh(hosts, capsys):
    def orch_cli(*args, **kw):
        return cli(*args, python=cli_python(), **kw)
    version = orch_cli("--host", "h1", "doctor", "--json")[1]
    assert json.loads(version)[0]["message"].startswith("Python %s" % subprocess.run(
        [cli_python(), "-c", "import platform; print(platform.python_version())"],
        stdout=subprocess.PIPE, universal_newlines=True).stdout.strip())
    code, out, err = orch_cli("--host", "h1", "spawn", "a1", "first task")
    assert code == 0 and "started agent a1" in out, err
    assert list(hosts.state("h1")["agents"]) == ["a1"]
    assert not os.path.exists(os.environ["ORCH_STATE"])         # nothing ran here
    seen = hosts.env.records("start")[0]["env"]     # an orch the agent runs finds its fleet
    assert (seen["ORCH_AGENT"], seen["ORCH_STATE"]) == (
        "a1", os.path.join(hosts.env.root, "h1", "state.json"))
    assert orch_cli("send", "a1@h1", "SLOW-20 second")[:2] == (0, "a1: submitted\n")
    rows = json.loads(orch_cli("--host", "h1", "list", "--json")[1])
    assert [(r["name"], r["status"]) for r in rows] == [("a1", "working")]
    code, out, _ = orch_cli("--host=h1", "tail", "a1")
    assert code == 0 and "first task" in out
    assert orch_cli("interrupt", "a1@h1")[0] == 0
    assert orch_cli("wait", "a1@h1", "--timeout", "30")[:2] == (0, "a1: idle\n")
    code, out, _ = orch_cli("--host", "h1", "send", "a1", "-", stdin="from stdin\n")
    assert (code, out) == (0, "a1: submitted\n")
    assert orch_cli("wait", "a1@h1", "--timeout", "30")[0] == 0
    assert orch_cli("reply", "a1@h1")[:2] == (0, "reply: from stdin\n")
    code, out, _ = orch_cli("log", "a1@h1")
    assert code == 0 and "> first task" in out
    assert orch_cli("--host", "h1", "status-line")[:2] == (0, "orch: 1 idle\n")
    assert orch_cli("send", "a1@h1", "ASK please")[0] == 0
    assert orch_cli("wait", "a1@h1", "--timeout", "30")[1] == "a1: needs-input (permission)\n"
    assert orch_cli("approve", "a1@h1")[:2] == (0, "a1: approved Bash (touch x)\n")
    assert orch_cli("send", "a1@h1", "ASK again")[0] == 0
    assert orch_cli("wait", "a1@h1", "--timeout", "30")[0] == 0
    assert orch_cli("deny", "a1@h1")[0] == 0
    assert orch_cli("kill", "a1@h1")[0] == 0
    code, out, _ = orch_cli("--host", "h1", "resume", "--all")
    assert (code, out) == (0, "a1: stopped with `orch kill`, left stopped (`orch resume a1` "
                              "starts it)\n")
    code, out, _ = orch_cli("resume", "--all", "--all-hosts", env_extra={"ORCH_HOSTS": "h1,h2"})
    assert (code, out) == (0, "no agents to resume\na1@h1: stopped with `orch kill`, left "
                              "stopped (`orch resume a1` starts it)\nh2: no agents to resume\n")
    code, out, _ = orch_cli("send", "a1@h1", "hello")
    assert code == orch.EXIT_NOT_RUNNING and "resume" in _            # exit codes unchanged
    assert orch_cli("resume", "a1@h1", "back again")[0] == 0
    code, out, _ = orch_cli("--host", "h1", "doctor")
    assert code == 0 and "Python" in out
    code, out, _ = orch_cli("--host", "h1", "--version")
    assert out == "orch %s\n" % orch.__version__
    assert orch_cli("rm", "a1@h1")[:2] == (0, "removed a1\n")
    assert hosts.state("h1")["agents"] == {}
    assert hosts.env.messages() == ["first task", "SLOW-20 second", "from stdin", "ASK please",
                                    "ASK again", "back again"]


def test_hosts_notifications_are_sent_from_the_host(hosts, capsys, receiver):
    code, out, err = cli("--host", "h1", "notify", "add", "hook", "--webhook", "-", "--on",
                         "started,done", stdin=receiver.url + "\n", python=cli_python())
    assert code == 0 and "secret-token" not in out and "\u2026abcd" in out, err
    assert os.path.exists(os.path.join(hosts.env.root, "h1", "state.d", "notify.json"))
    assert not os.path.exists(os.path.join(orch.data_dir(), "notify.json"))    # none here
    assert cli("--host", "h1", "spawn", "a1", "hello", python=cli_python())[0] == 0
    found = events_of(receiver, "a1", 2)
    assert [e["event"] for e in found] == ["started", "done"] and found[1]["reply"]
    rows = json.loads(cli("--host", "h1", "notify", "list", "--json")[1])
    assert [(r["name"], r["target"]) for r in rows] == [("hook", "127.0.0.1 \u2026abcd")]


def test_hosts_attach_gets_a_terminal(hosts, capsys):
    assert cli("spawn", "a1@h1", "alpha task")[0] == 0
    outer = outer_terminal(hosts.env, "t1", "attach", "a1@h1")

    def screen():
        return subprocess.run(["tmux", "-L", outer, "capture-pane", "-p", "-t", "=t1:"],
                              stdout=subprocess.PIPE, universal_newlines=True).stdout
    try:
        retry_until(lambda: "reply: alpha task" in screen())
        # The keyboard is the agent's: a line typed there is a message it gets.
        subprocess.run(["tmux", "-L", outer, "send-keys", "-t", "=t1:", "-l", "typed by hand"],
                       check=True)
        subprocess.run(["tmux", "-L", outer, "send-keys", "-t", "=t1:", "Enter"], check=True)
        retry_until(lambda: hosts.env.messages()[-1:] == ["typed by hand"])
    finally:
        subprocess.run(["tmux", "-L", outer, "kill-server"])


def test_hosts_hard_messages_names_and_a_100_kb_stdin_arrive_exactly(hosts, capsys):
    unit = "q'uote \"dq\" $(touch pwned) `touch pwned2`; & | > x \\ \u00e9\u6f22 !! %s \n"
    big = (unit * (102400 // len(unit.encode("utf-8")) + 1)).rstrip("\n")
    assert cli("spawn", "hard_name-1@h2", "SLOW-1 " + HARD_TEXT)[0] == 0
    code, out, err = cli("send", "hard_name-1@h2", "-", stdin=big)
    assert code == 0, err
    retry_until(lambda: len(hosts.env.messages()) == 2, 30)
    assert hosts.env.messages() == ["SLOW-1 " + HARD_TEXT, big]
    assert not os.path.exists(os.path.join(hosts.env.home, "pwned"))
    assert not os.path.exists("pwned") and not os.path.exists("pwned2")
    # A message that names an agent is still the message: only the name loses @HOST.
    assert cli("send", "hard_name-1@h2", "hard_name-1@h2")[0] == 0
    retry_until(lambda: hosts.env.messages()[-1:] == ["hard_name-1@h2"], 30)


HARD_TEXT = "it's \"quoted\" $HOME `id` $(id) ; rm -rf / && echo * \\n \u00e9 \U0001F600 ~ # !x"


def test_hosts_ship_once_reuse_and_replace_a_tampered_copy(hosts, capsys):
    assert cli("--host", "h1", "list")[0] == 0
    assert ssh_count(hosts) == 3            # try, ship, run
    assert cli("--host", "h1", "list")[0] == 0
    assert ssh_count(hosts) == 4            # one ssh when the copy is there
    folder = os.path.join(hosts.env.home, ".orch.d", "bin")
    shipped = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".py")]
    cached = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".pyc")]
    assert len(shipped) == 1 and stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert len(cached) == 1 and cached[0].startswith(shipped[0][:-3] + ".")
    with open(ORCH, "rb") as f:
        assert open(shipped[0], "rb").read() == f.read()
    # Damaged bytecode is compiled again, never run; no more ssh for that.
    with open(cached[0], "r+b") as f:
        f.seek(200)
        f.write(b"\xff" * 64)
    code, out, _ = cli("--host", "h1", "list", "--json")
    assert (code, out, ssh_count(hosts)) == (0, "[]\n", 5)
    with open(shipped[0], "a") as f:
        f.write("\nimport os; os.system('touch %s/tampered')\n" % hosts.env.root)
    code, out, _ = cli("--host", "h1", "list")
    assert code == 0 and ssh_count(hosts) == 8          # found wrong, sent again, run
    assert not os.path.exists(os.path.join(hosts.env.root, "tampered"))
    with open(ORCH, "rb") as f:
        assert open(shipped[0], "rb").read() == f.read()


def remote_orchs():
    """pids of the remote ends of orch --host (the bootstrap's python) on this machine."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
            # Not ssh here, nor the shell there, whose command lines hold it too.
            if argv[0].endswith(b"python3") and argv[4:5] and argv[4].startswith(
                    b"import base64;exec(base64.b64decode("):
                found.append(int(pid))
        except (OSError, ValueError):
            pass
    return found


def test_hosts_remote_verb_ends_with_the_local_one(hosts, capsys):
    assert cli("spawn", "a1@h1", "SLOW-60 a long turn")[0] == 0
    assert remote_orchs() == []
    local = subprocess.Popen([sys.executable, ORCH, "wait", "a1@h1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    retry_until(lambda: len(remote_orchs()) == 1, 30)
    local.kill()        # no goodbye: the remote end sees its stdin end
    local.wait()
    retry_until(lambda: remote_orchs() == [], 30)


def test_hosts_refused_before_ssh_runs(hosts, capsys):
    for host in ("-oProxyCommand=touch /tmp/pwned", "a b", "a\nb", "a\tb", "", "x\x7f"):
        for args in (["--host", host, "list"], ["send", "a1@" + host, "hi"]):
            code, out, err = run(capsys, *args)
            assert code == 2 and one_error(err) and "invalid host" in err, (args, err)
    monkeypatch_env = dict(os.environ, ORCH_HOST="-oProxyCommand=x")
    code, _, err = cli("list", env=monkeypatch_env)
    assert code == 2 and "invalid host" in err
    assert ssh_count(hosts) == 0


def test_hosts_unreachable_is_one_line_with_advice(hosts, capsys):
    code, out, err = run(capsys, "--host", "nowhere", "list")
    assert code == 1 and one_error(err), err
    assert "cannot reach nowhere over ssh" in err and "ssh-copy-id" in err


def test_hosts_file_and_a_host_without_python(env, capsys, monkeypatch):
    world = Hosts(env, ["h1", "nopy"], {})
    try:
        # sshd's SetEnv comes before the shell reads its profile: a PATH without python3.
        with open(world.config.replace("ssh_config", "sshd-nopy")) as f:
            assert "SetEnv" in f.read()
        monkeypatch.setenv("ORCH_SSH_CONFIG", world.config)
        monkeypatch.setenv("XDG_CONFIG_HOME", os.path.join(env.root, "config"))
        os.makedirs(os.path.join(env.root, "config", "orch"))
        with open(orch.hosts_file(), "w") as f:
            f.write("# build boxes\nh1   # the first\n\nnopy\n")
        assert orch.known_hosts() == ["h1", "nopy"]
        code, out, err = run(capsys, "list", "-A")
        assert code == 1 and one_error(err) and "nopy has no python3" in err, err
    finally:
        world.stop()


def test_hosts_list_all_hosts_with_one_down(hosts, capsys, monkeypatch):
    for where, name in (("h1", "a1"), ("h2", "b1")):
        assert cli("--host", where, "spawn", name, "task " + name)[0] == 0
    assert run(capsys, "spawn", "l1", "local task")[0] == 0
    monkeypatch.setenv("ORCH_HOSTS", "h1,h2")
    code, out, err = run(capsys, "list", "-A")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:2] == ["HOST", "NAME"], err
    assert [line.split()[:2] for line in lines[1:]] == [["local", "l1"], ["h1", "a1"],
                                                        ["h2", "b1"]]
    code, out, _ = run(capsys, "list", "--all-hosts", "--json")
    assert [(r["host"], r["name"]) for r in json.loads(out)] == [
        (None, "l1"), ("h1", "a1"), ("h2", "b1")]
    code, out, err = cli("wait", "a1@h1", "b1@h2", "l1", "--timeout", "30")
    assert code == 0 and sorted(out.splitlines()) == ["a1: idle", "b1: idle", "l1: idle"], err
    code, _, err = run(capsys, "events", "a1@h1", "b1@h2")
    assert code == 2 and one_error(err) and "one host at a time" in err
    code, out, err = cli("send", "--to", "a1@h1,b1@h2,l1", "to all three")
    assert code == 0 and sorted(out.splitlines()) == ["a1: submitted", "b1: submitted",
                                                      "l1: submitted"], err
    hosts.down("h2")
    code, out, err = run(capsys, "list", "-A")
    assert code == 1 and [line.split()[1] for line in out.splitlines()[1:]] == ["l1", "a1"]
    assert one_error(err) and "cannot reach h2" in err


# ###########################################################################
# Agent kinds
# ###########################################################################

@pytest.mark.parametrize("kind", [k for k in orch.KINDS.values() if k.hooks])
def test_a_kind_registers_exactly_the_events_it_maps(kind, env):
    """Drift guard: every hook a kind gives its CLI is one it maps, and orch reads each."""
    agent = {"name": "a1", "cwd": env.work, "extra_args": [], "session_id": "s1"}
    if kind is orch.ClaudeKind:
        registered = set(json.loads(orch.agent_settings("a1"))["hooks"])
    elif kind is orch.GeminiKind:
        kind.argv(agent, "/bin/cli")
        with open(os.path.join(orch.gemini_home("a1"), ".gemini", "settings.json")) as f:
            registered = set(json.load(f)["hooks"])
    elif kind is orch.CopilotKind:
        kind.argv(agent, "/bin/cli")
        with open(os.path.join(orch.agent_dir("a1"), "copilot-plugin", "hooks",
                               "hooks.json")) as f:
            hooks = json.load(f)["hooks"]
        registered = set(hooks)
        for event, ours in kind.EVENTS.items():     # each runs orch's hook, told orch's name
            assert hooks[event][0]["bash"].endswith(" " + ours)
    elif kind is orch.OpencodeKind:
        # What its plugin listens to, and the words it writes.
        heard = set(re.findall(r'event\.type === "([\w.]+)"|"([\w.]+)": async',
                               orch.OPENCODE_PLUGIN))
        registered = set(a or b for a, b in heard) | {"init"}
        said = set(word for told in re.findall(r"\bevent: ([^,}]*)", orch.OPENCODE_PLUGIN)
                   for word in re.findall(r'"([A-Z]\w+)"', told))
        assert said == set(w for words in kind.EVENTS.values() for w in words), said
        registered -= {"message.updated", "message.part.updated", "session.updated",
                       "session.error"}    # the answer, usage and the error: no status
    else:
        argv = kind.argv(agent, "/bin/cli")
        registered = set(re.match(r"hooks\.(\w+)=", argv[i + 1]).group(1)
                         for i, word in enumerate(argv) if word == "-c"
                         and argv[i + 1].startswith("hooks."))
    assert registered == set(kind.EVENTS)
    understood = set(orch.HOOK_EVENTS) | {"Interrupted", "Retrying", "Working"}
    ours = [w for words in kind.EVENTS.values()
            for w in (words if isinstance(words, tuple) else (words,))]
    assert set(ours) <= understood
    for word in ours:       # each says something, or is known to say nothing
        assert orch.event_status({"event": word}) or word == "Notification"


def test_codex_argv_has_orchs_hooks_trust_and_resume_but_no_prompt(env):
    agent = {"name": "c1", "cwd": "/src/my app", "extra_args": ["-m", "o9"], "trust": True}
    argv = orch.CodexKind.argv(agent, "/bin/codex", resume_id="abc")
    assert argv[:2] == ["/bin/codex", "--dangerously-bypass-hook-trust"]
    assert argv[-4:] == ["-m", "o9", "resume", "abc"]
    assert 'projects={"/src/my app"={trust_level="trusted"}}' in argv
    stop = [w for w in argv if w.startswith("hooks.Interrupt=")][0]
    assert stop.endswith(' Interrupted"}]}]') and orch.events_path("c1") in stop
    assert "resume" not in orch.CodexKind.argv(dict(agent, trust=False), "/bin/codex")


CODEX_IDLE = ["  >_ OpenAI Codex (v0.169.0)", "", "\u203a say hi", "", "\u2022 reply ok", "",
              "\u203a Ask Codex to do anything", "", "  m default \u00b7 /tmp/work",
              "  \u2190 for agents \u00b7 ? for shortcuts"]
CODEX_STARTING = ["  >_ OpenAI Codex (v0.169.0)", "     /tmp/work", "",
                  "\u203a Ask Codex to do anything", "", "  ? for shortcuts"]
CODEX_DIALOG = ["\u203a TOOL please", "", "\u2022 Running touch x", "",
                "  Would you like to run the following command?", "", "  Reason: make a file",
                "", "  $ touch x", "", "\u203a 1. Yes, proceed (y)",
                "  2. Yes, and don't ask again for commands that start with `touch x` (p)",
                "  3. No, and tell Codex what to do differently (esc)", "",
                "  Press enter to confirm or esc to cancel"]


def test_codex_screens():
    assert orch.CodexKind.screen_start(CODEX_IDLE) == ("idle", None, None)
    assert orch.CodexKind.screen_start(CODEX_STARTING) is None    # trust not decided yet
    assert orch.CodexKind.screen_start(CODEX_DIALOG) == (      # never idle at a dialog
        "needs-input", "dialog", "Would you like to run the following command?")
    trust = ["  Folder access", "  /tmp/repo", "  Trust this folder? Codex can read...",
             "\u203a 1. Trust and continue", "  2. Back", "  enter continue \u00b7 esc back"]
    assert orch.CodexKind.screen_start(trust) == ("needs-input", "trust", "Trust this folder?")
    dialog = orch.codex_dialog(CODEX_DIALOG)
    assert dialog["question"] == "Would you like to run the following command?"
    assert "  $ touch x" in dialog["above"]
    assert orch.CodexKind.yes_once(dialog) == ["-l", "y"]
    assert orch.CodexKind.yes_once({"options": {"Yes, and don't ask again (p)": "2"}}) is None
    # The hint is drawn dim; what a person typed is not.
    hint = "\x1b[1m\u203a\x1b[0m\x1b[39m\x1b[49m \x1b[2mAsk Codex to do anything"
    typed = "\x1b[1m\u203a\x1b[0m\x1b[39m\x1b[49m half typed"
    assert orch.codex_composer(["\u203a earlier", hint, "  m default"]) == ""
    assert orch.codex_composer(["\u203a earlier", typed, "  m default"]) == "half typed"
    assert orch.codex_composer(["nothing here"]) is None


def test_codex_hooks_turned_off_are_refused_at_once(env, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_CODEX", env.fake)
    os.makedirs(os.path.join(env.home, ".codex"))
    config = os.path.join(env.home, ".codex", "config.toml")
    for text in ('model = "m"\n[features]\ncodex_hooks = false\n[tui]\nx = 1\n',
                 'features.codex_hooks = false\n'):
        with open(config, "w") as f:
            f.write(text)
        code, _, err = run(capsys, "spawn", "c1", "--agent", "codex", "hi")
        assert code == 1 and one_error(err) and "codex_hooks = false under [features]" in err
    with open(config, "w") as f:
        f.write('[features]\ncodex_hooks = true\n[other]\ncodex_hooks = false\n')
    assert not orch.codex_hooks_off(config)
    assert tmux_windows() == ["keep"]


def test_codex_trusts_what_its_config_trusts(env, monkeypatch):
    monkeypatch.setenv("CODEX_HOME", os.path.join(env.home, "codexhome"))
    assert not orch.codex_trusts("/src/app")
    os.makedirs(os.environ["CODEX_HOME"])
    with open(os.path.join(os.environ["CODEX_HOME"], "config.toml"), "w") as f:
        f.write('model = "m"\n[projects."/src/a \\"q\\""]\ntrust_level = "trusted"\n'
                '[projects."/src/b"]\ntrust_level = "untrusted"\n[tui]\nx = 1\n')
    assert orch.codex_trusts('/src/a "q"/sub') and not orch.codex_trusts("/src/b")
    assert not orch.codex_trusts("/src")


def test_gemini_home_layers_orchs_hooks_on_the_users_settings(env):
    write_gemini_settings(env.home, ["/src"], {"hooks": {"AfterAgent": [{"hooks": [
        {"type": "command", "command": "mine"}]}]}, "ui": {"theme": "x"}})
    with open(os.path.join(env.home, ".gemini", "oauth_creds.json"), "w") as f:
        f.write("{}")
    agent = {"name": "g1", "cwd": "/work", "extra_args": ["-m", "x"], "session_id": "s1",
             "trust": True}
    assert orch.GeminiKind.argv(agent, "/bin/gemini") == ["/bin/gemini", "--session-id", "s1",
                                                           "-m", "x"]
    home = os.path.join(orch.gemini_home("g1"), ".gemini")
    with open(os.path.join(home, "settings.json")) as f:
        settings = json.load(f)
    assert settings["ui"] == {"theme": "x"}
    after = settings["hooks"]["AfterAgent"]
    assert after[0]["hooks"][0]["command"] == "mine" and after[1]["hooks"][0]["command"].endswith(
        " Stop")
    assert os.readlink(os.path.join(home, "oauth_creds.json")) == os.path.join(
        env.home, ".gemini", "oauth_creds.json")
    with open(os.path.join(home, "trustedFolders.json")) as f:
        assert json.load(f) == {"/src": "TRUST_FOLDER", "/work": "TRUST_FOLDER"}
    assert orch.GeminiKind.environment(agent, {"A": "1", "CI": "true", "GITHUB_ACTIONS": "true"}) \
        == {"A": "1", "GEMINI_CLI_HOME": orch.gemini_home("g1")}
    assert orch.GeminiKind.argv(agent, "/bin/gemini", resume_id="s0")[1:3] == ["--resume", "s0"]


GEMINI_DIALOG = ["\u2502 ? Shell  touch x" + " " * 20 + "\u2502",
                 "\u2502 Allow execution of [Shell]?" + " " * 10 + "\u2502", "\u2502" + " " * 30,
                 "\u2502 \u25cf 1. Allow once" + " " * 10 + "\u2502",
                 "\u2502   2. Allow for this session    \u2502",
                 "\u2502   3. No, suggest changes (esc)  \u2502"]


def test_gemini_hooks_turned_off_are_refused_at_once(env, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_GEMINI", env.fake)
    os.makedirs(os.path.join(env.work, ".gemini"))
    with open(os.path.join(env.work, ".gemini", "settings.json"), "w") as f:
        f.write('// the project\'s\n{"hooksConfig": {"enabled": false}}\n')
    code, _, err = run(capsys, "spawn", "g1", "--agent", "gemini", "hi")
    assert code == 1 and one_error(err) and "hooksConfig.enabled false in" in err
    with open(os.path.join(env.work, ".gemini", "settings.json"), "w") as f:
        f.write("{not json")
    code, _, err = run(capsys, "spawn", "g1", "--agent", "gemini", "hi")
    assert code == 1 and one_error(err) and "cannot read" in err
    assert tmux_windows() == ["keep"]


def test_gemini_screens():
    dialog = orch.gemini_dialog(GEMINI_DIALOG)
    assert dialog["question"] == "Allow execution of [Shell]?" and dialog["cursor"] == "Allow once"
    assert orch.GeminiKind.yes_once(dialog) == ["Enter"]
    moved = [row.replace("\u25cf 1.", "  1.").replace("  2. Allow for", "\u25cf 2. Allow for")
             for row in GEMINI_DIALOG]
    assert orch.GeminiKind.yes_once(orch.gemini_dialog(moved)) is None
    box = ["\u2500" * 40, " Shift+Tab to accept edits", " >   half typed", " workspace"]
    assert orch.gemini_input([" > an earlier prompt", ""] + box) == "half typed"
    assert orch.gemini_input([" > an earlier prompt", "\u2726 reply"]) is None


def oc_row(*pieces):
    """One row of opencode's screen as tmux captures it with -e: SGR codes and text."""
    return "".join("\x1b[%sm" % p[1:] if p.startswith("@") else p for p in pieces)


# opencode 1.18.33's permission dialog, as captured (-e) at 150 columns: "Allow once" picked.
OPENCODE_DIALOG = [
    "  \u2503  \u25b3 Permission required", "  \u2503    # Shell command", "  \u2503",
    "  \u2503  $ touch orch-tool-ran-3", "  \u2503",
    oc_row("@48;5;232", "  ", "@38;5;215", "@48;5;233", "\u2503", "@38;5;15", "@48;5;234", "  ",
           "@48;5;215", " ", "@38;5;232", "Allow once", "@38;5;15", " ", "@48;5;234", "  ",
           "@38;5;8", "Allow always", "@38;5;15", "   ", "@38;5;8", "Reject", "@38;5;15",
           "     enter confirm")]


def test_opencode_screens():
    dialog = orch.opencode_dialog(OPENCODE_DIALOG)
    assert (dialog["question"], dialog["cursor"]) == ("Permission required", "Allow once")
    assert "$ touch orch-tool-ran-3" in " ".join(dialog["above"])
    assert orch.OpencodeKind.yes_once(dialog) == ["Enter"]
    moved = OPENCODE_DIALOG[:-1] + [oc_row(
        "@48;5;234", "  \u2503   ", "@38;5;8", "Allow once", "@38;5;15", "  ", "@48;5;215", " ",
        "@38;5;232", "Allow always", "@38;5;15", " ", "@48;5;234", "  ", "@38;5;8", "Reject")]
    assert orch.opencode_dialog(moved)["cursor"] == "Allow always"
    assert orch.OpencodeKind.yes_once(orch.opencode_dialog(moved)) is None
    # Its box, with the sidebar sharing its rows right of the bottom edge.
    box = ["  \u2503", "  \u2503  half typed", "  \u2503" + " " * 40 + "/tmp/some/long/path:",
           "  \u2503  Build \u00b7 Fake M Fake" + " " * 20 + "master",
           "  \u2579" + "\u2580" * 40, "   /tmp/work    15  ctrl+p commands"]
    assert orch.opencode_input(["  \u2503  an earlier prompt", ""] + box) == "half typed"
    assert orch.opencode_input(box[:1] + ["  \u2503"] + box[2:]) == ""
    assert orch.opencode_input(OPENCODE_DIALOG + box[4:]) is None
    assert orch.opencode_input(["     reply 2: ok"]) is None


def test_opencode_gets_orchs_plugin_beside_the_users_own(env, monkeypatch):
    theirs = {"plugin": ["file:///theirs.js"], "model": "x/y"}
    agent = {"name": "o1"}
    env_out = orch.OpencodeKind.environment(agent, {"OPENCODE_CONFIG_CONTENT": json.dumps(theirs)})
    config = json.loads(env_out["OPENCODE_CONFIG_CONTENT"])
    assert config["model"] == "x/y" and config["plugin"][0] == "file:///theirs.js"
    ours = config["plugin"][1]
    assert ours.startswith("file://" + orch.data_dir()) and ours.endswith(".js")
    with open(ours[len("file://"):]) as f:
        assert f.read() == orch.OPENCODE_PLUGIN
    assert env_out["ORCH_OPENCODE_EVENTS"] == orch.events_path("o1")
    again = orch.OpencodeKind.environment(agent, env_out)       # a child's: ours once
    assert json.loads(again["OPENCODE_CONFIG_CONTENT"])["plugin"] == config["plugin"]
    assert "OPENCODE_CONFIG_CONTENT" in orch.OpencodeKind.environment(agent, {})


def test_spawn_refuses_what_an_opencode_agent_cannot_be(env, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_OPENCODE", env.fake)
    code, _, err = run(capsys, "spawn", "o1", "--agent", "opencode", "--backend", "headless")
    assert code == orch.EXIT_USAGE and "--agent opencode needs the tmux backend" in err
    code, _, err = run(capsys, "spawn", "o1", "--agent", "opencode", "--", "--pure")
    assert code == 1 and one_error(err) and "--pure" in err and "plugin" in err
    monkeypatch.setenv("OPENCODE_PURE", "1")
    code, _, err = run(capsys, "spawn", "o1", "--agent", "opencode")
    assert code == 1 and one_error(err) and "OPENCODE_PURE" in err
    monkeypatch.delenv("OPENCODE_PURE")
    monkeypatch.setenv("OPENCODE_CONFIG_CONTENT", "{not json")
    code, _, err = run(capsys, "spawn", "o1", "--agent", "opencode")
    assert code == 1 and one_error(err) and "OPENCODE_CONFIG_CONTENT" in err
    monkeypatch.setenv("ORCH_OPENCODE", "no-such-opencode")
    code, _, err = run(capsys, "spawn", "o1", "--agent", "opencode")
    assert code == 1 and "ORCH_OPENCODE" in err and "opencode-ai" in err
    assert tmux_windows() == ["keep"]
    assert "o1" not in read_state_or_empty()["agents"]


# Copilot CLI 1.0.102 at 80 columns: its permission dialog, then its idle input line.
COPILOT_DIALOG = [
    "\u2502 make a file", "\u2502 \u256d" + "\u2500" * 30 + "\u256e",
    "\u2502 \u2502 touch orch-tool-ran-43   \u2502", "\u2502 \u2570" + "\u2500" * 30 + "\u256f",
    "\u2502", "\u2502 Do you want to run this command?", "\u2502",
    "\u2502 \u276f 1. Yes", "\u2502   2. Yes, and don't ask again for `touch` in this repo",
    "\u2502   3. No, and tell Copilot what to do differently (Esc to stop)", "\u2502",
    "\u2502 \u2191/\u2193 to navigate \u00b7 enter to select \u00b7 esc to cancel",
    "\u2570" + "\u2500" * 40 + "\u256f"]
COPILOT_IDLE = [" \u276f SLOW-6 first", " \u276f queued one", "   \u2514 [pending \u00b7 \u2191 recall]",
                " /tmp/work [\u2387 master]", "\u2500" * 60, "\u276f", "\u2500" * 60,
                " \u2190 open sidebar \u00b7 Interactive \u00b7 Manual Approval"]


def test_claude_says_on_screen_when_it_retries():
    assert orch.claude_retrying(["\u276f go", "\u273b 429 This request would exceed your rate "
                                 "limit \u00b7 retrying in 1s \u00b7 attempt 3/10", ""]) == (
        "retrying: 429 This request would exceed your rate limit, attempt 3/10")
    assert orch.claude_retrying(["\u273b API error \u00b7 Retrying in 2s \u00b7 attempt 3/4"]) == (
        "retrying: API error, attempt 3/4")
    assert orch.claude_retrying(["\u273b Thinking\u2026 (esc to interrupt)"]) is None


def test_the_screens_of_many_agents_are_read_together_each_its_own(env, capsys, monkeypatch):
    for name, words in (("a1", "SLOW-60"), ("a2", "RETRYING-60"), ("a3", "SLOW-60")):
        assert run(capsys, "spawn", name, words)[0] == 0
    # Hooks silent for RETRY_LOOK: each working agent's screen is read, all in one call.
    rows = retry_until(lambda: [r for r in json.loads(run(capsys, "list", "--json")[1])
                                if r["detail"]], 30)
    assert [(r["name"], r["detail"]) for r in rows] == [
        ("a2", "retrying: 429 rate limited, attempt 2/10")]
    monkeypatch.setenv("ORCH_TRACE", "1")
    code, out, err = run(capsys, "list", "--json")
    calls = [l for l in err.splitlines() if l.startswith("orch: trace: tmux")]
    assert code == 0 and len(calls) == 2 and " capturep " in calls[1], calls
    assert [r["detail"] for r in json.loads(out)] == [None, rows[0]["detail"], None]


def test_capture_panes_splits_what_tmux_would_refuse_and_reads_the_gone_alone(env, capsys,
                                                                              monkeypatch):
    tmux_cmd("new-window", "-d", "-t", "keep", "printf 'first screen\\n'; sleep 100000")
    tmux_cmd("new-window", "-d", "-t", "keep", "printf 'second screen\\n'; sleep 100000")
    panes = tmux_cmd("list-panes", "-s", "-t", "keep", "-F", "#{pane_id}").split()[1:]
    retry_until(lambda: orch.capture_pane(panes[1], env.socket) == ["second screen"])
    capsys.readouterr()
    monkeypatch.setenv("ORCH_TRACE", "1")
    found = orch.capture_panes(panes * 200, env.socket)     # ~30 KB: more than one call holds
    assert found == {panes[0]: ["first screen"], panes[1]: ["second screen"]}
    assert capsys.readouterr().err.count("orch: trace: tmux") == 3
    found = orch.capture_panes([panes[0], "%9999", panes[1]], env.socket)
    assert found == {panes[0]: ["first screen"], "%9999": [], panes[1]: ["second screen"]}


def test_codex_says_on_screen_when_it_retries():
    rows = ["\u203a FAIL429 second words", "",
            "\u25e6 Server is busy, reconnecting 3/5 (9s \u2022 esc to interrupt)",
            "  \u2514 Exceeded retry limit, last status: 429 Too Many Requests", "",
            "\u203a Ask Codex to do anything"]
    assert orch.codex_retrying(rows) == (
        "retrying: Server is busy (last status: 429 Too Many Requests), attempt 3/5")
    assert orch.codex_retrying([r.replace("\u25e6", "\u2022") for r in rows[:3]]) == (
        "retrying: Server is busy, attempt 3/5")
    assert orch.codex_retrying(["\u25e6 Reconnecting... 1/5 (3s \u2022 esc to interrupt)",
                                "  \u2514 Unexpected status 503 Service Unavailable: The server "
                                "is overloaded or not ready yet., url: http://127.0.0.1:1/v1/r"]) == (
        "retrying: Unexpected status 503 Service Unavailable: The server is overloaded or not "
        "ready yet., attempt 1/5")
    assert orch.codex_retrying(["\u25e6 Working (3s \u2022 esc to interrupt)"]) is None


def test_gemini_usage_counts_each_answer_once():
    answer = {"type": "gemini", "id": "a1", "tokens": {"input": 100, "output": 5, "cached": 60,
                                                       "thoughts": 2, "tool": 0, "total": 107}}
    again = dict(answer, tokens=dict(answer["tokens"], output=7, total=109))    # rewritten
    second = dict(answer, id="a2")
    totals = orch.gemini_usage({}, [{"type": "user"}, answer, again])
    totals = orch.gemini_usage(totals, [second])
    assert orch.usage_fields(totals) == {
        "tokens": {"input": 80, "output": 16, "cache_read": 120, "cache_write": 0},
        "context_tokens": 107, "context_used": None, "cost_usd": None}


# gemini 0.61.0 at a quota with a reset (a 429 whose RetryInfo is over 300 s), as captured.
GEMINI_LIMIT_BOX = [
    " > QUOTA-3600 second words", "", "",
    "\u256d" + "\u2500" * 60 + "\u256e", "\u2502" + " " * 60 + "\u2502",
    "\u2502 Usage limit reached for m." + " " * 34 + "\u2502",
    "\u2502 Access resets at 2:39 AM UTC." + " " * 31 + "\u2502",
    "\u2502 /stats model for usage details" + " " * 30 + "\u2502",
    "\u2502 /model to switch models." + " " * 36 + "\u2502", "\u2502" + " " * 60 + "\u2502",
    "\u2502 \u25cf 1. Keep trying" + " " * 44 + "\u2502", "\u2502   2. Stop" + " " * 51 + "\u2502",
    "\u2502" + " " * 60 + "\u2502", "\u2570" + "\u2500" * 60 + "\u256f"]


def test_gemini_usage_limit_box_and_when_it_resets():
    box = orch.GeminiKind.choices_dialog(GEMINI_LIMIT_BOX, said=True)
    assert box == {"question": "Usage limit reached for m.", "choices": {1: "Keep trying", 2: "Stop"},
                   "cursor": 1, "keys": "",
                   "said": "Usage limit reached for m. Access resets at 2:39 AM UTC."}
    assert re.search(orch.GeminiKind.LIMIT_WAIT[0], box["question"])
    assert [n for n, text in box["choices"].items() if re.match(orch.GeminiKind.LIMIT_WAIT[1],
                                                                 text)] == [2]
    assert re.match(orch.NEGATIVE_CHOICE, box["choices"][2])       # what deny picks
    # Without a reset (a daily quota), and quoted in a reply above its input box.
    daily = [row for row in GEMINI_LIMIT_BOX if "Access resets" not in row]
    assert orch.gemini_limit_dialog(daily)["said"] == "Usage limit reached for m."
    quoted = GEMINI_LIMIT_BOX + ["\u2500" * 40, " >   Type your message or @path/to/file"]
    assert orch.gemini_limit_dialog(quoted) is None
    assert orch.choice_dialog(GEMINI_LIMIT_BOX, said=True) is None     # no keys line: its own
    # Said to the minute, in UTC: the next 2:39 from then on, to that minute's end.
    said = calendar.timegm((2026, 12, 7, 1, 39, 30, 0, 0, 0))
    assert orch.gemini_reset(box["said"], said) == calendar.timegm((2026, 12, 7, 2, 40, 0, 0, 0, 0))
    late = calendar.timegm((2026, 12, 7, 23, 0, 0, 0, 0, 0))        # past it: tomorrow's
    assert orch.gemini_reset(box["said"], late) == calendar.timegm((2026, 12, 8, 2, 40, 0, 0, 0, 0))
    assert orch.gemini_reset("Access resets at 2:39 AM XYZT.", said) is None   # a zone orch can't


def write_gemini_chat(env, name, entries):
    """An agent whose SessionStart named a gemini chat file holding entries."""
    chat = os.path.join(env.root, "chat-%s.jsonl" % name)
    with open(chat, "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in entries))
    os.makedirs(orch.agent_dir(name), exist_ok=True)
    with open(orch.events_path(name), "a") as f:
        f.write(json.dumps({"t": time.time(), "event": "SessionStart",
                            "transcript_path": chat}) + "\n")
    return {"name": name}


def test_gemini_quota_failure_from_its_chat_file(env):
    prompt = {"type": "user", "timestamp": "2026-12-07T01:39:17.390Z", "content": [{"text": "go"}]}
    quota = {"type": "error", "timestamp": "2026-12-07T01:39:53.809Z", "content":
             "[API Error: You exceeded your current quota, please check your plan and billing "
             "details.\n* Quota exceeded for metric: x, limit: 250, model: m\nPlease retry in "
             "3600s.\nSuggested retry after 3600s.]"}
    agent = write_gemini_chat(env, "g1", [prompt, {"$set": {}}, quota, {"type": "info",
                                                                       "content": "failed"}])
    failed = orch.gemini_failed_turn(agent)
    at = calendar.timegm((2026, 12, 7, 1, 39, 17, 0, 0, 0)) + 0.39
    assert failed["error"] == "RESOURCE_EXHAUSTED" and "current quota" in failed["detail"]
    # The failure is known by the entry before it, as while gemini's box was still up.
    assert abs(failed["failed"] - at) < 0.01
    assert abs(failed["limit"]["resets_at"] - (at + 36.42 + 3600)) < 0.01
    # A daily quota says no time; a delay gemini would retry itself is no reset either.
    for words in ("[API Error: You have exhausted your daily quota on this model.]",
                  "[API Error: You exceeded your current quota. Please retry in 23s.]"):
        agent = write_gemini_chat(env, "g2", [prompt, dict(quota, content=words)])
        assert orch.gemini_failed_turn(agent)["limit"] == {"resets_at": None}
        os.remove(orch.events_path("g2"))
    # Not a quota: the status in its JSON, and no limit.
    bad = dict(quota, content='[API Error: {"error": {"code": 400, "status": "INVALID_ARGUMENT"}}]')
    failed = orch.gemini_failed_turn(write_gemini_chat(env, "g3", [prompt, bad]))
    assert failed["error"] == "INVALID_ARGUMENT" and "limit" not in failed
    # A later prompt: what failed before is past.
    assert orch.gemini_failed_turn(write_gemini_chat(env, "g4", [prompt, bad, prompt])) is None


def test_a_failed_turns_stop_is_no_turn_done(env):
    """codex and gemini fire Stop for a turn an error ended: told as failed, never as done."""
    agent = {"name": "g1", "launched": 100}
    old = {"launched": 100, "status": "working", "needs": None, "detail": None,
           "ended": 110, "asked": None, "failed": None}
    st = {"status": "limited", "needs": None, "detail": "quota", "error": "RESOURCE_EXHAUSTED",
          "since": 130, "ends": [110, 120, 130], "failures": [], "ended": 130, "failed": 125,
          "asked": None}
    found = orch.changes(agent, st, old, False)
    assert [e["event"] for e in found] == ["done", "failed"]    # 120's turn was done; 130's not
    # Told failed while its usage-limit box was up (the same failure): nothing more at Stop.
    told = dict(old, status="limited", failed=125, ended=120)
    assert [e["event"] for e in orch.changes(agent, st, told, False)] == []


def test_copilot_screens():
    dialog = orch.copilot_dialog(COPILOT_DIALOG)
    assert dialog["question"] == "Do you want to run this command?"
    assert "touch orch-tool-ran-43" in " ".join(dialog["above"])
    assert orch.CopilotKind.yes_once(dialog) == ["-l", "1"]     # "Yes", never "don't ask"
    assert orch.CopilotKind.yes_once(dict(dialog, options={"No": "2"})) is None
    assert orch.copilot_input(COPILOT_IDLE) == ""
    typed = COPILOT_IDLE[:5] + ["\u276f half typed"] + COPILOT_IDLE[6:]
    assert orch.copilot_input(typed) == "half typed"
    assert orch.copilot_input(COPILOT_DIALOG) is None
    assert orch.copilot_queued(COPILOT_IDLE, "queued one")
    assert not orch.copilot_queued(COPILOT_IDLE, "SLOW-6 first")    # running, not waiting
    assert orch.CopilotKind.screen_start(COPILOT_IDLE) == ("idle", None, None)
    assert orch.CopilotKind.screen_start(COPILOT_DIALOG)[0] == "needs-input"
    assert orch.CopilotKind.interrupt_keys({"status": "idle"}) == []   # C-c twice would quit


def copilot_line(kind, when, **data):
    return {"type": kind, "data": data, "timestamp": time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + ".250Z"}


def test_copilot_transcript_tells_what_no_hook_does(env, monkeypatch):
    agent = {"name": "c1", "agent": "copilot", "session_id": "s-1", "cwd": env.work}
    os.makedirs(orch.agent_dir("c1"))
    folder = os.path.join(env.home, ".copilot", "session-state", "s-1")
    os.makedirs(folder)
    path = os.path.join(folder, "events.jsonl")
    t = int(time.time()) - 100

    def write(*lines):
        with open(path, "w") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
    usage = dict(model="m", inputTokens=10, outputTokens=5, cacheReadTokens=3,
                 cacheWriteTokens=0, cost=0.25)
    write(copilot_line("user.message", t, content="go"),
          copilot_line("session.usage_record", t + 1, usage=usage),
          copilot_line("assistant.message", t + 1, content="", toolRequests=[
              {"name": "bash", "arguments": {"command": "make"}}]),
          copilot_line("permission.requested", t + 2),
          copilot_line("permission.completed", t + 3, result={"kind": "approved"}),
          copilot_line("session.usage_record", t + 4, usage=usage),
          copilot_line("assistant.message", t + 4, content="made it"),
          copilot_line("hook.start", t + 5, hookType="agentStop"))
    assert orch.copilot_since(agent, t + 2.5) == {"status": "working"}    # approved: it runs
    assert orch.copilot_since(agent, t + 3.5) is None
    assert orch.copilot_reply(agent)["text"] == "made it"
    totals = orch.copilot_usage({}, orch.read_json_lines(path))
    assert orch.usage_fields(totals) == {
        "tokens": {"input": 14, "output": 10, "cache_read": 6, "cache_write": 0},
        "context_tokens": 15, "context_used": None, "cost_usd": 0.5}
    kinds = [e["kind"] for line in orch.read_json_lines(path)
             for e in orch.conversation_entries(line)]
    assert kinds == ["user", "tool", "assistant", "turn"]
    write(copilot_line("user.message", t, content="go"),
          copilot_line("session.error", t + 6, errorType="rate_limit", statusCode=429,
                       message="Failed to get response; Last error: 429 Rate limit"))
    assert orch.copilot_since(agent, t + 1) == {
        "status": "idle", "error": "rate_limit",
        "detail": "Failed to get response; Last error: 429 Rate limit"}
    write(copilot_line("user.message", t, content="go"), copilot_line("abort", t + 6))
    assert orch.copilot_since(agent, t + 1) == {"status": "idle", "error": None}
    # Its lock, left by a copilot that was killed: no live process holds the session.
    for pid in (os.getpid(), 2 ** 22 + 1):
        open(os.path.join(folder, "inuse.%d.lock" % pid), "w").close()
    assert orch.copilot_session_holders(agent) == []    # this pytest is no copilot
    st = {"needs": "in-use"}
    assert orch.CopilotKind.start_answer(agent, st) == ["-l", "1"]
    program = os.path.join(env.root, "copilot")     # a live one holds it: no answer
    with open(program, "w") as f:
        f.write("#!/bin/sh\nread line\n")
    os.chmod(program, 0o755)
    live = subprocess.Popen([program], stdin=subprocess.PIPE)
    try:
        open(os.path.join(folder, "inuse.%d.lock" % live.pid), "w").close()
        assert retry_until(lambda: orch.copilot_session_holders(agent)) == [live.pid]
        assert orch.CopilotKind.start_answer(agent, st) is None
    finally:
        live.communicate(b"\n")
    assert orch.CopilotKind.start_answer(agent, {"needs": "trust"}) is None
    assert orch.CopilotKind.start_answer(dict(agent, trust=True), {"needs": "trust"}) == [
        "-l", "2"]


def test_spawn_refuses_what_a_copilot_agent_cannot_be(env, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_COPILOT", env.fake)
    code, _, err = run(capsys, "spawn", "p1", "--agent", "copilot", "--backend", "headless")
    assert code == orch.EXIT_USAGE and "--agent copilot needs the tmux backend" in err
    monkeypatch.setenv("ORCH_COPILOT", "no-such-copilot")
    code, _, err = run(capsys, "spawn", "p1", "--agent", "copilot")
    assert code == 1 and "ORCH_COPILOT" in err and "@github/copilot" in err
    assert tmux_windows() == ["keep"]


def test_spawn_refuses_what_a_codex_agent_cannot_be(env, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_CODEX", env.fake)
    code, _, err = run(capsys, "spawn", "c1", "--agent", "codex", "--cmd", "x")
    assert code == orch.EXIT_USAGE and "not both" in err
    code, _, err = run(capsys, "spawn", "c1", "--agent", "codex", "--backend", "headless")
    assert code == orch.EXIT_USAGE and "--agent codex needs the tmux backend" in err
    project = tmp_path / "cloned" / "sub"
    os.makedirs(str(project))
    os.makedirs(str(tmp_path / "cloned" / ".codex"))
    (tmp_path / "cloned" / ".codex" / "config.toml").write_text('[hooks]\nStop = []\n')
    code, _, err = run(capsys, "spawn", "c1", "--agent", "codex", "--cwd", str(project))
    assert code == 1 and one_error(err) and "codex hooks of its own" in err
    monkeypatch.setenv("ORCH_CODEX", "no-such-codex")
    code, _, err = run(capsys, "spawn", "c1", "--agent", "codex")
    assert code == 1 and "ORCH_CODEX" in err and "@openai/codex" in err
    assert tmux_windows() == ["keep"]


# ###########################################################################
# Shared servers: what another local user can see and do
# ###########################################################################

@pytest.fixture(scope="session")
def other_user():
    """A second, unprivileged Unix user: made here when the tests run as root, removed after."""
    if os.getuid() != 0:
        pytest.skip("needs root to create a second Unix user with useradd (CI runs as root)")
    if not shutil.which("useradd"):
        pytest.skip("useradd is not installed")
    name = "orcht%s" % uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh", name],
                   check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def as_user(user, *argv, **kw):
    """Run argv as user (the attacker's moves); return the CompletedProcess."""
    def drop():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    return subprocess.run(list(argv), preexec_fn=drop, env=env, cwd="/", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60, **kw)


def user_can_run(user, program):
    try:
        return as_user(user, program, "-c", "pass").returncode == 0
    except OSError:
        return False


@pytest.fixture
def shared(env):
    """A folder like /tmp: everyone may write, the sticky bit keeps entries to their owners."""
    folder = tempfile.mkdtemp(prefix="oshared", dir="/tmp")
    os.chmod(folder, 0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def tmux_windows():
    """The sessions of the test's tmux server, one per window: ["keep"] before any agent."""
    try:
        return tmux_cmd("list-windows", "-a", "-F", "#{session_name}").split()
    except subprocess.CalledProcessError:
        return []


def test_shared_state_where_others_can_write_is_refused(env, capsys, monkeypatch, shared,
                                                        other_user):
    mine = os.path.join(env.root, "mine.txt")
    with open(mine, "w") as f:
        f.write("the victim's own file\n")
    planted = os.path.join(shared, "planted.json")
    as_user(other_user, "ln", "-s", mine, planted, check=True)
    group = os.path.join(env.root, "team")
    os.mkdir(group)
    os.chown(group, 0, other_user.pw_gid)
    os.chmod(group, 0o770)
    for path, why in ((os.path.join(shared, "state.json"), "other users can write to " + shared),
                      (planted, "other users can write to " + shared),
                      (os.path.join(group, "state.json"), "other users can write to " + group)):
        monkeypatch.setenv("ORCH_STATE", path)
        code, out, err = run(capsys, "spawn", "a1", "secret plan")
        assert (code, out) == (1, ""), err
        assert one_error(err) and why in err and "ORCH_STATE" in err
        assert run(capsys, "list")[0] == 1
    assert tmux_windows() == ["keep"] and env.messages() == []
    with open(mine) as f:
        assert f.read() == "the victim's own file\n"
    assert sorted(os.listdir(shared)) == ["planted.json"] and os.listdir(group) == []
    # A folder of its own inside a sticky one is private, made 0700: orch makes and uses it.
    monkeypatch.setenv("ORCH_STATE", os.path.join(shared, "own", "state.json"))
    assert run(capsys, "spawn", "a1")[0] == 0
    assert stat.S_IMODE(os.stat(os.path.join(shared, "own")).st_mode) == 0o700
    # The same name made first by the other user is theirs: refused.
    as_user(other_user, "mkdir", "-m", "777", os.path.join(shared, "theirs"), check=True)
    monkeypatch.setenv("ORCH_STATE", os.path.join(shared, "theirs", "state.json"))
    code, _, err = run(capsys, "spawn", "a2")
    assert code == 1 and "belongs to " + other_user.pw_name in err
    assert os.listdir(os.path.join(shared, "theirs")) == []


def test_shared_a_planted_state_file_is_refused_and_its_command_never_runs(env, capsys,
                                                                         other_user):
    marker = os.path.join(env.root, "ran")
    assert run(capsys, "spawn", "x", "--cmd", "sleep 1000")[0] == 0
    assert run(capsys, "kill", "x")[0] == 0
    path = os.environ["ORCH_STATE"]
    state = env.state()
    state["agents"]["x"]["cmd"] = "touch %s" % shlex.quote(marker)
    with open(path, "w") as f:
        json.dump(state, f)
    os.chown(path, other_user.pw_uid, other_user.pw_gid)
    os.chmod(path, 0o666)
    for verb in (["list"], ["resume", "x"], ["send", "x", "hi"], ["rm", "x"]):
        code, out, err = run(capsys, *verb)
        assert code == 1 and one_error(err), (verb, err)
        assert "belongs to %s" % other_user.pw_name in err
    os.chown(path, 0, 0)    # the user's own, but anyone may write it
    code, _, err = run(capsys, "resume", "x")
    assert code == 1 and "other users can write to it (mode 666): chmod 600" in err
    assert not os.path.exists(marker)


def test_shared_a_data_folder_made_by_another_user_is_refused(env, capsys, other_user):
    data = orch.data_dir()
    os.mkdir(data, 0o777)
    os.chmod(data, 0o777)
    os.chown(data, other_user.pw_uid, other_user.pw_gid)
    code, out, err = run(capsys, "spawn", "a1", "task")
    assert code == 1 and one_error(err)
    assert "belongs to %s" % other_user.pw_name in err
    assert os.listdir(data) == [] and tmux_windows() == ["keep"]
    os.chown(data, 0, 0)    # the user's own, but anyone may write to it
    code, out, err = run(capsys, "spawn", "a1", "task")
    assert code == 1 and "chmod 700 " + data in err and os.listdir(data) == []


def test_shared_tmux_socket_of_another_user_is_refused(env, capsys, monkeypatch, shared,
                                                       other_user):
    sock = os.path.join(shared, "sock")
    as_user(other_user, "tmux", "-S", sock, "new-session", "-d", "sleep 100000", check=True)
    try:
        monkeypatch.setenv("ORCH_TMUX_SOCKET", sock)
        code, out, err = run(capsys, "spawn", "a1", "task")
        assert code == 1 and one_error(err)
        assert "refusing tmux socket %s: %s belongs to %s" % (sock, sock, other_user.pw_name) \
            in err
        windows = as_user(other_user, "tmux", "-S", sock, "list-windows", "-a").stdout
        assert len(windows.splitlines()) == 1
    finally:
        as_user(other_user, "tmux", "-S", sock, "kill-server")
    assert env.messages() == []


def test_shared_temp_files_never_follow_a_planted_link(env, capsys, monkeypatch):
    mine = os.path.join(env.root, "bashrc")
    with open(mine, "w") as f:
        f.write("export PS1='$ '\n")
    state = os.environ["ORCH_STATE"]
    # The temp names an older orch used (STATE.tmp.PID), for pids around this one.
    for pid in range(max(1, os.getpid() - 50), os.getpid() + 50):
        os.symlink(mine, "%s.tmp.%d" % (state, pid))
    assert run(capsys, "spawn", "a1", "task")[0] == 0
    assert run(capsys, "send", "a1", "more")[0] == 0
    with open(mine) as f:
        assert f.read() == "export PS1='$ '\n"
    left = [n for n in os.listdir(os.path.dirname(state)) if n.endswith(".tmp")]
    assert left == []


def test_shared_umask_002_still_makes_everything_private(env, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_STATE", os.path.join(env.root, "new", "deeper", "state.json"))
    old = os.umask(0o002)
    try:
        assert run(capsys, "spawn", "a1", "task")[0] == 0
        assert run(capsys, "send", "a1", "more")[0] == 0
        assert run(capsys, "wait", "a1")[0] == 0
        assert run(capsys, "reply", "a1")[0] == 0
    finally:
        os.umask(old)
    top = os.path.join(env.root, "new")
    found = []
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(folder, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            found.append(name)
            assert not mode & 0o077, "%s is %03o" % (path, mode)
    assert stat.S_IMODE(os.stat(top).st_mode) == 0o700
    assert {"state.json", "hook.py", "events.jsonl", "reply.json", "launch.json"} <= set(found)


SNOOPER = r"""
import json, os, sys
told = json.load(sys.stdin)        # not on its own command line
out, secrets, watch = sys.argv[1], [s.encode() for s in told["secrets"]], told["watch"].encode()
found, watched = set(), set()
while not os.path.exists(out + ".stop"):
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                line = f.read()
        except (OSError, ValueError):
            continue
        if watch in line:
            watched.add(pid)
        for secret in secrets:
            if secret in line:
                found.add(line.replace(b"\0", b" ")[:300].decode("utf-8", "replace"))
with open(out, "w") as f:
    json.dump({"found": sorted(found), "watched": len(watched)}, f)
"""


class Snooper(object):
    """Another local user reading every process's command line, as `ps -eww` does."""

    def __init__(self, folder, secrets, user=None, watch="fake-claude"):
        self.out = os.path.join(folder, "snooped.json")
        python = sys.executable
        if user is not None:    # the tests' Python may sit in a folder only root can enter
            python = next((p for p in (sys.executable, "/usr/bin/python3",
                                       "/usr/local/bin/python3") if user_can_run(user, p)), None)
            if python is None:  # no Python that user may run: read as this user instead
                python, user = sys.executable, None
        def drop():
            if user is not None:
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
        self.proc = subprocess.Popen([python, "-c", SNOOPER, self.out], preexec_fn=drop, cwd="/",
                                     stdin=subprocess.PIPE)
        self.proc.stdin.write(json.dumps({"secrets": list(secrets), "watch": watch}).encode())
        self.proc.stdin.close()

    def stop(self):
        open(self.out + ".stop", "w").close()
        self.proc.wait(30)
        with open(self.out) as f:
            return json.load(f)


def secret_words():
    return dict((what, "S3CRET%s%s" % (what, uuid.uuid4().hex[:12]))
                for what in ("prompt", "message", "resume", "key", "cmd", "headless", "remote"))


def snooper_for(env, secrets, request, watch="fake-claude"):
    """Read command lines as the second user where there can be one, else as this one."""
    folder = tempfile.mkdtemp(prefix="osnoop", dir="/tmp")
    os.chmod(folder, 0o1777)
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    user = request.getfixturevalue("other_user") if os.getuid() == 0 else None
    snooper = Snooper(folder, sorted(secrets.values()), user, watch)
    request.addfinalizer(lambda: snooper.proc.poll() is None and snooper.proc.kill())
    return snooper


def test_shared_no_secret_on_any_command_line(env, capsys, monkeypatch, request):
    secrets = secret_words()
    monkeypatch.setenv("SOME_API_KEY", secrets["key"])
    snooper = snooper_for(env, secrets, request)
    assert run(capsys, "spawn", "a1", "do " + secrets["prompt"])[0] == 0
    assert run(capsys, "send", "a1", "and " + secrets["message"])[0] == 0
    assert run(capsys, "kill", "a1")[0] == 0
    assert run(capsys, "resume", "a1", "then " + secrets["resume"])[0] == 0
    # A key given to a --cmd program the shell's way stays off every command line too.
    assert run(capsys, "spawn", "c1", "--cmd", "CMD_KEY=%s exec %s" % (secrets["cmd"], env.fake),
               "hi")[0] == 0
    seen = snooper.stop()
    assert seen["found"] == []
    assert seen["watched"] >= 2     # it did see the agents start
    # And what each agent was started with says nothing either.
    for record in env.records("start"):
        assert not [s for s in secrets.values() if s in " ".join(record["argv"])]
    assert env.messages("a1") == ["do " + secrets["prompt"], "and " + secrets["message"],
                                  "then " + secrets["resume"]]
    assert env.records("start")[0]["env"]["SOME_API_KEY"] == secrets["key"]


def test_shared_no_secret_on_a_headless_command_line(headless, capsys, monkeypatch, request):
    secrets = secret_words()
    monkeypatch.setenv("SOME_API_KEY", secrets["key"])
    snooper = snooper_for(headless, secrets, request)
    assert run(capsys, "spawn", "h1", "do " + secrets["prompt"])[0] == 0
    assert run(capsys, "send", "h1", "and " + secrets["message"])[0] == 0
    assert run(capsys, "wait", "h1")[0] == 0
    seen = snooper.stop()
    assert seen["found"] == [] and seen["watched"] >= 1


def test_shared_the_far_end_runs_orch_only_from_a_private_folder(hosts, capsys):
    assert run(capsys, "--host", "h1", "list")[0] == 0
    folder = os.path.join(hosts.env.home, ".orch.d", "bin")
    os.chmod(folder, 0o777)
    code, out, err = run(capsys, "--host", "h1", "list")
    assert code == 1 and one_error(err)
    assert "%s on this host is not a private folder" % folder in err
    os.chmod(folder, 0o700)
    assert run(capsys, "--host", "h1", "list")[0] == 0


def test_shared_no_secret_on_a_command_line_over_ssh(hosts, capsys, request):
    secrets = secret_words()
    snooper = snooper_for(hosts.env, secrets, request)
    code, _, err = run(capsys, "--host", "h1", "spawn", "r1", "do " + secrets["prompt"])
    assert code == 0, err
    assert run(capsys, "send", "r1@h1", "and " + secrets["message"])[0] == 0
    assert cli("send", "r1@h1", "-", stdin="piped " + secrets["remote"])[0] == 0
    seen = snooper.stop()
    assert seen["found"] == [] and seen["watched"] >= 1
    assert hosts.env.messages("r1") == ["do " + secrets["prompt"], "and " + secrets["message"],
                                        "piped " + secrets["remote"]]


# ###########################################################################
# Performance: the status cache and the installed command
# ###########################################################################

def test_status_cache_answers_as_a_full_replay_and_rebuilds(env, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-2 first")[0] == 0
    assert run(capsys, "send", "a1", "second")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    agent = env.state()["agents"]["a1"]
    full = orch.replay_events(orch.read_events("a1", since=agent["launched"]))
    path = os.path.join(orch.data_dir(), "status-cache.json")
    fresh = orch.StatusCache()
    assert fresh.summary(agent) == full
    fresh.save()
    with open(path) as f:
        assert json.load(f)["a1"]["offset"] == os.path.getsize(orch.events_path("a1"))
    cached = orch.StatusCache()
    assert cached.summary(agent) == full and not cached.changed     # from the cache alone
    for broken in ("{not json", json.dumps({"a1": {"launched": 1, "offset": 0, "seen": {}}}),
                   json.dumps({"a1": {"launched": agent["launched"], "offset": 10 ** 9,
                                      "seen": {}}}), json.dumps({"a1": 7})):
        with open(path, "w") as f:
            f.write(broken)
        assert orch.StatusCache().summary(agent) == full
    assert run(capsys, "send", "a1", "third")[0] == 0      # new events are read incrementally
    assert wait_status(capsys, "a1", "idle")["last_prompt"] == "third"
    assert orch.StatusCache().summary(agent)["last_prompt"] == "third"
    assert run(capsys, "rm", "a1")[0] == 0
    assert run(capsys, "spawn", "a2", "hello")[0] == 0
    wait_status(capsys, "a2", "idle")
    with open(path) as f:
        assert list(json.load(f)) == ["a2"]     # a1 forgotten at the next save


def test_cli_install_runs_from_bytecode_and_uninstalls_cleanly(env, tmp_path):
    py = cli_python()
    prefix = tmp_path / "prefix"
    code, out, err = cli("install", "--prefix", str(prefix), python=py)
    assert code == 0 and str(prefix / "bin" / "orch") in out and "PATH" in out, err
    launcher = str(prefix / "bin" / "orch")
    bare = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for args, expected in ((["--version"], "orch " + orch.__version__ + "\n"),
                           (["spawn", "a1", "--cmd", "sleep 1000"], None), (["list"], None)):
        proc = subprocess.run([launcher] + args, env=bare, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert expected is None or proc.stdout == expected
    pycache = prefix / "lib" / "orch" / "__pycache__"
    assert [p.name.startswith("orch.") for p in pycache.iterdir()] == [True]
    assert cli("install", "--prefix", str(prefix), python=py)[0] == 0       # again: upgrade
    code, out, _ = cli("install", "--prefix", str(prefix), "--uninstall", python=py)
    assert code == 0 and launcher in out
    assert list(prefix.iterdir()) == []
    (prefix / "bin").mkdir()
    (prefix / "bin" / "orch").write_text("#!/bin/sh\necho someone else's orch\n")
    code, _, err = cli("install", "--prefix", str(prefix), python=py)
    assert code == 1 and "is not orch's launcher" in err
    assert cli("install", "--prefix", str(prefix), "--uninstall", python=py)[0] == 0
    assert (prefix / "bin" / "orch").read_text().endswith("someone else's orch\n")


# ###########################################################################
# doctor
# ###########################################################################
# ###########################################################################
# doctor
# ###########################################################################

def doctor(capsys):
    """Run doctor; return (exit code, {check: (level, message)}) and check its shape."""
    code, out, err = run(capsys, "doctor")
    lines = out.splitlines()
    assert err == "" and all(l.split()[0] in ("ok", "warning", "problem") for l in lines), out
    code_json, out_json, _ = run(capsys, "doctor", "--json")
    found = json.loads(out_json)
    assert code_json == code and len(found) == len(lines)
    return code, dict((f["check"], (f["level"], f["message"])) for f in found)


def tree_of(folder):
    """Every file and folder under folder with its content's hash and mode."""
    found = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(top, name)
            info = os.lstat(path)
            data = b""
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    data = f.read()
            found[os.path.relpath(path, folder)] = (info.st_mode, hashlib.sha256(data).hexdigest())
    return found


def test_doctor_all_well_and_changes_nothing(env, capsys, monkeypatch):
    write_claude_config(env.home, [], {"oauthAccount": {"emailAddress": "a@example.com"}})
    before = tree_of(env.home)
    code, found = doctor(capsys)
    assert code == 0 and [level for level, _ in found.values()] == ["ok"] * 13, found
    assert tree_of(env.home) == before
    assert "tmux 3" in found["tmux"][1] and "Claude Code 2.1.197" in found["claude"][1]
    assert "needed only for --agent codex" in found["codex"][1] or "Codex CLI" in found["codex"][1]
    assert "does not exist yet" in found["state"][1] and "does not exist yet" in found["data"][1]
    assert not os.path.exists(os.environ["ORCH_STATE"]) and not os.path.exists(orch.data_dir())
    monkeypatch.setenv("TMUX", "/tmp/elsewhere,1,0")
    assert "orch ignores it" in doctor(capsys)[1]["$TMUX"][1]


def test_doctor_warns_where_claude_would_stop_at_a_first_screen(env, capsys, monkeypatch):
    assert "never been set up" in doctor(capsys)[1]["sign-in"][1]
    key = "sk-ant-api03-secret-part-0123456789abcdefWXYZ"
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    write_claude_config(env.home, [], {"customApiKeyResponses": {"approved": [], "rejected": []}})
    before = tree_of(env.home)
    code, out, _ = run(capsys, "doctor")
    assert code == 0 and key[:-4] not in out and "WXYZ" in out
    level, message = doctor(capsys)[1]["sign-in"]
    assert level == "warning" and message.startswith("claude ")
    assert "Do you want to use this API key?" in message and "orch approve" in message
    write_claude_config(env.home, [], {"customApiKeyResponses": {"approved": [],
                                                                 "rejected": [key[-20:]]}})
    assert "told not to use" in doctor(capsys)[1]["sign-in"][1]
    write_claude_config(env.home, [], {"customApiKeyResponses": {"approved": [key[-20:]]}})
    assert "sign-in" not in doctor(capsys)[1]
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    assert "no API key and no login" in doctor(capsys)[1]["sign-in"][1]
    write_claude_config(env.home, [], {"oauthAccount": {"emailAddress": "a@example.com"}})
    before = tree_of(env.home)
    assert "sign-in" not in doctor(capsys)[1]
    assert tree_of(env.home) == before


def test_doctor_reports_opencode_and_copilot_and_plugins_turned_off(env, capsys, monkeypatch):
    for name, says in (("opencode", "1.18.33"), ("copilot", "GitHub Copilot CLI 1.0.99.")):
        path = os.path.join(env.root, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\necho '%s'\n" % says)
        os.chmod(path, 0o755)
        monkeypatch.setenv("ORCH_" + name.upper(), path)
    monkeypatch.setenv("OPENCODE_PURE", "1")
    found = json.loads(run(capsys, "doctor", "--json")[1])
    mine = dict(((f["check"], f["level"]), f["message"]) for f in found
                if f["check"] in ("opencode", "copilot"))
    assert mine[("opencode", "ok")].startswith("OpenCode 1.18.33 (")
    assert "OPENCODE_PURE" in mine[("opencode", "problem")]
    assert "not a version orch is tested with (1.0.102)" in mine[("copilot", "warning")]


def test_doctor_warns_where_codex_or_gemini_would_stop_at_sign_in(env, capsys, monkeypatch):
    write_claude_config(env.home, [], {"oauthAccount": {"emailAddress": "a@example.com"}})
    for name, says in (("codex", "codex-cli 0.169.0"), ("gemini", "0.61.0")):
        path = os.path.join(env.root, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\necho '%s'\n" % says)
        os.chmod(path, 0o755)
        monkeypatch.setenv("ORCH_" + name.upper(), path)
    codex_home = os.path.join(env.home, ".codex")
    os.makedirs(codex_home)
    os.makedirs(os.path.join(env.home, ".gemini"))
    found = [f for f in json.loads(run(capsys, "doctor", "--json")[1]) if f["check"] == "sign-in"]
    assert [f["message"].split()[0] for f in found] == ["codex", "gemini"]
    assert "codex login" in found[0]["message"] and "run `gemini` once" in found[1]["message"]
    with open(os.path.join(codex_home, "config.toml"), "w") as f:
        f.write('model_provider = "mine"\n[model_providers.mine]\nname = "m"\n')
    with open(os.path.join(env.home, ".gemini", "settings.json"), "w") as f:
        json.dump({"security": {"auth": {"selectedType": "gemini-api-key"}}}, f)
    before = tree_of(env.home)
    assert "sign-in" not in doctor(capsys)[1]
    assert tree_of(env.home) == before
    os.unlink(os.path.join(codex_home, "config.toml"))
    with open(os.path.join(codex_home, "auth.json"), "w") as f:
        json.dump({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-x"}, f)
    assert "sign-in" not in doctor(capsys)[1]


def test_doctor_and_spawn_say_when_memory_is_short(env, capsys, monkeypatch):
    found = orch.memory_available()
    assert found and 0 < found[0] <= found[1]       # this machine's /proc/meminfo
    assert doctor(capsys)[1]["memory"][0] == "ok"
    monkeypatch.setattr(orch, "memory_available", lambda: (300, 4000))
    level, message = doctor(capsys)[1]["memory"]
    assert level == "warning" and "300 of 4000 MiB" in message and "gemini" in message
    assert "claude" not in message.split("(")[0]         # 210 MiB still fit
    monkeypatch.setattr(orch, "memory_available", lambda: (150, 4000))
    code, out, err = run(capsys, "spawn", "a1", "hello")
    assert code == 0 and "only 150 MiB of memory available; a claude agent holds about 210" in err


def test_doctor_warns_about_untested_claude_and_gone_agents(env, capsys, monkeypatch):
    assert run(capsys, "spawn", "a1")[0] == 0
    assert run(capsys, "spawn", "a2")[0] == 0
    run(capsys, "kill", "a2")
    monkeypatch.setenv("FAKE_VERSION", "2.1.999")
    code, found = doctor(capsys)
    assert code == 0 and found["claude"][0] == "warning"
    tested = "%d.%d.%d to %d.%d.%d" % (orch.TESTED_CLAUDE[0] + orch.TESTED_CLAUDE[1])
    assert "2.1.999" in found["claude"][1] and tested in found["claude"][1]
    assert found["state"] == ("ok", "%s: format 1, 2 agents (1 running, 1 exited)"
                              % os.environ["ORCH_STATE"])
    assert "agents" not in found        # a2 was killed: its exit is known, nothing is gone
    env.stop()
    code, found = doctor(capsys)
    assert found["agents"][0] == "warning" and found["agents"][1].startswith("a1, a2: ")
    assert "orch resume NAME" in found["agents"][1]


def test_doctor_problems_exit_1(env, capsys, monkeypatch):
    assert run(capsys, "spawn", "a1", "--cmd", "sleep 100")[0] == 0
    os.chmod(orch.data_dir(), 0o755)
    with open(os.environ["ORCH_STATE"], "a") as f:
        f.write("garbage")
    before = open(os.environ["ORCH_STATE"]).read()
    monkeypatch.setenv("ORCH_CLAUDE", "no-such-claude")
    code, found = doctor(capsys)
    assert code == 1
    assert found["claude"][0] == "problem" and "ORCH_CLAUDE" in found["claude"][1]
    assert found["state"][0] == "problem" and "corrupt" in found["state"][1]
    assert found["data"][0] == "problem" and "chmod 700" in found["data"][1]
    assert open(os.environ["ORCH_STATE"]).read() == before
    assert os.stat(orch.data_dir()).st_mode & 0o777 == 0o755


def test_cli_doctor_without_tmux(env, tmp_path_factory, monkeypatch):
    hide_tmux(monkeypatch, tmp_path_factory)
    code, out, err = cli("doctor", python=cli_python())
    assert code == 0 and "Traceback" not in err, err
    assert [l for l in out.splitlines() if l.startswith("warning  tmux")]


def test_cli_doctor_without_tmux_reports_everything_about_agents_in_tmux(env, capsys,
                                                                         tmp_path_factory,
                                                                         monkeypatch):
    assert run(capsys, "spawn", "a1", "task")[0] == 0
    hide_tmux(monkeypatch, tmp_path_factory)
    code, out, err = cli("doctor", python=cli_python())
    assert code == 1 and err == "", err
    checks = [line.split()[:2] for line in out.splitlines()]
    for check in ("python", "tmux", "claude", "state", "data"):
        assert [c for c in checks if c[1] == check], (check, out)
    assert "problem  tmux    tmux not found, but agents run in it (a1)" in out
    assert "problem  agents  cannot tell what they are doing: tmux is not installed" in out


def test_tested_claude_versions_match_the_makefile():
    with open(os.path.join(HERE, "Makefile")) as f:
        line = [l for l in f if l.startswith("CLAUDE_CODE_VERSIONS")][0]
    versions = sorted(orch.parse_claude_version(v) for v in line.split("=", 1)[1].split())
    assert (versions[0], versions[-1]) == orch.TESTED_CLAUDE
    with open(os.path.join(HERE, "Makefile")) as f:
        line = [l for l in f if l.startswith("CODEX_VERSIONS")][0]
    assert tuple(sorted(orch.parse_claude_version(v) for v in line.split("=", 1)[1].split())) \
        == orch.TESTED_CODEX
    with open(os.path.join(HERE, "Makefile")) as f:
        line = [l for l in f if l.startswith("GEMINI_VERSIONS")][0]
    assert tuple(sorted(orch.parse_claude_version(v) for v in line.split("=", 1)[1].split())) \
        == orch.TESTED_GEMINI


def test_parse_claude_version():
    assert orch.parse_claude_version("2.1.330 (Claude Code)\n") == (2, 1, 330)
    assert orch.parse_claude_version("claude 10.0.1") == (10, 0, 1)
    assert orch.parse_claude_version("no version") is None


# ###########################################################################
# Real environments: a shared window, the user's tmux.conf and Claude settings,
# locales and bare environments, first runs
# ###########################################################################

def test_interrupt_clears_the_prompt_claude_puts_back(env, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-30 long job")[0] == 0
    pane = env.state()["agents"]["a1"]["tmux"]["pane"]
    assert run(capsys, "interrupt", "a1")[0] == 0
    assert orch.typed_text(env.state()["agents"]["a1"]) == ""
    code, out, err = run(capsys, "send", "a1", "do this instead")
    assert (code, out) == (0, "a1: submitted\n"), err
    assert env.messages() == ["SLOW-30 long job", "do this instead"]
    # An interrupt clears only claude's restored prompt, never a person's text.
    tmux_cmd("send-keys", "-t", pane, "-l", "mine")
    retry_until(lambda: orch.typed_text(env.state()["agents"]["a1"]) == "mine")
    assert run(capsys, "interrupt", "a1")[0] == 0
    assert orch.typed_text(env.state()["agents"]["a1"]) == "mine"


def test_send_leaves_copy_mode_first(env, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    pane = env.state()["agents"]["a1"]["tmux"]["pane"]
    tmux_cmd("copy-mode", "-t", pane)       # a person scrolled back, then detached
    assert tmux_cmd("display-message", "-p", "-t", pane, "#{pane_in_mode}").strip() == "1"
    code, out, err = run(capsys, "send", "a1", "after copy mode")
    assert (code, out) == (0, "a1: submitted\n"), err
    assert tmux_cmd("display-message", "-p", "-t", pane, "#{pane_in_mode}").strip() == "0"
    assert env.messages() == ["first", "after copy mode"]


def test_send_refuses_half_typed_text_and_force_clears_it(versioned, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    pane = versioned.state()["agents"]["a1"]["tmux"]["pane"]
    tmux_cmd("send-keys", "-t", pane, "-l", "half typed")
    retry_until(lambda: "\u276f\u00a0half typed" in run(capsys, "tail", "a1")[1])
    code, out, err = run(capsys, "send", "a1", "orch message")
    assert code == orch.EXIT_NEEDS_INPUT and one_error(err) and "'half typed'" in err
    assert "--force" in err and out == ""
    assert "\u276f\u00a0half typed" in run(capsys, "tail", "a1", "-n", "3")[1]   # kept
    code, out, err = run(capsys, "send", "a1", "--force", "orch message")
    assert (code, out) == (0, "a1: submitted\n"), err
    assert versioned.messages() == ["first", "orch message"]


def test_disable_all_hooks_is_refused_at_once_and_by_doctor(env, capsys):
    os.makedirs(os.path.join(env.home, ".claude"))
    with open(os.path.join(env.home, ".claude", "settings.json"), "w") as f:
        json.dump({"disableAllHooks": True}, f)
    code, out, err = run(capsys, "spawn", "a1", "task")
    assert code == 1 and one_error(err) and "disableAllHooks in ~/.claude/settings.json" in err
    assert env.records("start") == []       # refused before anything started
    assert doctor(capsys)[1]["hooks"][0] == "problem"
    assert run(capsys, "spawn", "c1", "task", "--cmd", env.fake)[0] == 0     # no hooks needed
    os.makedirs(os.path.join(env.work, ".claude"))
    with open(os.path.join(env.work, ".claude", "settings.local.json"), "w") as f:
        json.dump({"disableAllHooks": False}, f)    # the project turns them back on
    assert run(capsys, "spawn", "a1", "task")[0] == 0


def test_hooks_silenced_unseen_are_noticed_within_seconds(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_NO_HOOKS", "1")
    monkeypatch.setenv("ORCH_START_TIMEOUT", "600")
    code, out, err = run(capsys, "spawn", "a1", "task")
    # The guard's own words, not the start timeout's ("did not report ready within 600s").
    assert code == orch.EXIT_UNCONFIRMED and one_error(err)
    assert "none of orch's hooks fired within %gs" % orch.HOOK_GRACE in err


HEAVY_TMUX_CONF = """\
set -g base-index 1
setw -g pane-base-index 1
set -g renumber-windows on
setw -g automatic-rename on
set -s extended-keys on
set -g mouse on
set -g default-shell /bin/bash
set -g status-interval 1
set -g status-right '#(date)'
set -g remain-on-exit off
set -g destroy-unattached on
set -g exit-unattached on
run-shell 'sleep 1'
bind -n C-l send-keys C-l
"""


def test_users_heavy_tmux_conf(env, capsys, monkeypatch):
    # orch starts its own server, which reads the user's ~/.tmux.conf.
    with open(os.path.join(env.home, ".tmux.conf"), "w") as f:
        f.write(HEAVY_TMUX_CONF)
    monkeypatch.setenv("ORCH_TMUX_SOCKET", env.socket + "u")
    try:
        code, out, err = run(capsys, "spawn", "a1", "SLOW-30 first")
        assert code == 0, err
        assert status(capsys, "a1")["status"] == "working"
        code, out, _ = run(capsys, "interrupt", "a1")
        assert code == 0
        wait_status(capsys, "a1", "idle")
        assert run(capsys, "send", "a1", "second")[:2] == (0, "a1: submitted\n")
        assert run(capsys, "kill", "a1")[0] == 0
        assert run(capsys, "resume", "a1", "third")[0] == 0
        assert env.messages() == ["SLOW-30 first", "second", "third"]
    finally:
        subprocess.run(["tmux", "-L", env.socket + "u", "kill-server"], stderr=subprocess.DEVNULL)


def test_exit_unattached_on_the_users_own_server_is_refused(env, capsys, monkeypatch):
    with open(os.path.join(env.home, ".tmux.conf"), "w") as f:
        f.write("set -g exit-unattached on\n")
    monkeypatch.delenv("ORCH_TMUX_SOCKET")     # the default server (in the test's TMUX_TMPDIR)
    code, out, err = run(capsys, "spawn", "a1", "--cmd", "sleep 1000")
    assert code == 1 and one_error(err) and "exit-unattached" in err
    assert "ORCH_TMUX_SOCKET" in err and not os.path.exists(os.environ["ORCH_STATE"])


def environment(kind):
    """The environment a command gets from a shell, cron, or a container with no locale."""
    keep = ("HOME", "ORCH_STATE", "ORCH_TMUX_SOCKET", "TMUX_TMPDIR", "ORCH_CLAUDE", "FAKE_LOG",
            "ORCH_KILL_GRACE")
    if kind == "cron":      # env -i plus what crontab sets
        return dict([(k, os.environ[k]) for k in keep] + [("PATH", "/usr/bin:/bin"),
                                                          ("SHELL", "/bin/sh")])
    env = dict((k, v) for k, v in os.environ.items()
               if k not in ("LANG", "LC_ALL", "LC_CTYPE", "LANGUAGE"))
    if kind == "LC_ALL=C":
        env["LC_ALL"] = "C"
    return env


def bare_cli(env, python, *args, **kw):
    """Run orch.py in env, reading its output as the UTF-8 it must be; no traceback allowed."""
    proc = subprocess.run([python, ORCH] + list(args), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120, **kw)
    out, err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    assert "Traceback" not in err, err
    return proc.returncode, out, err


@pytest.mark.parametrize("kind", ["LC_ALL=C", "no locale", "cron"])
def test_cli_every_verb_in_bare_environments(repo, kind):
    env = repo
    bare = environment(kind)
    used = set()

    def orch_cli(*args, **kw):
        used.add(args[0])
        return bare_cli(bare, cli_python(), *args, **kw)
    told = os.path.join(env.root, "told.jsonl")
    code, out, err = orch_cli("notify", "add", "n1", "--exec", "cat >> '%s'; echo >> '%s'"
                              % (told, told), "--on", "done")
    assert code == 0, err
    code, out, err = orch_cli("spawn", "a1", "caf\u00e9 \u6f22\u5b57 \U0001F680 task")
    assert code == 0, err
    assert orch_cli("send", "a1", "na\u00efve SLOW-20 message")[:2] == (0, "a1: submitted\n")
    code, out, _ = orch_cli("list")
    assert code == 0 and "na\u00efve" in out
    code, out, _ = orch_cli("list", "--json")
    assert json.loads(out)[0]["status"] == "working"
    code, out, _ = orch_cli("tail", "a1")
    assert code == 0 and "caf\u00e9 \u6f22\u5b57" in out
    assert orch_cli("interrupt", "a1")[0] == 0
    assert orch_cli("wait", "a1", "--timeout", "30")[:2] == (0, "a1: idle\n")
    code, out, _ = orch_cli("send", "a1", "-", input="from stdin \u00e9\n".encode("utf-8"))
    assert (code, out) == (0, "a1: submitted\n")
    assert orch_cli("wait", "a1", "--timeout", "30")[0] == 0
    assert orch_cli("reply", "a1")[:2] == (0, "reply: from stdin \u00e9\n")

    def told_replies():
        with open(told, encoding="utf-8") as f:
            return [json.loads(line)["reply"] for line in f if line.strip()]
    assert retry_until(lambda: os.path.exists(told) and "reply: from stdin \u00e9" in
                       told_replies(), 30)
    assert orch_cli("notify", "test", "n1")[0] == 0
    assert "n1" in orch_cli("notify", "list")[1] and "sent" in orch_cli("notify", "log")[1]
    assert orch_cli("notify", "rm", "n1")[0] == 0
    code, out, _ = orch_cli("log", "a1")
    assert code == 0 and "> caf\u00e9 \u6f22\u5b57" in out and "\u25cf reply: from stdin" in out
    assert orch_cli("status-line")[:2] == (0, "orch: 1 idle\n")
    feed = subprocess.Popen([cli_python(), ORCH, "events", "--since", "600", "--json"], env=bare,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = feed.stdout.readline().decode("utf-8")     # the feed's first line comes at once
    finally:
        feed.kill()
        assert b"Traceback" not in feed.communicate()[1]
    used.add("events")
    assert json.loads(line)["to"] == "idle"
    assert orch_cli("send", "a1", "ASK \u00e9")[0] == 0
    assert orch_cli("wait", "a1", "--timeout", "30")[:2] == (0, "a1: needs-input (permission)\n")
    assert orch_cli("approve", "a1")[:2] == (0, "a1: approved Bash (touch x)\n")
    assert orch_cli("send", "a1", "ASK again")[0] == 0
    assert orch_cli("wait", "a1", "--timeout", "30")[:2] == (0, "a1: needs-input (permission)\n")
    assert orch_cli("deny", "a1")[0] == 0
    assert orch_cli("kill", "a1")[0] == 0
    assert orch_cli("resume", "a1", "again \u00e9")[0] == 0
    tmux_cmd("kill-server")         # a reboot, then `resume --all` as cron runs it at boot
    code, out, err = orch_cli("resume", "--all")
    assert code == 0 and out.startswith("a1: resumed (claude, tmux, session "), err
    assert orch_cli("doctor")[0] == 0
    assert orch_cli("rm", "a1")[:2] == (0, "removed a1\n")
    # A worktree agent, and git's output read as the UTF-8 it is.
    assert orch_cli("spawn", "w1", "--worktree", "--cwd", repo.repo, "--cmd",
                    "printf 'caf\\303\\251\\n' > caf\u00e9.txt; exec sleep 1000")[0] == 0
    path = json.loads(orch_cli("list", "--json")[1])[0]["worktree"]
    retry_until(lambda: os.path.exists(os.path.join(path, "caf\u00e9.txt")))
    code, out, _ = orch_cli("diff", "w1")
    assert code == 0 and "+caf\u00e9" in out
    code, _, err = orch_cli("rm", "w1")
    assert code == 1 and "has uncommitted work" in err
    assert orch_cli("rm", "w1", "--force", "--delete-branch")[:2] == (0, "removed w1\n")
    assert env.messages() == ["caf\u00e9 \u6f22\u5b57 \U0001F680 task", "na\u00efve SLOW-20 message",
                              "from stdin \u00e9", "ASK \u00e9", "ASK again", "again \u00e9"]
    # Every verb a user runs is covered here (attach needs a terminal; install has its own test).
    assert set(help_verbs()) - used <= {"attach", "install", "ls"}, set(help_verbs()) - used
    started = env.records("start")[0]["env"]
    assert "UTF-8" in (started.get("LC_ALL") or started.get("LC_CTYPE") or started.get("LANG"))


@pytest.mark.parametrize("case", ["HOME unset", "state folder not made yet", "odd cwd",
                                  "no TERM, short PATH"])
def test_cli_first_run_anywhere(env, tmp_path, case):
    bare = dict(os.environ)
    cwd = env.work
    args = ["spawn", "a1", "first run"]
    if case == "HOME unset":
        del bare["HOME"]
        args += ["--cmd", "cat"]        # claude (and the stand-in) need a HOME
    elif case == "state folder not made yet":
        bare["ORCH_STATE"] = str(tmp_path / "new" / "deeper" / "state.json")
        args.append("--trust")
    elif case == "odd cwd":
        cwd = str(tmp_path / "with space \u00e9\u6f22")
        os.mkdir(cwd)
        write_claude_config(env.home, [cwd])
    else:
        bare.pop("TERM", None)
        bare["PATH"] = "/usr/bin:/bin"
    code, out, err = cli(*args, python=cli_python(), env_extra=None, cwd=cwd, env=bare)
    assert code == 0 and "Traceback" not in err, err
    code, out, err = cli("list", "--json", python=cli_python(), env=bare, cwd=cwd)
    assert code == 0 and json.loads(out)[0]["cwd"] == cwd
    assert cli("rm", "a1", python=cli_python(), env=bare, cwd=cwd)[0] == 0


# ###########################################################################
# tail and attach
# ###########################################################################
# ###########################################################################
# tail and attach
# ###########################################################################

def test_tail_shows_screen_and_last_lines(env, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "send", "a1", "second")[0] == 0
    retry_until(lambda: "reply: second" in run(capsys, "tail", "a1")[1])
    code, out, _ = run(capsys, "tail", "a1", "-n", "2")
    assert code == 0 and out.splitlines() == ["\u25cf reply: second", "\u276f"]


def test_tail_follow_prints_new_lines_until_exit(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    proc = subprocess.Popen([sys.executable, ORCH, "tail", "a1", "-f"], stdout=subprocess.PIPE,
                            universal_newlines=True)
    try:
        run(capsys, "send", "a1", "one")
        run(capsys, "send", "a1", "EXIT-0 two")
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "fake agent ready" in out and "reply: one" in out
    assert out.count("reply: one") == 1


def outer_terminal(env, name, *args):
    """Run a command in a window of a second tmux server that stands in for a terminal."""
    outer = env.socket + "o"
    command = " ".join(orch_quote(a) for a in [sys.executable, ORCH] + list(args))
    subprocess.run(["tmux", "-L", outer, "-f", env.conf, "new-session", "-d", "-s", name,
                    "-x", "120", "-y", "30", "env", "-u", "TMUX", "sh", "-c", command],
                   check=True, env=dict(os.environ))
    return outer


def orch_quote(word):
    import shlex
    return shlex.quote(word)


def test_attach_two_terminals_each_see_their_own_agent(env, capsys):
    assert run(capsys, "spawn", "a1", "alpha task")[0] == 0
    assert run(capsys, "spawn", "a2", "bravo task")[0] == 0
    outer = outer_terminal(env, "t1", "attach", "a1")
    outer_terminal(env, "t2", "attach", "a2")

    def screen(session):
        return subprocess.run(["tmux", "-L", outer, "capture-pane", "-p", "-t", "=%s:" % session],
                              stdout=subprocess.PIPE, universal_newlines=True).stdout
    try:
        retry_until(lambda: "reply: alpha task" in screen("t1"))
        retry_until(lambda: "reply: bravo task" in screen("t2"))
        assert "bravo" not in screen("t1") and "alpha" not in screen("t2")
    finally:
        subprocess.run(["tmux", "-L", outer, "kill-server"])
    # Detached grouped sessions clean themselves up.
    retry_until(lambda: tmux_cmd("list-sessions", "-F", "#{session_name}").split()
                == ["keep", "orch"])


def test_attach_inside_tmux_switches_the_client(env, capsys):
    assert run(capsys, "spawn", "a1", "alpha task")[0] == 0
    outer = env.socket + "o"
    # A terminal attached to the agents' own server, on another session...
    subprocess.run(["tmux", "-L", outer, "-f", env.conf, "new-session", "-d", "-s", "t1",
                    "-x", "120", "-y", "30", "env", "-u", "TMUX", "tmux", "-L", env.socket,
                    "attach", "-t", "=keep"], check=True)

    def screen():
        return subprocess.run(["tmux", "-L", outer, "capture-pane", "-p", "-t", "=t1:"],
                              stdout=subprocess.PIPE, universal_newlines=True).stdout
    try:
        retry_until(lambda: tmux_cmd("list-clients", "-F", "#{session_name}").split() == ["keep"])
        # ...where `orch attach` runs in a window of that session, so $TMUX is set.
        command = " ".join(orch_quote(w) for w in ["env"] + [
            "%s=%s" % (k, os.environ[k]) for k in ("ORCH_STATE", "ORCH_TMUX_SOCKET", "HOME")]
            + [sys.executable, ORCH, "attach", "a1"])
        tmux_cmd("new-window", "-t", "=keep:", command)
        retry_until(lambda: tmux_cmd("list-clients", "-F", "#{session_name}").split()
                    == ["orch"])
        retry_until(lambda: "reply: alpha task" in screen())
        # switch-client reuses the client: no grouped session was made.
        assert sorted(tmux_cmd("list-sessions", "-F", "#{session_name}").split()) \
            == ["keep", "orch"]
    finally:
        subprocess.run(["tmux", "-L", outer, "kill-server"])


def test_attach_unknown_or_gone(env, capsys):
    code, _, err = run(capsys, "attach", "ghost")
    assert code == 1 and "ghost" in err
    assert run(capsys, "spawn", "a1")[0] == 0
    env.stop()
    code, _, err = run(capsys, "attach", "a1")
    assert code == orch.EXIT_NOT_RUNNING and "orch resume a1" in err


# ###########################################################################
# resume and trust
# ###########################################################################

def test_resume_after_kill_server_continues_same_session(env, capsys):
    assert run(capsys, "spawn", "a1", "remember 42")[0] == 0
    sid = env.state()["agents"]["a1"]["session_id"]
    env.stop()
    assert status(capsys, "a1")["status"] == "exited"
    code, out, err = run(capsys, "resume", "a1", "what was the number?")
    assert code == 0, err
    last = env.records("start")[-1]
    assert last["argv"][last["argv"].index("--resume") + 1] == sid
    assert last["cwd"] == env.work and last["name"] == "a1"
    assert env.messages() == ["remember 42", "what was the number?"]
    assert wait_status(capsys, "a1", "idle")["session_id"] == sid


def test_resume_uses_latest_session_id_and_refuses_running(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    code, _, err = run(capsys, "resume", "a1")
    assert code == 1 and "still running" in err
    newer = str(uuid.uuid4())      # claude starts a new session id on /clear
    with open(orch.events_path("a1"), "a") as f:
        f.write(json.dumps({"t": time.time(), "event": "SessionStart", "session_id": newer,
                            "source": "clear"}) + "\n")
    assert status(capsys, "a1")["session_id"] == newer
    run(capsys, "kill", "a1")
    assert run(capsys, "resume", "a1")[0] == 0
    argv = env.records("start")[-1]["argv"]
    assert argv[argv.index("--resume") + 1] == newer
    assert len([r for r in env.records("start")]) == 2


def test_untrusted_folder_needs_input_and_send_refuses(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_TRUST", "1")
    code, out, _ = run(capsys, "spawn", "a1", "task")
    assert code == orch.EXIT_NEEDS_INPUT and "trust" in out
    row = status(capsys, "a1")
    assert (row["status"], row["needs"]) == ("needs-input", "trust")
    code, _, err = run(capsys, "send", "a1", "hello")
    assert code == orch.EXIT_NEEDS_INPUT and "trust" in err
    assert env.messages() == []


def test_api_key_question_stops_spawn_and_approve_answers_it(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_APIKEY", "1")
    code, out, _ = run(capsys, "spawn", "a1", "the task")
    assert code == orch.EXIT_NEEDS_INPUT and out.count("\n") == 1, out
    assert "API-key question \"Do you want to use this API key?\"" in out
    assert "`orch approve a1 --choice N` (1. Yes, 2. No (recommended))" in out
    assert "first message was not typed: orch keeps it" in out
    row = status(capsys, "a1")
    assert (row["status"], row["needs"], row["detail"]) == (
        "needs-input", "api-key", "Do you want to use this API key?")
    assert "needs-input (api-key: Do you want to use this API key?)" in run(capsys, "list")[1]
    assert run(capsys, "wait", "a1", "--timeout", "5")[:2] == (
        0, "a1: needs-input (api-key: Do you want to use this API key?)\n")
    assert "1 needs input" in run(capsys, "status-line")[1]
    feed = subprocess.Popen([sys.executable, ORCH, "events", "a1", "--json", "--since", "600"],
                            stdout=subprocess.PIPE, universal_newlines=True)
    try:
        change = json.loads(next_line(feed_lines(feed)))
        assert (change["to"], change["needs"], change["detail"]) == (
            "needs-input", "api-key", "Do you want to use this API key?")
    finally:
        feed.kill()
        feed.communicate()
    for force in ([], ["--force"]):
        code, _, err = run(capsys, "send", "a1", "typed anyway", *force)
        assert code == orch.EXIT_NEEDS_INPUT and "nothing was typed" in err, err
    assert run(capsys, "approve", "a1")[0] == orch.EXIT_NEEDS_INPUT    # names no choice
    assert env.records("api key") == [] and env.messages() == []
    code, out, err = run(capsys, "approve", "a1", "--choice", "1")
    assert code == 0, err
    assert out == ("a1: picked 1. Yes in the dialog \"Do you want to use this API key?\"\n"
                   "a1: first message submitted\n")
    assert [r["answer"] for r in env.records("api key")] == ["Yes"]
    assert env.messages() == ["the task"]
    assert wait_status(capsys, "a1", "idle")["needs"] is None
    assert run(capsys, "send", "a1", "next")[:2] == (0, "a1: submitted\n")
    code, _, err = run(capsys, "send", "a1", "--kept")      # typed once: nothing kept now
    assert code == orch.EXIT_USAGE and "no first message kept" in err
    assert env.messages() == ["the task", "next"]


def test_a_kept_first_message_goes_once_by_resume_or_send_kept(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_APIKEY", "1")
    assert run(capsys, "spawn", "a1", "/kept task")[0] == orch.EXIT_NEEDS_INPUT
    assert run(capsys, "kill", "a1")[0] == 0
    code, out, _ = run(capsys, "resume", "a1")      # at the same screen again: still kept
    assert code == orch.EXIT_NEEDS_INPUT and "keeps it" in out
    tmux_cmd("send-keys", "-t", env.state()["agents"]["a1"]["tmux"]["pane"], "Up", "Enter")
    assert wait_status(capsys, "a1", "idle")
    code, out, err = run(capsys, "send", "a1", "--kept")   # a person answered it by hand
    assert (code, out) == (0, "a1: submitted\n"), err
    assert env.messages() == ["\\/kept task"]      # escaped at spawn, as every first message
    run(capsys, "kill", "a1")
    code, out, _ = run(capsys, "resume", "a1")      # nothing left to keep
    assert code == orch.EXIT_NEEDS_INPUT and "first message" not in out, out
    code, _, err = run(capsys, "send", "a1", "--kept", "text too")
    assert code == orch.EXIT_USAGE and "only its name" in err
    assert env.messages() == ["\\/kept task"]


def test_spawn_trust_marks_folder_and_keeps_other_keys(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_TRUST", "1")
    config = {"theme": "dark", "numStartups": 7, "projects": {"/other": {"x": [1, 2]}},
              "unicode": "\u00e9"}
    path = os.path.join(env.home, ".claude.json")
    with open(path, "w") as f:
        json.dump(config, f)
    os.chmod(path, 0o640)
    code, _, err = run(capsys, "spawn", "a1", "task", "--trust")
    assert code == 0, err
    assert env.messages() == ["task"]
    with open(path) as f:
        after = json.load(f)
    config["projects"][env.work] = {"hasTrustDialogAccepted": True}
    assert after == config
    assert os.stat(path).st_mode & 0o777 == 0o640


# ###########################################################################
# Fleets: agents that start agents, and `resume --all`
# ###########################################################################

def test_agent_environment_names_its_fleet_even_with_socket_given_by_option(env, capsys,
                                                                             monkeypatch):
    monkeypatch.delenv("ORCH_TMUX_SOCKET")
    monkeypatch.setenv("ORCH_AGENT", "someone-else")
    # What an orchestrator claude's Bash tool has: with it, a claude keeps no transcript.
    monkeypatch.setenv("CLAUDE_CODE_CHILD_SESSION", "1")
    monkeypatch.setenv("CLAUDE_CODE_MESSAGING_TOKEN", "secret")
    # A gemini parent's private home holds its own hooks.
    monkeypatch.setenv("GEMINI_CLI_HOME", orch.gemini_home("boss"))
    assert run(capsys, "spawn", "a1", "hi", "--socket", env.socket, "--session", "crew")[0] == 0
    seen = env.records("start")[0]["env"]
    assert not set(orch.SCRUBBED_ENV) & set(seen) and "GEMINI_CLI_HOME" not in seen
    assert (seen["ORCH_AGENT"], seen["ORCH_STATE"], seen["ORCH_TMUX_SOCKET"],
            seen["ORCH_SESSION"]) == ("a1", os.environ["ORCH_STATE"], env.socket, "crew")


def test_headless_agent_environment_names_its_fleet(headless, capsys):
    assert run(capsys, "spawn", "h1", "hello")[0] == 0
    seen = headless.records("start")[0]["env"]
    assert (seen["ORCH_AGENT"], seen["ORCH_STATE"], seen["ORCH_TMUX_SOCKET"]) == (
        "h1", os.environ["ORCH_STATE"], headless.socket)


def spawn_child_from(env, capsys, parent, child, relative_socket=False):
    """An agent whose own process runs `orch spawn CHILD`, as an orchestrator's Bash tool does."""
    script = os.path.join(env.root, "spawner-%s.sh" % parent)
    with open(script, "w") as f:
        f.write("%s %s spawn %s --cmd 'sleep 600' > %s/%s.out 2>&1\nsleep 600\n"
                % (shlex.quote(sys.executable), shlex.quote(ORCH), child, env.root, parent))
    assert run(capsys, "spawn", parent, "--cmd", "sh " + script)[0] == 0
    retry_until(lambda: child in env.state()["agents"])


def test_spawn_from_inside_an_agent_records_its_parent_and_list_shows_a_tree(env, capsys):
    spawn_child_from(env, capsys, "boss", "kid")
    spawn_child_from(env, capsys, "kid2", "grandkid")
    assert run(capsys, "spawn", "solo", "--cmd", "sleep 600")[0] == 0
    with orch.LockedState() as state:       # kid2 moves under boss, as if boss had started it
        state["agents"]["kid2"]["parent"] = "boss"
    rows = json.loads(run(capsys, "list", "--json")[1])
    assert [(r["name"], r["parent"]) for r in rows] == [
        ("boss", None), ("kid", "boss"), ("kid2", "boss"), ("grandkid", "kid2"), ("solo", None)]
    table = run(capsys, "list")[1].splitlines()
    names = [line[:table[0].index("STATUS")].rstrip() for line in table[1:]]
    assert names == ["boss", " \\_ kid", " \\_ kid2", "     \\_ grandkid", "solo"]


def test_tree_order_survives_loops_and_missing_parents():
    rows = [{"name": "a", "parent": "b"}, {"name": "b", "parent": "a"},
            {"name": "c", "parent": "gone"}, {"name": "d", "parent": "c"},
            {"name": "e", "parent": "e"}]
    placed = [(row["name"], depth) for row, depth in orch.tree_order(rows)]
    assert placed == [("c", 0), ("d", 1), ("e", 0), ("a", 0), ("b", 1)]


def test_bad_parent_or_stopped_field_is_a_record_problem(env, capsys):
    assert run(capsys, "spawn", "a1", "hi")[0] == 0
    assert run(capsys, "spawn", "a2", "hi")[0] == 0
    state = env.state()
    state["agents"]["a1"]["parent"] = 7
    state["agents"]["a2"]["stopped"] = "yes"
    with open(os.environ["ORCH_STATE"], "w") as f:
        json.dump(state, f)
    code, _, err = run(capsys, "list")
    assert code == 1 and "'parent' is 7, not a string" in err and "'stopped' is" in err


def test_kill_of_a_parent_leaves_children_running_and_says_so_kill_tree_stops_all(env, capsys):
    spawn_child_from(env, capsys, "boss", "kid")
    code, out, _ = run(capsys, "kill", "boss")
    assert code == 0 and "still running below it: kid (`orch kill --tree boss`" in out
    assert status(capsys, "kid")["status"] != "exited"
    assert run(capsys, "resume", "boss")[0] == 0
    code, out, _ = run(capsys, "kill", "--tree", "boss")
    assert code == 0 and out.startswith("boss: killed") and "\nkid: killed" in out
    assert [status(capsys, n)["status"] for n in ("boss", "kid")] == ["exited", "exited"]
    assert all(r["stopped"] for r in json.loads(run(capsys, "list", "--json")[1]))


def test_rm_of_a_parent_keeps_its_children_as_top_level_rm_tree_removes_them(env, capsys):
    spawn_child_from(env, capsys, "boss", "kid")
    code, out, _ = run(capsys, "rm", "boss")
    assert code == 0 and "kid had boss as parent and stays, now without one" in out
    assert status(capsys, "kid")["parent"] is None and status(capsys, "kid")["status"] != "exited"
    spawn_child_from(env, capsys, "boss", "kid3")      # a new boss is not kid's parent
    assert status(capsys, "kid")["parent"] is None
    code, out, _ = run(capsys, "rm", "--tree", "boss")
    assert (code, out) == (0, "removed boss\nremoved kid3\n")
    assert list(env.state()["agents"]) == ["kid"]


def test_resume_all_after_a_reboot(env, capsys, tmp_path):
    """Busy or idle, each continues its own session; stopped and /exit-ed ones stay down."""
    gone = tmp_path / "gone"
    gone.mkdir()
    assert run(capsys, "spawn", "idle1", "hello")[0] == 0
    assert run(capsys, "spawn", "busy1", "SLOW-100 long job")[0] == 0
    assert run(capsys, "spawn", "stopped1", "hello")[0] == 0
    assert run(capsys, "spawn", "quit1", "hello")[0] == 0
    assert run(capsys, "spawn", "nofolder", "hello", "--cwd", str(gone))[0] == 0
    assert run(capsys, "spawn", "crashed", "hello")[0] == 0
    assert run(capsys, "kill", "stopped1")[0] == 0
    run(capsys, "send", "quit1", "EXIT-0 bye")
    os.kill(status(capsys, "crashed")["pid"], signal.SIGKILL)      # the OOM killer
    wait_status(capsys, "quit1", "exited")
    wait_status(capsys, "busy1", "working")
    sids = dict((n, a["session_id"]) for n, a in env.state()["agents"].items())
    env.stop()          # the reboot: the tmux server and every agent in it are gone
    os.rmdir(str(gone))
    starts = len(env.records("start"))
    code, out, err = run(capsys, "resume", "--all", "--stagger", "0")
    assert code == 1 and "nofolder's working folder %s is gone" % gone in err, err
    lines = out.splitlines()
    assert "stopped1: stopped with `orch kill`, left stopped" in out
    assert "quit1: ended its own session (prompt_input_exit), left ended" in out
    for name in ("idle1", "busy1", "crashed"):
        assert [l for l in lines if l.startswith(name + ": resumed (")], out
    resumed = env.records("start")[starts:]
    assert sorted((r["name"], r["argv"][r["argv"].index("--resume") + 1]) for r in resumed) == \
        sorted((n, sids[n]) for n in ("idle1", "busy1", "crashed"))
    code, out, _ = run(capsys, "resume", "--all")       # twice: nothing more starts
    assert len(env.records("start")) == starts + 3
    assert code == 1 and out.count("left as it is") == 3


def test_cli_two_resume_all_at_once_start_each_agent_once(env, capsys):
    names = ["a%d" % i for i in range(4)]
    for name in names:
        assert run(capsys, "spawn", name, "hello")[0] == 0
    env.stop()
    starts = len(env.records("start"))
    procs = [subprocess.Popen([cli_python(), ORCH, "resume", "--all", "--stagger", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [code for _, _, code in outs] == [0, 0], outs
    resumed = [r["name"] for r in env.records("start")[starts:]]
    assert sorted(resumed) == names, outs
    said = "".join(out for out, _, _ in outs)
    assert all(said.count("%s: resumed (" % n) == 1 for n in names), said


def test_resume_all_leaves_an_agent_that_ended_with_exit_code_0_in_its_window(env, capsys):
    # Each ends when told: one that exits at once may be gone before spawn looks (busy CPUs).
    assert run(capsys, "spawn", "done", "--cmd", "sh -c 'read line'")[0] == 0
    assert run(capsys, "spawn", "died", "--cmd", "sh -c 'read line; exit 5'")[0] == 0
    assert run(capsys, "send", "done", "go")[0] == 0
    assert run(capsys, "send", "died", "go")[0] == 0
    wait_status(capsys, "done", "exited")
    wait_status(capsys, "died", "exited")
    code, out, err = run(capsys, "resume", "--all", "--stagger", "0")
    assert "done: ended its own session (exit code 0)" in out
    assert "died: resumed (sh -c 'read line; exit 5', tmux)" in out, err


def test_resume_all_waits_for_memory_and_then_says_why_not(env, capsys, monkeypatch):
    assert run(capsys, "spawn", "a1", "hi")[0] == 0
    env.stop()
    if orch.memory_available() is None:
        pytest.skip("this machine's /proc/meminfo has no MemAvailable")
    monkeypatch.setenv("ORCH_MEMORY_WAIT", "0")
    starts = len(env.records("start"))
    code, out, err = run(capsys, "resume", "--all", "--min-free", str(1 << 30))
    assert code == 1 and "agent a1 not resumed: only" in err and "MiB of memory" in out
    assert len(env.records("start")) == starts


def test_resume_usage_errors(env, capsys):
    assert run(capsys, "resume")[0] == orch.EXIT_USAGE
    code, _, err = run(capsys, "resume", "a1", "--all")
    assert code == orch.EXIT_USAGE and "no name or message" in err
    assert run(capsys, "resume", "--all") == (0, "no agents to resume\n", "")


def test_ended_itself_reads_each_kinds_own_last_word(env):
    agent = {"name": "x", "launched": 0}
    exited = {"exit_code": None}
    os.makedirs(orch.agent_dir("x"))

    def last(event):
        with open(orch.events_path("x"), "a") as f:
            f.write(json.dumps(dict(event, t=time.time())) + "\n")
    assert orch.ClaudeKind.ended_itself(agent, {"exit_code": 0}) == "exit code 0"
    last({"event": "SessionEnd", "reason": "other"})      # a signal
    assert orch.ClaudeKind.ended_itself(agent, exited) is None
    assert orch.CodexKind.ended_itself(agent, exited) == "other"    # codex: only on /quit
    assert orch.GeminiKind.ended_itself(agent, exited) is None      # gemini: cannot tell
    last({"event": "SessionEnd", "reason": "prompt_input_exit"})
    assert orch.ClaudeKind.ended_itself(agent, exited) == "prompt_input_exit"
    last({"event": "SessionStart", "source": "resume"})
    assert orch.ClaudeKind.ended_itself(agent, exited) is None
    assert orch.CommandKind.ended_itself(agent, exited) is None


# ###########################################################################
# State safety and bad input
# ###########################################################################

def test_corrupt_state_is_reported_and_never_overwritten(env, capsys):
    path = os.environ["ORCH_STATE"]
    with open(path, "w") as f:
        f.write("{half a file")
    for args in (("list",), ("spawn", "a1"), ("send", "a1", "x")):
        code, out, err = run(capsys, *args)
        assert code == 1 and path in err and "corrupt" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with open(path) as f:
        assert f.read() == "{half a file"


def test_newer_state_is_refused(env, capsys):
    path = os.environ["ORCH_STATE"]
    text = json.dumps({"version": 99, "agents": {}})
    with open(path, "w") as f:
        f.write(text)
    code, _, err = run(capsys, "spawn", "a1")
    assert code == 1 and "newer" in err
    with open(path) as f:
        assert f.read() == text


def test_state_file_is_private(env, capsys):
    assert run(capsys, "spawn", "a1")[0] == 0
    assert os.stat(os.environ["ORCH_STATE"]).st_mode & 0o777 == 0o600
    for folder in (orch.data_dir(), os.path.dirname(orch.agent_dir("a1")), orch.agent_dir("a1")):
        assert os.stat(folder).st_mode & 0o777 == 0o700


def test_cli_thirty_concurrent_spawns_all_recorded(env):
    procs = [subprocess.Popen([cli_python(), ORCH, "spawn", "c%02d" % i, "--cmd", "sleep 1000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(30)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [r for r in results if r[0] != 0] == []
    assert sorted(env.state()["agents"]) == ["c%02d" % i for i in range(30)]
    windows = tmux_cmd("list-windows", "-t", "=orch", "-F", "#{window_name}").split()
    assert sorted(windows) == ["c%02d" % i for i in range(30)]


def cli_python():
    return os.environ.get("ORCH_TEST_PYTHON") or sys.executable


@pytest.mark.parametrize("name", ["bad name", "a.b", "\u00e9t\u00e9", "a:1", "a/b"])
def test_cli_bad_name_is_one_line_exit_2(env, name):
    code, out, err = cli("send", name, "hi", python=cli_python())
    assert code == 2
    assert err.startswith("orch: error: invalid agent name") and len(err.splitlines()) == 1


def test_cli_errors_are_one_line_without_traceback(env, tmp_path):
    py = cli_python()
    code, _, err = cli("tail", "ghost", python=py)
    assert code == 1 and err.startswith("orch: error: no agent named 'ghost'")
    bare = tmp_path / "bin"
    bare.mkdir()
    code, _, err = cli("spawn", "a1", "--cmd", "/bin/sleep 1", python=py,
                       env_extra={"PATH": str(bare)})
    assert code == 1 and "tmux is not installed" in err and "Traceback" not in err
    fake_tmux = bare / "tmux"
    fake_tmux.write_text("#!/bin/sh\necho 'tmux 2.9a'\n")
    fake_tmux.chmod(0o755)
    code, _, err = cli("spawn", "a1", "--cmd", "true", python=py,
                       env_extra={"PATH": str(bare) + ":/usr/bin:/bin"})
    assert code == 1 and "tmux 2.9 is too old" in err


def test_cli_spawn_send_list_kill_rm_round_trip(env):
    py = cli_python()
    code, out, err = cli("spawn", "a1", "hello from " + py, python=py)
    assert code == 0, err
    assert cli("send", "a1", "second", python=py)[:2] == (0, "a1: submitted\n")
    code, out, _ = cli("list", "--json", python=py)
    assert code == 0 and json.loads(out)[0]["name"] == "a1"
    assert cli("kill", "a1", python=py)[0] == 0
    assert cli("rm", "a1", python=py)[:2] == (0, "removed a1\n")
    assert env.messages() == ["hello from " + py, "second"]


def test_cli_unknown_verb(env):
    code, out, err = cli("lst", python=cli_python())
    assert (code, out) == (2, "") and err == "orch: error: unknown verb 'lst': see `orch --help`\n"


def test_cli_version_and_help(env):
    code, out, _ = cli("--version", python=cli_python())
    assert code == 0 and out.strip() == "orch " + orch.__version__
    code, out, _ = cli("--help", python=cli_python())
    assert code == 0 and "examples:" in out and "exit codes:" in out


# ###########################################################################
# Bad input: the reported cases, then a matrix generated from --help
# ###########################################################################

class BytesStdin(object):
    """sys.stdin for run(): bytes on .buffer, as a pipe gives them."""

    def __init__(self, data):
        self.buffer = io.BytesIO(data)

    def read(self):
        return self.buffer.read().decode("utf-8")


def run_bytes(capsys, args, stdin):
    old = sys.stdin
    sys.stdin = BytesStdin(stdin)
    try:
        return run(capsys, *args)
    finally:
        sys.stdin = old


def one_error(err):
    """True when stderr is exactly one `orch: error:` line and no traceback."""
    return (err.startswith("orch: error: ") and err.count("\n") == 1 and err.endswith("\n")
            and "Traceback" not in err)


def test_reported_bad_inputs_end_in_one_line(env, capsys):
    assert run(capsys, "spawn", "a1", "--cmd", "sleep 1000")[0] == 0
    code, _, err = run_bytes(capsys, ["send", "a1", "-"], b"\xff\xfe bad")
    assert code == 2 and one_error(err) and "byte 0xff at offset 0" in err
    code, _, err = run(capsys, "wait", "a1", "--timeout", "-1")
    assert code == 2 and one_error(err) and "'-1'" in err
    code, _, err = run(capsys, "tail", "a1", "-n", "-5")
    assert code == 2 and one_error(err) and "'-5'" in err
    assert run(capsys, "rm", "a1")[0] == 0
    path = os.environ["ORCH_STATE"]
    for text, words in (('{"version":1,"agents":{"x":{}}}', "agent x in %s: missing 'name'" % path),
                        ('{"version":"1","agents":{}}', "format version '1', which no orch")):
        with open(path, "w") as f:
            f.write(text)
        code, _, err = run(capsys, "list")
        assert code == 1 and one_error(err) and words in err, err
        with open(path) as f:
            assert f.read() == text


def test_malformed_record_leaves_the_others_readable_and_the_file_untouched(env, capsys):
    assert run(capsys, "spawn", "good", "--cmd", "sleep 1000")[0] == 0
    state = env.state()
    state["agents"]["bad"] = dict(state["agents"]["good"], name="bad")
    state["agents"]["bad"]["tmux"] = dict(state["agents"]["good"]["tmux"], pid="12")
    text = json.dumps(state)
    with open(os.environ["ORCH_STATE"], "w") as f:
        f.write(text)
    code, out, err = run(capsys, "list", "--json")
    assert code == 1 and [r["name"] for r in json.loads(out)] == ["good"]
    assert one_error(err) and "agent bad in " in err and "'tmux.pid' is \"12\", not int" in err
    assert run(capsys, "tail", "good")[0] == 0
    for args in (("tail", "bad"), ("spawn", "new", "--cmd", "true"), ("rm", "good")):
        code, _, err = run(capsys, *args)
        assert code == 1 and one_error(err) and "agent bad in " in err, (args, err)
    with open(os.environ["ORCH_STATE"]) as f:
        assert f.read() == text


TMUX = {"pane": "%1", "pid": 1, "session": "s", "window": "@1"}


@pytest.mark.parametrize("record, problem", [
    ([], "the record is list, not an object"),
    ({"name": "x", "backend": "tmux", "cwd": "/", "created": True}, "'created' is true, not a number"),
    ({"name": "y", "backend": "tmux", "cwd": "/", "created": 1}, "its name is 'y'"),
    ({"name": "x", "backend": "ssh", "cwd": "/", "created": 1}, "unknown backend 'ssh'"),
    ({"name": "x", "backend": "headless", "cwd": "/", "created": 1}, "missing 'headless'"),
    ({"name": "x", "backend": "headless", "cwd": "/", "created": 1, "headless": {"pid": 1}},
     "missing 'headless.supervisor'"),
    ({"name": "x", "backend": "tmux", "cwd": "/", "created": 1, "worktree": "/w", "tmux": TMUX},
     "'worktree' is not an object"),
    ({"name": "x", "backend": "tmux", "cwd": "/", "created": 1, "tmux": TMUX, "worktree": {
        "repo": "/r", "path": "/w", "branch": "b", "base": "main", "base_commit": "c",
        "new_branch": 1}}, "'worktree.new_branch' is 1, not bool"),
])
def test_record_problems_are_named(record, problem):
    assert orch.record_problem("x", record) == problem


# The matrix: every verb that --help lists, with every kind of bad input that
# applies to it, decided from the verb's own arguments.  A verb added later is
# covered the day it lands.
BAD_NAMES = ["", "a b", "a" * 41, "\u00e9t\u00e9", "a.b", "a\x00b", "\udcff", "x" * 2000000]
BAD_SECONDS = ["-1", "abc", "nan", "inf", "1e99", ""]
BAD_LINES = ["-5", "0", "1.5", "abc", "99999999999"]
BAD_STATES = {
    "truncated": '{"version": 1, "agents": {"x1": {"na',
    "not an object": "[]",
    "version a string": '{"version": "1", "agents": {}}',
    "version a bool": '{"version": true, "agents": {}}',
    "version zero": '{"version": 0, "agents": {}}',
    "newer version": '{"version": 99, "agents": {}}',
    "agents a list": '{"version": 1, "agents": []}',
    "record missing fields": '{"version": 1, "agents": {"x1": {}}}',
    "record a number": '{"version": 1, "agents": {"x1": 7}}',
    "record wrong tmux": '{"version": 1, "agents": {"x1": {"name": "x1", "backend": "tmux", '
                         '"cwd": "/", "created": 1, "tmux": {"pane": 3}}}}',
    "record wrong worktree": '{"version": 1, "agents": {"x1": {"name": "x1", "backend": '
                             '"tmux", "cwd": "/", "created": 1, "tmux": {"pane": "%1", "pid": 1, '
                             '"session": "orch", "window": "@1"}, "worktree": {"path": 3}}}}',
    "not UTF-8": b'{"version": 1, "agents": {"\xff": {}}}',
}
HANG_TMUX = "#!/bin/sh\nexec sleep 1000\n"
# Verbs that touch neither the state file nor tmux: the state and tmux cases do not apply.
STATELESS_VERBS = ("install", "notify")    # they never read the state file


def help_verbs():
    """The verbs `orch --help` lists (hidden internal ones have no help line)."""
    import re
    text = orch.build_parser().format_help()
    return sorted(set(re.findall(r"^    ([a-z][a-z-]*)\s", text, re.M)))


def verb_arguments(verb):
    parser = orch.build_parser(verb)
    sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    return sub.choices[verb]._actions


def base_args(verb, actions, name="x1"):
    """A command line for verb that would be valid but for the one bad input."""
    args = [verb] + (["test"] if verb == "notify" else [])      # a channel's name
    for action in actions:
        if not action.option_strings and action.dest in ("name", "names"):
            args.append(name)
    if verb == "send":
        args.append("hello")
    return args


def matrix_cases(verb):
    """(label, argv, stdin bytes, setup, expected exit code) for one verb."""
    actions = verb_arguments(verb)
    dests = dict((a.dest, a) for a in actions)
    base = base_args(verb, actions)
    cases = []
    if "name" in dests or "names" in dests:
        for bad in BAD_NAMES:
            cases.append(("name %r" % bad[:12], base_args(verb, actions, bad), None, None, 2))
        if verb != "spawn":
            cases.append(("unknown name", base_args(verb, actions, "ghost"), None, None, 1))
    for dest, text_arg in (("message", True), ("prompt", True)):
        if dest in dests:
            args = base_args(verb, actions)[:2] if verb != "send" else ["send", "x1"]
            cases.append(("text not UTF-8", args + ["\udcff\udcfe"], None, None, 2))
            cases.append(("stdin not UTF-8", args + ["-"], b"ok \xc3\x28", None, 2))
            cases.append(("stdin only NUL bytes", args + ["-"], b"\x00\x00", None, 2))
            if verb == "send":
                for empty in ("", "   \n\t", "\x00\x1b[31m"):
                    cases.append(("empty %r" % empty, args + [empty], None, None, 2))
                cases.append(("2 MB to an exited agent", args + ["m" * 2000000], None, None, 3))
    for action in actions:
        flag = action.option_strings[-1] if action.option_strings else None
        if action.type is orch.SECONDS:
            cases += [("%s %r" % (flag, bad), base + [flag, bad], None, None, 2)
                      for bad in BAD_SECONDS]
        elif action.type is orch.LINES:
            cases += [("%s %r" % (flag, bad), base + [flag, bad], None, None, 2)
                      for bad in BAD_LINES]
        elif flag == "--prompt-file":
            cases += [("prompt file missing", base + [flag, "/nonexistent/p"], None, None, 1),
                      ("prompt file a folder", base + [flag, "/"], None, None, 1),
                      ("prompt file not UTF-8", base + [flag, "BADFILE"], None, None, 2),
                      ("prompt file only NUL bytes", base + [flag, "NULFILE"], None, None, 2)]
            if os.geteuid() != 0:       # root reads any file
                cases.append(("prompt file unreadable", base + [flag, "SECRETFILE"], None, None, 1))
        elif flag == "--cwd":
            cases += [("cwd missing", base + [flag, "/nonexistent/dir"], None, None, 1),
                      ("cwd a file", base + [flag, "BADFILE"], None, None, 1)]
        elif flag == "--prefix":
            cases += [("prefix a file", base + [flag, "BADFILE"], None, None, 1)]
        elif flag == "--worktree":      # the test runs in a folder that is not a repository
            cases += [("worktree outside a repository", base + [flag, "--cmd", "true"], None,
                       None, 1),
                      ("--branch without --worktree", base + ["--branch", "b"], None, None, 2),
                      ("--base without --worktree", base + ["--base", "main"], None, None, 2)]
    if verb in STATELESS_VERBS:
        return cases
    state_args = base if verb != "spawn" else ["spawn", "x2"]
    for label, text in sorted(BAD_STATES.items()):
        cases.append(("state " + label, state_args, None, ("state", text), 1))
    cases.append(("state a dangling symlink", state_args, None, ("symlink", None), 1))
    cases.append(("state a folder", state_args, None, ("folder", None), 1))
    if verb in ("spawn", "resume"):
        cases.append(("claude missing", state_args, None, ("env", "ORCH_CLAUDE=/nonexistent/claude"), 1))
    if verb != "doctor":
        # reply reads files only: x1 has no answer, with or without tmux.
        code = EXIT_NO_ANSWER if verb == "reply" else 1
        cases.append(("tmux missing", state_args + (["--cmd", "true"] if verb == "spawn" else []),
                      None, ("path", None), code))
        cases.append(("tmux hangs", state_args + (["--cmd", "true"] if verb == "spawn" else []),
                      None, ("path", HANG_TMUX), code))
    return cases


EXIT_NO_ANSWER = orch.EXIT_NOT_RUNNING

EXITED_STATE = {"version": 1, "agents": {"x1": {
    "name": "x1", "backend": "tmux", "cwd": "/", "created": 1.0, "session_id": "s1",
    "tmux": {"socket": None, "session": "orch", "pane": "%77", "pid": 1, "window": "@77"}}}}


def run_matrix_case(env, capsys, monkeypatch, case):
    """Run one case in a fresh state; return a description of what went wrong, or None."""
    label, args, stdin, setup, expected = case
    path = os.environ["ORCH_STATE"]
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        os.rmdir(path)
    data = json.dumps(EXITED_STATE).encode()
    with monkeypatch.context() as m:
        kind, value = setup or (None, None)
        if kind == "state":
            data = value if isinstance(value, bytes) else value.encode()
        if kind == "symlink":
            os.symlink("/nonexistent/state.json", path)
        elif kind == "folder":
            os.mkdir(path)
        else:
            with open(path, "wb") as f:
                f.write(data)
        if kind == "env":
            m.setenv(*value.split("=", 1))
        if kind == "path":
            shim = os.path.join(env.root, "shim")
            shutil.rmtree(shim, ignore_errors=True)
            os.mkdir(shim)
            if value:
                with open(os.path.join(shim, "tmux"), "w") as f:
                    f.write(value)
                os.chmod(os.path.join(shim, "tmux"), 0o755)
            m.setenv("PATH", shim + ":" + env.nontmux)
            m.setenv("ORCH_TMUX_TIMEOUT", "0.5")
        before = snapshot(path)
        if stdin is not None:
            code, out, err = run_bytes(capsys, args, stdin)
        else:
            code, out, err = run(capsys, *args)
    problems = []
    if code != expected:
        problems.append("exit %s, not %s" % (code, expected))
    if args[0] == "doctor":
        if "Traceback" in err or (expected and "problem" not in out and not one_error(err)):
            problems.append("doctor said %r / %r" % (out[-200:], err[-200:]))
    elif not one_error(err):
        problems.append("stderr %r" % err[-300:])
    if snapshot(path) != before:
        problems.append("the state file changed")
    return "%s %s: %s" % (args[0], label, "; ".join(problems)) if problems else None


def snapshot(path):
    if os.path.islink(path):
        return ("link", os.readlink(path))
    if os.path.isdir(path):
        return ("folder",)
    with open(path, "rb") as f:
        return f.read()


def test_bad_input_matrix(env, capsys, monkeypatch, tmp_path_factory):
    for name, data in (("BADFILE", b"caf\xe9 latin-1"), ("NULFILE", b"\x00\x00\x00"),
                       ("SECRETFILE", b"secret")):
        with open(os.path.join(env.root, name), "wb") as f:
            f.write(data)
    os.chmod(os.path.join(env.root, "SECRETFILE"), 0)
    env.nontmux = str(tmp_path_factory.mktemp("notmux-matrix"))
    for folder in ("/usr/bin", "/bin"):
        for name in os.listdir(folder):
            target = os.path.join(env.nontmux, name)
            if name != "tmux" and not os.path.lexists(target):
                os.symlink(os.path.join(folder, name), target)
    monkeypatch.chdir(env.root)
    verbs = help_verbs()
    assert {"spawn", "send", "tail", "attach", "list", "wait", "kill", "rm", "resume",
            "doctor", "interrupt"} <= set(verbs)
    cases = [c for verb in verbs for c in matrix_cases(verb)]
    failures = [f for f in (run_matrix_case(env, capsys, monkeypatch, c) for c in cases) if f]
    with capsys.disabled():
        sys.stdout.write("\nbad-input matrix: %d verbs, %d cases, %d failed\n"
                         % (len(verbs), len(cases), len(failures)))
    assert failures == [], "\n".join(failures)


# ###########################################################################
# Faults: SIGKILL half-way, a tmux server that dies, a file-size limit
# ###########################################################################

def live_launches():
    """Names of the agents whose launch script runs in a live pane of the test server."""
    import re
    lines = tmux_cmd("list-panes", "-a", "-F", "#{pane_dead} #{pane_start_command}").splitlines()
    return set(m.group(1) for line in lines if line.startswith("0 ")
               for m in [re.search(r"/agents/([^/]+)/launch\.sh", line)] if m)


def test_fault_sigkill_during_spawn_and_rm_never_tears_or_hides(env):
    import random
    import re
    rng = random.Random(os.getpid())
    path = os.environ["ORCH_STATE"]
    names = ["k%d" % i for i in range(6)]
    runs = killed = 0
    deadline = time.time() + 40
    while runs < 200 and time.time() < deadline:
        before = set(read_state_or_empty()["agents"])
        name = rng.choice(names)
        argv = ["rm", name] if name in before else ["spawn", name, "--cmd", "sleep 1000"]
        proc = subprocess.Popen([sys.executable, ORCH] + argv, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0, 0.3))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed += 1
        runs += 1
        after = set()       # no file yet: the first spawn was killed before saving
        if os.path.exists(path):
            with open(path) as f:
                after = set(json.load(f)["agents"])     # whole JSON: never torn
        assert after in (before, before ^ {name}), (argv, before, after)
    with capsys_disabled():
        sys.stdout.write("\nfault injection: %d spawn/rm runs, %d killed half-way\n"
                         % (runs, killed))
    assert runs >= 50 and killed >= 10
    # Nothing hidden: every running agent is listed or reported as an orphan.
    code, out, err = cli("list", "--json")
    assert code == 0 and "Traceback" not in err
    listed = dict((r["name"], r) for r in json.loads(out))
    orphans = set(re.findall(r"agent (\S+) runs \(pid \d+\) but has no record", err))
    running = live_launches()
    assert running == set(n for n, r in listed.items() if r["status"] != "exited") | orphans
    assert not orphans & set(listed)
    for name in orphans:
        assert cli("rm", name)[0] == 0
    assert live_launches() == running - orphans


def capsys_disabled():
    """Write past pytest's capture (for figures the test output should show)."""
    class Passthrough(object):
        def __enter__(self):
            sys.stdout = sys.__stdout__
        def __exit__(self, *exc):
            sys.stdout.flush()
            sys.stdout = self.saved
    p = Passthrough()
    p.saved = sys.stdout
    return p


KILL_SERVER_SHIM = """#!/bin/sh
# tmux, except that a call naming $KILL_ON first kills the real server.
for word in "$@"; do
  if [ "$word" = "$KILL_ON" ]; then "$REAL_TMUX" -L "$ORCH_TMUX_SOCKET" kill-server; break; fi
done
exec "$REAL_TMUX" "$@"
"""


def test_fault_tmux_server_dies_mid_verb(env, capsys, monkeypatch):
    assert run(capsys, "spawn", "a1")[0] == 0
    shim = os.path.join(env.root, "shim")
    os.mkdir(shim)
    with open(os.path.join(shim, "tmux"), "w") as f:
        f.write(KILL_SERVER_SHIM)
    os.chmod(os.path.join(shim, "tmux"), 0o755)
    monkeypatch.setenv("PATH", shim + ":" + os.environ["PATH"])
    monkeypatch.setenv("REAL_TMUX", env.tmux)
    monkeypatch.setenv("KILL_ON", "load-buffer")        # while send types
    code, out, err = run(capsys, "send", "a1", "hello")
    assert code == orch.EXIT_NOT_RUNNING and one_error(err) and "went away" in err
    assert out == "" and env.messages() == []
    monkeypatch.setenv("KILL_ON", "display-message")    # right after spawn opened the window
    code, out, err = run(capsys, "spawn", "a2")
    assert code == 1 and one_error(err) and "tmux server stopped as it started" in err
    assert out == ""
    monkeypatch.setenv("KILL_ON", "list-panes")         # while list reads the panes
    assert run(capsys, "spawn", "a3", "--cmd", "sleep 1000")[0] == 0
    code, out, err = run(capsys, "list", "--json")
    assert code == 0 and err == ""
    assert [(r["name"], r["status"]) for r in json.loads(out)] == [
        ("a1", "exited"), ("a2", "exited"), ("a3", "exited")]


def test_fault_file_size_limit_keeps_old_state_and_leaves_nothing_running(env):
    import resource
    assert cli("spawn", "keep", "--cmd", "sleep 1000")[0] == 0
    state = env.state()
    state["padding"] = "x" * 300000         # unknown keys are kept: the next save is big
    with open(os.environ["ORCH_STATE"], "w") as f:
        json.dump(state, f)
    with open(os.environ["ORCH_STATE"], "rb") as f:
        before = f.read()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000))
    proc = subprocess.run([sys.executable, ORCH, "spawn", "big", "--cmd", "sleep 1000"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit,
                          universal_newlines=True, timeout=60)
    assert proc.returncode == 1 and one_error(proc.stderr), proc.stderr
    assert "File too large" in proc.stderr and "the file is as it was" in proc.stderr
    with open(os.environ["ORCH_STATE"], "rb") as f:
        assert f.read() == before
    assert live_launches() == {"keep"}
    assert not os.path.exists(orch.agent_dir("big"))
    assert [n for n in os.listdir(env.root) if ".tmp." in n] == []


# ###########################################################################
# Headless backend, with tmux absent from PATH
# ###########################################################################

FAKE_HEADLESS = r"""#!PYTHON
# Stand-in for `claude -p --input-format stream-json --output-format stream-json`.
# Triggers: SLOW-N (turn takes N s), TOOLRUN-N (a tool runs N s: a message
# written meanwhile joins the running turn, as claude does), TOOL (a
# permission denial), HANG (a turn that never ends and prints nothing), EXIT-N.
# Messages written during a turn are joined into one next turn, as claude does.
# FAKE_INIT_DELAY: seconds between taking a message and saying so (claude: ~0.2).
# Logs to $FAKE_LOG/<pid>.jsonl.
import json, os, select, sys, time
args = sys.argv[1:]
session = "none"
for flag in ("--session-id", "--resume"):
    if flag in args:
        session = args[args.index(flag) + 1]
LOG = os.path.join(os.environ["FAKE_LOG"], "%d.jsonl" % os.getpid())

def log(kind, **fields):
    fields.update(kind=kind, t=time.time(), session=session)
    with open(LOG, "a") as f:
        f.write(json.dumps(fields) + "\n")

def out(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")     # compact, like claude
    sys.stdout.flush()

def replay(text):
    out({"type": "user", "message": {"role": "user", "content": text}, "isReplay": True})

log("start", argv=args, env=dict(os.environ), cwd=os.getcwd())
state = {"busy": None, "until": None, "queue": [], "tool": False}

def start(text):
    log("message", text=text)
    time.sleep(float(os.environ.get("FAKE_INIT_DELAY", "0")))
    out({"type": "system", "subtype": "init", "session_id": session, "model": "fake"})
    replay(text)
    words = text.split()
    for w in words:
        if w.startswith("EXIT-"):
            sys.exit(int(w[5:]))
        for trigger in ("SLOW-", "TOOLRUN-"):
            if w.startswith(trigger):
                state.update(busy=text, until=time.time() + float(w[len(trigger):]),
                             tool=trigger == "TOOLRUN-")
                return
    if "HANG" in words:
        state.update(busy=text, until=float("inf"))
        return
    finish(text)

def finish(text):
    denials = []
    if "TOOL" in text.split():
        denials = [{"tool_name": "Bash", "tool_use_id": "t1", "tool_input": {"command": "touch x"}}]
    out({"type": "assistant", "message": {"role": "assistant", "content": [
        {"type": "text", "text": "reply: " + text[:60]}]}})
    out({"type": "result", "subtype": "success", "result": "answer: " + text[:60], "session_id": session,
         "duration_ms": 10, "total_cost_usd": 0.001, "permission_denials": denials})
    log("finished", text=text)
    state.update(busy=None, until=None, tool=False)
    if state["queue"]:
        queued, state["queue"] = state["queue"], []
        start("\n".join(queued))

data, eof = b"", False
fd = sys.stdin.fileno()
while True:
    timeout = None
    if state["busy"] is not None and state["until"] != float("inf"):
        timeout = max(0.0, state["until"] - time.time())
    ready = select.select([fd], [], [], timeout)[0] if not eof else []
    if state["busy"] is not None and time.time() >= (state["until"] or 0):
        finish(state["busy"])
    if eof and state["busy"] is None:
        log("eof")
        sys.exit(0)
    if eof:
        time.sleep(0.05)
        continue
    if not ready:
        continue
    chunk = os.read(fd, 65536)
    if not chunk:
        eof = True
        continue
    data += chunk
    while b"\n" in data:
        line, data = data.split(b"\n", 1)
        msg = json.loads(line.decode("utf-8"))      # a malformed line kills it, as in claude
        if msg.get("type") == "control_request":
            out({"type": "control_response", "response": {
                "subtype": "success", "request_id": msg["request_id"]}})
            if state["busy"] is not None:
                log("interrupted")
                out({"type": "result", "subtype": "error_during_execution", "session_id": session})
                state.update(busy=None, until=None)
        elif msg.get("type") == "user":
            text = msg["message"]["content"]
            if state["tool"]:
                log("message", text=text)
                replay(text)
                state["busy"] += "\n" + text
            elif state["busy"] is not None:
                state["queue"].append(text)
            else:
                start(text)
"""


def hide_tmux(monkeypatch, tmp_path_factory):
    """Set PATH to every program of /usr/local/bin, /usr/bin and /bin but tmux."""
    bin_dir = str(tmp_path_factory.mktemp("notmux"))
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            target = os.path.join(bin_dir, name)
            if name != "tmux" and not os.path.lexists(target):
                os.symlink(os.path.join(folder, name), target)
    monkeypatch.setenv("PATH", bin_dir)
    assert shutil.which("tmux") is None


def kill_headless_agents():
    """Stop what headless tests started, by the pids orch recorded."""
    for agent in read_state_or_empty()["agents"].values():
        for pid in ((agent.get("headless") or {}).get(k) for k in ("pid", "supervisor")):
            try:
                os.kill(pid, signal.SIGKILL)
            except (TypeError, OSError):
                pass


@pytest.fixture
def headless(env, monkeypatch, tmp_path_factory):
    """A world without tmux, with the stand-in for claude -p."""
    hide_tmux(monkeypatch, tmp_path_factory)
    fake = os.path.join(env.root, "fake-claude-p")
    with open(fake, "w") as f:
        f.write(FAKE_HEADLESS.replace("#!PYTHON", "#!" + sys.executable, 1))
    os.chmod(fake, 0o755)
    monkeypatch.setenv("ORCH_CLAUDE", fake)
    yield env
    kill_headless_agents()


def read_state_or_empty():
    try:
        with open(os.environ["ORCH_STATE"]) as f:
            return json.load(f)
    except OSError:
        return {"agents": {}}


def test_headless_is_chosen_without_tmux_and_takes_first_prompt(headless, capsys):
    code, out, err = run(capsys, "spawn", "h1", "first task")
    assert code == 0, err
    assert "headless" in out and "submitted" in out
    assert headless.messages() == ["first task"]
    argv = headless.records("start")[0]["argv"]
    assert argv[:argv.index("--session-id")] == orch.HEADLESS_FLAGS
    row = wait_status(capsys, "h1", "idle")
    assert row["backend"] == "headless" and row["last_prompt"] == "first task"
    assert row["session_id"] == argv[argv.index("--session-id") + 1]


def test_headless_concurrent_large_sends_arrive_intact_once(headless, capsys):
    assert run(capsys, "spawn", "h1")[0] == 0
    messages = ["%d %s" % (i, ("msg-%d \"q\" \\ $(x) \u00e9\n" % i) * 9000) for i in range(6)]
    procs = [subprocess.Popen([sys.executable, ORCH, "send", "h1", "-"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True) for _ in messages]
    results = [p.communicate(m + "x", timeout=120) for p, m in zip(procs, messages)]
    assert [p.returncode for p in procs] == [0] * len(messages), results
    wait_status(capsys, "h1", "idle", timeout=30)
    # Claude joins messages written during a turn: count each in the whole.
    everything = "\n".join(headless.messages())
    assert [everything.count(m + "x") for m in messages] == [1] * len(messages)


def test_headless_idle_only_after_every_message_is_answered(headless, capsys, monkeypatch):
    # The second message is written before claude says it took the first:
    # the first turn's end must not count as the end of the second.
    monkeypatch.setenv("FAKE_INIT_DELAY", "1")
    assert run(capsys, "spawn", "h1")[0] == 0
    first = subprocess.Popen([sys.executable, ORCH, "send", "h1", "SLOW-1 first"],
                             stdout=subprocess.PIPE, universal_newlines=True)
    retry_until(lambda: len(orch.sent_entries("h1")) == 1)
    code, out, _ = run(capsys, "send", "h1", "SLOW-2 second")
    assert (code, out, first.communicate(timeout=30)[0]) == (
        0, "h1: queued\n", "h1: submitted\n")
    assert run(capsys, "wait", "h1", "--timeout", "30")[:2] == (0, "h1: idle\n")
    assert [r["text"] for r in headless.records("finished")] == ["SLOW-1 first", "SLOW-2 second"]


def test_headless_echo_matching():
    # Claude trims a message and joins several with newlines; orch finds its own at the end.
    record = {"sha": orch.prompt_sha("  second one \n"), "chars": len("second one")}
    assert orch.ends_with_message("first\nsecond one", record)
    assert orch.ends_with_message("second one", record)
    assert not orch.ends_with_message("second one\nthird", record)
    assert orch.ends_with_message("anything", {"sha": "x"})     # an older orch's record


def test_headless_message_taken_by_the_running_turn(headless, capsys):
    # While a tool runs, claude hands a new message to the running turn: no new turn starts.
    assert run(capsys, "spawn", "h1", "TOOLRUN-2 build it")[0] == 0
    assert run(capsys, "send", "h1", "also test it")[:2] == (0, "h1: queued\n")
    retry_until(lambda: headless.messages()[-1:] == ["also test it"])
    assert run(capsys, "wait", "h1", "--timeout", "30")[:2] == (0, "h1: idle\n")
    assert [r["text"] for r in headless.records("finished")] == ["TOOLRUN-2 build it\nalso test it"]


def test_headless_status_queue_wait_and_readable_tail(headless, capsys):
    assert run(capsys, "spawn", "h1", "SLOW-2 long job")[0] == 0
    assert status(capsys, "h1")["status"] == "working"
    code, out, _ = run(capsys, "send", "h1", "next one")
    assert (code, out) == (0, "h1: queued\n")
    code, out, _ = run(capsys, "wait", "h1", "--timeout", "30")
    assert (code, out) == (0, "h1: idle\n")
    assert headless.messages() == ["SLOW-2 long job", "next one"]
    assert run(capsys, "reply", "h1")[:2] == (0, "answer: next one\n")
    code, out, _ = run(capsys, "log", "h1", "-n", "3")
    assert (code, out) == (0, "> next one\n\u25cf reply: next one\n\u2714 turn done (0.0s, $0.0010)\n")
    code, out, _ = run(capsys, "tail", "h1")
    assert code == 0 and "> next one" in out and "\u25cf reply: next one" in out
    assert "turn done" in out and not [l for l in out.splitlines() if l.startswith("{")]
    code, out, _ = run(capsys, "tail", "h1", "--raw", "-n", "1")
    assert json.loads(out)["type"] == "result"


def test_headless_denials_are_visible(headless, capsys):
    assert run(capsys, "spawn", "h1", "TOOL please")[0] == 0
    row = wait_status(capsys, "h1", "idle")
    assert row["detail"] == "denied: Bash"
    assert "denied: Bash" in run(capsys, "list")[1]
    out = run(capsys, "tail", "h1")[1]
    assert "permission denied: Bash" in out and "--permission-mode" in out


def test_headless_interrupt_keeps_agent_alive(headless, capsys):
    assert run(capsys, "spawn", "h1", "SLOW-60 forever")[0] == 0
    code, out, _ = run(capsys, "interrupt", "h1")
    assert code == 0 and "was working" in out
    retry_until(lambda: headless.records("interrupted"))
    wait_status(capsys, "h1", "idle")
    assert run(capsys, "send", "h1", "still there?")[:2] == (0, "h1: submitted\n")


def test_headless_kill_closes_stdin_then_resume_continues(headless, capsys):
    assert run(capsys, "spawn", "h1", "hello")[0] == 0
    sid = headless.state()["agents"]["h1"]["session_id"]
    code, out, _ = run(capsys, "kill", "h1")
    assert code == 0 and "exit code 0" in out
    assert headless.records("eof")         # it saw EOF and left by itself
    code, _, err = run(capsys, "send", "h1", "anyone?")
    assert code == orch.EXIT_NOT_RUNNING and "orch resume h1" in err
    code, out, err = run(capsys, "resume", "h1", "again")
    assert code == 0, err
    argv = headless.records("start")[-1]["argv"]
    assert argv[argv.index("--resume") + 1] == sid
    assert headless.records("start")[-1]["cwd"] == headless.work
    assert headless.messages() == ["hello", "again"]
    assert wait_status(capsys, "h1", "idle")["last_prompt"] == "again"
    run(capsys, "kill", "h1")
    assert run(capsys, "resume", "h1", "/not a command")[0] == 0
    assert headless.messages()[-1] == "\\/not a command"


def test_headless_kill_escalates_when_turn_never_ends(headless, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_KILL_GRACE", "0.5")
    assert run(capsys, "spawn", "h1", "HANG")[0] == 0
    code, out, _ = run(capsys, "kill", "h1")
    assert code == 0 and "exit code 143" in out


def test_headless_signal_death_and_silent_flag(headless, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_SILENT_AFTER", "0.5")
    assert run(capsys, "spawn", "h1", "HANG")[0] == 0
    row = retry_until(lambda: status(capsys, "h1")["silent_for"] and status(capsys, "h1"))
    assert row["status"] == "working"
    assert "silent" in run(capsys, "list")[1]
    os.kill(headless.state()["agents"]["h1"]["headless"]["pid"], signal.SIGKILL)
    row = wait_status(capsys, "h1", "exited")
    assert row["exit_code"] == 137 and row["detail"] == "SIGKILL"


def test_headless_dead_or_broken_agent_never_hangs_send(headless, capsys):
    assert run(capsys, "spawn", "h1")[0] == 0
    info = headless.state()["agents"]["h1"]["headless"]
    for pid in (info["supervisor"], info["pid"]):
        os.kill(pid, signal.SIGKILL)
    wait_status(capsys, "h1", "exited")
    code, _, err = run(capsys, "send", "h1", "hello")
    assert code == orch.EXIT_NOT_RUNNING
    assert run(capsys, "spawn", "h2")[0] == 0
    os.unlink(orch.hpath("h2", "fifo"))
    code, _, err = run(capsys, "send", "h2", "hello")
    assert code == orch.EXIT_NOT_RUNNING and "input pipe" in err
    os.unlink(orch.hpath("h2", "log"))
    code, _, err = run(capsys, "tail", "h2")
    assert code == 1 and "log" in err and "Traceback" not in err


def test_headless_attach_sends_typed_lines(headless, capsys):
    assert run(capsys, "spawn", "h1", "first")[0] == 0
    code, out, err = run(capsys, "attach", "h1", stdin="typed line\n\nsecond typed\n")
    assert code == 0 and "Ctrl-D" in err
    assert headless.messages() == ["first", "typed line", "second typed"]
    assert "reply: first" in out


def test_headless_refuses_cmd_and_bad_backend(headless, capsys):
    code, _, err = run(capsys, "spawn", "h1", "--cmd", "/bin/sleep 10", "--backend", "headless")
    assert code == 2 and "--cmd needs the tmux backend" in err
    code, _, err = run(capsys, "spawn", "h1", "--cmd", "/bin/sleep 10")
    assert code == 1 and "tmux is not installed" in err


# ###########################################################################
# Notifications: a real HTTP server on 127.0.0.1 receives them
# ###########################################################################

class Receiver(object):
    """An HTTP server on 127.0.0.1 that records every POST; `fail` answers that status."""

    def __init__(self, port=0):
        self.posts, self.fail = [], None
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                code = receiver.fail or 200
                if code == 200:
                    receiver.posts.append({"path": self.path, "headers": dict(self.headers),
                                           "body": body.decode("utf-8"), "t": time.time()})
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d/hook/secret-token-abcd" % self.port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def events(self):
        return [json.loads(p["body"]) for p in self.posts]


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.stop()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def events_of(receiver, agent, n, timeout=30):
    """The first n events the receiver got for agent, once it has them."""
    def mine():
        found = [e for e in receiver.events() if e["agent"] == agent]
        return found if len(found) >= n else None
    try:
        return retry_until(mine, timeout)
    except AssertionError:
        raise AssertionError("%d events for %s wanted, got %s" % (n, agent, receiver.events()))


def test_notify_channels_are_private_and_never_shown_in_full(env, capsys, receiver):
    code, out, err = run(capsys, "notify", "add", "hook", "--webhook", receiver.url)
    assert code == 0 and "secret-token" not in out and "127.0.0.1 \u2026abcd" in out, err
    code, out, _ = run(capsys, "notify", "add", "phone", "--ntfy", "-", "--on", "done,failed",
                       "--agents", "web-*", stdin="https://ntfy.example/my-secret-topic\n")
    assert code == 0 and "my-secret" not in out
    path = os.path.join(orch.data_dir(), "notify.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    code, out, _ = run(capsys, "notify", "list", "--json")
    rows = json.loads(out)
    assert [(r["name"], r["kind"], r["target"], r["on"], r["agents"]) for r in rows] == [
        ("hook", "webhook", "127.0.0.1 \u2026abcd", ["needs-input", "failed", "exited"], "*"),
        ("phone", "ntfy", "ntfy.example \u2026opic", ["done", "failed"], "web-*")]
    listed = run(capsys, "notify", "list")[1]
    assert "secret" not in listed and "hook" in listed and "phone" in listed
    for bad in (["add", "x", "--webhook", "ftp://h/x"], ["add", "x", "--ntfy", "https://ntfy.sh/"],
                ["add", "x"], ["add", "x", "--webhook", receiver.url, "--exec", "true"],
                ["add", "x", "--exec", "true", "--on", "done,bogus"], ["rm"], ["list", "x"]):
        code, out, err = run(capsys, "notify", *bad)
        assert code == orch.EXIT_USAGE and err.count("\n") == 1 and "secret" not in err, bad
    assert run(capsys, "notify", "add", "hook", "--exec", "true")[0] == orch.EXIT_ERROR
    assert run(capsys, "notify", "rm", "phone") == (0, "removed phone\n", "")
    assert run(capsys, "notify", "rm", "phone")[0] == orch.EXIT_ERROR
    assert [r["name"] for r in json.loads(run(capsys, "notify", "list", "--json")[1])] == ["hook"]


def test_notify_test_says_whether_it_was_delivered(env, capsys, receiver):
    assert run(capsys, "notify", "add", "hook", "--webhook", receiver.url)[0] == 0
    assert run(capsys, "notify", "add", "gone", "--webhook",
               "http://127.0.0.1:%d/x" % free_port())[0] == 0
    code, out, err = run(capsys, "notify", "test", "hook")
    assert code == 0 and "delivered" in out, err
    sample = receiver.events()[0]
    assert set(sample) == {"event", "agent", "host", "status", "detail", "reply", "hint",
                           "time", "late"}
    assert receiver.posts[0]["path"] == "/hook/secret-token-abcd"
    code, out, err = run(capsys, "notify", "test", "gone")
    assert code == orch.EXIT_ERROR and "gone: not delivered" in err
    receiver.fail = 500
    assert run(capsys, "notify", "test", "hook")[0] == orch.EXIT_ERROR
    log = json.loads(run(capsys, "notify", "log", "--json")[1])
    assert [(e["channel"], e["outcome"]) for e in log] == [("hook", "sent"), ("gone", "failed"),
                                                           ("hook", "failed")]
    assert "HTTP 500" in log[-1]["error"]
    found = [f for f in json.loads(run(capsys, "doctor", "--json")[1]) if f["check"] == "notify"]
    assert [f["level"] for f in found] == ["ok", "warning"] and "HTTP 500" in found[1]["message"]
    assert "secret" not in json.dumps(found)


def test_notify_each_transition_once(env, capsys, receiver):
    assert run(capsys, "notify", "add", "hook", "--webhook", receiver.url,
               "--on", "started,needs-input,done,exited")[0] == 0
    assert run(capsys, "spawn", "a1", "SLOW-1 first job")[0] == 0
    started, done = events_of(receiver, "a1", 2)
    assert (started["event"], started["late"]) == ("started", False)
    assert (done["event"], done["reply"], done["hint"]) == ("done", "slow reply done",
                                                            "orch reply a1")
    assert run(capsys, "send", "a1", "ASK may I")[0] == 0
    asked = events_of(receiver, "a1", 3)[2]
    assert (asked["event"], asked["detail"], asked["hint"]) == (
        "needs-input", "Bash", "orch approve a1")
    assert run(capsys, "approve", "a1")[0] == 0
    assert events_of(receiver, "a1", 4)[3]["event"] == "done"
    assert run(capsys, "send", "a1", "EXIT-3 bye")[0] == 0
    gone = events_of(receiver, "a1", 5)[4]
    assert (gone["event"], gone["detail"], gone["hint"]) == ("exited", "exit code 3",
                                                             "orch resume a1")
    assert run(capsys, "resume", "a1")[0] == 0
    assert events_of(receiver, "a1", 6)[5]["event"] == "started"
    assert run(capsys, "kill", "a1")[0] == 0       # stopped on purpose: nobody is told
    assert run(capsys, "spawn", "a2", "hello")[0] == 0
    events_of(receiver, "a2", 2)
    log = retry_until(lambda: [e for e in json.loads(run(capsys, "notify", "log", "--json")[1])
                               if e["outcome"] == "sent"][7:] and
                      json.loads(run(capsys, "notify", "log", "--json")[1]), 10)
    assert len(receiver.posts) == len(log) == 8 and all(e["outcome"] == "sent" for e in log)
    assert [e["event"] for e in receiver.events() if e["agent"] == "a1"] == [
        "started", "done", "needs-input", "done", "exited", "started"]


def test_notify_every_turn_even_two_between_two_looks(env, capsys, receiver):
    assert run(capsys, "notify", "add", "hook", "--webhook", receiver.url,
               "--on", "done,failed")[0] == 0
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    events_of(receiver, "a1", 1)
    with open(os.path.join(orch.data_dir(), "watch.pid")) as f:
        watcher = int(f.read())
    os.kill(watcher, signal.SIGSTOP)        # the watcher looks away (a busy machine)
    try:
        for text in ("second", "APIFAIL-overloaded third", "fourth"):
            assert run(capsys, "send", "a1", text)[0] == 0
            run(capsys, "wait", "a1", "--timeout", "30")
    finally:
        os.kill(watcher, signal.SIGCONT)
    found = events_of(receiver, "a1", 4)
    assert [e["event"] for e in found] == ["done", "done", "failed", "done"]   # in order
    assert [e["detail"][:10] for e in found if e["event"] == "failed"] == ["overloaded"]


def test_notify_ntfy_and_a_command(env, capsys, receiver):
    out_file = os.path.join(env.root, "exec-out")
    command = ("cat > '%s.stdin'; printf '%%s|%%s|%%s' \"$ORCH_EVENT_AGENT\" "
               "\"$ORCH_EVENT_STATUS\" \"$ORCH_EVENT_DETAIL\" > '%s.env'" % (out_file, out_file))
    assert run(capsys, "notify", "add", "phone", "--ntfy", receiver.url.replace("hook", "topic"),
               "--on", "needs-input,done")[0] == 0
    assert run(capsys, "notify", "add", "cmd", "--exec", command, "--on", "done")[0] == 0
    nasty = "$(touch pwned) `touch pwned2` \"dq\" 'sq' ; | &"
    assert run(capsys, "spawn", "a1", nasty)[0] == 0
    post = retry_until(lambda: receiver.posts and receiver.posts[0], 30)
    assert post["headers"]["Title"] == "orch: a1 done"
    assert (post["headers"]["Priority"], post["headers"]["Tags"]) == ("default",
                                                                       "white_check_mark")
    assert post["body"] == "a1 finished its turn: reply: %s \u2014 orch reply a1" % nasty[:53]
    assert retry_until(lambda: os.path.exists(out_file + ".env"), 30)
    with open(out_file + ".stdin") as f:
        event = json.loads(f.read())
    assert (event["event"], event["agent"], event["reply"]) == ("done", "a1",
                                                                 "reply: " + nasty[:53])
    with open(out_file + ".env") as f:
        assert f.read() == "a1|idle|"
    assert run(capsys, "send", "a1", "ASK may I")[0] == 0
    asked = retry_until(lambda: len(receiver.posts) > 1 and receiver.posts[1], 30)
    assert asked["headers"]["Priority"] == "high" and "orch approve a1" in asked["body"]
    assert not [n for n in os.listdir(env.work) + os.listdir(orch.os.path.expanduser("~"))
                if n.startswith("pwned")]


def test_notify_a_command_agent_tells_only_its_exit(env, capsys, receiver):
    assert run(capsys, "notify", "add", "hook", "--webhook", receiver.url,
               "--on", "needs-input,done,exited")[0] == 0
    assert run(capsys, "spawn", "c1", "--cmd", "sh -c 'read line; exit 7'")[0] == 0
    assert run(capsys, "send", "c1", "go")[0] == 0
    gone = events_of(receiver, "c1", 1)[0]
    assert (gone["event"], gone["detail"]) == ("exited", "exit code 7")
    assert run(capsys, "wait", "c1", "--until", "exited", "--timeout", "5")[0] == 0
    assert [e["event"] for e in receiver.events()] == ["exited"]


def test_notify_retried_until_the_server_is_up_and_sent_once(env, capsys):
    port = free_port()
    url = "http://127.0.0.1:%d/hook/secret-token-abcd" % port
    assert run(capsys, "notify", "add", "hook", "--webhook", url, "--on", "done")[0] == 0
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    watch = os.path.join(orch.data_dir(), "watch.json")
    assert retry_until(lambda: (orch.read_json(watch) or {}).get("outbox") and
                       orch.read_json(watch)["outbox"][0].get("error"), 30)
    started = time.time()
    assert run(capsys, "list")[0] == 0 and time.time() - started < 5     # no verb waits
    server = Receiver(port)
    try:
        assert events_of(server, "a1", 1)[0]["event"] == "done"
        log = retry_until(lambda: json.loads(run(capsys, "notify", "log", "--json")[1]), 10)
        assert [(e["outcome"], e["attempts"] > 1) for e in log] == [("sent", True)]
        assert run(capsys, "send", "a1", "again")[0] == 0
        events_of(server, "a1", 2)
        assert [e["event"] for e in server.events()] == ["done", "done"]
    finally:
        server.stop()


def test_notify_twenty_agents_twenty_notifications(env, capsys, receiver):
    assert run(capsys, "notify", "add", "hook", "--webhook", receiver.url, "--on", "done")[0] == 0
    some = Receiver()
    assert run(capsys, "notify", "add", "some", "--webhook", some.url, "--on", "done",
               "--agents", "n0*")[0] == 0
    names = ["n%02d" % i for i in range(20)]
    for name in names:
        assert run(capsys, "spawn", name)[0] == 0
    code, out, err = run(capsys, "send", "--all", "SLOW-2 together")
    assert code == 0, err
    found = retry_until(lambda: len(receiver.posts) >= 20 and receiver.events(), 60)
    assert sorted(e["agent"] for e in found) == names
    assert run(capsys, "wait", "--all", "--timeout", "30")[0] == 0
    try:
        found = retry_until(lambda: len(some.posts) >= 10 and some.events(), 30)
        assert sorted(e["agent"] for e in found) == names[:10]     # only those --agents names
        time.sleep(2)       # ticks after the last turn: none sent again
        assert (len(receiver.posts), len(some.posts)) == (20, 10)
    finally:
        some.stop()


def test_notify_after_a_reboot_late_and_not_twice(env, capsys, receiver):
    assert run(capsys, "notify", "add", "hook", "--webhook", receiver.url,
               "--on", "started,exited,done")[0] == 0
    assert run(capsys, "spawn", "a1", "hello")[0] == 0
    events_of(receiver, "a1", 2)
    # Killed once both are recorded sent (killed between a post and its record, the
    # next watcher sends that one again: at least once).
    retry_until(lambda: len(json.loads(run(capsys, "notify", "log", "--json")[1])) == 2, 10)
    stop_watcher(orch.data_dir())
    reboot()
    assert run(capsys, "resume", "--all")[0] == 0
    found = events_of(receiver, "a1", 4)
    assert [(e["event"], e["late"]) for e in found] == [
        ("started", False), ("done", False), ("exited", True), ("started", False)], [
            (e["event"], e["time"], e["late"], e["status"]) for e in found]
    retry_until(lambda: len(json.loads(run(capsys, "notify", "log", "--json")[1])) == 4, 10)
    stop_watcher(orch.data_dir())       # a killed watcher: the next one sends nothing again
    assert run(capsys, "send", "a1", "more")[0] == 0
    assert events_of(receiver, "a1", 5)[4]["event"] == "done", receiver.events()
    time.sleep(2)
    assert len(receiver.posts) == 5


# ###########################################################################
# A fake Anthropic Messages API, enough for Claude Code to run offline
# ###########################################################################

def limit_seconds(text):
    """N of a LIMIT-N in the user's words (a usage limit resetting in N s), or None."""
    found = re.search(r"\bLIMIT-(\d+)", text)
    return int(found.group(1)) if found else None


def sse(event, data):
    return ("event: %s\ndata: %s\n\n" % (event, json.dumps(data))).encode("utf-8")


# Text blocks claude adds to a user message that the user did not write: reminders,
# the refusal of an interrupted tool, a slash command run in between (/model).
NOT_THE_USERS = ("<system-reminder>", "[Request interrupted", "<command-", "<local-command-")


class FakeAPI(object):
    """Serve /v1/messages on 127.0.0.1; record what each agent really received.

    Trigger words in the user's text shape the reply: SLOW-N waits N seconds
    before answering (a busy agent on demand); TOOL asks for a Bash tool call
    that needs permission (a permission dialog on demand); TOOLRUN-N asks
    for `sleep N` (a tool that runs a while, where the settings allow it);
    TOOLSLOW-N for one that needs permission and then runs N seconds; a word
    that is a key of .commands asks for a Bash call of its command.
    """

    PATH = "/v1/messages"
    # What each answer reports using (its output: 5 tokens), cache reads and writes apart.
    USAGE = {"input_tokens": 10, "cache_read_input_tokens": 100,
             "cache_creation_input_tokens": 20}

    def __init__(self):
        self.requests = []
        self.commands = {}
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
                if not self.path.startswith(api.PATH):
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
                        NOT_THE_USERS):
                    texts.append(block["text"])
            # After an interrupted tool call, the user's next words ride along
            # with the tool's refusal: that request is theirs, not a tool result.
            return "\n".join(texts), tool_result and not texts
        return "", False

    def handle_messages(self, handler, data):
        text, tool_result = self.user_text(data)
        side = ("<session>" in text or "Write the title" in text
                or not data.get("tools") and "Write" in text[:200])
        record = {"text": text, "side": side, "tool_result": tool_result,
                  "history": json.dumps(data.get("messages") or [], ensure_ascii=False),
                  "messages": data.get("messages") or [],
                  "session": handler.headers.get("x-claude-code-session-id"),
                  "time": time.time()}
        with self.lock:
            self.requests.append(record)
            n = len(self.requests)
        reply, tool = "reply %d: ok" % n, None
        # Only the newest words: claude sends an unanswered message again with the next.
        if not side and not tool_result and self.refused(handler, text.rsplit("\n", 1)[-1],
                                                         "anthropic"):
            return
        if not side and not tool_result and "FAIL429" in text.rsplit("\n", 1)[-1]:
            return self.fail(handler, 429, "rate_limit_error",
                             "This request would exceed your rate limit",
                             {"retry-after": "1", "anthropic-ratelimit-unified-status": "rejected",
                              "anthropic-ratelimit-unified-reset": str(int(time.time()) + 3600)})
        limit = limit_seconds(text.rsplit("\n", 1)[-1]) if not side and not tool_result else None
        if limit is not None:       # a claude.ai subscription's usage limit, resetting in N s
            resets = str(int(time.time()) + limit)
            return self.fail(handler, 429, "rate_limit_error",
                             "This request would exceed your rate limit",
                             {"retry-after": str(limit),
                              "anthropic-ratelimit-unified-status": "rejected",
                              "anthropic-ratelimit-unified-reset": resets,
                              "anthropic-ratelimit-unified-5h-status": "rejected",
                              "anthropic-ratelimit-unified-5h-reset": resets,
                              "anthropic-ratelimit-unified-5h-utilization": "1.0",
                              "anthropic-ratelimit-unified-representative-claim": "five_hour"})
        if not side and not tool_result:
            if "TOOL" in text:
                tool = {"command": "touch orch-tool-ran-%d" % n, "description": "make a file"}
            for word in text.split():
                if word.startswith("TOOLRUN-") and word[8:].isdigit():
                    tool = {"command": "sleep %s" % word[8:], "description": "take a while"}
                if word.startswith("TOOLSLOW-") and word[9:].isdigit():     # asks, then runs a while
                    tool = {"command": "touch orch-tool-ran-%d && sleep %s" % (n, word[9:]),
                            "description": "make a file slowly"}
                if word in self.commands:
                    tool = {"command": self.commands[word], "description": "run a command"}
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

    @staticmethod
    def fail(handler, code, kind, message, headers, openai=False, google=False):
        """Answer as Anthropic's API (OpenAI's, Google's) does when it refuses: body, headers."""
        body = {"error": {"message": message, "type": kind, "param": None,
                          "code": "rate_limit_exceeded"}} if openai else {
            "error": {"code": code, "message": message, "status": kind}} if google else {
            "type": "error", "error": {"type": kind, "message": message},
            "request_id": "req_orch_test"}
        FakeAPI.send_json(handler, code, body, headers)

    # FAIL401 and FAIL529 in the user's words: a refused key, an overloaded API, as each
    # vendor's API answers them (Google answers a bad key with 400 API_KEY_INVALID).
    REFUSALS = {
        ("FAIL401", "anthropic"): (401, {"type": "error", "request_id": "req_orch_test", "error": {
            "type": "authentication_error", "message": "invalid x-api-key"}}),
        ("FAIL529", "anthropic"): (529, {"type": "error", "request_id": "req_orch_test", "error": {
            "type": "overloaded_error", "message": "Overloaded"}}),
        ("FAIL401", "openai"): (401, {"error": {
            "message": "Incorrect API key provided: orch-e2e*key. You can find your API key at "
                       "https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}),
        ("FAIL529", "openai"): (503, {"error": {
            "message": "The server is overloaded or not ready yet.", "type": "server_error",
            "param": None, "code": None}}),
        ("FAIL401", "google"): (400, {"error": {
            "code": 400, "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT", "details": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com", "metadata": {
                    "service": "generativelanguage.googleapis.com"}}]}}),
        ("FAIL529", "google"): (503, {"error": {
            "code": 503, "message": "The model is overloaded. Please try again later.",
            "status": "UNAVAILABLE"}}),
    }

    @staticmethod
    def refused(handler, text, vendor):
        """True once it answered as the vendor's API refuses, where text asks for it."""
        for (word, whose), (code, body) in FakeAPI.REFUSALS.items():
            if whose == vendor and re.search(r"\b%s\b" % word, text):
                FakeAPI.send_json(handler, code, body)
                return True
        return False

    @staticmethod
    def openai_429(handler, text):
        """OpenAI's 429 for too many requests: retry after 1 s, or N s for FAIL429-N."""
        later = re.search(r"\bFAIL429-(\d+)", text)
        FakeAPI.fail(handler, 429, "requests", "Rate limit reached for requests",
                     {"retry-after": later.group(1) if later else "1",
                      "x-ratelimit-remaining-requests": "0"}, openai=True)

    @staticmethod
    def send_json(handler, code, body, headers=None):
        payload = json.dumps(body).encode("utf-8")
        handler.send_response(code)
        for key, value in dict(headers or {}, **{"Content-Type": "application/json",
                                                 "Content-Length": str(len(payload))}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(payload)

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
            "usage": dict(self.USAGE, output_tokens=1)}}))
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

    def command_in(self, text, n):
        """The shell command the user's words ask a tool to run (codex, gemini), or None."""
        for word in text.split():
            if word in self.commands:
                return self.commands[word]
        return "touch orch-tool-ran-%d" % n if "TOOL" in text else None

    def conversation(self, session):
        """Every text the user wrote, from the latest request of this session.

        Claude may merge messages queued during a turn into one request, so
        "arrived exactly once" is judged on the whole conversation it sends.
        """
        with self.lock:
            found = [r for r in self.requests if not r["side"] and r["session"] == session]
        texts = []
        for message in (found[-1]["messages"] if found else []):
            if message.get("role") != "user":
                continue
            content = message.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for block in blocks or []:
                text = block.get("text", "") if block.get("type") == "text" else ""
                if text and not text.startswith(NOT_THE_USERS):
                    texts.append(text)
        return texts

    def texts(self, session=None):
        """What the agent's user typed, in order, side requests and tool results left out.

        Claude Code 2.1.330+ wraps a long or many-line paste in <pasted_content>
        tags for the model; the user's words are what is inside.
        """
        with self.lock:
            found = [r for r in self.requests if not r["side"] and not r["tool_result"]
                     and (session is None or r["session"] == session)]
        # Claude re-sends the conversation on each request; a text counts once per turn.
        return [pasted_words(r["text"]) for r in found]

    def wrapped(self):
        """How many of the user's texts claude delivered in its paste wrapper."""
        with self.lock:
            return len([r for r in self.requests if "<pasted_content id=" in r["text"]
                        and not r["side"]])


def pasted_words(text):
    """The text with claude's paste wrappers (and the blank lines they add) taken off."""
    import re
    inner = re.sub(r'\n*<pasted_content id="([^"]*)">\n(.*?)\n</pasted_content id="\1">\n?',
                   lambda m: m.group(2), text, flags=re.S)
    return inner


# ###########################################################################
# End to end: the real Claude Code CLI against the fake API (make e2e)
# ###########################################################################

E2E_KEY = "sk-ant-orch-e2e-0123456789abcdefghij"


@pytest.fixture
def claude(env, monkeypatch):
    """The real claude, offline: private HOME with onboarding done, the work folder trusted."""
    binary = os.environ.get("ORCH_E2E_CLAUDE")
    if binary is None:
        pytest.skip("needs the real claude: run `make e2e`, which installs it and sets "
                    "ORCH_E2E_CLAUDE")
    if not os.access(binary, os.X_OK):
        pytest.fail("ORCH_E2E_CLAUDE=%s is not an executable claude" % binary)
    api = FakeAPI().start()
    for key, value in {"ORCH_CLAUDE": binary, "ANTHROPIC_BASE_URL": api.url,
                       "ANTHROPIC_API_KEY": E2E_KEY, "DISABLE_AUTOUPDATER": "1",
                       "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}.items():
        monkeypatch.setenv(key, value)
    write_claude_config(env.home, [env.work])
    env.api = api
    env.version = claude_version(binary)
    yield env
    env.stop()
    api.stop()


def claude_version(binary):
    """(2, 1, 330) from `2.1.330 (Claude Code)`."""
    import re
    out = subprocess.run([binary, "--version"], stdout=subprocess.PIPE, universal_newlines=True,
                         timeout=30).stdout
    return tuple(int(n) for n in re.match(r"(\d+)\.(\d+)\.(\d+)", out).groups())


# The mode that asks before each tool: 2.1.330 calls it "manual" and starts in
# "auto" (no dialog); "default" is the name on 2.1.197 and still accepted.
ASK_FIRST = ["--", "--permission-mode", "default"]


def write_claude_config(home, trusted, extra=None):
    config = {"hasCompletedOnboarding": True, "theme": "dark",
              "projects": dict((d, {"hasTrustDialogAccepted": True}) for d in trusted),
              "customApiKeyResponses": {"approved": [E2E_KEY[-20:]], "rejected": []}}
    config.update(extra or {})
    with open(os.path.join(home, ".claude.json"), "w") as f:
        json.dump(config, f)
    return config


def sid_of(name):
    with open(os.environ["ORCH_STATE"]) as f:
        return json.load(f)["agents"][name]["session_id"]


def test_e2e_spawn_huge_prompt_arrives_exactly_with_session_id(claude, capsys):
    unit = "q'uote \"dq\" $(touch pwned) `touch pwned2`; & | > x \\ \u00e9\u6f22\U0001F600\n"
    prompt = (unit * (102400 // len(unit.encode("utf-8")) + 1)).rstrip("\n")
    code, out, err = run(capsys, "spawn", "big", "-", stdin=prompt)
    assert code == 0, err
    assert retry_until(lambda: claude.api.texts(sid_of("big"))) == [prompt]
    assert not [n for n in os.listdir(claude.work) if n.startswith("pwned")]


def test_e2e_send_hard_messages_each_arrive_once_in_order(claude, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    messages = ["it's \"quoted\" and 'single'", "$(touch pwned) `touch pwned2` ${HOME}",
                "ends with a semicolon;", "line one\nline two\n\nline four",
                "unicode \u00e9\u00e8 \u6f22\u5b57 \U0001F680", "Enter C-m \\; Escape",
                "y" * 10240, "/compact is not run", "!touch pwned3"]
    for message in messages:
        assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
        code, out, err = run(capsys, "send", "a1", message)
        assert (code, out) == (0, "a1: submitted\n"), (message[:40], err,
                                                       run(capsys, "tail", "a1", "-n", "15")[1])
    code, out, err = run(capsys, "send", "a1", "-", stdin="from stdin\n")
    assert (code, out) == (0, "a1: submitted\n"), err
    expected = ["first"] + messages[:-2] + ["\\/compact is not run", "\\!touch pwned3",
                                            "from stdin"]
    assert retry_until(lambda: len(claude.api.texts()) >= len(expected) and claude.api.texts()) \
        == expected
    assert not [n for n in os.listdir(claude.work) if n.startswith("pwned")]


def test_e2e_leading_space_before_a_slash(claude, capsys):
    # Why orch escapes a leading "/" with a backslash: on 2.1.330 a space is not enough.
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
    code, _, _ = run(capsys, "send", "a1", "--raw", "--timeout", "3", " /cost is it text?")
    if claude.version >= (2, 1, 330):
        # Ran as /cost: no prompt in the 3 s send waited, none at the API.
        assert code == orch.EXIT_UNCONFIRMED and claude.api.texts() == ["first"]
    elif claude.version <= (2, 1, 197):
        assert code == 0
        assert retry_until(lambda: claude.api.texts()[1:]) == [" /cost is it text?"]


def test_e2e_tail_and_attach_show_the_agent(claude, capsys):
    assert run(capsys, "spawn", "a1", "hello")[0] == 0
    retry_until(lambda: "reply 1: ok" in run(capsys, "tail", "a1")[1]
                or "reply 2: ok" in run(capsys, "tail", "a1")[1])
    outer = outer_terminal(claude, "t1", "attach", "a1")
    try:
        retry_until(lambda: "hello" in subprocess.run(
            ["tmux", "-L", outer, "capture-pane", "-p", "-t", "=t1:"],
            stdout=subprocess.PIPE, universal_newlines=True).stdout)
    finally:
        subprocess.run(["tmux", "-L", outer, "kill-server"])


def test_e2e_status_working_idle_queued_and_wait(claude, capsys):
    # 2.1.197 reports a queued message when its turn starts; 2.1.330 at once, and
    # then starts its turn with no hook: both must read "queued", then "working"
    # until the queued turn's reply, which the fake API makes take 3 s.
    assert run(capsys, "spawn", "a1", "SLOW-5 think hard")[0] == 0
    assert status(capsys, "a1")["status"] == "working"
    code, out, err = run(capsys, "send", "a1", "SLOW-3 then this")
    assert (code, out) == (0, "a1: queued\n"), err
    code, out, _ = run(capsys, "wait", "a1", "--timeout", "60")
    returned = time.time()
    assert (code, out) == (0, "a1: idle\n")
    assert claude.api.texts() == ["SLOW-5 think hard", "SLOW-3 then this"]
    with claude.api.lock:
        queued_turn = [r for r in claude.api.requests if r["text"] == "SLOW-3 then this"][0]
    assert returned >= queued_turn["time"] + 3
    assert status(capsys, "a1")["last_prompt"] == "SLOW-3 then this"


def test_e2e_long_and_many_line_messages_confirmed_once(claude, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    long_one = " ".join(["six kilobytes of words"] * 280)
    lines = "\n".join("line %d of ten" % i for i in range(10))
    for message in (long_one, lines):
        assert run(capsys, "wait", "a1", "--timeout", "30")[0] == 0
        code, out, err = run(capsys, "send", "a1", message)
        assert (code, out) == (0, "a1: submitted\n"), err
    assert retry_until(lambda: len(claude.api.texts()) == 3 and claude.api.texts()) \
        == ["first", long_one, lines]
    # The difference itself: 2.1.330 hands both to the model in its paste wrapper.
    if claude.version >= (2, 1, 330):
        assert claude.api.wrapped() == 2
    elif claude.version <= (2, 1, 197):
        assert claude.api.wrapped() == 0


def test_e2e_permission_mode_and_pid_in_list(claude, capsys):
    assert run(capsys, "spawn", "plain", "hello")[0] == 0
    assert run(capsys, "spawn", "edits", "hello", "--", "--permission-mode", "acceptEdits")[0] == 0
    plain, edits = wait_status(capsys, "plain", "idle"), wait_status(capsys, "edits", "idle")
    assert edits["permission_mode"] == "acceptEdits"
    # The difference: 2.1.330's TUI starts in auto mode (tools run unasked).
    if claude.version >= (2, 1, 330):
        assert plain["permission_mode"] == "auto"
        assert "auto" in [line.split()[5] for line in run(capsys, "list")[1].splitlines()]
    elif claude.version <= (2, 1, 197):
        assert plain["permission_mode"] == "default"
    for row in (plain, edits):
        assert os.readlink("/proc/%d/exe" % row["pid"]).endswith("claude.exe")
    run(capsys, "kill", "plain")
    assert status(capsys, "plain")["pid"] is None


def control_byte_round_trip(capsys, name):
    """Send messages carrying terminal controls; return what each send printed."""
    outs = []
    for message in ("\x1b[201~\x03\x03!touch pwned\rand more",
                    "\x1b[1;31merror\x1b[0m: fix \x1b[32mthis\x1b[0m"):
        assert run(capsys, "wait", name, "--timeout", "30")[0] == 0
        code, out, err = run(capsys, "send", name, message)
        assert (code, out) == (0, "%s: submitted\n" % name), err
        outs.append(err)
    assert run(capsys, "wait", name, "--timeout", "30")[0] == 0
    assert status(capsys, name)["status"] == "idle"
    return outs


def test_e2e_control_bytes_never_act_as_keys(claude, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    notes = control_byte_round_trip(capsys, "a1")
    assert "removed 1 terminal escape sequence and 2 control characters" in notes[0]
    assert claude.api.texts() == ["first", "\\!touch pwned\nand more", "error: fix this"]
    assert not os.path.exists(os.path.join(claude.work, "pwned"))


def test_e2e_permission_dialog_refuses_send_and_escape_returns_idle(claude, capsys):
    assert run(capsys, "spawn", "a1", "TOOL please", *ASK_FIRST)[0] == 0
    row = wait_status(capsys, "a1", "needs-input")
    assert (row["needs"], row["detail"], row["permission_mode"]) == ("permission", "Bash", "default")
    # "No" is option 3 on 2.1.197 and option 4 on 2.1.330: never press a digit blindly.
    # (The status can turn needs-input a moment before the dialog is drawn.)
    no = retry_until(lambda: [l.split()[-2] for l in run(capsys, "tail", "a1")[1].splitlines()
                              if l.strip().endswith(". No")])
    if claude.version >= (2, 1, 330):
        assert no == ["4."]
    elif claude.version <= (2, 1, 197):
        assert no == ["3."]
    # Claude's reminder 6 s into the dialog names no tool: the tool stays known.
    retry_until(lambda: '"Notification"' in open(orch.events_path("a1")).read(), 20)
    assert status(capsys, "a1")["detail"] == "Bash"
    code, _, err = run(capsys, "send", "a1", "yes do it")
    assert code == orch.EXIT_NEEDS_INPUT and "Bash" in err
    tmux_cmd("send-keys", "-t", claude.state()["agents"]["a1"]["tmux"]["pane"], "Escape")
    wait_status(capsys, "a1", "idle")
    assert not [n for n in os.listdir(claude.work) if n.startswith("orch-tool-ran")]
    assert "yes do it" not in claude.api.texts()
    assert run(capsys, "send", "a1", "after escape")[0] == 0
    retry_until(lambda: "after escape" in "".join(claude.api.texts()[-1:]))
    assert claude.api.texts()[-1:] == ["after escape"]


def tools_ran(claude):
    """(files the fake API's tool calls made, tool results claude sent back)."""
    with claude.api.lock:
        results = len([r for r in claude.api.requests if r["tool_result"]])
    return len([n for n in os.listdir(claude.work) if n.startswith("orch-tool-ran")]), results


def test_e2e_approve_runs_the_tool_once_and_deny_never(claude, capsys):
    assert run(capsys, "spawn", "a1", "TOOL please", *ASK_FIRST)[0] == 0
    wait_status(capsys, "a1", "needs-input")
    code, out, err = run(capsys, "approve", "a1", "--tool", "Bash")
    assert code == 0 and out.startswith("a1: approved Bash (touch orch-tool-ran-"), err
    wait_status(capsys, "a1", "idle")
    assert tools_ran(claude) == (1, 1)
    assert run(capsys, "send", "a1", "TOOL again")[0] == 0
    wait_status(capsys, "a1", "needs-input")
    code, out, err = run(capsys, "deny", "a1")
    assert code == 0 and "a1: denied Bash (touch orch-tool-ran-" in out, err
    wait_status(capsys, "a1", "idle")
    assert run(capsys, "send", "a1", "after deny")[0] == 0
    retry_until(lambda: claude.api.texts()[-1:] == ["after deny"])
    assert tools_ran(claude) == (1, 1)          # the refusal rides with "after deny"
    # An approved tool that runs a while: working (claude's own file), not needs-input.
    wait_status(capsys, "a1", "idle")
    assert run(capsys, "send", "a1", "TOOLSLOW-4 slowly")[0] == 0
    wait_status(capsys, "a1", "needs-input")
    assert run(capsys, "approve", "a1")[0] == 0
    row = wait_status(capsys, "a1", "working")
    assert (row["needs"], row["status_source"]) == (None, "claude-status")
    wait_status(capsys, "a1", "idle", timeout=60)
    assert tools_ran(claude) == (2, 2)
    assert run(capsys, "approve", "a1")[0] == orch.EXIT_NEEDS_INPUT


def test_e2e_worktree_agent_writes_only_in_its_own_checkout(claude, repo, capsys):
    write_claude_config(claude.home, [claude.work, repo.repo])
    code, out, err = run(capsys, "spawn", "w1", "TOOL please", "--worktree", "--cwd",
                         os.path.join(repo.repo, "src"), *ASK_FIRST)
    assert code == 0, out + err         # trusted as its checkout is: no trust dialog
    wait_status(capsys, "w1", "needs-input")
    assert run(capsys, "approve", "w1", "--tool", "Bash")[0] == 0
    row = wait_status(capsys, "w1", "idle")
    made = [n for n in os.listdir(row["cwd"]) if n.startswith("orch-tool-ran-")]
    assert len(made) == 1 and row["dirty"] is True and row["branch"] == "orch/w1"
    code, out, _ = cli("diff", "w1", "--stat")
    assert code == 0 and "src/%s" % made[0] in out and "1 file changed" in out, out
    assert not os.path.exists(os.path.join(repo.repo, "src", made[0]))
    assert git_out(repo.repo, "status", "--porcelain", "--untracked-files=all") == ""
    code, _, err = run(capsys, "rm", "w1")
    assert code == 1 and made[0] in err and status(capsys, "w1")["status"] == "idle"
    assert run(capsys, "rm", "w1", "--force", "--delete-branch")[0] == 0
    assert not os.path.exists(row["worktree"]) and "orch/w1" not in git_out(repo.repo, "branch")


def test_e2e_round_trip_on_a_remote_host(claude, monkeypatch):
    world = Hosts(claude, ["h1"], {
        "ORCH_CLAUDE": os.environ["ORCH_CLAUDE"], "ANTHROPIC_BASE_URL": claude.api.url,
        "ANTHROPIC_API_KEY": E2E_KEY, "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
    monkeypatch.setenv("ORCH_SSH_CONFIG", world.config)
    try:
        code, out, err = cli("spawn", "r1@h1", "hello from afar", "--cwd", claude.work)
        assert code == 0 and "started agent r1 (claude, tmux" in out, out + err
        retry_until(lambda: "hello from afar" in claude.api.texts())
        assert cli("wait", "r1@h1", "--timeout", "60")[:2] == (0, "r1: idle\n")
        assert cli("send", "r1@h1", "SLOW-2 and more")[:2] == (0, "r1: submitted\n")
        assert world.state("h1")["agents"]["r1"]["cwd"] == claude.work
        assert cli("wait", "r1@h1", "--timeout", "60")[:2] == (0, "r1: idle\n")
        assert claude.api.texts()[-1] == "SLOW-2 and more"
        code, out, _ = cli("tail", "r1@h1")
        assert code == 0 and "and more" in out
        assert cli("rm", "r1@h1")[:2] == (0, "removed r1\n")
    finally:
        world.stop()


def sign_in_warning(capsys, cli="claude"):
    """doctor's sign-in warning (level, message) about one CLI, or None."""
    found = [f for f in json.loads(run(capsys, "doctor", "--json")[1]) if f["check"] == "sign-in"
             and f["message"].startswith(cli + " ")]
    assert len(found) <= 1, found
    return (found[0]["level"], found[0]["message"]) if found else None


def spawn_at_first_screen(capsys, name, args, needs, question):
    """Spawn an agent that stops at a first-run screen; return spawn's line.

    Exit 4 with one line quoting the question, the first message kept;
    `list` says needs-input with the screen's name and question; a send is
    refused, with --force too, and types nothing.
    """
    code, out, err = run(capsys, "spawn", name, *args)
    assert code == orch.EXIT_NEEDS_INPUT and out.count("\n") == 1, (out, err)
    assert json.dumps(question) in out and "its first message was not typed: orch keeps it" in out
    row = status(capsys, name)
    assert (row["status"], row["needs"], row["detail"]) == ("needs-input", needs, question)
    for force in ([], ["--force"]):
        code, _, err = run(capsys, "send", name, "typed anyway", *force)
        assert code == orch.EXIT_NEEDS_INPUT and "nothing was typed" in err, err
    assert "typed anyway" not in run(capsys, "tail", name)[1]
    return out


def test_e2e_api_key_question_first_contact(claude, capsys):
    # A new user's first screen: claude never asked about the key in the environment.
    write_claude_config(claude.home, [claude.work],
                        {"customApiKeyResponses": {"approved": [], "rejected": []}})
    level, message = sign_in_warning(capsys)
    assert level == "warning" and "Do you want to use this API key?" in message
    assert E2E_KEY[:-4] not in message and E2E_KEY[-4:] in message
    out = spawn_at_first_screen(capsys, "k1", ["first words"], "api-key",
                                "Do you want to use this API key?")
    assert "claude's API-key question" in out
    assert "`orch approve k1 --choice N` (1. Yes, 2. No (recommended))" in out
    assert claude.api.texts() == []
    code, out, err = run(capsys, "approve", "k1", "--choice", "1")
    assert code == 0 and "picked 1. Yes" in out and "k1: first message submitted" in out, (out, err)
    assert retry_until(lambda: claude.api.texts()) == ["first words"]
    assert run(capsys, "wait", "k1", "--timeout", "60")[:2] == (0, "k1: idle\n")
    assert run(capsys, "send", "k1", "and then")[:2] == (0, "k1: submitted\n")
    assert retry_until(lambda: claude.api.texts()[1:]) == ["and then"]
    assert sign_in_warning(capsys) is None      # claude recorded the answer itself
    # Stopped at the question and then killed: resume starts it afresh (claude keeps
    # no conversation before one), at the same question, the message still kept.
    write_claude_config(claude.home, [claude.work],
                        {"customApiKeyResponses": {"approved": [], "rejected": []}})
    assert run(capsys, "spawn", "k2", "second agent's words")[0] == orch.EXIT_NEEDS_INPUT
    assert run(capsys, "kill", "k2")[0] == 0
    code, out, err = run(capsys, "resume", "k2")
    assert code == orch.EXIT_NEEDS_INPUT and "orch keeps it" in out, (out, err)
    code, out, err = run(capsys, "approve", "k2", "--choice", "1")
    assert code == 0 and "k2: first message submitted" in out, (out, err)
    assert retry_until(lambda: claude.api.texts(sid_of("k2"))) == ["second agent's words"]


def test_e2e_a_turn_that_ends_on_a_429_is_not_done(claude, capsys, monkeypatch, receiver):
    monkeypatch.setenv("CLAUDE_CODE_MAX_RETRIES", "4")     # gives up after ~8 s of retries
    assert run(capsys, "notify", "add", "hook", "--webhook", receiver.url, "--on", "failed")[0] == 0
    assert run(capsys, "spawn", "f1", "first words")[0] == 0
    assert run(capsys, "wait", "f1", "--timeout", "60")[0] == 0
    # While it retries: working, and the detail says so (its screen does; no hook).
    row = failed_turn(capsys, "f1", "FAIL429 second words", "rate_limit", 120, retrying=(
        r"retrying: (API error|429 This request would exceed your rate limit), attempt \d/4$"))
    assert (row["error"], row["detail"][:33]) == ("rate_limit", "API Error: Request rejected (429)")
    code, out, err = run(capsys, "reply", "f1")
    assert code == orch.EXIT_FAILED and out == "" and "rate_limit" in err
    failed = events_of(receiver, "f1", 1)[0]
    assert failed["event"] == "failed" and failed["detail"].startswith("rate_limit: API Error")
    # The box may say "Resend your message to try again": a hint, not text left there.
    assert run(capsys, "send", "f1", "third words")[:2] == (0, "f1: submitted\n")
    assert run(capsys, "wait", "f1", "--timeout", "60")[:2] == (0, "f1: idle\n")
    assert status(capsys, "f1")["error"] is None
    assert run(capsys, "reply", "f1")[0] == 0


def while_retrying(capsys, name, timeout=30):
    """The agent's row once its detail says its CLI retries an API error."""
    return retry_until(lambda: [r for r in [status(capsys, name)]
                                if (r["detail"] or "").startswith("retrying")], timeout)[0]


def failed_turn(capsys, name, words, word, timeout=90, retrying=None):
    """Send words the fake refuses; the turn ends failed with the CLI's own word, exit 8.

    retrying: what the detail says (a pattern) while the CLI retries first.
    """
    assert run(capsys, "send", name, words)[:2] == (0, "%s: submitted\n" % name)
    if retrying:
        row = while_retrying(capsys, name)
        assert row["status"] == "working" and re.match(retrying, row["detail"]), row
    code, out, err = run(capsys, "wait", name, "--timeout", str(timeout))
    assert code == orch.EXIT_FAILED and re.match(r"%s: idle \(failed: (%s)\)\n$" % (name, word),
                                                 out), (out, err)
    return status(capsys, name)


def a_refused_key_fails_the_turn(capsys, name, kind, word, said):
    """FAIL401: told as a failed turn, with what the CLI said; the next turn clears it."""
    assert run(capsys, "spawn", name, "--agent", kind, "first words")[0] == 0
    assert run(capsys, "wait", name, "--timeout", "60")[0] == 0
    row = failed_turn(capsys, name, "FAIL401 second words", word)
    assert said in row["detail"], row
    assert run(capsys, "reply", name)[0] == orch.EXIT_FAILED
    assert run(capsys, "send", name, "third words")[:2] == (0, "%s: submitted\n" % name)
    assert run(capsys, "wait", name, "--timeout", "60")[:2] == (0, "%s: idle\n" % name)
    assert status(capsys, name)["error"] is None


def test_e2e_a_refused_key_and_an_overloaded_api_are_failed_turns(claude, capsys, monkeypatch):
    monkeypatch.setenv("CLAUDE_CODE_MAX_RETRIES", "2")
    a_refused_key_fails_the_turn(capsys, "f1", "claude", "authentication_failed",
                                 "Invalid API key")
    row = failed_turn(capsys, "f1", "FAIL529 fourth words", "overloaded|server_error")
    assert "529" in row["detail"] or "verloaded" in row["detail"], row


@pytest.fixture
def subscriber(claude, monkeypatch):
    """The real claude signed in to a claude.ai subscription the fake accepts: its usage limits."""
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    write_claude_config(claude.home, [claude.work], {"oauthAccount": {
        "accountUuid": "00000000-0000-4000-8000-000000000001", "emailAddress": "a@example.com",
        "organizationUuid": "00000000-0000-4000-8000-000000000002",
        "billingType": "stripe_subscription"}})
    folder = os.path.join(claude.home, ".claude")
    os.makedirs(folder, exist_ok=True)
    with open(os.open(os.path.join(folder, ".credentials.json"), os.O_WRONLY | os.O_CREAT,
                      0o600), "w") as f:
        json.dump({"claudeAiOauth": {
            "accessToken": "sk-ant-oat01-orch-test", "refreshToken": "sk-ant-ort01-orch-test",
            "expiresAt": int(time.time() * 1000) + 86400000, "subscriptionType": "max",
            "scopes": ["user:inference", "user:profile", "user:sessions:claude_code"]}}, f)
    return claude


def continues_received(api):
    """The requests that continue after a limit: orch's message, or claude's own."""
    return [r for r in api.requests if not r["side"] and (
        orch.CONTINUE_MESSAGE in r["text"] or "usage limit has reset" in r["text"])]


def test_e2e_a_usage_limit_is_limited_and_continued_once(subscriber, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_LIMIT_MARGIN", "20")
    assert run(capsys, "spawn", "l1", "first words", "--on-limit", "continue")[0] == 0
    assert run(capsys, "wait", "l1", "--timeout", "60")[0] == 0
    sent = time.time()
    assert run(capsys, "send", "l1", "LIMIT-5 second words")[:2] == (0, "l1: submitted\n")
    # 2.1.197 opens /rate-limit-options: the watcher answers "Stop and wait for limit to reset".
    # Before, it is limited a moment, then needs-input at the dialog (opened within a second).
    def limited():
        row = status(capsys, "l1")
        return row if row["status"] == "limited" and time.time() - row["status_since"] > 5 \
            else None
    row = retry_until(limited, 60)
    assert row["error"] == "rate_limit", row
    code, out, err = run(capsys, "wait", "l1", "--timeout", "60")
    assert code == orch.EXIT_FAILED and out.startswith("l1: limited"), (out, err)
    resets = orch.epoch_of(row["resets_at"])
    assert sent <= resets <= time.time() + 5 + 60, row["resets_at"]    # words: to the minute
    assert "limit" in row["detail"]
    # Exactly one continue: claude's own where it continues by itself, else orch's.
    assert retry_until(lambda: continues_received(subscriber.api), 240), run(capsys, "tail", "l1")
    assert run(capsys, "wait", "l1", "--timeout", "60")[:2] == (0, "l1: idle\n")
    assert status(capsys, "l1")["error"] is None
    assert len(continues_received(subscriber.api)) == 1


def test_e2e_tokens_context_cost_and_memory(claude, capsys):
    assert run(capsys, "spawn", "u1", "first words")[0] == 0
    assert run(capsys, "wait", "u1", "--timeout", "60")[0] == 0
    assert run(capsys, "send", "u1", "--wait", "second words")[0] == 0
    answers = len([r for r in claude.api.requests if not r["side"]])
    expected = {"input": 10 * answers, "output": 5 * answers, "cache_read": 100 * answers,
                "cache_write": 20 * answers}
    # Claude may write the last answer to its transcript a moment after its turn ends.
    retry_until(lambda: status(capsys, "u1")["tokens"] == expected, 10)
    row = status(capsys, "u1")
    assert row["tokens"] == expected, row
    assert row["context_tokens"] == 135
    # The cost is claude's own figure where it writes one (cost-state), else unknown.
    costs = [e["totalCostUSD"] for e in orch.read_json_lines(orch.transcript_path(
        orch.load_state()["agents"]["u1"])) if e.get("type") == "cost-state"]
    assert row["cost_usd"] == (round(costs[-1], 6) if costs else None)
    assert abs(row["rss_bytes"] - proc_tree_rss(row["pid"])) < 0.1 * row["rss_bytes"]
    assert row["rss_bytes"] > 50 << 20       # node and claude: tens of MiB at least


def test_e2e_a_users_status_line_shows_as_before_and_tells_the_context(claude, capsys):
    record = os.path.join(claude.root, "statusline-input.json")
    theirs = "cat > %s; echo MINE-STATUS-LINE" % shlex.quote(record)
    path = os.path.join(claude.home, ".claude", "settings.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"statusLine": {"type": "command", "command": theirs}}, f)
    assert run(capsys, "spawn", "s1", "first words")[0] == 0
    assert run(capsys, "wait", "s1", "--timeout", "60")[0] == 0
    assert run(capsys, "send", "s1", "--wait", "second words")[0] == 0
    assert retry_until(lambda: "MINE-STATUS-LINE" in run(capsys, "tail", "s1")[1], 30)

    def agrees():       # what claude handed the user's command is what orch reports
        try:
            with open(record) as f:
                told = json.load(f)
        except (OSError, ValueError):
            return False
        share = (told.get("context_window") or {}).get("used_percentage")
        row = status(capsys, "s1")
        return share is not None and row["context_used"] == round(share / 100.0, 4) and \
            row["cost_usd"] == round(told["cost"]["total_cost_usd"], 6)
    assert retry_until(agrees, 30)
    with open(path) as f:
        assert json.load(f) == {"statusLine": {"type": "command", "command": theirs}}


def test_e2e_notifications(claude, capsys, receiver):
    notified_through_each_transition(capsys, receiver, [], ASK_FIRST, "Bash")


def test_e2e_untrusted_folder_and_spawn_trust(claude, capsys, tmp_path):
    fresh = tmp_path / "untrusted"
    fresh.mkdir()
    code, out, _ = run(capsys, "spawn", "u1", "hi", "--cwd", str(fresh))
    assert code == orch.EXIT_NEEDS_INPUT and "trust" in out
    row = status(capsys, "u1")
    assert (row["status"], row["needs"]) == ("needs-input", "trust")
    assert run(capsys, "send", "u1", "hello")[0] == orch.EXIT_NEEDS_INPUT
    assert run(capsys, "rm", "u1")[0] == 0
    other = tmp_path / "trusted-by-orch"
    other.mkdir()
    before = write_claude_config(claude.home, [claude.work], {"orchKeepMe": 3, "x": {"y": [1]}})
    code, out, err = run(capsys, "spawn", "t1", "trusted now", "--cwd", str(other), "--trust")
    assert code == 0, err
    retry_until(lambda: "trusted now" in claude.api.texts())
    with open(os.path.join(claude.home, ".claude.json")) as f:
        after = json.load(f)
    assert after["projects"][str(other)]["hasTrustDialogAccepted"] is True
    for key in ("orchKeepMe", "x", "customApiKeyResponses", "hasCompletedOnboarding"):
        assert after[key] == before[key]


def test_e2e_kill_then_resume_after_kill_server_keeps_conversation(claude, capsys):
    assert run(capsys, "spawn", "a1", "remember the word avocado")[0] == 0
    sid = sid_of("a1")
    wait_status(capsys, "a1", "idle")
    assert run(capsys, "kill", "a1")[0] == 0
    assert status(capsys, "a1")["status"] == "exited"
    claude.stop()
    code, out, err = run(capsys, "resume", "a1", "which word?")
    assert code == 0, err
    retry_until(lambda: "which word?" in claude.api.texts(sid))
    with claude.api.lock:
        last = [r for r in claude.api.requests if r["text"] == "which word?"][-1]
    assert last["session"] == sid
    assert "remember the word avocado" in last["history"]
    assert wait_status(capsys, "a1", "idle")["session_id"] == sid


def test_e2e_an_agent_starts_an_agent_and_the_fleet_comes_back_after_a_reboot(claude, capsys):
    # The boss's Bash tool runs orch, as an orchestrator agent does.
    claude.api.commands["SPAWNKID"] = "%s %s spawn kid 'child task'" % (sys.executable, ORCH)
    code, out, err = run(capsys, "spawn", "boss", "SPAWNKID please", *ASK_FIRST,
                         "--allowedTools", "Bash")
    assert code == 0, err
    retry_until(lambda: "child task" in claude.api.texts(), timeout=120)
    wait_status(capsys, "kid", "idle", timeout=60)
    wait_status(capsys, "boss", "idle", timeout=60)
    assert status(capsys, "kid")["parent"] == "boss" and status(capsys, "boss")["parent"] is None
    assert " \\_ kid " in run(capsys, "list")[1]
    sids = {"boss": sid_of("boss"), "kid": sid_of("kid")}
    gone = os.path.join(claude.work, "gone")
    os.mkdir(gone)
    for name, where in (("stopped1", claude.work), ("quitter", claude.work),
                        ("nofolder", gone)):
        assert run(capsys, "spawn", name, "hello", "--cwd", where)[0] == 0
    assert run(capsys, "kill", "stopped1")[0] == 0
    wait_status(capsys, "quitter", "idle")
    run(capsys, "send", "quitter", "/exit", "--raw")    # no hook confirms /exit: any code
    wait_status(capsys, "quitter", "exited")
    reboot()
    os.rmdir(gone)
    code, out, err = run(capsys, "resume", "--all", "--stagger", "1")
    assert code == 1 and "nofolder's working folder %s is gone" % gone in err, out + err
    assert "stopped1: stopped with `orch kill`, left stopped" in out
    assert "quitter: ended its own session (prompt_input_exit), left ended" in out
    for name in ("boss", "kid"):
        assert "%s: resumed (claude, tmux, session %s)" % (name, sids[name]) in out, out + err
    assert run(capsys, "send", "kid", "what was your task?")[0] == 0
    retry_until(lambda: "what was your task?" in claude.api.texts(sids["kid"]))
    with claude.api.lock:
        last = [r for r in claude.api.requests if r["text"] == "what was your task?"][-1]
    assert "child task" in last["history"]
    running = dict((n, status(capsys, n)["pid"]) for n in ("boss", "kid"))
    code, out, _ = run(capsys, "resume", "--all")     # twice: nothing more starts
    assert "boss: running (" in out and "kid: running (" in out
    assert dict((n, status(capsys, n)["pid"]) for n in ("boss", "kid")) == running
    assert [claude.state()["agents"][n].get("resumed") for n in ("boss", "kid")] == [1, 1]


def test_e2e_orch_follows_the_session_a_person_starts_with_clear(claude, capsys):
    assert run(capsys, "spawn", "a1", "remember the word avocado")[0] == 0
    old = sid_of("a1")
    wait_status(capsys, "a1", "idle")
    person_types("a1", "l:/clear")
    retry_until(lambda: "/clear" in "\n".join(orch.agent_screen(claude.state()["agents"]["a1"])))
    person_types("a1", "Enter")
    new = retry_until(lambda: status(capsys, "a1")["session_id"] not in (None, old)
                      and status(capsys, "a1")["session_id"])
    assert run(capsys, "send", "a1", "remember the word banana")[0] == 0
    assert run(capsys, "wait", "a1")[0] == 0
    with claude.api.lock:
        answered = [n for n, r in enumerate(claude.api.requests, 1)
                    if r["text"] == "remember the word banana"]
    assert run(capsys, "reply", "a1")[1] == "reply %d: ok\n" % answered[-1]
    assert run(capsys, "kill", "a1")[0] == 0
    assert run(capsys, "resume", "a1", "which word?")[0] == 0
    retry_until(lambda: "which word?" in claude.api.texts(new))
    with claude.api.lock:
        last = [r for r in claude.api.requests if r["text"] == "which word?"][-1]
    assert "banana" in last["history"] and "avocado" not in last["history"]
    assert wait_status(capsys, "a1", "idle")["session_id"] == new


def test_e2e_no_prompt_or_key_on_claudes_command_line(claude, capsys, request):
    secrets = secret_words()
    snooper = snooper_for(claude, dict(secrets, api_key=E2E_KEY), request, watch="claude-code")
    assert run(capsys, "spawn", "a1", "remember " + secrets["prompt"])[0] == 0
    sid = sid_of("a1")
    pid = wait_status(capsys, "a1", "idle")["pid"]
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        argv = f.read().decode("utf-8").split("\0")
    assert argv[argv.index("--session-id") + 1] == sid
    assert run(capsys, "send", "a1", "and " + secrets["message"])[0] == 0
    assert run(capsys, "kill", "a1")[0] == 0
    assert run(capsys, "resume", "a1", "then " + secrets["resume"])[0] == 0
    retry_until(lambda: "then " + secrets["resume"] in claude.api.texts(sid))
    seen = snooper.stop()
    assert seen["found"] == [] and seen["watched"] >= 2
    assert claude.api.texts(sid) == ["remember " + secrets["prompt"], "and " + secrets["message"],
                                     "then " + secrets["resume"]]


def test_e2e_upgrade_from_the_oldest_claude_brings_no_renderer_prompt(claude, capsys,
                                                                      monkeypatch):
    oldest = os.environ.get("ORCH_E2E_CLAUDE_OLDEST")
    if not oldest or claude_version(oldest) >= claude.version:
        pytest.skip("needs an older claude to start the session: make e2e sets "
                    "ORCH_E2E_CLAUDE_OLDEST to the oldest of the matrix")
    monkeypatch.setenv("ORCH_CLAUDE", oldest)
    assert run(capsys, "spawn", "a1", "remember the word avocado")[0] == 0
    sid = sid_of("a1")
    wait_status(capsys, "a1", "idle")
    assert run(capsys, "kill", "a1")[0] == 0
    monkeypatch.setenv("ORCH_CLAUDE", os.environ["ORCH_E2E_CLAUDE"])
    code, out, err = run(capsys, "resume", "a1", "which word?")
    assert code == 0, err
    retry_until(lambda: "which word?" in claude.api.texts(sid))
    row = wait_status(capsys, "a1", "idle")
    # 2.1.332 offers its fullscreen renderer here, in a dialog any Enter accepts,
    # unless the "tui" setting orch gives each agent names one.
    assert row["needs"] is None and row["session_id"] == sid
    assert orch.choice_dialog(orch.agent_screen(claude.state()["agents"]["a1"])) is None
    assert run(capsys, "send", "a1", "and now?")[0] == 0
    retry_until(lambda: "and now?" in claude.api.texts(sid))


def test_e2e_a_picker_a_person_left_open_is_answered_only_on_purpose(claude, capsys):
    assert run(capsys, "spawn", "a1", "hello")[0] == 0
    sid = sid_of("a1")
    wait_status(capsys, "a1", "idle")
    person_types("a1", "l:/model", "Enter")     # and detaches without choosing
    row = wait_status(capsys, "a1", "needs-input")
    assert (row["needs"], row["detail"]) == ("dialog", "Select model")
    code, out, err = run(capsys, "send", "a1", "are you there?")
    assert code == orch.EXIT_NEEDS_INPUT and '"Select model"' in err
    code, out, err = run(capsys, "approve", "a1")
    assert code == orch.EXIT_NEEDS_INPUT and "1. Default" in err
    code, out, err = run(capsys, "deny", "a1")
    assert (code, out) == (0, 'a1: cancelled the dialog "Select model" (Escape)\n'), err
    wait_status(capsys, "a1", "idle")
    assert run(capsys, "send", "a1", "are you there?")[0] == 0
    retry_until(lambda: "are you there?" in claude.api.texts(sid))
    assert claude.api.texts(sid) == ["hello", "are you there?"]
    person_types("a1", "l:/model", "Enter")
    wait_status(capsys, "a1", "needs-input")
    code, out, err = run(capsys, "approve", "a1", "--choice", "1")
    assert code == 0 and out.startswith("a1: picked 1. Default"), err
    wait_status(capsys, "a1", "idle")


def test_e2e_round_trip_under_lc_all_c(claude, capsys):
    bare = dict(environment("LC_ALL=C"), ORCH_CLAUDE=os.environ["ORCH_CLAUDE"])
    for key in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "DISABLE_AUTOUPDATER",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"):
        bare[key] = os.environ[key]

    def orch_cli(*args):
        return bare_cli(bare, sys.executable, *args)
    code, out, err = orch_cli("spawn", "a1", "caf\u00e9 \u6f22\u5b57 first")
    assert code == 0, err
    assert orch_cli("wait", "a1", "--timeout", "60")[0] == 0
    code, out, err = orch_cli("send", "a1", "na\u00efve \u2713 SLOW-20 second")
    assert (code, out) == (0, "a1: submitted\n"), err
    code, out, _ = orch_cli("tail", "a1")
    assert code == 0 and "na\u00efve \u2713 SLOW-20 second" in out and "\u276f" in out
    retry_until(lambda: len(claude.api.texts()) == 2)      # the model is on it
    assert orch_cli("interrupt", "a1")[0] == 0
    assert orch_cli("wait", "a1", "--timeout", "60")[:2] == (0, "a1: idle\n")
    assert claude.api.texts() == ["caf\u00e9 \u6f22\u5b57 first", "na\u00efve \u2713 SLOW-20 second"]


def test_e2e_vim_mode_status_line_and_output_style(claude, capsys):
    write_claude_config(claude.home, [claude.work], {"editorMode": "vim"})
    os.makedirs(os.path.join(claude.home, ".claude"))
    with open(os.path.join(claude.home, ".claude", "settings.json"), "w") as f:
        json.dump({"statusLine": {"type": "command", "command": "echo '\u276f my status line'"},
                   "outputStyle": "Explanatory"}, f)
    assert run(capsys, "spawn", "a1", "SLOW-20 first")[0] == 0
    retry_until(lambda: claude.api.texts())     # the model is on it
    assert run(capsys, "interrupt", "a1")[0] == 0       # Escape: vim's normal mode after
    assert run(capsys, "wait", "a1", "--timeout", "60")[:2] == (0, "a1: idle\n")
    retry_until(lambda: "my status line" in run(capsys, "tail", "a1")[1])
    code, out, err = run(capsys, "send", "a1", "second")
    assert (code, out) == (0, "a1: submitted\n"), err
    assert retry_until(lambda: claude.api.texts()[1:]) == ["second"]


def test_e2e_interrupt_then_send_sends_only_the_new_message(claude, capsys):
    assert run(capsys, "spawn", "a1", "SLOW-30 long job")[0] == 0
    # Claude asks the model a moment after it accepts a prompt: interrupt the asking.
    retry_until(lambda: claude.api.texts())
    assert run(capsys, "interrupt", "a1")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "60")[0] == 0
    code, out, err = run(capsys, "send", "a1", "do this instead")
    assert (code, out) == (0, "a1: submitted\n"), err
    assert retry_until(lambda: claude.api.texts()[1:]) == ["do this instead"]


def test_e2e_send_wait_reply_round_trip_and_send_to_three(claude, capsys):
    for name in ("a1", "a2", "a3"):
        assert run(capsys, "spawn", name, "hello " + name)[0] == 0
    # Idle first: a message sent while a first turn still runs is (honestly) "queued".
    assert run(capsys, "wait", "a1", "a2", "a3", "--timeout", "60")[0] == 0
    code, out, err = run(capsys, "send", "--to", "a1,a2,a3", "one for all")
    assert (code, sorted(out.splitlines())) == (0, ["a1: submitted", "a2: submitted",
                                                    "a3: submitted"]), err
    assert run(capsys, "wait", "a1", "a2", "a3", "--timeout", "60")[0] == 0
    assert sorted(claude.api.texts()[3:]) == ["one for all"] * 3
    assert run(capsys, "send", "a2", "and the answer is")[0] == 0
    assert run(capsys, "wait", "a2", "--timeout", "60")[0] == 0
    with claude.api.lock:
        n = [i + 1 for i, r in enumerate(claude.api.requests) if r["text"] == "and the answer is"]
    assert run(capsys, "reply", "a2")[:2] == (0, "reply %d: ok\n" % n[-1])
    code, out, _ = run(capsys, "log", "a2")
    assert code == 0 and out.splitlines()[-3:] == [
        "> and the answer is", "\u25cf reply %d: ok" % n[-1], out.splitlines()[-1]]
    assert out.splitlines()[-1].startswith("\u2714 turn done (")
    assert "> hello a2" in out and "> one for all" in out and "system-reminder" not in out


def test_e2e_headless_reply(claude_headless, capsys):
    assert run(capsys, "spawn", "h1", "question")[0] == 0
    assert run(capsys, "wait", "h1", "--timeout", "60")[0] == 0
    assert run(capsys, "reply", "h1")[:2] == (0, "reply 1: ok\n")
    code, out, _ = run(capsys, "log", "h1", "--json")
    assert code == 0 and [json.loads(l)["kind"] for l in out.splitlines()] == [
        "session", "user", "assistant", "turn"]
    # Tokens and context from claude's transcript, as for a tmux agent, across a resume.
    assert run(capsys, "kill", "h1")[0] == 0
    assert run(capsys, "resume", "h1")[0] == 0
    assert run(capsys, "send", "h1", "--wait", "second")[0] == 0
    answers = len([r for r in claude_headless.api.requests if not r["side"]])
    expected = {"input": 10 * answers, "output": 5 * answers, "cache_read": 100 * answers,
                "cache_write": 20 * answers}
    row = retry_until(lambda: [r for r in [status(capsys, "h1")] if r["tokens"] == expected], 10)[0]
    assert row["context_tokens"] == 135
    costs = [e["totalCostUSD"] for e in orch.read_json_lines(orch.claude_transcript(
        orch.load_state()["agents"]["h1"])) if e.get("type") == "cost-state"]
    assert row["cost_usd"] == (round(costs[-1], 6) if costs else None)


def test_e2e_copy_mode_and_half_typed_text(claude, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "60")[0] == 0
    pane = claude.state()["agents"]["a1"]["tmux"]["pane"]
    tmux_cmd("copy-mode", "-t", pane)
    code, out, err = run(capsys, "send", "a1", "after copy mode")
    assert (code, out) == (0, "a1: submitted\n"), err
    assert run(capsys, "wait", "a1", "--timeout", "60")[0] == 0
    tmux_cmd("send-keys", "-t", pane, "-l", "half typed")
    retry_until(lambda: orch.typed_text(claude.state()["agents"]["a1"]) == "half typed")
    code, out, err = run(capsys, "send", "a1", "orch message")
    assert code == orch.EXIT_NEEDS_INPUT and "'half typed'" in err
    assert orch.typed_text(claude.state()["agents"]["a1"]) == "half typed"      # kept
    code, out, err = run(capsys, "send", "a1", "--force", "orch message")
    assert (code, out) == (0, "a1: submitted\n"), err
    assert retry_until(lambda: len(claude.api.texts()) == 3 and claude.api.texts()) == [
        "first", "after copy mode", "orch message"]


def test_e2e_a_prompt_that_merely_contains_the_message_is_not_it(claude, capsys):
    assert run(capsys, "spawn", "a1", "first")[0] == 0
    assert run(capsys, "wait", "a1", "--timeout", "60")[0] == 0
    agent = claude.state()["agents"]["a1"]
    pane, socket = agent["tmux"]["pane"], agent["tmux"]["socket"]
    # A person types between orch's look at the box and its paste.
    tmux_cmd("send-keys", "-t", pane, "-l", "half typed ")
    retry_until(lambda: orch.typed_text(agent) == "half typed")
    since = time.time()
    orch.paste_text(pane, socket, "orch message")
    retry_until(lambda: "orch message" in orch.typed_text(agent))
    orch.send_enter(pane, socket)
    with pytest.raises(orch.OrchError) as e:
        retry_until(lambda: orch.submitted(agent, "orch message", since))
    assert e.value.code == orch.EXIT_MIXED and "half typed orch message" in str(e.value)


@pytest.fixture
def claude_headless(claude, monkeypatch, tmp_path_factory):
    """The real claude with no tmux on PATH."""
    hide_tmux(monkeypatch, tmp_path_factory)
    yield claude
    kill_headless_agents()


def test_e2e_headless_control_bytes_mode_and_pid(claude_headless, capsys):
    assert run(capsys, "spawn", "h1", "first")[0] == 0
    control_byte_round_trip(capsys, "h1")
    assert claude_headless.api.texts() == ["first", "\\!touch pwned\nand more",
                                           "error: fix this"]
    row = status(capsys, "h1")
    # -p mode starts in the ask-first mode on every version (tools are denied, not asked).
    assert (row["permission_mode"], row["pid"]) == (
        "default", claude_headless.state()["agents"]["h1"]["headless"]["pid"])
    assert not os.path.exists(os.path.join(claude_headless.work, "pwned"))


def test_e2e_headless_message_taken_by_the_running_turn(claude_headless, capsys):
    os.makedirs(os.path.join(claude_headless.home, ".claude"), exist_ok=True)
    with open(os.path.join(claude_headless.home, ".claude", "settings.json"), "w") as f:
        json.dump({"permissions": {"allow": ["Bash(sleep:*)"]}}, f)
    api = claude_headless.api
    assert run(capsys, "spawn", "h1", "TOOLRUN-4 build it")[0] == 0
    retry_until(lambda: api.requests)
    assert run(capsys, "send", "h1", "also test it")[:2] == (0, "h1: queued\n")
    assert run(capsys, "wait", "h1", "--timeout", "60")[:2] == (0, "h1: idle\n")
    # Claude hands it to the model inside the running turn, beside the tool's result.
    with api.lock:
        assert [r for r in api.requests if "also test it" in r["history"] and not r["side"]]


def test_e2e_headless_every_verb(claude_headless, capsys):
    api = claude_headless.api
    code, out, err = run(capsys, "spawn", "h1", "first headless")
    assert code == 0 and "headless" in out, err
    sid = sid_of("h1")
    retry_until(lambda: api.texts(sid) == ["first headless"])
    wait_status(capsys, "h1", "idle")
    messages = ["concurrent %d: %send" % (i, "\"q\" $(x) `y` \u00e9 " * 300) for i in range(4)]
    procs = [subprocess.Popen([sys.executable, ORCH, "send", "h1", m], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True) for m in messages]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    wait_status(capsys, "h1", "idle", timeout=60)
    # Claude joins messages queued during a turn into one text: count each in the whole.
    everything = "\n".join(api.conversation(sid))
    assert [everything.count(m) for m in ["first headless"] + messages] == [1] * 5
    code, out, _ = run(capsys, "tail", "h1")
    assert "> first headless" in out and "\u25cf reply" in out and "turn done" in out
    assert not [l for l in out.splitlines() if l.startswith("{")]
    assert run(capsys, "send", "h1", "SLOW-20 take your time")[0] == 0
    assert status(capsys, "h1")["status"] == "working"
    retry_until(lambda: api.texts(sid)[-1:] == ["SLOW-20 take your time"])
    code, out, _ = run(capsys, "interrupt", "h1")
    assert code == 0 and "was working" in out
    wait_status(capsys, "h1", "idle")
    assert "turn ended: error_during_execution" in run(capsys, "tail", "h1")[1]
    code, out, _ = run(capsys, "kill", "h1")
    # On EOF claude exits with 1 when its last turn ended in an error (here: interrupted).
    assert code == 0 and "killed (exit code 1)" in out
    code, out, err = run(capsys, "resume", "h1", "after resume")
    assert code == 0, err
    retry_until(lambda: api.texts(sid)[-1:] == ["after resume"])
    with api.lock:
        last = [r for r in api.requests if r["text"] == "after resume"][-1]
    assert "first headless" in last["history"]
    wait_status(capsys, "h1", "idle")
    assert run(capsys, "kill", "h1")[0] == 0


# ###########################################################################
# End to end: the real Codex CLI against a fake Responses API (make e2e)
# ###########################################################################

class FakeResponses(FakeAPI):
    """Serve /v1/responses (codex's wire API) on 127.0.0.1; record what each agent received.

    TOOL in the user's words asks for a command that needs approval
    (sandbox_permissions require_escalated): codex's approval dialog on demand;
    SLOW-N answers N seconds late (a busy agent on demand).
    """

    PATH = "/v1/responses"

    def handle_messages(self, handler, data):
        items = data.get("input") or []
        texts = [block.get("text", "") for item in items if isinstance(item, dict)
                 and item.get("role") == "user" for block in item.get("content") or []
                 if block.get("type") == "input_text" and not block.get("text", "").startswith("<")]
        last = items[-1] if items else {}
        tool_result = isinstance(last, dict) and last.get("type") == "function_call_output"
        side = not data.get("tools")        # codex's title request offers no tools
        record = {"text": texts[-1] if texts else "", "history": json.dumps(texts),
                  "side": side, "tool_result": tool_result,
                  "session": handler.headers.get("session-id"), "time": time.time()}
        with self.lock:
            self.requests.append(record)
            n = len(self.requests)
        for word in record["text"].split() if not side and not tool_result else []:
            if word.startswith("SLOW-") and word[5:].isdigit():
                time.sleep(int(word[5:]))
        if not side and not tool_result and "FAIL429" in record["text"]:
            return self.openai_429(handler, record["text"])
        if not side and not tool_result and self.refused(handler, record["text"], "openai"):
            return
        limit = limit_seconds(record["text"]) if not side and not tool_result else None
        if limit is not None:       # a ChatGPT plan's usage limit, as codex's backend answers
            resets = int(time.time()) + limit
            payload = json.dumps({"error": {
                "type": "usage_limit_reached", "message": "The usage limit has been reached",
                "plan_type": "plus", "resets_at": resets}}).encode("utf-8")
            handler.send_response(429)
            for key, value in (("Content-Type", "application/json"),
                               ("Content-Length", str(len(payload))),
                               ("x-codex-primary-used-percent", "100"),
                               ("x-codex-primary-window-minutes", "300"),
                               ("x-codex-primary-reset-at", str(resets))):
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(payload)
            return
        command = self.command_in(record["text"], n) if not side and not tool_result else None
        if command:
            item = {"type": "function_call", "id": "fc_%d" % n, "call_id": "call_%d" % n,
                    "name": "exec_command", "status": "completed", "arguments": json.dumps(
                        {"cmd": command,
                         "sandbox_permissions": "require_escalated",
                         "justification": "make a file"})}
        else:
            reply = "tool finished" if tool_result else "reply %d: ok" % n
            item = {"type": "message", "id": "msg_%d" % n, "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": reply, "annotations": []}]}
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        rid = "resp_%d" % n
        usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15,
                 "input_tokens_details": {"cached_tokens": 3},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        for event, body in (("response.created", {"response": {"id": rid}}),
                            ("response.output_item.added", {"output_index": 0, "item": item}),
                            ("response.output_item.done", {"output_index": 0, "item": item}),
                            ("response.completed", {"response": {"id": rid, "usage": usage}})):
            handler.wfile.write(sse(event, dict(body, type=event)))
        handler.wfile.flush()

    def texts(self, session=None):
        with self.lock:
            return [r["text"] for r in self.requests if not r["side"] and not r["tool_result"]
                    and (session is None or r["session"] == session)]


def write_codex_config(home, url, trusted):
    folder = os.path.join(home, ".codex")
    os.makedirs(folder, exist_ok=True)
    lines = ['model = "m"', 'model_provider = "fake"', "", "[model_providers.fake]",
             'name = "fake"', 'base_url = "%s/v1"' % url, 'wire_api = "responses"', ""]
    for folder_ in trusted:
        lines += ['[projects."%s"]' % folder_, 'trust_level = "trusted"', ""]
    # Codex adds these itself on its first run: seeded, so a changed file is orch's doing.
    lines += ["[tui]", "screen_reader_detection_done = true", ""]
    path = os.path.join(folder, "config.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def without_codex_counters(config):
    """A config.toml without the table codex itself bumps each session (not orch's doing)."""
    kept, skipping = [], False
    for line in config.decode("utf-8").splitlines():
        if line.startswith("["):
            skipping = line.strip() == "[tui.model_availability_nux]"
        if not skipping and line.strip():
            kept.append(line)
    return kept


@pytest.fixture
def codex(env, monkeypatch):
    """The real codex, offline: private HOME whose config points at the fake Responses API."""
    binary = os.environ.get("ORCH_E2E_CODEX")
    if binary is None:
        pytest.skip("needs the real codex: run `make e2e`, which installs it and sets "
                    "ORCH_E2E_CODEX")
    api = FakeResponses().start()
    monkeypatch.setenv("ORCH_CODEX", binary)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    env.codex_config = write_codex_config(env.home, api.url, [env.work])
    env.api = api
    yield env
    env.stop()
    api.stop()


def codex_sid(name):
    return status_of_cli(name)["session_id"]


def status_of_cli(name):
    code, out, err = cli("list", "--json")
    assert code == 0, err
    return {row["name"]: row for row in json.loads(out)}[name]


def test_e2e_codex_spawn_send_wait_reply_log_kill_resume(codex, capsys):
    code, out, err = run(capsys, "spawn", "c1", "--agent", "codex", "first words")
    assert code == 0 and "first message submitted" in out, err
    row = wait_status(capsys, "c1", "idle")
    assert row["agent"] == "codex" and row["session_id"] and row["last_prompt"] == "first words"
    sid = row["session_id"]
    assert codex.api.texts(sid) == ["first words"]
    assert run(capsys, "send", "c1", "it's \"quoted\" $HOME `id`")[1] == "c1: submitted\n"
    assert run(capsys, "wait", "c1")[0] == 0
    with codex.api.lock:
        answered = [n for n, r in enumerate(codex.api.requests, 1) if r["text"].startswith("it's")]
    assert run(capsys, "reply", "c1")[1] == "reply %d: ok\n" % answered[-1]
    log = run(capsys, "log", "c1")[1]
    assert "> first words" in log and "> it's \"quoted\" $HOME `id`" in log and "\u25cf reply" in log
    assert "codex/tmux" in run(capsys, "list")[1]
    pid = row["pid"]
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        assert b"first words" not in f.read()
    assert run(capsys, "kill", "c1")[0] == 0
    assert status(capsys, "c1")["status"] == "exited"
    code, out, err = run(capsys, "resume", "c1", "which words?")
    assert code == 0, err
    retry_until(lambda: "which words?" in codex.api.texts(sid))
    with codex.api.lock:
        last = [r for r in codex.api.requests if r["text"] == "which words?"][-1]
    assert "first words" in last["history"]
    assert wait_status(capsys, "c1", "idle")["session_id"] == sid


def notified_through_each_transition(capsys, receiver, before, after, tool):
    """A real agent's transitions reach a webhook, each once: started, done, needs-input, exited."""
    assert run(capsys, "notify", "add", "hook", "--webhook", receiver.url,
               "--on", "started,needs-input,done,exited")[0] == 0
    assert run(capsys, "spawn", "n1", *(before + ["first words"] + after))[0] == 0
    found = events_of(receiver, "n1", 2, 60)
    assert [e["event"] for e in found] == ["started", "done"] and found[1]["reply"], found
    assert run(capsys, "send", "n1", "TOOL please")[0] == 0
    asked = events_of(receiver, "n1", 3, 60)[2]
    assert (asked["event"], asked["detail"], asked["hint"]) == (
        "needs-input", tool, "orch approve n1"), asked
    assert run(capsys, "approve", "n1")[0] == 0
    assert events_of(receiver, "n1", 4, 60)[3]["event"] == "done"
    os.killpg(status(capsys, "n1")["pid"], signal.SIGTERM)      # it ends, not by orch kill
    gone = events_of(receiver, "n1", 5, 60)[4]
    assert gone["event"] == "exited" and gone["detail"].startswith("exit code"), gone
    assert run(capsys, "wait", "n1", "--until", "exited", "--timeout", "10")[0] == 0
    assert [e["event"] for e in receiver.events()] == [
        "started", "done", "needs-input", "done", "exited"]


def approve_once_and_deny(world, capsys, kind, tool):
    """A dialog asks about a tool: deny (it never runs), then approve once (it runs)."""
    assert run(capsys, "spawn", "a1", "--agent", kind, "TOOL please")[0] == 0
    row = wait_status(capsys, "a1", "needs-input")
    assert (row["needs"], row["detail"]) == ("permission", tool)
    assert run(capsys, "send", "a1", "hello")[0] == orch.EXIT_NEEDS_INPUT
    code, out, err = run(capsys, "deny", "a1")
    assert code == 0 and out.startswith("a1: denied %s (touch orch-tool-ran" % tool), err
    denied = wait_status(capsys, "a1", "idle")
    assert not [n for n in os.listdir(world.work) if n.startswith("orch-tool-ran")]
    assert run(capsys, "send", "a1", "TOOL again")[0] == 0
    wait_status(capsys, "a1", "needs-input")
    code, out, err = run(capsys, "approve", "a1", "--tool", tool)
    assert code == 0 and out.startswith("a1: approved %s (touch orch-tool-ran" % tool), err
    retry_until(lambda: [n for n in os.listdir(world.work) if n.startswith("orch-tool-ran")])
    wait_status(capsys, "a1", "idle")
    return denied


def reboot_and_resume_all(world, capsys, kind, quit_stays_down):
    """Agents of one kind come back after a reboot in their own sessions; killed ones do not.

    One agent is quit with the CLI's own /quit first: codex says so in its
    SessionEnd; gemini says the same when it is quit and when it is
    terminated, so after a reboot it comes back (as the README says).
    """
    names = ("r1", "r2", "q1")
    for name in names:
        assert run(capsys, "spawn", name, "--agent", kind, "hello " + name)[0] == 0
    sids = dict((name, wait_status(capsys, name, "idle")["session_id"]) for name in names)
    assert run(capsys, "kill", "r2")[0] == 0
    pane = world.state()["agents"]["q1"]["tmux"]["pane"]
    tmux_cmd("send-keys", "-t", pane, "-l", "/quit")

    for _ in range(20):     # the command menu may take an Enter first
        tmux_cmd("send-keys", "-t", pane, "Enter")
        deadline = time.time() + 3
        while time.time() < deadline and status(capsys, "q1")["status"] != "exited":
            time.sleep(0.1)
        if status(capsys, "q1")["status"] == "exited":
            break
    assert status(capsys, "q1")["status"] == "exited"
    reboot()
    code, out, err = run(capsys, "resume", "--all", "--stagger", "1")
    assert code == 0, out + err
    assert "r1: resumed (%s, tmux, session %s)" % (kind, sids["r1"]) in out, out
    assert "r2: stopped with `orch kill`, left stopped" in out
    if quit_stays_down:
        assert "q1: ended its own session" in out, out
    else:
        assert "q1: resumed (%s, tmux, session %s)" % (kind, sids["q1"]) in out, out
    assert run(capsys, "send", "r1", "which words?")[0] == 0
    retry_until(lambda: "which words?" in world.api.texts())
    with world.api.lock:
        last = [r for r in world.api.requests if r["text"] == "which words?"][-1]
    assert "hello r1" in last["history"]
    code, out, _ = run(capsys, "resume", "--all")       # twice: nothing more starts
    assert code == 0 and "r1: running (" in out and "resumed" not in out


def test_e2e_codex_fleet_comes_back_after_a_reboot(codex, capsys):
    reboot_and_resume_all(codex, capsys, "codex", quit_stays_down=True)


def test_e2e_gemini_fleet_comes_back_after_a_reboot(gemini, capsys):
    reboot_and_resume_all(gemini, capsys, "gemini", quit_stays_down=False)


def agent_starts_agent(world, capsys, kind, tool, before=""):
    """An agent runs `orch spawn` through its shell tool (approved once): the child knows
    its parent and keeps a session of its own that resumes."""
    world.api.commands["SPAWNKID"] = "%s%s %s spawn kid --agent %s 'child task'" % (
        before, sys.executable, ORCH, kind)
    assert run(capsys, "spawn", "boss", "--agent", kind, "SPAWNKID please")[0] == 0
    wait_status(capsys, "boss", "needs-input")
    assert run(capsys, "approve", "boss", "--tool", tool)[0] == 0

    def started():
        # Copilot asks a second time about the same command: approved too.  (Others
        # may still read needs-input a moment after the answer: approve presses nothing.)
        if status(capsys, "boss")["status"] == "needs-input":
            assert run(capsys, "approve", "boss", "--tool", tool)[0] in (0, orch.EXIT_NEEDS_INPUT)
        return "child task" in world.api.texts()
    retry_until(started, timeout=120)
    sid = wait_status(capsys, "kid", "idle", timeout=60)["session_id"]
    wait_status(capsys, "boss", "idle", timeout=60)
    assert status(capsys, "kid")["parent"] == "boss"
    assert " \\_ kid " in run(capsys, "list")[1]
    assert run(capsys, "kill", "kid")[0] == 0
    assert run(capsys, "resume", "kid", "what was your task?")[0] == 0
    retry_until(lambda: "what was your task?" in world.api.texts())
    with world.api.lock:
        last = [r for r in world.api.requests if r["text"] == "what was your task?"][-1]
    assert "child task" in last["history"]
    assert wait_status(capsys, "kid", "idle")["session_id"] == sid


def test_e2e_codex_agent_starts_an_agent(codex, capsys):
    agent_starts_agent(codex, capsys, "codex", "Bash")


def test_e2e_gemini_agent_starts_an_agent(gemini, capsys):
    agent_starts_agent(gemini, capsys, "gemini", "run_shell_command")


def test_e2e_codex_notifications(codex, capsys, receiver):
    notified_through_each_transition(capsys, receiver, ["--agent", "codex"], [], "Bash")


def test_e2e_codex_a_refused_key_and_an_overloaded_api_are_failed_turns(codex, capsys):
    a_refused_key_fails_the_turn(capsys, "f1", "codex", "http_connection_failed",
                                 "401 Unauthorized: Incorrect API key provided")
    # A 503 it retries five times, saying so only on its screen, then gives up.
    assert run(capsys, "send", "f1", "FAIL529 fourth words")[:2] == (0, "f1: submitted\n")
    row = while_retrying(capsys, "f1")
    assert row["status"] == "working" and re.match(
        r"retrying: Unexpected status 503 Service Unavailable: The server is overloaded or not "
        r"ready yet\., attempt [1-5]/5$", row["detail"]), row
    code, out, err = run(capsys, "wait", "f1", "--timeout", "120")
    assert (code, out) == (orch.EXIT_FAILED, "f1: idle (failed: http_connection_failed)\n"), err
    assert "503 Service Unavailable" in status(capsys, "f1")["detail"]


def test_e2e_codex_a_turn_that_ends_on_a_429_is_not_done(codex, capsys):
    with open(codex.codex_config) as f:
        config = f.read()
    with open(codex.codex_config, "w") as f:      # give up at once rather than back off
        f.write(config.replace('wire_api = "responses"', 'wire_api = "responses"\n'
                               'request_max_retries = 0\nstream_max_retries = 0'))
    assert run(capsys, "spawn", "f1", "--agent", "codex", "first words")[0] == 0
    assert run(capsys, "wait", "f1", "--timeout", "60")[0] == 0
    assert run(capsys, "send", "f1", "FAIL429 second words")[:2] == (0, "f1: submitted\n")
    code, out, err = run(capsys, "wait", "f1", "--timeout", "60")
    assert (code, out) == (orch.EXIT_FAILED, "f1: idle (failed: "
                           "response_too_many_failed_attempts)\n"), (out, err)
    row = status(capsys, "f1")
    assert "429" in row["detail"] and row["status_source"] == "transcript"
    assert run(capsys, "reply", "f1")[0] == orch.EXIT_FAILED
    assert run(capsys, "send", "f1", "third words")[:2] == (0, "f1: submitted\n")
    assert run(capsys, "wait", "f1", "--timeout", "60")[:2] == (0, "f1: idle\n")
    assert status(capsys, "f1")["error"] is None and run(capsys, "reply", "f1")[0] == 0


def test_e2e_codex_says_it_retries_an_api_error(codex, capsys):
    assert run(capsys, "spawn", "f1", "--agent", "codex", "first words")[0] == 0
    assert run(capsys, "wait", "f1", "--timeout", "60")[0] == 0
    # Five retries, each after the 4 s the API asks for: only its screen says so.
    failed_turn(capsys, "f1", "FAIL429-4 second words", "response_too_many_failed_attempts",
                retrying=r"retrying: Server is busy \(last status: 429 Too Many Requests\), "
                         r"attempt [1-5]/5$")


def test_e2e_codex_usage_limit_tokens_and_context(codex, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_LIMIT_MARGIN", "1")
    assert run(capsys, "spawn", "c1", "--agent", "codex", "first words",
               "--on-limit", "continue")[0] == 0
    assert run(capsys, "wait", "c1", "--timeout", "60")[0] == 0
    assert run(capsys, "send", "c1", "--wait", "second words")[0] == 0
    row = status(capsys, "c1")
    answers = len(codex.api.texts())
    # As the fake reported each answer: 10 input (3 of them cached), 5 output.
    assert row["tokens"] == {"input": 7 * answers, "output": 5 * answers,
                             "cache_read": 3 * answers, "cache_write": 0}, row
    assert row["context_tokens"] == 15 and 0 < row["context_used"] < 0.01, row
    assert row["cost_usd"] is None      # codex states none
    assert abs(row["rss_bytes"] - proc_tree_rss(row["pid"])) < 0.1 * row["rss_bytes"]
    sent = time.time()
    assert run(capsys, "send", "c1", "LIMIT-3 third words")[0] == 0
    row = retry_until(lambda: [r for r in [status(capsys, "c1")] if r["status"] == "limited"], 60)[0]
    assert row["error"] == "usage_limit_exceeded" and "usage limit" in row["detail"]
    assert sent + 2 <= orch.epoch_of(row["resets_at"]) <= time.time() + 4, row["resets_at"]
    # Its offer of a cheaper model is answered "Keep current model"; then one continue.
    assert retry_until(lambda: orch.CONTINUE_MESSAGE in codex.api.texts(), 90), run(
        capsys, "tail", "c1")
    assert run(capsys, "wait", "c1", "--timeout", "60")[:2] == (0, "c1: idle\n")
    assert codex.api.texts().count(orch.CONTINUE_MESSAGE) == 1


def test_e2e_codex_approve_once_and_deny(codex, capsys):
    approve_once_and_deny(codex, capsys, "codex", "Bash")


def test_e2e_codex_sign_in_screen_first_contact(codex, capsys):
    # A new user: never signed in, and no model_provider of their own.
    with open(codex.codex_config) as f:
        theirs = f.read()
    with open(codex.codex_config, "w") as f:
        f.write("\n".join(line for line in theirs.splitlines()
                          if not line.startswith("model_provider")))
    level, message = sign_in_warning(capsys, "codex")
    assert level == "warning" and message.startswith("codex is not signed in")
    out = spawn_at_first_screen(capsys, "c1", ["--agent", "codex", "first words"], "sign-in",
                                "Choose how you want to use Codex.")
    assert "codex's sign-in screen" in out
    assert "no key in its window answers: run `codex login`" in out
    assert "orch keeps it, and `orch resume c1` types it" in out
    assert codex.api.texts() == []
    with open(codex.codex_config, "w") as f:        # signed in their own way: a provider
        f.write(theirs)
    assert sign_in_warning(capsys, "codex") is None
    assert run(capsys, "kill", "c1")[0] == 0
    code, out, err = run(capsys, "resume", "c1")
    assert code == 0 and "first message submitted" in out, (out, err)
    assert retry_until(lambda: codex.api.texts()) == ["first words"]
    assert run(capsys, "wait", "c1", "--timeout", "60")[:2] == (0, "c1: idle\n")


def test_e2e_codex_trust_and_the_users_files(codex, capsys, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    with open(codex.codex_config, "rb") as f:
        before = f.read()
    code, out, _ = run(capsys, "spawn", "u1", "--agent", "codex", "hi", "--cwd", str(repo))
    assert code == orch.EXIT_NEEDS_INPUT and "trust" in out and "not typed" in out, (out, _)
    assert status(capsys, "u1")["needs"] == "trust"
    assert run(capsys, "rm", "u1")[0] == 0
    code, out, err = run(capsys, "spawn", "t1", "--agent", "codex", "hi", "--cwd", str(repo),
                         "--trust")
    assert code == 0, err
    retry_until(lambda: "hi" in codex.api.texts())
    with open(codex.codex_config, "rb") as f:
        assert without_codex_counters(f.read()) == without_codex_counters(before)
    # A project's own codex hooks would run untrusted under orch's flag: refused.
    os.makedirs(str(repo / ".codex"))
    (repo / ".codex" / "hooks.json").write_text("{}")
    code, _, err = run(capsys, "spawn", "p1", "--agent", "codex", "--cwd", str(repo))
    assert code == 1 and one_error(err) and "codex hooks of its own" in err


def test_e2e_codex_working_interrupt_and_a_message_during_a_turn(codex, capsys):
    assert run(capsys, "spawn", "c1", "--agent", "codex", "SLOW-4 first")[0] == 0
    assert wait_status(capsys, "c1", "working")["last_prompt"] == "SLOW-4 first"
    code, out, err = run(capsys, "send", "c1", "second")      # codex joins it to the turn
    assert code == 0 and out in ("c1: submitted\n", "c1: queued\n"), err
    assert run(capsys, "wait", "c1", "--timeout", "60")[0] == 0
    retry_until(lambda: "second" in " ".join(codex.api.texts()))
    assert run(capsys, "send", "c1", "SLOW-30 long one")[0] == 0
    wait_status(capsys, "c1", "working")
    assert run(capsys, "interrupt", "c1")[0] == 0
    assert wait_status(capsys, "c1", "idle")["status_source"] == "hooks"


def test_e2e_codex_worktree_of_a_trusted_checkout(codex, repo, capsys):
    write_codex_config(codex.home, codex.api.url, [repo.repo])
    code, out, err = run(capsys, "spawn", "w1", "--agent", "codex", "hi", "--cwd", repo.repo,
                         "--worktree")
    assert code == 0, out + err
    worktree = status(capsys, "w1")["worktree"]
    assert worktree != repo.repo and codex.state()["agents"]["w1"]["trust"] is True
    retry_until(lambda: "hi" in codex.api.texts())


def half_typed_text_is_refused(world, capsys, name):
    """A person's words left in the input box: send refuses, --force clears them first."""
    wait_status(capsys, name, "idle")
    person_types(name, "l:half typed")
    agent = world.state()["agents"][name]
    retry_until(lambda: "half typed" in "\n".join(orch.agent_screen(agent)))
    code, _, err = run(capsys, "send", name, "orch's words")
    assert code == orch.EXIT_NEEDS_INPUT and "'half typed'" in err
    assert run(capsys, "send", name, "orch's words", "--force")[0] == 0
    retry_until(lambda: "orch's words" in world.api.texts())
    assert "half typed" not in " ".join(world.api.texts())


def test_e2e_codex_half_typed_text_is_refused(codex, capsys):
    assert run(capsys, "spawn", "c1", "--agent", "codex", "first")[0] == 0
    half_typed_text_is_refused(codex, capsys, "c1")


# ###########################################################################
# End to end: the real Gemini CLI against a fake Gemini API (make e2e)
# ###########################################################################

class FakeGemini(FakeAPI):
    """Serve streamGenerateContent on 127.0.0.1; record what each agent received.

    TOOL in the user's words asks for run_shell_command (gemini asks first);
    SLOW-N answers N seconds late; FAIL400 refuses the request; QUOTA-N answers
    as the Gemini API does at a per-minute quota whose retry is N s away,
    QUOTADAY as at a daily one (429 RESOURCE_EXHAUSTED with its details).
    """
    PATH = "/v1beta/models/"

    def handle_messages(self, handler, data):
        contents = data.get("contents") or []
        last = contents[-1] if contents else {}
        parts = last.get("parts") or [] if isinstance(last, dict) else []
        texts = [p["text"] for p in parts if isinstance(p.get("text"), str)
                 and not p["text"].startswith("<session_context>")]
        tool_result = any("functionResponse" in p for p in parts)
        history = [p.get("text", "") for c in contents for p in c.get("parts") or []
                   if c.get("role") == "user"]
        side = "countTokens" in handler.path or not data.get("tools")
        record = {"text": "\n".join(texts), "side": side, "tool_result": tool_result,
                  "history": json.dumps(history), "session": None, "time": time.time()}
        with self.lock:
            self.requests.append(record)
            n = len(self.requests)
        for word in record["text"].split() if not side and not tool_result else []:
            if word.startswith("SLOW-") and word[5:].isdigit():
                time.sleep(int(word[5:]))
        if not side and not tool_result and self.refused(handler, record["text"], "google"):
            return
        if "FAIL400" in record["text"] and not side and not tool_result:
            return self.fail(handler, 400, "INVALID_ARGUMENT",
                             "Request contains an invalid argument.", {}, google=True)
        quota = re.search(r"\bQUOTA(DAY|-\d+)", record["text"])
        if quota and not side and not tool_result:
            return self.quota(handler, quota.group(1))
        command = self.command_in(record["text"], n) if not side and not tool_result else None
        if command:
            part = {"functionCall": {"name": "run_shell_command", "args": {
                "command": command, "description": "make a file"}}}
        else:
            part = {"text": "tool finished" if tool_result else "reply %d: ok" % n}
        chunk = {"candidates": [{"content": {"role": "model", "parts": [part]},
                                 "finishReason": "STOP", "index": 0}],
                 "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5,
                                   "totalTokenCount": 15}, "modelVersion": "m"}
        if "countTokens" in handler.path:
            return handler.reply_json({"totalTokens": 10})
        if "stream" not in handler.path:
            return handler.reply_json(chunk)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(("data: %s\r\n\r\n" % json.dumps(chunk)).encode("utf-8"))
        handler.wfile.flush()

    @staticmethod
    def quota(handler, which):
        """Google's 429 at a quota: its message, QuotaFailure, Help and RetryInfo (which: DAY or -N)."""
        delay = "%ss" % (which[1:] if which != "DAY" else "23")
        per = "PerDay" if which == "DAY" else "PerMinute"
        body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": (
            "You exceeded your current quota, please check your plan and billing details. For "
            "more information on this error, head to: https://ai.google.dev/gemini-api/docs/"
            "rate-limits.\n* Quota exceeded for metric: generativelanguage.googleapis.com/"
            "generate_content_free_tier_requests, limit: 250, model: m\nPlease retry in %s."
            % delay), "details": [
                {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/"
                                   "generate_content_free_tier_requests",
                    "quotaId": "GenerateRequests%sPerProjectPerModel-FreeTier" % per,
                    "quotaDimensions": {"location": "global", "model": "m"},
                    "quotaValue": "250"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]}}
        FakeAPI.send_json(handler, 429, body)

    def texts(self, session=None):
        with self.lock:
            return [r["text"] for r in self.requests if not r["side"] and not r["tool_result"]]


def write_gemini_settings(home, trusted, extra=None):
    folder = os.path.join(home, ".gemini")
    os.makedirs(folder, exist_ok=True)
    settings = {"security": {"auth": {"selectedType": "gemini-api-key"}}, "model": {"name": "m"}}
    settings.update(extra or {})
    path = os.path.join(folder, "settings.json")
    with open(path, "w") as f:
        json.dump(settings, f)
    with open(os.path.join(folder, "trustedFolders.json"), "w") as f:
        json.dump(dict((d, "TRUST_FOLDER") for d in trusted), f)
    return path


def stop_recorded_agents():
    """gemini ignores SIGHUP: end what a test started by its recorded pids, not tmux alone."""
    for agent in read_state_or_empty()["agents"].values():
        pid = (agent.get("tmux") or {}).get("pid")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except (TypeError, OSError):
                break
            if not retry_until_quiet(lambda: orch.group_alive(pid), 5):
                break


def retry_until_quiet(check, timeout):
    """Poll check() until it is false; return whether it still holds (teardown: no failure)."""
    deadline = time.time() + timeout
    while check() and time.time() < deadline:
        time.sleep(0.1)
    return check()


@pytest.fixture
def gemini(env, monkeypatch):
    """The real gemini, offline: private HOME whose settings point at the fake Gemini API."""
    binary = os.environ.get("ORCH_E2E_GEMINI")
    if binary is None:
        pytest.skip("needs the real gemini: run `make e2e`, which installs it and sets "
                    "ORCH_E2E_GEMINI")
    api = FakeGemini().start()
    monkeypatch.setenv("ORCH_GEMINI", binary)
    monkeypatch.setenv("GEMINI_API_KEY", "orch-e2e-key")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", api.url)
    # CI systems set CI=true, which alone makes gemini refuse to run interactively.
    monkeypatch.setenv("CI", "true")
    env.hook_log = os.path.join(env.root, "users-hook.log")
    users_hook = {"hooks": {"AfterAgent": [{"hooks": [{"type": "command", "command":
                                                        "echo done >> %s" % env.hook_log}]}]}}
    env.gemini_settings = write_gemini_settings(env.home, [env.work], users_hook)
    env.api = api
    yield env
    stop_recorded_agents()
    env.stop()
    api.stop()


def test_e2e_gemini_sign_in_screen_first_contact(gemini, capsys):
    # No auth method chosen yet: gemini asks, even with GEMINI_API_KEY set (0.61.0).
    write_gemini_settings(gemini.home, [gemini.work], {"security": {}})
    level, message = sign_in_warning(capsys, "gemini")
    assert level == "warning" and message.startswith("gemini has no auth method selected")
    # Its hooks say it started: still never idle.
    out = spawn_at_first_screen(capsys, "g1", ["--agent", "gemini", "first words"], "sign-in",
                                "How would you like to authenticate for this project?")
    assert "`orch approve g1 --choice N` (1. Sign in with Google, 2. Use Gemini API Key" in out
    assert run(capsys, "wait", "g1", "--timeout", "5")[0] == 0
    assert gemini.api.texts() == []
    code, out, err = run(capsys, "approve", "g1", "--choice", "2")
    assert code == orch.EXIT_NEEDS_INPUT and "picked 2. Use Gemini API Key" in out, (out, err)
    # Then a field with the key from GEMINI_API_KEY in it, which Enter submits.
    assert "now waits at gemini's API-key question \"Enter Gemini API Key\"" in out, out
    assert "`orch approve g1` (Enter: " in out and "orch-e2e-key" not in out
    assert status(capsys, "g1")["needs"] == "api-key"
    code, out, err = run(capsys, "approve", "g1")
    assert code == 0 and "pressed Enter" in out, (out, err)
    assert "g1: first message submitted" in out, (out, err)
    assert retry_until(lambda: gemini.api.texts()) == ["first words"]
    assert run(capsys, "wait", "g1", "--timeout", "60")[:2] == (0, "g1: idle\n")
    assert run(capsys, "send", "g1", "and then")[:2] == (0, "g1: submitted\n")
    with open(gemini.gemini_settings) as f:     # the answer went to the agent's own copy
        assert "selectedType" not in f.read()


def test_e2e_gemini_spawn_send_wait_reply_log_kill_resume(gemini, capsys):
    with open(gemini.gemini_settings, "rb") as f:
        before = f.read()
    code, out, err = run(capsys, "spawn", "g1", "--agent", "gemini", "first words")
    assert code == 0 and "first message submitted" in out, err
    row = wait_status(capsys, "g1", "idle")
    assert row["agent"] == "gemini" and row["session_id"] == sid_of("g1")
    assert gemini.api.texts() == ["first words"]
    assert run(capsys, "send", "g1", "it's \"quoted\" $HOME `id`")[1] == "g1: submitted\n"
    assert run(capsys, "wait", "g1")[0] == 0
    assert re.match(r"reply \d+: ok\n$", run(capsys, "reply", "g1")[1])
    row = status(capsys, "g1")
    # Two answers, each as the fake reported it (10 in, 5 out), from gemini's chat file.
    assert row["tokens"] == {"input": 20, "output": 10, "cache_read": 0, "cache_write": 0}, row
    assert (row["context_tokens"], row["context_used"], row["cost_usd"]) == (15, None, None)
    log = run(capsys, "log", "g1")[1]
    assert "> first words" in log and "> it's \"quoted\" $HOME `id`" in log
    assert "gemini/tmux" in run(capsys, "list")[1]
    with open("/proc/%d/cmdline" % row["pid"], "rb") as f:
        assert b"first words" not in f.read()
    assert run(capsys, "kill", "g1")[0] == 0
    code, out, err = run(capsys, "resume", "g1", "which words?")
    assert code == 0, err
    retry_until(lambda: "which words?" in gemini.api.texts())
    with gemini.api.lock:
        last = [r for r in gemini.api.requests if r["text"] == "which words?"][-1]
    assert "first words" in last["history"]
    assert wait_status(capsys, "g1", "idle")["session_id"] == sid_of("g1")
    # The user's own settings: untouched, and their own hooks still run.
    with open(gemini.gemini_settings, "rb") as f:
        assert f.read() == before
    retry_until(lambda: os.path.exists(gemini.hook_log))


def test_e2e_gemini_notifications(gemini, capsys, receiver):
    notified_through_each_transition(capsys, receiver, ["--agent", "gemini"], [],
                                     "run_shell_command")


def test_e2e_gemini_a_turn_that_ends_on_an_api_error_is_not_done(gemini, capsys):
    assert run(capsys, "spawn", "g1", "--agent", "gemini", "first words")[0] == 0
    assert run(capsys, "wait", "g1", "--timeout", "60")[0] == 0
    assert run(capsys, "send", "g1", "FAIL400 second words")[:2] == (0, "g1: submitted\n")
    code, out, err = run(capsys, "wait", "g1", "--timeout", "60")
    assert (code, out) == (orch.EXIT_FAILED, "g1: idle (failed: INVALID_ARGUMENT)\n"), (out, err)
    row = status(capsys, "g1")
    assert row["error"] == "INVALID_ARGUMENT" and "invalid argument" in row["detail"]
    code, out, err = run(capsys, "reply", "g1")
    assert code == orch.EXIT_FAILED and out == "" and "INVALID_ARGUMENT" in err
    assert run(capsys, "send", "g1", "third words")[:2] == (0, "g1: submitted\n")
    assert run(capsys, "wait", "g1", "--timeout", "60")[:2] == (0, "g1: idle\n")
    assert status(capsys, "g1")["error"] is None


def test_e2e_gemini_a_refused_key_fails_and_an_overloaded_api_is_retried(gemini, capsys):
    # Google answers a bad key with 400 API_KEY_INVALID: gemini's word is its status.
    a_refused_key_fails_the_turn(capsys, "g1", "gemini", "INVALID_ARGUMENT",
                                 "API key not valid")
    # A 503 it retries for minutes, showing only "Thinking...": working, never done.
    asked = len(gemini.api.requests)
    assert run(capsys, "send", "g1", "FAIL529 fourth words")[:2] == (0, "g1: submitted\n")
    retry_until(lambda: len([r for r in gemini.api.requests[asked:] if not r["side"]]) >= 2, 60)
    assert status(capsys, "g1")["status"] == "working"
    assert run(capsys, "wait", "g1", "--timeout", "1")[0] == orch.EXIT_TIMEOUT
    assert run(capsys, "interrupt", "g1")[0] == 0
    assert run(capsys, "wait", "g1", "--timeout", "60")[0] == 0


def test_e2e_gemini_a_quota_is_limited_until_it_says(gemini, capsys, receiver):
    assert run(capsys, "notify", "add", "hook", "--webhook", receiver.url,
               "--on", "done,failed")[0] == 0
    assert run(capsys, "spawn", "g1", "--agent", "gemini", "first words")[0] == 0
    assert run(capsys, "wait", "g1", "--timeout", "60")[0] == 0
    sent = time.time()
    assert run(capsys, "send", "g1", "QUOTA-3600 second words")[:2] == (0, "g1: submitted\n")
    # No hook fires at its usage-limit box: the screen says limited, and until when.
    row = retry_until(lambda: [r for r in [status(capsys, "g1")] if r["status"] == "limited"], 60)[0]
    assert (row["error"], row["needs"]) == ("RESOURCE_EXHAUSTED", "dialog"), row
    assert row["detail"].startswith("Usage limit reached for m. Access resets at "), row
    # Said to the minute, an hour after the 429.
    assert sent + 3600 <= orch.epoch_of(row["resets_at"]) <= time.time() + 3660, row
    code, out, err = run(capsys, "wait", "g1", "--timeout", "5")
    assert code == orch.EXIT_FAILED and out.startswith("g1: limited until "), (out, err)
    asked = len(gemini.api.requests)
    code, _, err = run(capsys, "send", "g1", "more words")     # an Enter would pick a choice
    assert code == orch.EXIT_NEEDS_INPUT and "Usage limit reached" in err, err
    code, out, err = run(capsys, "deny", "g1")      # its "no": Stop
    assert code == 0 and "(2. Stop)" in out, (out, err)
    # The turn ended on the quota: still limited, the time from what gemini wrote.
    row = retry_until(lambda: [r for r in [status(capsys, "g1")] if r["status"] == "limited"
                               and r["needs"] is None], 30)[0]
    assert row["error"] == "RESOURCE_EXHAUSTED" and "exceeded your current quota" in row["detail"]
    assert sent + 3600 <= orch.epoch_of(row["resets_at"]) <= time.time() + 3600, row
    assert len(gemini.api.requests) == asked and gemini.api.texts().count(
        "QUOTA-3600 second words") == 1         # gemini asked once, and nothing was typed
    code, out, err = run(capsys, "reply", "g1")
    assert code == orch.EXIT_FAILED and out == "" and "RESOURCE_EXHAUSTED" in err
    assert run(capsys, "send", "g1", "third words")[:2] == (0, "g1: submitted\n")
    assert run(capsys, "wait", "g1", "--timeout", "60")[:2] == (0, "g1: idle\n")
    assert status(capsys, "g1")["error"] is None
    # Told once that the quota stopped it (at its box), never that the turn was done.
    told = events_of(receiver, "g1", 3, 60)
    assert [e["event"] for e in told] == ["done", "failed", "done"], told
    assert told[1]["detail"].startswith("RESOURCE_EXHAUSTED: Usage limit reached for m.")


def test_e2e_gemini_on_limit_continue_stops_at_its_box(gemini, capsys):
    assert run(capsys, "spawn", "g1", "--agent", "gemini", "first words",
               "--on-limit", "continue")[0] == 0
    assert run(capsys, "wait", "g1", "--timeout", "60")[0] == 0
    assert run(capsys, "send", "g1", "QUOTADAY second words")[:2] == (0, "g1: submitted\n")
    # The watcher picks "Stop" (never "Keep trying", which asks again), and nothing more:
    # a daily quota says no time to continue at.
    row = retry_until(lambda: [r for r in [status(capsys, "g1")] if r["status"] == "limited"
                               and r["needs"] is None], 60)[0]
    assert (row["error"], row["resets_at"]) == ("RESOURCE_EXHAUSTED", None), row
    assert "daily quota" in row["detail"]
    assert "limited (RESOURCE_EXHAUSTED)" in run(capsys, "list")[1]
    log = os.path.join(orch.agent_dir("g1"), "held-log.jsonl")
    retry_until(lambda: "answered 'Usage limit reached for m.': Stop" in [
        e["outcome"] for e in orch.read_json_lines(log)], 30)
    assert gemini.api.texts().count("QUOTADAY second words") == 1
    assert orch.CONTINUE_MESSAGE not in gemini.api.texts() and not orch.load_held("g1")


def test_e2e_gemini_approve_once_and_deny(gemini, capsys):
    denied = approve_once_and_deny(gemini, capsys, "gemini", "run_shell_command")
    assert denied["status_source"] == "screen"      # no hook says a dialog was cancelled


def test_e2e_gemini_trust_and_half_typed_text(gemini, capsys, tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    code, out, _ = run(capsys, "spawn", "u1", "--agent", "gemini", "hi", "--cwd", str(fresh))
    if code == 0:
        pytest.fail("gemini started in an untrusted folder without asking: %s" % out)
    assert code == orch.EXIT_NEEDS_INPUT and "trust" in out
    assert run(capsys, "rm", "u1")[0] == 0
    code, out, err = run(capsys, "spawn", "t1", "--agent", "gemini", "hi", "--cwd", str(fresh),
                         "--trust")
    assert code == 0, err
    with open(os.path.join(gemini.home, ".gemini", "trustedFolders.json")) as f:
        assert str(fresh) not in json.load(f)      # trusted for that agent, not in your file
    person_types("t1", "l:half typed")
    agent = gemini.state()["agents"]["t1"]
    retry_until(lambda: "half typed" in "\n".join(orch.agent_screen(agent)))
    code, _, err = run(capsys, "send", "t1", "orch's words")
    assert code == orch.EXIT_NEEDS_INPUT and "'half typed'" in err


def every_other_verb(world, capsys, kind, prefix):
    """send --to, events, status-line, tail, interrupt and rm on two agents of one kind."""
    names = [prefix + "1", prefix + "2"]
    for name in names:
        assert run(capsys, "spawn", name, "--agent", kind, "hello " + name)[0] == 0
    assert run(capsys, "wait", *names, "--timeout", "60")[0] == 0
    # --since: its first look prints where the agent is now; changes come after it.
    feed = subprocess.Popen([sys.executable, ORCH, "events", names[0], "--json", "--since",
                             "600"], stdout=subprocess.PIPE, universal_newlines=True)
    try:
        lines = feed_lines(feed)
        assert json.loads(next_line(lines, 60))["to"] == "idle"
        code, out, err = run(capsys, "send", "--to", ",".join(names), "SLOW-30 for all")
        assert (code, sorted(out.splitlines())) == (0, sorted(n + ": submitted" for n in names)), err
        change = json.loads(next_line(lines, 60))
        assert (change["name"], change["to"]) == (names[0], "working"), change
    finally:
        feed.kill()
        feed.communicate()
    rows = json.loads(run(capsys, "list", "--json")[1])
    told = [r for r in rows if r["context_used"] is not None]
    peak = max(told, key=lambda r: r["context_used"]) if told else None
    assert run(capsys, "status-line")[1] == "orch: 2 working%s\n" % (
        " \u00b7 ctx %d%% %s" % (round(100 * peak["context_used"]), peak["name"]) if peak else "")
    assert "SLOW-30 for all" in run(capsys, "tail", names[0])[1]
    assert run(capsys, "interrupt", names[0])[0] == 0
    assert wait_status(capsys, names[0], "idle", 30)["status"] == "idle"
    assert run(capsys, "send", names[0], "after the interrupt")[0] == 0
    retry_until(lambda: "after the interrupt" in world.api.texts())
    assert run(capsys, "rm", "--force", *names)[0] == 0
    assert run(capsys, "list", "--json")[1].strip() == "[]"


def test_e2e_codex_every_other_verb(codex, capsys):
    every_other_verb(codex, capsys, "codex", "c")


def test_e2e_gemini_every_other_verb(gemini, capsys):
    every_other_verb(gemini, capsys, "gemini", "g")


def test_e2e_gemini_worktree(gemini, repo, capsys):
    code, out, err = run(capsys, "spawn", "w1", "--agent", "gemini", "hi", "--cwd", repo.repo,
                         "--worktree", "--trust")
    assert code == 0, out + err
    assert status(capsys, "w1")["worktree"] != repo.repo
    retry_until(lambda: "hi" in gemini.api.texts())


def round_trip_on_a_host(world, monkeypatch, kind, extra_env):
    hosts = Hosts(world, ["h1"], extra_env)
    monkeypatch.setenv("ORCH_SSH_CONFIG", hosts.config)
    try:
        code, out, err = cli("spawn", "r1@h1", "--agent", kind, "hello from afar", "--cwd",
                             world.work)
        assert code == 0 and "started agent r1 (%s, tmux" % kind in out, out + err
        retry_until(lambda: "hello from afar" in world.api.texts())
        assert cli("wait", "r1@h1", "--timeout", "60")[:2] == (0, "r1: idle\n")
        assert cli("send", "r1@h1", "and more")[:2] == (0, "r1: submitted\n")
        assert cli("wait", "r1@h1", "--timeout", "60")[:2] == (0, "r1: idle\n")
        assert re.match(r"reply \d+: ok\n$", cli("reply", "r1@h1")[1])
        assert hosts.state("h1")["agents"]["r1"]["agent"] == kind
        assert cli("rm", "r1@h1")[:2] == (0, "removed r1\n")
    finally:
        hosts.stop()


def test_e2e_codex_round_trip_on_a_remote_host(codex, monkeypatch):
    round_trip_on_a_host(codex, monkeypatch, "codex", {"ORCH_CODEX": os.environ["ORCH_CODEX"]})


def test_e2e_gemini_round_trip_on_a_remote_host(gemini, monkeypatch):
    round_trip_on_a_host(gemini, monkeypatch, "gemini", {
        "ORCH_GEMINI": os.environ["ORCH_GEMINI"], "GEMINI_API_KEY": "orch-e2e-key",
        "GOOGLE_GEMINI_BASE_URL": gemini.api.url})


# ###########################################################################
# End to end: OpenCode and Copilot CLI against a fake Chat Completions API (make e2e)
# ###########################################################################

class FakeChat(FakeAPI):
    """Serve OpenAI's /v1/chat/completions (streamed) on 127.0.0.1, as both CLIs call it.

    TOOL in the user's words asks for a `bash` call (a dialog where the
    CLI asks first); SLOW-N answers N seconds late; FAIL429 answers 429 as
    OpenAI does.  A request with no tools is a side one (opencode's title).
    Each answer reports 10 input tokens (3 of them cached) and 5 output.
    """
    PATH = "/v1/chat/completions"
    TOOL_ARGS = staticmethod(lambda command: {"command": command, "description": "make a file"})

    def handle_messages(self, handler, data):
        messages = data.get("messages") or []
        last = messages[-1] if messages else {}
        tool_result = last.get("role") == "tool"
        history = [self.words(m) for m in messages if m.get("role") == "user"]
        side = not data.get("tools")
        record = {"text": history[-1] if history else "", "side": side,
                  "tool_result": tool_result, "history": json.dumps(history),
                  "session": handler.headers.get("x-session-id"), "time": time.time()}
        with self.lock:
            self.requests.append(record)
            n = len(self.requests)
        mine = not side and not tool_result
        for word in record["text"].split() if mine else []:
            if word.startswith("SLOW-") and word[5:].isdigit():
                time.sleep(int(word[5:]))
        if mine and "FAIL429" in record["text"]:
            return self.openai_429(handler, record["text"])
        if mine and self.refused(handler, record["text"], "openai"):
            return
        command = self.command_in(record["text"], n) if mine else None
        delta = {"role": "assistant", "content": "tool finished" if tool_result else
                 "Fake title" if side else "reply %d: ok" % n}
        finish = "stop"
        if command:
            delta = {"role": "assistant", "content": None, "tool_calls": [{
                "index": 0, "id": "call_%d" % n, "type": "function", "function": {
                    "name": "bash", "arguments": json.dumps(self.TOOL_ARGS(command))}}]}
            finish = "tool_calls"
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                 "prompt_tokens_details": {"cached_tokens": 3}}
        chunks = [{"choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
                  {"choices": [], "usage": usage}]
        if not data.get("stream"):
            message = dict(delta)
            message.pop("index", None)
            return handler.reply_json({"id": "chatcmpl-%d" % n, "object": "chat.completion",
                                       "model": data.get("model"), "usage": usage,
                                       "choices": [{"index": 0, "message": message,
                                                    "finish_reason": finish}]})
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        for chunk in chunks:
            body = dict(chunk, id="chatcmpl-%d" % n, object="chat.completion.chunk",
                        created=int(time.time()), model=data.get("model") or "m")
            handler.wfile.write(("data: %s\n\n" % json.dumps(body)).encode("utf-8"))
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()

    @staticmethod
    def words(message):
        """A user message's own text: copilot puts its <current_datetime> before it."""
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(part.get("text", "") for part in content
                                if isinstance(part, dict))
        text = content if isinstance(content, str) else ""
        return re.sub(r"^(<current_datetime>.*?</current_datetime>\s*)", "", text, flags=re.S)

    def texts(self, session=None):
        with self.lock:
            return [r["text"] for r in self.requests if not r["side"] and not r["tool_result"]
                    and (session is None or r["session"] == session)]


# Run opencode offline: no update check, no models.dev fetch, no LSP download, and no npm
# install of its plugin package at start (held the first request ~70 s offline).
OPENCODE_OFFLINE = {"OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1",
                    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1", "OPENCODE_DISABLE_SHARE": "1",
                    "npm_config_offline": "true"}
# A plugin of the user's, given the way orch gives its own: it must still load.
USERS_OPENCODE_PLUGIN = """import { appendFileSync } from "node:fs"
export const Theirs = async () => ({ "chat.message": async () => appendFileSync(%s, "theirs\\n") })
"""


def write_opencode_config(home, url):
    folder = os.path.join(home, ".config", "opencode")
    os.makedirs(folder, exist_ok=True)
    config = {"$schema": "https://opencode.ai/config.json", "model": "fake/m",
              "provider": {"fake": {"npm": "@ai-sdk/openai-compatible", "name": "Fake",
                                    "options": {"baseURL": url + "/v1", "apiKey": "sk-fake"},
                                    "models": {"m": {"name": "Fake M"}}}},
              "permission": {"bash": "ask"}}      # it runs bash unasked by default
    path = os.path.join(folder, "opencode.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def files_under(folder, skip=()):
    """{relative path: bytes} of every file under folder, except those under skip."""
    found = {}
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(top, d), folder) not in skip]
        for name in files:
            path = os.path.join(top, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


@pytest.fixture
def opencode(env, monkeypatch):
    """The real opencode, offline: private HOME whose config names the fake Chat API."""
    binary = os.environ.get("ORCH_E2E_OPENCODE")
    if binary is None:
        pytest.skip("needs the real opencode: run `make e2e`, which installs it and sets "
                    "ORCH_E2E_OPENCODE")
    api = FakeChat().start()
    monkeypatch.setenv("ORCH_OPENCODE", binary)
    for key, value in OPENCODE_OFFLINE.items():
        monkeypatch.setenv(key, value)
    env.opencode_config = write_opencode_config(env.home, api.url)
    env.plugin_log = os.path.join(env.root, "users-plugin.log")
    plugin = os.path.join(env.root, "users-plugin.js")
    with open(plugin, "w") as f:
        f.write(USERS_OPENCODE_PLUGIN % json.dumps(env.plugin_log))
    monkeypatch.setenv("OPENCODE_CONFIG_CONTENT", json.dumps({"plugin": ["file://" + plugin]}))
    env.api = api
    yield env
    stop_recorded_agents()
    env.stop()
    api.stop()


def test_e2e_opencode_spawn_send_wait_reply_log_kill_resume(opencode, capsys):
    before = files_under(os.path.join(opencode.home, ".config"))
    work = files_under(opencode.work, skip=(".git",))
    code, out, err = run(capsys, "spawn", "o1", "--agent", "opencode", "first words")
    assert code == 0 and "first message submitted" in out, err
    row = wait_status(capsys, "o1", "idle")
    sid = row["session_id"]
    assert row["agent"] == "opencode" and sid.startswith("ses_") and sid in out
    assert opencode.api.texts(sid) == ["first words"]
    code, out, err = run(capsys, "send", "o1", "it's \"quoted\" $HOME `id`")
    assert (code, out) == (0, "o1: submitted\n"), err
    assert run(capsys, "wait", "o1")[0] == 0
    with opencode.api.lock:
        answered = [n for n, r in enumerate(opencode.api.requests, 1)
                    if r["text"].startswith("it's")]
    assert run(capsys, "reply", "o1")[1] == "reply %d: ok\n" % answered[-1]
    log = run(capsys, "log", "o1")[1]
    assert "> first words" in log and "> it's \"quoted\" $HOME `id`" in log
    assert "\u25cf reply %d: ok" % answered[-1] in log and "\u2714 turn done" in log
    assert "opencode/tmux" in run(capsys, "list")[1]
    row = status(capsys, "o1")
    # Two answers, each as the fake reported it: 10 input (3 of them cached), 5 output.
    assert row["tokens"] == {"input": 14, "output": 10, "cache_read": 6, "cache_write": 0}, row
    assert row["context_tokens"] == 15 and row["cost_usd"] == 0    # opencode's own $0.00
    assert abs(row["rss_bytes"] - proc_tree_rss(row["pid"])) < 0.1 * row["rss_bytes"]
    with open("/proc/%d/cmdline" % row["pid"], "rb") as f:
        assert b"first words" not in f.read()
    assert run(capsys, "kill", "o1")[0] == 0
    assert status(capsys, "o1")["status"] == "exited"
    code, out, err = run(capsys, "resume", "o1", "which words?")
    assert code == 0 and sid in out, out + err
    retry_until(lambda: "which words?" in opencode.api.texts(sid))
    with opencode.api.lock:
        last = [r for r in opencode.api.requests if r["text"] == "which words?"][-1]
    assert "first words" in last["history"]
    assert wait_status(capsys, "o1", "idle")["session_id"] == sid
    # The user's plugin ran beside orch's; their files are as they were, but for
    # the .gitignore opencode writes into its config folder itself.
    with open(opencode.plugin_log) as f:
        assert f.read().count("theirs") == 3
    after = files_under(os.path.join(opencode.home, ".config"))
    assert set(after) - set(before) <= {"opencode/.gitignore"}
    assert dict((k, v) for k, v in after.items() if k in before) == before
    assert files_under(opencode.work, skip=(".git",)) == work


def test_e2e_opencode_approve_once_and_deny(opencode, capsys):
    approve_once_and_deny(opencode, capsys, "opencode", "bash")


def test_e2e_opencode_a_refused_key_fails_and_an_overloaded_api_is_retried(opencode, capsys):
    a_refused_key_fails_the_turn(capsys, "f1", "opencode", "APIError",
                                 "401 Incorrect API key provided")
    # A 503 it retries with growing waits (five times, over a minute): working, and why.
    assert run(capsys, "send", "f1", "FAIL529 fourth words")[:2] == (0, "f1: submitted\n")
    row = while_retrying(capsys, "f1")
    assert row["status"] == "working" and row["detail"].startswith(
        "retrying: The server is overloaded or not ready yet., attempt "), row
    assert run(capsys, "interrupt", "f1")[0] == 0
    assert run(capsys, "wait", "f1", "--timeout", "60")[:2] == (0, "f1: idle\n")


def test_e2e_opencode_a_retried_then_failed_turn_is_not_done(opencode, capsys):
    assert run(capsys, "spawn", "f1", "--agent", "opencode", "first words")[0] == 0
    assert run(capsys, "wait", "f1", "--timeout", "60")[0] == 0
    assert run(capsys, "send", "f1", "FAIL429 second words")[:2] == (0, "f1: submitted\n")
    # It retries a 429 (five times, a second apart, as retry-after says): working, and why.
    row = while_retrying(capsys, "f1")
    assert row["status"] == "working" and row["detail"].startswith(
        "retrying: Rate limit reached for requests, attempt "), row
    code, out, err = run(capsys, "wait", "f1", "--timeout", "60")
    assert (code, out) == (orch.EXIT_FAILED, "f1: idle (failed: APIError)\n"), (out, err)
    assert "429" in status(capsys, "f1")["detail"]
    code, out, err = run(capsys, "reply", "f1")
    assert code == orch.EXIT_FAILED and out == "" and "APIError" in err
    assert run(capsys, "send", "f1", "third words")[:2] == (0, "f1: submitted\n")
    assert run(capsys, "wait", "f1", "--timeout", "60")[:2] == (0, "f1: idle\n")
    assert status(capsys, "f1")["error"] is None and run(capsys, "reply", "f1")[0] == 0
    # A retry-after of an hour: opencode waits it out by itself, and orch says until when.
    sent = time.time()
    assert run(capsys, "send", "f1", "FAIL429-3600 fourth words")[:2] == (0, "f1: submitted\n")
    row = while_retrying(capsys, "f1")
    assert row["status"] == "working" and row["detail"].endswith(tuple(
        "attempt 1, next try at " + time.strftime("%H:%M", time.localtime(t + 3600))
        for t in (sent, time.time()))), row


def test_e2e_opencode_every_other_verb(opencode, capsys):
    every_other_verb(opencode, capsys, "opencode", "o")


def test_e2e_opencode_fleet_comes_back_after_a_reboot(opencode, capsys):
    # opencode says nothing as it exits, quit or signalled: after a reboot it comes back.
    reboot_and_resume_all(opencode, capsys, "opencode", quit_stays_down=False)


def test_e2e_opencode_agent_starts_an_agent(opencode, capsys):
    agent_starts_agent(opencode, capsys, "opencode", "bash")


def test_e2e_opencode_notifications(opencode, capsys, receiver):
    notified_through_each_transition(capsys, receiver, ["--agent", "opencode"], [], "bash")


def test_e2e_opencode_worktree_and_half_typed_text(opencode, repo, capsys):
    code, out, err = run(capsys, "spawn", "w1", "--agent", "opencode", "hi", "--cwd", repo.repo,
                         "--worktree")
    assert code == 0, out + err
    assert status(capsys, "w1")["worktree"] != repo.repo
    retry_until(lambda: "hi" in opencode.api.texts())
    half_typed_text_is_refused(opencode, capsys, "w1")


def test_e2e_opencode_round_trip_on_a_remote_host(opencode, monkeypatch):
    round_trip_on_a_host(opencode, monkeypatch, "opencode", dict(
        OPENCODE_OFFLINE, ORCH_OPENCODE=os.environ["ORCH_OPENCODE"]))


def write_copilot_config(home, trusted):
    """~/.copilot as a user who trusts some folders and has a hook of their own."""
    folder = os.path.join(home, ".copilot")
    os.makedirs(os.path.join(folder, "hooks"), exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"trustedFolders": list(trusted)}, f)
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump({"model": "m"}, f)
    log = os.path.join(home, "users-hook.log")
    with open(os.path.join(folder, "hooks", "theirs.json"), "w") as f:
        json.dump({"version": 1, "hooks": {"agentStop": [
            {"type": "command", "bash": "echo done >> %s" % log, "timeoutSec": 10}]}}, f)
    return folder, log


def copilot_trusted(home):
    with open(os.path.join(home, ".copilot", "config.json")) as f:
        text = "\n".join(l for l in f.read().splitlines() if not l.startswith("//"))
    return json.loads(text).get("trustedFolders")


@pytest.fixture
def copilot(env, monkeypatch):
    """The real Copilot CLI, offline: a provider of the user's own (the fake Chat API)."""
    binary = os.environ.get("ORCH_E2E_COPILOT")
    if binary is None:
        pytest.skip("needs the real copilot: run `make e2e`, which installs it and sets "
                    "ORCH_E2E_COPILOT")
    api = FakeChat().start()
    monkeypatch.setenv("ORCH_COPILOT", binary)
    for key, value in {"COPILOT_PROVIDER_BASE_URL": api.url + "/v1", "COPILOT_MODEL": "m",
                       "COPILOT_PROVIDER_API_KEY": "sk-fake", "COPILOT_OFFLINE": "true",
                       "COPILOT_AUTO_UPDATE": "false",
                       # It unpacks ~235 MB at its first start: once, for every test.
                       "COPILOT_PKG_CACHE_HOME": os.path.join(
                           os.path.dirname(os.path.dirname(os.path.dirname(binary))),
                           "pkg-cache")}.items():
        monkeypatch.setenv(key, value)
    env.copilot_home, env.hook_log = write_copilot_config(env.home, [env.work])
    env.api = api
    yield env
    stop_recorded_agents()
    env.stop()
    api.stop()


def test_e2e_copilot_spawn_send_wait_reply_log_kill_resume(copilot, capsys):
    settings = files_under(copilot.copilot_home)
    code, out, err = run(capsys, "spawn", "p1", "--agent", "copilot", "first words")
    assert code == 0 and "first message submitted" in out, err
    row = wait_status(capsys, "p1", "idle")
    sid = row["session_id"]
    assert row["agent"] == "copilot" and sid == sid_of("p1") and sid in out
    assert copilot.api.texts() == ["first words"]
    code, out, err = run(capsys, "send", "p1", "it's \"quoted\" $HOME `id`")
    assert (code, out) == (0, "p1: submitted\n"), err
    assert run(capsys, "wait", "p1")[0] == 0
    with copilot.api.lock:
        answered = [n for n, r in enumerate(copilot.api.requests, 1)
                    if r["text"].startswith("it's")]
    assert run(capsys, "reply", "p1")[1] == "reply %d: ok\n" % answered[-1]
    log = run(capsys, "log", "p1")[1]
    assert "> first words" in log and "> it's \"quoted\" $HOME `id`" in log
    assert "\u25cf reply %d: ok" % answered[-1] in log and "\u2714 turn done" in log
    row = status(capsys, "p1")
    # Two answers, each as the fake reported it: 10 input (3 of them cached), 5 output.
    assert row["tokens"] == {"input": 14, "output": 10, "cache_read": 6, "cache_write": 0}, row
    assert row["context_tokens"] == 15 and row["cost_usd"] == 0
    assert abs(row["rss_bytes"] - proc_tree_rss(row["pid"])) < 0.1 * row["rss_bytes"]
    with open("/proc/%d/cmdline" % row["pid"], "rb") as f:
        assert b"first words" not in f.read()
    assert run(capsys, "kill", "p1")[0] == 0
    code, out, err = run(capsys, "resume", "p1", "which words?")
    assert code == 0 and sid in out, out + err
    retry_until(lambda: "which words?" in copilot.api.texts())
    with copilot.api.lock:
        last = [r for r in copilot.api.requests if r["text"] == "which words?"][-1]
    assert "first words" in last["history"]
    assert wait_status(capsys, "p1", "idle")["session_id"] == sid
    # The user's own hook ran beside orch's; their files are theirs (copilot itself
    # adds to config.json, "managed automatically", and writes its sessions and logs).
    retry_until(lambda: os.path.exists(copilot.hook_log))
    now = files_under(copilot.copilot_home)
    assert dict((k, now[k]) for k in settings if k != "config.json") == dict(
        (k, v) for k, v in settings.items() if k != "config.json")
    assert copilot_trusted(copilot.home) == [copilot.work]


def test_e2e_copilot_never_signed_in_first_contact(copilot, capsys, monkeypatch):
    # No GitHub login and no provider of the user's: its input line is drawn under
    # "Please use /login", and nothing typed there would be answered.
    for key in ("COPILOT_PROVIDER_BASE_URL", "COPILOT_OFFLINE"):
        monkeypatch.delenv(key)
    out = spawn_at_first_screen(capsys, "s1", ["--agent", "copilot", "first words"], "sign-in",
                                "Please use /login to sign in to use Copilot")
    assert "copilot's sign-in screen" in out and "no key in its window answers" in out
    assert "orch keeps it, and `orch resume s1` types it" in out
    assert run(capsys, "send", "s1", "hello?")[0] == orch.EXIT_NEEDS_INPUT
    monkeypatch.setenv("COPILOT_PROVIDER_BASE_URL", copilot.api.url + "/v1")
    monkeypatch.setenv("COPILOT_OFFLINE", "true")
    assert run(capsys, "kill", "s1")[0] == 0
    code, out, err = run(capsys, "resume", "s1")
    assert code == 0 and "first message submitted" in out, (out, err)
    assert retry_until(lambda: copilot.api.texts()) == ["first words"]


def test_e2e_copilot_approve_once_and_deny(copilot, capsys):
    denied = approve_once_and_deny(copilot, capsys, "copilot", "bash")
    assert denied["status_source"] == "transcript"      # no hook says it was cancelled


def test_e2e_copilot_a_refused_key_and_an_overloaded_api_are_failed_turns(copilot, capsys):
    a_refused_key_fails_the_turn(capsys, "f1", "copilot", "authentication",
                                 "Authentication failed with provider")
    # A 503 it retries five times (about 17 s), then gives up.
    row = failed_turn(capsys, "f1", "FAIL529 fourth words", "query")
    assert "503 The server is overloaded" in row["detail"], row


def test_e2e_copilot_a_retried_then_failed_turn_is_not_done(copilot, capsys):
    assert run(capsys, "spawn", "f1", "--agent", "copilot", "first words")[0] == 0
    assert run(capsys, "wait", "f1", "--timeout", "60")[0] == 0
    assert run(capsys, "send", "f1", "FAIL429 second words")[:2] == (0, "f1: submitted\n")
    row = while_retrying(capsys, "f1")
    assert (row["status"], row["detail"]) == (
        "working", "retrying: Rate limit reached for requests"), row
    code, out, err = run(capsys, "wait", "f1", "--timeout", "60")
    assert (code, out) == (orch.EXIT_FAILED, "f1: idle (failed: rate_limit)\n"), (out, err)
    row = status(capsys, "f1")
    assert "429" in row["detail"] and row["status_source"] == "transcript"
    code, out, err = run(capsys, "reply", "f1")
    assert code == orch.EXIT_FAILED and out == "" and "rate_limit" in err
    assert run(capsys, "send", "f1", "third words")[:2] == (0, "f1: submitted\n")
    assert run(capsys, "wait", "f1", "--timeout", "60")[:2] == (0, "f1: idle\n")
    assert status(capsys, "f1")["error"] is None and run(capsys, "reply", "f1")[0] == 0
    # A retry-after of an hour: it gives up at once, and says not when: failed, not limited.
    asked = len(copilot.api.requests)
    assert run(capsys, "send", "f1", "FAIL429-3600 fourth words")[:2] == (0, "f1: submitted\n")
    code, out, err = run(capsys, "wait", "f1", "--timeout", "60")
    assert (code, out) == (orch.EXIT_FAILED, "f1: idle (failed: rate_limit)\n"), (out, err)
    assert len([r for r in copilot.api.requests[asked:] if not r["side"]]) == 1


def test_e2e_copilot_a_message_during_a_turn_waits_and_runs_after_it(copilot, capsys):
    assert run(capsys, "spawn", "q1", "--agent", "copilot", "SLOW-4 first")[0] == 0
    assert wait_status(capsys, "q1", "working")["last_prompt"] == "SLOW-4 first"
    assert run(capsys, "send", "q1", "second")[:2] == (0, "q1: queued\n")
    # wait returns once the waiting message's own turn is over, not between the two.
    assert run(capsys, "wait", "q1", "--timeout", "60")[:2] == (0, "q1: idle\n")
    assert copilot.api.texts() == ["SLOW-4 first", "second"]
    assert status(capsys, "q1")["last_prompt"] == "second"


def test_e2e_copilot_every_other_verb(copilot, capsys):
    every_other_verb(copilot, capsys, "copilot", "p")


def test_e2e_copilot_fleet_comes_back_after_a_reboot(copilot, capsys):
    # Its SessionEnd says user_exit for /quit and for a signal alike: it comes back.
    reboot_and_resume_all(copilot, capsys, "copilot", quit_stays_down=False)


def test_e2e_copilot_agent_starts_an_agent(copilot, capsys):
    # Copilot keeps its provider's settings from the commands it runs (the key among
    # them); a person signed in with GitHub needs none.  Here the child reads them back.
    told = os.path.join(copilot.root, "provider.env")
    with open(told, "w") as f:
        f.write("".join("export %s=%s\n" % (k, shlex.quote(os.environ[k])) for k in (
            "COPILOT_PROVIDER_BASE_URL", "COPILOT_PROVIDER_API_KEY", "COPILOT_OFFLINE")))
    agent_starts_agent(copilot, capsys, "copilot", "bash", before=". %s && " % told)


def test_e2e_copilot_notifications(copilot, capsys, receiver):
    notified_through_each_transition(capsys, receiver, ["--agent", "copilot"], [], "bash")


def test_e2e_copilot_trust_worktree_and_half_typed_text(copilot, repo, capsys, tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    code, out, _ = run(capsys, "spawn", "u1", "--agent", "copilot", "hi", "--cwd", str(fresh))
    assert code == orch.EXIT_NEEDS_INPUT and "trust" in out and "not typed" in out, out
    assert status(capsys, "u1")["needs"] == "trust"
    assert run(capsys, "rm", "u1")[0] == 0
    assert copilot_trusted(copilot.home) == [copilot.work]
    code, out, err = run(capsys, "spawn", "t1", "--agent", "copilot", "hi", "--cwd", str(fresh),
                         "--trust")
    assert code == 0 and "first message submitted" in out, out + err
    # Answered "Yes, and remember this folder": copilot recorded it, as it does.
    assert copilot_trusted(copilot.home) == [copilot.work, str(fresh)]
    code, out, err = run(capsys, "spawn", "w1", "--agent", "copilot", "in a worktree", "--cwd",
                         repo.repo, "--worktree", "--trust")
    assert code == 0, out + err
    assert status(capsys, "w1")["worktree"] != repo.repo
    retry_until(lambda: "in a worktree" in copilot.api.texts())
    half_typed_text_is_refused(copilot, capsys, "t1")


def test_e2e_copilot_round_trip_on_a_remote_host(copilot, monkeypatch):
    round_trip_on_a_host(copilot, monkeypatch, "copilot", dict(
        (key, os.environ[key]) for key in (
            "ORCH_COPILOT", "COPILOT_PROVIDER_BASE_URL", "COPILOT_MODEL",
            "COPILOT_PROVIDER_API_KEY", "COPILOT_OFFLINE", "COPILOT_AUTO_UPDATE",
            "COPILOT_PKG_CACHE_HOME")))


# ###########################################################################
# Benchmark (make bench): wall times against the floor, and tmux calls per verb
# ###########################################################################

def bench_time(argv, env, repeat):
    """Run argv repeat times; return sorted wall times in ms."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)


def bench_interleaved(commands, repeat):
    """Time each (argv list, env) command once per round, round after round.

    Interleaving puts the same machine noise on every command of a round, so
    ratios between them hold up on a busy machine; returns sorted ms per command.
    """
    times = [[] for _ in commands]
    for _ in range(repeat):
        for i, (argvs, env) in enumerate(commands):
            start = time.perf_counter()
            for argv in argvs:
                subprocess.run(argv, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=True)
            times[i].append((time.perf_counter() - start) * 1000)
    return [sorted(t) for t in times]


def tmux_calls(argv, env):
    proc = subprocess.run(argv, env=dict(env, ORCH_TRACE="1"), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, universal_newlines=True, check=True)
    return proc.stderr.count("orch: trace: tmux")


def bench_events(count, working=True):
    """count hook events as orch's hook writes them for hours of work (~260 bytes each).

    Turns of prompt, two tool calls and a reply.  working: the last event
    starts a turn, so the agent reads as working (what `wait` keeps polling),
    its hooks silent long enough that its screen is read.
    """
    lines = [{"t": 1.0, "event": "SessionStart", "session_id": "s", "source": "startup"}]
    turn = 0
    while len(lines) < count - 1:
        turn += 1
        prompt = "please refactor module %d so that the tests pass and the docs stay true" % turn
        pid, t = "prompt-%06d" % turn, 1.0 + turn
        lines += [{"t": t, "event": "UserPromptSubmit", "session_id": "s", "prompt_id": pid,
                   "permission_mode": "default", "prompt": prompt, "prompt_text": prompt,
                   "prompt_sha": orch.prompt_sha(prompt)},
                  {"t": t + .1, "event": "PreToolUse", "session_id": "s", "tool_name": "Bash"},
                  {"t": t + .2, "event": "PostToolUse", "session_id": "s", "tool_name": "Bash"},
                  {"t": t + .3, "event": "PreToolUse", "session_id": "s", "tool_name": "Edit"},
                  {"t": t + .4, "event": "PostToolUse", "session_id": "s", "tool_name": "Edit"},
                  {"t": t + .5, "event": "Stop", "session_id": "s", "prompt_id": pid,
                   "last_assistant_message": "Done: the module is split in two. " * 4}]
    if working:
        lines = lines[:count - 1] + [dict(lines[1], t=1.0 + turn + 1)]
    else:
        lines = lines[:1 + (count - 1) // 6 * 6]      # whole turns: the last event a Stop
    return "".join(json.dumps(line) + "\n" for line in lines)


def bench_transcript(events):
    """A claude transcript for bench_events(events): an answer with its usage per turn."""
    lines = [{"type": "assistant", "message": {
        "id": "msg_%d" % turn, "model": "claude-opus-4-5", "role": "assistant",
        "content": [{"type": "text", "text": "Done: the module is split in two."}],
        "usage": {"input_tokens": 3, "output_tokens": 120, "cache_read_input_tokens": 20000,
                  "cache_creation_input_tokens": 400}}} for turn in range(events // 6 + 1)]
    return "".join(json.dumps(line) + "\n" for line in lines)


def claude_path_world(root, env, events, working=True):
    """The bench's agents as claude agents (no cmd) with `events` hook events each; its env.

    Each also gets the status file and the transcript claude keeps, which `list` reads too.
    """
    folder = os.path.join(root, "claude-%d-%s" % (events, working))
    with open(env["ORCH_STATE"]) as f:
        state = json.load(f)
    text = bench_events(events, working)
    transcript = bench_transcript(events)
    sessions = os.path.join(root, ".claude", "sessions")
    projects = os.path.join(root, ".claude", "projects", "bench")
    os.makedirs(sessions, exist_ok=True)
    os.makedirs(projects, exist_ok=True)
    for name, agent in state["agents"].items():
        agent.update(agent="claude", cmd=None, session_id=str(uuid.uuid4()), launched=0,
                     home=root)
        said = os.path.join(projects, "%s-%d.jsonl" % (agent["session_id"], events))
        with open(said, "w") as f:
            f.write(transcript)
        path = os.path.join(sessions, "%d.json" % agent["tmux"]["pid"])
        with open(path, "w") as f:
            json.dump({"pid": agent["tmux"]["pid"], "sessionId": agent["session_id"],
                       "cwd": agent["cwd"], "kind": "interactive", "status": "busy",
                       "statusUpdatedAt": 1500}, f)
        os.utime(path, (1.5, 1.5))     # claude writes it when the status changes
        os.makedirs(os.path.join(folder, "state.d", "agents", name), exist_ok=True)
        with open(os.path.join(folder, "state.d", "agents", name, "events.jsonl"), "w") as f:
            f.write(text.replace('"source": "startup"', '"source": "startup", '
                                 '"transcript_path": %s' % json.dumps(said), 1))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f)
    return dict(env, ORCH_STATE=os.path.join(folder, "state.json"))


def bench_cpu(argv, env):
    """(CPU seconds, wall seconds) a command and its children used."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall


def bench_hook(env, repeat):
    """Milliseconds per hook event, next to the bare `python -I -S` it runs under."""
    hook = os.path.join(os.path.dirname(env["ORCH_STATE"]), "hook.py")
    with open(hook, "w") as f:
        f.write(orch.HOOK_SCRIPT)
    sink = os.path.join(os.path.dirname(hook), "hook-events.jsonl")
    payload = json.dumps({"hook_event_name": "UserPromptSubmit", "session_id": "s",
                          "prompt_id": "p", "permission_mode": "default",
                          "transcript_path": "/x", "cwd": "/x", "prompt": "x" * 2000})
    times = []
    for argv in ([sys.executable, "-I", "-S", hook, sink, "UserPromptSubmit"],
                 [sys.executable, "-I", "-S", "-c", "pass"]):
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            subprocess.run(argv, input=payload.encode(), env=env, check=True)
            runs.append((time.perf_counter() - start) * 1000)
        times.append(statistics.median(runs))
    return times


def bench(sizes=(10, 100, 300), repeat=15):
    py = sys.executable
    root = tempfile.mkdtemp(prefix="ob", dir="/tmp")
    socket = "orchbench%d" % os.getpid()
    env = dict(os.environ, HOME=root, ORCH_STATE=os.path.join(root, "state.json"),
               ORCH_TMUX_SOCKET=socket, TMUX_TMPDIR=root, ORCH_KILL_GRACE="1")
    env.pop("TMUX", None)
    env.pop("ORCH_TRACE", None)
    orch_cmd = [py, ORCH]
    subprocess.run(orch_cmd + ["install", "--prefix", os.path.join(root, "inst")], env=env,
                   stdout=subprocess.DEVNULL, check=True)
    installed = [os.path.join(root, "inst", "bin", "orch")]
    fmt = orch.SEP.join("#{%s}" % f for f in orch.PANE_FIELDS)
    floor_import = [py, "-c", "import argparse, json, subprocess, os, sys"]
    floor_tmux = ["tmux", "-L", socket, "list-panes", "-a", "-F", fmt]
    tmux_version = subprocess.run(["tmux", "-V"], stdout=subprocess.PIPE,
                                  universal_newlines=True).stdout.strip()
    print("orch %s bench: Python %s, %s, %d cores, %d runs per figure (ms)"
          % (orch.__version__, sys.version.split()[0], tmux_version, os.cpu_count(), repeat))
    spawned = 0
    try:
        for n in sizes:
            while spawned < n:
                subprocess.run(orch_cmd + ["spawn", "b%03d" % spawned, "--cmd", "sleep 100000"],
                               env=env, stdout=subprocess.DEVNULL, check=True)
                spawned += 1
            print("\nN = %d agents" % n)
            bench_table(bench_rows(n, env, root, orch_cmd, installed, floor_import, floor_tmux,
                                   repeat))
        waited = claude_path_world(root, env, 2000)
        names = ["b%03d" % i for i in range(min(50, spawned))]
        cpu, wall = bench_cpu(installed + ["wait"] + names + ["--timeout", "5"], waited)
        print("\norch wait on %d working agents (2,000 events each), 5 s: %.0f ms CPU per "
              "second of waiting (tmux included)" % (len(names), cpu * 1000 / wall))
        hook, bare = bench_hook(env, repeat)
        print("hook, per claude event: %.1f ms (python3 -I -S -c pass: %.1f ms)" % (hook, bare))
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], env=env,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


def bench_rows(n, env, root, orch_cmd, installed, floor_import, floor_tmux, repeat):
    rows = []

    def row(label, times, calls="", note=""):
        rows.append([label, "%.1f" % statistics.median(times), "%.1f" % times[0],
                     "%.1f" % times[-1], str(calls), note])
        return statistics.median(times)
    worlds = [("--cmd agents", env),
              ("claude agents, idle, 40 events each", claude_path_world(root, env, 40, False)),
              ("claude agents, idle, 2000 events each", claude_path_world(root, env, 2000, False)),
              ("claude agents, working, 2000 events each", claude_path_world(root, env, 2000))]
    for label, world in worlds:
        for form in (orch_cmd, installed):      # warm the status caches first
            subprocess.run(form + ["list", "--json"], env=world, stdout=subprocess.DEVNULL)
        # The script form compiles orch.py each time: its floor compiles it too.
        floor_compile = floor_import[:2] + [floor_import[2] + "; compile(open(%r).read(), "
                                            "'orch.py', 'exec')" % ORCH]
        lists = bench_interleaved([([floor_import, floor_tmux], world),
                                   ([orch_cmd + ["list", "--json"]], world),
                                   ([installed + ["list", "--json"]], world),
                                   ([floor_compile, floor_tmux], world)], repeat)
        floor = row("floor: python imports + 1 tmux list-panes", lists[0], 1)
        compiled = statistics.median(lists[3])
        for name, times in (("python3 orch.py list --json", lists[1]),
                            ("installed orch list --json", lists[2])):
            ratio = row("%s (%s)" % (name, label), times,
                        tmux_calls(installed + ["list", "--json"], world))
            rows[-1][5] = "%.2fx floor" % (ratio / floor)
        rows[-2][5] += ", %.2fx with compile" % (statistics.median(lists[1]) / compiled)
    versions = bench_interleaved([([floor_import], env), ([orch_cmd + ["--version"]], env),
                                  ([installed + ["--version"]], env)], repeat)
    imports = row("python3 -c 'import argparse, json, subprocess, os, sys'", versions[0], 0)
    for name, times in (("python3 orch.py --version", versions[1]),
                        ("installed orch --version", versions[2])):
        row(name, times, 0, "%.2fx imports" % (statistics.median(times) / imports))
    send = installed + ["send", "b000", "hello"]
    sent = row("orch send (idle --cmd agent)", bench_time(send, env, repeat), tmux_calls(send, env))
    rows[-1][5] = "%.0f + %.0f pause" % (sent - 100, 100)
    row("orch tail", bench_time(installed + ["tail", "b000"], env, repeat),
        tmux_calls(installed + ["tail", "b000"], env))
    start = time.perf_counter()
    procs = [subprocess.Popen(installed + ["spawn", "c%02d" % i, "--cmd", "sleep 100000"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(30)]
    codes = [p.wait() for p in procs]
    total = (time.perf_counter() - start) * 1000
    with open(env["ORCH_STATE"]) as f:
        recorded = len([a for a in json.load(f)["agents"] if a.startswith("c")])
    rows.append(["30 concurrent orch spawn (total)", "%.0f" % total, "", "", "",
                 "%d/30 ok, %d recorded" % (codes.count(0), recorded)])
    subprocess.run(installed + ["rm"] + ["c%02d" % i for i in range(30)], env=env,
                   stdout=subprocess.DEVNULL, check=True)
    return rows


def bench_hosts(repeat, agents=100):
    """orch --host against `ssh HOST true` on the same connection; list -A against one host."""
    class World(object):
        pass
    world = World()
    world.root = tempfile.mkdtemp(prefix="obh", dir="/tmp")
    world.tmpdir, world.home = world.root, world.root
    world.fake = world.logs = world.root
    env = dict(os.environ, HOME=world.root, ORCH_STATE=os.path.join(world.root, "local.json"),
               TMUX_TMPDIR=world.root)
    env.pop("TMUX", None)
    saved = dict(os.environ)
    os.environ.update(env)
    hosts = Hosts(world, ["h1", "h2", "h3"])
    env["ORCH_SSH_CONFIG"] = hosts.config
    orch_cmd = [sys.executable, ORCH]
    control = ["-F", hosts.config, "-o", "ControlPath=%s/%%C" % orch.control_dir()]
    try:
        for name in ("h1", "h2", "h3"):     # agents made on the host's own state, not over ssh
            here = dict(env, ORCH_STATE=os.path.join(world.root, name, "state.json"),
                        ORCH_TMUX_SOCKET=hosts.sockets[name])
            for i in range(agents):
                subprocess.run(orch_cmd + ["spawn", "r%03d" % i, "--cmd", "sleep 100000"],
                               env=here, stdout=subprocess.DEVNULL, check=True)
        first = bench_time(orch_cmd + ["--host", "h1", "list", "--json"], env, 1)
        subprocess.run(orch_cmd + ["install", "--prefix", os.path.join(world.root, "inst")],
                       env=env, stdout=subprocess.DEVNULL, check=True)
        installed = [os.path.join(world.root, "inst", "bin", "orch")]
        close = ["sh", "-c", " ".join(shlex.quote(w) for w in ["ssh"] + control + [
            "-O", "exit", "h1"]) + " 2>/dev/null; true"]       # no connection: nothing to close
        cold = bench_interleaved([([close, ["ssh", "-F", hosts.config, "-o", "ControlPath=none",
                                            "h1", "true"]], env),
                                  ([close, orch_cmd + ["--host", "h1", "list", "--json"]], env)],
                                 repeat)
        warm = bench_interleaved([([["ssh"] + control + ["h1", "true"]], env),
                                  ([orch_cmd + ["--host", "h1", "list", "--json"]], env)] +
                                 [([orch_cmd + ["--host", h, "list", "--json"]], env)
                                  for h in ("h2", "h3")] +
                                 [([orch_cmd + ["list", "-A", "--json"]],
                                   dict(env, ORCH_HOSTS="h1,h2,h3")),
                                  ([installed + ["--host", "h1", "list", "--json"]], env)],
                                 repeat)
        med = [statistics.median(t) for t in warm]
        print("\nhosts: sshd on 127.0.0.1, %d --cmd agents per host" % agents)
        print("  first use (connect, copy orch over, run): %.0f ms" % first[0])
        print("  new connection:  ssh h1 true %.0f ms; orch --host h1 list --json %.0f ms "
              "(%.2fx)" % (statistics.median(cold[0]), statistics.median(cold[1]),
                           statistics.median(cold[1]) / statistics.median(cold[0])))
        print("  kept connection: ssh h1 true %.0f ms; orch --host h1 list --json %.0f ms "
              "(%.2fx)" % (med[0], med[1], med[1] / med[0]))
        print("  kept connection, installed orch --host h1 list --json %.0f ms (%.2fx)"
              % (med[5], med[5] / med[0]))
        print("  list -A over 3 hosts x %d agents: %.0f ms; slowest single host %.0f ms (%.2fx)"
              % (agents, med[4], max(med[1:4]), med[4] / max(med[1:4])))
    finally:
        hosts.stop()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(world.root, ignore_errors=True)


def bench_world(letter):
    """A private HOME (root), work folder, state and tmux server for one bench: (root, work, env)."""
    root = tempfile.mkdtemp(prefix="ob" + letter, dir="/tmp")
    work, logs = os.path.join(root, "work"), os.path.join(root, "logs")
    os.makedirs(work)
    os.makedirs(logs)
    env = dict(os.environ, HOME=root, ORCH_STATE=os.path.join(root, "state.json"),
               ORCH_TMUX_SOCKET="orchbench%s%d" % (letter, os.getpid()), TMUX_TMPDIR=root,
               FAKE_LOG=logs)
    for var in ("TMUX", "ORCH_TRACE", "ORCH_AGENT", "CI"):
        env.pop(var, None)
    return root, work, env


def bench_resume_all(agents=20, stagger=1.0):
    """After a reboot: `resume --all --stagger S` against a loop of `resume NAME; sleep S`.

    Each is timed from the reboot until every agent reports idle.  The real
    claude when ORCH_E2E_CLAUDE names one (offline, against the fake API),
    else the stand-in agent.
    """
    root, work, env = bench_world("r")
    real = os.environ.get("ORCH_E2E_CLAUDE")
    api = None
    if real:
        api = FakeAPI().start()
        env.update(ORCH_CLAUDE=real, ANTHROPIC_BASE_URL=api.url, ANTHROPIC_API_KEY=E2E_KEY,
                   DISABLE_AUTOUPDATER="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
        write_claude_config(root, [work])
    else:
        env["ORCH_CLAUDE"] = write_fake_agent(root)
    orch_cmd = [sys.executable, ORCH]
    names = ["r%02d" % i for i in range(agents)]

    def all_idle():
        rows = json.loads(subprocess.run(orch_cmd + ["list", "--json"], env=env,
                                         stdout=subprocess.PIPE).stdout.decode())
        return all(r["status"] == "idle" for r in rows)

    def timed(commands):
        reboot(env)
        start = time.time()
        for i, argv in enumerate(commands):
            if i and argv[2:3] == ["resume"] and argv[3:4] != ["--all"]:
                time.sleep(stagger)
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
        while not all_idle():
            time.sleep(0.2)
        return time.time() - start
    try:
        for name in names:
            subprocess.run(orch_cmd + ["spawn", name, "hello " + name, "--cwd", work], env=env,
                           stdout=subprocess.DEVNULL, check=True)
        while not all_idle():
            time.sleep(0.2)
        loop = timed([orch_cmd + ["resume", name] for name in names])
        every = timed([orch_cmd + ["resume", "--all", "--stagger", str(stagger)]])
        print("\nresume after a reboot, %d %s agents, %g s apart: a loop of resume NAME "
              "%.1f s; resume --all %.1f s (%.2fx)" % (agents, "claude" if real else "stand-in",
                                                     stagger, loop, every, every / loop))
    finally:
        reboot(env)
        if api:
            api.stop()
        shutil.rmtree(root, ignore_errors=True)


def first_screen_setups(root, work):
    """(label, kind, env changes, spawn args) of each CLI at its first-run screen, as measured."""
    setups = [("stand-in", orch.ClaudeKind, {"ORCH_CLAUDE": write_fake_agent(root),
                                             "FAKE_APIKEY": "1"}, [])]
    claude_bin = os.environ.get("ORCH_E2E_CLAUDE")
    if claude_bin:
        write_claude_config(root, [work], {"customApiKeyResponses": {"approved": []}})
        setups.append(("claude %s" % ".".join(map(str, claude_version(claude_bin))),
                       orch.ClaudeKind, {"ORCH_CLAUDE": claude_bin, "ANTHROPIC_API_KEY": E2E_KEY,
                                         "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
                                         "DISABLE_AUTOUPDATER": "1",
                                         "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}, []))
    if os.environ.get("ORCH_E2E_CODEX"):
        os.makedirs(os.path.join(root, ".codex"), exist_ok=True)
        with open(os.path.join(root, ".codex", "config.toml"), "w") as f:
            f.write('[projects."%s"]\ntrust_level = "trusted"\n' % work)
        setups.append(("codex", orch.CodexKind, {"ORCH_CODEX": os.environ["ORCH_E2E_CODEX"]},
                       ["--agent", "codex"]))
    if os.environ.get("ORCH_E2E_GEMINI"):
        write_gemini_settings(root, [work], {"security": {}})
        setups.append(("gemini", orch.GeminiKind, {"ORCH_GEMINI": os.environ["ORCH_E2E_GEMINI"],
                                                   "GEMINI_API_KEY": "bench-key"},
                       ["--agent", "gemini"]))
    return setups


def bench_first_screens(repeat=3):
    """How soon `spawn` returns at each CLI's first-run screen, against the screen's own start.

    The floor is the same CLI started in a plain tmux window, its screen read
    every 50 ms until the kind recognises the screen.  The real CLIs where
    ORCH_E2E_CLAUDE, ORCH_E2E_CODEX, ORCH_E2E_GEMINI name them; the stand-in always.
    """
    root, work, base = bench_world("f")
    socket = base["ORCH_TMUX_SOCKET"]
    orch_cmd = [sys.executable, ORCH]
    print("\nspawn at a first-run screen (median of %d, s): when spawn returned; when the screen "
          "was up" % repeat)
    try:
        for label, kind, extra, args in first_screen_setups(root, work):
            env = dict(base, **extra)
            program = extra.get("ORCH_CLAUDE") or extra.get("ORCH_CODEX") or extra["ORCH_GEMINI"]
            spawned, drawn = [], []
            for i in range(repeat):
                start = time.time()
                code = subprocess.run(orch_cmd + ["spawn", "f%d" % i, "hi", "--cwd", work] + args,
                                      env=env, stdout=subprocess.DEVNULL).returncode
                spawned.append(time.time() - start)
                assert code == orch.EXIT_NEEDS_INPUT, (label, code)
                subprocess.run(orch_cmd + ["rm", "--force", "f%d" % i], env=env,
                               stdout=subprocess.DEVNULL)
                script = os.path.join(root, "plain.sh")
                with open(script, "w") as f:
                    f.write("cd %s\n" % shlex.quote(work) + "".join(
                        "export %s=%s\n" % (k, shlex.quote(v)) for k, v in env.items()
                        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k)) + "exec %s\n"
                        % shlex.quote(program))
                start = time.time()
                pane = subprocess.run(["tmux", "-L", socket, "new-session", "-d", "-P", "-F",
                                       "#{pane_id}", "-x", "120", "-y", "40", "/bin/sh", script],
                                      env=env,
                                      stdout=subprocess.PIPE, universal_newlines=True,
                                      check=True).stdout.strip()
                while not kind.first_screen(subprocess.run(
                        ["tmux", "-L", socket, "capture-pane", "-p", "-t", pane], env=env,
                        stdout=subprocess.PIPE, universal_newlines=True).stdout.split("\n")):
                    time.sleep(0.05)
                drawn.append(time.time() - start)
                subprocess.run(["tmux", "-L", socket, "kill-pane", "-t", pane], env=env)
            s, d = statistics.median(spawned), statistics.median(drawn)
            print("  %-16s spawn %.2f s, screen %.2f s (%.2fx)" % (label, s, d, s / d))
    finally:
        reboot(base)
        shutil.rmtree(root, ignore_errors=True)


def bench_notify(rounds=20):
    """What three notification channels cost an agent's hook, and how soon a turn's end arrives.

    The hook with three channels against none (it does not know of them: the
    watcher does the sending); then the time from a stand-in agent's Stop
    hook event to the first of three webhooks' arrival, over `rounds` turns.
    """
    root, work, env = bench_world("n")
    env["ORCH_CLAUDE"] = write_fake_agent(root)
    receiver = Receiver()
    orch_cmd = [sys.executable, ORCH]
    events = os.path.join(root, "state.d", "agents", "b1", "events.jsonl")
    try:
        bare = bench_hook(env, 15)[0]
        for i in range(3):
            subprocess.run(orch_cmd + ["notify", "add", "c%d" % i, "--webhook", receiver.url,
                                       "--on", "done"], env=env, stdout=subprocess.DEVNULL,
                           check=True)
        three = bench_hook(env, 15)[0]
        subprocess.run(orch_cmd + ["spawn", "b1", "--cwd", work], env=env,
                       stdout=subprocess.DEVNULL, check=True)
        delays = []
        for i in range(rounds):
            before = len(receiver.posts)
            subprocess.run(orch_cmd + ["send", "b1", "round %d" % i], env=env,
                           stdout=subprocess.DEVNULL, check=True)
            while len(receiver.posts) < before + 3:
                time.sleep(0.01)
            with open(events) as f:
                stop = [json.loads(l)["t"] for l in f if '"Stop"' in l][-1]
            delays.append(min(p["t"] for p in receiver.posts[before:]) - stop)
        print("\nnotifications: a hook event with 3 channels %.1f ms, with none %.1f ms (%.2fx); "
              "a turn's end to its webhook: median %.2f s, max %.2f s over %d turns"
              % (three, bare, three / bare, statistics.median(delays), max(delays), rounds))
    finally:
        stop_watcher(os.path.join(root, "state.d"))
        reboot(env)
        receiver.stop()
        shutil.rmtree(root, ignore_errors=True)


def bench_table(rows):
    table = [["", "median", "min", "max", "tmux calls", ""]] + rows
    widths = [max(len(r[i]) for r in table) for i in range(6)]
    for r in table:
        print("  ".join(c.rjust(w) if i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())


if __name__ == "__main__" and sys.argv[1:2] == ["bench"]:
    import statistics
    if sys.argv[2:] == ["hosts"]:
        bench_hosts(15)
    elif sys.argv[2:] == ["resume"]:
        bench_resume_all()
    elif sys.argv[2:] == ["first"]:
        bench_first_screens()
    elif sys.argv[2:] == ["notify"]:
        bench_notify()
    else:
        bench(tuple(int(n) for n in sys.argv[2:]) or (10, 100, 300))
        bench_hosts(15)
        bench_resume_all()
        bench_first_screens()
        bench_notify()
elif __name__ == "__main__":
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
