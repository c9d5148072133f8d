"""cwsim: a SimPy model of a vLLM-like engine and its KV block pool."""
