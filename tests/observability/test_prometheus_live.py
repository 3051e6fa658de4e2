"""The whole monitoring path against real processes: a local stack (tokenizer, three stages,
gateway) and a real Prometheus on 127.0.0.1 scraping it with the repository's local configuration
(intervals 1 s instead of 15 s: tests/helpers/prometheus.py) and rules.

Traffic is driven after Prometheus has scraped every target once, so rates and quantiles have
something to work on: generations (plain, streamed, batched), a refused request (400) on every
route of every service, and requests refused with 429 on both generation routes.

What "returns data" means here: every dashboard query and every recording rule, evaluated by
/api/v1/query, answers at least one sample with a number (not NaN). An alert expression
`<figure> <op> <threshold>` must parse and evaluate as written (it is usually empty on a healthy
stack, which is the point), and its figure alone must return data.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from functions import contract
from infra.local.prometheus import scrape_targets
from tests.helpers.prometheus import (
    PrometheusServer,
    dashboard_queries,
    has_number,
    resolve,
    rule_queries,
    start_prometheus,
    without_threshold,
)
from tests.helpers.stack import Stack, start_stack

pytestmark = pytest.mark.processes

STAGES = [contract.stage_name(k) for k in (1, 2, 3)]
SLOTS = {"TANDEM_MAX_RUNNING": "2", "TANDEM_MAX_WAITING": "2"}  # 4 sequences at most: 429 is easy to reach
GATEWAY_ROUTES = {  # route -> a body it refuses with 400
    "/v1/completions": {"prompt": "hi", "temperature": -1},
    "/api/model/process": {"text": "hello", "max_tokens": 0},
}
TOKENIZER_ROUTES = ("/v1/encode", "/v1/decode", "/v1/decode/stream", "/v1/count")
STAGE_ROUTES = ("/v2/models/{model}/infer", "/v2/models/{model}/sequences/release")


@dataclass
class Observed:
    stack: Stack
    prometheus: PrometheusServer | None


def host_port(url: str) -> str:
    return url.removeprefix("http://")


def generate(stack: Stack) -> None:
    """Generations on both routes, streamed and not, four at once (so batches form)."""

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as c:
            process = [
                c.post("/api/model/process", json={"text": t, "max_tokens": 8, "ignore_eos": True})
                for t in ("Hello the model", "quick brown fox")
            ]
            plain = c.post(
                "/v1/completions", json={"prompt": "hi there", "max_tokens": 6, "ignore_eos": True}
            )
            rs = await asyncio.gather(*process, plain)
            async with c.stream(
                "POST", "/v1/completions", json={"prompt": "one two", "max_tokens": 6, "stream": True}
            ) as s:
                async for _ in s.aiter_lines():
                    pass
            return [r.status_code for r in rs] + [s.status_code]

    assert asyncio.run(main()) == [200] * 4


def refuse_400(stack: Stack) -> None:
    """One request every route of every service refuses with 400."""
    for route, body in GATEWAY_ROUTES.items():
        r = httpx.post(f"{stack.gateway_url}{route}", json=body, timeout=10)
        assert r.status_code == 400, (route, r.text)
    for route in TOKENIZER_ROUTES:
        r = httpx.post(f"{stack.tokenizer_url}{route}", json={"nope": 1}, timeout=10)
        assert r.status_code == 400, (route, r.text)
    for name, urls in stack.stage_urls.items():
        for route in STAGE_ROUTES:
            path = route.replace("{model}", name)
            r = httpx.post(f"{urls[0]}{path}", content=b"{not json", timeout=10)
            assert r.status_code == 400, (name, route, r.text)


def refuse_429(stack: Stack) -> None:
    """Fill every slot with one streamed request of four prompts, then ask on both routes at once."""
    hold = {"prompt": ["a b", "c d", "e f", "g h"], "max_tokens": 1000, "ignore_eos": True, "stream": True}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as c:
            async with c.stream("POST", "/v1/completions", json=hold) as s:
                assert s.status_code == 200
                # the first token: all four are admitted. Keep the iterator: a discarded one is
                # finalized by the event loop, which closes the stream (and cancels the four)
                lines = s.aiter_lines()
                await anext(lines)
                refused = await asyncio.gather(
                    c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}),
                    c.post("/api/model/process", json={"text": "x", "max_tokens": 2}),
                )
                await lines.aclose()
                return refused
            # leaving the block closes the stream: the gateway cancels the four sequences

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [429, 429], [r.text for r in responses]
    assert all(r.headers.get("Retry-After") for r in responses)


def wait_until_scraped(prom: PrometheusServer, n_targets: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    targets: list[dict] = []
    while time.monotonic() < deadline:
        targets = prom.targets()
        if len(targets) == n_targets and all(t["health"] == "up" for t in targets):
            return
        time.sleep(0.3)
    pytest.fail(
        f"targets not all up after {timeout} s: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}"
    )


@pytest.fixture(scope="module")
def observed(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    stack = start_stack(tiny_bundle, tmp_path_factory.mktemp("observed"), gateway_env=SLOTS)
    prom = None
    try:
        if shutil.which("prometheus") is not None:
            config = stack.config()
            targets = scrape_targets(
                config, STAGES, host_port(stack.gateway_url), config["tokenizer"]["address"]
            )
            prom = start_prometheus(tmp_path_factory.mktemp("prometheus"), targets)
            wait_until_scraped(prom, 2 + len(config["nodes"]))
        generate(stack)
        refuse_400(stack)
        refuse_429(stack)
        generate(stack)  # the slots are free again once the held stream is cancelled
        yield Observed(stack, prom)
    finally:
        if prom is not None:
            prom.stop()
        stack.stop()


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page: (name, labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def count(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_refusals_are_counted_with_their_status_on_every_route(observed: Observed) -> None:
    stack = observed.stack
    gateway = scrape(stack.gateway_url)
    for route in GATEWAY_ROUTES:
        for status in ("400", "429"):
            assert count(gateway, "tandem_requests_total", route=route, status=status) >= 1, (route, status)
    tokenizer = scrape(stack.tokenizer_url)
    for route in TOKENIZER_ROUTES:
        assert count(tokenizer, "tandem_http_requests_total", route=route, status="400") == 1, route
    for name, urls in stack.stage_urls.items():
        samples = scrape(urls[0])
        for route in STAGE_ROUTES:
            n = count(samples, "tandem_http_requests_total", service=name, route=route, status="400")
            assert n == 1, (name, route)


def test_every_process_exports_its_memory(observed: Observed) -> None:
    stack = observed.stack
    urls = [stack.gateway_url, stack.tokenizer_url] + [u for us in stack.stage_urls.values() for u in us]
    for url in urls:
        rss = count(scrape(url), "process_resident_memory_bytes")
        assert rss > 10_000_000, (url, rss)  # a Python process with its libraries: tens of MB at least


def prometheus_of(observed: Observed) -> PrometheusServer:
    if observed.prometheus is None:
        pytest.skip(
            "prometheus not installed: Debian package prometheus (`make test` installs it as root; "
            "else sudo apt-get install --no-install-recommends prometheus)"
        )
    return observed.prometheus


def wait_for_number(prom: PrometheusServer, expr: str, timeout: float) -> dict:
    """The query's answer once it has a number, or the last answer after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        answer = prom.query(expr)
        if has_number(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.5)


