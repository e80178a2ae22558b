"""A seeded fuzz of the API server: every field and header, valid and hostile values, both endpoints.

    python -m minifd.fuzz --url http://127.0.0.1:8000 --requests 1000 --seed 1

The server passes when no request hangs (``--timeout``), none is dropped without a response, none
gets a 5xx, every error body has OpenAI's shape, every 200 stream ends with ``[DONE]`` and the
server is healthy afterwards.  tests/test_serving_faults.py runs it in CI with a few hundred requests.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

NAN, INF = float("nan"), float("inf")
SURROGATE = "\ud800"
_LEAVE_OUT = object()  # the field is not sent at all

#: Values per field: valid ones first, then the hostile ones that have broken servers.
FIELD_VALUES: dict[str, list[Any]] = {
    "model": ["minifd-tiny", "gpt-4", "", 5, None, SURROGATE, "m" * 1000, "minifd-tiny\x00"],
    "max_tokens": [1, 2, 4, 0, -1, 10**30, 257, 1.5, "4", None, True, NAN, 1e400],
    "temperature": [0, 0.7, 2, 1e-320, 1e308, -1, NAN, INF, "hot", None, 2.0000001, 5e-324],
    "top_p": [1, 0.5, 0, -0.1, 1.1, NAN, None, "x"],
    "seed": [None, 0, 7, 2**63 - 1, -1, 2**63, 2**64, 1.5, "s", -(2**70)],
    "logit_bias": [None, {}, {"256": -100}, {"\u00b2": 1}, {"99999": 1}, {"-1": 1}, {"5": NAN}, {"5": 1e9},
                   {"a": 1}, [], "x", {SURROGATE: 1}, {"\u0663": 2}, {"01": 3}],
    "stream": [False, True, "yes", None, 1, "true"],
    "user": [None, "u", "", "\x00\x1b[31m\r\n", "\u4e2d\u6587", SURROGATE, "u" * 300, 5, "[request_id=x]"],
    "request_id": [None, "ok-1", "a\nb", "\u4e2d\u6587", SURROGATE, "x" * 200, "[x] y", "", "\x7f", 12],
    "n": [1, 2, 0, None],
    "prompt": ["hello", "", "x" * 300, "\u4e2d\u6587", SURROGATE, None, 5, ["a"], "\x00\x01", "\U0001f600" * 10],
    "messages": [[{"role": "user", "content": "hi"}], [], [{"role": "bad", "content": "x"}], [{"role": "user"}],
                 [{"role": "user", "content": SURROGATE}], "hi", [{"role": "user", "content": "\x00" * 5}]],
    "junk": [1, {"a": [1, 2]}, SURROGATE],
}
HEADER_VALUES: list[bytes | None] = [
    None, b"h-1", b"\x01\x02", "\u4e2d\u6587".encode(), b"\xff\xfe", b"x" * 500, b"a b", b"[request_id=evil]", b"",
]
RAW_BODIES = [b"{", b"\xff\xfe", b"[]", b"null", b'{"prompt": "x", "max_tokens": NaN}', b'{"prompt": "\\ud800"}', b""]


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    hangs: list[str] = field(default_factory=list)  # over the timeout
    dropped: list[str] = field(default_factory=list)  # no response at all
    unexpected: list[str] = field(default_factory=list)  # 5xx, a bad error body, a stream without [DONE]
    healthy_after: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.hangs or self.dropped or self.unexpected) and self.healthy_after

    def summary(self) -> str:
        return (f"{self.requests} requests in {self.seconds:.1f}s: statuses {dict(sorted(self.statuses.items(), key=lambda kv: str(kv[0])))}; "
                f"hangs {len(self.hangs)}, dropped {len(self.dropped)}, unexpected {len(self.unexpected)}, "
                f"healthy afterwards: {self.healthy_after}")


def make_case(rng: random.Random) -> tuple[str, bytes, dict[bytes, bytes]]:
    """(path, raw body, headers): a valid request with 0-3 fields replaced, or a body that is not one."""
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {b"content-type": b"application/json"}
    header = rng.choice(HEADER_VALUES) if rng.random() < 0.3 else None
    if header is not None:
        headers[b"x-request-id"] = header
    if rng.random() < 0.05:
        return path, rng.choice(RAW_BODIES), headers
    body: dict[str, Any] = {"max_tokens": rng.choice([1, 2, 4]), "temperature": rng.choice([0, 0.8])}
    body["messages" if chat else "prompt"] = (
        [{"role": "user", "content": f"fuzz {rng.random()}"}] if chat else f"fuzz {rng.random()}")
    names = [n for n in FIELD_VALUES if n != ("prompt" if chat else "messages")]
    for name in rng.sample(names, rng.randint(0, 3)):
        value = rng.choice(FIELD_VALUES[name] + [_LEAVE_OUT])
        if value is _LEAVE_OUT:
            body.pop(name, None)
        else:
            body[name] = value
    # NaN/Infinity are sent as the literals Python's json accepts; lone surrogates as \\ud800 escapes.
    return path, json.dumps(body).encode(), headers


def _check(client: httpx.Client, path: str, content: bytes, headers: dict[bytes, bytes], timeout: float) -> tuple[int | str, str]:
    """(status or failure kind, detail) for one request."""
    label = f"{path} {content[:160]!r} {headers.get(b'x-request-id')!r}"
    try:
        with client.stream("POST", path, content=content, headers=headers, timeout=timeout) as resp:
            body = b"".join(resp.iter_bytes())
            status = resp.status_code
            ctype = resp.headers.get("content-type", "")
    except httpx.TimeoutException:
        return "hang", label
    except httpx.TransportError as exc:
        return "dropped", f"{label}: {type(exc).__name__}: {exc}"
    if status >= 500:
        return status, f"{label} -> {status} {body[:300]!r}"
    if status == 200 and ctype.startswith("text/event-stream"):
        lines = [l for l in body.decode().splitlines() if l.startswith("data: ")]
        if not lines or lines[-1] != "data: [DONE]" or any('"error"' in l for l in lines):
            return "bad-stream", f"{label} -> {body[-300:]!r}"
        return status, ""
    try:
        data = json.loads(body)
    except ValueError:
        return "bad-body", f"{label} -> {status} {body[:300]!r}"
    if status != 200:
        err = data.get("error") if isinstance(data, dict) else None
        if not (isinstance(err, dict) and isinstance(err.get("message"), str) and "type" in err and "param" in err):
            return "bad-body", f"{label} -> {status} {body[:300]!r}"
    return status, ""


def run(base_url: str, requests: int = 300, seed: int = 1, concurrency: int = 8, timeout: float = 30.0) -> FuzzReport:
    """Send `requests` fuzzed requests (deterministic for a seed) and report what went wrong."""
    rng = random.Random(seed)
    cases = [make_case(rng) for _ in range(requests)]
    report = FuzzReport(requests=requests)
    t0 = time.monotonic()
    with httpx.Client(base_url=base_url) as client, cf.ThreadPoolExecutor(concurrency) as pool:
        for status, detail in pool.map(lambda c: _check(client, c[0], c[1], c[2], timeout), cases):
            report.statuses[status] += 1
            if status == "hang":
                report.hangs.append(detail)
            elif status == "dropped":
                report.dropped.append(detail)
            elif detail:
                report.unexpected.append(detail)
        report.seconds = time.monotonic() - t0
        try:
            report.healthy_after = client.get("/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            report.healthy_after = False
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds after which a request counts as a hang")
    args = p.parse_args(argv)
    report = run(args.url, args.requests, args.seed, args.concurrency, args.timeout)
    print(report.summary())
    for kind in ("hangs", "dropped", "unexpected"):
        for detail in getattr(report, kind)[:20]:
            print(f"  {kind}: {detail}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
