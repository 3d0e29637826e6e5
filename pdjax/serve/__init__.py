"""Serving (`python -m pdjax.serve`): continuous batching over the decoder's slots, behind an OpenAI-compatible API.

`engine` is the batching engine (a library object that knows no HTTP), `protocol`
the OpenAI request/response models, `text` the answer and plan text of a response
as its tokens become final, `app` the thin FastAPI layer, `access` its API keys,
request ids and access log, `metrics` its Prometheus series, `cli` the command.
"""

from pdjax.serve.engine import Engine, EngineStopped, QueueFull, Replicas, Ticket, Update

__all__ = ["Engine", "EngineStopped", "QueueFull", "Replicas", "Ticket", "Update"]
