"""A coarse category for a tool call seen in an LLM answer, from its name and arguments.

Shell tools (``bash``, ``shell``, ``exec_command``, ... or any tool whose
arguments carry a ``command``/``cmd`` string and that is not a known editor)
are classified by the project's command categoriser
(:func:`traces.importers.commands.classify_command`); the file tools of the
common agents by name (Claude Code's ``Read``/``Edit``/``Grep``/``Glob``,
OpenHands' and SWE-agent's ``str_replace_editor`` sub-commands, Codex's
``apply_patch``, ...). Everything else is ``other``. The arguments are read
here and nowhere kept.
"""

from __future__ import annotations

import json

from traces.importers.commands import classify_command

__all__ = ["tool_category"]

# lower-cased tool names -> category (the categories are traces.importers.commands.CATEGORIES)
_BY_NAME = {
    "read": "read", "read_file": "read", "view": "read", "open": "read", "cat": "read", "notebookread": "read",
    "edit": "edit", "multiedit": "edit", "write": "edit", "write_file": "edit", "create_file": "edit",
    "apply_patch": "edit", "notebookedit": "edit", "edit_file": "edit", "str_replace": "edit",
    "grep": "grep", "search": "grep", "search_dir": "grep", "search_file": "grep", "codebase_search": "grep",
    "glob": "find", "ls": "find", "list_dir": "find", "list_files": "find", "find_file": "find", "find": "find",
    "submit": "submit", "finish": "submit",
}
_SHELLS = {"bash", "shell", "exec_command", "execute_bash", "run_terminal_cmd", "terminal", "run_command",
           "execute_command", "run_shell_command", "container.exec", "local_shell"}
_EDITORS = {"str_replace_editor", "str_replace_based_edit_tool", "text_editor", "edit_tool"}
_EDITOR_COMMANDS = {"view": "read", "create": "edit", "str_replace": "edit", "insert": "edit", "undo_edit": "edit",
                    "write": "edit"}


def _command(args: dict) -> str | None:
    for key in ("command", "cmd"):
        v = args.get(key)
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(w, str) for w in v):
            # Codex: ["bash", "-lc", "<script>"] or argv words
            return v[-1] if len(v) >= 3 and v[1] in ("-c", "-lc") else " ".join(v)
    return None


def tool_category(name: str, arguments: str, writers: set[str] | None = None) -> str:
    """Category of the tool call ``name(arguments)`` (arguments: JSON text).

    ``writers`` is the session's set that :func:`classify_command` keeps (scripts
    that earlier commands wrote), updated in place.
    """
    try:
        args = json.loads(arguments) if arguments else {}
    except ValueError:
        args = {}
    if not isinstance(args, dict):
        args = {}
    low = name.lower()
    if low in _EDITORS:
        return _EDITOR_COMMANDS.get(str(args.get("command") or ""), "other")
    cmd = _command(args)
    if cmd is not None and (low in _SHELLS or low not in _BY_NAME):
        return classify_command(cmd, writers)
    return _BY_NAME.get(low, "other")
