"""Replay's templates (``tools.templates``) give the spans the Assembler gives, line by line, byte for byte.

Each case replays the same lines twice, with templates and without, and compares the JSON lines.
The lines are what the field writes and what damage makes of it: FastDeploy's lifecycles, choice ids
that join their base, users on some lines, trace ids that arrive late, mirror lines with span ids,
ties and disorder within a millisecond, requests cut off, ids reused, lines after a request ended.
"""

from __future__ import annotations

import io
import json
import random

import pytest

from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.tools import spanstates
from fastdeploy_otel.tools.replay import Replayer
from fastdeploy_otel.tools.spanstates import JsonLinesWriter
from fastdeploy_otel.tools.templates import BuiltRequest
from fastdeploy_otel.tools.tracelog import TraceLine
from tests.support.lifecycles import MIXED, PD_DECODE, PD_PREFILL

T0 = 1777342502118
RESOURCE = {"service.name": "replay-test"}
SCOPE = ("fastdeploy_otel", "test")


def _replay(
    lines: list[TraceLine], templates: bool, batch: int = 7, max_in_flight: int = 50
) -> tuple[list[str], Replayer, int]:
    """The JSON lines a replay writes (`batch` spans to a line) and how many requests were built."""
    out = io.StringIO()
    writer = JsonLinesWriter(out, RESOURCE, SCOPE, batch=batch)
    built = 0

    def emit(spans):
        nonlocal built
        built += type(spans) is BuiltRequest
        writer.write(spans)

    replayer = Replayer(emit, ttl_s=30.0, max_in_flight=max_in_flight, templates=templates)
    for i in range(0, len(lines), 13):  # fed a list at a time, as the command feeds them
        replayer.feed(lines[i : i + 13])
    replayer.finish()
    writer.flush()
    return out.getvalue().splitlines(), replayer, built


def _spans(json_lines: list[str]) -> list[str]:
    """Every span of the output as canonical text: lines may batch requests differently at the end."""
    out = []
    for line in json_lines:
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                out += [json.dumps(s, sort_keys=True) for s in ss["spans"]]
    return out


def _request(rng: random.Random, k: int, t: int) -> list[TraceLine]:
    """One request's lines, from a lifecycle with what the field and damage do to it."""
    events = [e for e, _ in rng.choice([MIXED, MIXED, PD_PREFILL, PD_DECODE])]
    if rng.random() < 0.15:  # an event lost, repeated or moved
        i = rng.randrange(len(events))
        what = rng.random()
        if what < 0.4:
            del events[i]
        elif what < 0.7:
            events.insert(i, events[i])
        else:
            events.insert(rng.randrange(len(events)), events.pop(i))
    if rng.random() < 0.1:  # cut off: no END (incomplete at the end of input, or by the TTL)
        events = events[: rng.randrange(1, len(events) + 1)]
    if rng.random() < 0.05:  # begun before the log did (rotation, --since): perhaps with its END alone
        events = events[rng.randrange(len(events)) :]
    base = f"req-{k % 40 if rng.random() < 0.1 else k}"  # now and then an id used before
    # a choice id, now and then a sibling's (X_0 and X_1 of one request, in flight together)
    choice = rng.choice([f"{base}_0", f"{base}::n::0", base, f"{base}_{rng.randrange(2)}"])
    users = rng.choice(["none", "all", "first", "later", "mixed"])
    traces = rng.choice(["none", "none", "first", "later", "two"])
    trace_a, trace_b = rng.getrandbits(128) or 1, rng.getrandbits(128) or 1
    mirror = rng.random() < 0.1
    lines = []
    for i, ev in enumerate(events):
        t += rng.choice([0, 0, 1, 2, 3, 5])  # ties are common
        ms = t - 1 if rng.random() < 0.05 else t  # a line a little out of order
        rid = base if ev is E.POSTPROCESSING_END else choice
        user = {
            "none": None,
            "all": "alice",
            "first": "alice" if i == 0 else None,
            "later": "alice" if i >= 2 else None,
            "mixed": rng.choice(["alice", "bob", None]),
        }[users]
        trace = {
            "none": 0,
            "first": trace_a if i == 0 else 0,
            "later": trace_a if i >= 3 else 0,
            "two": trace_a if i < 4 else trace_b,
        }[traces]
        span_id = rng.getrandbits(64) or 1 if mirror and rng.random() < 0.5 else 0
        lines.append(TraceLine(ms, rid, ev, user, trace, span_id))
    return lines


