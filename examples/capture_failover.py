"""Failed upstream attempts captured automatically: a failover loop over an httpx client.

The gateway's client records every failed attempt through ``AsyncUpstreamOpsTransport``;
``upstream(...)`` labels the attempts of each account and ``record_failover`` records the decision.
The provider is simulated by ``FaultInjectionTransport`` (the first account is rate limited, the
second overloaded, the third works), so this runs without a network.

Run it:   python examples/capture_failover.py
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import upstream_ops
from upstream_ops import UpstreamOpsMiddleware, record_failover, upstream
from upstream_ops.httpx import AsyncUpstreamOpsTransport
from upstream_ops.sinks import MemorySink
from upstream_ops.testing import FaultInjectionTransport, overloaded, rate_limited

ACCOUNTS = [(1, "primary"), (2, "backup"), (3, "spare")]


def for_account(account_id: int) -> Callable[[httpx.Request], bool]:
    return lambda request: request.url.params.get("account") == str(account_id)


provider = FaultInjectionTransport(
    faults=[rate_limited(retry_after=2, match=for_account(1)), overloaded(match=for_account(2))]
)
client = httpx.AsyncClient(transport=AsyncUpstreamOpsTransport(provider, platform="anthropic"))


async def generate(request: Request) -> JSONResponse:
    for index, (account_id, name) in enumerate(ACCOUNTS):
        with upstream(account_id=account_id, account_name=name, model="claude-sonnet"):
            response = await client.post(
                "https://api.anthropic.example/v1/messages", params={"account": account_id}
            )
            if response.status_code < 400:
                return JSONResponse({"ok": True, "account": account_id})
            if index + 1 < len(ACCOUNTS):
                next_account = ACCOUNTS[index + 1][0]
                record_failover(
                    from_account=account_id,
                    to_account=next_account,
                    reason=f"HTTP {response.status_code}",
                )
    return JSONResponse({"ok": False}, status_code=502)


async def main() -> None:
    sink = MemorySink()
    app = UpstreamOpsMiddleware(
        Starlette(routes=[Route("/generate", generate, methods=["POST"])]), sink=sink
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as caller:
        response = await caller.post("/generate")
    await client.aclose()
    print("client saw", response.status_code, response.json())
    upstream_ops.flush()
    for record in sink.records:
        for event in record.upstream_errors:
            status = event.upstream_status_code or ""
            print(
                f"{event.attempt} {event.kind:<10} {status:>3} {event.account_name:<7} "
                f"{event.error_class or '-':<12} {event.message}"
            )


if __name__ == "__main__":
    asyncio.run(main())
