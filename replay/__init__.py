"""cwreplay: drive recorded sessions against a live vLLM (later work)."""