def _interleave(rng: random.Random, requests: list[list[TraceLine]]) -> list[TraceLine]:
    """The requests' lines in time order (stable: a request's own disorder stays), as a log holds them."""
    tagged = []
    for req in requests:
        latest = 0
        for i, line in enumerate(req):
            latest = max(latest, line.ts_ms)  # a line written late stays after the lines before it
            tagged.append((latest, i, rng.random(), line))
    tagged.sort(key=lambda x: x[:3])
    return [x[3] for x in tagged]


@pytest.mark.parametrize("seed", range(40))
def test_templates_give_the_assemblers_spans_byte_for_byte(seed, monkeypatch):
    from fastdeploy_otel.tools import replay as replay_mod

    monkeypatch.setattr(replay_mod, "_LEARN_AT", 1 + seed % 2)  # most requests take a template
    rng = random.Random(seed)
    requests = []
    t = T0
    for k in range(rng.randrange(20, 120)):
        requests.append(_request(rng, k, t))
        t += rng.choice([0, 1, 2, 5, 40, 20_000])  # some requests far apart: the TTL ends stragglers
    # a line after its request ended (a late event) now and then
    for req in rng.sample(requests, k=min(3, len(requests))):
        last = req[-1]
        req.append(TraceLine(last.ts_ms + 2, last.request_id, E.CACHE_HIT, None, 0, 0))
    lines = _interleave(rng, requests)
    cap = rng.choice([3, 10, 50])  # the in-flight cap: reached often at 3
    with_templates, r1, built = _replay(lines, templates=True, max_in_flight=cap)
    without, r2, _ = _replay(lines, templates=False, max_in_flight=cap)
    assert _spans(with_templates) == _spans(without)  # the same spans, in the same order
    assert with_templates == without
    assert (r1.requests, r1.incomplete, r1.duplicates) == (r2.requests, r2.incomplete, r2.duplicates)
    assert built > 0 or cap == 3  # the case exercised templates (at a cap of 3 few requests reach their END)


S, END = E.PREPROCESSING_START, E.POSTPROCESSING_END


@pytest.mark.parametrize(
    ("lines", "cap"),
    [
        # a request whose first line is its END (the log began in the middle of it); then one reusing its base
        (
            [
                TraceLine(T0, "r_1", END, None, 0, 0),
                TraceLine(T0 + 5, "r_2", S, None, 0, 0),
                TraceLine(T0 + 6, "r_2", END, None, 0, 0),
            ],
            50,
        ),
        # two choices in flight: the base's END goes to the one that began last, whichever way the first was replayed
        (
            [
                TraceLine(T0, "X_0", S, None, 0, 0),
                TraceLine(T0 + 1, "X_1", S, None, 0, 0),
                TraceLine(T0 + 2, "X_0", END, None, 0, 0),
                TraceLine(T0 + 3, "X", END, None, 0, 0),
            ],
            50,
        ),
        # the cap ends the request that began first, assembled (a mirror line) or waiting
        (
            [
                TraceLine(T0, "A", S, None, 0, 0x1234),
                TraceLine(T0 + 1, "B", S, None, 0, 0),
                TraceLine(T0 + 2, "C", S, None, 0, 0),
            ]
            + [TraceLine(T0 + 3, k, END, None, 0, 0) for k in "ABC"],
            2,
        ),
        # the end of input ends requests in the order they began
        ([TraceLine(T0, "B", S, None, 0, 0), TraceLine(T0 + 1, "A", S, None, 0, 0x99)], 50),
    ],
    ids=["end-first", "sibling-choices", "cap-order", "finish-order"],
)
def test_waiting_requests_end_as_assembled_ones_do(lines, cap):
    """Found by review: each of these came out otherwise (or in another order) with templates on."""
    with_templates, r1, _ = _replay(lines, templates=True, max_in_flight=cap)
    without, r2, _ = _replay(lines, templates=False, max_in_flight=cap)
    assert with_templates == without
    assert (r1.requests, r1.incomplete) == (r2.requests, r2.incomplete)


