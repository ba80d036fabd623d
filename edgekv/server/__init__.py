"""`edgekv serve`: the OpenAI-compatible HTTP server over one Model (api.py)."""
