"""`ps3edge serve-openai`: a VILA-HD artifact behind an OpenAI-compatible API (FastAPI + uvicorn;
the `openai` extra).

protocol.py: the request's fields, checked into what the pipeline takes, and the response and
error objects; images.py: the image of a request (data: URLs, optionally http(s)) with its size
limit; batcher.py: the thread that batches the vision side of concurrent requests and generates
each answer in turn; metrics.py: the Prometheus metrics; app.py: the routes, authentication and
errors; server.py: uvicorn's lifecycle, readiness and the SIGTERM drain.
"""

from ..errors import Ps3EdgeError

EXTRA = "pip install 'ps3edge[openai]'"


def require_extra() -> None:
    """A one-line error naming the extra when FastAPI, uvicorn or prometheus-client is missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise Ps3EdgeError(f"ps3edge serve-openai needs the openai extra ({EXTRA}): {', '.join(missing)} "
                           f"not installed")
