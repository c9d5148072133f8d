"""Coarse classifier of agent bash commands into tool categories.

Shared by the importers (``traces.importers.miniswe``, ``lmcache_agent``,
``sweagent``). ``classify_command(cmd)`` returns one of ``CATEGORIES``; see
its docstring for the rules.
"""

from __future__ import annotations

import re
import shlex

__all__ = ["CATEGORIES", "classify_command"]

# Tool categories, most significant first (a command chain gets the most
# significant category of its parts).
CATEGORIES = ("submit", "edit", "test", "install", "python", "git", "read", "grep", "find", "other")
_RANK = {c: i for i, c in enumerate(CATEGORIES)}

_SUBMIT_RE = re.compile(r"\becho\s+['\"]?(COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT|MINI_SWE_AGENT_FINAL_OUTPUT)\b")
_HEREDOC_RE = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
_PY_WRITE_RE = re.compile(
    r"open\([^)]*,\s*(?:mode\s*=\s*)?['\"][wax]|\.write_text\(|\.write_bytes\(|"
    r"shutil\.(?:copy\w*|move)\(|os\.(?:remove|rename|replace|unlink)\("
)
_REDIRECT_RE = re.compile(r"(?<![0-9&>])>>?\s*([^\s&|;>]+)")
_ASSIGN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PY_RE = re.compile(r"^(?:python|python3|python3\.\d+|python2(?:\.\d+)?|pypy3?|py)$")

_READ = {"cat", "head", "tail", "less", "more", "nl", "wc", "awk", "gawk", "hexdump", "xxd", "od",
         "strings", "diff", "cmp", "bat", "view"}
_GREP = {"grep", "egrep", "fgrep", "rg", "ag", "ack", "zgrep"}
_FIND = {"find", "ls", "tree", "pwd", "locate", "fd", "du", "stat", "file", "realpath", "which", "whereis"}
_TEST = {"pytest", "py.test", "tox", "nox", "nosetests", "nose2", "trial"}
_PKG = {"pip", "pip3", "conda", "mamba", "micromamba", "apt", "apt-get", "yum", "dnf", "uv", "poetry"}
_PKG_VERBS = {"install", "uninstall", "add", "remove", "sync", "develop"}
_PREFIX_WORDS = {"do", "then", "else", "elif", "if", "while", "until", "{", "(", "!", "time", "sudo",
                 "nohup", "command", "exec", "env", "stdbuf", "nice"}
_SKIP_WORDS = {"cd", "pushd", "popd", "export", "set", "unset", "source", ".", "for", "select", "done",
               "fi", "esac", "case", "}", ")", "true", "false", ":", "sleep", "clear"}


# --------------------------------------------------------------------------- classifier


def _split_shell(line: str) -> list[list[str]]:
    """Split one command line into ``&&``/``||``/``;``/``&`` parts, each a list of
    ``|`` pipeline stages; quotes and backslash escapes are respected."""
    parts: list[list[str]] = []
    stages: list[str] = []
    buf: list[str] = []
    quote = ""
    i, n = 0, len(line)

    def end_stage():
        stages.append("".join(buf).strip())
        buf.clear()

    def end_part():
        end_stage()
        kept = [s for s in stages if s]
        if kept:
            parts.append(kept)
        stages.clear()

    while i < n:
        c = line[i]
        if quote:
            buf.append(c)
            if c == "\\" and quote == '"' and i + 1 < n:
                buf.append(line[i + 1])
                i += 2
                continue
            if c == quote:
                quote = ""
            i += 1
            continue
        if c == "\\" and i + 1 < n:
            buf.append(line[i : i + 2])
            i += 2
            continue
        if c in "'\"":
            quote = c
            buf.append(c)
            i += 1
            continue
        two = line[i : i + 2]
        if two in ("&&", "||"):
            end_part()
            i += 2
            continue
        if c == ";":
            end_part()
            i += 1
            continue
        if c == "&" and not (buf and buf[-1] in (">", "<")) and line[i + 1 : i + 2] != ">":
            end_part()
            i += 1
            continue
        if c == "|":
            end_stage()
            i += 1
            continue
        buf.append(c)
        i += 1
    end_part()
    return parts


def _quote_state(s: str, quote: str = "") -> str:
    """The quote (``'``, ``"`` or ``""``) still open at the end of ``s``."""
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c == "\\":
            i += 2
            continue
        elif c == "#" and (i == 0 or s[i - 1] in " \t;&|("):
            # A comment runs to the end of the line.
            j = s.find("\n", i)
            if j < 0:
                break
            i = j
        elif c in "'\"":
            quote = c
        i += 1
    return quote


def _lines_with_heredocs(cmd: str) -> list[tuple[str, str]]:
    """``(line, heredoc bodies)`` for each command line. A line goes on while
    a quote is open or it ends in a backslash; heredoc bodies are taken out
    of the line stream and attached to the line that opened them."""
    out: list[tuple[str, str]] = []
    lines = cmd.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        while i < len(lines):
            if line.endswith("\\"):
                line = line[:-1] + " " + lines[i]
            elif _quote_state(line):
                line = line + "\n" + lines[i]
            else:
                break
            i += 1
        body: list[str] = []
        for m in _HEREDOC_RE.finditer(_unquoted(line)):
            term = m.group(2)
            while i < len(lines):
                body_line = lines[i]
                i += 1
                if body_line.strip() == term:
                    break
                body.append(body_line)
        out.append((line, "\n".join(body)))
    return out


