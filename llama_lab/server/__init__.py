"""The server room: the OpenAI-compatible HTTP app around an engine, its settings, CLI and runner.

``protocol`` (request schemas), ``generation`` (the one streaming/non-streaming path),
``routes``, ``app`` (``create_app``), ``metrics``, ``settings`` (+ ``build_engine``), ``cli``,
``runner`` (``serve()`` for notebooks).
"""
