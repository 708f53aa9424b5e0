"""`mypt serve`: an OpenAI-compatible HTTP server for MyPT models, with continuous batching.

- app.py: routes, authentication, limits, streaming, the page (a Starlette application);
- protocol.py: the OpenAI request and response shapes and error JSON;
- logprobs.py: token logprobs in OpenAI's completions and chat shapes;
- batcher.py: the continuous-batching scheduler around mypt.sampling.Decoder;
- connections.py: how many connections may be open and how long a request may take to arrive;
- chat.py: chat messages -> a prompt for a base model (a documented template, or the model's own);
- page.html: the page at `/`, one static file (inline JavaScript and CSS, no build step).

Needs the `serve` extra (starlette, uvicorn).
"""