def _unquoted(s: str) -> str:
    """``s`` with the contents of quoted strings blanked out (for regexes that
    look for shell operators); a quoted heredoc word (``<< 'EOF'``) stays."""
    out: list[str] = []
    quote = ""
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if quote:
            if c == "\\" and quote == '"' and i + 1 < n:
                out.append("  ")
                i += 2
                continue
            out.append(c if c == quote else " ")
            if c == quote:
                quote = ""
            i += 1
            continue
        if c == "\\" and i + 1 < n:
            out.append(s[i : i + 2])
            i += 2
            continue
        if c in "'\"":
            j = s.find(c, i + 1)
            if j > 0 and re.search(r"<<-?\s*$", s[:i]):
                out.append(s[i : j + 1])
                i = j + 1
                continue
            quote = c
        out.append(c)
        i += 1
    return "".join(out)


def _words(stage: str) -> list[str]:
    try:
        return shlex.split(stage, comments=True)
    except ValueError:
        return stage.split()


def _written_file(stage: str) -> str | None:
    """The file a stage's output redirection writes, if any."""
    for m in _REDIRECT_RE.finditer(_unquoted(stage)):
        target = m.group(1)
        if target not in ("/dev/null", "/dev/stdout", "/dev/stderr"):
            return target
    return None


def _classify_stage(stage: str, body: str, writers: set[str]) -> str:
    words = _words(stage)
    # Drop prefixes: env assignments, shell keywords, wrappers.
    while words:
        w = words[0].lstrip("({")
        if not w or w in _PREFIX_WORDS or _ASSIGN_RE.match(w):
            words.pop(0)
            continue
        if w == "timeout":
            words.pop(0)
            while words and words[0].startswith("-"):
                words.pop(0)
            if words:
                words.pop(0)  # the duration
            continue
        words[0] = w
        break
    if not words:
        return "other"
    w0 = words[0].rsplit("/", 1)[-1]
    args = words[1:]
    if w0 in _SKIP_WORDS or w0.startswith("#"):
        return ""
    if _PY_RE.match(w0):
        if "-m" in args:
            mod = args[args.index("-m") + 1] if args.index("-m") + 1 < len(args) else ""
            if mod in ("pytest", "unittest", "nose", "nose2", "tox", "py.test", "doctest"):
                return "test"
            if mod in ("pip", "ensurepip") and any(a in _PKG_VERBS for a in args):
                return "install"
        if "setup.py" in " ".join(args) and any(a in ("develop", "install") for a in args):
            return "install"
        code = body
        if "-c" in args:
            code += "\n" + " ".join(args[args.index("-c") + 1 :])
        if code and _PY_WRITE_RE.search(code):
            return "edit"
        script = next((a for a in args if a.endswith(".py") and not a.startswith("-")), None)
        if script is not None and script.rsplit("/", 1)[-1] in writers:
            return "edit"  # a script this session wrote earlier that writes files
        return "python"
    if w0 in _TEST:
        return "test"
    if w0 in _PKG:
        return "install" if any(a in _PKG_VERBS for a in args) else "other"
    if w0 == "git":
        sub = next((a for a in args if not a.startswith("-")), "")
        if sub in ("apply", "am"):
            return "edit"
        if sub == "grep":
            return "grep"
        return "git"
    if w0 == "patch":
        return "edit"
    if w0 == "sed":
        return "edit" if any(_short_flag(a, "i") or a.startswith("--in-place") for a in args) else "read"
    if w0 == "perl" and any(_short_flag(a, "i") for a in args):
        return "edit"
    if w0 in ("awk", "gawk") and "inplace" in args:
        return "edit"
    if w0 == "tee":
        return "edit" if any(not a.startswith("-") and a != "/dev/null" for a in args) else "other"
    if w0 in ("cat", "echo", "printf"):
        target = _written_file(stage)
        if target is not None:
            if body and _PY_WRITE_RE.search(body):
                writers.add(target.rsplit("/", 1)[-1])
            return "edit"
    if w0 in _READ:
        return "read"
    if w0 in _GREP:
        return "grep"
    if w0 in _FIND:
        return "find"
    return "other"


def _short_flag(arg: str, letter: str) -> bool:
    """``arg`` is a bundle of short options that holds ``letter`` (``-i``, ``-ni``, ``-i.bak``)."""
    return arg.startswith("-") and not arg.startswith("--") and letter in arg[1:].split(".", 1)[0]


def classify_command(cmd: str, writers: set[str] | None = None) -> str:
    """Coarse category of a bash command (one of ``CATEGORIES``).

    Each ``&&``/``||``/``;`` part of the command is classified by the first
    stage of its pipeline (``cat f | grep x`` reads, ``grep x f | head``
    greps); ``cd``/``export``/comments count for nothing; the most
    significant category of the parts wins (``cd x && pytest`` -> test,
    ``cat > f.py <<EOF ... EOF && python f.py`` -> edit).

    ``writers`` (updated in place) remembers the scripts that earlier
    commands of the session created with code that writes files, so that
    running one later (``python fix.py``) counts as an edit.
    """
    if writers is None:
        writers = set()
    if _SUBMIT_RE.search(cmd):
        return "submit"
    best = ""
    for line, body in _lines_with_heredocs(cmd):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for part in _split_shell(line):
            cat = _classify_stage(part[0], body, writers)
            if cat and (not best or _RANK[cat] < _RANK[best]):
                best = cat
    return best or "other"
