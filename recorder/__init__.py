"""`cwsim record`: a recording reverse proxy for the OpenAI and Anthropic APIs.

Sits between a coding agent and its LLM server, passes every byte through
unchanged and writes one content-free trace line (full form,
``docs/trace-format.md``) per LLM call; optionally adds CacheWise's session
and tool hints to the forwarded requests. See ``docs/record.md``.

Modules: ``segments`` (prompts as salted chained segment ids), ``responses``
(answers and streams read as they pass), ``tools`` (tool-call categories),
``recording`` (sessions, turns, counts, lines), ``writer`` (append + journal,
crash recovery), ``proxy`` (the ASGI app), ``server`` (running it).
Layering: ``recorder`` imports ``traces``, never the reverse.
"""

from recorder.server import RecordingProxy, open_recording, record
from recorder.writer import RecordingError, recover

__all__ = ["RecordingError", "RecordingProxy", "open_recording", "record", "recover"]
