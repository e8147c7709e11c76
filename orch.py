#!/usr/bin/env python3
"""orch: run and steer many AI coding agents (Claude Code, Codex, Gemini) on one server.

Each agent is a program (the `claude` CLI by default; `codex`, `gemini`, or any
command) running in its own window of one tmux session, so it outlives your ssh
session, can be messaged while it works, watched, and attached to.  State is
one JSON file (~/.orch.json); logs, launch files and per-agent hook event files
live in a folder beside it.

Each agent CLI gets hooks of orch's for that process only (claude --settings,
codex -c, a private GEMINI_CLI_HOME) that append one line per event (session
start, prompt submitted, tool use, permission dialog, turn end, exit) to the
agent's event file: that is how orch knows an agent's status and confirms that
a message was really submitted, without scraping screens.  What differs between
CLIs lives in one class per agent kind.  A watcher of orch's turns what
changes into notifications (webhook, ntfy, a command) and types messages
held for the end of a turn.

Standard library only; runs on Python 3.6+ and tmux 3.0+.  See README.md.
"""

import argparse
import json
import os
import re
import stat
import subprocess
import sys
import time

__version__ = "0.1.0"

STATE_VERSION = 1           # bump when the state file changes incompatibly
MIN_TMUX = (3, 0)
# The range of Claude Code versions `make e2e` tests: the oldest supported and the newest.
TESTED_CLAUDE = ((2, 1, 197), (2, 1, 332))
# The Codex CLI versions `make e2e` tests (CODEX_VERSIONS in the Makefile).
TESTED_CODEX = ((0, 169, 0), (0, 171, 0))
TESTED_GEMINI = ((0, 61, 0),)     # GEMINI_VERSIONS
TESTED_OPENCODE = ((1, 18, 33),)  # OPENCODE_VERSIONS
TESTED_COPILOT = ((1, 0, 102),)   # COPILOT_VERSIONS

# Exit codes: scripts branch on these, so they are part of the interface.
EXIT_OK = 0
EXIT_ERROR = 1              # any other failure
EXIT_USAGE = 2              # bad command line or agent name (argparse uses 2 too)
EXIT_NOT_RUNNING = 3        # the agent has exited: `orch resume NAME`
EXIT_NEEDS_INPUT = 4        # refused: the agent shows a dialog that a keypress would answer
EXIT_UNCONFIRMED = 5        # the message was typed but orch did not see it submitted
EXIT_TIMEOUT = 6            # `wait` ran out of time
EXIT_MIXED = 7              # submitted, but joined with text orch did not send
EXIT_FAILED = 8             # the turn ended on an error (a rate limit, an API error), not done
EXIT_INTERRUPTED = 130

# Variables that must not leak into an agent: they point it at the caller's
# tmux, or make claude believe it runs inside another claude and refuse.  An
# agent an orchestrator claude starts from its Bash tool gets that claude's
# session id, messaging socket and token, and CLAUDE_CODE_CHILD_SESSION, with
# which a claude keeps no transcript: it could never be resumed (2.1.330+).
# Copilot's tools get its session id and loader pid (and never its provider's key).
SCRUBBED_ENV = ("TMUX", "TMUX_PANE", "CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT",
                "CLAUDE_CODE_CHILD_SESSION", "CLAUDE_CODE_SESSION_ID", "CLAUDE_PID",
                "CLAUDE_CODE_MESSAGING_SOCKET", "CLAUDE_CODE_MESSAGING_TOKEN",
                "CLAUDE_CODE_SESSION_ATTENDED", "CLAUDE_CODE_CHILD_NOTES_DIR",
                "CLAUDE_CODE_EXECPATH", "AI_AGENT",
                # What copilot tells the commands it runs: its session, its loader, its files.
                "COPILOT_AGENT_SESSION_ID", "COPILOT_LOADER_PID", "COPILOT_CLI",
                "COPILOT_CLI_BINARY_VERSION", "COPILOT_CLI_RESOLVED_DIST_DIR")

HOOK_EVENTS = ("SessionStart", "UserPromptSubmit", "PreToolUse", "PostToolUse",
               "PermissionRequest", "Notification", "Stop", "StopFailure", "SessionEnd")

SEP = "\x1e"                # ASCII record separator: never appears in tmux names/paths we use


# ###########################################################################
# Errors
# ###########################################################################

class OrchError(Exception):
    """An expected failure: printed as one line by main(), never a traceback."""

    def __init__(self, message, code=EXIT_ERROR):
        Exception.__init__(self, message)
        self.code = code


class TmuxError(OrchError):
    """A tmux command failed; keeps tmux's own words for classification."""

    def __init__(self, subcommand, stderr):
        self.subcommand = subcommand
        self.stderr = stderr.strip()
        OrchError.__init__(self, "tmux %s failed: %s" % (subcommand, self.stderr or "no message"))

    def server_gone(self):
        text = self.stderr.lower()
        return ("no server running" in text or "error connecting" in text
                or "server exited" in text or "lost server" in text)

    def target_gone(self):
        text = self.stderr.lower()
        return "can't find" in text or "no such" in text


# ###########################################################################
# Configuration (read when called, never at import)
# ###########################################################################

def state_path():
    """Return the state file's path: $ORCH_STATE or ~/.orch.json."""
    setting = os.environ.get("ORCH_STATE")
    relative = setting and not setting.startswith(("/", "~"))    # then it depends on the cwd
    return resolve_state_path(setting, os.environ.get("HOME"), os.getcwd() if relative else None)


_resolved = {}


def resolve_state_path(setting, home, cwd):
    # `list` asks for every agent's files: resolve once per environment, not 600 times.
    key = (setting, home, cwd)
    if key not in _resolved:
        _resolved[key] = os.path.abspath(os.path.expanduser(setting or "~/.orch.json"))
    return _resolved[key]


def data_dir():
    """Return the folder beside the state file that holds everything else."""
    base = state_path()
    if base.endswith(".json"):
        base = base[:-len(".json")]
    return base + ".d"


def agent_dir(name):
    return os.path.join(data_dir(), "agents", name)


def make_private_dir(path):
    """Create path and its parents up to the data folder, each 0700 (makedirs sets only the leaf)."""
    if path == data_dir():
        make_folders(os.path.dirname(path))     # ORCH_STATE may name a folder not made yet
        check_places()
    if os.path.isdir(path):
        return path
    if path != data_dir():
        make_private_dir(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass            # another orch made it first; it is checked below as any would be
    problem = own_folder_problem(path)
    if problem:
        raise OrchError(problem)
    return path


def events_path(name):
    return os.path.join(agent_dir(name), "events.jsonl")


def default_socket():
    return os.environ.get("ORCH_TMUX_SOCKET") or None


def default_session():
    return os.environ.get("ORCH_SESSION") or "orch"


def default_program():
    return os.environ.get("ORCH_CLAUDE") or "claude"


def trace(argv):
    if os.environ.get("ORCH_TRACE"):
        sys.stderr.write("orch: trace: %s\n" % " ".join(argv))


def check_name(name):
    """Refuse names tmux or the file system could misread (`.`, `:`, `/`, spaces...)."""
    import re
    if not re.match(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}\Z", name or "", re.ASCII):
        raise OrchError("invalid agent name %r: use 1-40 letters, digits, '-' or '_', "
                        "starting with a letter or digit" % (name,), EXIT_USAGE)
    return name


# ###########################################################################
# Private places: nothing another local user can read, plant or replace
# ###########################################################################
#
# Servers are shared.  Another account may have made, or may be able to
# change, a folder orch is pointed at (ORCH_STATE=/tmp/... in a script): it
# could then replace the hook program claude runs, or plant a state file
# whose agents orch would start as you.  So, as OpenSSH's StrictModes asks of
# ~/.ssh: every folder on the way to what orch keeps belongs to you or root
# and nobody else can write to it (a sticky folder such as /tmp may be passed
# through, never kept in), what orch keeps is yours alone, and every file is
# created under a random name with O_EXCL|O_NOFOLLOW, so nothing is written
# through a link.

def user_name(uid):
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


def group_is_mine(gid):
    """True when the group holds this user alone (a user-private group, as Debian makes)."""
    import grp
    import pwd
    try:
        members = grp.getgrgid(gid).gr_mem
    except KeyError:
        return False
    if any(member != user_name(os.getuid()) for member in members):
        return False
    return all(p.pw_uid == os.getuid() for p in pwd.getpwall() if p.pw_gid == gid)


def others_can_write(info):
    if info.st_mode & stat.S_IWOTH:
        return True
    return bool(info.st_mode & stat.S_IWGRP) and not group_is_mine(info.st_gid)


def place_problem(path, keep=True):
    """Why another user could change what is at path (links followed), or None.

    keep: orch keeps files in the last folder, so nobody else may write to
    it; on the way, a sticky folder (/tmp) is fine, as others can neither
    rename nor remove what is yours in it.  What does not exist yet is fine:
    orch makes it 0700 and checks again.
    """
    me, todo, current, links = os.getuid(), os.path.abspath(path).split("/"), "/", 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        here = os.path.dirname(current) if part == ".." else os.path.join(current, part)
        try:
            info = os.lstat(here)
        except FileNotFoundError:
            return None
        except OSError as e:
            return "cannot check %s (%s)" % (here, e.strerror or e)
        if info.st_uid not in (me, 0):
            return "%s belongs to %s" % (here, user_name(info.st_uid))
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > 40:
                return "%s: too many symbolic links" % here
            target = os.readlink(here)
            todo = target.split("/") + todo
            current = "/" if target.startswith("/") else current
            continue
        if stat.S_ISDIR(info.st_mode) and others_can_write(info) and (
                keep and not [p for p in todo if p not in ("", ".")]
                or not info.st_mode & stat.S_ISVTX):
            return "other users can write to %s" % here
        current = here
    return None


def own_folder_problem(path):
    """Why orch must not keep files in the folder path, or None."""
    try:
        info = os.lstat(path)
    except OSError as e:
        return "cannot use %s: %s" % (path, e.strerror or e)
    if stat.S_ISLNK(info.st_mode):
        problem = place_problem(path)
        if problem:
            return "refusing %s, a link: %s" % (path, problem)
        info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        return "%s is not a folder: move it away" % path
    return owner_problem(path, info, "who could replace the programs orch runs there as you",
                         "700")


def file_problem(path, info):
    """Why the file orch opened at path (its fstat is info) may not be trusted, or None."""
    return owner_problem(path, info, "not you; its agents could run their commands as you",
                         "600")


def owner_problem(path, info, risk, mode):
    """Why path (its stat is info) is not this user's alone, or None."""
    if info.st_uid != os.getuid():
        return "refusing %s: it belongs to %s, %s: move it away" % (
            path, user_name(info.st_uid), risk)
    if others_can_write(info):
        return "refusing %s: other users can write to it (mode %03o): chmod %s %s" % (
            path, info.st_mode & 0o777, mode, path)
    return None


_checked = set()


def check_places():
    """Refuse a state file or data folder that another user could change (once per process)."""
    path = state_path()
    if path in _checked:
        return
    folder = os.path.dirname(path)
    problem = place_problem(folder) or place_problem(path) or (
        os.path.lexists(data_dir()) and own_folder_problem(data_dir()))
    if problem:
        raise OrchError("%s; orch keeps agents' prompts and the programs they run beside its "
                        "state, so it must be a place only you can change: point ORCH_STATE "
                        "at one (the default ~/.orch.json is)" % problem)
    _checked.add(path)


def make_folders(path):
    """Make path's missing folders 0700 (whatever the umask), refusing one someone else made."""
    missing = []
    while not os.path.lexists(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise OrchError("cannot create folder %s: %s" % (folder, e.strerror or e))
        problem = own_folder_problem(folder)
        if problem:
            raise OrchError(problem)


def check_socket(socket):
    """Refuse a tmux socket path that another user's server listens on."""
    if not socket or "/" not in socket or socket in _checked:
        return
    path = os.path.abspath(socket)
    problem = place_problem(os.path.dirname(path), keep=False)
    try:
        info = os.lstat(path)
        if info.st_uid != os.getuid():
            problem = problem or "%s belongs to %s" % (path, user_name(info.st_uid))
    except OSError:
        pass
    if problem:
        raise OrchError("refusing tmux socket %s: %s, whose tmux server would see every "
                        "prompt and run every agent: use a socket of your own (a name such as "
                        "ORCH_TMUX_SOCKET=orch is kept in tmux's private folder)"
                        % (socket, problem))
    _checked.add(socket)


# ###########################################################################
# tmux runner: every tmux call goes through tmux()
# ###########################################################################

def tmux_argv(socket, args, utf8=True):
    # -u: a client whose locale is not UTF-8 (LC_ALL=C, cron, Python 3.6 with
    # no locale) would get -F output with control characters and non-ASCII
    # turned into "_": orch's field separator among them.  Attach leaves the
    # user's terminal as their locale says (utf8=False).
    argv = ["tmux", "-u"] if utf8 else ["tmux"]
    if socket:
        # A socket given as a path is used as is (if it is yours); a bare name is tmux's -L.
        check_socket(socket)
        argv += ["-S" if "/" in socket else "-L", socket]
    return argv + list(args)


def tmux_env():
    # Without this, $TMUX silently sends our commands to whatever server the
    # caller is inside instead of the one orch is configured for.
    env = dict(os.environ)
    env.pop("TMUX", None)
    env.pop("TMUX_PANE", None)
    return env


def tmux(args, socket=None, stdin=None, timeout=None):
    """Run one tmux command (args may chain several with ';'); return its stdout."""
    return tmux_started(args, socket, stdin, timeout)()


def tmux_started(args, socket=None, stdin=None, timeout=None):
    """Start one tmux command; return a function that waits for it and returns its stdout.

    In between orch can do work of its own while tmux does its part.
    """
    timeout = timeout or env_seconds("ORCH_TMUX_TIMEOUT", 15)
    argv = tmux_argv(socket, args)
    trace(argv)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=tmux_env())
    except OSError:
        raise OrchError("tmux is not installed or not on PATH: install it "
                        "(e.g. apt-get install tmux) or use --backend headless")

    def answer():
        try:
            out, err = proc.communicate(stdin.encode("utf-8") if stdin is not None else None,
                                        timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise OrchError("tmux %s did not answer within %ss: the tmux server may be hung"
                            % (args[0], timeout))
        if proc.returncode != 0:
            raise TmuxError(args[0], err.decode("utf-8", "replace"))
        return out.decode("utf-8", "replace")
    return answer


def parse_tmux_version(text):
    """Turn `tmux 3.3a` / `tmux next-3.4` / `tmux master` into a comparable tuple."""
    import re
    m = re.search(r"(\d+)\.(\d+)", text)
    if not m:
        return (99, 0) if ("master" in text or "next" in text) else (0, 0)
    return (int(m.group(1)), int(m.group(2)))


def check_tmux_version():
    version = parse_tmux_version(tmux(["-V"]).strip())
    if version < MIN_TMUX:
        raise OrchError("tmux %d.%d is too old: orch needs tmux %d.%d or newer"
                        % (version + MIN_TMUX))


# pane_dead_signal is empty before tmux 3.3; the rest exist in 3.0.
PANE_FIELDS = ("pane_id", "pane_pid", "pane_dead", "pane_dead_status", "pane_dead_signal",
               "window_id", "session_name", "window_activity", "pid", "pane_in_mode",
               "pane_start_command")
PANE_FORMAT = SEP.join("#{%s}" % f for f in PANE_FIELDS)


def parse_panes(text):
    """Parse `list-panes -a -F` output (fields joined by SEP) into {pane_id: dict}."""
    panes = {}
    for line in text.split("\n"):     # not splitlines(): it splits on SEP too
        values = line.split(SEP)
        if len(values) != len(PANE_FIELDS):
            continue
        pane = dict(zip(PANE_FIELDS, values))
        panes[pane["pane_id"]] = pane
    return panes


def list_panes(socket):
    """Return every pane of the server, or {} when no server is running."""
    return panes_asked(pane_query(), socket)()


def pane_info(pane, socket):
    """Return {pane_id: fields} for one pane (empty if it or its server is gone).

    One agent's status needs one pane, not all of them: this costs the same
    with 3 or 300 agents, where list-panes -a grows with them.
    """
    return panes_asked(pane_query(pane), socket)()


def pane_query(pane=None):
    """tmux's words for PANE_FORMAT lines: of one pane, or (pane=None) of every pane."""
    if pane:
        return ["display-message", "-p", "-t", pane, PANE_FORMAT]
    return ["list-panes", "-a", "-F", PANE_FORMAT]


def panes_asked(args, socket):
    """Start a tmux command that prints PANE_FORMAT lines; return a function that waits
    for them: {pane_id: fields}, {} when the server (or the one pane asked) is gone."""
    answer = tmux_started(args, socket=socket)

    def panes():
        try:
            return parse_panes(answer())
        except TmuxError as e:
            if e.server_gone() or e.target_gone():
                return {}
            raise
    return panes


def capture_pane(pane, socket, lines=None, colors=False):
    """Return the pane's screen as plain text (colors: with its SGR codes), wrapped lines joined."""
    args = ["capture-pane", "-p", "-J", "-t", pane] + (["-e"] if colors else [])
    if lines:
        args += ["-S", "-%d" % lines]
    return screen_rows(tmux(args, socket=socket).split("\n"))


def screen_rows(lines):
    rows = [row.rstrip() for row in lines]
    while rows and not rows[-1]:
        rows.pop()
    return rows


def capture_panes(panes, socket):
    """{pane: screen rows} for many panes, as few tmux calls as tmux's command size allows.

    Before each screen tmux prints a line with a random mark no program can
    guess, so a screen's text cannot pass for the start of another's.  tmux
    refuses a command over ~16 KB: a call takes what fits in 12 KB (~170
    panes; hence the short aliases of display-message and capture-pane).  A
    pane gone meanwhile fails its call: those are read one by one, [] for the gone.
    """
    mark = "orch-%s-" % os.urandom(6).hex()
    calls, size = [[]], 0
    for pane in panes:
        cost = len(mark) + 2 * len(pane) + 46     # the bytes of its words below
        if size + cost > 12000:
            calls.append([])
            size = 0
        calls[-1].append(pane)
        size += cost
    screens = {}
    for call in calls:
        screens.update(captured_together(call, mark, socket))
    return screens


def captured_together(panes, mark, socket):
    """capture_panes' one tmux call: {pane: rows}."""
    if not panes:
        return {}
    args = []
    for i, pane in enumerate(panes):
        args += ["display", "-p", "-t", pane, mark + str(i), ";", "capturep", "-p", "-J", "-t",
                 pane, ";"]
    try:
        lines = tmux(args[:-1], socket=socket).split("\n")
    except TmuxError:
        return dict((pane, screen_or_nothing(pane, socket)) for pane in panes)
    screens, current = {}, None
    for line in lines:
        if line.startswith(mark):
            current = screens[panes[int(line[len(mark):])]] = []
        elif current is not None:
            current.append(line)
    return dict((pane, screen_rows(rows)) for pane, rows in screens.items())


def screen_or_nothing(pane, socket):
    try:
        return capture_pane(pane, socket)
    except TmuxError:
        return []


def agent_screen(agent):
    """The visible rows of a tmux agent's pane."""
    return capture_pane(agent["tmux"]["pane"], agent["tmux"]["socket"])


def paste_text(pane, socket, text):
    """Paste text into the pane as one bracketed paste, from a uniquely named buffer.

    The text travels on tmux's stdin, never on its command line (tmux refuses
    commands over ~16 KB), and -p makes the agent see one paste rather than
    keystrokes, so newlines inside it do not submit and nothing autocompletes.
    """
    buf = "orch-%d-%s" % (os.getpid(), os.urandom(4).hex())
    tmux(["load-buffer", "-b", buf, "-", ";",
          "paste-buffer", "-p", "-d", "-b", buf, "-t", pane], socket=socket, stdin=text)


def send_enter(pane, socket):
    tmux(["send-keys", "-t", pane, "Enter"], socket=socket)


# ###########################################################################
# State: one versioned JSON file, locked read-modify-write, atomic replace
# ###########################################################################

def empty_state():
    return {"version": STATE_VERSION, "agents": {}}


def parse_state(text, path):
    """Validate state file text; refuse corrupt or newer files instead of guessing.

    Agent records are checked one by one: a malformed one (a hand edit, a
    crashed writer) is moved to state["invalid"] with the reason, so reading
    verbs still work for the others; LockedState refuses to write such a file.
    """
    try:
        state = json.loads(text) if text.strip() else empty_state()
    except ValueError as e:
        raise OrchError("state file %s is corrupt (%s): fix it or move it away; "
                        "orch will not overwrite it" % (path, e))
    if not isinstance(state, dict) or not isinstance(state.get("agents"), dict):
        raise OrchError("state file %s is not an orch state file: fix it or move it away; "
                        "orch will not overwrite it" % path)
    version = state.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise OrchError("state file %s has format version %r, which no orch writes: fix it or "
                        "move it away; orch will not overwrite it" % (path, version))
    if version > STATE_VERSION:
        raise OrchError("state file %s has format version %d, newer than this orch "
                        "understands (%d): upgrade orch.py" % (path, version, STATE_VERSION))
    invalid = {}
    for name, agent in list(state["agents"].items()):
        problem = record_problem(name, agent)
        if problem:
            invalid[name] = "agent %s in %s: %s" % (name, path, problem)
            del state["agents"][name]
    if invalid:
        state["invalid"] = invalid
    return state


# The fields of an agent record that orch reads without a default.
RECORD_FIELDS = {None: (("name", str), ("backend", str), ("cwd", str), ("created", (int, float))),
                 "tmux": (("pane", str), ("pid", int), ("session", str), ("window", str)),
                 "headless": (("pid", int), ("supervisor", int)),
                 "worktree": (("repo", str), ("path", str), ("branch", str), ("base", str),
                              ("base_commit", str), ("new_branch", bool))}


def record_problem(name, agent):
    """Why an agent record cannot be used, or None."""
    if not isinstance(agent, dict):
        return "the record is %s, not an object" % type(agent).__name__
    problem = fields_problem(agent, RECORD_FIELDS[None], "")
    if problem:
        return problem
    if agent["name"] != name:
        return "its name is %r" % agent["name"]
    backend = agent["backend"]
    if backend not in ("tmux", "headless"):
        return "unknown backend %r" % backend
    if agent.get("agent", "claude") not in KINDS:
        return "unknown agent kind %r" % agent["agent"]
    if not isinstance(agent.get(backend), dict):
        return "missing %r" % backend
    for key, kind in (("parent", str), ("stopped", (int, float))):
        value = agent.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            return "%r is %s, not %s" % (key, json.dumps(value)[:40], "a string"
                                         if kind is str else "a number")
    if "worktree" in agent:
        if not isinstance(agent["worktree"], dict):
            return "'worktree' is not an object"
        problem = fields_problem(agent["worktree"], RECORD_FIELDS["worktree"], "worktree.")
        if problem:
            return problem
    return fields_problem(agent[backend], RECORD_FIELDS[backend], backend + ".")


def fields_problem(record, fields, prefix):
    for key, kind in fields:
        if key not in record:
            return "missing %r" % (prefix + key)
        value = record[key]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            return "%r is %s, not %s" % (prefix + key, json.dumps(value)[:40], (
                kind.__name__ if isinstance(kind, type) else "a number"))
    return None


def load_state():
    path = state_path()
    check_places()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.islink(path):
            raise OrchError("state file %s is a symbolic link to %s, which does not exist: "
                            "create that file (empty is fine) or remove the link"
                            % (path, os.readlink(path)))
        return empty_state()
    except OSError as e:
        raise OrchError("cannot read state file %s: %s" % (path, e.strerror or e))
    with os.fdopen(fd, "rb") as f:
        problem = file_problem(path, os.fstat(fd))
        if problem:
            raise OrchError(problem)
        data = f.read()
    return parse_state(decode_utf8(data, "state file %s" % path, EXIT_ERROR), path)


def write_file_atomic(path, text, mode=0o600):
    """Write text to path via a fsynced temp file in the same folder, then rename.

    Readers see the old file or the new one, never a part: a full disk or a
    kill half-way leaves the old one.  A symbolic link is written through
    (the folders on the way are checked: it is the user's own).  The temp
    file has a random name and is made with O_EXCL|O_NOFOLLOW, so a link
    planted in advance is never followed.
    """
    path = os.path.realpath(path)
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, ".%s.%s.tmp" % (base, os.urandom(8).hex()))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
        try:
            os.fchmod(fd, mode)     # exactly mode: a umask can take bits away, never add
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as e:
        raise OrchError("cannot write %s: %s; the file is as it was" % (path, e.strerror or e))


def open_private(path, flags=os.O_RDWR):
    """Open (creating, 0600) a file of orch's own, never through a link; refuse another's."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise OrchError("cannot open %s: %s" % (path, e.strerror or e))
    problem = file_problem(path, os.fstat(fd))
    if problem:
        os.close(fd)
        raise OrchError(problem)
    return fd


class LockedState(object):
    """`with LockedState() as state:` loads under an exclusive lock, saves on success."""

    def __init__(self):
        self.path = state_path()
        self.lock_fd = None
        self.state = None
        self.original = None

    def __enter__(self):
        import fcntl
        make_folders(os.path.dirname(self.path))
        check_places()
        self.lock_fd = open_private(self.path + ".lock")
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            self.state = load_state()
            if self.state.get("invalid"):
                raise OrchError("%s; orch changes no state file it cannot fully read: fix or "
                                "remove that record by hand" % sorted(self.state["invalid"].values())[0])
        except BaseException:
            self._unlock()
            raise
        self.original = json.dumps(self.state, sort_keys=True)
        return self.state

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and json.dumps(self.state, sort_keys=True) != self.original:
                write_file_atomic(self.path, json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        finally:
            self._unlock()
        return False

    def _unlock(self):
        if self.lock_fd is not None:
            os.close(self.lock_fd)   # closing releases the flock
            self.lock_fd = None


def find_agent(state, name):
    agent = state["agents"].get(name)
    if agent is None and name in state.get("invalid", {}):
        raise OrchError("%s: fix or remove that record by hand" % state["invalid"][name])
    if agent is None:
        known = ", ".join(sorted(state["agents"])) or "none"
        raise OrchError("no agent named %r (agents: %s); see `orch list`" % (name, known))
    return agent


# ###########################################################################
# Hooks and events: how a claude agent tells orch what it is doing
# ###########################################################################

# The hook program claude runs on each event.  It is written beside the state
# (so moving orch.py never breaks a running agent), costs one small append,
# never takes orch's lock, and always exits 0 so it can never fail the agent.
HOOK_SCRIPT = r'''# orch hook: append one line per hook event of an agent CLI. Must stay tiny.
import hashlib, json, os, re, sys, time
# Claude Code 2.1.330+ hands a long or many-line paste to hooks (and the model)
# wrapped in these tags; orch compares the words the user pasted.  Same as PASTE_WRAPPER in orch.py.
PASTE = re.compile(r'<pasted_content id="([^"]*)">\n(.*?)\n</pasted_content id="\1">', re.S)
def short(value, n=200):
    return value[:n] if isinstance(value, str) else None
def main():
    path, event = sys.argv[1], sys.argv[2]
    try:   # bytes: claude may run this with no locale (ASCII stdin on Python 3.6)
        data = json.loads(sys.stdin.buffer.read().decode("utf-8", "replace") or "{}")
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    # copilot's own hook shape names these in camelCase
    for theirs, ours in (("sessionId", "session_id"), ("toolName", "tool_name"),
                         ("toolInput", "tool_input"), ("transcriptPath", "transcript_path")):
        data.setdefault(ours, data.get(theirs))
    # orch's name for the event (each CLI's names are mapped to orch's on its command line);
    # of gemini's notifications, only ToolPermission is a permission dialog.
    if data.get("notification_type") not in (None, "ToolPermission"):
        event = "Notification"
    line = {"t": time.time(), "event": event, "session_id": data.get("session_id")}
    for key in ("source", "reason", "notification_type", "tool_name", "prompt_id",
                "permission_mode", "error", "turn_id"):
        if isinstance(data.get(key), str):
            line[key] = data[key]
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        norm = " ".join(PASTE.sub(lambda m: m.group(2), prompt).split())
        line["prompt_sha"] = hashlib.sha256(norm.encode("utf-8")).hexdigest()
        line["prompt"] = short(norm)
        if len(norm) <= 4096:
            line["prompt_text"] = norm      # claude may merge queued messages into one
    reply = data.get("last_assistant_message") or data.get("prompt_response")   # gemini's
    for key, value in (("message", data.get("message")), ("last_assistant_message", reply)):
        if isinstance(value, str):
            line[key] = short(value)
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):  # copilot's errorOccurred
        try:    # an API error's body, as JSON
            line["message"] = short(json.loads(error["message"]).get("message"))
        except (ValueError, AttributeError):
            line["message"] = short(error["message"])
    asked = data.get("tool_input") or data.get("details")       # gemini: details
    if line["event"] == "PermissionRequest" and isinstance(asked, dict):
        # What the dialog asks about, for `orch approve`: its short text fields.
        line["tool_input"] = dict((k, short(v, 300)) for k, v in
                                  list(asked.items())[:8] if isinstance(v, str))
    if isinstance(data.get("transcript_path"), str) and line["event"] == "SessionStart":
        line["transcript_path"] = data["transcript_path"]
    if line["event"] == "Stop" and isinstance(reply, str):
        # The whole answer, for `orch reply`; kept before the Stop line is, so
        # whoever sees the turn end finds its answer.
        keep = os.path.join(os.path.dirname(path), "reply.json")
        tmp = "%s.%s.tmp" % (keep, os.urandom(8).hex())
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        with os.fdopen(os.open(tmp, flags, 0o600), "w", encoding="utf-8") as f:
            json.dump({"t": line["t"], "text": reply, "session_id": line["session_id"]}, f)
        os.replace(tmp, keep)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode("utf-8"))
    finally:
        os.close(fd)
try:
    main()
except Exception:
    pass
'''


# Claude Code 2.1.330+ gives hooks and the model a paste of ~1,000 characters
# or ~5 lines and more wrapped in these tags (with a random id).
PASTE_WRAPPER = r'<pasted_content id="([^"]*)">\n(.*?)\n</pasted_content id="\1">'


def unwrap_pastes(text):
    """Return text with claude's paste wrappers replaced by what was pasted (as the hook does)."""
    import re
    return re.sub(PASTE_WRAPPER, lambda m: m.group(2), text, flags=re.S)


def normalize_prompt(text):
    """Collapse whitespace the way the hook does, so sent text and hook text compare."""
    return " ".join(text.split())


def prompt_sha(text):
    import hashlib
    return hashlib.sha256(normalize_prompt(text).encode("utf-8")).hexdigest()


def install_hook_script():
    return install_script("hook.py", HOOK_SCRIPT)


def install_script(filename, text):
    """Write one of orch's small scripts into the data folder unless it is there as is."""
    path = os.path.join(make_private_dir(data_dir()), filename)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path
    except (OSError, ValueError):
        pass
    write_file_atomic(path, text, 0o600)
    return path


def agent_settings(name, cwd=None):
    """Return claude's --settings JSON for one agent: orch's hooks, and the classic renderer.

    "tui": "default" (a documented setting) keeps the screen orch reads, and
    keeps claude 2.1.332 from offering its fullscreen renderer to a session an
    older claude started, in a dialog any Enter would accept.  Where the user
    has a statusLine of their own, orch's runs in its place (the same padding
    and refresh), keeps what claude tells it (its context window, cost and
    limits), and runs theirs, whose output is what claude shows.
    """
    hooks = {}
    for event, ours in sorted(ClaudeKind.EVENTS.items()):
        hooks[event] = [{"hooks": [{"type": "command", "command": hook_command(name, ours)}]}]
    settings = {"hooks": hooks, "tui": "default"}
    theirs = users_status_line(cwd) if cwd else None
    if theirs:
        settings["statusLine"] = dict(theirs, command=status_line_command(name))
    return json.dumps(settings, separators=(",", ":"))


# What runs as claude's statusLine for an agent whose user has one.  It must
# never change what theirs prints: it keeps a few fields of claude's input,
# then runs their command (found where claude finds it, at each run) on the
# same bytes, and its output and exit code are theirs.
STATUS_LINE_SCRIPT = r'''# orch statusLine: keep what claude tells it, then run the user's own.
import json, os, subprocess, sys
def theirs(cwd):
    for path in (os.path.join(cwd, ".claude", "settings.local.json"),
                 os.path.join(cwd, ".claude", "settings.json"),
                 os.path.join(os.path.expanduser("~"), ".claude", "settings.json")):
        try:
            with open(path, "rb") as f:
                line = json.loads(f.read().decode("utf-8")).get("statusLine")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(line, dict) and isinstance(line.get("command"), str):
            return line["command"]
    return None
def keep(path, data):
    try:
        info = json.loads(data.decode("utf-8", "replace"))
        kept = json.dumps(dict((k, info.get(k)) for k in ("context_window", "cost", "rate_limits")))
        try:
            with open(path) as f:
                if f.read() == kept:
                    return
        except OSError:
            pass
        tmp = "%s.%d.tmp" % (path, os.getpid())
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "w") as f:
            f.write(kept)
        os.replace(tmp, path)
    except Exception:
        pass
data = sys.stdin.buffer.read()
keep(sys.argv[1], data)
command = theirs(os.getcwd())
sys.exit(subprocess.run(command, shell=True, input=data).returncode if command else 0)
'''


def users_status_line(cwd):
    """The statusLine setting claude would use in cwd (local, project, then user), or None."""
    for path in (os.path.join(cwd, ".claude", "settings.local.json"),
                 os.path.join(cwd, ".claude", "settings.json"),
                 os.path.join(os.path.expanduser("~"), ".claude", "settings.json")):
        found = read_json(path)
        line = found.get("statusLine") if isinstance(found, dict) else None
        if isinstance(line, dict) and isinstance(line.get("command"), str):
            return line
    return None


def status_line_command(name):
    import shlex
    path = install_script("statusline.py", STATUS_LINE_SCRIPT)
    return " ".join(shlex.quote(p) for p in (sys.executable, "-I", "-S", path, os.path.join(
        agent_dir(name), "statusline.json")))


def hook_command(name, event):
    """The command an agent CLI runs for one hook event: orch's hook, told orch's name for it."""
    import shlex
    hook = install_hook_script()
    # -I -S: skip site-packages and user environment: faster, and immune to PYTHON* vars.
    return " ".join(shlex.quote(p) for p in (sys.executable, "-I", "-S", hook, events_path(name),
                                              event))


def read_json_lines(path, offset=0, tail_bytes=None):
    """Return the JSON objects of a one-object-per-line file, from offset or its last bytes."""
    try:
        with open(path, "rb") as f:
            if tail_bytes:
                f.seek(0, os.SEEK_END)
                offset = max(offset, f.tell() - tail_bytes)
            f.seek(offset)
            data = f.read()
    except OSError:
        return []
    return parse_json_lines(data)


def parse_json_lines(data):
    found = []
    for raw in data.split(b"\n"):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError:
            continue    # a partial first line after seek, a torn write, or stderr text
        if isinstance(obj, dict):
            found.append(obj)
    return found


def read_new_lines(path, offset):
    """Return (objects, offset after the last whole line) of a JSON-lines file from offset.

    A line being written (no newline yet) is left for next time; a partial
    first line (offset inside a line) is skipped.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return parse_json_lines(data[:end]), offset + end


def read_events(name, since=0.0, tail_bytes=None):
    """Return the agent's hook events with time >= since, oldest first."""
    return [e for e in read_json_lines(events_path(name), tail_bytes=tail_bytes)
            if e.get("t", 0) >= since]


# ###########################################################################
# Status: what each agent is doing, from hooks plus tmux's view of the pane
# ###########################################################################

def event_status(event):
    """Map one hook event to (status, needs) or None when it says nothing of status."""
    kind = event.get("event")
    if kind in ("UserPromptSubmit", "PreToolUse", "PostToolUse", "Working", "Retrying"):
        return ("working", None)
    if kind in ("SessionStart", "Stop", "Interrupted", "StopFailure"):
        return ("idle", None)
    if kind == "PermissionRequest":
        return ("needs-input", "question" if event.get("tool_name") == "AskUserQuestion"
                else "permission")
    if kind == "Notification":
        ntype = event.get("notification_type")
        if ntype == "permission_prompt":
            return ("needs-input", "permission")
        if ntype == "elicitation_dialog":
            return ("needs-input", "question")
        if ntype == "idle_prompt":
            return ("idle", None)
        return None
    if kind == "SessionEnd":
        return ("exited", None)
    return None


def claude_session_file_status(agent, pid, newer_than=None):
    """Read claude's own status file: (status, waiting_for, time) or None.

    Claude fires no hook when a turn is interrupted (Esc) or a dialog is
    cancelled; this file (an internal one, no compatibility promise) does
    return to "idle" then, so it is the cross-check for working/needs-input.
    newer_than: None too when the file was not written after that time (a
    stat is a fraction of a read, and `list` asks for every agent).
    """
    home = agent.get("home")
    if not home or not pid:
        return None
    path = "%s/.claude/sessions/%s.json" % (home, pid)
    if newer_than is not None:
        try:
            if os.stat(path).st_mtime <= newer_than:
                return None
        except OSError:
            return None
    data = read_json(path)
    if not isinstance(data, dict):
        return None
    changed = data.get("statusUpdatedAt")
    try:
        changed = changed / 1000.0 if isinstance(changed, (int, float)) else os.path.getmtime(path)
    except OSError:
        return None
    return data.get("status"), data.get("waitingFor"), changed


# Dialogs read by their shape: a question, choices with a cursor, a keys line.
# Every CLI stops at screens of its own before its input box is usable (an
# API-key question, a sign-in picker, folder trust) and brings new ones with
# new releases, so orch recognises a dialog by its shape, not its words:
# choices, numbered or not, one behind a cursor (claude's "❯", codex's "›" and
# ">", gemini's "●"), a keys line under them ("Enter to confirm · Esc to
# cancel", "Press enter to continue", "(Use Enter to select)"), maybe in a
# box ("│ … │").  Each kind then names the ones it knows (FIRST_SCREENS).
CURSORS = "\u276f\u203a>\u25cf"
CHOICE_ROW = r"^\s*([\u276f\u203a>\u25cf]\s*)?(\d{1,2})\.\s+(\S.*?)\s*$"
CURSOR_ROW = r"^(\s*[\u276f\u203a>\u25cf]\s+)(\S.*?)\s*$"     # an unnumbered choice, chosen
KEYS_ROW = (r"(?i)\benter (to )?(confirm|continue|select|save|submit|choose|set|accept)\b"
            r"|\besc (to )?(cancel|close|dismiss|go back|back)\b")
RULE_CHARS = "\u2500\u2501\u2594\u2581\u2550"
BOX_SIDES = r"^\s*[\u2502\u2503] ?|\s*[\u2502\u2503]\s*$"


def is_rule(row):
    return len(row.strip()) >= 10 and row.strip()[:10].strip(RULE_CHARS) == ""


def has_input_box(rows):
    """True when claude's input box (a ❯ line under a rule) is among rows."""
    return any(row.startswith(PROMPT_MARK) and i and is_rule(rows[i - 1])
               for i, row in enumerate(rows))


def unboxed(rows):
    """Rows without the sides of a box drawn around them (gemini's dialogs)."""
    return [re.sub(BOX_SIDES, "", row).rstrip() for row in rows]


def choice_dialog(rows, said=False):
    """A dialog of choices on a screen, recognised by its shape, or None.

    Not by its words, so a dialog a new release brings is one too: choices,
    one behind a cursor, a keys line under them, and no input box below (the
    dialog takes its place).  A reply that quotes a dialog sits above the
    input box, so it is not one.  said: the CLI itself says a dialog is open,
    and then one may be drawn over an empty input box (claude 2.1.332's
    /model, the second time).  Choices without digits are numbered from 1 in
    the order shown.  Returns {question, choices: {number: text}, cursor, keys}.
    """
    rows = unboxed(rows)
    keys = next((i for i in range(len(rows) - 1, -1, -1) if re.search(KEYS_ROW, rows[i])), None)
    if keys is None or not said and has_input_box(rows[keys:]):
        return None
    found = numbered_choices(rows, keys) or unnumbered_choices(rows, keys)
    if not found:
        return None
    choices, cursor, first = found
    return {"question": dialog_question(rows, first), "choices": choices, "cursor": cursor,
            "keys": rows[keys].strip()}


ENTRY_KEYS = r"(?i)\benter to (submit|continue|confirm)\b"


def entry_dialog(rows):
    """A screen that takes Enter and offers no choices (a field to fill, a notice), or None.

    Gemini's "Enter Gemini API Key" box; a "Press enter to continue" page.
    Returns {question, keys} like choice_dialog, without choices.
    """
    rows = unboxed(rows)
    keys = next((i for i in range(len(rows) - 1, -1, -1) if re.search(KEYS_ROW, rows[i])), None)
    if keys is None or not re.search(ENTRY_KEYS, rows[keys]) or has_input_box(rows[keys:]) \
            or numbered_choices(rows, keys) or unnumbered_choices(rows, keys):
        return None
    return {"question": dialog_question(rows, keys), "keys": rows[keys].strip()}


def numbered_choices(rows, keys):
    """(choices, cursor, first row) of "1. …" rows above the keys line, or None.

    Read upwards from the keys line: the last choice first, down to choice 1;
    rows between choices (a description under each, blank lines) are skipped.
    """
    choices, cursor, first = {}, None, None
    for i in range(keys - 1, max(-1, keys - 25), -1):
        found = re.match(CHOICE_ROW, rows[i])
        if found:
            number = int(found.group(2))
            if choices and number != min(choices) - 1:
                return None
            choices[number] = found.group(3)
            cursor = number if found.group(1) else cursor
            first = i
            if number == 1:
                break
        elif choices and (is_rule(rows[i]) or rows[i].rstrip().endswith("?")):
            break
    if not choices or cursor is None or sorted(choices) != list(range(1, len(choices) + 1)):
        return None
    return choices, cursor, first


def unnumbered_choices(rows, keys):
    """(choices, cursor, first row) of choices without digits ("  Yes" / "❯ No"), or None.

    The chosen one is behind the cursor; the others are the rows next to it
    whose text starts in the same column.  At least two, and the cursor's row
    is no input line (that one sits under a rule).
    """
    at = next((i for i in range(keys - 1, max(-1, keys - 12), -1)
               if re.match(CURSOR_ROW, rows[i])), None)
    if at is None or at and is_rule(rows[at - 1]):
        return None
    column = len(re.match(CURSOR_ROW, rows[at]).group(1))

    def same_column(row):
        return len(row) > column and row[:column].strip() == "" and row[column] != " "
    first, last = at, at
    while first > 0 and same_column(rows[first - 1]):
        first -= 1
    while last + 1 < keys and same_column(rows[last + 1]):
        last += 1
    if last == first:
        return None
    choices = dict((n + 1, rows[i].strip().lstrip(CURSORS).strip())
                   for n, i in enumerate(range(first, last + 1)))
    return choices, at - first + 1, first


def dialog_question(rows, first):
    """The question over a dialog's choices: its last line ending in '?', else its title."""
    block = []
    for row in reversed(rows[max(0, first - 15):first]):
        if is_rule(row) or row.startswith(PROMPT_MARK):    # the conversation is above
            break
        if row.strip():
            block.insert(0, row.strip())
    asked = [row for row in block if row.endswith("?")]
    return (asked[-1] if asked else block[0] if block else "a dialog")[:200]


def sentence_at(row, start, end):
    """The sentence of row around row[start:end]: from the last '. ' or ': ' to a '?' or '.'."""
    left = max(row.rfind(". ", 0, start), row.rfind(": ", 0, start))
    left = left + 2 if left >= 0 else 0
    right = re.search(r"[?.](\s|$)", row[end - 1:])
    return row[left:end - 1 + right.end() if right else len(row)].strip()[:200]


def known_screen(rows, screens):
    """The first of screens [(needs, words, keys, fix)] whose words the screen shows.

    Returns {needs, question, keys, fix} or None; the question is the
    sentence the words were found in.
    """
    rows = unboxed(rows[-40:])
    for needs, words, keys, fix in screens:
        said = [sentence_at(row, m.start(), m.end()) for row in rows
                for m in [re.search(words, row)] if m]
        if said:    # the question, where the words are in a choice too ("Yes, I trust…")
            asked = [s for s in said if s.endswith("?")]
            return {"needs": needs, "question": (asked[-1:] or said)[0], "keys": keys,
                    "fix": fix}
    return None


def pane_of(agent, panes):
    """Return the live tmux pane of this agent, or None if it is gone."""
    info = agent.get("tmux") or {}
    pane = panes.get(info.get("pane"))
    # Pane ids restart at %0 with a new server: the pid proves it is still ours.
    if pane is None or pane["pane_pid"] != str(info.get("pid")):
        return None
    return pane


def exit_code_of(pane):
    """The dead pane's exit code; a signal death reads as 128+N, as in the shell."""
    code, sig = pane["pane_dead_status"], pane["pane_dead_signal"]
    if sig.isdigit() and int(sig) > 0:
        return 128 + int(sig)
    if code.lstrip("-").isdigit():
        return int(code)
    return zombie_exit_code(pane["pane_pid"])


def zombie_exit_code(pid):
    """Exit code of an unreaped child, from /proc/PID/stat (Linux), or None.

    tmux (seen with 3.3a) sometimes leaves a pane's process a zombie for a
    long time and reports no exit status until it reaps it; the kernel
    already knows the status.
    """
    fields = proc_stat(int(pid)) if str(pid).isdigit() else None
    if not fields or fields[0] != "Z" or len(fields) < 50:
        return None
    status = int(fields[-1])        # field 52: the status as waitpid(2) reports it
    return 128 + (status & 0x7f) if status & 0x7f else (status >> 8) & 0xff


CONTINUING = "*"     # a turn claude started by itself, for messages queued during the last one
RECENT = 20          # turn ends and failures kept, each with its time (see changes)


def replay_events(events, seen=None):
    """Walk one agent's hook events in order; return what they say about it now.

    seen is the result of replaying the events before these (see StatusCache).

    Turns are counted, not just read off the last event.  Claude Code 2.1.330+
    reports a message typed during a turn at once, carrying the running turn's
    prompt_id, and runs it after that turn's Stop as a turn of its own that
    fires no UserPromptSubmit: a Stop with messages waiting is not the end of
    the work.  (2.1.197 reports them when their turn starts, each with its own
    prompt_id, back to back.)  Each UserPromptSubmit that was queued gets
    "queued": True, so `send` can say so.
    """
    seen = dict(seen or {"status": None, "needs": None, "detail": None, "since": None,
                         "turn": None, "waiting": 0, "last_prompt": None, "session_id": None,
                         "permission_mode": None, "reported_in": False, "last_event": None,
                         "tool": None, "ended": None, "asked": None, "answered": None,
                         "error": None,
                         "error_detail": None, "failed": None, "ends": [], "failures": []})
    for event in events:
        kind = event.get("event")
        seen["last_event"] = event.get("t")
        # The tool about to run: the one a permission dialog will be about (gemini's
        # permission names none: it is the tool of the call before it).
        if kind == "PreToolUse":
            seen["tool"] = event.get("tool_name")
        elif kind == "PermissionRequest":
            seen["tool"] = event.get("tool_name") or seen["tool"]
        elif kind != "Notification":
            seen["tool"] = None
        if isinstance(event.get("permission_mode"), str):
            seen["permission_mode"] = event["permission_mode"]
        if kind == "UserPromptSubmit":
            seen["last_prompt"] = event.get("prompt")
            seen.update(error=None, error_detail=None)      # a new turn: the failure is past
            count_prompt(seen, event)
        elif kind == "SessionStart":
            seen.update(reported_in=True, turn=None, waiting=0)
            if event.get("session_id"):
                seen["session_id"] = event["session_id"]     # a new one after /clear
            if event.get("transcript_path"):
                seen["transcript"] = event["transcript_path"]       # usage is read there
        elif kind == "Stop":
            turn_ended(seen)
            seen["ended"] = event.get("t")      # when the last turn ended (notifications)
            # Its start is enough here (a kind compares it with a marker; `reply`
            # reads the transcript): the status cache holds one for every agent.
            reply = event.get("last_assistant_message")
            seen["last_reply"] = reply[:200] if isinstance(reply, str) else None
            # The last turn ends and failures, each, for a watcher that looks only now and then.
            seen["ends"] = (seen.get("ends") or [])[-(RECENT - 1):] + [event.get("t")]
            seen.update(error=None, error_detail=None)
        elif kind == "StopFailure":         # claude: an API error ended the turn, not done
            seen.update(turn=None, waiting=0, error=event.get("error") or "unknown",
                        error_detail=event.get("last_assistant_message"), failed=event.get("t"))
            seen["failures"] = (seen.get("failures") or [])[-(RECENT - 1):] + [
                [event.get("t"), seen["error"], seen["error_detail"]]]
        elif kind == "PermissionRequest":
            seen["asked"] = event.get("t")
        elif kind == "Interrupted":         # codex: Escape ended the turn, no Stop comes
            seen.update(turn=None, waiting=0)
        if kind in ANSWERED_BY and seen.get("asked"):
            seen["answered"] = event.get("t")
        found = event_status(event)
        if found is None:
            continue
        if kind == "Stop" and seen["turn"] is not None:
            found = ("working", None)       # the queued messages' turn starts now
        elif kind == "Notification" and found[0] == "idle":
            seen.update(turn=None, waiting=0)
        elif kind == "Notification" and seen["status"] == "needs-input":
            continue        # a reminder of the dialog already up; it names no tool
        elif kind == "Notification" and event.get("notification_type") == "permission_prompt" \
                and (seen.get("answered") or 0) >= (seen.get("asked") or float("inf")):
            continue        # late, on a busy machine: the dialog it tells of was answered
        detail = (event.get("tool_name") or seen["tool"]) if found[1] else None
        if kind == "Retrying":      # an API error the CLI retries: say so while it does
            detail = "retrying: %s" % (event.get("message") or "an API error") + (
                ", attempt %s" % event["attempt"] if event.get("attempt") else "") + (
                next_try(event.get("next"), event.get("t")))
        seen.update(status=found[0], needs=found[1], since=event.get("t"), detail=detail)
    return seen


def next_try(when, said):
    """", next try at 03:44" when a CLI retries a while from now (a retry-after of an hour)."""
    if not isinstance(when, (int, float)) or when - (said or 0) < 60:
        return ""
    same_day = time.localtime(when)[:3] == time.localtime(said)[:3]
    return ", next try at %s" % time.strftime("%H:%M" if same_day else "%b %d %H:%M",
                                              time.localtime(when))


def count_prompt(seen, event):
    pid, turn = event.get("prompt_id"), seen["turn"]
    if turn is not None and (turn == CONTINUING or (pid and pid == turn)):
        event["queued"] = True          # claude holds it until the running turn ends
        seen["waiting"] += 1
        if turn == CONTINUING and pid:
            seen["turn"] = pid
    else:
        seen.update(turn=pid or "", waiting=0)


def turn_ended(seen):
    if seen["waiting"]:
        seen.update(turn=CONTINUING, waiting=0)
    else:
        seen["turn"] = None


class AgentCache(object):
    """Per-agent entries in one small JSON file of the data folder, read once when asked.

    Only a cache: lost, stale (two orch processes may each save theirs) or
    unwritable, its entries are rebuilt from the files they were read from.
    """
    FILE = None

    def __init__(self):
        self.path = os.path.join(data_dir(), self.FILE)
        self.agents = os.path.join(data_dir(), "agents")
        self.loaded = None      # read when an agent first asks: some kinds need none of it
        self.changed = False

    @property
    def entries(self):
        if self.loaded is None:
            found = read_json(self.path)
            self.loaded = found if isinstance(found, dict) else {}
        return self.loaded

    def save(self):
        if not self.changed:
            return
        kept = dict((name, entry) for name, entry in self.entries.items()
                    if os.path.isdir(os.path.join(self.agents, name)))    # forget removed agents
        try:
            write_file_atomic(self.path, json.dumps(kept))
        except OrchError:
            pass        # a read-only folder: the next call reads again


class StatusCache(AgentCache):
    """Every agent's hook replay, kept in one small file beside the state.

    `list` and `wait` need each agent's replayed hook events, every time.
    Replaying each event file (hours of work: ~2,000 events, 0.5 MB) made
    their cost grow with history.  This cache holds, per agent, the replay's
    result and the byte offset read so far: a call costs one stat per agent
    and one read in all when nothing happened, and the parsing of the new
    lines when something did.
    """
    FILE = "status-cache.json"

    def __init__(self):
        AgentCache.__init__(self)
        self.looked = {}        # one StatusCache is one look: list asks twice per agent

    def summary(self, agent):
        """replay_events over the agent's hook events since its launch."""
        name = agent["name"]
        if name not in self.looked:
            self.looked[name] = self.replayed(agent)
        return self.looked[name]

    def replayed(self, agent):
        name = agent["name"]
        launched = agent.get("launched", agent.get("created", 0))
        path = "%s/%s/events.jsonl" % (self.agents, name)      # events_path(), for 300 agents
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        entry = self.entries.get(name)
        if not (isinstance(entry, dict) and entry.get("launched") == launched
                and isinstance(entry.get("seen"), dict)
                and isinstance(entry.get("offset"), int) and entry["offset"] <= size):
            # From scratch: the last 64 KB hold far more than the current turn.
            entry = {"launched": launched, "offset": max(0, size - 65536), "seen": None}
        if entry["offset"] == size and entry["seen"] is not None:
            return entry["seen"]
        events, end = read_new_lines(path, entry["offset"])
        seen = replay_events([e for e in events if e.get("t", 0) >= launched], entry["seen"])
        self.entries[name] = {"launched": launched, "offset": end, "seen": seen}
        self.changed = True
        return seen


def agent_status(agent, panes, read_screen=None, cache=None):
    """Return {status, since, needs, detail, exit_code, source, last_prompt, ...} for one agent.

    read_screen() is called only when hooks cannot answer: before the CLI's
    first message, when a screen no hook reports can stand before its input
    box (folder trust, an API-key question, a sign-in), and for a dialog.
    """
    launched = agent.get("launched", agent.get("created", 0))
    result = {"status": "exited", "since": None, "needs": None, "detail": None,
              "exit_code": None, "source": "tmux", "last_prompt": None, "pid": None,
              "permission_mode": None, "pending": False, "error": None, "resets_at": None}
    kind = kind_of(agent)
    hooked = kind.hooks
    seen = (cache or StatusCache()).summary(agent) if hooked else replay_events([])
    result.update(last_prompt=seen["last_prompt"], since=seen["last_event"],
                  permission_mode=seen["permission_mode"] or permission_mode_arg(agent))
    if seen["session_id"]:
        result["session_id"] = seen["session_id"]
    pane = pane_of(agent, panes)
    if pane is None:
        return result
    if pane["pane_dead"] == "1":
        result["exit_code"] = exit_code_of(pane)
        return result
    result.update(status="starting", since=launched, pid=int(pane["pane_pid"]))
    if not hooked:
        return screen_status(result, pane)
    result["source"] = "hooks"
    result.update(ended=seen.get("ended"), asked=seen.get("asked"), failed=seen.get("failed"),
                  last_reply=seen.get("last_reply"),
                  ends=seen.get("ends") or [], failures=seen.get("failures") or [])
    if seen["status"]:
        result.update(status=seen["status"], needs=seen["needs"], since=seen["since"],
                      detail=seen["detail"], tool=seen["tool"],
                      pending=seen["turn"] == CONTINUING or seen["waiting"] > 0)
    if agent.get("first_prompt_sha") and seen["last_prompt"] is None \
            and result["status"] == "idle":
        # Started but has not yet taken the prompt given on its command line.
        result["status"] = "starting"
    if read_screen and (result["status"] == "starting" and not seen["reported_in"] or
                        kind.hooks_before_screens and result["status"] == "idle"
                        and seen["last_prompt"] is None):
        # Before its first message a CLI may stand at a screen no hook reports.
        found = kind.screen_start(read_screen())
        if found and (result["status"] == "starting" or found[0] == "needs-input"):
            result.update(status=found[0], needs=found[1], detail=found[2], source="screen")
    if result["source"] == "hooks" and result["status"] != "starting":
        cross_check(agent, pane, result)
        kind.recheck(agent, result, read_screen)
    if result["needs"] == "dialog" and result["source"] != "screen" and read_screen:
        dialog = choice_dialog(read_screen(), said=True)
        result["detail"] = dialog and dialog["question"]
    if result["status"] == "idle" and seen.get("error"):
        # Its last turn ended on an error: idle, and not done.
        result.update(error=seen["error"], detail=seen.get("error_detail"))
    if result["status"] == "idle" and result["error"]:
        limit = result.get("limit") or kind.usage_limit(agent, result)
        if limit:       # a usage limit: it says when it lifts, if the CLI told
            result.update(status="limited", resets_at=limit["resets_at"],
                          continues_itself=limit.get("continues_itself", False))
    return result


def permission_mode_arg(agent):
    """The --permission-mode the agent was started with, until claude reports its own."""
    extra = agent.get("extra_args") or []
    for i, word in enumerate(extra):
        if word == "--permission-mode" and i + 1 < len(extra):
            return extra[i + 1]
        if word.startswith("--permission-mode="):
            return word.split("=", 1)[1]
    return None


SETTLE = 2.0    # seconds claude takes to write its own status after a hook fires


def cross_check(agent, pane, result):
    """Correct hook status with claude's own status file where hooks are silent.

    No hook fires when a turn is interrupted (Esc) or a dialog is cancelled,
    so after those the last hook still says working/needs-input while claude's
    file says idle.  None fires when a dialog is approved either, until the
    tool ends: the file says busy.  And none when claude starts the turn of
    messages queued during the last one: its file says busy while the last
    hook (Stop) says idle.  Claude writes the file ~0.1-0.2 s after the Stop hook, and
    2.1.330 shows idle for ~30 ms between a turn and its queued one, hence SETTLE.
    """
    since = result["since"] or 0
    # Only a file written after the last hook event can change the answer, but
    # for SETTLE seconds after a Stop an older "busy" still can (see below).
    recent = time.time() - since < SETTLE
    own = claude_session_file_status(agent, pane["pane_pid"], None if recent else since)
    if not own:
        return
    status, waiting_for, changed = own
    newer = changed > since
    if result["status"] in ("working", "needs-input") and status == "idle" and newer:
        if time.time() - changed < SETTLE:
            # Between a turn and the one claude starts for queued messages; or the
            # turn's own Stop or StopFailure is still on its way: claude writes
            # idle as it fires them, and a hook on a busy machine takes a while.
            # A failed turn must not read as done in between (seen on 2.1.332).
            return
        result.update(status="idle", needs=None, detail=None, since=changed,
                      source="claude-status")
    elif result["status"] in ("idle", "working") and status == "waiting" and newer \
            and "dialog" in (waiting_for or ""):
        # A modal screen no hook reports: a picker a person opened (/model), a
        # prompt a newer claude shows.  Claude says "dialog open" (2.1.197-2.1.332).
        result.update(status="needs-input", needs="dialog", detail=None, since=changed,
                      source="claude-status")
    elif result["status"] == "working" and status == "waiting" and newer:
        # Claude writes this ~0.1 s before its PermissionRequest hook fires.
        tool = result.get("tool")
        reason = "permission" if "permission" in (waiting_for or "") \
            and tool != "AskUserQuestion" else "question"
        result.update(status="needs-input", needs=reason, detail=tool or waiting_for,
                      since=changed, source="claude-status")
    elif result["status"] == "idle" and status == "busy" \
            and (newer or time.time() - since < SETTLE):
        result.update(status="working", since=max(changed, since), source="claude-status")
    elif result["status"] == "needs-input" and status == "busy" and newer:
        # The dialog was answered Yes and the tool runs: no hook fires until it ends
        # (measured on 2.1.197 and 2.1.330).
        result.update(status="working", needs=None, since=changed, source="claude-status")


def screen_status(result, pane):
    """Best-effort status for agents without hooks: recent output means working."""
    result["source"] = "activity"
    try:
        last_output = float(pane["window_activity"])
    except ValueError:
        return result
    busy = time.time() - last_output < 3
    result.update(status="working" if busy else "idle", since=last_output)
    return result


def statuses(agents, save=True, cache=None, meanwhile=None):
    """Return {name: status dict} for agents, with one list-panes per tmux server.

    save=False: touch no file (doctor), not even the status caches.
    meanwhile(): work of the caller's, done while tmux answers (once, in any case).
    """
    by_socket = {}
    result = {}
    cache = cache or StatusCache()
    for agent in agents:
        if agent.get("backend") == "headless":
            result[agent["name"]] = headless_status(agent)
            continue
        socket = (agent.get("tmux") or {}).get("socket")
        by_socket.setdefault(socket, []).append(agent)
    for socket, group in by_socket.items():
        answer = ask_panes(group, socket)
        if meanwhile:
            meanwhile()
            meanwhile = None
        panes = answer()
        for _ in range(10):
            # tmux marks a pane dead when its pty closes, a moment before it
            # reaps the exit status: ask again rather than report no code.
            if not any(p["pane_dead"] == "1" and exit_code_of(p) is None for p in panes.values()):
                break
            time.sleep(0.02)
            panes = ask_panes(group, socket)()
        result.update(group_statuses(group, panes, socket, cache))
    if meanwhile:
        meanwhile()
    if save:
        cache.save()
    return result


class ScreenNeeded(Exception):
    """A status needs the agent's screen, which group_statuses captures afterwards."""


def group_statuses(group, panes, socket, cache):
    """{name: status} of the agents of one tmux server, the screens they need read together.

    Each capture-pane is a tmux client of its own (~3 ms).  A working agent
    whose hooks are silent has its screen read (a retry, a limit box), so
    with one capture each, `list` of 300 agents thinking at once took a
    second; now their screens come in one tmux call per ~170.
    """
    if len(group) == 1:
        agent = group[0]
        return {agent["name"]: agent_status(agent, panes, screen_reader(agent, socket), cache)}

    def later():
        raise ScreenNeeded()
    found, waiting = {}, []
    for agent in group:
        try:
            found[agent["name"]] = agent_status(agent, panes, later, cache)
        except ScreenNeeded:
            waiting.append(agent)
    screens = capture_panes([agent["tmux"]["pane"] for agent in waiting], socket)
    for agent in waiting:
        rows = screens.get(agent["tmux"]["pane"], [])
        found[agent["name"]] = agent_status(agent, panes, lambda: rows, cache)
    return found


def screen_reader(agent, socket):
    """A function returning the agent's screen rows ([] if tmux cannot capture it)."""
    return lambda: screen_or_nothing(agent["tmux"]["pane"], socket)


def ask_panes(group, socket):
    """Start the one tmux call for a group of agents' panes (their one pane, or every
    pane); return a function that waits for them."""
    return panes_asked(pane_query(group[0]["tmux"]["pane"] if len(group) == 1 else None), socket)


def status_of(agent):
    return statuses([agent])[agent["name"]]


def retry_until(check, timeout, interval=0.1):
    """Call check() until it returns a true value or timeout passes; return its last value."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value or time.time() >= deadline:
            return value
        time.sleep(interval)


# ###########################################################################
# Launching agents in tmux windows
# ###########################################################################

def agent_environment(agent):
    """The caller's environment, minus what would confuse the agent, with a UTF-8 locale.

    Plus where its fleet is: an `orch` the agent runs (an orchestrator's Bash
    tool) then reaches the same state and tmux server, and names its parent.
    """
    env = dict((k, v) for k, v in os.environ.items() if k not in SCRUBBED_ENV)
    if env.get("GEMINI_CLI_HOME", "").startswith(data_dir() + os.sep):
        del env["GEMINI_CLI_HOME"]      # a gemini agent's own, with its hooks: not the child's
    tmux_place = agent.get("tmux") or {"socket": default_socket(), "session": default_session()}
    env.update(ORCH_AGENT=agent["name"], ORCH_STATE=state_path(),
               ORCH_SESSION=tmux_place["session"])
    env.pop("ORCH_TMUX_SOCKET", None)
    if tmux_place["socket"]:
        env["ORCH_TMUX_SOCKET"] = tmux_place["socket"]
    # cron, containers and LC_ALL=C scripts give no UTF-8 locale; the agent
    # and the tools it runs then mangle non-ASCII source and file names.
    # Only the character type changes (LC_ALL, if set, is what decides it).
    if not is_utf8_locale(env.get("LC_ALL") or env.get("LC_CTYPE") or env.get("LANG")):
        env["LC_ALL" if env.get("LC_ALL") else "LC_CTYPE"] = "C.UTF-8"
    return env


def is_utf8_locale(name):
    return bool(name) and ("UTF-8" in name.upper() or "UTF8" in name.upper())


def find_program(program, what="Claude Code (npm install -g @anthropic-ai/claude-code)",
                 variable="ORCH_CLAUDE"):
    """Resolve the agent program to an absolute path, or say how to get it."""
    import shutil
    found = shutil.which(program)
    if not found:
        raise OrchError("%s not found on PATH: install %s or set %s to the program to run"
                        % (program, what, variable))
    return os.path.abspath(found)


def check_command(cmd):
    """Refuse a --cmd whose program is missing, before a window is opened for it."""
    import shlex
    import shutil
    try:
        words = shlex.split(cmd)
    except ValueError as e:
        raise OrchError("cannot parse --cmd %r: %s" % (cmd, e), EXIT_USAGE)
    if not words:
        raise OrchError("--cmd is empty", EXIT_USAGE)
    first = words[0]
    if "=" not in first and not shutil.which(first) and not is_shell_word(first):
        raise OrchError("%s not found on PATH (from --cmd %r)" % (first, cmd))


def is_shell_word(word):
    return word in ("exec", "cd", "env", "set", "export", "exit", "true", "false", ":", ".", "{", "(")


# Run by the launch script: the agent's environment comes from a private file,
# so no value of it (API keys!) is ever on a command line, which every local
# user can read in /proc/PID/cmdline.  Any name and byte survive, as with env -i.
EXEC_AGENT = r"""import json, os, sys
with open(sys.argv[1], encoding="utf-8") as f:
    spec = json.load(f)
env = dict(spec["env"], TERM=os.environ.get("TERM") or "screen")
try:
    os.execve(spec["argv"][0], spec["argv"], env)
except OSError as e:
    sys.stderr.write("orch: cannot start %s: %s\n" % (spec["argv"][0], e.strerror))
    sys.exit(127)
"""


def launch_script(spec_path, cwd):
    """Return the /bin/sh script that starts the agent described in spec_path, in cwd.

    The pane gets remain-on-exit from inside, before the agent starts: set
    from outside, it races with an agent that exits at once.  tmux's TERM is
    the right one inside the pane, not the caller's.
    """
    import shlex
    import shutil
    q = shlex.quote
    tmux_bin = shutil.which("tmux") or "tmux"
    return "\n".join([
        "#!/bin/sh",
        "# Written by orch: starts one agent. Safe to delete once it runs.",
        '%s -S "${TMUX%%%%,*}" set-option -w -t "$TMUX_PANE" remain-on-exit on >/dev/null 2>&1'
        % q(tmux_bin),
        "cd %s || exit 126" % q(cwd),
        "exec %s -I -S -c %s %s" % (q(sys.executable), q(EXEC_AGENT), q(spec_path)),
        ""])


def new_window(socket, session, name, cwd, command):
    """Open a window running command; create the session if needed. Return pane info."""
    fmt = SEP.join(("#{pane_id}", "#{pane_pid}", "#{window_id}", "#{pid}"))
    window = ["new-window", "-d", "-P", "-F", fmt, "-t", "=%s:" % session, "-n", name, "-c", cwd]
    try:
        out = tmux(window + command + keep_alive(socket, session), socket=socket)
    except TmuxError as e:
        if not (e.server_gone() or e.target_gone()):
            raise
        try:
            out = tmux(["new-session", "-d", "-P", "-F", fmt, "-s", session, "-n", name,
                        "-x", "200", "-y", "50", "-c", cwd] + command
                       + keep_alive(socket, session), socket=socket)
        except TmuxError as e2:
            if "duplicate session" not in e2.stderr:
                raise
            out = tmux(window + command + keep_alive(socket, session), socket=socket)
    lines = out.strip().split("\n")
    pane, pid, window_id, server_pid = lines[0].split(SEP)
    found = {"socket": socket, "session": session, "pane": pane, "pid": int(pid),
             "window": window_id, "server_pid": int(server_pid)}
    if lines[-1].strip() == "on":
        # The user's own server ends when nobody is attached: agents cannot live there.
        try:
            tmux(["kill-pane", "-t", pane], socket=socket)
        except TmuxError:
            pass        # the server already ended, and the agent with it
        raise OrchError("your tmux configuration sets exit-unattached on, so the tmux server "
                        "ends as soon as nobody is attached and takes detached agents with it: "
                        "give orch a server of its own (export ORCH_TMUX_SOCKET=orch), where "
                        "orch turns that option off, or remove it from ~/.tmux.conf")
    return found


def keep_alive(socket, session):
    """tmux commands chained after a window is made, so a user's tmux.conf cannot end it.

    destroy-unattached (a session option, maybe set globally in tmux.conf)
    removes a detached session at once: orch turns it off for its own session
    only.  exit-unattached is the whole server's: orch turns it off only on a
    server of its own (a socket it was given); on the default server it asks
    tmux for it, and new_window refuses if it is on.
    """
    chain = [";", "set-option", "-t", "=%s:" % session, "destroy-unattached", "off"]
    if socket:
        return chain + [";", "set-option", "-s", "exit-unattached", "off"]
    return chain + [";", "show-options", "-sv", "exit-unattached"]


def claude_argv(agent, program, resume_id=None):
    """claude's command line: never a prompt (every local user can read it); that is pasted."""
    argv = [program]
    argv += ["--resume", resume_id] if resume_id else ["--session-id", agent["session_id"]]
    argv += ["--name", agent["name"], "--settings", agent_settings(agent["name"], agent["cwd"])]
    return argv + (agent.get("extra_args") or [])


def start_in_tmux(agent, argv):
    """Write the agent's launch files and start it in a new window of the session."""
    folder = agent_dir(agent["name"])
    make_private_dir(folder)
    spec = os.path.join(folder, "launch.json")
    env = kind_of(agent).environment(agent, agent_environment(agent))
    write_file_atomic(spec, json.dumps({"argv": argv, "env": env}))
    script = os.path.join(folder, "launch.sh")
    write_file_atomic(script, launch_script(spec, agent["cwd"]), 0o700)
    agent["launched"] = time.time()
    agent["tmux"] = new_window(agent["tmux"]["socket"], agent["tmux"]["session"],
                               agent["name"], agent["cwd"], ["/bin/sh", script])


# Claude's settings files, highest precedence first (Linux paths).
MANAGED_SETTINGS = "/etc/claude-code/managed-settings.json"


def hooks_turned_off(cwd):
    """Return (file, setting) when claude's settings turn hooks off for an agent in cwd.

    orch could turn its own hooks back on with `--settings '{"disableAllHooks":
    false}'`, but that turns the user's own hooks back on too (measured on
    2.1.197 and 2.1.330): it refuses instead.
    """
    home = os.path.expanduser("~")
    for path in (MANAGED_SETTINGS, os.path.join(cwd, ".claude", "settings.local.json"),
                 os.path.join(cwd, ".claude", "settings.json"),
                 os.path.join(home, ".claude", "settings.json")):
        settings = read_json(path)
        if not isinstance(settings, dict):
            continue
        if path == MANAGED_SETTINGS and settings.get("allowManagedHooksOnly") is True:
            return path, "allowManagedHooksOnly"
        if "disableAllHooks" in settings:
            return (path, "disableAllHooks") if settings["disableAllHooks"] is True else None
    return None


def refuse_without_hooks(cwd):
    off = hooks_turned_off(cwd)
    if off:
        raise OrchError("claude's hooks are turned off for %s (%s in %s): orch reads each "
                        "agent's status and confirms each message through hooks of its own, "
                        "and turning them on for its agents would turn yours on too; remove "
                        "the setting, or use --backend headless, which needs no hooks"
                        % (cwd, off[1], short_path(off[0])))


def claude_trusts(path):
    """True if ~/.claude.json marks path or a folder above it trusted (claude's rule)."""
    try:
        with open(os.path.join(os.path.expanduser("~"), ".claude.json"), encoding="utf-8") as f:
            projects = json.load(f).get("projects") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return within(path, set(folder for folder, said in projects.items()
                            if isinstance(said, dict) and said.get("hasTrustDialogAccepted") is True))


def trust_folder(cwd):
    """Mark cwd trusted in ~/.claude.json so claude starts without its trust dialog.

    Claude rewrites that file itself, so: lock against other orch processes,
    re-read just before writing, change one key, keep every other key exactly,
    and replace the file atomically with its original mode.
    """
    import fcntl
    path = os.path.join(os.path.expanduser("~"), ".claude.json")
    make_private_dir(data_dir())
    lock = open_private(os.path.join(data_dir(), "claude-json.lock"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            text, mode = "{}", 0o600
        try:
            config = json.loads(text or "{}")
            projects = config.setdefault("projects", {})
            project = projects.setdefault(cwd, {})
            if project.get("hasTrustDialogAccepted") is True:
                return
            project["hasTrustDialogAccepted"] = True
        except (ValueError, AttributeError, TypeError):
            raise OrchError("cannot mark %s trusted: %s is not the JSON object claude writes; "
                            "fix it or start without --trust" % (cwd, path))
        write_file_atomic(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n", mode)
    finally:
        os.close(lock)


def escape_leading(text):
    """Make a leading '/', '!', '#', '&' or '@' plain text: claude would run it as a command.

    A backslash keeps each of them literal on every version measured, as an
    argument and as a paste.  A leading space did on 2.1.197, but 2.1.330
    looks past blanks: " /compact" runs /compact there.
    """
    if text.lstrip()[:1] in ("/", "!", "#", "&", "@"):
        return "\\" + text
    return text


def wait_until_started(agent, timeout):
    """Wait for a claude agent to report in (and take its first prompt); return its status.

    Raises if it exits first; returns a needs-input status if a dialog blocks it.
    """
    def settled():
        st = status_of(agent)
        if st["status"] == "starting" and hooks_silent(agent):
            raise OrchError("agent %s runs (claude's own status file says so) but none of "
                            "orch's hooks fired within %gs: something turns hooks off for it "
                            "(a managed policy?), so orch can neither read its status nor "
                            "confirm messages; `orch doctor`, then `orch rm %s`"
                            % (agent["name"], HOOK_GRACE, agent["name"]), EXIT_UNCONFIRMED)
        return st if st["status"] != "starting" else None

    def exit_known():
        st = status_of(agent)
        return st if st["exit_code"] is not None else None
    st = retry_until(settled, timeout, interval=0.1) or status_of(agent)
    if st["status"] == "exited":
        # tmux sees the pty close a moment before it reaps the exit status.
        st = retry_until(exit_known, 1.0) or st
        raise exited_at_start(agent, st)
    return st


def settle_start(agent, timeout):
    """wait_until_started, then until its input box is usable or a screen stands before it.

    Gemini's hooks say it started before it draws its first screen.
    """
    st = wait_until_started(agent, timeout)
    if st["status"] in ("starting", "exited") or at_first_screen(st):
        return st

    def settled():
        now = status_of(agent)
        return now if at_first_screen(now) or now["status"] != "idle" or \
            kind_of(agent).ready(agent) else None
    return retry_until(settled, min(timeout, 15)) or st


HOOK_GRACE = 5.0    # seconds from claude's own status file to its SessionStart hook (~0.6 s seen)


def hooks_silent(agent):
    """True when claude has been up for HOOK_GRACE seconds and no hook of orch's has fired."""
    if read_events(agent["name"], since=agent["launched"], tail_bytes=4096):
        return False
    own = claude_session_file_status(agent, agent["tmux"]["pid"])
    return bool(own) and time.time() - agent["launched"] > HOOK_GRACE


def exited_at_start(agent, st):
    """The error for an agent that stopped as it started, saying what is known of why."""
    name, info = agent["name"], agent["tmux"]
    if pane_of(agent, pane_info(info["pane"], info["socket"])) is None:
        if not list_panes(info["socket"]):
            return OrchError("agent %s is gone: its tmux server stopped as it started it; "
                             "`orch doctor` may say why" % name)
        return OrchError("agent %s is gone: its window was closed as it started" % name)
    return OrchError("agent %s exited at start (exit code %s), saying %s; see `orch tail %s`"
                     % (name, st["exit_code"], last_words(agent), name))


def last_words(agent):
    """The agent's last line of output, to explain in one line why it stopped."""
    def words():
        rows = capture_pane(agent["tmux"]["pane"], agent["tmux"]["socket"], lines=200)
        return [r.strip() for r in rows if r.strip() and not r.startswith("Pane is dead")]
    try:
        # The last output of a process that died at once can reach the screen late.
        rows = retry_until(words, 1.0)
    except OrchError:
        return "(screen not available)"
    return repr(shorten(rows[-1], 120)) if rows else "(no output)"


def wait_for_screen(agent, timeout=15):
    """Wait until a program without hooks has drawn something and gone quiet."""
    seen = {"rows": None, "since": time.time()}

    def quiet():
        rows = agent_screen(agent)
        if rows != seen["rows"]:
            seen.update(rows=rows, since=time.time())
            return False
        return bool(rows) and time.time() - seen["since"] >= 0.5
    retry_until(quiet, timeout, interval=0.1)


# ###########################################################################
# Sending: paste, Enter, then confirm from the agent's own hook event
# ###########################################################################

class FileLock(object):
    """An exclusive flock on a private file, held for a with-block."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def __enter__(self):
        import fcntl
        make_private_dir(os.path.dirname(self.path))
        self.fd = open_private(self.path)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        return False


class SendLock(FileLock):
    """Serialise sends to one agent: two pastes before one Enter would merge."""

    def __init__(self, name):
        FileLock.__init__(self, os.path.join(agent_dir(name), "send.lock"))


def submitted(agent, text, since):
    """The UserPromptSubmit event since `since` that carries text, alone or merged, or None.

    The event comes back with "queued": True when claude holds the message
    until its running turn ends (see replay_events).
    """
    norm = normalize_prompt(text)
    # The hook unwraps claude's paste wrapper; a message that itself contains
    # wrapper tags (short enough not to be wrapped) is unwrapped by it too.
    shas = (prompt_sha(text), prompt_sha(unwrap_pastes(text)))
    events = read_events(agent["name"], since=agent.get("launched", 0), tail_bytes=65536)
    replay_events(events)
    for event in events:
        if event.get("event") != "UserPromptSubmit" or event.get("t", 0) < since:
            continue
        if event.get("prompt_sha") in shas:
            return event
        prompt = event.get("prompt_text", "")
        if norm in prompt:
            if is_merge_of(prompt, sent_texts(agent)):
                return event    # claude joined messages orch queued into one prompt
            raise OrchError("agent %s took your message joined with text orch did not send, "
                            "as one prompt (%r): it was submitted, not alone; do not send it "
                            "again" % (agent["name"], shorten(prompt, 60)), EXIT_MIXED)
    return None


def sent_texts(agent):
    """The normalised texts orch sent this agent since it was launched."""
    launched = agent.get("launched", 0)
    return set(e.get("prompt", "") for e in read_json_lines(hpath(agent["name"], "sent"))
               if e.get("t", 0) >= launched)


def is_merge_of(prompt, parts):
    """True when prompt is some of parts joined by single spaces, in any order."""
    reachable = [False] * (len(prompt) + 2)
    reachable[0] = True
    for i in range(len(prompt) + 1):
        if not reachable[i]:
            continue
        for part in parts:
            if part and prompt.startswith(part, i):
                end = i + len(part)
                if end == len(prompt):
                    return True
                if prompt[end:end + 1] == " ":
                    reachable[end + 1] = True
    return False


def refuse_unless_ready(agent, st, force):
    name = agent["name"]
    if st["status"] == "exited":
        raise OrchError("agent %s is not running (exit code %s): `orch resume %s` to continue it"
                        % (name, st["exit_code"], name), EXIT_NOT_RUNNING)
    if at_first_screen(st):
        raise first_screen_refusal(agent, st)
    if st["needs"] == "dialog":
        raise at_choice_dialog(agent, st["detail"])
    if st["status"] == "needs-input" and not force:
        asking = {"permission": "permission to use %s" % (st["detail"] or "a tool"),
                  "trust": "whether to trust its folder"}.get(st["needs"], "a question")
        how = "`orch approve %s` or `orch deny %s`" % (name, name) \
            if st["needs"] == "permission" else "`orch attach %s`" % name
        raise OrchError("agent %s is asking for %s and any Enter would answer it: answer with "
                        "%s (or send anyway with --force)" % (name, asking, how),
                        EXIT_NEEDS_INPUT)


def send_message(agent, text, raw=False, force=False, timeout=None, idle_only=False):
    """Type text into the agent and submit it; return 'submitted', 'queued' or 'sent (unconfirmed)'.

    idle_only: refuse (exit 4, nothing typed) unless the agent is idle when
    orch holds its send lock, so the message is never merged into a turn.
    """
    if timeout is None:
        timeout = env_seconds("ORCH_SEND_TIMEOUT", 10)
    return backend_of(agent).send(agent, text, raw, force, timeout, idle_only)


def refuse_busy(agent, st):
    if st["status"] not in READY:
        raise OrchError("agent %s is %s; nothing was typed: it takes this message only when "
                        "idle" % (agent["name"], wait_label(st)), EXIT_NEEDS_INPUT)


def tmux_send(agent, text, raw, force, timeout, idle_only=False):
    """send_message into a tmux window: paste, Enter, then the hooks (or the screen) confirm."""
    st = status_of(agent)
    if st["status"] == "starting":
        st = wait_until_started(agent, timeout=max(timeout, 30))
        if st["status"] == "starting":
            raise OrchError("agent %s is not ready for input yet (still starting); nothing was "
                            "typed: try again, or look with `orch tail %s`"
                            % (agent["name"], agent["name"]), EXIT_UNCONFIRMED)
    refuse_unless_ready(agent, st, force)
    if not retry_until(lambda: kind_of(agent).ready(agent), timeout):
        raise OrchError("agent %s shows no input box to type into (still starting?); nothing "
                        "was typed: look with `orch tail %s`" % (agent["name"], agent["name"]),
                        EXIT_UNCONFIRMED)
    if not raw:
        text = escape_leading(text)
    if text.endswith("\\"):
        text += " "     # a trailing backslash makes Enter insert a newline instead of sending
    pane, socket = agent["tmux"]["pane"], agent["tmux"]["socket"]
    with SendLock(agent["name"]):
        since = time.time()
        try:
            if idle_only:
                st = status_of(agent)
                refuse_busy(agent, st)
            prepare_pane(agent, st, force)
            append_line(hpath(agent["name"], "sent"), json.dumps(
                {"t": since, "sha": prompt_sha(text), "prompt": normalize_prompt(text)[:4096]}))
            paste_text(pane, socket, text)
            time.sleep(0.1)     # Enter in the same read as the paste can be swallowed by it
            send_enter(pane, socket)
            if not kind_of(agent).hooks:
                return "sent (unconfirmed)"
            if raw and text.startswith("/"):
                return confirm_command(agent)
            return confirm_submit(agent, text, since, st["status"] == "working", timeout)
        except TmuxError as e:
            if not (e.server_gone() or e.target_gone()):
                raise
            raise OrchError("agent %s is not running: its window or tmux server went away while "
                            "orch typed (%s); `orch resume %s` to continue it"
                            % (agent["name"], e.stderr, agent["name"]), EXIT_NOT_RUNNING)


def prepare_pane(agent, st, force):
    """Make sure orch types into claude's empty input box on the live screen.

    The window is shared with people: one may have left it scrolled back in
    copy mode (where Enter would not reach claude) or typed into the input box
    without sending (claude would send that with orch's message as one prompt).
    """
    name = agent["name"]
    leave_tmux_mode(agent)
    if not kind_of(agent).dialogs or st["status"] == "needs-input":
        return      # no input box orch knows of (a dialog replaces claude's)
    dialog = choice_dialog(agent_screen(agent))
    if dialog:      # even with --force: an Enter would pick a choice nobody chose
        raise at_choice_dialog(agent, dialog["question"])
    typed, own = typed_by_someone(agent)
    if typed and not force:
        who = "it still holds orch's last message, put back by an interrupt?" if own else \
            "orch did not type it"
        raise OrchError("agent %s has text in its input box (%r; %s); it would go with your "
                        "message as one prompt. Nothing was typed: finish or clear it with "
                        "`orch attach %s`, or send with --force to clear it"
                        % (name, shorten(typed, 40), who, name), EXIT_NEEDS_INPUT)
    if typed and not clear_input_box(agent):
        raise OrchError("agent %s's input box would not clear; nothing was typed: look with "
                        "`orch attach %s`" % (name, name), EXIT_NEEDS_INPUT)


REDRAW_WAIT = 10.0   # seconds a busy machine may take to redraw the box after a hook fired


def typed_by_someone(agent):
    """(text in claude's input box, whether it is orch's own last message), ('', False) if empty.

    Claude fires the hook that confirms a message a moment before it redraws
    its input box: on a busy machine the next send can find orch's own
    message still drawn there.  A screen that has not caught up is not a
    person: while the box shows the message orch typed last, wait for the redraw.
    """
    typed = typed_text(agent)
    last = (read_json_lines(hpath(agent["name"], "sent"), tail_bytes=65536) or [{}])[-1]
    if not typed or not is_drawn_as(typed, last.get("prompt") or ""):
        return typed, False

    def redrawn():
        now = typed_text(agent)
        return (now,) if not is_drawn_as(now, last["prompt"]) else None
    found = retry_until(redrawn, REDRAW_WAIT)
    return (found[0], False) if found else (typed, True)


def is_drawn_as(box, message):
    """True when claude's input box line box shows (the start of) message."""
    box = normalize_prompt(box).rstrip("…").strip()
    if not box or not message:
        return False
    if re.match(r"\[Pasted text #\d+", box):
        return True         # how claude shows a long paste: orch's, as the last text it typed
    return normalize_prompt(message).startswith(box)


def at_choice_dialog(agent, question):
    """The refusal for an agent that shows a dialog no hook describes: how to answer it."""
    name = agent["name"]
    return OrchError("agent %s shows a dialog (%s) and any Enter would pick a choice; nothing "
                     "was typed: `orch deny %s` cancels it, `orch approve %s --choice N` picks "
                     "choice N (`orch tail %s` shows them), or `orch attach %s`"
                     % (name, json.dumps(question or "unreadable", ensure_ascii=False),
                        name, name, name, name), EXIT_NEEDS_INPUT)


def leave_tmux_mode(agent):
    """Return the pane from copy mode (or another tmux mode) to the live screen, or refuse.

    In a mode, keys go to tmux, not to the agent.  Leaving it is a change of
    view: nothing on screen or in the agent is lost.
    """
    name, pane, socket = agent["name"], agent["tmux"]["pane"], agent["tmux"]["socket"]
    info = pane_info(pane, socket).get(pane) or {}
    if info.get("pane_in_mode") == "1":
        tmux(["send-keys", "-t", pane, "-X", "cancel"], socket=socket)
        if (pane_info(pane, socket).get(pane) or {}).get("pane_in_mode") == "1":
            raise OrchError("agent %s's window is in a tmux mode orch could not leave; nothing "
                            "was typed: `orch attach %s` and press q" % (name, name),
                            EXIT_NEEDS_INPUT)


def clear_input_box(agent):
    """Empty claude's input box; True once it reads empty."""
    for _ in range(5):      # Ctrl-U clears a line of the box (2.1.197 and 2.1.330)
        tmux(["send-keys", "-t", agent["tmux"]["pane"], "C-u"], socket=agent["tmux"]["socket"])
        if retry_until(lambda: not typed_text(agent), 1.0):
            return True
    return False


QUEUED_HINT = "Press up to edit queued messages"    # shown in the box while messages wait
# What claude shows in an empty box after a turn failed (2.1.330-2.1.332): after most
# errors, and after a refused key.
RETRY_HINTS = ("Resend your message to try again", "Once fixed, resend your message")


def typed_text(agent):
    """What sits in the agent's input box now ('' when empty or only a hint)."""
    return kind_of(agent).typed_text(agent)


def claude_typed_text(agent):
    """What sits in claude's input box now ('' when empty or only claude's hint)."""
    rows = agent_screen(agent)
    text = input_box(rows)[1] or ""
    return "" if text == QUEUED_HINT or text in RETRY_HINTS else text


def confirm_submit(agent, text, since, was_working, timeout):
    """Wait for the UserPromptSubmit hook; re-press Enter (never re-type) if it does not come."""
    pane, socket = agent["tmux"]["pane"], agent["tmux"]["socket"]
    deadline = time.time() + timeout
    tries = 0
    while time.time() < deadline:
        event = retry_until(lambda: submitted(agent, text, since),
                            min(1.5, deadline - time.time()))
        if event:
            return "queued" if event.get("queued") else "submitted"
        st = status_of(agent)
        if st["status"] == "exited":
            raise OrchError("agent %s exited before taking the message" % agent["name"],
                            EXIT_NOT_RUNNING)
        if was_working and st["status"] == "working" and \
                kind_of(agent).shows_queued(agent, text):
            return "queued"     # claude holds it until the turn ends, then submits it
        if at_first_screen(st):
            break               # an Enter now would answer its screen
        if tries < 3:
            send_enter(pane, socket)
            tries += 1
    raise OrchError("agent %s did not confirm the message within %gs: it may still be in the "
                    "input box; look with `orch tail %s`" % (agent["name"], timeout, agent["name"]),
                    EXIT_UNCONFIRMED)


PROMPT_MARK = "\u276f"      # claude's input line and queued lines start with it


def input_box(rows):
    """Return (index, text) of claude's input line, or (None, None)."""
    for i in range(len(rows) - 1, -1, -1):
        if rows[i].startswith(PROMPT_MARK):
            return i, rows[i].strip(PROMPT_MARK + " \u00a0")
    return None, None


def confirm_command(agent):
    """Slash commands fire no hook: the input box emptying is the only sign they were taken."""
    def taken():
        rows = agent_screen(agent)
        return input_box(rows)[1] == ""
    if retry_until(taken, 3.0):
        return "sent (a slash command: claude reports none, so unconfirmed)"
    raise OrchError("agent %s still shows the command in its input box; look with `orch tail %s`"
                    % (agent["name"], agent["name"]), EXIT_UNCONFIRMED)


def shows_queued(agent, text):
    """True when claude's screen lists text as a queued message and its input box is empty.

    A busy claude fires no hook for a queued message until the turn ends, so
    the screen is the only witness: the message shows as an indented line
    above the input box, which itself offers "Press up to edit queued messages".
    """
    rows = agent_screen(agent)
    index, box = input_box(rows)
    if index is None or (box and "queued" not in box):
        return False        # something is still typed in the box: Enter was not taken
    head = normalize_prompt(text)[:30]
    return any(row.lstrip().startswith(PROMPT_MARK) and head in normalize_prompt(row)
               for row in rows[:index])


# ###########################################################################
# Headless backend: claude -p on stream-json, stdin from a FIFO, no tmux
# ###########################################################################
#
# A small supervisor (`orch.py _supervise DIR`, detached in its own session)
# starts claude with the read end of a FIFO as stdin and keeps a write end
# open, so claude never sees EOF between messages.  It appends claude's
# stdout and stderr to a log, records claude's pid, and writes claude's exit
# status when it ends: a detached process's exit code is otherwise lost.
# `orch send` opens the FIFO non-blocking (no reader = the agent is gone) and
# writes one JSON line under the agent's send lock.  `orch kill` asks the
# supervisor (SIGUSR1) to close its write end: claude then finishes the turn
# and exits; after the grace period the process group gets SIGTERM.

HEADLESS_FLAGS = ["-p", "--input-format", "stream-json", "--output-format", "stream-json",
                  "--verbose", "--replay-user-messages"]


def hpath(name, what):
    return os.path.join(agent_dir(name), {"fifo": "stdin.fifo", "log": "output.jsonl",
                                          "sent": "sent.jsonl", "pid": "pid.json",
                                          "exit": "exit.json", "spec": "launch.json"}[what])


def tmux_available():
    import shutil
    return shutil.which("tmux") is not None


def choose_backend(requested):
    backend = requested or os.environ.get("ORCH_BACKEND") or "auto"
    if backend not in ("auto", "tmux", "headless"):
        raise OrchError("unknown backend %r: use tmux, headless or auto" % backend, EXIT_USAGE)
    if backend == "auto":
        return "tmux" if tmux_available() else "headless"
    return backend


def headless_argv(agent, program, resume_id=None):
    argv = [program] + HEADLESS_FLAGS
    argv += ["--resume", resume_id] if resume_id else ["--session-id", agent["session_id"]]
    return argv + (agent.get("extra_args") or [])


def start_headless(agent, argv):
    """Start the supervisor for this agent and wait until claude's pid is known."""
    name = agent["name"]
    folder = agent_dir(name)
    make_private_dir(folder)
    for what in ("fifo", "pid", "exit"):
        try:
            os.unlink(hpath(name, what))
        except FileNotFoundError:
            pass
    os.mkfifo(hpath(name, "fifo"), 0o600)
    spec = {"argv": argv, "cwd": agent["cwd"], "env": agent_environment(agent)}
    write_file_atomic(hpath(name, "spec"), json.dumps(spec), 0o600)
    agent["launched"] = time.time()
    subprocess.Popen([sys.executable, os.path.abspath(__file__), "_supervise", folder],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True,
                     cwd="/")
    info = retry_until(lambda: read_json(hpath(name, "pid")) or read_json(hpath(name, "exit")), 10)
    if not info or "pid" not in info:
        raise OrchError("agent %s did not start: %s" % (name, headless_exit_words(name)))
    agent["headless"] = info


def read_json(path):
    """Parse a small JSON file; None when it is missing or not JSON.

    Raw reads: `list` reads claude's status file for every agent, and a
    text-mode open costs twice as much.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return json.loads(b"".join(chunks).decode("utf-8"))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def proc_stat(pid):
    """Fields of /proc/PID/stat after the command name (Linux), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid):
    """The kernel's start time of pid, to tell a reused pid from ours."""
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def supervise(folder):
    """Run claude for a headless agent and record how it ends (internal)."""
    import signal
    spec = read_json(os.path.join(folder, "launch.json"))
    fifo = os.path.join(folder, "stdin.fifo")
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY)     # held open: claude sees no EOF until kill
    set_blocking(reader)
    log = open_private(os.path.join(folder, "output.jsonl"), os.O_WRONLY | os.O_APPEND)
    try:
        proc = subprocess.Popen(spec["argv"], stdin=reader, stdout=log, stderr=log,
                                cwd=spec["cwd"], env=spec["env"])
    except OSError as e:
        write_file_atomic(os.path.join(folder, "exit.json"),
                          json.dumps({"exit_code": 127, "error": str(e), "t": time.time()}))
        return 127
    os.close(reader)
    state = {"writer": writer}

    def close_stdin(signum, frame):
        if state["writer"] is not None:
            os.close(state["writer"])
            state["writer"] = None
    signal.signal(signal.SIGUSR1, close_stdin)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())
    write_file_atomic(os.path.join(folder, "pid.json"), json.dumps({
        "pid": proc.pid, "start": process_start_time(proc.pid),
        "supervisor": os.getpid(), "supervisor_start": process_start_time(os.getpid())}))
    code = proc.wait()
    result = {"exit_code": code if code >= 0 else 128 - code, "t": time.time()}
    if code < 0:
        result["signal"] = signal.Signals(-code).name
    write_file_atomic(os.path.join(folder, "exit.json"), json.dumps(result))
    return 0


def set_blocking(fd):
    import fcntl
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)


def alive(pid, start):
    """True if pid runs and is the process that started at start (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = proc_stat(pid)
    if fields is None:
        return True         # no /proc: trust kill(0)
    return fields[0] != "Z" and (start is None or fields[19] == start)


def headless_exit_words(name):
    done = read_json(hpath(name, "exit")) or {}
    if done.get("error"):
        return done["error"]
    try:
        with open(hpath(name, "log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [l for l in f.read().decode("utf-8", "replace").splitlines() if l.strip()]
    except OSError:
        lines = []
    return repr(shorten(lines[-1], 120)) if lines else "(no output)"


def message_done(name, record):
    """True when claude has answered the message of this sent record.

    Claude takes a message as the next turn, joins several written during a
    turn into one text (newline-separated, in order), or hands one to the
    running turn while a tool runs.  `--replay-user-messages` echoes each
    such text, so the message is done once a `result` follows an echo that
    ends with it.  A turn that ended without echoing anything (an API error
    before any output) also ends a message written before that turn began.
    """
    covered = bare_turn = False
    for event in log_events(name, record.get("offset", 0)):
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init":
            bare_turn = True
        elif kind == "user" and event.get("isReplay"):
            bare_turn = False
            covered = covered or ends_with_message(replayed_text(event), record)
        elif kind == "result" and (covered or bare_turn):
            return True
    return False


def replayed_text(event):
    content = (event.get("message") or {}).get("content")
    if isinstance(content, list):
        content = "\n".join(b.get("text", "") for b in content if isinstance(b, dict))
    return content if isinstance(content, str) else ""


def ends_with_message(text, record):
    chars = record.get("chars")
    if not isinstance(chars, int):
        return True         # written by an older orch: any echo counts, as it did then
    # chars counts the message without its outer blanks: claude trims them.
    return prompt_sha(text.rstrip()[-chars:]) == record.get("sha")


def last_result(name, tail=262144):
    """The last `result` and `system/init` events in the agent's log (or None each)."""
    result = init = None
    for event in reversed(log_events(name, max(0, log_size(name) - tail))):
        if result is None and event.get("type") == "result":
            result = event
        elif init is None and event.get("type") == "system" and event.get("subtype") == "init":
            init = event
        if result and init:
            break
    return result, init


def sent_entries(name):
    return read_json_lines(hpath(name, "sent"))


def silent_after():
    return env_seconds("ORCH_SILENT_AFTER", 600)


def headless_status(agent):
    """Status of a headless agent from its files: pid, exit record, log, sent messages."""
    name = agent["name"]
    launched = agent.get("launched", agent.get("created", 0))
    sent = [e for e in sent_entries(name) if e.get("t", 0) >= launched]
    result = {"status": "exited", "since": None, "needs": None, "detail": None,
              "exit_code": None, "source": "stream", "last_prompt": None, "silent": None,
              "pid": None, "permission_mode": permission_mode_arg(agent)}
    if sent:
        result["last_prompt"] = sent[-1].get("prompt")
    done = read_json(hpath(name, "exit"))
    info = agent.get("headless") or {}
    if done is None and info and not alive(info["pid"], info.get("start")) \
            and alive(info["supervisor"], info.get("supervisor_start")):
        # Claude just ended; its supervisor is about to record how.
        done = retry_until(lambda: read_json(hpath(name, "exit")), 2.0)
    if done is not None:
        result.update(exit_code=done.get("exit_code"), since=done.get("t"),
                      detail=done.get("signal"))
        return result
    if not info or not alive(info["pid"], info.get("start")):
        return result       # the supervisor died with claude (SIGKILL, reboot): code unknown
    result["pid"] = info["pid"]
    try:
        mtime = os.path.getmtime(hpath(name, "log"))
    except OSError:
        mtime = None
    # Claude takes messages in order: once the newest is answered, all are.
    if sent and not message_done(name, sent[-1]):
        result.update(status="working", since=sent[-1]["t"])
        if mtime and time.time() - mtime > silent_after():
            result["silent"] = time.time() - mtime
    else:
        result.update(status="idle", since=mtime or launched)
    last, init = last_result(name)
    if init and isinstance(init.get("permissionMode"), str):
        result["permission_mode"] = init["permissionMode"]
    if last and last.get("permission_denials"):
        result["detail"] = "denied: " + ", ".join(sorted(set(
            d.get("tool_name", "?") for d in last["permission_denials"])))
    return result


def write_fifo(name, line, timeout=30):
    """Write one line to the agent's stdin FIFO; never block on a dead agent."""
    import select
    path = hpath(name, "fifo")
    if not os.path.exists(path):
        raise OrchError("the input pipe of agent %s (%s) is gone: `orch kill %s` then "
                        "`orch resume %s`" % (name, path, name, name), EXIT_NOT_RUNNING)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        import errno
        if e.errno == errno.ENXIO:      # no reader: claude is gone
            raise OrchError("agent %s is not running: `orch resume %s` to continue it"
                            % (name, name), EXIT_NOT_RUNNING)
        raise OrchError("cannot open the input pipe of agent %s: %s" % (name, e))
    data = line.encode("utf-8")
    deadline = time.time() + timeout
    try:
        while data:
            if not select.select([], [fd], [], max(0, deadline - time.time()))[1]:
                raise OrchError("agent %s has not read its input for %gs; it may hang: "
                                "`orch kill %s`" % (name, timeout, name), EXIT_UNCONFIRMED)
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise OrchError("agent %s exited while reading the message" % name,
                                EXIT_NOT_RUNNING)
    finally:
        os.close(fd)


def user_line(text):
    return json.dumps({"type": "user", "message": {"role": "user", "content": text}}) + "\n"


def headless_send(agent, text, raw, force, timeout, idle_only=False):
    """send_message to claude -p: one stream-json line, confirmed by its echo (no input box,
    so nothing for force to clear)."""
    name = agent["name"]
    if not raw:
        text = escape_leading(text)
    with SendLock(name):
        st = headless_status(agent)
        refuse_unless_ready(agent, st, force=False)     # headless never waits at a dialog
        if idle_only:
            refuse_busy(agent, st)
        busy = st["status"] == "working"
        offset = log_size(name)
        record = {"t": time.time(), "sha": prompt_sha(text), "prompt": normalize_prompt(text)[:200],
                  "offset": offset, "chars": len(text.strip())}
        write_fifo(name, user_line(text))
        append_line(hpath(name, "sent"), json.dumps(record))
    if busy:
        return "queued"     # claude reads it now and starts it as its own turn after this one
    if retry_until(lambda: echoed(name, offset, record["sha"]), timeout):
        return "submitted"
    if headless_status(agent)["status"] == "exited":
        raise OrchError("agent %s exited before taking the message" % name, EXIT_NOT_RUNNING)
    raise OrchError("agent %s did not take the message within %gs (it is in its input pipe); "
                    "see `orch tail %s`" % (name, timeout, name), EXIT_UNCONFIRMED)


def log_size(name):
    try:
        return os.path.getsize(hpath(name, "log"))
    except OSError:
        return 0


def append_line(path, line):
    fd = open_private(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def echoed(name, offset, sha):
    """True when claude started a turn, or replayed this text, after offset in its log.

    Claude writes `system/init` as soon as it takes a message (the replayed
    user message only follows with the model's first output).  The agent was
    idle when it was written, so the next turn to start takes this message.
    """
    for event in log_events(name, offset):
        if event.get("type") == "system" and event.get("subtype") == "init":
            return True
        if event.get("type") == "user" and event.get("isReplay") \
                and prompt_sha(replayed_text(event)) == sha:
            return True
    return False


def log_events(name, offset=0):
    return read_json_lines(hpath(name, "log"), offset)


def headless_session_id(agent):
    """The session id claude -p last reported in its output, else the one from spawn."""
    sid = agent.get("session_id")
    for event in log_events(agent["name"]):
        if event.get("type") == "system" and event.get("session_id"):
            sid = event["session_id"]
    return sid


def headless_interrupt(agent, st=None):
    """Stop the current turn with claude's own control request; st is the tmux side's."""
    request = {"type": "control_request", "request_id": "orch-%s" % os.urandom(4).hex(),
               "request": {"subtype": "interrupt"}}
    with SendLock(agent["name"]):
        write_fifo(agent["name"], json.dumps(request) + "\n")


def group_alive(pgid):
    """True while any process of the group runs (a dead pane's unreaped zombie does not)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return any(process_group(pid) == pgid and (proc_stat(pid) or ["Z"])[0] != "Z"
               for pid in all_pids())


def all_pids():
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def process_group(pid):
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def signal_process(pid, sig, group=True):
    """Signal pid's process group (its tools die with it), or pid alone."""
    try:
        if group:
            os.killpg(pid, sig)
            return
    except OSError:
        pass            # not a group leader (claude under its supervisor): signal it alone
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def headless_stop(agent, grace):
    """Close claude's stdin (it finishes and exits); after grace, SIGTERM then SIGKILL."""
    import signal
    info = agent.get("headless") or {}
    if headless_status(agent)["status"] == "exited":
        return False
    steps = [(info.get("supervisor"), info.get("supervisor_start"), signal.SIGUSR1, grace),
             (info["pid"], info.get("start"), signal.SIGTERM, 5),
             (info["pid"], info.get("start"), signal.SIGKILL, 5)]
    for pid, start, sig, wait in steps:
        if pid and alive(pid, start):
            signal_process(pid, sig, group=sig != signal.SIGUSR1)
        if retry_until(lambda: headless_status(agent)["status"] == "exited", wait):
            return True
    raise OrchError("agent %s (pid %s) did not stop even after SIGKILL" % (agent["name"],
                                                                          info.get("pid")))


def render_event(event):
    """Turn one stream-json event or transcript entry into lines a person can read."""
    return [line for entry in conversation_entries(event) for line in entry_lines(entry)]


def conversation_entries(event):
    """What one line of a conversation log says: a list of {"kind", ...} entries.

    One reader for the headless output (stream-json events) and for claude's
    own transcript (tmux agents): both carry `user` and `assistant` messages
    in the API's shape.  A turn ends in a `result` event there, in a
    `system/turn_duration` entry here.  Side conversations (subagents) and
    claude's bookkeeping entries are left out.
    """
    if not isinstance(event, dict) or event.get("isSidechain") or event.get("isMeta"):
        return []
    kind = event.get("type")
    if kind in ("response_item", "event_msg"):
        return codex_entries(kind, event.get("payload"))
    if str(kind).startswith("opencode."):
        return opencode_entries(event)
    if "data" in event and "." in str(kind):
        return copilot_entries(kind, event["data"])
    if "content" in event and "message" not in event:
        return gemini_entries(event)
    if kind == "system" and event.get("subtype") == "init":
        return [{"kind": "session", "session_id": event.get("session_id"),
                 "model": event.get("model", "?")}]
    if kind == "system" and event.get("subtype") == "turn_duration":
        return [{"kind": "turn", "ok": True, "seconds": (event.get("durationMs") or 0) / 1000.0}]
    if kind == "user":
        return user_entries((event.get("message") or {}).get("content"))
    if kind == "assistant":
        entries = []
        for block in (event.get("message") or {}).get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                entries.append({"kind": "assistant", "text": block.get("text", "")})
            elif block.get("type") == "tool_use":
                entries.append({"kind": "tool", "name": block.get("name"),
                                "input": block.get("input")})
        return entries
    if kind == "result":
        cost = event.get("total_cost_usd")
        entries = [{"kind": "turn", "ok": event.get("subtype") == "success",
                    "subtype": event.get("subtype"),
                    "seconds": (event.get("duration_ms") or 0) / 1000.0,
                    "cost": cost if isinstance(cost, (int, float)) else None}]
        for denial in event.get("permission_denials") or []:
            entries.append({"kind": "denied", "name": denial.get("tool_name"),
                            "input": denial.get("tool_input")})
        return entries
    return []


def codex_entries(kind, item):
    """What one line of codex's own transcript (its rollout file) says."""
    if not isinstance(item, dict):
        return []
    what = item.get("type")
    if kind == "event_msg":
        if what in ("task_complete", "turn_aborted"):
            return [{"kind": "turn", "ok": what == "task_complete", "subtype": item.get("reason"),
                     "seconds": (item.get("duration_ms") or 0) / 1000.0}]
        return []
    if what == "message" and item.get("role") in ("user", "assistant"):
        texts = [block.get("text", "") for block in item.get("content") or []
                 if isinstance(block, dict) and block.get("type") in ("input_text", "output_text")]
        # codex's own context for the model (<environment_context>...) is not the user's
        return [{"kind": item["role"], "text": text} for text in texts
                if not (item["role"] == "user" and text.startswith("<"))]
    if what == "function_call":
        try:
            arguments = json.loads(item.get("arguments") or "{}")
        except ValueError:
            arguments = item.get("arguments")
        return [{"kind": "tool", "name": item.get("name"), "input": arguments}]
    if what == "function_call_output":
        return [{"kind": "tool_result", "text": str(item.get("output") or ""), "error": False}]
    return []


def gemini_entries(event):
    """What one line of gemini's own chat file says (its messages, not its bookkeeping)."""
    kind, content = event.get("type"), event.get("content")
    if kind == "user" and isinstance(content, list):
        return [{"kind": "user", "text": block["text"]} for block in content
                if isinstance(block, dict) and isinstance(block.get("text"), str)
                and not block["text"].startswith("<session_context>")]
    if kind != "gemini":
        return []
    entries = [{"kind": "assistant", "text": content}] if content else []
    for call in event.get("toolCalls") or []:
        if isinstance(call, dict):
            entries.append({"kind": "tool", "name": call.get("name"), "input": call.get("args")})
    return entries


def opencode_entries(event):
    """What one line of the conversation orch's opencode plugin keeps says."""
    kind = event["type"]
    if kind == "opencode.user":
        return [{"kind": "user", "text": event.get("text") or ""}]
    if kind == "opencode.text":
        return [{"kind": "assistant", "text": event.get("text") or ""}]
    if kind == "opencode.tool":
        return [{"kind": "tool", "name": event.get("tool"), "input": event.get("input")},
                {"kind": "tool_result", "text": event.get("output") or "",
                 "error": bool(event.get("error"))}]
    if kind == "opencode.turn":
        return [{"kind": "turn", "ok": bool(event.get("ok")), "subtype": event.get("subtype"),
                 "seconds": event.get("seconds") or 0}]
    return []


def copilot_entries(kind, data):
    """What one line of copilot's own transcript (its events.jsonl) says."""
    if not isinstance(data, dict):
        return []
    if kind == "user.message":
        return [{"kind": "user", "text": data.get("content") or ""}]
    if kind == "assistant.message":
        entries = [{"kind": "assistant", "text": data["content"]}] if data.get("content") else []
        return entries + [{"kind": "tool", "name": call.get("name"), "input": call.get("arguments")}
                          for call in data.get("toolRequests") or [] if isinstance(call, dict)]
    if kind == "tool.execution_complete":
        result = data.get("result") if isinstance(data.get("result"), dict) else {}
        return [{"kind": "tool_result", "text": str(result.get("content") or "").strip(),
                 "error": not data.get("success")}]
    if kind == "hook.start" and data.get("hookType") == "agentStop":
        return [{"kind": "turn", "ok": True, "seconds": None}]     # the turn is over
    if kind == "abort":
        return [{"kind": "turn", "ok": False, "subtype": "interrupted", "seconds": None}]
    if kind == "session.error":
        return [{"kind": "turn", "ok": False, "subtype": data.get("errorType"), "seconds": None}]
    return []


def user_entries(content):
    if isinstance(content, str):
        return [{"kind": "user", "text": unwrap_pastes(content)}]
    entries = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "tool_result":
            body = block.get("content")
            if isinstance(body, list):
                body = " ".join(b.get("text", "") for b in body if isinstance(b, dict))
            entries.append({"kind": "tool_result", "text": str(body or ""),
                            "error": bool(block.get("is_error"))})
        elif block.get("type") == "text":
            entries.append({"kind": "user", "text": unwrap_pastes(block.get("text", ""))})
    return entries


def entry_lines(entry):
    """The lines `tail` (headless) and `log` print for one entry."""
    kind = entry["kind"]
    if kind == "session":
        return ["[session %s, model %s]" % (entry["session_id"], entry["model"])]
    if kind == "user":
        return ["> " + entry["text"].replace("\n", "\n  ")]
    if kind == "assistant":
        return ["\u25cf " + entry["text"]]
    if kind == "tool":
        return ["\u25cf %s(%s)" % (entry["name"], shorten(
            json.dumps(entry["input"], ensure_ascii=False), 100))]
    if kind == "tool_result":
        return ["  \u23bf " + ("error: " if entry["error"] else "") + shorten(entry["text"], 160)]
    if kind == "turn":
        line = "\u2714 turn done" if entry["ok"] else "\u2718 turn ended: %s" % entry["subtype"]
        cost, took = entry.get("cost"), entry.get("seconds")
        said = ["%.1fs" % took] if took is not None else []
        said += ["$%.4f" % cost] if cost is not None else []
        return [line + (" (%s)" % ", ".join(said) if said else "")]
    if kind == "denied":
        return ["\u26a0 permission denied: %s(%s): allow it with -- --permission-mode "
                "acceptEdits or --allowedTools" % (entry["name"], shorten(
                    json.dumps(entry["input"], ensure_ascii=False), 80))]
    return [entry.get("text", "")]      # "output": a line that is not JSON (claude's stderr)


def read_log_entries(path, offset=0):
    """Return (entries, new offset) of a JSON-lines log from offset; whole lines only.

    A line claude is still writing is left for the next read, so following
    by offset never repeats or skips an entry.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    entries = []
    for line in data[:end].decode("utf-8", "replace").split("\n"):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            entries.append({"kind": "output", "text": line})
            continue
        entries += conversation_entries(event)
    return entries, offset + end


def render_log(name, offset=0, raw=False):
    """Return (lines, new offset) for the headless agent's log from offset."""
    path = hpath(name, "log")
    try:
        if raw:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            lines = data[:end].decode("utf-8", "replace").split("\n")
            return [l for l in lines if l.strip()], offset + end
        entries, offset = read_log_entries(path, offset)
    except OSError:
        raise OrchError("the log of agent %s (%s) is gone" % (name, path))
    return [line for entry in entries for line in entry_lines(entry)], offset


def headless_tail(agent, lines, follow, raw):
    name = agent["name"]
    rows, offset = render_log(name, raw=raw)
    write_rows(rows[-(lines or 40):])
    while follow and headless_status(agent)["status"] != "exited":
        time.sleep(0.3)
        rows, offset = render_log(name, offset, raw)
        write_rows(rows)
    if follow:
        write_rows(render_log(name, offset, raw)[0])


def headless_attach(agent):
    """Follow the agent live; each line typed is sent as a message. Ctrl-D/Ctrl-C leave."""
    import threading
    name = agent["name"]
    rows, offset = render_log(name)
    write_rows(rows[-20:])
    sys.stderr.write("orch: attached to headless agent %s: type a line to send it; "
                     "Ctrl-D or Ctrl-C leaves (the agent keeps running)\n" % name)
    stop = threading.Event()

    def follow(offset):
        while not stop.is_set():
            rows, offset = render_log(name, offset)
            write_rows(rows)
            stop.wait(0.3)
    thread = threading.Thread(target=follow, args=(offset,))
    thread.daemon = True
    thread.start()
    try:
        for line in sys.stdin:
            line = clean_text(line.rstrip("\n"))
            if line.strip():
                send_message(agent, line)
    except KeyboardInterrupt:
        pass
    stop.set()
    return EXIT_OK


# ###########################################################################
# Orphans: agents running with no record (an orch killed in the middle of spawn)
# ###########################################################################

def find_orphans(state):
    """Return {name: {"pid", "pane"?, "supervisor"?}} for running agents that have no record.

    Every agent has a folder under the data folder before it starts, and its
    record is saved after: a folder without a record whose launch script runs
    in a pane (or whose headless pid lives) is an orphan.  Looked at under a
    shared lock, so a spawn half-way through is not taken for one.
    """
    import fcntl
    folder = os.path.join(data_dir(), "agents")
    try:
        names = set(os.listdir(folder)) - set(state["agents"]) - set(state.get("invalid", {}))
        lock = os.open(state_path() + ".lock", os.O_RDONLY) if names else None
    except OSError:
        return {}
    if not names:
        return {}
    try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return {}       # a spawn or rm is running right now: look next time
    try:
        names -= set(load_state()["agents"])
        return running_without_record(folder, names) if names else {}
    finally:
        os.close(lock)


def running_without_record(folder, names):
    found = {}
    for pane in list_panes(default_socket()).values():
        for name in names:
            if pane["pane_dead"] != "1" and os.path.join(folder, name, "launch.sh") \
                    in pane["pane_start_command"]:
                found[name] = {"pid": int(pane["pane_pid"]), "pane": pane["pane_id"]}
    for name in names - set(found):
        info = read_json(hpath(name, "pid")) or {}
        if isinstance(info.get("pid"), int) and alive(info["pid"], info.get("start")):
            found[name] = {"pid": info["pid"], "supervisor": info.get("supervisor")}
    return found


def orphan_warning(name, where):
    return ("agent %s runs (pid %d) but has no record (an orch was killed while starting "
            "it): `orch rm %s` stops it" % (name, where["pid"], name))


def stop_orphan(name, where):
    """Stop an orphan and remove its folder; it has no record to update."""
    import shutil
    import signal
    for pid in (where.get("supervisor"), where["pid"]):
        if isinstance(pid, int):
            signal_process(pid, signal.SIGTERM)
    if not retry_until(lambda: not alive(where["pid"], None), env_seconds("ORCH_KILL_GRACE", 5)):
        signal_process(where["pid"], signal.SIGKILL)
    if where.get("pane"):
        try:
            tmux(["kill-pane", "-t", where["pane"]], socket=default_socket())
        except TmuxError:
            pass        # it closed by itself
    shutil.rmtree(agent_dir(name), ignore_errors=True)


# ###########################################################################
# Supervision: agents' answers, and one message to many agents
# ###########################################################################

def last_reply(agent):
    """The agent's last complete answer as {"t", "text"}, or None if it has none yet.

    A claude agent in tmux: the whole `last_assistant_message` of its latest
    Stop, which the hook keeps in reply.json.  Headless: the `result` of its
    latest turn that ended well.
    """
    if not kind_of(agent).hooks:
        raise kind_of(agent).unsupported(agent, "reports no answers")
    launched = agent.get("created", 0)
    found = backend_of(agent).reply(agent)
    if not isinstance(found, dict) or not isinstance(found.get("text"), str) \
            or not isinstance(found.get("t"), (int, float)) or found["t"] < launched:
        return None
    return found


def headless_reply(name, tail=1048576):
    for event in reversed(log_events(name, max(0, log_size(name) - tail))):
        if event.get("type") == "result" and isinstance(event.get("result"), str) \
                and not event.get("is_error"):
            return {"t": os.path.getmtime(hpath(name, "log")), "text": event["result"]}
    return None


def conversation_path(agent):
    """The file that holds the agent's conversation: claude's transcript, or headless output."""
    if not kind_of(agent).hooks:
        raise kind_of(agent).unsupported(agent, "keeps no conversation orch can read")
    return backend_of(agent).conversation(agent)


def hooked_transcript(agent):
    """The transcript the agent CLI's latest SessionStart hook named, from the events' tail."""
    for event in reversed(read_events(agent["name"], tail_bytes=65536)):
        if isinstance(event.get("transcript_path"), str):
            return event["transcript_path"]
    return None


def transcript_path(agent):
    """The CLI's own transcript of a tmux agent's session, as its SessionStart hook named it."""
    found = hooked_transcript(agent)        # cheap: a long session's start is far back
    return found or kind_of(agent).own_transcript(agent)


def claude_transcript(agent):
    """Where claude keeps the transcript of the agent's session (named in no hook seen)."""
    import re
    name = agent["name"]
    session = agent.get("session_id")
    for event in reversed(read_events(name)):
        if event.get("event") == "SessionStart":
            if isinstance(event.get("transcript_path"), str):
                return event["transcript_path"]
            session = event.get("session_id") or session
            break
    # Recorded by an older orch's hook: where claude keeps it.
    home = agent.get("home") or os.path.expanduser("~")
    return os.path.join(home, ".claude", "projects", re.sub(r"[^A-Za-z0-9]", "-", agent["cwd"]),
                        "%s.jsonl" % session)


def transcript_settled(agent, path):
    """Wait (2 s at most) for claude to write the end of a turn its Stop hook reported.

    Claude appends a turn's end to its transcript ~50 ms after the Stop hook
    fires (measured on 2.1.197 and 2.1.330), so `wait && log` would miss it.
    """
    stops = [e["t"] for e in read_events(agent["name"], tail_bytes=8192)
             if e.get("event") == "Stop" and isinstance(e.get("t"), (int, float))]

    def written():
        try:
            if os.path.getmtime(path) < stops[-1]:
                return False
        except OSError:
            return True     # no transcript: read_conversation says so
        # The answer is written before the Stop hook fires, the turn's end after
        # it: where the transcript marks turn ends (claude, codex), wait for it.
        kinds = [entry["kind"] for event in read_json_lines(path, tail_bytes=16384)
                 for entry in conversation_entries(event)]
        return "turn" not in kinds or kinds[-1] == "turn"
    if stops:
        retry_until(written, 2.0, interval=0.02)


def read_conversation(agent, path, offset=0):
    try:
        return read_log_entries(path, offset)
    except FileNotFoundError:
        raise OrchError("agent %s has no conversation log at %s yet (claude writes it from "
                        "the first message on), or it was deleted" % (agent["name"], path))
    except OSError as e:
        raise OrchError("cannot read the conversation of agent %s (%s): %s"
                        % (agent["name"], path, e.strerror or e))


def print_entries(entries, as_json):
    if as_json:
        for entry in entries:
            sys.stdout.write(json.dumps(entry, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        write_rows([line for entry in entries for line in entry_lines(entry)])


# How bad each outcome of a send is, for the exit code of a send to many.
SEVERITY = (EXIT_OK, EXIT_NOT_RUNNING, EXIT_NEEDS_INPUT, EXIT_FAILED, EXIT_UNCONFIRMED,
            EXIT_MIXED, EXIT_ERROR)


def worse(code, worst):
    """The worse of two exit codes by SEVERITY; a code not in it counts as an error."""
    code = code if code in SEVERITY else EXIT_ERROR
    return code if SEVERITY.index(code) > SEVERITY.index(worst) else worst


def in_parallel(func, items):
    """Call func(item) for every item at once, each in a thread; return when all are done."""
    import threading
    threads = [threading.Thread(target=func, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def send_to_many(agents, text, raw, force, timeout):
    """Send text to each agent at once; print one line per agent; return the worst exit code.

    Each send is confirmed as a single send is; a refusal at one agent
    (a dialog, an exited agent) never stops the others.
    """
    outcomes = {}

    def send(agent):
        try:
            outcomes[agent["name"]] = (EXIT_OK, send_message(agent, text, raw, force, timeout))
        except OrchError as e:
            outcomes[agent["name"]] = (e.code, "error: %s" % e)
        except Exception as e:      # one agent's surprise must not hide the others' outcomes
            outcomes[agent["name"]] = (EXIT_ERROR, "error: unexpected %s: %s"
                                       % (type(e).__name__, e))
    in_parallel(send, agents)
    worst = EXIT_OK
    for agent in agents:
        code, words = outcomes[agent["name"]]
        print("%s: %s" % (agent["name"], words))
        worst = worse(code, worst)
    return worst


def chosen_agents(state, args):
    """The agents of `send --to/--all/--idle`, in the order given (or created)."""
    if args.to is not None:
        names = []
        for name in args.to.split(","):
            name = check_name(name.strip())
            if name not in names:
                names.append(name)
        return [find_agent(state, name) for name in names]
    agents = sorted(state["agents"].values(), key=lambda a: a["created"])
    found = statuses(agents)
    wanted = READY if args.idle else ("starting", "working", "needs-input") + READY
    return [a for a in agents if found[a["name"]]["status"] in wanted]


# ###########################################################################
# Dialogs: answer a permission dialog on purpose, never blindly
# ###########################################################################
#
# While a dialog is up, any Enter picks its highlighted option, and the
# options differ between versions ("No" is 3 on 2.1.197 and 4 on 2.1.330).
# So `approve` reads the options off the screen and presses the digit of the
# one that says exactly "Yes" (a digit picks at once, no Enter), and only for
# the dialog the PermissionRequest hook described: once, never "always".
# `deny` presses Escape, which cancels the dialog and ends the turn.

DIALOG_QUESTION = "Do you want to"


def dialog_on_screen(rows):
    """The permission dialog on a claude screen as {question, options, above}, or None.

    options maps each option's text to its digit; above is the rows over the
    question, where claude shows what the tool would do.
    """
    import re
    for i in range(len(rows) - 1, -1, -1):
        if DIALOG_QUESTION not in rows[i]:
            continue
        options = {}
        for row in rows[i + 1:i + 14]:
            if "Esc to cancel" in row:
                break
            found = re.match("^\\s*(?:%s\\s*)?(\\d)\\.\\s+(\\S.*?)\\s*$" % PROMPT_MARK, row)
            if found:
                options[found.group(2)] = found.group(1)
        if options:
            return {"question": rows[i].strip(), "options": options,
                    "above": rows[max(0, i - 30):i]}
    return None


# Events after a PermissionRequest that show its dialog was answered already.
ANSWERED_BY = ("PreToolUse", "PostToolUse", "UserPromptSubmit", "Stop", "SessionStart")


def permission_request(agent):
    """The PermissionRequest hook event of the dialog up now, or None.

    Only one that nothing has answered since: claude's own status file can
    say "waiting" a moment before the hook of a new dialog lands, and the
    request before it (approved, denied) must not stand in for it.
    """
    launched = agent.get("launched", agent.get("created", 0))
    events = read_events(agent["name"], since=launched, tail_bytes=65536)
    for i in range(len(events) - 1, -1, -1):
        if events[i].get("event") == "PermissionRequest":
            # gemini's names no tool: it is the one of the call just before it.
            asked = [e for e in events[:i] if e.get("event") == "PreToolUse"][-1:]
            return dict(asked[0] if asked else {}, **events[i]) \
                if not events[i].get("tool_name") else events[i]
        if events[i].get("event") in ANSWERED_BY:
            return None
    return None


def tool_words(request):
    """The part of a tool's input that claude's dialog shows: a command, a file, a URL."""
    found = request.get("tool_input") or {}
    for key in ("command", "file_path", "notebook_path", "url", "pattern", "path", "query"):
        value = found.get(key)
        if isinstance(value, str) and value.strip():
            value = value.strip().splitlines()[0]
            return os.path.basename(value) if key.endswith("path") else value
    return None


def describe_request(request):
    words = tool_words(request)
    tool = request.get("tool_name") or "a tool"
    return "%s (%s)" % (tool, shorten(words, 60)) if words else tool


def open_dialog(agent, tool=None):
    """Check that agent shows the permission dialog its hook described; return (request, dialog).

    Anything else is refused before a key is pressed: exit 4, or 3 if it exited.
    """
    name = agent["name"]
    if not backend_of(agent).dialogs:
        raise OrchError("agent %s runs headless, where claude shows no dialogs: it denies a "
                        "tool that needs permission at once (`orch list` shows `denied: TOOL`). "
                        "To allow tools, spawn it with `-- --permission-mode acceptEdits` or "
                        "`-- --allowedTools 'Bash(make *)'`" % name)
    if not kind_of(agent).dialogs:
        raise kind_of(agent).unsupported(agent, "shows dialogs orch cannot read")
    st = status_of(agent)
    if st["status"] == "exited":
        raise OrchError("agent %s is not running (exit code %s)" % (name, st["exit_code"]),
                        EXIT_NOT_RUNNING)
    if st["status"] != "needs-input" or st["needs"] != "permission":
        what = {"question": "asks a question", "trust": "asks whether to trust its folder"}.get(
            st["needs"], "is %s, not at a permission dialog" % st["status"])
        raise OrchError("agent %s %s; nothing was pressed: look with `orch tail %s`"
                        % (name, what, name), EXIT_NEEDS_INPUT)
    request = retry_until(lambda: permission_request(agent), 3.0)
    if request is None:
        raise OrchError("agent %s shows a dialog its hooks did not describe; nothing was "
                        "pressed: answer with `orch attach %s`" % (name, name), EXIT_NEEDS_INPUT)
    if tool and request.get("tool_name") != tool:
        raise OrchError("agent %s asks about %s, not %s; nothing was pressed"
                        % (name, describe_request(request), tool), EXIT_NEEDS_INPUT)
    leave_tmux_mode(agent)
    # The status can turn needs-input a moment before the CLI draws the dialog.
    find = kind_of(agent).permission_dialog
    dialog = retry_until(lambda: find(dialog_screen(agent)), 3.0)
    if dialog is None:
        raise OrchError("agent %s has no permission dialog on its screen; nothing was pressed: "
                        "look with `orch tail %s`" % (name, name), EXIT_NEEDS_INPUT)
    words = tool_words(request)
    if words and normalize_prompt(words)[:24] not in normalize_prompt(" ".join(dialog["above"])):
        raise OrchError("the dialog on agent %s's screen is not about %s, which its hook "
                        "reported; nothing was pressed: look with `orch attach %s`"
                        % (name, describe_request(request), name), EXIT_NEEDS_INPUT)
    return request, dialog


# Claude Code 2.1.330 ignores a key pressed the moment its dialog appears
# (measured: lost at once, taken 0.2 s later; 2.1.197 takes it at once).
DIALOG_SETTLE = 0.5


def dialog_screen(agent):
    """The screen as its kind's permission_dialog reads it: in colour where the pick is one."""
    return capture_pane(agent["tmux"]["pane"], agent["tmux"]["socket"],
                        colors=kind_of(agent).dialog_colors)


def answer_dialog(agent, key, question, find=None):
    """Press key; True once the dialog that asked question is gone from the screen.

    A key claude ignored is pressed again, but only while nothing shows it
    was taken (no hook event, no change of claude's own status since): a
    second press must never answer the next dialog.  find reads the dialog
    off the screen (default: the kind's permission dialog, off the screen it reads).
    """
    def gone():
        dialog = find(agent_screen(agent)) if find else \
            kind_of(agent).permission_dialog(dialog_screen(agent))
        return dialog is None or dialog["question"] != question
    time.sleep(DIALOG_SETTLE)
    for _ in range(3):
        pressed = time.time()
        tmux(["send-keys", "-t", agent["tmux"]["pane"]] + key, socket=agent["tmux"]["socket"])
        if retry_until(gone, 2.0):
            return True
        if key_was_taken(agent, pressed):
            return bool(retry_until(gone, 3.0))
    return False


def key_was_taken(agent, since):
    """True if claude reported anything (a hook event, its own status) after since."""
    if any(e.get("t", 0) > since for e in read_events(agent["name"], tail_bytes=8192)):
        return True
    own = claude_session_file_status(agent, agent["tmux"].get("pid"))
    return bool(own) and own[2] > since


def unhooked_dialog(agent):
    """The dialog of choices the agent shows that no hook describes, or None.

    Claude's own status says "dialog open" for these (a picker, a prompt of
    a new release); the screen, read by shape, says what they ask.
    """
    if not backend_of(agent).dialogs or not kind_of(agent).dialogs:
        return None
    st = status_of(agent)
    if st["status"] in ("exited", "starting") or st["needs"] in ("permission", "question"):
        return None
    leave_tmux_mode(agent)
    said = st["needs"] == "dialog" or at_first_screen(st)
    wait = 3.0 if said else 0     # claude says so a moment before it draws it
    return retry_until(lambda: kind_of(agent).choices_dialog(agent_screen(agent), said), wait)


def shown_dialog(agent):
    """Reads a dialog of choices still on its screen, even over an input box: gone means gone."""
    return lambda rows: kind_of(agent).choices_dialog(rows, said=True)


def choices_text(dialog):
    return ", ".join("%d. %s" % (n, shorten(text, 30)) for n, text in
                     sorted(dialog["choices"].items()))


def pick_choice(agent, dialog, number):
    """Move claude's cursor to choice number, then Enter; True once the dialog is gone."""
    pane, socket = agent["tmux"]["pane"], agent["tmux"]["socket"]
    moves = number - dialog["cursor"]
    if moves:
        tmux(["send-keys", "-t", pane] + ["Down" if moves > 0 else "Up"] * abs(moves),
             socket=socket)

    def at_choice():
        now = shown_dialog(agent)(agent_screen(agent))
        return now and now["question"] == dialog["question"] and now["cursor"] == number
    if not retry_until(at_choice, 3.0):
        raise OrchError("agent %s's cursor did not reach choice %d; nothing was picked: look "
                        "with `orch attach %s`" % (agent["name"], number, agent["name"]),
                        EXIT_UNCONFIRMED)
    return answer_dialog(agent, ["Enter"], dialog["question"], find=shown_dialog(agent))


# A choice that says no: what deny picks where the dialog offers no Esc to cancel.
NEGATIVE_CHOICE = r"^(No|Not now|Cancel|Skip|Later|Dismiss|Don't|Stop)\b"


def deny_unhooked(agent, dialog):
    """Cancel a dialog no hook describes: Esc where it offers that, else its "no" choice."""
    name = agent["name"]
    if re.search(r"Esc to (cancel|close|dismiss|go back)", dialog["keys"]):
        answered = answer_dialog(agent, ["Escape"], dialog["question"], find=shown_dialog(agent))
        how = "Escape"
    else:
        nos = [n for n, text in sorted(dialog["choices"].items())
               if re.match(NEGATIVE_CHOICE, text) and "exit" not in text.lower()]
        if not nos:
            raise OrchError("agent %s's dialog (%s) offers no way to cancel that orch can tell "
                            "(%s); nothing was pressed: `orch approve %s --choice N`, or `orch "
                            "attach %s`" % (name, json.dumps(dialog["question"],
                                                             ensure_ascii=False),
                                            choices_text(dialog), name, name), EXIT_NEEDS_INPUT)
        answered = pick_choice(agent, dialog, nos[0])
        how = "%d. %s" % (nos[0], dialog["choices"][nos[0]])
    if not answered:
        raise OrchError("agent %s still shows its dialog after orch pressed %s: look with `orch "
                        "tail %s`" % (name, how, name), EXIT_UNCONFIRMED)
    print("%s: cancelled the dialog %s (%s)" % (name, json.dumps(dialog["question"],
                                                             ensure_ascii=False), how))
    return EXIT_OK


def approve_unhooked(agent, dialog, choice):
    """Pick the choice the user named in a dialog no hook describes; never guess one."""
    name, question = agent["name"], json.dumps(dialog["question"], ensure_ascii=False)
    if choice is None:
        raise OrchError("agent %s shows a dialog orch does not know (%s: %s); orch picks a "
                        "choice there only when you name it: `orch approve %s --choice N`, or "
                        "`orch deny %s`" % (name, question, choices_text(dialog), name, name),
                        EXIT_NEEDS_INPUT)
    if choice not in dialog["choices"]:
        raise OrchError("agent %s's dialog (%s) has no choice %d (it offers %s); nothing was "
                        "pressed" % (name, question, choice, choices_text(dialog)), EXIT_USAGE)
    if not pick_choice(agent, dialog, choice):
        raise OrchError("agent %s still shows its dialog after orch picked %d: look with `orch "
                        "tail %s`" % (name, choice, name), EXIT_UNCONFIRMED)
    print("%s: picked %d. %s in the dialog %s" % (name, choice, dialog["choices"][choice],
                                                  question))
    return EXIT_OK


def approve_permission(agent, args):
    """Answer the permission dialog the agent's hook described: Yes, once."""
    name = agent["name"]
    if args.choice is not None:
        raise OrchError("--choice is for dialogs no hook describes; agent %s is not at one "
                        "(`orch approve %s` answers a permission dialog Yes, once)"
                        % (name, name), EXIT_NEEDS_INPUT)
    request, dialog = open_dialog(agent, args.tool)
    kind = kind_of(agent)
    yes = kind.yes_once(dialog)
    if yes is None:
        raise OrchError("agent %s's dialog has no plain \"Yes\" (it offers %s); orch "
                        "approves once or not at all: answer with `orch attach %s`"
                        % (name, ", ".join(sorted(dialog["options"])), name),
                        EXIT_NEEDS_INPUT)
    if not answer_dialog(agent, yes, dialog["question"]):
        raise OrchError("agent %s still shows the dialog after orch pressed %s (Yes): look "
                        "with `orch tail %s`" % (name, yes[-1], name), EXIT_UNCONFIRMED)
    print("%s: approved %s" % (name, describe_request(request)))
    return EXIT_OK


def named_entry(agent, rows):
    """The entry screen on rows, its question in the words the kind names it by, or None.

    The line over an entry's keys need not be its question: gemini's API-key
    box has one of its tips there ("4. Be specific for the best results").
    """
    entry, named = entry_dialog(rows), kind_of(agent).first_screen(rows)
    return entry and dict(entry, question=named["question"] if named else entry["question"])


def submit_entry(agent, entry, choice):
    """Press Enter at a first screen that offers no choices (what it shows is submitted)."""
    name, question = agent["name"], json.dumps(entry["question"], ensure_ascii=False)
    if choice is not None:
        raise OrchError("agent %s's screen (%s) offers no choices; `orch approve %s` presses "
                        "Enter there (%s), or `orch attach %s`" % (name, question, name,
                                                                  entry["keys"], name),
                        EXIT_USAGE)

    def shown(rows):
        found = named_entry(agent, rows)
        return found if found and found["question"] == entry["question"] else None
    if not answer_dialog(agent, ["Enter"], entry["question"], find=shown):
        raise OrchError("agent %s still shows %s after orch pressed Enter: look with `orch tail "
                        "%s`" % (name, question, name), EXIT_UNCONFIRMED)
    print("%s: pressed Enter at %s" % (name, question))


def cmd_approve(args):
    name = check_name(args.name)
    agent = find_agent(load_state(), name)
    with SendLock(name):
        first = at_first_screen(status_of(agent))
        dialog = unhooked_dialog(agent)
        entry = first and not dialog and named_entry(agent, agent_screen(agent))
        if entry and not args.tool:
            submit_entry(agent, entry, args.choice)
        elif not dialog or args.tool:
            return approve_permission(agent, args)
        else:
            approve_unhooked(agent, dialog, args.choice)
    return after_first_screen(agent) if first else EXIT_OK


def cmd_deny(args):
    agent = find_agent(load_state(), check_name(args.name))
    name = agent["name"]
    with SendLock(name):
        dialog = unhooked_dialog(agent)
        if dialog and not args.tool:
            return deny_unhooked(agent, dialog)
        request, dialog = open_dialog(agent, args.tool)
        # Escape cancels: the CLI refuses the tool and ends the turn (never an approval).
        if not answer_dialog(agent, ["Escape"], dialog["question"]):
            raise OrchError("agent %s still shows the dialog after orch pressed Escape: look "
                            "with `orch tail %s`" % (name, name), EXIT_UNCONFIRMED)
    print("%s: denied %s; its turn ended: `orch send %s \"...\"` to say what to do instead"
          % (name, describe_request(request), name))
    return EXIT_OK


# ###########################################################################
# First contact: the screens between a CLI's start and its input box
# ###########################################################################
#
# An API-key question, a sign-in picker, folder trust: each CLI may stop at
# one of these before its input box, and no hook says so.  The kind reads
# them off the screen (first_screen); at one, spawn and resume exit 4 with the
# question and what answers it, send refuses even with --force (any Enter
# would pick a choice), and the first message is kept in the agent's private
# folder, never typed there: `orch approve --choice N` types it once the
# screen is answered, `orch resume` when it starts again, `orch send --kept`
# after a person answered it.  orch never answers one by itself.

SCREEN_TITLES = {"trust": "%s's folder-trust question", "api-key": "%s's API-key question",
                 "in-use": "%s's session-in-use question",
                 "sign-in": "%s's sign-in screen", "dialog": "a dialog of %s's"}


def at_first_screen(st):
    """True when the agent stands at a screen before its input box (read off its screen)."""
    return st["status"] == "needs-input" and st["source"] == "screen"


def screen_advice(agent, st):
    """One sentence: which screen the agent shows, its question, and what answers it."""
    name, kind = agent["name"], kind_of(agent)
    rows = agent_screen(agent)
    known = kind.first_screen(rows) or {"keys": True, "fix": None}
    title = SCREEN_TITLES.get(st["needs"], "a dialog of %s's") % kind.name
    said = "%s %s" % (title, json.dumps(st["detail"] or "unreadable", ensure_ascii=False))
    if not known["keys"]:
        return ("%s, which no key in its window answers: %s, then `orch kill %s` and `orch "
                "resume %s`" % (said, known["fix"], name, name))
    dialog = kind.choices_dialog(rows, said=True)
    entry = not dialog and entry_dialog(rows)
    how = "`orch approve %s` (Enter: %s)" % (name, entry["keys"]) if entry else \
        "`orch approve %s --choice N`%s" % (name, " (%s)" % choices_text(dialog) if dialog else "")
    also = ", or start it with --trust" if st["needs"] == "trust" else \
        " (%s)" % known["fix"] if known["fix"] else ""
    return "%s: answer with %s or `orch attach %s`%s" % (said, how, name, also)


def first_screen_refusal(agent, st):
    return OrchError("agent %s waits at %s; nothing was typed (any Enter would answer it, so "
                     "not even with --force)" % (agent["name"], screen_advice(agent, st)),
                     EXIT_NEEDS_INPUT)


def kept_path(name):
    return os.path.join(agent_dir(name), "kept-message")


def keep_first(name, text):
    """Keep the first message of an agent that stopped at a first screen (private file)."""
    write_file_atomic(kept_path(name), text)


def kept_first(name):
    """The first message orch keeps for this agent, or None."""
    try:
        with open(kept_path(name), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def drop_kept(name):
    try:
        os.unlink(kept_path(name))
    except FileNotFoundError:
        pass


def send_kept(agent, timeout=None):
    """Type the kept first message; it is dropped once it may have been typed, never twice."""
    name = agent["name"]
    text = kept_first(name)
    if text is None:
        raise OrchError("agent %s has no first message kept: orch keeps one only when an agent "
                        "stopped at a screen before its first message" % name, EXIT_USAGE)
    try:
        outcome = send_message(agent, text, raw=True, timeout=timeout)
    except OrchError as e:
        if e.code in (EXIT_UNCONFIRMED, EXIT_MIXED):
            drop_kept(name)     # it may be in: typing it again could deliver it twice
        raise
    drop_kept(name)
    return outcome


def after_first_screen(agent):
    """Once approve answered a first screen: wait for the next, or type the kept message.

    Returns the exit code; prints what happened.
    """
    name = agent["name"]
    st = settle_start(agent, env_seconds("ORCH_START_TIMEOUT", 60))
    if at_first_screen(st):
        print("%s: now waits at %s%s" % (name, screen_advice(agent, st),
                                         "; its first message is still kept"
                                         if kept_first(name) is not None else ""))
        return EXIT_NEEDS_INPUT
    if st["status"] == "starting":
        raise OrchError("agent %s did not report ready after the screen was answered; look "
                        "with `orch tail %s`" % (name, name), EXIT_UNCONFIRMED)
    if kept_first(name) is not None:
        print("%s: first message %s" % (name, send_kept(agent)))
    return EXIT_OK


# ###########################################################################
# Worktrees: a git checkout of its own per agent, and no one's work lost
# ###########################################################################
#
# `spawn --worktree` checks out a new branch in a folder of its own under the
# data folder (<data>/worktrees/<repo>-<id>/<name>): outside the user's
# checkout, so it never shows there as untracked files, and private like the
# rest of orch's data.  Whatever removes a worktree asks git first whether
# anything uncommitted would go with it, and git's own `worktree remove`
# (which refuses a dirty tree) does the removing.  Every git call gets
# GIT_OPTIONAL_LOCKS=0: orch's `status` must never take the index lock from
# under the agent's own git commands.

MIN_GIT = (2, 17)           # `git worktree remove` came in 2.17


def git_env(extra=None):
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_OPTIONAL_LOCKS="0")
    env.update(extra or {})
    return env


def git_run(args, cwd, env_extra=None, capture=True):
    """Run `git -C cwd ARGS`; return the finished process, whatever git's exit code."""
    argv = ["git", "-C", cwd] + list(args)
    trace(argv)
    env = git_env(env_extra)
    pipe = subprocess.PIPE if capture else None
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, env=env)
    except OSError:
        raise OrchError("git is not installed or not on PATH: install git %d.%d or newer"
                        % MIN_GIT)


def git(args, cwd, what, env_extra=None):
    """The output of a git command that must succeed; a failure is one line saying what failed."""
    proc = git_run(args, cwd, env_extra)
    if proc.returncode != 0:
        raise OrchError("%s: %s" % (what, git_says(proc.stderr)))
    return proc.stdout.decode("utf-8", "replace")


def git_says(stderr):
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    words = [line.split(":", 1)[1].strip() if line.startswith(("fatal:", "error:")) else line
             for line in lines if line and not line.startswith("hint:")]
    return "git says: " + shorten("; ".join(words) or "nothing (exit code only)", 300)


def git_has(ref, where):
    """True if ref (refs/heads/BRANCH, or REF^{commit}) names something in the repository."""
    return git_run(["rev-parse", "--verify", "--quiet", ref], where).returncode == 0


def worktree_works(wt):
    """True if the worktree is there and git still finds its repository from it."""
    return os.path.isdir(wt["path"]) and git_run(["rev-parse", "--git-dir"],
                                                 wt["path"]).returncode == 0


_git_checked = []


def check_git():
    if _git_checked:
        return
    import re
    out = git(["--version"], "/", "cannot run git")
    found = re.search(r"(\d+)\.(\d+)", out)
    if not found or tuple(int(n) for n in found.groups()) < MIN_GIT:
        raise OrchError("%s is too old for worktrees: orch needs git %d.%d or newer"
                        % (out.strip() or "git", MIN_GIT[0], MIN_GIT[1]))
    _git_checked.append(True)


def checkout_of(cwd):
    """(top of the checkout cwd is in, cwd relative to that top), or a one-line refusal."""
    proc = git_run(["rev-parse", "--is-bare-repository", "--is-inside-git-dir"], cwd)
    flags = proc.stdout.decode("utf-8", "replace").split()
    if proc.returncode != 0:
        raise OrchError("--worktree needs a git repository, and %s is not in one: `git init` "
                        "it, or --cwd into a checkout" % cwd)
    if flags[:1] == ["true"]:
        raise OrchError("%s is a bare repository, with no checkout to branch from: --cwd into "
                        "one of its worktrees" % cwd)
    if flags[1:2] == ["true"]:
        raise OrchError("%s is inside a .git folder: --cwd into the checkout" % cwd)
    top, prefix = (git(["rev-parse", "--show-toplevel", "--show-prefix"], cwd,
                       "cannot read the checkout at %s" % cwd).split("\n") + [""])[:2]
    return top, prefix


def branch_name(top, branch):
    """The branch name, checked by git's own rules; a name it refuses is a usage error."""
    proc = git_run(["check-ref-format", "--branch", branch], top)
    if branch.startswith("-") or proc.returncode != 0:
        raise OrchError("invalid branch name %r: git refuses it (see `git check-ref-format`); "
                        "choose another with --branch" % branch, EXIT_USAGE)
    return proc.stdout.decode("utf-8", "replace").strip()


def resolve_base(top, base):
    """(the base's name to record, its commit): --base REF, or the checkout's HEAD.

    For HEAD the name recorded is the branch checked out there, so that
    `diff` and `rm --delete-branch` compare with where that branch is now;
    a detached HEAD is recorded as its commit.
    """
    if base is not None and (base.startswith("-") or not base.strip()):
        raise OrchError("invalid --base %r: name a branch, tag or commit" % base, EXIT_USAGE)
    proc = git_run(["rev-parse", "--verify", "--quiet", (base or "HEAD") + "^{commit}"], top)
    commit = proc.stdout.decode("utf-8", "replace").strip()
    if proc.returncode != 0 or not commit:
        if base is None:
            raise OrchError("the repository at %s has no commits yet: commit something first, "
                            "then a worktree can branch from it" % top)
        raise OrchError("--base %r is not a commit in the repository at %s" % (base, top),
                        EXIT_USAGE)
    if base is not None:
        return base, commit
    name = git_run(["symbolic-ref", "--quiet", "--short", "HEAD"], top).stdout
    return name.decode("utf-8", "replace").strip() or commit, commit


def worktrees_home(top):
    """<data>/worktrees/<repo name>-<id of its .git folder>: one folder per repository."""
    import hashlib
    import re
    common = os.path.realpath(os.path.join(top, git(
        ["rev-parse", "--git-common-dir"], top, "cannot read the repository at %s" % top).strip()))
    label = os.path.basename(os.path.dirname(common) if os.path.basename(common) == ".git"
                             else common)
    label = re.sub(r"[^A-Za-z0-9._-]", "_", label)[:40] or "repo"
    digest = hashlib.sha1(common.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return os.path.join(data_dir(), "worktrees", "%s-%s" % (label, digest))


def make_worktree(name, cwd, branch=None, base=None):
    """Check out a branch for agent `name`; return (worktree record, the agent's folder in it).

    A new branch starts at base (default: HEAD); an existing branch is
    checked out as it is, which git refuses if another worktree has it.
    """
    check_git()
    top, prefix = checkout_of(cwd)
    branch = branch_name(top, branch or "orch/" + name)
    base_name, base_commit = resolve_base(top, base)
    path = os.path.join(worktrees_home(top), name)
    if os.path.lexists(path):
        raise OrchError("%s already exists (left by an earlier agent %s?): look in it, then "
                        "`git worktree remove %s`, or choose another name" % (path, name, path))
    make_private_dir(os.path.dirname(path))
    import hashlib
    # One at a time per repository: a `git worktree add` may read the other's
    # half-made one and fail ("failed to read .git/worktrees/p2/commondir", seen).
    key = hashlib.sha256(top.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    with FileLock(os.path.join(data_dir(), "locks", "worktree-%s.lock" % key)):
        new_branch = not git_has("refs/heads/" + branch, top)
        add = ["-b", branch, path, base_commit] if new_branch else [path, branch]
        git(["worktree", "add", "--quiet"] + add, top, "cannot make a worktree for agent %s"
            % name)
    if base is None and git_run(["diff", "--quiet", "HEAD", "--"], top).returncode == 1:
        sys.stderr.write("orch: note: the uncommitted changes in %s are not in agent %s's "
                         "worktree: it starts from the last commit (%s)\n"
                         % (short_path(top), name, base_commit[:12]))
    wt = {"repo": top, "path": path, "branch": branch, "base": base_name,
          "base_commit": base_commit, "new_branch": new_branch}
    folder = os.path.normpath(os.path.join(path, prefix))
    os.makedirs(folder, exist_ok=True)      # a folder with nothing tracked in it yet
    return wt, folder


def repository_dir(wt):
    """The repository's .git folder, asked of the worktree or else the checkout it came from.

    Asked, not recorded: `git worktree repair` after the repository moved
    makes the worktree work again, and orch follows.  None when neither
    knows (the repository moved or was deleted).
    """
    for where in (wt["path"], wt["repo"]):
        if os.path.isdir(where):
            proc = git_run(["rev-parse", "--git-common-dir"], where)
            if proc.returncode == 0:
                return os.path.realpath(os.path.join(
                    where, proc.stdout.decode("utf-8", "surrogateescape").strip()))
    return None


def worktree_git_dir(agent):
    """The repository of a worktree that is there and works, or a one-line error saying why not."""
    wt = agent["worktree"]
    if not os.path.isdir(wt["path"]):
        raise OrchError("the worktree of agent %s is gone from %s (removed by hand?): "
                        "`orch rm %s` forgets the agent" % (agent["name"], wt["path"],
                                                             agent["name"]))
    check_git()
    if not worktree_works(wt):
        raise OrchError("the worktree %s of agent %s has lost its repository (was %s moved or "
                        "deleted? after a move, run `git worktree repair %s` in its new place)"
                        % (wt["path"], agent["name"], wt["repo"], wt["path"]))
    return repository_dir(wt)


def uncommitted(wt):
    """`git status --short` lines of the worktree: changes not committed, untracked files too."""
    out = git(["status", "--porcelain", "--untracked-files=normal"], wt["path"],
              "cannot read the worktree %s" % wt["path"])
    return [line for line in out.split("\n") if line.strip()]


def base_point(wt):
    """Where the agent's branch left its base: the merge base with the base as it is now.

    So `diff` shows the agent's work only, even after the base moved on or
    the agent merged it in; the recorded commit serves if the base is gone.
    """
    proc = git_run(["merge-base", wt["base"], "HEAD"], wt["path"])
    found = proc.stdout.decode("utf-8", "replace").strip()
    return found if proc.returncode == 0 and found else wt["base_commit"]


def branch_merged(repo, wt):
    """True when every commit of the agent's branch is in its base (or the branch is gone)."""
    if not git_has("refs/heads/" + wt["branch"], repo):
        return True
    base = wt["base"] if git_has(wt["base"] + "^{commit}", repo) else wt["base_commit"]
    return git_run(["merge-base", "--is-ancestor", "refs/heads/" + wt["branch"], base],
                   repo).returncode == 0


def rm_refusal(agent, force, delete_branch):
    """Why `rm` must keep this agent (its worktree or branch holds work), or None."""
    wt, name = agent["worktree"], agent["name"]
    check_git()
    repo = repository_dir(wt)
    if os.path.isdir(wt["path"]) and not force:
        if repo is None or not worktree_works(wt):
            return ("cannot check the worktree %s of agent %s for uncommitted work: its "
                    "repository is gone from %s; `orch rm %s --force` deletes the folder anyway"
                    % (wt["path"], name, wt["repo"], name))
        changes = uncommitted(wt)
        if changes:
            return ("agent %s's worktree %s has uncommitted work (%s): commit it there, or "
                    "`orch rm %s --force` to discard it" % (
                        name, short_path(wt["path"]), shorten(", ".join(changes[:8]) + (
                            ", and %d more" % (len(changes) - 8) if len(changes) > 8 else ""),
                            300), name))
    if delete_branch and not force and repo and not branch_merged(repo, wt):
        return ("branch %s of agent %s has commits that are not in %s: merge them, or `orch rm "
                "%s` without --delete-branch keeps the branch, or --force drops them"
                % (wt["branch"], name, wt["base"], name))
    return None


def remove_worktree(agent, force, delete_branch):
    """Remove the agent's worktree (and its branch if asked); return what was kept, in words."""
    wt = agent["worktree"]
    repo = repository_dir(wt)
    if repo is None:
        import shutil
        shutil.rmtree(wt["path"], ignore_errors=True)     # only with --force: rm_refusal
        remove_if_empty(os.path.dirname(wt["path"]))
        return "its repository is gone from %s" % wt["repo"]
    # git's own removal refuses a dirty tree again, should the agent have written since.
    git(["worktree", "remove"] + (["--force"] if force else []) + [wt["path"]], repo,
        "cannot remove the worktree of agent %s" % agent["name"])
    remove_if_empty(os.path.dirname(wt["path"]))
    if not git_has("refs/heads/" + wt["branch"], repo):
        return None
    if delete_branch:
        git(["branch", "-D", wt["branch"]], repo, "cannot delete branch %s" % wt["branch"])
        return None
    return "kept branch %s" % wt["branch"]


def remove_if_empty(folder):
    try:
        os.rmdir(folder)    # the repository's folder of worktrees, once its last one went
    except OSError:
        pass


def worktree_dirty(agents):
    """{name: True/False/None} for the worktree agents, their `git status` calls run at once."""
    procs = {}
    env = git_env()
    for agent in agents:
        path = agent["worktree"]["path"]
        if not os.path.isdir(path):
            procs[agent["name"]] = None
            continue
        try:
            procs[agent["name"]] = subprocess.Popen(
                ["git", "-C", path, "status", "--porcelain", "--untracked-files=normal"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env)
        except OSError:
            procs[agent["name"]] = None     # no git: unknown, which is what null says
    dirty = {}
    for name, proc in procs.items():
        out = proc.communicate()[0] if proc else b""
        dirty[name] = bool(out.strip()) if proc and proc.returncode == 0 else None
    return dirty


def undo_worktree(wt):
    """Take back a worktree just made for an agent that did not start: nothing is in it yet."""
    repo = repository_dir(wt)
    if repo is None:
        return
    git_run(["worktree", "remove", "--force", wt["path"]], repo)
    remove_if_empty(os.path.dirname(wt["path"]))
    if wt["new_branch"]:
        # Only the branch spawn made, and only while it is where spawn put it.
        git_run(["update-ref", "-d", "refs/heads/" + wt["branch"], wt["base_commit"]], repo)


def cmd_diff(args):
    agent = find_agent(load_state(), check_name(args.name))
    if not agent.get("worktree"):
        raise OrchError("agent %s has no worktree (it was not spawned with --worktree): run "
                        "`git diff` in %s" % (agent["name"], agent["cwd"]))
    wt = agent["worktree"]
    worktree_git_dir(agent)
    start = base_point(wt)
    # A scratch copy of the worktree's index with every file added: the diff
    # then has new files too, and the agent's own index is never touched.
    import shutil
    import tempfile
    index = git(["rev-parse", "--git-path", "index"], wt["path"], "cannot read the worktree")
    index = os.path.join(wt["path"], index.strip())
    with tempfile.TemporaryDirectory(prefix="diff-", dir=make_private_dir(data_dir())) as tmp:
        scratch = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
        if os.path.isfile(index):
            # copy2 keeps the time stamp, by which git tells a file changed in
            # the index's own second ("racy git") from an unchanged one.
            shutil.copy2(index, scratch["GIT_INDEX_FILE"])
        git(["add", "--all", "--", "."], wt["path"], "cannot read the worktree %s" % wt["path"],
            scratch)
        sys.stdout.flush()
        proc = git_run(["diff", "--cached"] + (["--stat"] if args.stat else []) + [start],
                       wt["path"], scratch, capture=False)
    if proc.returncode not in (0, 1, 141):      # 141: a pager or `| head` that quit early
        raise OrchError("git diff failed in %s (exit code %d)" % (wt["path"], proc.returncode))
    return EXIT_OK


# ###########################################################################
# Hosts: every verb on another machine, over plain ssh
# ###########################################################################
#
# `orch --host H VERB ...` runs VERB by the orch on H, which is this very
# file: shipped on first use to ~/.orch.d/bin/orch-<hash>.py on H and run
# from there, so nothing is installed by hand and two versions never meet.
# The remote command line is one fixed bootstrap in base64 (it reads the
# same in sh, bash, zsh, fish and csh); everything the user typed travels
# on stdin as JSON, so no remote shell ever reads a byte of it.  One ssh
# connection per host is kept open for a minute (ControlMaster).

SHIP_EXIT = 111     # the bootstrap's "send me the file": no orch exit code is 111

BOOTSTRAP = r'''
import base64, hashlib, json, marshal, os, signal, sys, threading
def take(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            break
        data += chunk
    return data
def save(path, data):
    tmp = "%s.%s.tmp" % (path, os.urandom(8).hex())
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
def sha(data):
    return hashlib.sha256(data).hexdigest().encode()
def compiled(source, cache):
    # The bytecode of the checked source, kept beside it: compiling orch costs ~45 ms.
    try:
        with open(cache, "rb") as f:
            blob = f.read()
        if blob[:64] == digest.encode() and blob[64:128] == sha(blob[128:]):
            return marshal.loads(blob[128:])
    except (OSError, ValueError, EOFError, TypeError):
        pass
    code = compile(source, path, "exec")
    payload = marshal.dumps(code)
    save(cache, digest.encode() + sha(payload) + payload)
    return code
digest = sys.argv[1]
if len(sys.argv) > 2:      # a terminal's session: the head came on the command line
    head = json.loads(base64.b64decode(sys.argv[2]).decode("utf-8"))
else:
    head = json.loads(take(int(take(10) or b"0")).decode("utf-8"))
folder = os.path.join(os.path.expanduser("~"), ".orch.d", "bin")
path = os.path.join(folder, "orch-%s.py" % digest[:16])
try:
    with open(path, "rb") as f:
        source = f.read()
except OSError:
    source = b""
if sha(source) != digest.encode():
    if not head["ship"]:
        sys.exit(111)
    source = take(head["ship"])
    if sha(source) != digest.encode():
        sys.stderr.write("orch: error: the copy of orch sent to this host arrived damaged\n")
        sys.exit(1)
    for d in (os.path.dirname(folder), folder):
        if not os.path.lexists(d):
            os.mkdir(d, 0o700)
    os.chmod(folder, 0o700)
    save(path, source)
for d in (os.path.dirname(folder), folder):     # what runs as you must be yours alone
    st = os.lstat(d)
    if st.st_uid != os.getuid() or not os.path.isdir(d) or os.path.islink(d) or st.st_mode & 0o022:
        sys.stderr.write("orch: error: %s on this host is not a private folder of yours: "
                         "remove it\n" % d)
        sys.exit(1)
if head["argv"] is None:
    sys.exit(0)
code = compiled(source, "%s.%s.pyc" % (path[:-3], sys.implementation.cache_tag))
if head["watch"]:
    def watch():
        while os.read(0, 65536):
            pass
        os.kill(os.getpid(), signal.SIGINT)     # the local orch is gone: stop as on Ctrl-C
    threading.Thread(target=watch, daemon=True).start()
os.environ.pop("ORCH_HOST", None)
sys.argv = [path] + head["argv"]
exec(code, {"__name__": "__main__", "__file__": path})
'''


def check_host(host):
    """Refuse what ssh would read as an option, or what is no host name at all."""
    if not host or host.startswith("-") or any(c.isspace() or ord(c) < 32 or ord(c) == 127
                                               for c in host):
        raise OrchError("invalid host %r: give what ssh takes as a destination (host, "
                        "user@host, or an alias from your ssh config)" % (host,), EXIT_USAGE)
    return host


_shipped = []


def shipped():
    """(this file's bytes, their sha256): what goes to a host, read once per command."""
    if not _shipped:
        import hashlib
        with open(os.path.abspath(__file__), "rb") as f:
            source = f.read()
        _shipped.append((source, hashlib.sha256(source).hexdigest()))
    return _shipped[0]


def control_dir():
    """A private folder for ssh's connection sockets, short enough for a socket path."""
    folder = os.path.join(data_dir(), "ssh")
    if len(folder) > 60:        # %C adds 41 bytes; a socket path must fit in ~104
        import hashlib
        tag = hashlib.sha1(folder.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        folder = "/tmp/orch-ssh-%d-%s" % (os.getuid(), tag)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            st = os.lstat(folder)
            if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o077:
                raise OrchError("%s is not a private folder of yours: remove it" % folder)
        return folder
    return make_private_dir(folder)


def ssh_argv(host, tty=False):
    argv = ["ssh"]
    if os.environ.get("ORCH_SSH_CONFIG"):
        argv += ["-F", os.environ["ORCH_SSH_CONFIG"]]
    argv += ["-o", "ControlMaster=auto", "-o", "ControlPath=%s/%%C" % control_dir(),
             "-o", "ControlPersist=60", "-o", "ConnectTimeout=10",
             # A host that went away takes a kept connection down with it within ~15 s.
             "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    # A script must never hang at a password or host-key prompt; attach has a person.
    argv += ["-t"] if tty else ["-T", "-o", "BatchMode=yes"]
    return argv + ["--", check_host(host)]


def remote_command(digest, head=None):
    """The remote command line: python3 running the bootstrap; head only for a terminal."""
    import base64
    import shlex
    code = base64.b64encode(BOOTSTRAP.encode("utf-8")).decode("ascii")
    words = ["python3", "-I", "-S", "-c",
             "import base64;exec(base64.b64decode(\"%s\"))" % code, digest]
    if head is not None:
        words.append(base64.b64encode(json.dumps(head).encode("utf-8")).decode("ascii"))
    return " ".join(shlex.quote(w) for w in words)


def frame(head):
    data = json.dumps(head).encode("utf-8")
    return b"%010d" % len(data) + data


def ssh_once(host, digest, head, data, tty=False, capture=False):
    """One ssh session; return (exit code, stdout bytes if captured, stderr not from orch)."""
    import threading
    # A terminal stays the terminal (stdin too), so its head goes on the command line.
    argv = ssh_argv(host, tty) + [remote_command(digest, head if tty else None)]
    trace(argv[:-1] + ["<bootstrap>"])
    pipe = subprocess.PIPE
    try:
        proc = subprocess.Popen(argv, stdin=None if tty else pipe,
                                stdout=pipe if capture else None, stderr=None if tty else pipe)
    except OSError:
        raise OrchError("ssh is not installed or not on PATH: install the OpenSSH client")
    held, out = [], []

    def feed():
        try:
            proc.stdin.write(frame(head) + (data or b""))
            proc.stdin.flush()
            if not head.get("watch"):
                proc.stdin.close()      # else kept open: its end tells the remote we are gone
        except OSError:
            pass        # the remote stopped reading: its exit code says why

    def relay():
        for line in iter(proc.stderr.readline, b""):
            if line.startswith(b"orch: ") and not capture:
                sys.stderr.write(line.decode("utf-8", "replace"))
                sys.stderr.flush()
            else:
                held.append(line.decode("utf-8", "replace"))
    threads = []
    if not tty:
        threads += [threading.Thread(target=feed, daemon=True),
                    threading.Thread(target=relay, daemon=True)]
    if capture:
        threads.append(threading.Thread(target=lambda: out.append(proc.stdout.read()),
                                        daemon=True))
    for thread in threads:
        thread.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        raise
    for thread in threads[1:]:      # all but feed, which may wait on a closed pipe
        thread.join()
    return code, (out[0] if out else b""), "".join(held)


def on_host(host, argv, data=None, tty=False, capture=False):
    """Run `orch ARGV` on host, shipping orch there first if it is not; return as ssh_once."""
    source, digest = shipped()
    head = {"argv": argv, "ship": 0, "watch": data is None and not tty}
    code, out, err = ssh_once(host, digest, head, data, tty, capture)
    if code == SHIP_EXIT:
        ship = {"argv": None, "ship": len(source), "watch": False}
        code, out, err = ssh_once(host, digest, ship, source, capture=True)
        if code == 0:
            code, out, err = ssh_once(host, digest, head, data, tty, capture)
    if code == 255:
        raise OrchError(unreachable(host, err))
    if code == 127 and "python3" in err:
        raise OrchError("%s has no python3 on the PATH its ssh sessions get: orch needs "
                        "Python 3.6 or newer there" % host)
    return code, out, err


def unreachable(host, err):
    said = "; ".join(line.strip() for line in err.splitlines() if line.strip())
    return ("cannot reach %s over ssh (%s): orch needs a login without prompts; check that "
            "`ssh %s true` works, e.g. after `ssh-copy-id %s`"
            % (host, shorten(said or "no reason given", 200), host, host))


def reads_stdin(args):
    """Whether the verb will read stdin: then it is read here and sent along."""
    text = getattr(args, "message", getattr(args, "prompt", "")) if args.verb in (
        "send", "spawn", "resume") else ""
    return text == "-" or getattr(args, "prompt_file", None) == "-" or (
        args.verb == "send" and text is None) or (
        args.verb == "notify" and "-" in (args.webhook, args.ntfy, args.exec_))


def run_remote(host, argv, args):
    """`orch --host HOST ...`: the remote orch's output and exit code, unchanged."""
    tty = args is not None and args.verb == "attach"
    data = sys.stdin.buffer.read() if args is not None and reads_stdin(args) else None
    sys.stdout.flush()
    code, _, err = on_host(host, argv, data, tty=tty)
    if err:
        sys.stderr.write(err)
    return code


def split_host(argv):
    """(host or None, argv without the leading --host option); ORCH_HOST is the default."""
    if argv[:1] == ["--host"] and len(argv) > 1:
        return check_host(argv[1]), argv[2:]
    if argv[:1] and argv[0].startswith("--host="):
        return check_host(argv[0][len("--host="):]), argv[1:]
    host = os.environ.get("ORCH_HOST")
    return (check_host(host) if host else None), argv


def name_words(args):
    """The words of the command line that name an agent (not `send --to`'s message)."""
    if getattr(args, "to", None) is not None:
        return [n for n in args.to.split(",") if n]
    if args.verb == "send" and (args.all or args.idle):
        return []
    return [n for n in [getattr(args, "name", None)] + list(getattr(args, "names", None) or [])
            if n]


def named_hosts(args):
    """{NAME@HOST as typed: (NAME, HOST)} for the agent names the verb was given."""
    found = {}
    for typed in name_words(args):
        if typed and "@" in typed:
            name, _, host = typed.strip().rpartition("@")
            found[typed] = (name, check_host(host))
    return found


def for_group(argv, args, named, host):
    """argv with only the agents on host (None: this machine), written without @HOST."""
    def here(typed):
        return named[typed][1] == host if typed in named else host is None
    names = [] if getattr(args, "to", None) else name_words(args)
    out = []
    for word in argv:
        if getattr(args, "to", None) and word in (args.to, "--to=" + args.to):
            mine = [named.get(t, (t, None))[0] for t in args.to.split(",") if here(t)]
            out.append(word[:len(word) - len(args.to)] + ",".join(mine))
        elif word in names:
            names.remove(word)      # each name once: a message may read the same
            if here(word):
                out.append(named.get(word, (word, None))[0])
        else:
            out.append(word)
    return out


def run_by_host(argv, args, named):
    """A verb whose agents are NAME@HOST: once per host, in parallel; the worst exit code."""
    groups = sorted(set(host for _, host in named.values()))
    if any(n not in named for n in name_words(args)):
        groups.append(None)         # some agents are on this machine
    if len(groups) == 1:
        return run_remote(groups[0], for_group(argv, args, named, groups[0]), args)
    # Each host's output is printed when it is done: fine for these, not for a feed.
    if args.verb not in ("wait", "send", "rm") or args.verb == "wait" and args.any:
        raise OrchError("%s takes agents on one host at a time: run one `orch %s` per host"
                        % (args.verb + (" --any" if args.verb == "wait" else ""), args.verb),
                        EXIT_USAGE)
    data = sys.stdin.buffer.read() if reads_stdin(args) else None
    results = {}

    def run(host):
        results[host] = run_captured(host, for_group(argv, args, named, host), data)
    in_parallel(run, groups)
    worst = EXIT_OK
    for host in groups:
        code, out, err = results[host]
        sys.stdout.write(out)
        sys.stderr.write(err)
        worst = worse(code, worst)
    return worst


def run_captured(host, argv, data=None):
    """`orch ARGV` on host (None: here, as its own process): (exit code, stdout, stderr)."""
    try:
        if host is None:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv,
                                  input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            code, out, err = proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")
        else:
            code, out, err = on_host(host, argv, data, capture=True)
        return code, out.decode("utf-8", "replace"), err
    except OrchError as e:
        return e.code, "", "orch: error: %s\n" % e


def hosts_file():
    return os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"),
                        "orch", "hosts")


def known_hosts():
    """The hosts of `list --all-hosts`: $ORCH_HOSTS (a,b,c), else the hosts file."""
    if os.environ.get("ORCH_HOSTS") is not None:
        words = os.environ["ORCH_HOSTS"].split(",")
    else:
        try:
            with open(hosts_file(), encoding="utf-8") as f:
                words = [line.split("#", 1)[0] for line in f]
        except FileNotFoundError:
            words = []
    hosts = []
    for word in words:
        if word.strip() and word.strip() not in hosts:
            hosts.append(check_host(word.strip()))
    return hosts


def all_hosts_rows(hosts):
    """(rows of every host, with "host", this machine's first; one error line per failed host)."""
    import threading
    found, errors = {}, {}

    def query(host):
        try:
            code, out, err = on_host(host, ["list", "--json"], capture=True)
            found[host] = json.loads(out.decode("utf-8"))
            if code != 0:
                errors[host] = "%s: %s" % (host, shorten(err.strip(), 300))
        except OrchError as e:
            errors[host] = str(e)
        except ValueError:
            errors[host] = "%s: its orch answered `list --json` with no JSON" % host
    threads = [threading.Thread(target=query, args=(h,)) for h in hosts]
    for thread in threads:
        thread.start()
    state, rows = listed_rows()
    for row in rows:
        row["host"] = None
    for thread in threads:
        thread.join()
    for host in hosts:
        for row in found.get(host, []):
            row["host"] = host
            rows.append(row)
    return state, rows, [errors[h] for h in hosts if h in errors]


# ###########################################################################
# Input: every byte from outside (argv, stdin, files, numbers) checked here
# ###########################################################################
#
# Policy: text is UTF-8.  Bytes that are not are refused with their offset,
# never guessed at or replaced: a message that reached the agent garbled is
# worse than one that did not go.  Then the content rule below removes what a
# terminal would take as keys.  Numbers are checked by the parser.

def decode_utf8(data, what, code=EXIT_USAGE):
    """Return bytes as text, or refuse them naming the first bad byte and its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OrchError("%s is not valid UTF-8 (byte 0x%02x at offset %d): orch takes UTF-8 "
                        "text only; convert it first (e.g. iconv -t UTF-8)"
                        % (what, data[e.start], e.start), code)


def decode_argument(arg, index):
    """Return one argv word as UTF-8 text.

    Python decodes argv with the locale's encoding and keeps undecodable
    bytes as surrogates (all non-ASCII bytes, under Python 3.6 in a C
    locale): turn them back into bytes, then decode those as UTF-8.
    """
    try:
        data = arg.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise OrchError("argument %d holds characters that are not text" % index, EXIT_USAGE)
    return decode_utf8(data, "argument %d" % index)


def read_stdin():
    stream = getattr(sys.stdin, "buffer", None)
    return decode_utf8(stream.read(), "standard input") if stream else sys.stdin.read()


def read_file(path, what):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OrchError("cannot read %s file %s: %s" % (what, path, e.strerror or e))
    return decode_utf8(data, "%s file %s" % (what, path))


def read_text(value, path=None, what="prompt"):
    """Return text from an argument, '-' (stdin) or a file, made safe to type; None if none."""
    if path:
        return clean_text(read_file(path, what), what)
    if value == "-":
        text = read_stdin()
        # `echo msg | orch send a` ends in a newline nobody meant to send.
        value = text[:-1] if text.endswith("\n") else text
    return None if value is None else clean_text(value, what)


# What a message may contain: printable text, newlines and tabs.  Anything a
# terminal reads as a key or a command goes: escape sequences (colours from
# `git diff --color`, and ESC[201~, which would end orch's bracketed paste
# early and let the bytes after it act as keys) and other control characters
# (Ctrl-C quits claude).  Both backends and every prompt get the same rule.
TERMINAL_SEQUENCE = (r"\x1b\[[0-?]*[ -/]*[@-~]"            # CSI: colours, keys, paste markers
                     r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: titles, links
                     r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"       # DCS, SOS, PM, APC strings
                     r"|\x1b[ -/]*[0-~]"                    # ESC ( B, ESC c, ESC 7 ...
                     r"|\x9b[0-?]*[ -/]*[@-~]")              # 8-bit CSI
CONTROL_CHARACTER = r"[\x00-\x08\x0b-\x1f\x7f-\x9f]"      # all but tab and newline


def clean_text(text, what="message"):
    """Return text without terminal escape sequences and control characters; say what went."""
    import re
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, sequences = re.subn(TERMINAL_SEQUENCE, "", text)
    text, controls = re.subn(CONTROL_CHARACTER, "", text)
    removed = []
    if sequences:
        removed.append("%d terminal escape sequence%s" % (sequences, "s"[:sequences != 1]))
    if controls:
        removed.append("%d control character%s" % (controls, "s"[:controls != 1]))
    if removed and not text.strip():
        raise OrchError("the %s holds nothing but terminal controls (%s): nothing to send"
                        % (what, " and ".join(removed)), EXIT_USAGE)
    if removed:
        sys.stderr.write("orch: note: removed %s from the %s: they would act as keys in the "
                         "agent's terminal\n" % (" and ".join(removed), what))
    return text




def number_type(kind, low, high, unit):
    """An argparse type: a kind() number from low to high, else a usage error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:     # NaN fails both comparisons
            raise argparse.ArgumentTypeError("%r is not %s from %s to %s" % (text, unit, low, high))
        return value
    return parse


SECONDS = number_type(float, 0, 864000, "a number of seconds")     # up to 10 days
LINES = number_type(int, 1, 1000000, "a number of lines")


def env_seconds(name, default):
    """A number of seconds from the environment; a bad value is an error, not a traceback."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return SECONDS(text)
    except argparse.ArgumentTypeError as e:
        raise OrchError("$%s: %s" % (name, e))


# ###########################################################################
# Verbs: one cmd_<verb>(args) each
# ###########################################################################

def resolve_cwd(cwd):
    path = os.path.abspath(os.path.expanduser(cwd or os.getcwd()))
    if not os.path.isdir(path):
        raise OrchError("working folder %s does not exist: create it or pass --cwd" % path)
    return path


def cmd_spawn(args):
    name = check_name(args.name)
    prompt = read_text(args.prompt, args.prompt_file)
    if prompt is not None and not prompt.strip():
        prompt = None
    cwd = resolve_cwd(args.cwd)
    if args.cmd and args.agent:
        raise OrchError("give --agent or --cmd, not both", EXIT_USAGE)
    kind = CommandKind if args.cmd else KINDS[args.agent or "claude"]
    # Any program but claude needs a terminal: --cmd means tmux unless told otherwise.
    backend = choose_backend(args.backend or (None if kind.headless else "tmux"))
    if backend == "headless" and not kind.headless:
        raise OrchError("%s needs the tmux backend: the headless backend speaks claude's "
                        "stream-json protocol only" % kind.option, EXIT_USAGE)
    argv_program = kind.program(args)
    short_of_memory(kind)
    if (args.branch is not None or args.base is not None) and not args.worktree:
        raise OrchError("--branch and --base are for --worktree", EXIT_USAGE)
    if backend == "tmux":
        check_tmux_version()        # before a worktree is made for nothing
    started, worktree = [], None
    with undo_on_failure(started, new=True) as undo:
        if args.worktree:
            refuse_existing(load_state(), name)     # before git makes anything
            worktree, cwd = make_worktree(name, cwd, args.branch, args.base)
            undo.worktrees.append(worktree)
        BACKENDS[backend].preflight(cwd)
        kind.preflight(cwd, backend)
        trusted = kind.trust(cwd, args.trust, worktree)
        agent, first = spawn_recorded(args, kind, backend, cwd, worktree, prompt, argv_program,
                                      started, trusted)
    return finish_start(agent, first, "started")


def spawn_recorded(args, kind, backend, cwd, worktree, prompt, argv_program, started, trusted):
    """Start the agent and save its record, in one hold of the state lock."""
    name = args.name
    with LockedState() as state:
        refuse_existing(state, name)
        agent = {"name": name, "agent": kind.name, "backend": backend, "cwd": cwd,
                 "created": time.time(), "cmd": args.cmd, "session_id": kind.new_session_id(),
                 "trust": trusted,
                 "extra_args": args.extra, "home": os.path.expanduser("~"),
                 "tmux": {"socket": socket_place(args.socket or default_socket()),
                          "session": args.session or default_session()},
                 "parent": spawning_agent(state, name)}
        if args.on_limit:
            agent["on_limit"] = args.on_limit
        reset_agent_dir(name)
        first = prompt if prompt is None or args.raw else escape_leading(prompt)
        if backend == "headless":
            agent.pop("tmux")
        BACKENDS[backend].start(agent, argv_program, first)
        if worktree:
            agent["worktree"] = worktree
        started.append(agent)
        state["agents"][name] = agent
    return agent, first


def socket_place(socket):
    """A socket path made absolute (agents and later calls run elsewhere); a name as is."""
    return os.path.abspath(socket) if socket and "/" in socket else socket


def spawning_agent(state, name):
    """The agent of this fleet whose own process runs this spawn, or None.

    Every agent gets ORCH_AGENT (and this fleet's ORCH_STATE) in its
    environment, so an orch run from its tools knows who asked.
    """
    parent = os.environ.get("ORCH_AGENT")
    if parent in state["agents"] and parent != name \
            and os.environ.get("ORCH_STATE") == state_path():
        return parent
    return None


def finish_start(agent, first, verb):
    """Confirm a just-launched agent is running and has its first message; report it."""
    # channels, held messages, a limit to continue after
    ensure_watcher(held=bool(load_held(agent["name"])) or agent.get("on_limit") == "continue")
    code, words, hint = backend_of(agent).confirm_start(agent, first)
    print("%s agent %s%s" % (verb, agent["name"], words))
    if hint:
        print("  " + hint)
    return code


def headless_confirm_start(agent, first):
    """(exit code, what to say after "started agent NAME", a hint line or None)."""
    name = agent["name"]
    if headless_status(agent)["status"] == "exited":
        raise OrchError("agent %s exited at start, saying %s; see `orch tail %s`"
                        % (name, headless_exit_words(name), name))
    outcome = ", first message " + send_message(agent, first, raw=True) if first else ""
    return (EXIT_OK, " (claude, headless, session %s)%s" % (agent["session_id"], outcome),
            "follow: orch tail %s -f    talk: orch attach %s" % (name, name))


def tmux_confirm_start(agent, first):
    name = agent["name"]
    hint = "attach: orch attach %s    tail: orch tail %s" % (name, name)
    kind = kind_of(agent)
    if not kind.hooks:
        st = status_of(agent)
        if st["status"] == "exited":
            raise exited_at_start(agent, st)
        outcome = ""
        if first is not None:
            wait_for_screen(agent)
            outcome = ", first message " + send_message(agent, first, raw=True)
        return EXIT_OK, " (%s, tmux)%s" % (kind.label(agent), outcome), hint
    timeout = env_seconds("ORCH_START_TIMEOUT", 60)
    st = settle_start(agent, timeout)
    keys = at_first_screen(st) and kind.start_answer(agent, st)
    if keys:
        st = answer_at_start(agent, st, keys, timeout)
    if at_first_screen(st):
        return EXIT_NEEDS_INPUT, ", but it waits at %s%s" % (
            screen_advice(agent, st), kept_words(agent, first)), None
    if st["status"] == "starting":
        raise OrchError("agent %s is running but did not report ready within %gs; "
                        "look with `orch tail %s`" % (name, timeout, name), EXIT_UNCONFIRMED)
    outcome = ""
    if first is not None:
        drop_kept(name)     # typed now (or replaced): never again by approve or resume
        outcome = ", first message " + send_message(agent, first, raw=True)
    session = kind.session_id(agent) or "named at its first message"
    return EXIT_OK, " (%s, tmux, session %s)%s" % (kind.label(agent), session, outcome), hint


def answer_at_start(agent, st, keys, timeout):
    """Answer a first screen the kind knows the answer to (start_answer); then settle again."""
    kind = kind_of(agent)

    def shown(rows):
        found = kind.first_screen(rows)
        return found if found and found["needs"] == st["needs"] else None
    found = shown(agent_screen(agent))
    if found and not answer_dialog(agent, keys, found["question"], find=shown):
        raise OrchError("agent %s still shows %s after orch pressed %s: look with `orch tail %s`"
                        % (agent["name"], json.dumps(found["question"], ensure_ascii=False),
                           keys[-1], agent["name"]), EXIT_UNCONFIRMED)
    return settle_start(agent, timeout)


def kept_words(agent, first):
    """Keep the first message of an agent at a first screen; say where it goes."""
    name = agent["name"]
    if first is None:
        return ""
    keep_first(name, first)
    how = "`orch resume %s` types it" % name if not (kind_of(agent).first_screen(
        agent_screen(agent)) or {"keys": True})["keys"] else "`orch approve %s --choice N` types it once the " \
        "screen is answered (`orch send %s --kept` if you answer it yourself)" % (name, name)
    return "; its first message was not typed: orch keeps it, and %s" % how


class undo_on_failure(object):
    """Stop the agents in `started` if the command fails before their record is saved.

    Entered before the state lock, so it also covers a failed save: an agent
    left running without a record could never be found again.
    """

    def __init__(self, started, new):
        self.started = started
        self.new = new
        self.worktrees = []     # made for the new agent: removed with it

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            import shutil
            for agent in self.started:
                try:
                    stop_agent(agent, grace=0)
                    close_window(agent)
                except Exception:
                    pass    # the original failure is the one to report
                if self.new:    # no record will point at its folder
                    shutil.rmtree(agent_dir(agent["name"]), ignore_errors=True)
            for worktree in self.worktrees:
                undo_worktree(worktree)
        return False


def refuse_existing(state, name):
    agent = state["agents"].get(name)
    if agent is None:
        # Called under the state lock: what runs from this folder now has no record.
        folder = os.path.join(data_dir(), "agents")
        orphan = os.path.isdir(agent_dir(name)) and running_without_record(folder, {name})
        if orphan:
            raise OrchError(orphan_warning(name, orphan[name]))
        return
    if status_of(agent)["status"] == "exited":
        raise OrchError("agent %s already exists (exited): `orch resume %s` to continue it, "
                        "or `orch rm %s` first" % (name, name, name))
    raise OrchError("agent %s is already running: choose another name, or `orch rm %s` first"
                    % (name, name))


def reset_agent_dir(name):
    import shutil
    folder = agent_dir(name)
    shutil.rmtree(folder, ignore_errors=True)
    make_private_dir(folder)


def cmd_send(args):
    many = args.to is not None or args.all or args.idle
    if many and args.message is not None:
        raise OrchError("give the agents by name or with --to/--all/--idle, not both "
                        "(`orch send --to a,b MESSAGE`)", EXIT_USAGE)
    if [args.to is not None, args.all, args.idle].count(True) > 1:
        raise OrchError("choose one of --to, --all and --idle", EXIT_USAGE)
    if not many and args.name is None:
        raise OrchError("the following arguments are required: name", EXIT_USAGE)
    message = args.name if many else args.message
    ensure_watcher()        # a watcher that was killed comes back with the next message
    if args.kept:
        if many or message is not None:
            raise OrchError("--kept sends the first message orch kept for one agent: give "
                            "only its name", EXIT_USAGE)
        agent = find_agent(load_state(), check_name(args.name))
        print("%s: %s" % (agent["name"], send_kept(agent, args.timeout)))
        return EXIT_OK
    state = load_state()
    agents = chosen_agents(state, args) if many else [find_agent(state, check_name(args.name))]
    if many and (args.if_idle or args.wait or args.when_idle or args.cancel_held):
        raise OrchError("--if-idle, --when-idle, --cancel-held and --wait are for one agent: "
                        "`orch send NAME --wait MESSAGE`", EXIT_USAGE)
    if [args.if_idle, args.wait, args.when_idle, args.kept, args.cancel_held].count(True) > 1:
        raise OrchError("choose one of --if-idle, --when-idle, --wait, --kept and --cancel-held",
                        EXIT_USAGE)
    if args.cancel_held:
        if message is not None:
            raise OrchError("--cancel-held takes only the agent's name", EXIT_USAGE)
        agent = find_agent(load_state(), check_name(args.name))
        print("%s: dropped %d held messages" % (agent["name"], cancel_held(agent["name"])))
        return EXIT_OK
    text = read_text("-" if message in (None, "-") else message, what="message")
    if not text.strip():
        raise OrchError("empty message: nothing to send", EXIT_USAGE)
    if not many:
        return send_one(agents[0], text, args)
    if not agents:
        sys.stderr.write("orch: no %s agents: nothing sent\n" % ("idle" if args.idle else
                                                                 "running"))
        return EXIT_OK
    return send_to_many(agents, text, args.raw, args.force, args.timeout)


def send_one(agent, text, args):
    """send NAME: --if-idle refuses a busy agent; --wait prints the answer to this message."""
    name = agent["name"]
    if args.wait and not kind_of(agent).hooks:
        raise kind_of(agent).unsupported(agent, "reports no answers to wait for")
    if args.when_idle:
        return send_when_idle(agent, text, args)
    since = time.time()
    outcome = send_message(agent, text, raw=args.raw, force=args.force, timeout=args.timeout,
                           idle_only=args.if_idle)
    if not args.wait:
        print("%s: %s" % (name, outcome))
        return EXIT_OK
    sys.stderr.write("orch: note: %s: %s; waiting for the turn to end\n" % (name, outcome))
    return print_turn_reply(agent, since)


def send_when_idle(agent, text, args):
    """Submit now if the agent is idle, else hold the message for the watcher to type later."""
    name = agent["name"]
    if not load_held(name):     # held ones go first, in order
        try:
            print("%s: %s" % (name, send_message(agent, text, raw=args.raw, force=args.force,
                                                 timeout=args.timeout, idle_only=True)))
            return EXIT_OK
        except OrchError as e:
            if e.code not in (EXIT_NEEDS_INPUT, EXIT_NOT_RUNNING):
                raise       # typed, or something else went wrong: not for holding
    waiting = hold_message(agent, text, args.raw)
    ensure_watcher(held=True)
    running = status_of(agent)["status"] != "exited"
    print("%s: held (%d waiting%s)" % (name, waiting, "" if running else
                                       "; it is not running: `orch resume %s` delivers them"
                                       % name))
    return EXIT_OK


def print_turn_reply(agent, since):
    """Wait for the turn a message just started to end; print its answer (send --wait)."""
    name = agent["name"]

    def settled():
        st = status_of(agent)
        return st if st["status"] in ("needs-input", "exited") + READY else None
    st = retry_until(settled, 1e9, interval=0.25)
    if st["status"] == "exited":
        raise OrchError("agent %s exited before its turn ended (exit code %s)"
                        % (name, st["exit_code"]), EXIT_NOT_RUNNING)
    if st["status"] == "needs-input":
        raise OrchError("agent %s stopped before its turn ended: %s; answer it, then `orch "
                        "wait %s` and `orch reply %s`" % (name, wait_label(st), name, name),
                        EXIT_NEEDS_INPUT)
    if st.get("error"):
        raise OrchError("agent %s's turn ended on an error (%s: %s), not an answer; send the "
                        "message again to retry" % (name, st["error"],
                                                    shorten(st["detail"] or "", 200)),
                        EXIT_FAILED)

    def answered():
        found = last_reply(agent)
        return found if found and found["t"] >= since else None
    found = retry_until(answered, 10.0)
    if found is None:
        raise OrchError("agent %s is idle but wrote no answer to this message; `orch log %s` "
                        "shows the turn" % (name, name), EXIT_UNCONFIRMED)
    sys.stdout.write(found["text"] if found["text"].endswith("\n") else found["text"] + "\n")
    return EXIT_OK


def cmd_log(args):
    agent = find_agent(load_state(), check_name(args.name))
    path = conversation_path(agent)
    backend_of(agent).settle(agent, path)
    entries, offset = read_conversation(agent, path)
    print_entries(entries[-(args.lines or 40):], args.json)
    while args.follow:
        done = status_of(agent)["status"] == "exited"
        now = conversation_path(agent)
        if now != path and os.path.exists(now):
            path, offset = now, 0       # /clear started a new conversation: follow it
        entries, offset = read_conversation(agent, path, offset)
        print_entries(entries, args.json)
        if done:
            break
        time.sleep(0.5)
    return EXIT_OK


STATUS_ORDER = ("needs-input", "limited", "working", "starting", "idle", "exited")


def cmd_status_line(args):
    state, rows = listed_rows()
    counts = dict((status, 0) for status in STATUS_ORDER)
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    parts = ["%d %s" % (counts[s], s.replace("-", " ")) for s in STATUS_ORDER if counts[s]]
    failed = len([row for row in rows if row.get("error") and row["status"] != "limited"])
    if failed:
        parts.insert(0, "%d failed" % failed)
    peak = context_peak(rows)
    if parts:
        print("orch: " + " \u00b7 ".join(parts + ([peak] if peak else [])))
    return report_problems(state)


def context_peak(rows):
    """"ctx 87% api": the running agent that uses the most of its context window, or None.

    Only where the CLI tells the window: a count of tokens alone says not how near the end.
    """
    told = [row for row in rows if row["status"] != "exited" and row.get("context_used") is not None]
    if not told:
        return None
    top = max(told, key=lambda row: row["context_used"])
    return "ctx %s %s" % (context_label(top), top["name"])


def cmd_events(args):
    """Print status changes as they happen, until Ctrl-C.

    Each tick costs what `list` costs (one list-panes per tmux server and the
    status cache), whatever the number of agents.
    """
    wanted = [check_name(n) for n in args.names]
    state = load_state()
    for name in wanted:
        find_agent(state, name)
    report_problems(state)      # once: the feed goes on with the records it can read
    seen = None
    while True:
        agents = [a for a in state["agents"].values() if not wanted or a["name"] in wanted]
        now = statuses(agents)
        if seen is None:
            recent = [(st["since"] or 0, name) for name, st in now.items()
                      if args.since and (st["since"] or 0) >= time.time() - args.since]
            for _, name in sorted(recent):
                print_change(status_change(name, None, now[name], now[name]["since"]), args.json)
        else:
            for name in sorted(set(seen) | set(now)):
                change = status_change(name, seen.get(name), now.get(name))
                if change:
                    print_change(change, args.json)
        seen = now
        time.sleep(EVENTS_TICK)
        state = load_state()


EVENTS_TICK = 0.5       # seconds between two looks


def status_change(name, old, new, when=None):
    """The change between two status dicts (None: no record then), or None if none.

    A change of status or of what it needs; the detail (a tool's name) rides
    along.  With no old status (`--since`), "from" is None.
    """
    if old and new and (old["status"], old["needs"], old.get("error")) == (
            new["status"], new["needs"], new.get("error")):
        return None
    when = when or time.time()
    return {"t": round(when, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(when)), "name": name,
            "from": old["status"] if old else None,
            "to": new["status"] if new else "removed",
            "needs": new["needs"] if new else None, "detail": new["detail"] if new else None,
            "error": new.get("error") if new else None}


def print_change(change, as_json):
    if as_json:
        line = json.dumps(change, ensure_ascii=False)
    else:
        line = "%s  %s  %s \u2192 %s" % (change["time"][11:19], change["name"],
                                        change["from"] or "-", change["to"])
        line += "".join("  %s" % shorten(change[k], 200) for k in ("error", "needs", "detail")
                        if change[k])
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cmd_reply(args):
    agent = find_agent(load_state(), check_name(args.name))
    try:
        st = status_of(agent)
    except OrchError:
        st = None       # the answer is on file; only the note needs tmux
    if st and st.get("error"):
        # The last message was never answered: an older answer would be a lie.
        if args.json:
            print(json.dumps({"name": agent["name"], "reply": None, "error": st["error"],
                              "detail": st["detail"], "status": st["status"]}))
        else:
            sys.stderr.write("orch: error: agent %s's last turn failed (%s: %s): it has no "
                             "answer to it\n" % (agent["name"], st["error"],
                                                 shorten(st["detail"] or "", 200)))
        return EXIT_FAILED
    found = last_reply(agent)
    if found is None:
        raise OrchError("agent %s has not finished a turn yet: no answer to show; "
                        "`orch wait %s` first" % (agent["name"], agent["name"]), EXIT_NOT_RUNNING)
    status = st and st["status"]
    if args.json:
        print(json.dumps({"name": agent["name"], "reply": found["text"], "time": found["t"],
                          "status": status}))
        return EXIT_OK
    if status in ("working", "needs-input"):
        sys.stderr.write("orch: note: %s is %s: this is its answer to an earlier message\n"
                         % (agent["name"], status))
    sys.stdout.write(found["text"] if found["text"].endswith("\n") else found["text"] + "\n")
    return EXIT_OK


def new_rows(previous, rows):
    """Return the rows of a fresh capture that were not printed from the previous one."""
    for k in range(min(len(previous), len(rows)), 0, -1):
        if previous[-k:] == rows[:k]:       # the screen scrolled by len(rows) - k
            return rows[k:]
    seen = set(previous)
    return [row for row in rows if row not in seen]


def cmd_tail(args):
    agent = find_agent(load_state(), check_name(args.name))
    backend_of(agent).tail(agent, args.lines, args.follow, args.raw)
    return EXIT_OK


def tmux_tail(agent, lines, follow, raw=False):
    pane, socket = agent["tmux"]["pane"], agent["tmux"]["socket"]
    panes = pane_info(pane, socket)
    if pane_of(agent, panes) is None:
        raise OrchError("agent %s has no window any more (its tmux server or window is gone); "
                        "`orch resume %s` to start it again" % (agent["name"], agent["name"]),
                        EXIT_NOT_RUNNING)
    if panes[pane]["pane_dead"] == "1":
        # A dead pane's last output may have scrolled off when tmux drew its notice.
        rows = [r for r in capture_pane(pane, socket, lines=lines or 200)
                if not r.startswith("Pane is dead")]
        while rows and not rows[-1]:
            rows.pop()
        write_rows(rows[-(lines or 50):])
        return
    rows = capture_pane(pane, socket, lines=lines)
    if lines:
        rows = rows[-lines:]
    write_rows(rows)
    while follow and status_of(agent)["status"] != "exited":
        time.sleep(0.5)
        fresh = capture_pane(pane, socket, lines=lines)
        write_rows(new_rows(rows, fresh))
        rows = fresh


def write_rows(rows):
    if rows:
        sys.stdout.write("\n".join(rows) + "\n")
        sys.stdout.flush()


def cmd_attach(args):
    agent = find_agent(load_state(), check_name(args.name))
    return backend_of(agent).attach(agent)


def tmux_attach(agent):
    """Put this terminal on the agent's window (execs tmux: returns only by failing)."""
    info = agent["tmux"]
    if pane_of(agent, pane_info(info["pane"], info["socket"])) is None:
        raise OrchError("agent %s has no window any more: `orch resume %s` to start it again"
                        % (agent["name"], agent["name"]), EXIT_NOT_RUNNING)
    inside = os.environ.get("TMUX", "").split(",")[0]
    if inside and inside == socket_path(info["socket"]):
        argv = tmux_argv(info["socket"], ["switch-client", "-t", info["pane"]], utf8=False)
    else:
        # Two clients of one session share its current window; a grouped session
        # per attach lets two terminals each watch their own agent.
        # It must be created attached: destroy-unattached removes a detached one at once.
        group = "%s-%s-%d" % (info["session"], agent["name"], os.getpid())
        argv = tmux_argv(info["socket"], [
            "new-session", "-t", "=" + info["session"], "-s", group, ";",
            "set-option", "-t", "=%s:" % group, "destroy-unattached", "on", ";",
            "select-window", "-t", "=%s:%s" % (group, info["window"])], utf8=False)
        if inside:
            sys.stderr.write("orch: attaching inside your own tmux (nested): press your prefix "
                             "key twice to reach the agent's tmux\n")
    trace(argv)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, tmux_env())


def socket_path(socket):
    """Return the socket path tmux would use for this -L name / -S path / default."""
    if socket and "/" in socket:
        return os.path.abspath(socket)
    folder = os.environ.get("TMUX_TMPDIR") or "/tmp"
    return os.path.join(folder, "tmux-%d" % os.getuid(), socket or "default")


def age(seconds):
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def agent_row(agent, st, held=None):
    """The agent's `list` row; held: {name: messages held} if known (held_counts)."""
    since = st["since"]
    return {"name": agent["name"], "agent": kind_of(agent).name,
            "status": st["status"], "needs": st["needs"], "error": st.get("error"),
            "resets_at": iso_time(st.get("resets_at")),
            "status_since": since, "status_source": st["source"],
            "backend": agent.get("backend", "tmux"), "cwd": agent["cwd"],
            "session_id": st.get("session_id") or agent.get("session_id"),
            "created": agent.get("created"),
            "exit_code": st["exit_code"], "last_prompt": st["last_prompt"],
            "command": kind_of(agent).label(agent), "detail": st.get("detail"),
            "silent_for": st.get("silent"), "pid": st.get("pid"),
            "permission_mode": st.get("permission_mode"),
            "pane": (agent.get("tmux") or {}).get("pane"),
            "worktree": (agent.get("worktree") or {}).get("path"),
            "branch": (agent.get("worktree") or {}).get("branch"),
            "base": (agent.get("worktree") or {}).get("base"),
            "parent": agent.get("parent"), "stopped": bool(agent.get("stopped")),
            "pending": held_count(agent["name"]) if held is None else held.get(agent["name"], 0)}


def cmd_list(args):
    if args.watch:
        if args.json:
            raise OrchError("--watch redraws a table: use `orch events --json` for a feed",
                            EXIT_USAGE)
        return watch_list()
    if args.all_hosts:
        return list_all_hosts(args.json, args.sort)
    state, rows = listed_rows()
    if args.sort:
        rows = sorted_rows(rows, args.sort)
    if args.json:
        # Only worktree agents cost a `git status`, all of them run at once.
        dirty = worktree_dirty([a for a in state["agents"].values() if a.get("worktree")])
        for row in rows:
            row["dirty"] = dirty.get(row["name"])
        print_json_array(rows)
        return report_problems(state)
    if not rows:
        if not state.get("invalid"):
            print("no agents: start one with `orch spawn NAME \"task\"`")
        return report_problems(state)
    write_rows(table_lines(rows, tree=not args.sort))
    return report_problems(state)


def list_all_hosts(as_json, sort=None):
    hosts = known_hosts()
    if not hosts:
        raise OrchError("no hosts to list: set ORCH_HOSTS=a,b,c or write them in %s, one per "
                        "line" % hosts_file())
    state, rows, errors = all_hosts_rows(hosts)
    if sort:
        rows = sorted_rows(rows, sort)
    if as_json:
        print_json_array(rows)
    elif rows:
        write_rows(table_lines(rows, hosts=True, tree=not sort))
    for error in errors:
        sys.stderr.write("orch: error: %s\n" % error)
    return max(report_problems(state), EXIT_ERROR if errors else EXIT_OK)


def listed_rows():
    """The state and one `list` row per agent, oldest first, with what each has used."""
    state = load_state()
    agents = sorted(state["agents"].values(), key=lambda a: a["created"])
    cache = StatusCache()
    early = {}

    def meanwhile():    # what needs no pane, while tmux lists them: the /proc pass is ~6 ms
        early.update(table=process_table(), held=held_counts([a["name"] for a in agents]))
    found = statuses(agents, cache=cache, meanwhile=meanwhile)
    rows = [agent_row(a, found[a["name"]], early["held"]) for a in agents]
    add_usage(agents, rows, cache, early["table"])
    return state, rows


def tree_order(rows):
    """[(row, depth)]: each agent's children right under it (oldest first), as `ps f`.

    A child whose parent is not listed (removed, or on another host) is a
    root; so is each agent of a loop of stale names.
    """
    def key(row, name):
        return (row.get("host"), name)
    listed = set(key(row, row["name"]) for row in rows)
    children, roots = {}, []
    for row in rows:
        parent = key(row, row.get("parent"))
        if parent in listed and row.get("parent") != row["name"]:
            children.setdefault(parent, []).append(row)
        else:
            roots.append(row)
    ordered, seen = [], set()
    for top in roots + rows:        # rows again: agents only a loop reaches
        stack = [(top, 0)]
        while stack:
            row, depth = stack.pop()
            if key(row, row["name"]) in seen:
                continue
            seen.add(key(row, row["name"]))
            ordered.append((row, depth))
            stack.extend((child, depth + 1) for child in
                         reversed(children.get(key(row, row["name"]), [])))
    return ordered


def tree_name(name, depth):
    return "    " * (depth - 1) + " \\_ " + name if depth else name


def table_lines(rows, mark=False, hosts=False, tree=True):
    """The `list` table; with mark, a "!" column flags agents that need input.

    tree: children under their parent, indented; else rows as given.
    """
    now = time.time()
    placed = tree_order(rows) if tree else [(row, 0) for row in rows]
    rows = [row for row, _ in placed]
    branches = any(row.get("branch") for row in rows)     # a column only when someone has one
    costs = any(row.get("cost_usd") is not None for row in rows)
    table = [(("HOST",) if hosts else ()) + ("NAME", "STATUS", "FOR", "AGE", "AGENT", "MODE",
                                             "SESSION")
             + (("BRANCH",) if branches else ()) + ("CTX",) + (("COST",) if costs else ())
             + ("RSS", "CWD", "LAST PROMPT")]
    for row, depth in placed:
        table.append(((row.get("host") or "local",) if hosts else ())
                     + (tree_name(row["name"], depth), status_label(row),
                        age(now - row["status_since"]) if row["status_since"] else "-",
                        age(now - (row["created"] or now)),
                        "%s/%s" % (row.get("agent") or "claude", row["backend"]), mode_label(row),
                        (row["session_id"] or "-")[:8])
                     + ((row.get("branch") or "-",) if branches else ())
                     + (context_label(row),) + ((cost_label(row),) if costs else ())
                     + (size_label(row.get("rss_bytes")),
                        short_path(row["cwd"]), shorten(row["last_prompt"] or "", 40)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in table]
    if mark:
        lines = ["  " + lines[0]] + [("! " if row["status"] == "needs-input" else "  ") + line
                                     for row, line in zip(rows, lines[1:])]
    return lines


def context_label(row):
    """"62%" of the context window, or its tokens ("45k") where the window is not known."""
    if row.get("context_used") is not None:
        return "%d%%" % round(100 * row["context_used"])
    tokens = row.get("context_tokens")
    if not tokens:
        return "-"
    return "%d" % tokens if tokens < 1000 else "%dk" % (tokens // 1000) if tokens < 10 ** 6 \
        else "%.1fM" % (tokens / 1e6)


def cost_label(row):
    return "-" if row.get("cost_usd") is None else "$%.2f" % row["cost_usd"]


def size_label(size):
    if size is None:
        return "-"
    return "%dM" % (size >> 20) if size < 10 << 30 else "%.1fG" % (size / float(1 << 30))


SORT_KEYS = {"ctx": lambda row: row.get("context_used") if row.get("context_used") is not None
             else (row.get("context_tokens") or 0) / 1e9,      # a known share, then tokens
             "cost": lambda row: row.get("cost_usd"), "rss": lambda row: row.get("rss_bytes")}


def sorted_rows(rows, key):
    """Rows by --sort, most first; those that do not say last, oldest first among them."""
    value = SORT_KEYS[key]
    return sorted(rows, key=lambda row: (value(row) is None, -(value(row) or 0)))


def watch_list(interval=2.0):
    """Redraw the table in place until Ctrl-C; agents that need input first."""
    import shutil
    if not sys.stdout.isatty():
        raise OrchError("--watch redraws a terminal, and stdout is not one: use `orch list` "
                        "(once) or `orch events` (a feed)", EXIT_USAGE)
    while True:
        rows = sorted(listed_rows()[1], key=lambda r: r["status"] != "needs-input")
        waiting = len([r for r in rows if r["status"] == "needs-input"])
        head = "orch list --watch  %s  %d agents, %d need input  (Ctrl-C to stop)" % (
            time.strftime("%H:%M:%S"), len(rows), waiting)
        body = table_lines(rows, mark=True, tree=False) if rows else ["no agents"]
        width, height = shutil.get_terminal_size()
        lines = [head, ""] + body
        if len(lines) > height - 1:
            more = len(lines) - (height - 2)
            lines = lines[:height - 2] + ["... %d more: make the window taller" % more]
        # Home, redraw each line cut to the width, clear what is left: no flicker.
        sys.stdout.write("\x1b[H" + "".join("%s\x1b[K\n" % l[:width] for l in lines) + "\x1b[J")
        sys.stdout.flush()
        time.sleep(interval)


def print_json_array(items):
    """Print a JSON array one compact object per line.

    json.dumps(indent=...) drops to Python's slow encoder: for 300 agents
    that was a third of `list --json`'s own time.
    """
    print("[" + ",\n ".join(json.dumps(item) for item in items) + "]")


def report_problems(state):
    """One line per orphan and per record that could not be read; exit 1 if a record."""
    for name, where in sorted(find_orphans(state).items()):
        sys.stderr.write("orch: warning: %s\n" % orphan_warning(name, where))
    for problem in sorted(state.get("invalid", {}).values()):
        sys.stderr.write("orch: error: %s: fix or remove that record by hand\n" % problem)
    return EXIT_ERROR if state.get("invalid") else EXIT_OK


def status_label(row):
    label = row["status"]
    if label == "limited":
        return limit_label(row) + (" (%d held)" % row["pending"] if row.get("pending") else "")
    if row.get("error"):
        return label + " (failed: %s)" % row["error"]      # the CLI's own word for it
    if row["needs"] in SCREEN_TITLES and row.get("detail"):     # what it asks, in its words
        label += " (%s: %s)" % (row["needs"], shorten(row["detail"], 40))
    elif row["needs"]:
        label += " (%s)" % row["needs"]
    if row["status"] == "exited" and row["exit_code"] is not None:
        label += " (%s)" % row["exit_code"]
    if row.get("silent_for"):
        label += " (silent %s)" % age(row["silent_for"])
    if (row.get("detail") or "").startswith("denied"):
        label += " (%s)" % row["detail"]
    if row["status_source"] == "activity" and row["status"] != "exited":
        label += "?"        # guessed from screen activity: the program has no hooks
    if row.get("pending"):
        label += " (%d held)" % row["pending"]
    return label


# The mode in which claude asks before each risky tool: "default" in hook
# events on every version, called "manual" on the command line of 2.1.330+.
ASK_FIRST_MODES = ("default", "manual")


def mode_label(row):
    """'-' for an agent that asks before risky tools, '?' when not known yet, else the mode."""
    mode = row["permission_mode"]
    if mode is None:
        return "?" if row["command"] == "claude" and row["status"] != "exited" else "-"
    return "-" if mode in ASK_FIRST_MODES else mode


def short_path(path):
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if path == home or path.startswith(home + "/") else path


def shorten(text, n):
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def stop_agent(agent, grace=None):
    """Stop a running agent: SIGTERM to its process group, SIGKILL after a grace period."""
    grace = grace if grace is not None else env_seconds("ORCH_KILL_GRACE", 5)
    return backend_of(agent).stop(agent, grace)


def tmux_stop(agent, grace):
    import signal
    if status_of(agent)["status"] == "exited":
        return False
    pid = agent["tmux"]["pid"]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        signal_process(pid, sig)
        if retry_until(lambda: status_of(agent)["status"] == "exited", wait):
            # gemini's second process outlives its first by seconds, still writing the
            # session a resume would read: stopped means the whole group is gone.
            if not retry_until(lambda: not group_alive(pid), wait):
                signal_process(pid, signal.SIGKILL)
            return True
    raise OrchError("agent %s (pid %d) did not stop even after SIGKILL" % (agent["name"], pid))


def cmd_kill(args):
    name = check_name(args.name)
    find_agent(load_state(), name)
    if args.tree:
        return stop_tree(name, kill_one)
    code = kill_one(name)
    state = load_state()
    left = [n for n in descendants(state, name) if n in running_names(state)]
    if left:
        print("  still running below it: %s (`orch kill --tree %s` stops them too)"
              % (", ".join(left), name))
    return code


def kill_one(name, say=True):
    """Stop one agent for good: `resume --all` leaves it stopped.  Say so in one line."""
    status_of(find_agent(load_state(), name))      # tmux answers: else nothing is marked
    with LockedState() as state:
        agent = find_agent(state, name)
        # Marked first: a `resume --all` running meanwhile must not bring it back.
        before = agent.get("stopped")
        agent["stopped"] = time.time()
    try:
        stopped = stop_agent(agent)
    except BaseException:
        with LockedState() as state:    # not stopped after all: as it was
            if name in state["agents"]:
                state["agents"][name]["stopped"] = before
                if before is None:
                    del state["agents"][name]["stopped"]
        raise
    if say:
        print("%s: %s (exit code %s)" % (name, "killed" if stopped else "already exited",
                                         status_of(agent)["exit_code"]))
    return EXIT_OK


def descendants(state, name):
    """The agents below name (children, their children...), parents before children."""
    found, todo = [], [name]
    agents = sorted(state["agents"].values(), key=lambda a: a["created"])
    while todo:
        parent = todo.pop(0)
        for agent in agents:
            child = agent["name"]
            if agent.get("parent") == parent and child != name and child not in found:
                found.append(child)
                todo.append(child)
    return found


def running_names(state):
    found = statuses(list(state["agents"].values()))
    return set(n for n, st in found.items() if st["status"] != "exited")


def stop_tree(name, stop):
    """Call stop(NAME) for name, then for each agent below it, one by one; return the worst code.

    The top first, so it starts no more; then what is below it, looked for
    again after each, so a child started meanwhile is not missed.
    """
    done, worst = [], EXIT_OK
    todo = [name]
    while todo:
        for one in todo:
            done.append(one)
            try:
                worst = worse(stop(one), worst)
            except OrchError as e:      # one agent's failure never stops the others
                sys.stderr.write("orch: error: %s\n" % e)
                worst = worse(e.code, worst)
        todo = [n for n in descendants(load_state(), name) if n not in done]
    return worst


def cmd_rm(args):
    state = load_state()
    orphans = {}
    if args.exited:
        found = statuses(list(state["agents"].values()))
        names = [n for n, st in found.items() if st["status"] == "exited"]
    elif args.names:
        names = [check_name(n) for n in args.names]
        if set(names) - set(state["agents"]):
            orphans = find_orphans(state)
        for name in names:
            if name not in orphans:
                find_agent(state, name)
    else:
        raise OrchError("name the agents to remove, or pass --exited", EXIT_USAGE)
    worst = EXIT_OK
    if args.tree:
        # Stop each whole tree first (a parent could start more while its children go).
        tree = []
        for name in names:
            if name not in orphans and name not in tree:
                worst = worse(stop_tree(name, lambda one: kill_one(one, say=False)), worst)
                tree += [name] + [n for n in descendants(load_state(), name) if n not in tree]
        names = tree + [n for n in names if n in orphans]
    for name in names:
        if name in orphans:
            stop_orphan(name, orphans[name])
            print("removed %s (it ran without a record)" % name)
            continue
        try:
            kept, children = remove_agent(load_state()["agents"][name], args.force,
                                          args.delete_branch)
        except OrchError as e:      # one agent's refusal never stops the others
            sys.stderr.write("orch: error: %s\n" % e)
            worst = worse(e.code, worst)
            continue
        except KeyError:
            continue        # removed meanwhile (by another orch)
        print("removed %s%s" % (name, " (%s)" % kept if kept else ""))
        children = [n for n in children if n not in names]
        if children:
            print("  %s had %s as parent and stay%s, now without one (`rm --tree` removes "
                  "them too)" % (", ".join(children), name, "s" if len(children) == 1 else ""))
    return worst


def remove_agent(agent, force=False, delete_branch=False):
    """Stop the agent and forget it; return (what was kept, in words or None, its children).

    A worktree is checked before the agent is stopped (a refusal leaves it
    running) and again after (it may have written until the end).
    """
    import shutil
    name = agent["name"]
    if agent.get("worktree"):
        refusal = rm_refusal(agent, force, delete_branch)
        if refusal:
            raise OrchError(refusal)
    stop_agent(agent)
    close_window(agent)
    kept = None
    if agent.get("worktree"):
        refusal = rm_refusal(agent, force, delete_branch)
        if refusal:
            raise OrchError("stopped %s but kept it: %s" % (name, refusal))
        kept = remove_worktree(agent, force, delete_branch)
    with LockedState() as locked:
        locked["agents"].pop(name, None)
        # Its children stay, as top-level agents: a name reused later is not their parent.
        children = []
        for child in locked["agents"].values():
            if child.get("parent") == name:
                child["parent"] = None
                children.append(child["name"])
    shutil.rmtree(agent_dir(name), ignore_errors=True)
    return kept, children


def close_window(agent):
    info = agent.get("tmux") or {}
    if not info:
        return
    if pane_of(agent, pane_info(info["pane"], info.get("socket"))) is None:
        return
    try:
        tmux(["kill-pane", "-t", info["pane"]], socket=info["socket"])
    except TmuxError as e:
        if not (e.target_gone() or e.server_gone()):
            raise


def cmd_wait(args):
    names = [check_name(n) for n in args.names]
    if args.all == bool(names):
        raise OrchError("name the agents to wait for, or pass --all" if not names else
                        "give agent names or --all, not both", EXIT_USAGE)
    state = load_state()
    agents = [find_agent(state, n) for n in names]
    if args.all:
        every = sorted(state["agents"].values(), key=lambda a: a["created"])
        found = statuses(every)
        agents = [a for a in every if found[a["name"]]["status"] != "exited"]
        if not agents:
            print("no running agents")
            return EXIT_OK
        names = [a["name"] for a in agents]
    goals = {"idle": READY, "exited": ("exited",), "needs-input": ("needs-input",),
             None: READY + ("exited", "needs-input")}[args.until]
    found = {}

    def settled():
        return [n for n in names if found[n]["status"] in goals]

    def reached():
        found.update(statuses(agents))
        return settled() if args.any else len(settled()) == len(names)
    done = retry_until(reached, args.timeout if args.timeout is not None else 1e9, interval=0.25)
    if args.any and done:
        # The one that settled first; the order given breaks a tie.
        names = [min(done, key=lambda n: (found[n]["since"] or 0, names.index(n)))]
    for name in names:
        print("%s: %s" % (name, wait_label(found[name])))
    if not done:
        raise OrchError("timed out after %gs waiting for %s%s" % (
            args.timeout, "any of " if args.any else "", " ".join(names)), EXIT_TIMEOUT)
    failed = [n for n in names if found[n].get("error")]
    if failed and found[failed[0]]["status"] == "limited":
        st = found[failed[0]]
        raise OrchError("%s: a usage limit ended the last turn (%s), not done: send the message "
                        "again once it resets, or resume with --on-limit continue" % (
                            failed[0], shorten(st["detail"] or st["error"], 120)), EXIT_FAILED)
    if failed:
        raise OrchError("%s: the last turn ended on an error (%s), not done: `orch log %s` "
                        "shows it; send the message again to retry" % (
                            failed[0], shorten(found[failed[0]]["detail"] or
                                               found[failed[0]]["error"], 120), failed[0]),
                        EXIT_FAILED)
    return EXIT_OK


def wait_label(st):
    return status_label({"status": st["status"], "needs": st["needs"],
                         "exit_code": st["exit_code"], "detail": st["detail"],
                         "status_source": st["source"], "error": st.get("error"),
                         "resets_at": st.get("resets_at")})


def cmd_interrupt(args):
    agent = find_agent(load_state(), check_name(args.name))
    st = status_of(agent)
    if st["status"] == "exited":
        raise OrchError("agent %s is not running" % agent["name"], EXIT_NOT_RUNNING)
    backend_of(agent).interrupt(agent, st)
    print("%s: interrupt sent (was %s)" % (agent["name"], st["status"]))
    return EXIT_OK


def tmux_interrupt(agent, st):
    # Escape stops claude's turn, or cancels a dialog: never Enter, which approves.
    for n, key in enumerate(kind_of(agent).interrupt_keys(st)):
        if n:
            time.sleep(0.3)     # one read holding two Escapes is no two presses (opencode)
        tmux(["send-keys", "-t", agent["tmux"]["pane"], key], socket=agent["tmux"]["socket"])
    if kind_of(agent).hooks and st["status"] == "working" and st["last_prompt"]:
        clear_restored_prompt(agent, st["last_prompt"])


def clear_restored_prompt(agent, prompt):
    """Empty the input box of the prompt claude puts back there when a turn is interrupted.

    Measured on 2.1.197 and 2.1.330: after Escape the interrupted prompt is in
    the box again, and the next message would be sent glued to it.  Only that
    text is cleared; anything else in the box is a person's and stays.
    """
    wanted = normalize_prompt(prompt)
    typed = normalize_prompt(retry_until(lambda: typed_text(agent), 2.0) or "")
    if typed and (wanted.startswith(typed) or typed.startswith(wanted)):
        clear_input_box(agent)


def cmd_supervise(args):
    return supervise(args.folder)


def latest_session_id(agent):
    """The session id claude last reported (it changes on /clear), else the one from spawn."""
    return backend_of(agent).session_id(agent)


def hooked_session_id(agent):
    """The session id of the latest SessionStart hook (a tmux claude), else the one from spawn."""
    sid = agent.get("session_id")
    for event in read_events(agent["name"]):
        if event.get("event") == "SessionStart" and event.get("session_id"):
            sid = event["session_id"]
    return sid


def cmd_resume(args):
    if args.all:
        if args.name is not None or args.message is not None:
            raise OrchError("resume --all takes no name or message: it continues each "
                            "agent where it was", EXIT_USAGE)
        return resume_all_hosts(args) if args.all_hosts else resume_all(args)
    if args.all_hosts:
        raise OrchError("--all-hosts is for resume --all", EXIT_USAGE)
    if args.name is None:
        raise OrchError("name the agent to resume, or pass --all", EXIT_USAGE)
    name = check_name(args.name)
    message = read_text(args.message, what="message")
    if message is not None:
        message = escape_leading(message)
    else:
        message = kept_first(name)      # spawn's first message, never typed: a first screen
    agent = resume_start(name, message, args)
    return finish_start(agent, message, "resumed")


def resume_start(name, message, args, unless_running=False):
    """Start an exited agent again in its own session (under the state lock); return it.

    unless_running: return None for one that runs (another orch resumed it first).
    """
    started = []
    with undo_on_failure(started, new=False), LockedState() as state:
        agent = find_agent(state, name)
        backend_of(agent).preflight(agent["cwd"])
        kind_of(agent).preflight(agent["cwd"], agent["backend"])
        if status_of(agent)["status"] != "exited":
            if unless_running:
                return None
            raise OrchError("agent %s is still running: `orch send %s MESSAGE` to talk to it, "
                            "or `orch kill %s` first" % (name, name, name))
        if agent.get("worktree"):
            worktree_git_dir(agent)
        if not os.path.isdir(agent["cwd"]):
            raise OrchError("agent %s's working folder %s is gone: create it again, or `orch rm "
                            "%s`" % (name, agent["cwd"], name))
        close_window(agent)
        kind = kind_of(agent)
        fresh = never_began(agent)
        agent["session_id"] = kind.new_session_id() if fresh else kind.session_id(agent)
        program = kind.program(args, agent)
        backend_of(agent).start(agent, program, message,
                                resume_id=None if fresh else agent["session_id"])
        started.append(agent)
        agent["resumed"] = agent.get("resumed", 0) + 1
        agent.pop("stopped", None)
        if getattr(args, "on_limit", None):     # resume --all keeps each agent's own
            agent["on_limit"] = args.on_limit
    return agent


def never_began(agent):
    """True when the agent's session never began: nothing to resume, so start it afresh.

    Its first message still kept (a first-run screen stopped it), or no hook
    ever fired: claude keeps no conversation to `--resume` before one.
    """
    if kept_first(agent["name"]) is not None:
        return True
    if agent.get("backend", "tmux") != "tmux" or not kind_of(agent).hooks:
        return False    # no hooks to tell: its own session id says it all
    return not any(e.get("event") in ("SessionStart", "UserPromptSubmit")
                   for e in read_events(agent["name"]))


# ###########################################################################
# Fleets: back after a reboot
# ###########################################################################

# `resume --all` brings back every agent whose process is gone although
# nobody ended it on purpose: busy or idle when it died, each in its own
# session.  Not those stopped with `orch kill` (their record says so), nor
# those that ended their own session (/exit: an exit code 0 on a window
# still there, or the CLI's own session-end hook saying why).  They start a
# --stagger apart and while memory is short they wait; each is confirmed
# once all are started, so the whole fleet boots in parallel.

def resume_all_hosts(args):
    """resume --all here and on every known host at once; a host's agents read NAME@HOST."""
    hosts = known_hosts()
    if not hosts:
        raise OrchError("no hosts to resume on: set ORCH_HOSTS=a,b,c or write them in %s, "
                        "one per line" % hosts_file())
    argv = ["resume", "--all", "--stagger", "%g" % args.stagger, "--min-free",
            str(args.min_free)]
    results = {}

    def run(host):
        results[host] = run_captured(host, argv)
    in_parallel(run, [None] + hosts)
    worst = EXIT_OK
    for host in [None] + hosts:
        code, out, err = results[host]
        for line in out.splitlines():
            name, colon, rest = line.partition(": ")
            if host:
                line = "%s@%s: %s" % (name, host, rest) if colon else "%s: %s" % (host, line)
            print(line)
        for line in err.splitlines():
            sys.stderr.write(line.replace("orch: error: ", "orch: error: %s: " % host, 1)
                             if host else line)
            sys.stderr.write("\n")
        worst = worse(code, worst)
    return worst


def resume_all(args):
    state = load_state()
    agents = sorted(state["agents"].values(), key=lambda a: a["created"])
    found = statuses(agents)
    worst, started = EXIT_OK, []
    for agent in agents:
        name = agent["name"]
        reason = left_as_it_is(agent, found[name])
        if reason:
            print("%s: %s" % (name, reason))
            continue
        try:
            if started:
                time.sleep(args.stagger)
            wait_for_memory(args.min_free, name)
            agent = resume_start(name, kept_first(name), args, unless_running=True)
            if agent is None:
                print("%s: running (resumed meanwhile by another orch), left as it is" % name)
                continue
            started.append(agent)
        except OrchError as e:      # one agent that cannot come back never stops the others
            sys.stderr.write("orch: error: %s\n" % e)
            worst = worse(e.code, worst)
    if started:
        ensure_watcher(held=any(load_held(a["name"]) or a.get("on_limit") == "continue"
                                for a in started))
    for agent in started:
        try:
            code, words, _ = backend_of(agent).confirm_start(agent, kept_first(agent["name"]))
            print("%s: resumed%s" % (agent["name"], words))
            worst = worse(code, worst)
        except OrchError as e:
            sys.stderr.write("orch: error: %s\n" % e)
            worst = worse(e.code, worst)
    if not agents:
        print("no agents to resume")
    return worst


def left_as_it_is(agent, st):
    """Why `resume --all` leaves this agent alone, or None to resume it."""
    if st["status"] != "exited":
        return "running (%s), left as it is" % status_label(agent_row(agent, st))
    if agent.get("stopped"):
        return "stopped with `orch kill`, left stopped (`orch resume %s` starts it)" \
            % agent["name"]
    quit = kind_of(agent).ended_itself(agent, st)
    if quit:
        return "ended its own session (%s), left ended (`orch resume %s` starts it)" \
            % (quit, agent["name"])
    return None


def memory_available():
    """(MiB available, MiB total) from /proc/meminfo, or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return (int(fields["MemAvailable"].split()[0]) // 1024,
                int(fields["MemTotal"].split()[0]) // 1024)
    except (OSError, KeyError, ValueError):
        return None


def short_of_memory(kind):
    """Say so (a note, not a refusal) when one more agent of kind would not fit in memory."""
    found = memory_available()
    if found and kind.START_MIB and found[0] < kind.START_MIB:
        sys.stderr.write("orch: note: only %d MiB of memory available; a %s agent holds about "
                         "%d MiB once started, more as it works\n"
                         % (found[0], kind.name, kind.START_MIB))


def check_memory():
    """Available memory against what one more agent of each kind holds at start."""
    found = memory_available()
    if found is None:
        return [finding("ok", "memory", "unknown here (no /proc/meminfo)")]
    kinds = [k for k in KINDS.values() if k.START_MIB]
    room = ", ".join("%s ~%d MiB" % (k.name, k.START_MIB) for k in kinds)
    tight = [k.name for k in kinds if found[0] < k.START_MIB]
    if tight:
        return [finding("warning", "memory", "%d of %d MiB available: not enough for one more "
                        "%s agent (at start: %s, more as they work)" % (
                            found[0], found[1], " or ".join(tight), room))]
    return [finding("ok", "memory", "%d of %d MiB available (an agent at start: %s)"
                    % (found[0], found[1], room))]


def wait_for_memory(floor, name):
    """Wait (up to ORCH_MEMORY_WAIT s) while less than floor MiB of memory is available."""
    found = memory_available()
    if not floor or found is None or found[0] >= floor:
        return
    patience = env_seconds("ORCH_MEMORY_WAIT", 120)
    print("(only %d MiB of memory available, waiting up to %gs for %d MiB)"
          % (found[0], patience, floor))
    sys.stdout.flush()
    if retry_until(lambda: (memory_available() or (floor, 0))[0] >= floor, patience, 1):
        return
    raise OrchError("agent %s not resumed: only %d MiB of memory available after %gs, and "
                    "--min-free is %d MiB" % (name, (memory_available() or (0, 0))[0], patience,
                                             floor))


# ###########################################################################
# Limits and usage: a fleet through the night
# ###########################################################################
#
# A usage limit ends a turn on an error, like a 429, but it says when it
# lifts: such an agent is `limited` with `resets_at`.  Each kind reads its own
# CLI's records for it (claude's transcript and its words, codex's rollout).
# With --on-limit continue the watcher holds one short message for the agent
# a minute after the reset, typed as held messages are: once per limit.
# Tokens, context and cost come from the same records, read incrementally by
# `list` (UsageCache); memory from /proc, in one pass for every agent.

CONTINUE_MESSAGE = ("The usage limit has reset. Continue the task you were working on; do not "
                    "repeat work that is already done.")
READY = ("idle", "limited")     # statuses whose input box takes a message now
OWN_CONTINUE_PATIENCE = 5       # margins to wait for a CLI that continues by itself


def limit_margin():
    """Seconds after a limit's reset before --on-limit continue types (a clock may be early)."""
    return env_seconds("ORCH_LIMIT_MARGIN", 60)


# "resets 9:18pm (UTC)", "resets Dec 5, 3pm (UTC)": claude's words for a limit's end.
RESETS_WORDS = (r"resets (?:([A-Z][a-z]{2}) (\d{1,2}),? )?(\d{1,2})(?::(\d\d))?\s*"
                r"([ap]m)\s*\(([^)]+)\)")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def reset_from_words(text, after):
    """The epoch time claude's words name for a limit's reset (the next one after `after`), or None."""
    found = re.search(RESETS_WORDS, text or "")
    if not found:
        return None
    month, day, hour, minute, half, zone = found.groups()
    hour = int(hour) % 12 + (12 if half == "pm" else 0)
    date = (MONTHS.index(month) + 1, int(day)) if month in MONTHS else None
    return clock_time(hour, int(minute or 0), zone, after, date)


def clock_time(hour, minute, zone, after, date=None):
    """The epoch time of the next hour:minute (on date) in zone from `after` on, or None.

    Only in UTC or this machine's own zone, which orch can convert with no
    time-zone database (Python 3.6 has none).
    """
    import calendar
    if zone in ("UTC", "GMT"):
        to_epoch, parts = calendar.timegm, time.gmtime(after)
    elif zone in time.tzname or zone == os.environ.get("TZ"):
        to_epoch, parts = time.mktime, time.localtime(after)
    else:
        return None
    return next_time(to_epoch, parts, hour, minute, after, date)


def next_time(to_epoch, parts, hour, minute, after, date=None):
    """The first hour:minute (on date, (month, day), if given) from `after` on, a minute's slack.

    parts: `after` as to_epoch's clock reads it.  Said before midnight of a
    reset after it, it is the next day's; said in December of one in January,
    the next year's.
    """
    mon, mday = date or (parts.tm_mon, parts.tm_mday)
    when = to_epoch((parts.tm_year, mon, mday, hour, minute, 0, 0, 0, -1))
    if when >= after - 60:
        return when
    return to_epoch((parts.tm_year + 1, mon, mday, hour, minute, 0, 0, 0, -1)) if date \
        else when + 86400


# Claude's words when a turn ends on a usage limit, not a passing 429 (2.1.197-2.1.332).
LIMIT_WORDS = (r"You[\u2019']ve (?:hit|reached) your .*limit|[Uu]sage limit reached|"
               r"out of usage")


RETRY_LOOK = 2.0   # seconds a working agent's hooks are silent before orch reads its screen


def silent_at_work(result, read_screen):
    """Working, its hooks silent RETRY_LOOK s, a screen to read: a retry or a limit box may be up."""
    return result["status"] == "working" and read_screen and \
        time.time() - (result["since"] or 0) > RETRY_LOOK


def claude_retrying(rows):
    """"retrying: 429 …, attempt 3/10" from claude's spinner line, or None.

    2.1.332: "✻ 429 This request would exceed your rate limit · retrying in 1s ·
    attempt 3/10"; 2.1.197: "✻ API error · Retrying in 2s · attempt 3/4".
    """
    for row in reversed(rows[-20:]):
        found = re.search(r"(\w[^\u00b7]*?) \u00b7 retrying in \d+s \u00b7 attempt (\d+/\d+)",
                          row, re.I)
        if found:
            return "retrying: %s, attempt %s" % found.groups()
    return None


def claude_usage_limit(agent, result):
    """{resets_at} when a usage limit ended claude's last turn, else None.

    2.1.332 records the limit in its transcript (apiError usage_limit_reached,
    quotaLimits.resetsAt); 2.1.197 only says it: "You've hit your session
    limit \u00b7 resets 9:17pm (UTC)", which its StopFailure hook carries.
    """
    if result["error"] != "rate_limit":
        return None
    entries = read_json_lines(transcript_path(agent), tail_bytes=32768)
    for i in range(len(entries) - 1, -1, -1):
        entry = entries[i]
        if entry.get("type") == "assistant" and entry.get("isApiErrorMessage"):
            quota = entry.get("quotaLimits") or {}
            if entry.get("apiError") == "usage_limit_reached" and isinstance(
                    quota.get("resetsAt"), (int, float)):
                return {"resets_at": quota["resetsAt"],
                        "continues_itself": continues_itself(entries[i + 1:])}
            break
    if not re.search(LIMIT_WORDS, result["detail"] or ""):
        return None
    told = claude_status_line(agent).get("limit_resets")
    if told:        # what claude told orch's statusLine, where the user has one
        return {"resets_at": told, "continues_itself": False}
    # Said to the minute: the limit may last to that minute's end.
    said = reset_from_words(result["detail"], result.get("failed") or time.time())
    return {"resets_at": said and said + 60, "continues_itself": False}


def continues_itself(entries):
    """Whether claude said it will continue by itself once the limit resets (2.1.332 does).

    It says "Usage limit reached \u00b7 set to continue automatically at 9:16pm" and
    continues 1-2 minutes after the reset (85 s measured), unless it says it stopped.
    """
    said = False
    for entry in entries:
        words = entry.get("content") if entry.get("type") == "system" else None
        if isinstance(words, str):
            if "continue automatically" in words:
                said = True
            elif "continue stopped" in words:
                said = False
    return said


def limit_label(row):
    """"limited until 21:18" (local time), "limited (reset 21:18)" once past, or with its error."""
    when = epoch_of(row.get("resets_at"))
    if not when:
        return "limited (%s)" % (row.get("error") or "no reset time given")
    clock = time.strftime("%H:%M" if time.localtime(when)[:3] == time.localtime()[:3]
                          else "%b %d %H:%M", time.localtime(when))
    return "limited until %s" % clock if when > time.time() else "limited (reset %s)" % clock


def epoch_of(value):
    """Seconds since the epoch from one (kept as is) or from iso_time()'s form."""
    import calendar
    if isinstance(value, (int, float)) or value is None:
        return value
    try:
        return calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None


def iso_time(when):
    """ISO 8601 in UTC for --json, or None."""
    if not when:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def add_usage(agents, rows, cache, table):
    """Give each row its tokens, context and cost (UsageCache) and its memory (table)."""
    usage = UsageCache()
    for agent, row in zip(agents, rows):
        found = usage.of(agent, cache) or {}
        row.update(tokens=found.get("tokens"), context_tokens=found.get("context_tokens"),
                   context_used=found.get("context_used"), cost_usd=found.get("cost_usd"),
                   rss_bytes=tree_rss(row["pid"], table) if row["status"] != "exited" else None)
    usage.save()


class UsageCache(AgentCache):
    """What each agent has used, folded from its CLI's own records as they grow.

    Like StatusCache: per agent the file read (a transcript, a rollout), the
    byte offset read so far and the totals, so `list` reads only what was
    written since it last looked.
    """
    FILE = "usage-cache.json"

    def of(self, agent, cache):
        """{tokens, context_tokens, context_used, cost_usd} of the agent's session, or None."""
        kind = kind_of(agent)
        if not kind.hooks:      # headless too: claude -p keeps the same transcript
            return None
        name = agent["name"]
        entry = self.entries.get(name)
        entry = entry if isinstance(entry, dict) and isinstance(entry.get("totals"), dict) \
            and isinstance(entry.get("offset"), int) else {}
        path = cache.summary(agent).get("transcript") or entry.get("path") \
            or kind.usage_file(agent)
        try:
            size = os.path.getsize(path) if path else None
        except OSError:
            size = None
        if size is None:
            return None
        if entry.get("path") != path or entry["offset"] > size:     # another session, or rewritten
            entry = {"path": path, "offset": 0, "totals": {}}
        if entry["offset"] < size:
            lines, end = read_new_lines(path, entry["offset"])
            entry = {"path": path, "offset": end, "totals": kind.fold_usage(entry["totals"], lines)}
            self.entries[name] = entry
            self.changed = True
        return usage_fields(dict(entry["totals"], **kind.usage_told(agent)))


def usage_fields(totals):
    """The `list --json` fields from a kind's folded totals."""
    tokens = totals.get("tokens")
    used = [a + b for a, b in zip(tokens, totals.get("pending") or [0] * 4)] if tokens else None
    context, window = totals.get("context"), totals.get("window")
    share = totals.get("share")     # the CLI's own figure, where it gives one
    if share is None and context is not None and window:
        share = float(context) / window
    return {"tokens": dict(zip(("input", "output", "cache_read", "cache_write"), used))
            if used else None, "context_tokens": context,
            "context_used": None if share is None else round(share, 4),
            "cost_usd": totals.get("cost")}


def claude_usage(totals, entries):
    """Fold claude transcript entries: each API answer's usage, once per message, and its cost.

    Claude writes one entry per content block of an answer, each with the
    answer's usage: an answer counts when the next one begins (its last
    entry holds the final counts).  Context is what the last answer of the
    main thread held.  The cost is claude's own (2.1.332 writes cost-state).
    """
    totals = dict(totals)
    for entry in entries:
        kind = entry.get("type")
        message = entry.get("message") if isinstance(entry.get("message"), dict) else {}
        usage = message.get("usage")
        if kind == "assistant" and isinstance(usage, dict) and message.get("model") != "<synthetic>":
            counts = [number_or_zero(usage.get(key)) for key in (
                "input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_creation_input_tokens")]
            if message.get("id") != totals.get("last_id"):
                totals["tokens"] = [a + b for a, b in zip(totals.get("tokens") or [0] * 4,
                                                         totals.get("pending") or [0] * 4)]
            totals.update(pending=counts, last_id=message.get("id"))
            if not entry.get("isSidechain"):
                totals["context"] = counts[0] + counts[2] + counts[3] + counts[1]
        elif kind == "cost-state" and isinstance(entry.get("totalCostUSD"), (int, float)):
            totals["cost"] = round(entry["totalCostUSD"], 6)
    return totals


def claude_status_line(agent):
    """What claude last told orch's statusLine: {window, share, cost, limit_resets}, or {}.

    Only where the user has a statusLine of their own (see agent_settings).
    """
    found = read_json(os.path.join(agent_dir(agent["name"]), "statusline.json"))
    if not isinstance(found, dict):
        return {}
    told, window, cost = {}, found.get("context_window"), found.get("cost")
    if isinstance(window, dict):
        if isinstance(window.get("context_window_size"), int):
            told["window"] = window["context_window_size"]
        if isinstance(window.get("used_percentage"), (int, float)):
            told["share"] = window["used_percentage"] / 100.0
    if isinstance(cost, dict) and isinstance(cost.get("total_cost_usd"), (int, float)):
        told["cost"] = round(cost["total_cost_usd"], 6)
    resets = full_window_reset(found.get("rate_limits"), "used_percentage")
    if resets:
        told["limit_resets"] = resets
    return told


def full_window_reset(windows, used):
    """When the last full (100%) of a CLI's rate-limit windows resets, or None.

    windows: {name: {used: percent, "resets_at": epoch}}, as claude tells a
    statusLine ("used_percentage") and codex writes in its rollout ("used_percent").
    """
    full = [w["resets_at"] for w in (windows.values() if isinstance(windows, dict) else ())
            if isinstance(w, dict) and (w.get(used) or 0) >= 100
            and isinstance(w.get("resets_at"), (int, float))]
    return max(full) if full else None


def codex_usage(totals, entries):
    """Fold codex rollout entries: its token_count events hold the session's totals so far.

    OpenAI counts cached input inside input; orch's `input` is the rest, as claude's.
    """
    totals = dict(totals)
    for entry in entries:
        payload = entry.get("payload")
        if not isinstance(payload, dict) or payload.get("type") != "token_count" \
                or not isinstance(payload.get("info"), dict):
            continue
        info = payload["info"]
        total, last = info.get("total_token_usage") or {}, info.get("last_token_usage") or {}
        cached = number_or_zero(total.get("cached_input_tokens"))
        totals.update(tokens=[number_or_zero(total.get("input_tokens")) - cached,
                              number_or_zero(total.get("output_tokens")), cached,
                              number_or_zero(total.get("cache_write_input_tokens"))],
                      context=number_or_zero(last.get("total_tokens")),
                      window=info.get("model_context_window") or None)
    return totals


def gemini_usage(totals, entries):
    """Fold gemini chat-file entries: each answer's tokens, once per message id.

    Its input counts the cached part (the API's promptTokenCount): orch's is the rest.
    """
    totals = dict(totals)
    for entry in entries:
        tokens = entry.get("tokens")
        if entry.get("type") != "gemini" or not isinstance(tokens, dict):
            continue
        cached = number_or_zero(tokens.get("cached"))
        counts = [number_or_zero(tokens.get("input")) - cached,
                  number_or_zero(tokens.get("output")) + number_or_zero(tokens.get("thoughts")),
                  cached, 0]
        if entry.get("id") != totals.get("last_id"):
            totals["tokens"] = [a + b for a, b in zip(totals.get("tokens") or [0] * 4,
                                                     totals.get("pending") or [0] * 4)]
        totals.update(pending=counts, last_id=entry.get("id"),
                      context=number_or_zero(tokens.get("total")))
    return totals


def number_or_zero(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def process_table():
    """({pid: resident bytes}, {pid: [child pids]}) of every process, from /proc in one pass."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    rss, children = {}, {}
    try:
        pids = os.listdir("/proc")
    except OSError:
        return rss, children        # no /proc here: memory is unknown
    for pid in pids:
        if not pid.isdigit():
            continue
        try:
            fd = os.open("/proc/" + pid + "/stat", os.O_RDONLY)     # a third cheaper than open()
            try:
                data = os.read(fd, 4096)
            finally:
                os.close(fd)
            fields = data[data.rindex(b")") + 2:].split(None, 22)     # the name may hold ") "
            number = int(pid)
            rss[number] = int(fields[21]) * page
            children.setdefault(int(fields[1]), []).append(number)
        except (OSError, ValueError, IndexError):
            continue        # gone meanwhile
    return rss, children


def tree_rss(pid, table):
    """Resident bytes of pid and all its descendants (a sum: pages they share count twice)."""
    rss, children = table
    if not pid or pid not in rss:
        return None
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, ()))
    return total


# ###########################################################################
# Notifications: telling the person without being asked
# ###########################################################################
#
# One watcher per data folder (`orch.py _watch`, detached, one at a time by
# a lock) looks at every agent as `list` does, twice a second, and turns
# what changed into events: started, needs-input, done, failed, exited.  It
# never runs inside an agent's hook, so a dead server slows no agent, and no
# verb waits on it: spawn, resume, send and `notify add` only make sure it runs.
# What it must not lose is in one private file written atomically: what it
# last saw of each agent and every notification not yet delivered.  So a
# killed watcher or a reboot loses nothing and sends nothing twice when
# nothing failed; what happened while none ran is sent when one starts,
# marked late.  The channels (their URLs are secrets) are in another.

NOTIFY_EVENTS = ("needs-input", "done", "failed", "exited", "started")
NOTIFY_DEFAULT = ("needs-input", "failed", "exited")
NOTIFY_TIMEOUT = 10         # seconds one delivery may take
NOTIFY_RETRY_FOR = 600      # seconds a failing notification is retried before it is given up
WATCH_TICK = 0.5            # seconds between two looks at the agents
LATE_AFTER = 10             # seconds before the watcher started: what changed then is late


def notify_file():
    return os.path.join(data_dir(), "notify.json")


def watch_file():
    return os.path.join(data_dir(), "watch.json")


def notify_log_file():
    return os.path.join(data_dir(), "notify-log.jsonl")


def load_channels():
    """{name: channel} from the private channels file ({} when there is none)."""
    found = read_json(notify_file())
    channels = found.get("channels") if isinstance(found, dict) else None
    return channels if isinstance(channels, dict) else {}


def save_channels(channels):
    write_file_atomic(notify_file(), json.dumps({"version": 1, "channels": channels}, indent=1))


def masked(target):
    """A channel's target as orch shows it: its host (or program) and its last 4 characters."""
    import urllib.parse
    parts = urllib.parse.urlsplit(target)
    head = parts.hostname if parts.scheme in ("http", "https") and parts.hostname else \
        (target.split() or ["?"])[0][:20]
    return "%s \u2026%s" % (head, target[-4:]) if len(target) > 8 else head


def channel_matches(channel, event):
    import fnmatch
    return event["event"] in channel["on"] and fnmatch.fnmatchcase(event["agent"],
                                                                    channel["agents"])


def check_target(kind, target):
    """Refuse a target orch could never deliver to, before it is saved."""
    import urllib.parse
    if kind in ("webhook", "ntfy"):
        parts = urllib.parse.urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OrchError("--%s takes an http:// or https:// URL, not %r" % (
                kind, shorten(masked(target), 40)), EXIT_USAGE)
        if kind == "ntfy" and parts.path.strip("/") == "":
            raise OrchError("--ntfy takes a topic URL (https://ntfy.sh/TOPIC), with the topic",
                            EXIT_USAGE)
    elif not target.strip():
        raise OrchError("--exec takes a command", EXIT_USAGE)


def hint_for(name, st, event):
    """The orch command that acts on an event."""
    if event == "needs-input":
        return "orch approve %s" % name if st.get("needs") == "permission" else \
            "orch attach %s" % name
    return {"done": "orch reply %s", "failed": "orch log %s", "exited": "orch resume %s",
            "started": "orch tail %s"}[event] % name


def make_event(agent, st, event, late=False, detail=None):
    """One event as every channel gets it."""
    import socket
    reply = None
    if event == "done":
        try:
            found = last_reply(agent)
        except OrchError:
            found = None
        reply = (found["text"].strip().splitlines() or [""])[0][:300] if found else None
    now = time.time()
    return {"event": event, "agent": agent["name"], "host": socket.gethostname(),
            "status": st["status"], "detail": detail if detail is not None else st.get("detail"),
            "reply": reply, "hint": hint_for(agent["name"], st, event),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)), "t": now,
            "late": late}


def event_line(event):
    """The event in one line of text (ntfy's body, exec's ORCH_EVENT_DETAIL aside)."""
    what = {"needs-input": "needs input", "done": "finished its turn", "failed":
            "turn failed", "exited": "exited", "started": "started"}[event["event"]]
    line = "%s %s" % (event["agent"], what)
    extra = event["reply"] if event["event"] == "done" else event["detail"]
    if extra:
        line += ": %s" % extra
    return "%s%s \u2014 %s" % ("(late) " if event["late"] else "", shorten(line, 300),
                                event["hint"])


def deliver(channel, event):
    """Send one event over one channel; raise OrchError saying why not (retry: e.retry)."""
    kind, target = channel["kind"], channel["target"]
    body = json.dumps(dict((k, v) for k, v in event.items() if k != "t"), ensure_ascii=False)
    if kind == "webhook":
        http_post(target, body.encode("utf-8"), {"Content-Type": "application/json"})
    elif kind == "ntfy":
        high = event["event"] in ("needs-input", "failed")
        tags = {"needs-input": "warning", "done": "white_check_mark", "failed": "x",
                "exited": "stop_sign", "started": "rocket"}[event["event"]]
        http_post(target, event_line(event).encode("utf-8"), {
            "Title": "orch: %s %s" % (event["agent"], event["event"]),
            "Priority": "high" if high else "default", "Tags": tags,
            "Content-Type": "text/plain; charset=utf-8"})
    else:
        run_exec(target, body, event)


class DeliveryError(OrchError):
    def __init__(self, message, retry=True):
        OrchError.__init__(self, message)
        self.retry = retry


def http_post(url, data, headers):
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=NOTIFY_TIMEOUT) as response:
            response.read(65536)
    except urllib.error.HTTPError as e:
        # A server error may pass; a refusal (a wrong topic, a bad token) will not.
        raise DeliveryError("HTTP %d %s" % (e.code, e.reason), retry=e.code >= 500 or
                            e.code in (408, 429))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DeliveryError(str(getattr(e, "reason", None) or e))


def run_exec(command, body, event):
    """Run the user's command line; the event goes on stdin and in the environment, never in it."""
    # As bytes: an answer in any language is UTF-8 there, whatever the locale (3.6 under C).
    env = dict(os.environb)
    env.update((k.encode(), v.encode("utf-8", "replace")) for k, v in (
        ("ORCH_EVENT", body), ("ORCH_EVENT_NAME", event["event"]),
        ("ORCH_EVENT_AGENT", event["agent"]), ("ORCH_EVENT_STATUS", event["status"]),
        ("ORCH_EVENT_DETAIL", event["detail"] or "")))
    try:
        done = subprocess.run(["/bin/sh", "-c", command], input=body.encode("utf-8"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=NOTIFY_TIMEOUT, cwd=os.path.expanduser("~"))
    except subprocess.TimeoutExpired:
        raise DeliveryError("the command ran more than %ds" % NOTIFY_TIMEOUT)
    except OSError as e:
        raise DeliveryError(str(e))
    if done.returncode:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise DeliveryError("exit code %d%s" % (done.returncode, (": " + shorten(said[-1], 100))
                                                if said else ""))


def log_delivery(item, outcome, error=None):
    line = {"t": time.time(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "channel": item["channel"], "event": item["event"]["event"],
            "agent": item["event"]["agent"], "late": item["event"]["late"],
            "attempts": item["attempts"], "outcome": outcome, "error": error,
            "id": item["id"]}
    append_line(notify_log_file(), json.dumps(line, ensure_ascii=False))


# Held messages: typed by the watcher when the turn ends ----------------------

def held_path(name):
    return os.path.join(agent_dir(name), "held.json")


def load_held(name):
    found = read_json(held_path(name))
    return found if isinstance(found, list) else []


def held_count(name):
    return len(load_held(name)) if os.path.exists(held_path(name)) else 0


def held_counts(names):
    """{name: messages held} of the agents that have any: one stat each, one data_dir()."""
    folder = os.path.join(data_dir(), "agents")
    return dict((name, len(load_held(name))) for name in names
                if os.path.exists(os.path.join(folder, name, "held.json")))


def hold_message(agent, text, raw):
    """Keep a message to type once the agent is idle; return how many wait now."""
    with FileLock(held_path(agent["name"]) + ".lock"):
        items = load_held(agent["name"]) + [{"t": time.time(), "text": text, "raw": raw}]
        write_file_atomic(held_path(agent["name"]), json.dumps(items))
    return len(items)


def cancel_held(name):
    with FileLock(held_path(name) + ".lock"):
        items = load_held(name)
        if items:
            write_file_atomic(held_path(name), "[]")
    return len(items)


def take_held(name, item, how):
    """Drop one held message (typed, or found typed), recording how."""
    with FileLock(held_path(name) + ".lock"):
        items = [i for i in load_held(name) if i["t"] != item["t"]]
        write_file_atomic(held_path(name), json.dumps(items))
    append_line(os.path.join(agent_dir(name), "held-log.jsonl"),
                json.dumps({"t": time.time(), "held": item["t"], "outcome": how}))


def deliver_held(agent):
    """Type the oldest held message into the idle agent, confirmed as every send.

    It is marked before it is typed: a watcher killed meanwhile leaves the
    mark, and the next one asks the agent's hooks whether it arrived, so it
    is neither lost nor typed twice.
    """
    name = agent["name"]
    with FileLock(held_path(name) + ".lock"):
        items = load_held(name)
        if not items:
            return
        item = items[0]
        marked = item.get("typing")
        item["typing"] = time.time()
        write_file_atomic(held_path(name), json.dumps(items))
    typed = item["text"] if item["raw"] else escape_leading(item["text"])
    if marked and kind_of(agent).hooks and submitted(agent, typed, marked):
        return take_held(name, item, "submitted (found after a restart)")
    try:
        outcome = send_message(agent, item["text"], raw=item["raw"], idle_only=True)
    except OrchError as e:
        if e.code in (EXIT_NEEDS_INPUT, EXIT_NOT_RUNNING):
            return      # nothing was typed: it waits for the next idle
        return take_held(name, item, "typed, unconfirmed: %s" % e)     # never twice
    take_held(name, item, outcome)


# The watcher -----------------------------------------------------------------

def watcher_running():
    """True when a watcher holds the watch lock (a second one would exit at once)."""
    import fcntl
    path = os.path.join(data_dir(), "watch.lock")
    if not os.path.exists(path):
        return False
    fd = open_private(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def ensure_watcher(held=False):
    """Start the watcher if there is work for it (channels, held messages) and none runs.

    It never waits on the watcher.
    """
    if not (held or load_channels()) or watcher_running():
        return
    subprocess.Popen([sys.executable, os.path.abspath(__file__), "_watch"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd="/")


def agent_memory(agent, st, old=None):
    """What the watcher keeps of an agent to tell what changed next time.

    The times of its last turn end and last permission request only grow: a
    look that could not read them (the window gone) forgets nothing.
    """
    def latest(key):
        return max(st.get(key) or 0, (old or {}).get(key) or 0) or None
    return {"launched": agent.get("launched", agent.get("created")), "status": st["status"],
            "needs": st["needs"], "detail": st.get("detail"), "ended": latest("ended"),
            "asked": latest("asked"), "failed": latest("failed")}


def changes(agent, st, old, late):
    """The events between what the watcher saw of an agent (old) and its status now."""
    new = agent_memory(agent, st, old)
    found = []
    if old is not None and old["launched"] != new["launched"] and old["status"] != "exited":
        # Started again before the watcher saw it end (a reboot, then resume --all).
        found.append(make_event(agent, dict(st, status="exited"), "exited", True,
                                detail="ended while no watcher looked (a reboot?)"))
    if old is None or old["launched"] != new["launched"]:
        if st["status"] != "exited":
            found.append(make_event(agent, st, "started", late))
        # What it did since: turns and requests of this launch only.
        old = dict(old or {}, status="starting", needs=None, detail=None)
    # One event per turn that ended since the last look, even two between looks.
    ends = []
    if new["ended"] != old.get("ended"):
        ends = [(t, None) for t in [t for t in st.get("ends") or [] if t and t > (
            old.get("ended") or 0)] or [new["ended"]]]
    failures = [f for f in st.get("failures") or [] if f[0] and f[0] > (old.get("failed") or 0)]
    if st.get("error") and not st.get("failures") and st.get("failed"):
        # codex, gemini: a turn an error ended fires Stop too; that turn is not done.
        ends = [end for end in ends if end[0] < st["failed"]]
    for _, failure in sorted(ends + [(f[0], f) for f in failures], key=lambda x: x[0]):
        found.append(make_event(agent, st, "failed", late, detail="%s: %s" % (
            failure[1], failure[2] or "")) if failure else make_event(agent, st, "done", late))
    if not failures and new["failed"] != old.get("failed") and st.get("error"):
        # codex: read off its rollout, the current turn's only
        found.append(make_event(agent, st, "failed", late, detail="%s: %s" % (
            st["error"], st["detail"] or "")))
    if st["status"] == "needs-input" and (old["status"] != "needs-input" or new["asked"] != old.get(
            "asked") or (old["needs"], old["detail"]) != (new["needs"], new["detail"])):
        found.append(make_event(agent, st, "needs-input", late))
    if st["status"] == "exited" and old["status"] != "exited" and not agent.get("stopped"):
        how = "exit code %s" % st["exit_code"] if st["exit_code"] is not None else \
            "its window or tmux server is gone"
        found.append(make_event(agent, st, "exited", late, detail=how))
    return found


def watch_tick(memory, started, first):
    """Look at every agent once; queue what changed for each channel that wants it."""
    channels = load_channels()
    state = load_state()
    agents = list(state["agents"].values())
    now = statuses(agents)
    seen, queued = memory.setdefault("agents", {}), False
    for agent in agents:
        name, st = agent["name"], now[agent["name"]]
        old = seen.get(name)
        if old is None and memory.get("new") and agent.get("launched", 0) < min(
                [c.get("created", 0) for c in channels.values()] or [0]):
            old = agent_memory(agent, st)   # the first watcher: what was before the channels is no news
        late = first and (st["since"] or 0) < started - LATE_AFTER
        for event in changes(agent, st, old, late):
            for cname, channel in sorted(channels.items()):
                if channel_matches(channel, event):
                    memory["seq"] = memory.get("seq", 0) + 1
                    memory.setdefault("outbox", []).append(
                        {"id": "%d-%d" % (int(started), memory["seq"]), "channel": cname,
                         "event": event, "attempts": 0, "first": time.time(), "next": 0})
                    queued = True
        seen[name] = agent_memory(agent, st, old)
    for name in list(seen):
        if name not in state["agents"]:
            del seen[name]
    memory.pop("new", None)
    running = any(st["status"] != "exited" for st in now.values())
    holding = [a for a in agents if now[a["name"]]["status"] != "exited"
               and os.path.exists(held_path(a["name"])) and load_held(a["name"])]
    continuing = [a for a in agents if a.get("on_limit") == "continue"
                  and now[a["name"]]["status"] != "exited"]
    for agent in continuing:
        continue_after_limit(agent, now[agent["name"]], memory)
        # Such a dialog may be up while the hooks say limited: look at the screen.
        if kind_of(agent).LIMIT_WAIT and (now[agent["name"]]["status"] == "limited"
                                          or now[agent["name"]]["needs"] == "dialog"):
            in_thread(agent, wait_out_limit)       # then types what is held, if any
    for agent in holding:
        if now[agent["name"]]["status"] in READY:
            in_thread(agent, deliver_held)
    return queued, running and (channels or holding or continuing), channels


def continue_after_limit(agent, st, memory):
    """Hold one continue message for an agent a usage limit stopped, once it has reset.

    Once per limit (the failure's time), marked in the watcher's memory on disk
    before it is held: a watcher killed in between loses it rather than
    typing it twice.  A CLI that continues by itself (claude 2.1.332 does)
    has begun a turn by then: it is no longer limited, and nothing is held.
    """
    when = st.get("resets_at")
    # A CLI that said it continues by itself gets the time to do it first.
    margin = limit_margin() * (OWN_CONTINUE_PATIENCE if st.get("continues_itself") else 1)
    if st["status"] != "limited" or not when or time.time() < when + margin:
        return
    done = memory.setdefault("continued", {})
    if done.get(agent["name"]) == st.get("failed"):
        return
    done[agent["name"]] = st.get("failed")
    write_file_atomic(watch_file(), json.dumps(memory))
    hold_message(agent, CONTINUE_MESSAGE, False)
    append_line(os.path.join(agent_dir(agent["name"]), "held-log.jsonl"), json.dumps(
        {"t": time.time(), "outcome": "held: the usage limit reset at %s" % iso_time(when)}))


HELD_TYPING = set()     # agents the watcher is typing into (one thread each)


def in_thread(agent, work):
    """Run work(agent) in a thread of its own, one per agent (sends wait up to 10 s)."""
    import threading
    name = agent["name"]
    if name in HELD_TYPING:
        return
    HELD_TYPING.add(name)

    def run():
        try:
            work(agent)
        except Exception:
            pass        # what it was to do is still to do: the next tick tries again
        finally:
            HELD_TYPING.discard(name)
    threading.Thread(target=run, daemon=True).start()


def wait_out_limit(agent):
    """Answer the dialog a usage limit opened with its choice that waits for the reset.

    Only that dialog (the kind names it), only its choice that spends nothing
    and changes nothing, checked on the screen before the key: then the agent
    is limited, and continued after the reset.
    """
    question, choice = kind_of(agent).LIMIT_WAIT
    dialog = shown_dialog(agent)(agent_screen(agent))
    if dialog and re.search(question, dialog["question"] or ""):
        numbers = [n for n, text in sorted(dialog["choices"].items()) if re.match(choice, text)]
        if len(numbers) != 1 or not pick_choice(agent, dialog, numbers[0]):
            return
        append_line(os.path.join(agent_dir(agent["name"]), "held-log.jsonl"), json.dumps(
            {"t": time.time(), "outcome": "answered %r: %s" % (dialog["question"],
                                                              dialog["choices"][numbers[0]])}))
    if load_held(agent["name"]):
        deliver_held(agent)     # this thread is the agent's one: the continue is typed here


def deliver_due(memory, channels, inflight, done):
    """Start a thread for each notification that is due; fold in those that finished.

    done gets (item, outcome, error) for each that is finished with: the
    caller logs them once the outbox without them is on disk, so a watcher
    killed in between never sends one again.
    """
    import threading
    outbox, now = memory.get("outbox", []), time.time()
    for item in list(outbox):
        result = inflight.get(item["id"])
        if result is not None and result.get("done"):
            del inflight[item["id"]]
            item["attempts"] += 1
            error = result.get("error")
            if error is None:
                outbox.remove(item)
                done.append((item, "sent", None))
            elif not result.get("retry") or now - item["first"] > NOTIFY_RETRY_FOR:
                outbox.remove(item)
                done.append((item, "failed", error))
            else:
                item["next"] = now + min(60, 2 ** item["attempts"])
                item["error"] = error
    busy = set()        # one at a time per channel, in order: a person reads them in turn
    for item in list(outbox):
        channel = channels.get(item["channel"])
        if channel is None:
            outbox.remove(item)     # `notify rm`: nothing left to send it to
            continue
        if item["channel"] in busy:
            continue
        busy.add(item["channel"])
        if item["id"] in inflight or item["next"] > now:
            continue
        result = inflight[item["id"]] = {}

        def send(channel=channel, item=item, result=result):
            try:
                deliver(channel, item["event"])
            except DeliveryError as e:
                result.update(error=str(e), retry=e.retry)
            except Exception as e:          # a bug must not end the watcher
                result.update(error="%s: %s" % (type(e).__name__, e), retry=False)
            result["done"] = True
        threading.Thread(target=send, daemon=True).start()
    return bool(outbox) or bool(inflight)


def watch():
    """The watcher's loop: until no channel is left, or nothing runs and nothing is pending."""
    import fcntl
    lock = open_private(os.path.join(make_private_dir(data_dir()), "watch.lock"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return EXIT_OK      # another watcher runs
    write_file_atomic(os.path.join(data_dir(), "watch.pid"), "%d\n" % os.getpid())
    memory = read_json(watch_file())
    memory = memory if isinstance(memory, dict) else {"new": True}
    started, first, inflight, idle_since = time.time(), True, {}, None
    while True:
        before = json.dumps(memory, sort_keys=True)
        try:
            queued, running, channels = watch_tick(memory, started, first)
        except Exception as e:      # a state being written, a tmux that hangs, a bug: go on
            append_line(os.path.join(data_dir(), "watch-errors.log"), "%s %s: %s" % (
                time.strftime("%Y-%m-%dT%H:%M:%S"), type(e).__name__, shorten(str(e), 300)))
            queued, running, channels = False, True, load_channels()
        first, done = False, []
        pending = deliver_due(memory, channels, inflight, done)
        if json.dumps(memory, sort_keys=True) != before:
            write_file_atomic(watch_file(), json.dumps(memory))
        for item, outcome, error in done:
            log_delivery(item, outcome, error)
        busy = pending or running or HELD_TYPING
        idle_since = None if busy else idle_since or time.time()
        if idle_since and time.time() - idle_since > 5:
            return EXIT_OK
        time.sleep(WATCH_TICK)


def cmd_watch(args):
    return watch()


# The notify verb -------------------------------------------------------------

def cmd_notify(args):
    if (args.name is None) == (args.action in ("add", "rm", "test")):
        raise OrchError("notify %s %s" % (args.action, "takes a channel NAME" if args.name is None
                                          else "takes no name"), EXIT_USAGE)
    return {"add": notify_add, "list": notify_list, "rm": notify_rm, "test": notify_test,
            "log": notify_log}[args.action](args)


def notify_add(args):
    name = check_name(args.name)
    given = [(k, v) for k, v in (("webhook", args.webhook), ("ntfy", args.ntfy),
                                 ("exec", args.exec_)) if v is not None]
    if len(given) != 1:
        raise OrchError("give one of --webhook URL, --ntfy URL or --exec COMMAND", EXIT_USAGE)
    kind, target = given[0]
    if target == "-":       # off the command line: from stdin
        target = read_text("-", what="--%s" % kind).strip()
    check_target(kind, target)
    on = [e.strip() for e in (args.on or ",".join(NOTIFY_DEFAULT)).split(",") if e.strip()]
    unknown = [e for e in on if e not in NOTIFY_EVENTS]
    if unknown or not on:
        raise OrchError("--on takes a comma list of %s (not %s)" % (
            ", ".join(NOTIFY_EVENTS), ", ".join(unknown) or "nothing"), EXIT_USAGE)
    with FileLock(notify_file() + ".lock"):
        channels = load_channels()
        if name in channels:
            raise OrchError("a channel named %s exists: `orch notify rm %s` first" % (name, name))
        channels[name] = {"kind": kind, "target": target, "on": on,
                          "agents": args.agents or "*", "created": time.time()}
        save_channels(channels)
    ensure_watcher()
    print("added %s: %s %s, on %s, for agents %s" % (name, kind, masked(target), ",".join(on),
                                                    args.agents or "*"))
    return EXIT_OK


def notify_list(args):
    rows = [{"name": n, "kind": c["kind"], "target": masked(c["target"]), "on": c["on"],
             "agents": c["agents"]} for n, c in sorted(load_channels().items())]
    if args.json:
        print_json_array(rows)
    elif not rows:
        print("no channels: `orch notify add NAME --ntfy URL` adds one")
    else:
        print("%-12s %-8s %-28s %-28s %s" % ("NAME", "KIND", "TARGET", "ON", "AGENTS"))
        for r in rows:
            print("%-12s %-8s %-28s %-28s %s" % (r["name"], r["kind"], r["target"],
                                                 ",".join(r["on"]), r["agents"]))
    return EXIT_OK


def notify_rm(args):
    name = check_name(args.name)
    with FileLock(notify_file() + ".lock"):
        channels = load_channels()
        if name not in channels:
            raise OrchError("no channel named %s (`orch notify list`)" % name)
        del channels[name]
        save_channels(channels)
    print("removed %s" % name)
    return EXIT_OK


def notify_test(args):
    name = check_name(args.name)
    channel = load_channels().get(name)
    if channel is None:
        raise OrchError("no channel named %s (`orch notify list`)" % name)
    st = {"status": "needs-input", "needs": "permission", "detail": "a test from orch notify"}
    event = make_event({"name": "orch-test", "created": time.time()}, st, "needs-input")
    item = {"id": "test-%d" % int(time.time() * 1000), "channel": name, "event": event,
            "attempts": 1}
    try:
        deliver(channel, event)
    except DeliveryError as e:
        log_delivery(item, "failed", str(e))
        raise OrchError("%s: not delivered: %s" % (name, e))
    log_delivery(item, "sent")
    print("%s: delivered a test event to %s" % (name, masked(channel["target"])))
    return EXIT_OK


def notify_log(args):
    entries, _ = read_new_lines(notify_log_file(), 0)
    if args.json:
        print_json_array(entries)
        return EXIT_OK
    for e in entries:
        print("%s  %-7s %-12s %-12s %-11s%s%s" % (
            e.get("time", "?")[:19], e.get("outcome"), e.get("channel"), e.get("agent"),
            e.get("event"), " late" if e.get("late") else "",
            "  (%s)" % e["error"] if e.get("error") else ""))
    return EXIT_OK


# ###########################################################################
# doctor: what orch depends on, checked one line each; it never changes anything
# ###########################################################################

def finding(level, check, message):
    return {"level": level, "check": check, "message": message}


def check_python():
    return [finding("ok", "python", "Python %s (%s)" % (sys.version.split()[0], sys.executable))]


def check_tmux():
    import shutil
    path = shutil.which("tmux")
    if not path:
        try:
            in_tmux = [a for a in load_state()["agents"].values() if a["backend"] == "tmux"]
        except OrchError:
            in_tmux = []    # check_state says why
        if in_tmux:
            return [finding("problem", "tmux", "tmux not found, but agents run in it (%s): "
                            "orch cannot see, reach or resume them; install tmux (e.g. apt-get "
                            "install tmux) or put it on PATH"
                            % ", ".join(sorted(a["name"] for a in in_tmux)[:5]))]
        return [finding("warning", "tmux", "tmux not found: only the headless backend works; "
                        "install tmux (e.g. apt-get install tmux) for windows you can attach to")]
    try:
        text = tmux(["-V"]).strip()
    except OrchError as e:
        return [finding("problem", "tmux", "%s does not run: %s" % (path, e))]
    if parse_tmux_version(text) < MIN_TMUX:
        return [finding("problem", "tmux", "%s is too old (%s): orch needs tmux %d.%d or newer"
                        % (path, text, MIN_TMUX[0], MIN_TMUX[1]))]
    return [finding("ok", "tmux", "%s (%s)" % (text, path))]


def parse_claude_version(text):
    """Turn `2.1.330 (Claude Code)` into (2, 1, 330), or None."""
    import re
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(int(n) for n in m.groups()) if m else None


def ask_version(path):
    """What `PROGRAM --version` prints; an error (a doctor problem line) if it does not run.

    In a home of its own, thrown away after: doctor writes nothing of the
    user's, and gemini 0.61.0 writes into ~/.gemini even for --version.
    """
    import shutil
    import tempfile
    home = tempfile.mkdtemp(prefix="orch-doctor-")
    env = dict((k, v) for k, v in os.environ.items() if k not in ("CODEX_HOME", "GEMINI_CLI_HOME"))
    try:
        return subprocess.run([path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=30, env=dict(env, HOME=home)
                              ).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OrchError("%s --version failed: %s" % (path, e))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def check_claude():
    import shutil
    program = default_program()
    path = shutil.which(program)
    if not path:
        return [finding("problem", "claude", "%s not found on PATH: install Claude Code (npm "
                        "install -g @anthropic-ai/claude-code) or set ORCH_CLAUDE" % program)]
    out = ask_version(path)
    version = parse_claude_version(out)
    tested = "%s to %s" % tuple(".".join(map(str, v)) for v in TESTED_CLAUDE)
    if version is None:
        return [finding("warning", "claude", "%s did not say its version (%r): orch is tested "
                        "with Claude Code %s" % (path, shorten(out, 60), tested))]
    shown = ".".join(map(str, version))
    if not TESTED_CLAUDE[0] <= version <= TESTED_CLAUDE[1]:
        return [finding("warning", "claude", "Claude Code %s (%s) is outside the versions orch "
                        "is tested with (%s): it may work; if send or status misbehave, install "
                        "one of those" % (shown, path, tested))] + sign_in_findings(ClaudeKind)
    return [finding("ok", "claude", "Claude Code %s (%s), tested range %s" % (
        shown, path, tested))] + sign_in_findings(ClaudeKind)


def sign_in_findings(kind):
    """A warning if the installed CLI of kind would stop at a first-run screen here."""
    problem = kind.sign_in_problem()
    return [finding("warning", "sign-in", problem)] if problem else []


def key_hint(key):
    """A key as orch may show it: its last 4 characters."""
    return "\u2026" + key[-4:] if len(key) > 8 else "(short)"


def claude_sign_in_problem():
    """Why claude would stop at its API-key question or have no login, or None (reads only).

    Claude asks once per key whether to use an ANTHROPIC_API_KEY it finds,
    and records the answer in ~/.claude.json (customApiKeyResponses, by the
    key's last 20 characters).
    """
    config = read_json(os.path.join(os.path.expanduser("~"), ".claude.json"))
    config = config if isinstance(config, dict) else {}
    if config.get("hasCompletedOnboarding") is not True:
        return ("claude has never been set up for this account (no hasCompletedOnboarding in "
                "~/.claude.json): run `claude` once in a terminal and go through its first "
                "screens")
    key = os.environ.get("ANTHROPIC_API_KEY")
    answers = config.get("customApiKeyResponses")
    answers = answers if isinstance(answers, dict) else {}
    if key:
        if key[-20:] in (answers.get("approved") or []):
            return None
        if key[-20:] in (answers.get("rejected") or []):
            return ("claude was told not to use the ANTHROPIC_API_KEY here (%s)%s: run `claude`, "
                    "then /login, or unset the key" % (key_hint(key), "" if has_claude_login(
                        config) else " and has no login, so its turns will fail"))
        return ("claude has not been told whether to use the ANTHROPIC_API_KEY here (%s): every "
                "agent stops at \"Do you want to use this API key?\"; run `claude` once and "
                "answer Yes, or `orch approve NAME --choice 1` at that question" % key_hint(key))
    if has_claude_login(config) or any(os.environ.get(v) for v in CLAUDE_OTHER_AUTH):
        return None
    return ("claude has no API key and no login here: its agents start, but every turn fails "
            "(\"Not logged in\"); run `claude`, then /login, or set ANTHROPIC_API_KEY")


# Ways to give claude credentials other than an API key or a login.
CLAUDE_OTHER_AUTH = ("ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN", "CLAUDE_CODE_USE_BEDROCK",
                     "CLAUDE_CODE_USE_VERTEX", "CLAUDE_CODE_USE_FOUNDRY")


def has_claude_login(config):
    """True when claude keeps a login here (an OAuth account, a credentials file, a key helper)."""
    folder = os.path.join(os.path.expanduser("~"), ".claude")
    settings = read_json(os.path.join(folder, "settings.json"))
    return bool(config.get("oauthAccount")) or os.path.exists(
        os.path.join(folder, ".credentials.json")) or bool(
        isinstance(settings, dict) and settings.get("apiKeyHelper"))


def codex_sign_in_problem():
    """Why codex would stop at its sign-in screen, or None.

    Codex asks a new user to sign in unless it has a login (auth.json: an
    API key or tokens) or a model_provider of the user's own, which needs
    none.  `codex login status` would tell too, but it writes helper files
    into CODEX_HOME, and doctor writes nothing.
    """
    home = os.environ.get("CODEX_HOME") or os.path.join(os.path.expanduser("~"), ".codex")
    auth = read_json(os.path.join(home, "auth.json"))
    if isinstance(auth, dict) and (auth.get("OPENAI_API_KEY") or auth.get("tokens")):
        return None
    try:
        with open(os.path.join(home, "config.toml"), encoding="utf-8", errors="replace") as f:
            config = f.read()
    except OSError:
        config = ""
    top = re.split(r"(?m)^\s*\[", config)[0]     # the keys before the first table
    if re.search(r'(?m)^\s*model_provider\s*=\s*"', top):
        return None
    if re.search(r'(?m)^\s*cli_auth_credentials_store\s*=\s*"(keyring|auto)"', top):
        return ("codex keeps its login in the system keyring, which orch does not read: if "
                "`codex login status` says \"Not logged in\", run `codex login`")
    return ("codex is not signed in (no login in %s, no model_provider of your own): every "
            "agent stops at \"Choose how you want to use Codex\"; run `codex login` (or "
            "`codex login --with-api-key`)" % short_path(home))


def gemini_sign_in_problem():
    """Why gemini would stop at "How would you like to authenticate", or None.

    It asks until an auth method is selected in its settings; measured on
    0.61.0, GEMINI_API_KEY alone does not spare the question (it only puts
    the cursor on "Use Gemini API Key").
    """
    for path in ("/etc/gemini-cli/settings.json", os.path.join(os.getcwd(), ".gemini",
                                                                "settings.json"),
                 os.path.join(os.path.expanduser("~"), ".gemini", "settings.json")):
        security = gemini_settings(path).get("security")
        auth = security.get("auth") if isinstance(security, dict) else None
        if isinstance(auth, dict) and auth.get("selectedType"):
            return None
    key = os.environ.get("GEMINI_API_KEY")
    how = ("choose \"Use Gemini API Key\" (it finds GEMINI_API_KEY, %s)" % key_hint(key)
           if key else "choose how to sign in (or set GEMINI_API_KEY first)")
    return ("gemini has no auth method selected in its settings: every agent stops at \"How "
            "would you like to authenticate for this project?\"; run `gemini` once in a "
            "terminal and %s" % how)


def check_optional_cli(kind, title, package, variable, tested, usable):
    """An agent CLI orch can run but does not need: its version, whether its hooks work, sign-in."""
    import shutil
    check = kind.name
    path = shutil.which(kind.command())
    if not path:
        return [finding("ok", check, "not installed (needed only for --agent %s: npm install "
                        "-g %s, or set %s)" % (check, package, variable))]
    version = parse_claude_version(ask_version(path))
    shown = ".".join(map(str, version)) if version else "(version unknown)"
    found = [finding("ok" if version in tested else "warning", check, "%s %s (%s)%s" % (
        title, shown, path, "" if version in tested else ", not a version orch is tested with "
        "(%s): it may work" % ", ".join(".".join(map(str, v)) for v in tested)))]
    try:
        usable(os.getcwd())
    except OrchError as e:
        found.append(finding("problem", check, str(e)))
    return found + sign_in_findings(kind)


def check_codex():
    return check_optional_cli(CodexKind, "Codex CLI", "@openai/codex", "ORCH_CODEX",
                              TESTED_CODEX, refuse_project_codex_hooks)


def check_gemini():
    return check_optional_cli(GeminiKind, "Gemini CLI", "@google/gemini-cli",
                              "ORCH_GEMINI", TESTED_GEMINI, lambda cwd: gemini_user_settings())


def check_opencode():
    return check_optional_cli(OpencodeKind, "OpenCode", "opencode-ai", "ORCH_OPENCODE",
                              TESTED_OPENCODE, lambda cwd: OpencodeKind.preflight(cwd, "tmux"))


def check_copilot():
    return check_optional_cli(CopilotKind, "Copilot CLI", "@github/copilot", "ORCH_COPILOT",
                              TESTED_COPILOT, lambda cwd: None)


def check_tmux_variable():
    inside = os.environ.get("TMUX")
    if not inside:
        return [finding("ok", "$TMUX", "not set (not inside tmux)")]
    return [finding("ok", "$TMUX", "set (%s): orch ignores it for its own tmux calls, and "
                    "`orch attach` switches your client when the agents share your server"
                    % inside.split(",")[0])]


def check_state():
    path = state_path()
    try:
        state = load_state()
    except OrchError as e:
        return [finding("problem", "state", str(e))]
    if not os.path.exists(path):
        return [finding("ok", "state", "%s does not exist yet (the first spawn creates it)" % path)]
    agents = list(state["agents"].values())
    try:
        found = statuses(agents, save=False)
    except OrchError as e:
        return [finding("ok", "state", "%s: format %d, %d agents" % (path, state["version"],
                                                                     len(agents))),
                finding("problem", "agents", "cannot tell what they are doing: %s" % e)]
    gone = sorted(a["name"] for a in agents if found[a["name"]]["status"] == "exited"
                  and found[a["name"]]["exit_code"] is None)
    running = len([n for n, st in found.items() if st["status"] != "exited"])
    result = [finding("ok", "state", "%s: format %d, %d agents (%d running, %d exited)"
                      % (path, state["version"], len(agents), running, len(agents) - running))]
    result += [finding("problem", "record", problem + ": fix or remove that record by hand")
               for problem in sorted(state.get("invalid", {}).values())]
    result += [finding("warning", "orphan", orphan_warning(name, where))
               for name, where in sorted(find_orphans(state).items())]
    if gone:
        result.append(finding("warning", "agents", "%s: their tmux server, window or process "
                              "is gone (reboot, kill-server?): `orch resume NAME` continues one, "
                              "`orch rm NAME` forgets it" % ", ".join(gone)))
    return result


def check_data_dir():
    folder = data_dir()
    try:
        info = os.stat(folder)
    except OSError:
        return [finding("ok", "data", "%s does not exist yet" % folder)]
    if info.st_uid != os.getuid():
        return [finding("problem", "data", "%s belongs to uid %d, not you (%d): orch keeps "
                        "agents' environments there; fix its owner" % (folder, info.st_uid,
                                                                      os.getuid()))]
    if info.st_mode & 0o077:
        return [finding("problem", "data", "%s is readable by others (mode %o) and holds agents' "
                        "environments: chmod 700 %s" % (folder, info.st_mode & 0o777, folder))]
    return [finding("ok", "data", "%s (mode 700)" % folder)]


def check_notify():
    """The notification channels, and whether the watcher that sends them runs."""
    channels = load_channels()
    if not channels:
        return [finding("ok", "notify", "no channels (`orch notify add` adds one)")]
    entries, _ = read_new_lines(notify_log_file(), 0)
    failed = [e for e in entries[-200:] if e.get("outcome") == "failed"]
    found = [finding("ok", "notify", "%d channels (%s); the watcher %s" % (
        len(channels), ", ".join(sorted(channels)), "runs" if watcher_running() else
        "is not running (it starts with the next spawn, resume or send)"))]
    if failed:
        found.append(finding("warning", "notify", "%d of the last %d notifications failed, the "
                             "last to %s: %s; see `orch notify log`" % (
                                 len(failed), min(200, len(entries)), failed[-1]["channel"],
                                 failed[-1].get("error"))))
    return found


def check_claude_settings():
    off = hooks_turned_off(os.getcwd())
    if off:
        return [finding("problem", "hooks", "%s in %s turns claude's hooks off: orch's claude "
                        "agents in tmux need them; remove it, or use --backend headless"
                        % (off[1], off[0]))]
    return [finding("ok", "hooks", "claude's settings leave hooks on (here, %s)" % os.getcwd())]


DOCTOR_CHECKS = (check_python, check_tmux, check_claude, check_claude_settings, check_codex,
                 check_gemini, check_opencode, check_copilot,
                 check_tmux_variable, check_state, check_data_dir, check_notify,
                 check_memory)


def cmd_doctor(args):
    findings = []
    for check in DOCTOR_CHECKS:
        try:        # one broken thing must not hide the report on the others
            findings += check()
        except OrchError as e:
            findings.append(finding("problem", check.__name__[len("check_"):], str(e)))
    if args.json:
        print_json_array(findings)
    else:
        for f in findings:
            print("%-8s %-7s %s" % (f["level"], f["check"], f["message"]))
    return EXIT_ERROR if any(f["level"] == "problem" for f in findings) else EXIT_OK


# ###########################################################################
# install: an `orch` command that starts from precompiled bytecode
# ###########################################################################
#
# `python3 orch.py` compiles the whole file on every run (Python caches
# bytecode only for imported modules).  install copies orch.py to
# PREFIX/lib/orch/, compiles it there once, and writes PREFIX/bin/orch, a
# five-line launcher that imports it with `python -I -S` (no site, no user
# environment: the interpreter's start-up at its floor).

LAUNCHER_MARK = "# orch launcher, written by `orch install`; `orch install --uninstall` removes it"


def install_paths(prefix):
    prefix = os.path.abspath(os.path.expanduser(prefix or "~/.local"))
    lib = os.path.join(prefix, "lib", "orch")
    return prefix, os.path.join(prefix, "bin", "orch"), lib, os.path.join(lib, "orch.py")


def is_our_launcher(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return LAUNCHER_MARK in f.read(4096)
    except OSError:
        return False


def cmd_install(args):
    import importlib.util
    import py_compile
    prefix, launcher, lib, module = install_paths(args.prefix)
    if args.uninstall:
        return uninstall(prefix, launcher, lib, module)
    if os.path.lexists(launcher) and not is_our_launcher(launcher):
        raise OrchError("%s exists and is not orch's launcher: remove it or choose another "
                        "--prefix" % launcher)
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        source = f.read()
    for folder in (os.path.dirname(launcher), lib):
        os.makedirs(folder, exist_ok=True)
    write_file_atomic(module, source, 0o644)
    # Compiled here, so it is fast even where PYTHONDONTWRITEBYTECODE is set.
    py_compile.compile(module, cfile=importlib.util.cache_from_source(module), doraise=True)
    write_file_atomic(launcher, "\n".join([
        "#!%s -IS" % sys.executable, LAUNCHER_MARK,
        "import sys", "sys.path.insert(0, %r)" % lib,
        "from orch import main, exit_now", "exit_now(main())", ""]), 0o755)
    print("installed orch %s: %s (runs %s, compiled for Python %d.%d)"
          % (__version__, launcher, module, sys.version_info[0], sys.version_info[1]))
    bin_dir = os.path.dirname(launcher)
    if bin_dir not in os.environ.get("PATH", "").split(":"):
        print("  %s is not on your PATH: add  export PATH=\"%s:$PATH\"  to your shell profile"
              % (bin_dir, bin_dir))
    return EXIT_OK


def uninstall(prefix, launcher, lib, module):
    """Remove exactly what install wrote, and the folders it made if they are now empty."""
    import importlib.util
    removed = []
    if is_our_launcher(launcher):
        os.unlink(launcher)
        removed.append(launcher)
    for path in (importlib.util.cache_from_source(module), module):
        if os.path.exists(path):
            os.unlink(path)
            removed.append(path)
    for folder in (os.path.join(lib, "__pycache__"), lib, os.path.join(prefix, "lib"),
                   os.path.join(prefix, "bin")):
        try:
            os.rmdir(folder)        # only if empty: other programs may live there
        except OSError:
            pass
    print("removed %s" % ", ".join(removed) if removed else "nothing to remove under %s" % prefix)
    return EXIT_OK


# ###########################################################################
# Agent kinds: everything that differs between agent programs
# ###########################################################################
#
# A kind owns what one agent CLI does its own way: how to find and start it,
# whether its hooks report its status (and so confirm messages), whether
# orch can read and answer its dialogs, and what to say where it cannot.
# Verbs ask kind_of(agent); none tests which kind it is.

class AgentKind(object):
    """What a kind answers unless it says otherwise."""
    hooks = True        # status, confirmations, replies and transcripts from its hooks
    dialogs = True      # permission dialogs orch reads off the screen and answers
    headless = False    # only claude speaks the headless backend's protocol
    environment = staticmethod(lambda agent, env: env)
    recheck = staticmethod(lambda agent, result, read_screen: None)    # hooks say it all
    # {resets_at} when a usage limit ended its failed turn (result), else None.
    usage_limit = staticmethod(lambda agent, result: result.get("limit"))
    # A dialog a usage limit opens (question, choice that waits for the reset and spends
    # nothing), which --on-limit continue answers with that choice.
    LIMIT_WAIT = None
    # The file its session's usage is written in when no hook named it, and how to read it.
    usage_file = staticmethod(lambda agent: None)
    fold_usage = staticmethod(lambda totals, entries: totals)
    usage_told = staticmethod(lambda agent: {})     # what else the CLI itself says of it
    ready = staticmethod(lambda agent: True)    # idle already means its input box is there
    # Its transcript where no hook event named it.
    own_transcript = staticmethod(lambda agent: claude_transcript(agent))
    dialog_colors = False   # its permission_dialog reads the screen with colours
    # A dialog of choices on its screen, by shape (choice_dialog), or one it draws its own way.
    choices_dialog = staticmethod(lambda rows, said=False: choice_dialog(rows, said))
    # Its last answer {t, text}: what orch's hook kept of its Stop.
    reply = staticmethod(lambda agent: read_json(os.path.join(agent_dir(agent["name"]),
                                                              "reply.json")))
    # Whether its screen shows text waiting for the running turn to end.
    shows_queued = staticmethod(lambda agent, text: shows_queued(agent, text))
    # The keys that answer the first screen it shows (st) where orch was asked to or
    # knows the answer (--trust, where the CLI takes trust from no setting); None: none.
    start_answer = staticmethod(lambda agent, st: None)
    # The keys that stop its turn or cancel its dialog, given its status: never an Enter.
    interrupt_keys = staticmethod(lambda st: ["Escape"])
    session_id = staticmethod(hooked_session_id)
    QUIT_REASONS = ()   # reasons of its SessionEnd that mean someone quit it (/exit)
    # gemini's is "exit" for /quit and SIGTERM alike (a shutdown too): it cannot tell.
    # The screens it may show before its input box that orch knows by name:
    # (needs, words on the screen, whether a key in its window answers it, what
    # else to do or None).
    FIRST_SCREENS = ()
    hooks_before_screens = False    # its hooks say it started while such a screen is up
    keys_lines = True   # each of its dialogs has a keys line ("Enter to confirm")
    # MiB its process tree holds, idle just after start (measured offline, 2026-12-04);
    # it grows as it works.
    START_MIB = None

    @classmethod
    def first_screen(cls, rows):
        """What stands between the CLI's start and its input box: {needs, question, fix} or None.

        A screen the kind names is known by its words; any other dialog by its
        shape (needs "dialog"), so a screen orch has never seen is no idle one.
        """
        dialog = choice_dialog(rows) or entry_dialog(rows)
        # Its words alone could be a resumed conversation quoting them: a dialog's shape too.
        found = known_screen(rows, cls.FIRST_SCREENS) if dialog or not cls.keys_lines else None
        if found:
            return found
        return dialog and {"needs": "dialog", "question": dialog["question"], "keys": True,
                           "fix": None}

    @classmethod
    def screen_start(cls, rows):
        """(status, needs, detail) its screen shows before its first hook, or None."""
        found = cls.first_screen(rows)
        return ("needs-input", found["needs"], found["question"]) if found else None

    @classmethod
    def sign_in_problem(cls):
        """Why this CLI would stop at a first-run screen here (doctor), or None: it reads only."""
        return None

    @classmethod
    def label(cls, agent):
        return cls.name

    @classmethod
    def ended_itself(cls, agent, st):
        """How an exited agent ended its own session (/exit), in words; None if not or unknown.

        A window still there tells by its exit code; after a reboot, only the
        CLI's own last word can: its SessionEnd, if its reason means a quit.
        """
        if st["exit_code"] == 0:
            return "exit code 0"
        if not cls.hooks:
            return None
        events = read_events(agent["name"], agent.get("launched", 0), tail_bytes=16384)
        last = events[-1] if events else {}
        if last.get("event") == "SessionEnd" and cls.quit(last):
            return last.get("reason") or "SessionEnd"
        return None

    @classmethod
    def quit(cls, event):
        """Whether its SessionEnd event says someone quit it, not a signal."""
        return event.get("reason") in cls.QUIT_REASONS


class ClaudeKind(AgentKind):
    name = "claude"
    option = "--agent claude"
    EVENTS = dict((event, event) for event in HOOK_EVENTS)    # orch's names are claude's
    headless = True     # `claude -p` runs under orch's supervisor too
    START_MIB = 210     # 2.1.332
    QUIT_REASONS = ("prompt_input_exit", "logout")      # signals say "other"
    # No hook fires before these are answered (2.1.197-2.1.332).
    FIRST_SCREENS = (("trust", r"trust this folder|one you trust|Do you trust the files", True,
                      None),
                     ("api-key", r"Do you want to use this API key\?", True, None))
    sign_in_problem = staticmethod(lambda: claude_sign_in_problem())
    usage_limit = staticmethod(lambda agent, result: claude_usage_limit(agent, result))
    # 2.1.197 opens /rate-limit-options at a subscription's limit.
    LIMIT_WAIT = (r"What do you want to do\?", r"Stop and wait for limit to reset")
    usage_file = staticmethod(lambda agent: transcript_path(agent))
    fold_usage = staticmethod(lambda totals, entries: claude_usage(totals, entries))
    usage_told = staticmethod(lambda agent: claude_status_line(agent))

    command = staticmethod(default_program)

    @staticmethod
    def program(args, agent=None):
        return find_program(args.claude or default_program())

    @staticmethod
    def new_session_id():
        import uuid
        return str(uuid.uuid4())    # claude takes it with --session-id

    @staticmethod
    def preflight(cwd, backend):
        if backend == "tmux":
            refuse_without_hooks(cwd)

    @staticmethod
    def trust(cwd, asked, worktree):
        """Trust the agent's folder as claude records it; True when it is."""
        # A worktree of a checkout claude trusts is as trustworthy as the checkout.
        if asked or worktree and claude_trusts(worktree["repo"]):
            trust_folder(worktree["path"] if worktree else cwd)
            return True
        return False

    @staticmethod
    def argv(agent, program, resume_id=None):
        return claude_argv(agent, program, resume_id)

    @staticmethod
    def session_id(agent):
        return backend_of(agent).session_id(agent)     # headless: from claude's own output

    typed_text = staticmethod(claude_typed_text)
    permission_dialog = staticmethod(dialog_on_screen)

    @staticmethod
    def recheck(agent, result, read_screen):
        """While claude retries an API error no hook fires: its screen says it retries."""
        if silent_at_work(result, read_screen):
            said = claude_retrying(read_screen())
            if said:
                result["detail"] = said

    @staticmethod
    def yes_once(dialog):
        """The keys that answer Yes once: the digit of the option that says just "Yes"."""
        digit = dialog["options"].get("Yes")
        return ["-l", digit] if digit else None


class CodexKind(AgentKind):
    """OpenAI's Codex CLI, with orch's hooks given on its command line (-c hooks.EVENT=...)."""
    name = "codex"
    option = "--agent codex"
    # Codex's hook events, and orch's name for each (the vocabulary replay_events reads).
    EVENTS = {"SessionStart": "SessionStart", "UserPromptSubmit": "UserPromptSubmit",
              "PreToolUse": "PreToolUse", "PostToolUse": "PostToolUse",
              "PermissionRequest": "PermissionRequest", "Stop": "Stop",
              "Interrupt": "Interrupted", "SessionEnd": "SessionEnd"}
    COMPOSER = "\u203a"     # "›": codex's input line, and its dialogs' cursor
    FIRST_SCREENS = (("trust", r"Trust this folder\?", True, None),
                     ("sign-in", r"Choose how you want to use Codex|Sign in with ChatGPT", False,
                      "run `codex login` in a shell (or `codex login --with-api-key`), or give "
                      "codex a model_provider of your own"))
    sign_in_problem = staticmethod(lambda: codex_sign_in_problem())
    quit = staticmethod(lambda event: True)    # SessionEnd on /quit only: none on signals
    START_MIB = 160     # 0.171.0, the node wrapper and the Rust binary
    fold_usage = staticmethod(lambda totals, entries: codex_usage(totals, entries))
    # 0.171.0 offers a cheaper model when a limit is near or reached.
    LIMIT_WAIT = (r"for lower credit usage\?|Approaching rate limits", r"Keep current model$")

    command = staticmethod(lambda: os.environ.get("ORCH_CODEX") or "codex")

    @staticmethod
    def program(args, agent=None):
        return find_program(CodexKind.command(), "OpenAI's Codex CLI "
                            "(npm install -g @openai/codex)", "ORCH_CODEX")

    @staticmethod
    def new_session_id():
        return None     # codex names it in its first hook

    @staticmethod
    def preflight(cwd, backend):
        refuse_project_codex_hooks(cwd)
        home = os.environ.get("CODEX_HOME") or os.path.join(os.path.expanduser("~"), ".codex")
        path = os.path.join(home, "config.toml")
        if codex_hooks_off(path):
            raise OrchError("codex's hooks are turned off (codex_hooks = false under [features] "
                            "in %s): orch reads each agent's status and confirms each message "
                            "through hooks of its own, and turning them on for its agents would "
                            "turn yours on too; remove the setting" % short_path(path))

    @staticmethod
    def trust(cwd, asked, worktree):
        """Whether to trust the folder on codex's command line (never in its config).

        A worktree of a checkout codex trusts is as trustworthy as the checkout.
        """
        return bool(asked or worktree and codex_trusts(worktree["repo"]))

    @staticmethod
    def argv(agent, program, resume_id=None):
        """codex with orch's hooks (-c, trusted for this process only) and --trust, if asked."""
        def toml(text):
            return json.dumps(text)     # a JSON string is a TOML basic string
        argv = [program, "--dangerously-bypass-hook-trust"]
        for event, ours in sorted(CodexKind.EVENTS.items()):
            argv += ["-c", "hooks.%s=[{hooks=[{type=\"command\",command=%s}]}]"
                     % (event, toml(hook_command(agent["name"], ours)))]
        if agent.get("trust"):
            argv += ["-c", "projects={%s={trust_level=\"trusted\"}}" % toml(agent["cwd"])]
        argv += agent.get("extra_args") or []
        return argv + (["resume", resume_id] if resume_id else [])

    @classmethod
    def screen_start(cls, rows):
        """Codex fires no hook until the first prompt: its input line, ready, means idle.

        Ready: the line under it names the model and folder ("m default · ~/src").
        Codex draws its input line before it has read its config and decided
        on folder trust; the trust screen can still replace it then (measured
        on 0.169.0: "? for shortcuts" under it, the trust screen 0.3 s later).
        """
        found = super(CodexKind, cls).screen_start(rows)
        if found:
            return found
        at = codex_composer_row(rows)
        under = [row for row in rows[at + 1:] if row.strip()][:1] if at is not None else []
        if under and choice_dialog(rows, said=True) is None and \
                re.match(r"^\s+\S.* \u00b7 .*[/~]", under[0]):
            return ("idle", None, None)
        return None

    @staticmethod
    def typed_text(agent):
        rows = capture_pane(agent["tmux"]["pane"], agent["tmux"]["socket"], colors=True)
        return codex_composer(rows) or ""

    @staticmethod
    def recheck(agent, result, read_screen):
        """An API error ends a codex turn with no hook: its rollout says so (0.169-0.171).

        Nor does one fire when its dialog is answered: gone from the screen, it was
        (a denial fires Interrupt), and its tool runs until PostToolUse.
        """
        if result["needs"] == "permission" and read_screen and \
                time.time() - (result["since"] or 0) > SETTLE and codex_dialog(read_screen()) is None:
            result.update(status="working", needs=None, detail=None, source="screen")
        if result["status"] == "working":
            failed = codex_failed_turn(agent)
            if failed:
                result.update(status="idle", source="transcript", **failed)
        if silent_at_work(result, read_screen):
            said = codex_retrying(read_screen())     # only its screen says it retries
            if said:
                result["detail"] = said

    @staticmethod
    def permission_dialog(rows):
        return codex_dialog(rows)

    @staticmethod
    def yes_once(dialog):
        """"Yes, proceed (y)": once; never "don't ask again"."""
        return ["-l", "y"] if any(text.startswith("Yes, proceed")
                                  for text in dialog["options"]) else None


SGR = "\x1b\\[[0-9;]*m"     # a colour or attribute code in capture-pane -e output


class GeminiKind(AgentKind):
    """Google's Gemini CLI, with orch's hooks in a private GEMINI_CLI_HOME layered on the user's."""
    name = "gemini"
    option = "--agent gemini"
    EVENTS = {"SessionStart": "SessionStart", "BeforeAgent": "UserPromptSubmit",
              "AfterAgent": "Stop", "BeforeTool": "PreToolUse", "AfterTool": "PostToolUse",
              "Notification": "PermissionRequest", "SessionEnd": "SessionEnd"}
    PLACEHOLDER = "Type your message or @path/to/file"
    CANCELLED = "Request cancelled."     # what it says when a dialog is cancelled (0.61.0)
    NO_REPLY = "[no response text]"     # its AfterAgent's answer for a turn that wrote none
    LOADING = ("Resuming session", "Executing Hook")    # input typed then can be lost
    FIRST_SCREENS = (("trust", r"Do you trust (this folder|the files in this folder)\?", True,
                      None),
                     ("sign-in", r"How would you like to authenticate", True,
                      "with GEMINI_API_KEY set, \"Use Gemini API Key\" takes it; run `gemini` "
                      "once in a terminal to be asked no more"),
                     # Shown after "Use Gemini API Key", the key from GEMINI_API_KEY filled in.
                     ("api-key", r"Enter Gemini API Key", True, None))
    hooks_before_screens = True     # SessionStart fires, then the sign-in screen (0.61.0)
    # At a quota it shows its usage-limit box: "Stop" ends the turn and spends nothing,
    # "Keep trying" asks the API again at once.
    LIMIT_WAIT = (r"^Usage limit reached for ", r"Stop$")
    choices_dialog = staticmethod(lambda rows, said=False: choice_dialog(rows, said)
                                  or gemini_limit_dialog(rows))
    START_MIB = 400     # 0.61.0, two node processes
    keys_lines = False  # its trust dialog has none (0.61.0); its input box rules out the rest
    sign_in_problem = staticmethod(lambda: gemini_sign_in_problem())
    fold_usage = staticmethod(lambda totals, entries: gemini_usage(totals, entries))

    command = staticmethod(lambda: os.environ.get("ORCH_GEMINI") or "gemini")

    @staticmethod
    def program(args, agent=None):
        return find_program(GeminiKind.command(), "Google's Gemini CLI "
                            "(npm install -g @google/gemini-cli)", "ORCH_GEMINI")

    new_session_id = staticmethod(ClaudeKind.new_session_id)    # gemini --session-id takes it

    @staticmethod
    def preflight(cwd, backend):
        """Refuse settings orch cannot read, or that turn hooks off, before a window opens."""
        user = os.path.join(os.path.expanduser("~"), ".gemini", "settings.json")
        for path in ("/etc/gemini-cli/settings.json", os.path.join(cwd, ".gemini",
                                                                    "settings.json"), user):
            found = gemini_settings(path).get("hooksConfig")
            if isinstance(found, dict) and found.get("enabled") is False:
                raise OrchError("gemini's hooks are turned off (hooksConfig.enabled false in %s): "
                                "orch reads each agent's status and confirms each message "
                                "through hooks of its own, and turning them on for its agents "
                                "would turn yours on too; remove the setting"
                                % short_path(path))

    @staticmethod
    def trust(cwd, asked, worktree):
        return bool(asked)          # a private trustedFolders.json for that agent (argv/home)

    @staticmethod
    def argv(agent, program, resume_id=None):
        make_gemini_home(agent)
        argv = [program] + (["--resume", resume_id] if resume_id
                            else ["--session-id", agent["session_id"]])
        return argv + (agent.get("extra_args") or [])

    @staticmethod
    def environment(agent, env):
        # gemini runs headless (and exits 42 for want of a prompt) whenever CI or
        # GITHUB_ACTIONS is "true", even on a terminal: orch's agents always have one.
        env = {k: v for k, v in env.items() if k not in ("CI", "GITHUB_ACTIONS")}
        return dict(env, GEMINI_CLI_HOME=gemini_home(agent["name"]))

    @classmethod
    def first_screen(cls, rows):
        """As for every kind, but nothing stands in the way while its input box is drawn."""
        if gemini_input(rows) is not None:
            return None
        return super(GeminiKind, cls).first_screen(rows)

    @staticmethod
    def ready(agent):
        """Its SessionStart fires while a resumed session still loads: wait for the box, idle.

        Before its first message since (re)start, also for a screen that holds
        still for half a second: it draws its box, then loads, then draws it again.
        """
        def settled():
            rows = agent_screen(agent)
            return gemini_input(rows) is not None and rows and not any(
                word in row for row in rows[-12:] for word in GeminiKind.LOADING) and rows
        first = settled()
        if not first or StatusCache().summary(agent)["last_prompt"] is not None:
            return bool(first)
        time.sleep(0.5)
        return settled() == first

    @staticmethod
    def typed_text(agent):
        text = gemini_input(agent_screen(agent))
        return "" if text in (None, GeminiKind.PLACEHOLDER) else text

    @staticmethod
    def permission_dialog(rows):
        return gemini_dialog(rows)

    @staticmethod
    def yes_once(dialog):
        """"Allow once" is choice 1, and Enter takes the choice under the cursor: check it."""
        return ["Enter"] if dialog.get("cursor") == "Allow once" else None

    @staticmethod
    def recheck(agent, result, read_screen):
        """No hook fires when a dialog is answered: a dialog gone from the screen was.

        Cancelled, gemini says so on screen ("Request cancelled."): idle.
        Otherwise it was approved and its tool runs until AfterTool: working.
        No hook fires at its usage-limit box either: working and silent, it may be there.
        """
        if silent_at_work(result, read_screen):
            limit = gemini_limit_dialog(read_screen())
            if limit:
                result.update(gemini_limited(agent, result, limit["said"]))
        if result["needs"] == "permission" and read_screen and \
                time.time() - (result["since"] or 0) > SETTLE:    # drawn after its hook
            rows = read_screen()
            if gemini_dialog(rows) is None:
                cancelled = any(GeminiKind.CANCELLED in row for row in rows[-15:])
                result.update(status="idle" if cancelled else "working", needs=None,
                              detail=None, source="screen")
        if result["status"] == "idle" and result.get("last_reply") == GeminiKind.NO_REPLY:
            failed = gemini_failed_turn(agent)      # an API error: its Stop says no more
            if failed:
                result.update(source="transcript", **failed)


# The word for a quota's 429 (Google's status): gemini's chat file keeps only its message.
QUOTA_ERROR = "RESOURCE_EXHAUSTED"
GEMINI_QUOTA_WORDS = (r"exceeded your current quota|exhausted your (daily )?quota|"
                      r"[Qq]uota exceeded|Usage limit reached")
# Below this many seconds gemini retries a quota's 429 itself (0.61.0's MAX_RETRYABLE_DELAY).
GEMINI_RETRIES_UNDER = 300


def gemini_failed_turn(agent):
    """{error, detail, failed[, limit]} when an API error ended gemini's last turn, from its chat file.

    Gemini fires AfterAgent (orch's Stop) with "[no response text]" and writes
    an `error` entry after the prompt: "[API Error: {"error": {..., "status":
    "INVALID_ARGUMENT"}}]" (0.61.0).  The status is its word for the error.
    A quota's error is its message alone ("You exceeded your current quota
    ... Suggested retry after 3600s."): limited, until then if it says.
    failed is the time of the entry before the error, as gemini_limited
    tells it while the usage-limit box is still up: one failure, told once.
    """
    failure, before = gemini_turn_failure(agent)
    if failure is None:
        return None
    word, text = "api_error", failure["content"]
    found = re.search(r"\{.*\}", text)
    try:
        word = json.loads(found.group(0))["error"]["status"] if found else word
    except (ValueError, KeyError, TypeError):
        pass
    result = {"error": str(word), "detail": short_text(text),
              "failed": before or rollout_time(failure)}
    if word == "api_error" and re.search(GEMINI_QUOTA_WORDS, text):
        delay = re.search(r"Suggested retry after ([0-9.]+)(ms|s)\b", text) or re.search(
            r"Please retry in ([0-9.]+)(ms|s)\b", text)
        seconds = delay and float(delay.group(1)) / (1000 if delay.group(2) == "ms" else 1)
        said = seconds if seconds and seconds > GEMINI_RETRIES_UNDER else None
        result.update(error=QUOTA_ERROR, limit={"resets_at": said and rollout_time(failure) + said})
    return result


def gemini_turn_failure(agent):
    """(the error entry that ended gemini's last turn or None, time of the entry before it).

    The time is that of its last prompt or answer when no error ended it (yet).
    """
    path = hooked_transcript(agent)
    failure, before, last = None, None, None
    for entry in read_json_lines(path, tail_bytes=65536) if path else []:
        kind = entry.get("type")
        if kind == "user":
            failure = None      # a later prompt: what failed before is past
        if kind == "error" and isinstance(entry.get("content"), str):
            failure, before = entry, last
        elif kind in ("user", "gemini") and entry.get("timestamp"):
            last = rollout_time(entry)
    return failure, before if failure else last


def gemini_limited(agent, result, said):
    """The status of a gemini at its usage-limit box: limited, until when it says, if it does."""
    failed = gemini_turn_failure(agent)[1] or result["since"]
    return {"status": "limited", "needs": "dialog", "detail": said, "error": QUOTA_ERROR,
            "failed": failed, "resets_at": gemini_reset(said, failed or time.time()),
            "source": "screen"}


def gemini_home(name):
    return os.path.join(agent_dir(name), "gemini-home")


def gemini_user_settings():
    """The user's own ~/.gemini/settings.json (an object), {} when there is none."""
    return gemini_settings(os.path.join(os.path.expanduser("~"), ".gemini", "settings.json"))


def gemini_settings(path):
    """A gemini settings file (JSON, // comments allowed) as an object, {} when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise OrchError("cannot read %s: %s" % (path, e.strerror or e))
    try:
        settings = json.loads(re.sub(r"(?m)^\s*//.*$", "", text) or "{}")
    except ValueError as e:
        raise OrchError("cannot read %s (%s): orch layers its hooks on your gemini settings, so "
                        "it must be able to read them" % (short_path(path), e))
    if not isinstance(settings, dict):
        raise OrchError("%s is not a JSON object" % short_path(path))
    return settings


def make_gemini_home(agent):
    """The agent's private GEMINI_CLI_HOME: the user's settings plus orch's hooks, the rest linked.

    gemini takes no extra settings file for one process; a home of its own
    does it without touching ~/.gemini.  Everything else there (auth, trusted
    folders, chats) is a link to the user's, so their login applies and
    `gemini --resume` finds the session; with --trust the agent gets a copy of
    trustedFolders.json with its folder added.
    """
    user = os.path.join(os.path.expanduser("~"), ".gemini")
    folder = make_private_dir(os.path.join(gemini_home(agent["name"]), ".gemini"))
    settings = gemini_user_settings()
    hooks = settings.get("hooks") if isinstance(settings.get("hooks"), dict) else {}
    for event, ours in sorted(GeminiKind.EVENTS.items()):
        entries = hooks.get(event) if isinstance(hooks.get(event), list) else []
        hooks[event] = entries + [{"hooks": [{"type": "command",
                                              "command": hook_command(agent["name"], ours)}]}]
    settings["hooks"] = hooks
    write_file_atomic(os.path.join(folder, "settings.json"), json.dumps(settings, indent=2))
    names = set(os.listdir(user)) if os.path.isdir(user) else set()
    for name in sorted(names | {"tmp", "history"}):
        mine, theirs = os.path.join(folder, name), os.path.join(user, name)
        if name == "settings.json" or name == "trustedFolders.json" and agent.get("trust"):
            continue
        if name in ("tmp", "history") and not os.path.lexists(theirs):
            os.makedirs(theirs, 0o700, exist_ok=True)   # where gemini itself keeps chats
        if not os.path.lexists(mine):
            os.symlink(theirs, mine)
    if agent.get("trust"):
        trusted = read_json(os.path.join(user, "trustedFolders.json"))
        trusted = dict(trusted if isinstance(trusted, dict) else {}, **{agent["cwd"]:
                                                                        "TRUST_FOLDER"})
        write_file_atomic(os.path.join(folder, "trustedFolders.json"), json.dumps(trusted))


def gemini_input(rows):
    """What gemini's input box (" > …" under a rule) shows, or None when there is none."""
    for i in range(len(rows) - 1, 0, -1):
        if rows[i].startswith(" > ") and any(is_rule(r) for r in rows[max(0, i - 4):i]):
            return rows[i][3:].strip()
    return None


def gemini_dialog(rows):
    """Gemini's permission dialog as dialog_on_screen returns claude's, plus the cursor's choice.

    It is drawn in a box ("│ … │"); its choices are "● 1. Allow once", "2. Allow
    for this session", "3. No, suggest changes (esc)", with no keys line.
    """
    inner = [re.sub(r"^\s*\u2502 ?|\s*\u2502\s*$", "", row) for row in rows]
    for i in range(len(inner) - 1, -1, -1):
        if not inner[i].strip().endswith("?"):
            continue
        options, cursor = {}, None
        for row in inner[i + 1:i + 8]:
            found = re.match(r"^\s*(\u25cf\s*)?(\d)\.\s+(\S.*?)\s*$", row)
            if found:
                options[found.group(3)] = found.group(2)
                cursor = found.group(3) if found.group(1) else cursor
        if options and cursor:
            return {"question": inner[i].strip(), "options": options, "cursor": cursor,
                    "above": inner[max(0, i - 30):i]}
    return None


# Gemini's box when a quota ends its turn (0.61.0), and its words for when access returns.
GEMINI_LIMIT = r"^Usage limit reached for \S.*"
GEMINI_RESETS = r"Access resets at (\d{1,2}):(\d\d) ([AP]M) ([A-Za-z][\w+:-]*)"


def gemini_limit_dialog(rows):
    """Gemini's usage-limit box as choice_dialog returns a dialog, plus all it says, or None.

    "Usage limit reached for m." / "Access resets at 2:39 AM UTC." (when the
    API said how long) / "● 1. Keep trying" / "2. Stop": no keys line, no "?",
    and no input box while it is up (a reply quoting it sits above one).
    """
    if gemini_input(rows) is not None:
        return None
    inner = [row.strip() for row in unboxed(rows[-40:])]
    starts = [i for i, row in enumerate(inner) if re.match(GEMINI_LIMIT, row)]
    if not starts:
        return None
    choices, cursor, said = {}, None, []
    for row in inner[starts[-1]:]:
        found = re.match(CHOICE_ROW, row)
        if found:
            choices[int(found.group(2))] = found.group(3)
            cursor = int(found.group(2)) if found.group(1) else cursor
        elif row and not choices and not re.match(r"^([\u2500-\u257f]+|/.*)$", row):
            said.append(row)        # not its rules, nor its hints ("/model to switch models.")
    if cursor is None or sorted(choices) != list(range(1, len(choices) + 1)):
        return None
    return {"question": said[0], "choices": choices, "cursor": cursor, "keys": "",
            "said": " ".join(said)}


def gemini_reset(said, after):
    """The epoch time "Access resets at 2:39 AM UTC" names (the next such after `after`), or None.

    Said to the minute: access may return as late as that minute's end.
    """
    found = re.search(GEMINI_RESETS, said or "")
    if not found:
        return None
    hour, minute, half, zone = found.groups()
    when = clock_time(int(hour) % 12 + (12 if half == "PM" else 0), int(minute), zone, after)
    return when and when + 60


def codex_retrying(rows):
    """"retrying: Server is busy (last status: 429 …), attempt 3/5" from codex's screen, or None.

    0.169.0-0.171.0, at a 429: "◦ Server is busy, reconnecting 3/5 (9s • esc to
    interrupt)" over "└ Exceeded retry limit, last status: 429 Too Many Requests";
    at a 503: "◦ Reconnecting... 1/5 (3s • …)" over "└ Unexpected status 503 …, url: …".
    """
    rows = rows[-20:]
    for i in range(len(rows) - 1, -1, -1):
        found = re.match(r"^[\u25e6\u2022]\s+(?:(\S.*?),? )?[Rr]econnecting(?:\.\.\.)? "
                         r"(\d+/\d+)\b", rows[i])
        if found:
            under = rows[i + 1].strip() if i + 1 < len(rows) else ""
            under = re.sub(r",? url: \S+$", "", under[1:].strip()) \
                if under.startswith("\u2514") else ""
            last = re.search(r"last status: (.+)$", under)
            why = "%s (last status: %s)" % (found.group(1), last.group(1)) \
                if found.group(1) and last else found.group(1) or under or "an API error"
            return "retrying: %s, attempt %s" % (why, found.group(2))
    return None


def codex_composer_row(rows):
    """The index of codex's input line (the last "›" line that is no choice), or None."""
    for i in range(len(rows) - 1, -1, -1):
        plain = re.sub(SGR, "", rows[i])
        if plain.startswith(CodexKind.COMPOSER) and not re.match(CHOICE_ROW, plain):
            return i
    return None


def codex_composer(rows):
    """The text typed in codex's input line ('' for its dimmed hint), or None when there is none.

    rows may carry colours (capture-pane -e): the hint is drawn dim, typed text is not.
    """
    at = codex_composer_row(rows)
    if at is None:
        return None
    rest = re.sub("^(%s)*%s(%s)*\\s?" % (SGR, CodexKind.COMPOSER, SGR), "", rows[at])
    return "" if rest.startswith("\x1b[2m") else re.sub(SGR, "", rest).strip()


def codex_dialog(rows):
    """Codex's approval dialog as dialog_on_screen returns claude's: {question, options, above}."""
    found = choice_dialog(rows, said=True)
    if not found:
        return None
    first = max(i for i, row in enumerate(rows) if re.match(CHOICE_ROW, row) and
                row.strip().startswith((CodexKind.COMPOSER + " 1.", "1.")))
    above = rows[max(0, first - 30):first]
    question = next((row.strip() for row in reversed(above) if row.strip().endswith("?")),
                    found["question"])
    return {"question": question, "above": above,
            "options": dict((text, str(n)) for n, text in found["choices"].items())}


def codex_failed_turn(agent):
    """{error, detail, failed, since, limit} when codex's rollout ends the current turn on an error.

    Codex writes `task_complete` with an `error` (its own `codex_error_info`
    names the kind, e.g. response_too_many_failed_attempts after a 429,
    usage_limit_exceeded at a usage limit) and fires no Stop.  Only the tail
    of the rollout is read.
    """
    events = read_events(agent["name"], agent.get("launched", 0), tail_bytes=32768)
    turns = [e.get("turn_id") for e in events if e.get("event") == "UserPromptSubmit"]
    paths = [e.get("transcript_path") for e in events if e.get("transcript_path")]
    if not turns or not turns[-1] or not paths:
        return None
    entries = read_json_lines(paths[-1], tail_bytes=16384)
    for i in range(len(entries) - 1, -1, -1):
        payload = entries[i].get("payload")
        if not isinstance(payload, dict) or payload.get("type") != "task_complete" \
                or payload.get("turn_id") != turns[-1]:
            continue
        error = payload.get("error")
        if not isinstance(error, dict):
            return None
        info = error.get("codex_error_info")
        kind = sorted(info)[0] if isinstance(info, dict) and info else str(info or "unknown")
        when = rollout_time(entries[i])
        limit = codex_limit(entries[:i], error.get("message"), when) \
            if kind == "usage_limit_exceeded" else None
        return {"error": kind, "detail": short_text(error.get("message")), "failed": when,
                "since": when, "limit": limit}
    return None


def rollout_time(entry):
    import calendar
    stamp = str(entry.get("timestamp") or "")
    try:
        return calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + float(
            "0" + stamp[19:].rstrip("Z"))
    except ValueError:
        return time.time()


def codex_limit(entries, message, when):
    """{resets_at} of the limit codex hit: its rate-limit windows, else its words.

    Each `token_count` carries the windows codex last heard of (primary,
    secondary); a full one (100%) has its reset time.  Its message says the
    same in local time: "try again at 9:20 PM."
    """
    for entry in reversed(entries):
        payload = entry.get("payload")
        if isinstance(payload, dict) and payload.get("type") == "token_count":
            resets = full_window_reset(payload.get("rate_limits"), "used_percent")
            if resets:
                return {"resets_at": resets}
            break
    found = re.search(r"try again at (\d{1,2}):(\d\d) ([AP]M)", message or "")
    if not found:
        return {"resets_at": None}
    hour = int(found.group(1)) % 12 + (12 if found.group(3) == "PM" else 0)
    return {"resets_at": next_time(time.mktime, time.localtime(when), hour, int(found.group(2)),
                                   when)}


def short_text(value, n=300):
    return value[:n] if isinstance(value, str) else None


def codex_trusts(path):
    """True if codex's config marks path or a folder above it trusted."""
    home = os.environ.get("CODEX_HOME") or os.path.join(os.path.expanduser("~"), ".codex")
    try:
        with open(os.path.join(home, "config.toml"), encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError):
        return False
    trusted = set()
    for table in re.split(r"(?m)^\s*\[", text):
        found = re.match(r'projects\."((?:[^"\\]|\\.)*)"\s*\]', table)
        if found and re.search(r'(?m)^\s*trust_level\s*=\s*"trusted"', table):
            trusted.add(found.group(1).replace('\\"', '"').replace("\\\\", "\\"))
    return within(path, trusted)


def within(path, folders):
    """True if path, or a folder above it, is one of folders."""
    path = os.path.abspath(path)
    while path not in folders:
        if path == os.path.dirname(path):
            return False
        path = os.path.dirname(path)
    return True


def codex_hooks_off(path):
    """True when the codex config at path sets features.codex_hooks = false (no hook fires)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    if re.search(r"(?m)^\s*features\.codex_hooks\s*=\s*false\b", text):
        return True
    for table in re.split(r"(?m)^\s*\[", text):
        if re.match(r"features\s*\]", table) and \
                re.search(r"(?m)^\s*codex_hooks\s*=\s*false\b", table):
            return True
    return False


def refuse_project_codex_hooks(cwd):
    """Refuse a folder whose own codex hooks --dangerously-bypass-hook-trust would run untrusted.

    orch gives codex its hooks on the command line, which codex runs only
    with that flag; the flag also skips codex's trust check for a project's
    own hooks (a cloned repository's .codex/), so orch will not use it there.
    """
    folder = os.path.abspath(cwd)
    while True:
        for name in ("hooks.json", "config.toml"):
            path = os.path.join(folder, ".codex", name)
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if name == "hooks.json" or re.search(r"(?m)^\s*\[+\s*hooks\b|^\s*hooks\s*[.=]", text):
                raise OrchError("%s has codex hooks of its own: orch starts codex with "
                                "--dangerously-bypass-hook-trust to give it orch's hooks, which "
                                "would run these without codex's trust check; remove them or "
                                "start this agent with --cmd" % short_path(path))
        if folder == os.path.dirname(folder):
            return
        folder = os.path.dirname(folder)


class OpencodeKind(AgentKind):
    """OpenCode, with a plugin of orch's given to that one process (OPENCODE_CONFIG_CONTENT)."""
    name = "opencode"
    option = "--agent opencode"
    # What its plugin hears (opencode's hooks and events), and orch's words it says for each.
    EVENTS = {"init": ("SessionStart",), "session.created": ("SessionStart",),
              "chat.message": ("UserPromptSubmit",), "permission.asked": ("PermissionRequest",),
              "permission.replied": ("PreToolUse", "Working"),
              "session.status": ("Retrying", "Working"),
              "session.idle": ("Stop", "StopFailure", "Interrupted")}
    START_MIB = 880     # 1.18.33: one Bun process
    PLACEHOLDER = "Ask anything\u2026"

    command = staticmethod(lambda: os.environ.get("ORCH_OPENCODE") or "opencode")

    @staticmethod
    def program(args, agent=None):
        return find_program(OpencodeKind.command(), "OpenCode (npm install -g opencode-ai)",
                            "ORCH_OPENCODE")

    @staticmethod
    def new_session_id():
        return None     # opencode names it when the first prompt creates it

    @staticmethod
    def preflight(cwd, backend):
        opencode_config_content()       # the user's own, which orch's plugin joins
        if os.environ.get("OPENCODE_PURE") not in (None, "", "0", "false"):
            raise OrchError("OPENCODE_PURE is set: opencode then loads no plugins, and orch "
                            "reads each agent's status and confirms each message through a "
                            "plugin of its own; unset it for orch's agents")

    @staticmethod
    def trust(cwd, asked, worktree):
        return bool(asked)      # opencode asks no folder trust (1.18.33): nothing to answer

    @staticmethod
    def argv(agent, program, resume_id=None):
        extra = agent.get("extra_args") or []
        if "--pure" in extra:
            raise OrchError("--pure makes opencode load no plugins, and orch reads each "
                            "agent's status through a plugin of its own; leave it out")
        return [program] + (["--session", resume_id] if resume_id else []) + extra

    @staticmethod
    def environment(agent, env):
        """orch's plugin joins the user's OPENCODE_CONFIG_CONTENT: their plugins still load."""
        config = opencode_config_content(env.get("OPENCODE_CONFIG_CONTENT"))
        plugin = "file://" + install_script("orch-opencode-plugin.js", OPENCODE_PLUGIN)
        config["plugin"] = [p for p in config.get("plugin") or [] if p != plugin] + [plugin]
        return dict(env, OPENCODE_CONFIG_CONTENT=json.dumps(config),
                    ORCH_OPENCODE_EVENTS=events_path(agent["name"]))

    @staticmethod
    def ready(agent):
        return opencode_input(agent_screen(agent)) is not None

    @staticmethod
    def typed_text(agent):
        text = opencode_input(agent_screen(agent))
        return "" if not text or text.startswith(OpencodeKind.PLACEHOLDER) else text

    dialog_colors = True
    permission_dialog = staticmethod(lambda rows: opencode_dialog(rows))

    @staticmethod
    def yes_once(dialog):
        """"Allow once", which Enter takes when it is the one picked: check it is."""
        return ["Enter"] if dialog.get("cursor") == "Allow once" else None

    # One Escape only arms it ("esc again to interrupt"); at a dialog the first rejects.
    interrupt_keys = staticmethod(lambda st: ["Escape", "Escape"] if st["status"] == "working"
                                  else ["Escape"])
    fold_usage = staticmethod(lambda totals, entries: opencode_usage(totals, entries))

    @staticmethod
    def first_screen(rows):
        return None     # no first-run, sign-in or trust screen (1.18.33)


def opencode_config_content(text=None):
    """The user's OPENCODE_CONFIG_CONTENT as a dict ({} if unset); refuse what is not JSON."""
    text = os.environ.get("OPENCODE_CONFIG_CONTENT") if text is None else text
    if not text:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise OrchError("OPENCODE_CONFIG_CONTENT is not a JSON object; orch adds its plugin to "
                        "it for its agents: fix or unset it")
    return found


def opencode_box(rows):
    """The inner rows of opencode's prompt box (its ┃ rows over the ╹▀ bottom), or None.

    Its sidebar shares the box's rows, right of where the bottom edge ends.
    """
    for i in range(len(rows) - 1, -1, -1):
        if rows[i].lstrip().startswith("\u2579\u2580"):
            end = rows[i].rfind("\u2580") + 1
            inner = []
            for row in reversed(rows[:i]):
                if not row.lstrip().startswith("\u2503"):
                    break
                inner.insert(0, row[:end].lstrip()[1:].strip())
            return inner or None
    return None


def opencode_input(rows):
    """What its prompt box holds ('' when empty); None while no box (or a dialog) is up."""
    inner = opencode_box(rows)
    if inner is None or any("Permission required" in row for row in inner):
        return None
    # The last row names the agent and model ("Build · Fake M"); the text is above it.
    return " ".join(row for row in inner[:-1] if row)


OPENCODE_CHOICES = ("Allow once", "Allow always", "Reject")


def opencode_dialog(colored):
    """opencode's permission dialog, from its screen in colour: {question, options, above, cursor}.

    Its choices sit on one row ("Allow once   Allow always   Reject"); the
    picked one is drawn on a background the others do not share (1.18.33),
    whatever the theme.
    """
    rows = [re.sub(SGR, "", row) for row in colored]
    for i in range(len(rows) - 1, -1, -1):
        if all(label in rows[i] for label in OPENCODE_CHOICES):
            top = [j for j in range(i) if "Permission required" in rows[j]]
            if not top:
                return None
            backs = dict((label, back) for label, back in zip(
                OPENCODE_CHOICES, backgrounds(colored[i], OPENCODE_CHOICES)))
            picked = [label for label in OPENCODE_CHOICES
                      if list(backs.values()).count(backs[label]) == 1]
            return {"question": rows[top[-1]].strip(" \u2503\u25b3"),
                    "options": dict((label, label) for label in OPENCODE_CHOICES),
                    "above": rows[top[-1]:i], "cursor": picked[0] if len(picked) == 1 else None}
    return None


def backgrounds(row, labels):
    """The background colour each label starts on in a row captured with colours (-e)."""
    back, text, at = None, "", []
    for piece in re.split("(%s)" % SGR, row):
        if re.match(SGR, piece or ""):
            codes = piece[2:-1].split(";")
            for n, code in enumerate(codes):
                if code in ("", "0", "49"):
                    back = None
                elif code == "48":
                    back = ";".join(codes[n:n + (3 if codes[n + 1:n + 2] == ["5"] else 5)])
            continue
        at += [back] * len(piece)
        text += piece
    return [at[text.index(label)] if label in text else None for label in labels]


OPENCODE_PLUGIN = r'''// orch's plugin for one opencode process: what it does, in orch's words.
// It appends one JSON line per event to $ORCH_OPENCODE_EVENTS and keeps the
// conversation beside it (what `orch log` reads). Plain JS: it imports no package.
import { appendFileSync, writeFileSync, renameSync } from "node:fs"
import { createHash, randomBytes } from "node:crypto"
import { dirname, join } from "node:path"
const EVENTS = process.env.ORCH_OPENCODE_EVENTS
const HERE = EVENTS ? dirname(EVENTS) : ""
const LOG = join(HERE, "conversation.jsonl")
// Python's str.split(): the hook compares words, whatever the spacing.
const SPACE = /[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/
const words = (text) => text.split(SPACE).filter(Boolean).join(" ")
const put = (path, line) => {
  try { appendFileSync(path, JSON.stringify(line) + "\n", { mode: 0o600 }) } catch (e) {}
}
const tell = (line) => put(EVENTS, Object.assign({ t: Date.now() / 1000 }, line))
const keep = (name, value) => {     // whole, then renamed: a reader never sees half of it
  const path = join(HERE, name), tmp = path + "." + randomBytes(8).toString("hex") + ".tmp"
  try { writeFileSync(tmp, JSON.stringify(value), { mode: 0o600, flag: "wx" }); renameSync(tmp, path) } catch (e) {}
}
export const OrchEvents = async () => {
  if (!EVENTS) return {}
  const role = {}, answer = {}, turn = {}, usage = {}
  tell({ event: "SessionStart", source: "startup", transcript_path: LOG })
  const end = (sid) => {
    const now = turn[sid]
    if (!now) return                  // opencode says idle twice
    delete turn[sid]
    const seconds = (Date.now() - now.began) / 1000
    if (now.error) {
      put(LOG, { type: "opencode.turn", ok: false, subtype: now.error.name, seconds })
      tell({ event: "StopFailure", session_id: sid, error: now.error.name,
             last_assistant_message: now.error.detail.slice(0, 200) })
    } else if (now.aborted) {
      put(LOG, { type: "opencode.turn", ok: false, subtype: "interrupted", seconds })
      tell({ event: "Interrupted", session_id: sid })
    } else {
      const text = answer[sid] || ""
      put(LOG, { type: "opencode.turn", ok: true, seconds })
      keep("reply.json", { t: Date.now() / 1000, text, session_id: sid })
      tell({ event: "Stop", session_id: sid, last_assistant_message: text.slice(0, 200) })
    }
  }
  return {
    "chat.message": async (input, output) => {
      const sid = input.sessionID
      const raw = (output.parts || []).filter((p) => p.type === "text" && !p.synthetic)
        .map((p) => p.text).join("\n")
      const text = words(raw)
      if (!turn[sid]) turn[sid] = { began: Date.now() }
      answer[sid] = ""
      put(LOG, { type: "opencode.user", text: raw })
      const line = { event: "UserPromptSubmit", session_id: sid, prompt: text.slice(0, 200),
                     prompt_sha: createHash("sha256").update(text, "utf8").digest("hex") }
      if (text.length <= 4096) line.prompt_text = text
      tell(line)
    },
    event: async ({ event }) => {
      const p = event.properties || {}, sid = p.sessionID
      if (event.type === "session.created") {
        tell({ event: "SessionStart", source: "new", session_id: p.info && p.info.id || sid,
               transcript_path: LOG })
      } else if (event.type === "message.updated" && p.info) {
        role[p.info.id] = p.info.role
      } else if (event.type === "message.part.updated" && p.part) {
        const part = p.part
        if (part.type === "text" && part.time && part.time.end && role[part.messageID] === "assistant" && !part.synthetic) {
          answer[sid] = part.text
          put(LOG, { type: "opencode.text", text: part.text })
        } else if (part.type === "tool" && part.state && (part.state.status === "completed" || part.state.status === "error")) {
          put(LOG, { type: "opencode.tool", tool: part.tool, input: part.state.input,
                     output: String(part.state.output || part.state.error || "").slice(0, 2000),
                     error: part.state.status === "error" })
        } else if (part.type === "step-finish" && part.tokens) {
          usage.last = part.tokens
        }
      } else if (event.type === "session.updated" && p.info && p.info.tokens) {
        const now = JSON.stringify([p.info.tokens, p.info.cost, usage.last])
        if (now !== usage.told) {
          usage.told = now
          put(LOG, { type: "opencode.usage", tokens: p.info.tokens, cost: p.info.cost,
                     last: usage.last || null })
        }
      } else if (event.type === "session.status" && p.status) {
        if (p.status.type === "retry") {
          if (turn[sid]) turn[sid].retrying = true
          tell({ event: "Retrying", session_id: sid, attempt: p.status.attempt,
                 message: String(p.status.message || "").slice(0, 200),
                 next: typeof p.status.next === "number" ? p.status.next / 1000 : undefined })
        } else if (p.status.type === "busy" && turn[sid] && turn[sid].retrying) {
          turn[sid].retrying = false
          tell({ event: "Working", session_id: sid })
        }
      } else if (event.type === "session.error" && turn[sid]) {
        const e = p.error || {}, data = e.data || {}
        if (e.name === "MessageAbortedError") turn[sid].aborted = true
        else turn[sid].error = { name: e.name || "unknown", detail: [data.statusCode, data.message || e.message].filter(Boolean).join(" ") }
      } else if (event.type === "permission.asked") {
        const input = {}
        for (const [k, v] of Object.entries(p.metadata || {})) if (typeof v === "string") input[k] = v.slice(0, 300)
        tell({ event: "PermissionRequest", session_id: sid, tool_name: p.permission, tool_input: input })
      } else if (event.type === "permission.replied") {
        // Allowed, its tool runs; rejected, the turn ends (its idle comes next).
        tell({ event: p.reply === "reject" ? "Working" : "PreToolUse", session_id: sid })
      } else if (event.type === "session.idle") {
        end(sid)
      }
    },
  }
}
'''


def opencode_usage(totals, entries):
    """Fold the usage lines orch's plugin keeps: opencode's own session totals and cost."""
    totals = dict(totals)
    for entry in entries:
        if entry.get("type") != "opencode.usage" or not isinstance(entry.get("tokens"), dict):
            continue
        tokens = entry["tokens"]
        cache = tokens.get("cache") if isinstance(tokens.get("cache"), dict) else {}
        totals["tokens"] = [number_or_zero(tokens.get("input")),
                            number_or_zero(tokens.get("output")) +
                            number_or_zero(tokens.get("reasoning")),
                            number_or_zero(cache.get("read")), number_or_zero(cache.get("write"))]
        if isinstance(entry.get("cost"), (int, float)):
            totals["cost"] = round(entry["cost"], 6)
        last = entry.get("last")
        if isinstance(last, dict) and isinstance(last.get("total"), int):
            totals["context"] = last["total"]
    return totals


class CopilotKind(AgentKind):
    """GitHub's Copilot CLI, with orch's hooks in a plugin folder given to it (--plugin-dir)."""
    name = "copilot"
    option = "--agent copilot"
    # Copilot's hook events, and orch's name for each.  Its notification of a
    # permission prompt fires once the dialog is drawn; permissionRequest,
    # before it, names the tool.  errorOccurred fires on each failed model call.
    EVENTS = {"sessionStart": "SessionStart", "userPromptSubmitted": "UserPromptSubmit",
              "preToolUse": "PreToolUse", "postToolUse": "PostToolUse",
              "postToolUseFailure": "PostToolUse", "permissionRequest": "PermissionRequest",
              "notification": "Notification", "agentStop": "Stop",
              "errorOccurred": "Retrying", "sessionEnd": "SessionEnd"}
    # At every start in a folder it does not trust, resume included; and resuming a
    # session whose process was killed (SIGKILL, a reboot): its lock is left (1.0.102).
    FIRST_SCREENS = (("trust", r"Do you trust the files in this folder\?", True, None),
                     ("in-use", r"appears to be in use by another CLI", True, None))
    START_MIB = 350     # 1.0.102: the node loader and its native binary
    # SessionEnd says "user_exit" for /exit, Ctrl+C and SIGTERM alike: it cannot tell.

    command = staticmethod(lambda: os.environ.get("ORCH_COPILOT") or "copilot")

    @staticmethod
    def program(args, agent=None):
        return find_program(CopilotKind.command(), "GitHub Copilot CLI "
                            "(npm install -g @github/copilot)", "ORCH_COPILOT")

    new_session_id = staticmethod(ClaudeKind.new_session_id)    # --session-id takes it

    @staticmethod
    def preflight(cwd, backend):
        pass        # its settings' disableAllHooks leaves --plugin-dir hooks on (1.0.102)

    @staticmethod
    def trust(cwd, asked, worktree):
        """Whether to answer its trust question for this agent (a trusted checkout's worktree)."""
        return bool(asked or worktree and copilot_trusts(worktree["repo"]))

    @staticmethod
    def argv(agent, program, resume_id=None):
        folder = make_copilot_plugin(agent["name"])
        return [program, "--plugin-dir", folder] + (
            ["--resume=" + resume_id] if resume_id else ["--session-id=" + agent["session_id"]]
        ) + (agent.get("extra_args") or [])

    own_transcript = staticmethod(lambda agent: copilot_transcript(agent))
    usage_file = staticmethod(lambda agent: transcript_path(agent))
    fold_usage = staticmethod(lambda totals, entries: copilot_usage(totals, entries))
    reply = staticmethod(lambda agent: copilot_reply(agent))

    @staticmethod
    def ready(agent):
        return copilot_input(agent_screen(agent)) is not None

    @staticmethod
    def typed_text(agent):
        return copilot_input(agent_screen(agent)) or ""

    @staticmethod
    def permission_dialog(rows):
        return copilot_dialog(rows)

    @staticmethod
    def yes_once(dialog):
        """"1. Yes" (once), by its digit; never "don't ask again"."""
        digit = dialog["options"].get("Yes")
        return ["-l", digit] if digit else None

    @staticmethod
    def interrupt_keys(st):
        # Escape cancels a dialog; a turn stops on Ctrl+C (Escape twice would rewind
        # it, and Ctrl+C twice at its prompt quits): nothing while idle.
        return {"needs-input": ["Escape"], "working": ["C-c"]}.get(st["status"], [])

    @staticmethod
    def recheck(agent, result, read_screen):
        """What no hook says, its transcript does: a turn cancelled or given up on an API
        error, a dialog approved (its tool runs until postToolUse)."""
        if result["status"] in ("working", "needs-input"):
            said = copilot_since(agent, result["since"] or 0)
            if said and (said["status"] == "idle" or result["status"] == "needs-input"):
                result.update(said, needs=None, detail=said.get("detail"), source="transcript")
        elif result["status"] == "idle" and read_screen and \
                time.time() - (result["since"] or 0) < SETTLE:
            # A message typed during the turn waits on screen until the turn ends, then
            # runs as a turn of its own: its hook fires only as it starts.
            if any(COPILOT_PENDING in row for row in read_screen()):
                result.update(status="working", pending=True, source="screen")

    shows_queued = staticmethod(lambda agent, text: copilot_queued(agent_screen(agent), text))

    @staticmethod
    def start_answer(agent, st):
        """--trust: "2. Yes, and remember this folder", which copilot records itself.

        "Resume anyway" to its session-in-use question, but only when no
        process holds the session: every pid its lock files name is gone.
        """
        if st["needs"] == "trust" and agent.get("trust"):
            return ["-l", "2"]
        if st["needs"] == "in-use" and not copilot_session_holders(agent):
            return ["-l", "1"]
        return None

    # Never signed in, and no provider of the user's: its input line is drawn under
    # this, and nothing typed there gets an answer (1.0.102).
    SIGN_IN = ("sign-in", r"Please use /login to sign in to use Copilot", False,
               "run `copilot` in a terminal and /login, or give it a token "
               "(COPILOT_GITHUB_TOKEN or GH_TOKEN) or a provider of your own "
               "(COPILOT_PROVIDER_BASE_URL)")

    @classmethod
    def first_screen(cls, rows):
        return known_screen(rows, (cls.SIGN_IN,)) or super(CopilotKind, cls).first_screen(rows)

    @classmethod
    def screen_start(cls, rows):
        """No hook fires before its first prompt: its input line, drawn, means idle."""
        found = super(CopilotKind, cls).screen_start(rows)
        if found or copilot_input(rows) is None or choice_dialog(rows, said=True):
            return found
        return ("idle", None, None)


def copilot_home():
    return os.environ.get("COPILOT_HOME") or os.path.join(os.path.expanduser("~"), ".copilot")


def make_copilot_plugin(name):
    """The plugin folder copilot is given: a manifest and orch's hooks, in the agent's folder."""
    folder = os.path.join(make_private_dir(agent_dir(name)), "copilot-plugin")
    make_private_dir(os.path.join(folder, "hooks"))
    write_file_atomic(os.path.join(folder, "plugin.json"), json.dumps(
        {"name": "orch-status", "version": "1.0.0", "description": "orch's status hooks"}))
    hooks = dict((event, [{"type": "command", "bash": hook_command(name, ours), "timeoutSec": 10}])
                 for event, ours in sorted(CopilotKind.EVENTS.items()))
    write_file_atomic(os.path.join(folder, "hooks", "hooks.json"),
                      json.dumps({"version": 1, "hooks": hooks}))
    return folder


def copilot_trusts(path):
    """Whether copilot's config lists path (or a folder above it) as trusted."""
    try:
        with open(os.path.join(copilot_home(), "config.json"), encoding="utf-8") as f:
            text = f.read()
        # "managed automatically", with // comment lines above the JSON
        found = json.loads("\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//")))
    except (OSError, ValueError):
        return False
    folders = found.get("trustedFolders") if isinstance(found, dict) else None
    return within(path, set(d.rstrip("/") or "/" for d in folders or [] if isinstance(d, str)))


def copilot_session_holders(agent):
    """The live copilot processes whose lock files (inuse.PID.lock) hold the agent's session."""
    folder = os.path.dirname(copilot_transcript(agent))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    held = []
    for name in names:
        found = re.match(r"inuse\.(\d+)\.lock$", name)
        try:
            with open("/proc/%s/cmdline" % found.group(1), "rb") as f:
                program = f.read().split(b"\0")[:2]    # its binary, or node running it
            if any(os.path.basename(arg) == b"copilot" for arg in program):
                held.append(int(found.group(1)))
        except (AttributeError, OSError):
            pass        # not a lock file, or its process is gone
    return held


def copilot_transcript(agent):
    return os.path.join(copilot_home(), "session-state", hooked_session_id(agent) or "none",
                        "events.jsonl")


def copilot_time(entry):
    """Seconds since the epoch of a transcript entry's "2026-12-06T21:18:46.116Z", or 0."""
    import calendar
    stamp = entry.get("timestamp")
    try:
        whole, _, part = stamp.rstrip("Z").partition(".")
        return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + (part or "0"))
    except (AttributeError, ValueError):
        return 0


def copilot_since(agent, since):
    """What copilot's transcript says happened after since that no hook told, or None.

    A turn ended (a cancel; an API error it gave up on): {status: idle, error};
    a dialog answered Yes: {status: working}.
    """
    for entry in reversed(read_json_lines(transcript_path(agent), tail_bytes=32768)):
        if copilot_time(entry) <= since or entry.get("type") in ("user.message",
                                                                  "permission.requested"):
            return None     # nothing since, or a dialog (again) up: as the hooks said
        data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
        if entry.get("type") == "abort":
            return {"status": "idle", "error": None}
        if entry.get("type") == "session.error":
            return {"status": "idle", "error": data.get("errorType") or "error",
                    "detail": short_text(data.get("message"))}
        if entry.get("type") == "permission.completed" and \
                (data.get("result") or {}).get("kind") == "approved":
            return {"status": "working"}
    return None


def copilot_reply(agent):
    """The last answer in copilot's transcript: {t, text}, or None.

    Copilot may write the turn's end a moment after its agentStop hook fired.
    """
    path = transcript_path(agent)
    transcript_settled(agent, path)
    for entry in reversed(read_json_lines(path, tail_bytes=262144)):
        data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
        if entry.get("type") == "assistant.message" and data.get("content"):
            return {"t": copilot_time(entry), "text": data["content"]}
    return None


def copilot_usage(totals, entries):
    """Fold copilot's usage records: each model call's tokens and the cost it states."""
    totals = dict(totals)
    for entry in entries:
        data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
        usage = data.get("usage")
        if entry.get("type") != "session.usage_record" or not isinstance(usage, dict):
            continue
        counts = [number_or_zero(usage.get(key)) for key in (
            "inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens")]
        counts[0] -= counts[2]      # its input counts the cached part, as OpenAI's does
        totals["tokens"] = [a + b for a, b in zip(totals.get("tokens") or [0] * 4, counts)]
        totals["context"] = counts[0] + counts[1] + counts[2] + counts[3]
        if isinstance(usage.get("cost"), (int, float)):
            totals["cost"] = round((totals.get("cost") or 0) + usage["cost"], 6)
    return totals


def copilot_input(rows):
    """What copilot's input line holds ('' when empty), or None while it is not drawn."""
    for i in range(len(rows) - 1, 0, -1):
        if rows[i].startswith(PROMPT_MARK) and is_rule(rows[i - 1]):
            return rows[i][len(PROMPT_MARK):].strip()
    return None


def copilot_dialog(rows):
    """Its permission dialog as {question, options: {text: digit}, above, cursor}, or None."""
    found = choice_dialog(rows)
    if not found or not found["question"].startswith("Do you want to"):
        return None
    at = max(i for i, row in enumerate(rows) if found["question"] in row)
    return {"question": found["question"], "cursor": found.get("cursor"),
            "options": dict((text, str(n)) for n, text in found["choices"].items()),
            "above": rows[max(0, at - 30):at]}


COPILOT_PENDING = "[pending \u00b7 \u2191 recall]"    # under a message waiting for the turn


def copilot_queued(rows, text):
    """True when its screen lists text as pending: "❯ text" over "└ [pending · ↑ recall]"."""
    head = normalize_prompt(text)[:30]
    return any(row.lstrip().startswith(PROMPT_MARK) and head in normalize_prompt(row)
               and COPILOT_PENDING in rows[i + 1] for i, row in enumerate(rows[:-1]))


class CommandKind(AgentKind):
    """Any other program (--cmd): a terminal and a screen, nothing more to read."""
    name = "command"
    option = "--cmd"
    hooks = False
    dialogs = False

    @staticmethod
    def program(args, agent=None):
        check_command(agent["cmd"] if agent else args.cmd)
        return None

    @staticmethod
    def new_session_id():
        return None

    @staticmethod
    def preflight(cwd, backend):
        pass

    @staticmethod
    def trust(cwd, asked, worktree):
        return False

    @staticmethod
    def argv(agent, program, resume_id=None):
        # From a file, not `sh -c CMD`: a command may carry a key, and argv is public.
        script = os.path.join(make_private_dir(agent_dir(agent["name"])), "cmd.sh")
        write_file_atomic(script, agent["cmd"] + "\n")
        return ["/bin/sh", script]

    @staticmethod
    def session_id(agent):
        return None

    @staticmethod
    def label(agent):
        return agent["cmd"]

    @staticmethod
    def screen_start(rows):
        return None     # a program of the user's: orch knows none of its screens

    typed_text = staticmethod(lambda agent: "")
    permission_dialog = staticmethod(lambda rows: None)
    yes_once = staticmethod(lambda dialog: None)

    @staticmethod
    def unsupported(agent, what):
        """The refusal for a verb this kind cannot serve: what it is, and what still works."""
        return OrchError("agent %s runs a command of its own (--cmd), which %s: `orch tail %s` "
                         "shows its screen, `orch attach %s` takes its keyboard"
                         % (agent["name"], what, agent["name"], agent["name"]))


KINDS = {"claude": ClaudeKind, "codex": CodexKind, "gemini": GeminiKind,
         "opencode": OpencodeKind, "copilot": CopilotKind, "command": CommandKind}


def kind_of(agent):
    return KINDS[agent.get("agent") or ("command" if agent.get("cmd") else "claude")]


# ###########################################################################
# Backends: tmux windows or orch's own supervisor
# ###########################################################################
#
# Verbs ask backend_of(agent) to start, confirm, send, tail, attach,
# interrupt or stop, and where its conversation and answers are; they never
# test agent["backend"] themselves.  A tmux agent runs claude (or --cmd) in a
# window; a headless one runs `claude -p` under orch's supervisor.  Only
# statuses() looks inside, to ask tmux once for every tmux agent.

class TmuxBackend(object):
    name = "tmux"
    dialogs = True      # claude's permission dialogs are on its screen, for approve and deny

    @staticmethod
    def preflight(cwd):
        check_tmux_version()

    @staticmethod
    def start(agent, program, prompt, resume_id=None):
        """Open the agent's window; confirm_start pastes the prompt once it is ready."""
        start_in_tmux(agent, kind_of(agent).argv(agent, program, resume_id=resume_id))

    @staticmethod
    def reply(agent):
        return kind_of(agent).reply(agent)

    confirm_start = staticmethod(tmux_confirm_start)
    send = staticmethod(tmux_send)
    tail = staticmethod(tmux_tail)
    attach = staticmethod(tmux_attach)
    interrupt = staticmethod(tmux_interrupt)
    stop = staticmethod(tmux_stop)
    conversation = staticmethod(transcript_path)
    settle = staticmethod(transcript_settled)
    session_id = staticmethod(hooked_session_id)


class HeadlessBackend(object):
    name = "headless"
    dialogs = False     # claude -p denies what needs permission: nothing to approve

    @staticmethod
    def preflight(cwd):
        pass            # no tmux, and no hooks: claude's own output says it all

    @staticmethod
    def start(agent, program, prompt, resume_id=None):
        start_headless(agent, headless_argv(agent, program, resume_id=resume_id))

    @staticmethod
    def conversation(agent):
        return hpath(agent["name"], "log")

    @staticmethod
    def settle(agent, path):
        pass            # orch writes that log itself, as claude prints

    @staticmethod
    def reply(agent):
        return headless_reply(agent["name"])

    confirm_start = staticmethod(headless_confirm_start)
    send = staticmethod(headless_send)
    tail = staticmethod(headless_tail)
    attach = staticmethod(headless_attach)
    interrupt = staticmethod(headless_interrupt)
    stop = staticmethod(headless_stop)
    session_id = staticmethod(headless_session_id)


BACKENDS = {"tmux": TmuxBackend, "headless": HeadlessBackend}


def backend_of(agent):
    return BACKENDS[agent.get("backend", "tmux")]


# ###########################################################################
# Command line
# ###########################################################################

EPILOG = """\
examples:
  orch spawn fix-tests "make the failing tests pass" --cwd ~/src/app
  orch send fix-tests "also update the changelog"
  orch list                   # every agent and what it is doing
  orch wait fix-tests && orch reply fix-tests     # its answer, as plain text
  orch log fix-tests -f       # the conversation: messages, answers, tool calls
  orch send --idle "run the tests"                # one message to many agents
  orch events --json          # one line per status change, for scripts
  orch approve fix-tests --tool Bash              # Yes, once, to the dialog it shows
  orch attach fix-tests       # take the keyboard (detach: prefix d)
  orch spawn api "add paging" --worktree          # its own git checkout, branch orch/api
  orch spawn review "review the diff" --agent codex   # or gemini, opencode, copilot
  orch diff api               # what it changed; `orch rm api` keeps uncommitted work
  orch --host build1 spawn fix "make it build"    # any verb on another machine, over ssh
  orch send fix@build1 "and run the tests"        # NAME@HOST wherever a name goes
  orch list --all-hosts       # every host's agents in one table
  orch resume --all           # after a reboot: every agent nobody stopped on purpose

exit codes:
  0 ok   1 error   2 usage or bad name   3 agent not running
  4 refused: agent waits at a dialog, or someone's text is in its input box
  5 message not confirmed as submitted   6 wait timed out
  7 submitted, but joined with text orch did not send
  8 the last turn ended on an error (wait, reply)   130 interrupted

environment:
  ORCH_STATE  ORCH_TMUX_SOCKET  ORCH_SESSION  ORCH_CLAUDE  ORCH_CODEX  ORCH_GEMINI
  ORCH_OPENCODE  ORCH_COPILOT
  ORCH_BACKEND  ORCH_TRACE=1  ORCH_AGENT (set in each agent: its spawns record it as parent)
  ORCH_HOST (as --host)  ORCH_HOSTS=a,b  ORCH_SSH_CONFIG (ssh -F FILE)
  seconds: ORCH_START_TIMEOUT  ORCH_SEND_TIMEOUT  ORCH_KILL_GRACE  ORCH_TMUX_TIMEOUT
           ORCH_MEMORY_WAIT

something off? `orch doctor`
"""


def add_target_options(p):
    p.add_argument("--socket", help="tmux socket name (-L) or path (default $ORCH_TMUX_SOCKET)")
    p.add_argument("--session", help="tmux session (default $ORCH_SESSION or 'orch')")
    p.add_argument("--claude", help="claude program (default $ORCH_CLAUDE or 'claude')")


def add_spawn(sub, verb):
    p = sub.add_parser(verb, help="start an agent with a first task",
                       description="Start an agent in its own tmux window (or headless).")
    p.add_argument("name")
    p.add_argument("prompt", nargs="?", help="first message; '-' reads stdin")
    p.add_argument("--prompt-file", metavar="FILE", help="read the first message from FILE")
    p.add_argument("--cwd", metavar="DIR", help="working folder (default: current)")
    p.add_argument("--agent", choices=("claude", "codex", "gemini", "opencode", "copilot"),
                   help="the agent CLI: claude (the default; $ORCH_CLAUDE), codex "
                        "($ORCH_CODEX), gemini ($ORCH_GEMINI), opencode ($ORCH_OPENCODE) or "
                        "copilot ($ORCH_COPILOT); "
                        "arguments after -- go to it")
    p.add_argument("--cmd", metavar="COMMAND",
                   help="run this shell command line instead of claude (no hooks)")
    p.add_argument("--raw", action="store_true",
                   help="send a leading '/' or '!' as a command, not as text")
    p.add_argument("--trust", action="store_true",
                   help="trust DIR the CLI's own way (claude: ~/.claude.json; codex and gemini: "
                        "for this agent only) and skip its trust dialog")
    p.add_argument("--backend", choices=("auto", "tmux", "headless"),
                   help="tmux window or headless claude -p (default $ORCH_BACKEND or auto: "
                        "tmux when installed)")
    p.add_argument("--worktree", action="store_true",
                   help="give the agent a git worktree of its own: a new branch of DIR's "
                        "repository, checked out outside your checkout")
    p.add_argument("--branch", metavar="BRANCH",
                   help="the worktree's branch (default orch/NAME); an existing one is "
                        "checked out as it is")
    p.add_argument("--base", metavar="REF",
                   help="where a new branch starts (default: HEAD of DIR's checkout)")
    add_on_limit(p)
    add_target_options(p)
    p.set_defaults(func=cmd_spawn, extra=[])


def add_on_limit(p, kept=""):
    p.add_argument("--on-limit", choices=("continue", "report"),
                   help="when a usage limit stops a turn: continue sends one short message a "
                        "minute after the limit resets; report (the default) only says it%s"
                   % kept)


def add_send(sub, verb):
    p = sub.add_parser(verb, help="submit a message to a running agent (or to many)",
                       description="Type MESSAGE into the agent and confirm it was submitted. "
                       "With --to, --all or --idle: into each of those agents at once, one "
                       "line per agent; the exit code is the worst outcome "
                       "(1 > 7 > 5 > 4 > 3 > 0).",
                       usage="orch send NAME [MESSAGE] [options]\n"
                             "       orch send (--to A,B,... | --all | --idle) [MESSAGE] [options]")
    p.add_argument("name", nargs="?")
    p.add_argument("message", nargs="?", help="the message; omitted or '-' reads stdin")
    p.add_argument("--to", metavar="A,B,...", help="send to these agents")
    p.add_argument("--all", action="store_true", help="send to every agent that is running")
    p.add_argument("--idle", action="store_true", help="send to every agent that is idle now")
    p.add_argument("--raw", action="store_true",
                   help="send a leading '/' or '!' as a command (e.g. /compact)")
    p.add_argument("--force", action="store_true",
                   help="clear text someone left in the input box first; type even at a "
                        "dialog (Enter answers it!)")
    p.add_argument("--if-idle", action="store_true",
                   help="type nothing, exit 4, when the agent is busy with a turn")
    p.add_argument("--when-idle", action="store_true",
                   help="if the agent is busy, hold the message and type it when its turn ends")
    p.add_argument("--cancel-held", action="store_true",
                   help="drop the messages held for the agent")
    p.add_argument("--wait", action="store_true",
                   help="then wait for that turn to end and print its answer")
    p.add_argument("--kept", action="store_true",
                   help="type the first message orch kept when the agent stopped at a screen "
                        "before its input box (after you answered it yourself)")
    p.add_argument("--timeout", type=SECONDS, metavar="SECONDS",
                   help="seconds to wait for confirmation (default 10)")
    p.set_defaults(func=cmd_send)


def add_log(sub, verb):
    p = sub.add_parser(verb, help="print the conversation: messages, answers, tool calls",
                       description="Print the agent's conversation, not its screen: your "
                       "messages (>), its answers, one line per tool call and result, turn "
                       "ends. From claude's own transcript (tmux) or its output (headless).")
    p.add_argument("name")
    p.add_argument("-n", "--lines", type=LINES, metavar="ENTRIES",
                   help="the last ENTRIES entries (default 40)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new entries until the agent exits")
    p.add_argument("--json", action="store_true", help="one JSON object per entry")
    p.set_defaults(func=cmd_log)


def add_reply(sub, verb):
    p = sub.add_parser(verb, help="print the agent's last complete answer",
                       description="Print the agent's last complete answer as plain text "
                       "(exit 3 if it has not finished a turn yet).")
    p.add_argument("name")
    p.add_argument("--json", action="store_true",
                   help="print {name, reply, time, status} as JSON")
    p.set_defaults(func=cmd_reply)


def add_tail(sub, verb):
    p = sub.add_parser(verb, help="print the agent's screen")
    p.add_argument("name")
    p.add_argument("-n", "--lines", type=LINES, metavar="LINES", help="last LINES lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--raw", action="store_true", help="headless: print the raw stream-json")
    p.set_defaults(func=cmd_tail)


def add_named(help_text, func):
    """An adder for a verb whose only argument is the agent's name."""
    def add(sub, verb):
        p = sub.add_parser(verb, help=help_text)
        p.add_argument("name")
        p.set_defaults(func=func)
    return add


def add_dialog(help_text, func):
    """An adder for approve/deny: a name and an optional --tool that must match."""
    def add(sub, verb):
        p = sub.add_parser(verb, help=help_text)
        p.add_argument("name")
        p.add_argument("--tool", metavar="TOOL",
                       help="refuse unless the dialog is about this tool (e.g. Bash)")
        if verb == "approve":
            p.add_argument("--choice", metavar="N", type=number_type(int, 1, 99, "a choice number"),
                           help="pick choice N of a dialog no hook describes (a picker, "
                           "a prompt of a new claude): orch never guesses one")
        p.set_defaults(func=func)
    return add


def add_list(sub, verb):
    p = sub.add_parser(verb, help="every agent and its status")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.add_argument("-w", "--watch", action="store_true",
                   help="redraw the table every 2 s until Ctrl-C, agents that need input first")
    p.add_argument("-A", "--all-hosts", action="store_true",
                   help="this machine's agents and those of every host in $ORCH_HOSTS or "
                        "~/.config/orch/hosts, with a HOST column")
    p.add_argument("--sort", choices=sorted(SORT_KEYS),
                   help="most first: context used, cost, or memory (RSS); not as a tree")
    p.set_defaults(func=cmd_list)


def add_events(sub, verb):
    p = sub.add_parser(verb, help="a live feed of status changes until Ctrl-C",
                       description="Print one line each time an agent's status changes "
                       "(time, agent, old -> new, needs, detail), until Ctrl-C.")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these agents (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per change")
    p.add_argument("--since", type=SECONDS, default=0, metavar="SECONDS",
                   help="first, the agents whose status changed in the last SECONDS")
    p.set_defaults(func=cmd_events)


def add_status_line(sub, verb):
    p = sub.add_parser(verb, help="one short line of counts, for tmux's status-right")
    p.set_defaults(func=cmd_status_line)


def add_doctor(sub, verb):
    p = sub.add_parser(verb, help="check what orch needs: python, tmux, claude, state, data")
    p.add_argument("--json", action="store_true", help="print a JSON array of findings")
    p.set_defaults(func=cmd_doctor)


def add_install(sub, verb):
    p = sub.add_parser(verb, help="install an `orch` command that starts fast (precompiled)")
    p.add_argument("--prefix", metavar="DIR", help="install into DIR/bin and DIR/lib/orch "
                   "(default ~/.local)")
    p.add_argument("--uninstall", action="store_true", help="remove what install wrote")
    p.set_defaults(func=cmd_install)


def add_wait(sub, verb):
    p = sub.add_parser(verb, help="block until agents are idle, exited or need input",
                       usage="orch wait (NAME... | --all) [--any] [--timeout SECONDS] "
                             "[--until STATUS]")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--any", action="store_true",
                   help="return as soon as the first of them settles, and print that one")
    p.add_argument("--all", action="store_true", help="wait on every running agent")
    p.add_argument("--timeout", type=SECONDS, metavar="SECONDS",
                   help="give up after SECONDS (exit 6); 0 checks once")
    p.add_argument("--until", choices=("idle", "exited", "needs-input"))
    p.set_defaults(func=cmd_wait)


def add_kill(sub, verb):
    p = sub.add_parser(verb, help="stop an agent, keep its record",
                       description="Stop the agent (SIGTERM, then SIGKILL after "
                       "$ORCH_KILL_GRACE s) and keep its record: `resume NAME` continues it; "
                       "`resume --all` leaves it stopped. The agents it started keep running "
                       "unless --tree.")
    p.add_argument("name")
    p.add_argument("--tree", action="store_true",
                   help="also stop every agent it started, and theirs")
    p.set_defaults(func=cmd_kill)


def add_rm(sub, verb):
    p = sub.add_parser(verb, help="stop and forget agents",
                       description="Stop and forget agents. The agents one started stay, "
                       "as top-level agents, unless --tree.")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--tree", action="store_true",
                   help="also stop and forget every agent each one started, and theirs")
    p.add_argument("--exited", action="store_true", help="remove every exited agent")
    p.add_argument("--force", action="store_true",
                   help="remove a worktree even with uncommitted work in it (it is lost)")
    p.add_argument("--delete-branch", action="store_true",
                   help="delete a worktree agent's branch too, if its base has every commit "
                        "of it (with --force: whatever it has)")
    p.set_defaults(func=cmd_rm)


def add_diff(sub, verb):
    p = sub.add_parser(verb, help="what a worktree agent changed against its base",
                       description="Show what the agent changed in its worktree against the "
                       "commit its branch started from: commits, uncommitted changes and new "
                       "files, as `git diff` shows them (pager and colours as git's own).")
    p.add_argument("name")
    p.add_argument("--stat", action="store_true", help="a summary per file (git diff --stat)")
    p.set_defaults(func=cmd_diff)


def add_resume(sub, verb):
    p = sub.add_parser(verb, help="start an exited agent again in the same conversation "
                       "(--all: every agent a reboot stopped)",
                       usage="orch resume NAME [MESSAGE] [options]\n"
                             "       orch resume --all [--stagger SECONDS] [--min-free MIB] "
                             "[--all-hosts]")
    p.add_argument("name", nargs="?")
    p.add_argument("message", nargs="?", help="a message to deliver; '-' reads stdin")
    p.add_argument("--all", action="store_true",
                   help="every agent whose process is gone though nobody stopped it: not "
                        "those stopped with `orch kill` or ended by their own /exit")
    p.add_argument("--stagger", type=SECONDS, default=1.0, metavar="SECONDS",
                   help="with --all: seconds between two starts (default 1)")
    p.add_argument("--min-free", type=number_type(int, 0, 1 << 30, "a number of MiB"),
                   default=500, metavar="MIB", help="with --all: before each start, wait "
                   "while less memory than this is available (default 500; 0: never wait)")
    p.add_argument("-A", "--all-hosts", action="store_true",
                   help="with --all: also on every host in $ORCH_HOSTS or ~/.config/orch/hosts, "
                        "at once")
    add_on_limit(p, " (kept from spawn unless given)")
    add_target_options(p)
    p.set_defaults(func=cmd_resume)


def add_notify(sub, verb):
    p = sub.add_parser(verb, help="tell you when agents need you: webhook, ntfy or a command",
                       description="Channels that get an event when an agent needs input, "
                       "finishes a turn, fails or exits; a watcher of orch's sends them.",
                       usage="orch notify add NAME (--webhook URL | --ntfy URL | --exec COMMAND)"
                             " [--on EVENTS] [--agents PATTERN]\n"
                             "       orch notify (list | log) [--json]\n"
                             "       orch notify (rm | test) NAME")
    p.add_argument("action", choices=("add", "list", "rm", "test", "log"))
    p.add_argument("name", nargs="?")
    p.add_argument("--webhook", metavar="URL", help="POST each event as JSON ('-': from stdin)")
    p.add_argument("--ntfy", metavar="URL", help="an ntfy topic URL ('-': from stdin)")
    p.add_argument("--exec", dest="exec_", metavar="COMMAND",
                   help="run COMMAND with the event as JSON on stdin and in ORCH_EVENT")
    p.add_argument("--on", metavar="EVENTS",
                   help="comma list of %s (default %s)" % (",".join(NOTIFY_EVENTS),
                                                           ",".join(NOTIFY_DEFAULT)))
    p.add_argument("--agents", metavar="PATTERN", help="only agents whose name matches ('web-*')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_notify)


def add_watch(sub, verb):
    p = sub.add_parser(verb)     # internal, no help: the watcher that sends notifications
    p.set_defaults(func=cmd_watch)


def add_supervise(sub, verb):
    p = sub.add_parser(verb)     # internal, no help: runs a headless agent
    p.add_argument("folder")
    p.set_defaults(func=cmd_supervise)


VERBS = (
    ("spawn", add_spawn),
    ("send", add_send),
    ("reply", add_reply),
    ("log", add_log),
    ("tail", add_tail),
    ("diff", add_diff),
    ("attach", add_named("take the keyboard of an agent's window", cmd_attach)),
    ("list", add_list),
    ("ls", add_list),
    ("events", add_events),
    ("status-line", add_status_line),
    ("wait", add_wait),
    ("approve", add_dialog("answer Yes (once) to the permission dialog the agent shows, or "
                           "pick --choice N of another dialog",
                           cmd_approve)),
    ("deny", add_dialog("cancel the agent's dialog (Escape, or its \"no\"): a tool asked "
                        "about does not run",
                        cmd_deny)),
    ("interrupt", add_named("stop the agent's current turn (it stays alive)", cmd_interrupt)),
    ("kill", add_kill),
    ("rm", add_rm),
    ("resume", add_resume),
    ("doctor", add_doctor),
    ("notify", add_notify),
    ("install", add_install),
    ("_supervise", add_supervise),
    ("_watch", add_watch),
)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `orch: error:` line (exit 2) like any other."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        argparse.ArgumentParser.__init__(self, *args, **kwargs)

    def error(self, message):
        raise OrchError("%s (see `%s --help`)" % (message, self.prog), EXIT_USAGE)


class Formatter(argparse.HelpFormatter):
    """argparse's help, without importing shutil to learn the width: 1.6 ms of every start.

    argparse makes one for every option it adds, not only for --help.
    """

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        argparse.HelpFormatter.__init__(self, prog, indent_increment, max_help_position,
                                        width or terminal_width() - 2)


class RawFormatter(Formatter, argparse.RawDescriptionHelpFormatter):
    """The same, keeping the description's own line breaks."""


def terminal_width():
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def build_parser(only=None):
    """Build the command line; with only=VERB just that verb (start-up time matters)."""
    parser = Parser(
        prog="orch", description="Run and steer many AI coding agents in tmux.",
        epilog=EPILOG, formatter_class=RawFormatter)
    parser.add_argument("--version", action="version", version="orch " + __version__)
    parser.add_argument("--host", metavar="HOST",
                        help="run the verb on HOST over ssh (default $ORCH_HOST); must come "
                             "first")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    for verb, add in VERBS:
        if only in (None, verb):
            add(sub, verb)
    return parser


def split_extra(argv):
    """Split `spawn ... -- EXTRA CLAUDE ARGS` so argparse never sees claude's own flags."""
    if argv[:1] == ["spawn"] and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:       # the fast path: no parser to build
        print("orch " + __version__)
        return EXIT_OK
    try:
        return run_verb(argv)
    except OrchError as e:
        sys.stderr.write("orch: error: %s\n" % e)
        return e.code
    except KeyboardInterrupt:
        sys.stderr.write("orch: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `orch list | head` stopped reading: not a failure worth a word, but
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as e:
        # The machine said no (permissions, a full disk, a missing folder): not a bug.
        where = " %s:" % e.filename if e.filename else ""
        sys.stderr.write("orch: error:%s %s\n" % (where, e.strerror or e))
        return EXIT_ERROR
    except Exception as e:
        if os.environ.get("ORCH_TRACE"):
            raise
        sys.stderr.write("orch: error: unexpected %s: %s. This is a bug in orch; run again "
                         "with ORCH_TRACE=1 to see where, and report it\n"
                         % (type(e).__name__, shorten(str(e), 200)))
        return EXIT_ERROR


def exit_now(code):
    """Flush and leave without the interpreter's teardown.

    Freeing every module and object at exit is ~4 ms of a ~35 ms `orch list`
    at 300 agents.  By the time main() returns, every file orch wrote is
    closed and synced, and no thread of its own is left with work to do.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass        # a reader that went away: nothing more to say to it
    os._exit(code or 0)


def utf8_output():
    """Make stdout and stderr UTF-8 whatever the locale (Python 3.6 in a C locale uses ASCII)."""
    import io
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if (getattr(stream, "encoding", "") or "").lower().replace("-", "") != "utf8" \
                and hasattr(stream, "buffer"):
            setattr(sys, name, io.TextIOWrapper(stream.buffer, encoding="utf-8",
                                                errors="replace", line_buffering=True))


def run_verb(argv):
    """Parse argv and run its verb; every failure is raised, main() reports it."""
    import signal
    utf8_output()
    # Over a file-size limit (ulimit -f) a write should fail with an error
    # orch can report, not kill it half-way.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    argv = [decode_argument(a, i + 1) for i, a in enumerate(argv)]
    host, argv = split_host(argv)
    if host is not None and (not argv or argv[0].startswith("-")):
        return run_remote(host, argv, None)         # --version, --help: the remote's own
    typed = list(argv)
    argv, extra = split_extra(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in dict(VERBS):
        raise OrchError("unknown verb %r: see `orch --help`" % argv[0], EXIT_USAGE)
    parser = build_parser(argv[0] if argv and argv[0] in dict(VERBS) else None)
    args, rest = parser.parse_known_args(argv)
    # argparse fills an optional positional before later flags (`send a --raw /x`
    # leaves /x over); put a single leftover where it belongs.
    text_field = {"spawn": "prompt", "send": "message", "resume": "message"}.get(args.verb)
    if text_field and len(rest) == 1 and getattr(args, text_field) is None \
            and not rest[0].startswith("-"):
        setattr(args, text_field, rest.pop())
    if rest:
        parser.error("unrecognized arguments: %s" % " ".join(rest))
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if args.verb == "spawn":
        args.extra = extra
    if host is not None:
        return run_remote(host, typed, args)
    named = named_hosts(args)
    if named:
        return run_by_host(typed, args, named)
    return args.func(args)


if __name__ == "__main__":
    exit_now(main())
