"""The README's first two commands are what CI runs and what the CLI offers."""

from __future__ import annotations

import re
from pathlib import Path

from fastdeploy_otel.tools import cli

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, "README has no sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_command():
    demo, tests = readme_commands()[:2]
    assert "pytest" in tests and "demo" in demo
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f"{tests!r} is not a line of .ci/run"


def test_readme_demo_command_parses():
    demo = readme_commands()[0]
    argv = demo.split("fastdeploy-otel ", 1)[1].split()
    parser_args = argv  # e.g. ['demo', '--out', 'demo-out']
    assert parser_args[0] == "demo"
    import argparse

    seen = {}

    def fake(args: argparse.Namespace) -> int:
        seen.update(vars(args))
        return 0

    original = cli.demo
    cli.demo = fake
    try:
        assert cli.main(parser_args) == 0
    finally:
        cli.demo = original
    assert seen["out"] == "demo-out"
