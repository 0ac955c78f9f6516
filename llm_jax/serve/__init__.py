"""`llm-jax serve`: a model behind an OpenAI-compatible HTTP API, with a chat page.

  engine.py    continuous batching over the KV-cache decoder: fixed slots, per-row positions and stop conditions
  protocol.py  the OpenAI API's requests (validated, errors naming the field) and responses, without HTTP
  app.py       the Starlette app: routes, API keys, server-sent events, disconnects
  static/      the chat page served at /
"""
