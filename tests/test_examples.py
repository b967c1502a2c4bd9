"""Every example under examples/ runs as its README says, on the suite's fixtures: the seed-0 tiny
checkpoint, the embedded shapes model's deployed form (conftest's shapes_int4), the committed tiny
bundle, and real `serve` and Triton servers started as tests/test_serve.py and
tests/test_triton.py start theirs. The CI job files parse and name only commands the CLI has."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from conftest import GOLDEN_SHAPES, GOLDEN_TINY, QUESTION, copy_tiny_bundle, shapes_reference_answer

from mvlm_compile.cli import cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
IMAGE = GOLDEN_SHAPES / "image.png"


def run_example(*argv: str | Path, env: dict[str, str] | None = None, timeout: float = 300):
    """Run an example as a user would, with this interpreter's `mvlm-compile` first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    command = [str(a) for a in argv]
    if command[0].endswith(".py"):
        command.insert(0, sys.executable)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)


def test_every_example_has_a_readme_and_a_test():
    folders = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == [
        "01_build_and_verify",
        "02_python_session",
        "03_openai_client",
        "04_triton_grpc_stream",
        "05_ci_golden_gate",
        "06_scripted_chat",
    ]
    index = (EXAMPLES / "README.md").read_text()
    for folder in folders:
        assert (EXAMPLES / folder / "README.md").is_file(), folder
        assert f"`{folder}/`" in index, folder


def test_01_build_and_verify(tiny_checkpoint, tmp_path):
    """From a checkpoint (the seed-0 tiny one, which builds in seconds; `make demo` does the same with
    the shapes model): the bundle is ready for the Orin (engines deferred, status 3 taken as success),
    verify passes with its JUnit beside the report, and run answers."""
    result = run_example(EXAMPLES / "01_build_and_verify" / "build_and_verify.sh", tiny_checkpoint, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "copy it to the target" in result.stdout + result.stderr
    assert json.loads((tmp_path / "verify.json").read_text())["passed"] is True
    assert ET.parse(tmp_path / "verify.xml").getroot().get("failures") == "0"
    assert (
        "mvlm-compile build bundle --target orin-nx-16gb" in (tmp_path / "bundle" / "BUILD_ON_TARGET.txt").read_text()
    )
    assert "PASSED" in result.stdout and result.stdout.rstrip().splitlines()[-1] != "PASSED"  # then run's answer


def test_02_python_session(shapes_int4):
    text, _ = shapes_reference_answer()
    result = run_example(EXAMPLES / "02_python_session" / "ask_about_image.py", shapes_int4, IMAGE, QUESTION, QUESTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(text) == 2
    assert "vision runs: 1, answered from the image cache: 1" in result.stdout


def test_03_openai_client_against_serve(shapes_int4):
    from test_serve import Server

    text, tokens = shapes_reference_answer()
    server = Server(shapes_int4)
    try:
        result = run_example(EXAMPLES / "03_openai_client" / "chat.py", f"{server.url}/v1", IMAGE, QUESTION)
    finally:
        assert server.stop() == 0, "".join(server.log)
    assert result.returncode == 0, result.stderr
    whole, usage, streamed = result.stdout.splitlines()
    assert whole == f"{QUESTION} -> {text}"
    assert re.fullmatch(rf"  \[\d+ prompt \+ {tokens} answer tokens, stop\]", usage)
    assert streamed == f"streamed -> {text}"


def test_04_triton_grpc_stream(shapes_int4, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="the [triton] extra is not installed (make test does)")
    from test_triton import triton_server

    text, tokens = shapes_reference_answer()
    with triton_server(shapes_int4, tmp_path, instances=1) as server:
        result = run_example(EXAMPLES / "04_triton_grpc_stream" / "stream.py", server["grpc"], IMAGE, QUESTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{QUESTION} -> {text}  [{tokens} pieces]\n"


def test_05_golden_gate_passes_and_writes_the_junit(tmp_path):
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    reports = tmp_path / "reports"
    gate = EXAMPLES / "05_ci_golden_gate" / "golden_gate.sh"
    result = run_example(gate, bundle, reports, env={"BACKEND": "ort", "GOLDEN": str(GOLDEN_TINY)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((reports / "verify.json").read_text())["passed"] is True
    suite = ET.parse(reports / "verify.xml").getroot()
    cases = suite.findall(".//testcase")
    assert suite.get("failures") == "0" and len(cases) > 4
    assert {c.get("classname", "").split(".")[-1] for c in cases} >= {"vision", "projector", "decoder_prefill"}


def test_05_golden_gate_fails_on_golden_tensors_of_another_model(tmp_path):
    """The tiny bundle against the shapes model's golden set: the gate's status is verify's (not 0),
    so the CI job fails."""
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    gate = EXAMPLES / "05_ci_golden_gate" / "golden_gate.sh"
    result = run_example(gate, bundle, tmp_path / "reports", env={"BACKEND": "ort", "GOLDEN": str(GOLDEN_SHAPES)})
    assert result.returncode in (1, 2), result.stdout + result.stderr
    assert "error:" in result.stderr or "FAILED" in result.stdout


def test_06_scripted_chat(shapes_int4, tmp_path):
    """The three answers are a Session conversation's, asked in turn (computed here, without prefix
    reuse); the script prints them beside their questions."""
    from mvlm_compile import Session

    questions = ["Describe the image in one sentence.", "How many shapes are there?", "What shape is on the left?"]
    with Session(shapes_int4, max_batch=1, prefix_cache_mib=0) as session:
        conversation = session.conversation(image=IMAGE)
        answers = [conversation.ask(question, max_tokens=64).text for question in questions]
    result = run_example(EXAMPLES / "06_scripted_chat" / "chat.sh", shapes_int4, IMAGE, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "answers.txt").read_text().splitlines() == answers
    assert result.stdout.splitlines() == [f"{q} -> {a}" for q, a in zip(questions, answers)]


@pytest.mark.parametrize("job_file", ["github-actions.yml", "gitlab-ci.yml"])
def test_05_job_files_parse_and_name_real_commands(job_file):
    """Each job file is YAML, runs the golden gate script, names only mvlm-compile commands that exist,
    and publishes the JUnit that verify writes beside --report."""
    job = yaml.safe_load((EXAMPLES / "05_ci_golden_gate" / job_file).read_text())
    if job_file == "gitlab-ci.yml":
        shell = "\n".join(job["golden-gate"]["script"])
        assert job["golden-gate"]["artifacts"]["reports"]["junit"] == "reports/verify.xml"
        assert "jetson" in job["golden-gate"]["tags"]
    else:
        steps = job["jobs"]["verify-on-jetson"]["steps"]
        shell = "\n".join(step["run"] for step in steps if "run" in step)
        assert "self-hosted" in job["jobs"]["verify-on-jetson"]["runs-on"]
        published = [s for s in steps if s.get("if") == "always()"]
        assert any(s.get("with", {}).get("report_paths") == "reports/verify.xml" for s in published)
        assert any(s.get("with", {}).get("path") == "reports/" for s in published)
    assert re.search(r"^examples/05_ci_golden_gate/golden_gate\.sh \"\$MVLM_BUNDLE\" reports$", shell, re.MULTILINE)
    gate = (EXAMPLES / "05_ci_golden_gate" / "golden_gate.sh").read_text()
    commands = set(re.findall(r"^\s*mvlm-compile ([a-z][\w-]*)", shell + "\n" + gate, re.MULTILINE))
    assert {"build", "verify"} <= commands <= set(cli.commands), commands - set(cli.commands)
    assert '--report "$reports/verify.json"' in gate  # verify writes verify.xml beside it: what the jobs publish
