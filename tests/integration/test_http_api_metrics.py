"""The JSON/HTTP API's requests in the manager's Prometheus /metrics, read over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from http_helpers import SERVICE, HttpEnv, http_env, post
from prometheus_client.parser import text_string_to_metric_families

JSON = "application/json"


async def scrape(env: HttpEnv) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The manager's /metrics: (sample name, sorted labels) -> value."""
    url = f"http://127.0.0.1:{env.manager.metrics_port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests(samples: dict[Any, float], method: str, code: str) -> float:
    key = ("fleet_manager_http_requests_total", (("code", code), ("method", method)))
    return samples.get(key, 0.0)


def timed(samples: dict[Any, float], method: str) -> float:
    """How many durations of `method` the histogram holds."""
    key = ("fleet_manager_http_request_duration_seconds_count", (("method", method),))
    return samples.get(key, 0.0)


def open_streams(samples: dict[Any, float], method: str) -> float:
    return samples.get(("fleet_manager_http_streams", (("method", method),)), 0.0)


async def test_requests_are_counted_by_method_and_status_and_timed(
    pki: Any, tmp_path: Path
) -> None:
    """Answers, errors and refusals before the body (403, 413, a wrong content type) are
    counted by method and HTTP status; any path that is no route is one `unknown` label."""
    async with http_env(pki, tmp_path, max_body_bytes=4096) as env:
        await env.add_nodes("n1", labels={"env": "prod"})
        for _ in range(2):
            assert (await env.call("ListNodes")).status_code == 200
        assert (await env.call("GetNode", {"nodeId": "nope"})).status_code == 404
        async with env.client("node", "n1") as node:
            assert (await post(node, "UpdateNodeLabels", {"nodeId": "n1"})).status_code == 403
        big = {"nodeId": "n1", "set": {"a": "x" * 5000}}
        assert (await env.call("UpdateNodeLabels", big)).status_code == 413
        r = await env.http.post(f"{SERVICE}/ListNodes", content=b"{}")  # no content type
        assert r.status_code == 400
        assert (await env.http.get(f"{SERVICE}/ListNodes")).status_code == 405
        for path in ("/v1/fleet.v1.FleetService/Nope", "/v2/x", "/", "/metrics"):
            r = await env.http.post(path, content=b"{}", headers={"content-type": JSON})
            assert r.status_code == 404, path

        samples = await scrape(env)
    assert requests(samples, "ListNodes", "200") == 2
    assert requests(samples, "ListNodes", "400") == 1
    assert requests(samples, "ListNodes", "405") == 1
    assert requests(samples, "GetNode", "404") == 1
    assert requests(samples, "UpdateNodeLabels", "403") == 1
    assert requests(samples, "UpdateNodeLabels", "413") == 1
    assert requests(samples, "unknown", "404") == 4
    assert timed(samples, "ListNodes") == 4
    assert timed(samples, "unknown") == 4
    methods = {
        dict(labels)["method"]
        for name, labels in samples
        if name == "fleet_manager_http_requests_total"
    }
    assert methods == {"ListNodes", "GetNode", "UpdateNodeLabels", "unknown"}
    # HTTP requests are not gRPC calls: the RPC counter has none of them.
    assert not any(
        name == "fleet_manager_rpc_total" and dict(labels)["method"] == "ListNodes"
        for name, labels in samples
    )


async def test_a_stream_is_timed_to_its_first_byte_and_open_until_it_ends(
    pki: Any, tmp_path: Path
) -> None:
    """A followed WatchEvents is timed once its head is sent (while it stays open), shows in
    the open-streams gauge, and leaves it when the client hangs up."""
    async with http_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels={"env": "prod"})
        async with env.http.stream(
            "POST",
            f"{SERVICE}/WatchEvents",
            content=json.dumps({"follow": True, "tail": 1}),
            headers={"content-type": JSON},
        ) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()  # kept: a dropped generator would close the response
            assert json.loads(await anext(lines))["result"]["event"]
            during = await scrape(env)
        assert open_streams(during, "WatchEvents") == 1
        assert timed(during, "WatchEvents") == 1
        # Counted once it ends (its status is known from the start, its end is not).
        assert requests(during, "WatchEvents", "200") == 0

        deadline = time.monotonic() + 10
        while True:  # the manager notices the hang-up on its own time
            after = await scrape(env)
            if open_streams(after, "WatchEvents") == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert open_streams(after, "WatchEvents") == 0
    assert requests(after, "WatchEvents", "200") == 1
    assert timed(after, "WatchEvents") == 1
    key = ("fleet_manager_http_request_duration_seconds_sum", (("method", "WatchEvents"),))
    assert after[key] < 5.0
