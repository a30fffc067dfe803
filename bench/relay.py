#!/usr/bin/env python3
"""A bare relay for `make bench`: the frame the gateway is built on and nothing else.

An aiohttp server set up as the agent's (uvloop, the collector tuned as gc_tuning.py tunes it, the same
body limit) that passes every POST to one upstream through the proxy's own HTTP/1.1 client
(`llmfleet_agent.proxy.http1`) and streams the answer back: no keys, checks, body parsing, routing,
records, logs or metrics. Not a general proxy: it drops only the headers the bench's requests carry that
must not be passed on. The client's key goes through to the agent as the client's; the gateway's requests
reach the agent with the gateway's key and the caller's identity, which costs the agent about 10 µs more
(docs/performance.md), counted in the gateway's own work.

In front of the agent, what it adds is what one more hop of that frame costs on this machine at that
moment (loopback, the event loop, the server, the client); what the gateway adds beyond it is the
gateway's own work. The VM's speed drifts by half between runs, so the two are only compared within one
run.

    python bench/relay.py --upstream http://127.0.0.1:8080 --port 9000
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from aiohttp import web
from llmfleet_agent import gc_tuning
from llmfleet_agent.cli import use_uvloop
from llmfleet_agent.config import LimitsConfig
from llmfleet_agent.proxy import http1
from llmfleet_agent.proxy.handler import Answer  # the head goes with the first bytes, as the agent's

UPSTREAM = web.AppKey("upstream", str)
CLIENT = web.AppKey("client", http1.Client)
# hop-by-hop, or set by the relay's own framing
_DROP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "host", "content-length", "date", "server"}
)


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
    client = request.app[CLIENT]
    upstream = await client.request(
        request.method, request.app[UPSTREAM], request.rel_url.raw_path_qs, headers, body
    )
    async with upstream:
        response = Answer(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in _DROP:
                response.headers.add(name, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        last = b""
        while chunk := await upstream.next_chunk():
            if upstream.ended:
                last = chunk
                break
            await response.write(chunk)
        await response.write_eof(last)
    return response


async def readyz(_request: web.Request) -> web.Response:
    return web.json_response({"ready": True})


def make_app(upstream: str) -> web.Application:
    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        app[CLIENT] = http1.Client(limit=100, connect_timeout=5, read_timeout=60)
        yield
        await app[CLIENT].close()

    app = web.Application(client_max_size=LimitsConfig().max_body_bytes)
    app[UPSTREAM] = upstream
    app.cleanup_ctx.append(client_ctx)
    app.on_startup.append(gc_tuning.freeze_startup)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/{tail:.*}", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", required=True, help="the base URL requests are passed to")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    use_uvloop()  # as the agent's server
    gc_tuning.tune()
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