def test_a_clean_log_is_built_from_templates_in_the_assemblers_order():
    from fastdeploy_otel.tools import replay as replay_mod

    """Requests of a few shapes: every one that ends is built but each shape's first few (a template
    is learned from a stand-in when a shape has recurred), and the output is the same text in the
    same order, line batches included."""
    rng = random.Random(7)
    requests = []
    for k in range(300):
        lifecycle = rng.choice([MIXED, PD_PREFILL, PD_DECODE])
        rid = f"chatcmpl-{k}"
        requests.append(
            [
                TraceLine(T0 + 2 * k + 3 * i, rid if e is E.POSTPROCESSING_END else f"{rid}_0", e, None, 0, 0)
                for i, (e, _) in enumerate(lifecycle)
            ]
        )
    lines = _interleave(rng, requests)
    with_templates, replayer, built = _replay(lines, templates=True, batch=512)
    without, _, _ = _replay(lines, templates=False, batch=512)
    assert with_templates == without
    ended = sum(1 for req in requests if req[-1].event is E.POSTPROCESSING_END)
    # PD_PREFILL has no END: those end at the end of input, assembled
    assert 0 < built == ended - 2 * (replay_mod._LEARN_AT - 1)
    # and their text came from each shape's skeleton (a skeleton failing its check would fall back)
    shapes = [shape for shape in replayer._shapes.values() if shape is not None]
    assert len(shapes) == 2 and all(spanstates._skeletons.get(shape) is not None for shape in shapes)


def test_a_shape_is_learned_once_and_the_number_of_shapes_is_bounded(monkeypatch):
    from fastdeploy_otel.tools import replay as replay_mod

    monkeypatch.setattr(replay_mod, "_MAX_SHAPES", 3)
    learned = []
    real = Replayer._learn

    def counting(self, events, user):
        learned.append(events)
        return real(self, events, user)

    monkeypatch.setattr(Replayer, "_learn", counting)
    lines = []
    events = [e for e, _ in MIXED]
    for k in range(8 * (replay_mod._LEARN_AT + 2)):  # 8 shapes (one event left out, or none), each recurring
        drop = k % 8
        evs = [e for i, e in enumerate(events) if i != drop + 1 or drop == 7]
        lines += [TraceLine(T0 + 100 * k + i, f"r{k}", e, None, 0, 0) for i, e in enumerate(evs)]
    with_templates, replayer, built = _replay(lines, templates=True)
    without, _, _ = _replay(lines, templates=False)
    assert with_templates == without
    assert len(learned) == 3 and len(replayer._shapes) == 3  # past the cap: assembled, never learned
    assert built == 3 * 3  # 3 shapes learned, each from the request that made it recur enough on


def test_counting_shapes_starts_over_when_full_and_long_requests_are_assembled(monkeypatch):
    """Sightings of shapes not yet learned are bounded: when full, the count starts over (a shape met
    after a flood of one-off shapes is still learned); a request longer than _MAX_SHAPE_LINES is
    assembled, so a shape is never a huge key."""
    from fastdeploy_otel.tools import replay as replay_mod

    monkeypatch.setattr(replay_mod, "_MAX_SHAPES", 2)  # 8 sightings kept
    monkeypatch.setattr(replay_mod, "_LEARN_AT", 2)
    monkeypatch.setattr(replay_mod, "_MAX_SHAPE_LINES", 30)
    events = [e for e, _ in MIXED]
    lines, t = [], T0
    for k in range(12):  # 12 one-off shapes: CACHE_HIT repeated k times
        evs = events[:7] + [E.CACHE_HIT] * k + events[7:]
        lines += [TraceLine(t + i, f"once-{k}", e, None, 0, 0) for i, e in enumerate(evs)]
        t += 1000
    for k in range(2):  # then MIXED twice: learned at its second request
        lines += [TraceLine(t + i, f"mixed-{k}", e, None, 0, 0) for i, e in enumerate(events)]
        t += 1000
    with_templates, replayer, built = _replay(lines, templates=True)
    without, _, _ = _replay(lines, templates=False)
    assert with_templates == without
    assert built == 1 and len(replayer._sightings) <= 8
    assert all(len(events) <= 30 for events, _ in replayer._sightings)  # the long ones were never counted
    learned = [shape for shape in replayer._shapes.values() if shape is not None]
    assert len(learned) == 1 and len(learned[0].spans) == 10  # MIXED's
