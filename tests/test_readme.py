"""Every code block in the README works: Python blocks run against the demo model (the client examples
against a server started here on a free port), every `lemma ...` line is parsed by the CLI with all its
options checked (the long-running commands are not run), scripts exist, and the curl example is sent
to the test server."""

import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
import typer
from serving import serving

from lemma import Engine
from lemma.cli import app
from lemma.engine.async_engine import AsyncEngine
from lemma.models.store import pull
from lemma.server.app import build_app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MODEL = "smollm2-135m-instruct"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def port():
    engine = Engine(pull(MODEL, quiet=True), kv_cache_tokens=8192)
    with serving(build_app(AsyncEngine(engine), MODEL)) as free:
        yield free


def test_python_blocks_run(port, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the examples name the demo model by its path in a checkout
    python = blocks("python")
    assert len(python) >= 2
    for code in python:
        namespace: dict = {}
        exec(compile(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), "README.md", "exec"), namespace)
        if "outs" in namespace:  # the first example answers its questions (chat template, not raw text)
            assert all(out.text.strip() and out.finish_reason in ("stop", "length") for out in namespace["outs"])
    assert capsys.readouterr().out.strip()


def shell_lines() -> list[list[str]]:
    """The README's shell lines as words (lines that are not whole commands, like the inside of a
    quoted JSON body, are skipped)."""
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = [w for w in shlex.split(line, comments=True) if w != "&"]
            except ValueError:
                continue
            if words:
                lines.append(words)
    return lines


def command_lines() -> list[list[str]]:
    return [words for words in shell_lines() if words[0] == "lemma"]


def test_every_lemma_command_line_parses():
    lines = command_lines()
    assert len(lines) >= 10
    group = typer.main.get_command(app)
    for words in lines:
        with group.make_context("lemma", list(words[1:2]), resilient_parsing=True) as ctx:
            command = group.get_command(ctx, words[1])
            assert command is not None, words
            try:
                command.make_context(words[1], list(words[2:]))
            except click.UsageError as exc:
                pytest.fail(f"README line {' '.join(words)!r}: {exc}")


def test_scripts_exist():
    scripts = [words[1] for words in shell_lines() if words[0] == "bash"]
    assert "scripts/test.sh" in scripts and "scripts/demo.sh" in scripts
    assert all((ROOT / script).is_file() for script in scripts)


def test_curl_example(port):
    block = next(b for b in blocks("bash") if "curl" in b)
    command = block[block.index("curl"):].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"choices"' in result.stdout and '"raas-512"' in result.stdout
