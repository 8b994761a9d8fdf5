"""`pie serve`: Pie's client protocol at /v1/ws and an OpenAI-compatible HTTP API, on one engine.

app.py         the Starlette app: routes, startup/shutdown of the engine, draining
ws.py          one client connection of Pie's protocol (msgpack frames, corr_id responses)
frames.py      decoding and checking client frames (types of every field)
programs.py    installed programs under $PIE_HOME: manifest validation, storage, loading
processes.py   running inferlets: events, output capture, signals and files, cancellation
openai_api.py  /v1/models, /v1/completions, /v1/chat/completions, /v1/responses: runs and routes
openai_params.py   checking request bodies (400s that name the field)
openai_format.py   OpenAI's response and stream-chunk shapes
capture.py     print() inside an inferlet -> its process's stdout/stderr events
metrics.py     Prometheus /metrics
auth.py        users and hashed tokens ($PIE_HOME/auth.json), who a request is
"""