def test_every_target_is_up(observed: Observed) -> None:
    prom = prometheus_of(observed)
    targets = prom.targets()
    jobs = sorted((t["labels"]["job"], t["labels"].get("stage", "")) for t in targets)
    assert jobs == [("gateway", ""), *(("stages", s) for s in STAGES), ("tokenizer", "")]
    assert all(t["health"] == "up" for t in targets), targets
    answer = prom.query("up")
    assert sorted(float(s["value"][1]) for s in answer["data"]["result"]) == [1.0] * 5


def fresh_traffic(observed: Observed) -> None:
    """Generations just before the queries: their 1 m rate windows must hold some (the module's
    earlier tests and a slow machine can take longer than that)."""
    generate(observed.stack)
    time.sleep(2.5)  # two scrapes at 1 s


def test_every_dashboard_query_returns_data(observed: Observed) -> None:
    prom = prometheus_of(observed)
    fresh_traffic(observed)
    empty = []
    for title, expr in dashboard_queries():
        answer = wait_for_number(prom, resolve(expr), timeout=15)
        assert answer["status"] == "success", (title, expr, answer)
        if not has_number(answer):
            empty.append((title, expr, answer["data"]["result"]))
    assert not empty, "\n".join(map(str, empty))


def test_every_rule_is_valid_and_returns_data(observed: Observed) -> None:
    prom = prometheus_of(observed)
    fresh_traffic(observed)
    empty = []
    for name, expr in rule_queries():
        answer = prom.query(expr)
        assert answer["status"] == "success", (name, expr, answer)  # as written, thresholds included
        figure = without_threshold(expr)
        if name.startswith("tandem:"):  # recording rule: no threshold
            assert figure == expr
        else:
            assert figure != expr, f"alert {name} is not `<figure> <op> <threshold>`"
        if not has_number(wait_for_number(prom, figure, timeout=15)):
            empty.append((name, figure))
    assert not empty, empty
    # Prometheus itself evaluates them: every rule healthy, the recording rules have stored series
    rules = [r for g in prom.rule_groups() for r in g["rules"]]
    assert len(rules) == len(rule_queries())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    for name, _ in rule_queries():
        if name.startswith("tandem:"):
            assert has_number(wait_for_number(prom, name, timeout=10)), name
