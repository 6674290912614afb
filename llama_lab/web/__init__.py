"""What both HTTP apps (the model server and the gateway) share.

``errors`` (OpenAI-shaped errors and their handlers), ``cors`` (local web clients and chosen
origins), ``background`` (uvicorn on a thread of its own, for notebooks), ``launcher`` (a server
as a subprocess, for tests, benchmarks and the stop experiment) and ``flags`` (pydantic-settings
models turned into command-line flags).
"""
