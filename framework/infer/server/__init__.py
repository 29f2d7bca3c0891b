"""The HTTP front end of the engine: an OpenAI-compatible server (``python -m framework.serve``).

- ``runtime.py``: process layout and life cycle (engine in the main thread, uvicorn in a second one on rank 0)
- ``app.py``: the routes; ``protocol.py``: OpenAI's request checks and response shapes
- ``bridge.py``: requests into the scheduler between steps, tokens back to the event loop
- ``metrics.py``: Prometheus (detokenization: framework/infer/detok.py)
- ``static/playground.html``: the page at ``/``
"""
