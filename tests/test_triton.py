"""Serving through Triton: `mvlm-compile triton BUNDLE --out REPO --serve` on the embedded shapes model
(deployed form: INT4 decoder), answered by a real tritonserver (nvidia-pytriton's CPU build, core 2.51)
and asked with Triton's own clients (tritonclient gRPC streams, the HTTP generate endpoints).

The expected answer is the FP32 PyTorch reference's (golden/tiny-shapes/generation.json: the greedy
tokens for the example image, up to EOS), and the expected stream is that answer decoded token by
token with the model's tokenizer. One server for the module, two instances of the entry model.

Skipped, with the reason, only where the [triton] extra, nvidia-pytriton or the models' environment
(.venv/triton-python) is missing: `make test` installs all three.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from mvlm_compile.cli import cli
from mvlm_compile.errors import MvlmError
from mvlm_compile.fileio import MARKER
from mvlm_compile.ports import free_ports
from mvlm_compile.triton import repository as triton_repository

grpcclient = pytest.importorskip("tritonclient.grpc", reason="the [triton] extra is not installed (make test does)")
from google.protobuf import text_format  # noqa: E402  (tritonclient's protobuf)
from tritonclient.grpc import model_config_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden" / "tiny-shapes"
IMAGE = GOLDEN / "image.png"
QUESTION = "Describe the image in one sentence."
MODEL = "mobilevlm"
MODELS_PYTHON = Path(os.environ.get("MVLM_TRITON_PYTHON", ROOT / ".venv" / "triton-python" / "bin" / "python"))


@pytest.fixture(scope="module")
def reference() -> tuple[str, list[str]]:
    """(answer, its pieces): the FP32 reference's tokens up to EOS, decoded whole and one token at a time."""
    generation = json.loads((GOLDEN / "generation.json").read_text())
    assert QUESTION in generation["prompt"]
    tokens = generation["generated_ids"]
    tokens = tokens[: tokens.index(2)]  # EOS
    tokenizer = Tokenizer.from_file(str(ROOT / "models" / "tiny-shapes" / "tokenizer.json"))
    pieces = [tokenizer.decode(tokens[: i + 1])[len(tokenizer.decode(tokens[:i])) :] for i in range(len(tokens))]
    return tokenizer.decode(tokens), pieces


@contextlib.contextmanager
def triton_server(bundle: Path, root: Path, instances: int = 2):
    """The CLI makes BUNDLE's repository in ROOT and serves it (`--serve`) until SIGTERM, which must stop
    it cleanly; yields its gRPC and HTTP addresses, the repository and the log. Skips where the CPU
    tritonserver or the models' environment is missing."""
    from mvlm_compile.triton.server import find_server_files

    try:
        find_server_files()
    except MvlmError as e:
        pytest.skip(str(e))
    if not MODELS_PYTHON.exists():
        pytest.skip(f"{MODELS_PYTHON}: the models' environment (numpy < 2) is missing; make test makes it")
    http, grpc, metrics = free_ports(3)
    command = [
        *(sys.executable, "-c", "from mvlm_compile.cli import main; main()"),
        *("triton", str(bundle), "--out", str(root / "repo"), "--instances", str(instances)),
        *("--int4-activations", "fp32"),
        *("--serve", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)),
        *("--python", str(MODELS_PYTHON)),
    ]
    log = root / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
    try:
        deadline = time.monotonic() + 240
        while not _ready(client):
            assert process.poll() is None, f"mvlm-compile triton --serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in 240 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield {"grpc": f"127.0.0.1:{grpc}", "http": f"http://127.0.0.1:{http}", "repo": root / "repo", "log": log}
        process.send_signal(signal.SIGTERM)  # as Ctrl-C: the CLI stops tritonserver, then exits 130
        assert process.wait(60) == 130, log.read_text()[-3000:]
        assert "interrupted: mvlm-compile triton" in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the CLI's session: it and the tritonserver it started
            process.wait()
        client.close()


@pytest.fixture(scope="module")
def server(shapes_int4, tmp_path_factory):
    with triton_server(shapes_int4, tmp_path_factory.mktemp("triton")) as s:
        yield s


def _ready(client) -> bool:
    try:
        return client.is_server_ready()
    except Exception:  # not listening yet
        return False


def _inputs(question: str, image: bytes, stream: bool = True, max_tokens: int = 64, **extra) -> list:
    """A request shaped as TensorRT-LLM's clients send it: a batch of one, [1, 1] scalars."""
    tensors = [
        ("text_input", "BYTES", np.array([[question.encode()]], dtype=np.object_)),
        ("image", "UINT8", np.frombuffer(image, dtype=np.uint8)[None]),
        ("max_tokens", "INT32", np.array([[max_tokens]], dtype=np.int32)),
        ("stream", "BOOL", np.array([[stream]])),
    ]
    if "stop_words" in extra:
        tensors.append(("stop_words", "BYTES", np.array([[w.encode() for w in extra["stop_words"]]], dtype=np.object_)))
    if "temperature" in extra:
        tensors.append(("temperature", "FP32", np.array([[extra["temperature"]]], dtype=np.float32)))
    if "random_seed" in extra:
        tensors.append(("random_seed", "UINT64", np.array([[extra["random_seed"]]], dtype=np.uint64)))
    inputs = []
    for name, dtype, array in tensors:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class Stream:
    """One gRPC stream: requests in, (pieces, error, final flags) out per request."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def ask(self, *args, **kwargs) -> tuple[list[str], str | None]:
        """The text pieces until the final response (or the error), checking the final one is empty."""
        self.client.async_stream_infer(MODEL, _inputs(*args, **kwargs), enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = self.responses.get(timeout=120)
            if error is not None:
                return pieces, str(error)
            self.last_piece_at = time.perf_counter()
            if not pieces:
                self.first_piece_at = self.last_piece_at
            final = result.get_response().parameters["triton_final_response"].bool_param
            text = result.as_numpy("text_output")
            if final:
                assert text is None or text.size == 0  # the final response carries no text
                return pieces, None
            assert text.shape == (1, 1)
            pieces.append(text[0, 0].decode())

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def test_streams_the_reference_answer_token_by_token(server, reference):
    text, pieces = reference
    stream = Stream(server["grpc"])
    try:
        got, error = stream.ask(QUESTION, IMAGE.read_bytes())
        assert error is None and got == pieces and "".join(got) == text
        whole, error = stream.ask(QUESTION, IMAGE.read_bytes(), stream=False)  # one response, then the final
        assert error is None and whole == [text]
        short, _ = stream.ask(QUESTION, IMAGE.read_bytes(), max_tokens=3)
        assert short == pieces[:3]
        word = text.split()[3]
        stopped, _ = stream.ask(QUESTION, IMAGE.read_bytes(), stop_words=[word, ""])  # "" = none, as TRT-LLM sends
        assert "".join(stopped) == text[: text.index(word)]
    finally:
        stream.close()


def test_four_concurrent_streams_are_decoded_together_and_get_the_right_answer(server, reference):
    """The entry model answers each request on a thread of its own, so its Session's scheduler
    decodes them together: a stream's first piece comes before another's last (one at a time,
    each would end before the next began)."""
    text, pieces = reference
    results: dict[int, tuple] = {}
    spans: dict[int, tuple[float, float]] = {}

    def ask(index: int) -> None:
        stream = Stream(server["grpc"])
        try:
            results[index] = stream.ask(QUESTION, IMAGE.read_bytes())
            spans[index] = stream.first_piece_at, stream.last_piece_at
        finally:
            stream.close()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert results == {i: (pieces, None) for i in range(4)}
    assert any(spans[a][0] < spans[b][1] for a in spans for b in spans if a != b and spans[a][0] > spans[b][0])


def test_a_cancelled_stream_stops_its_generation_between_two_tokens(server, reference):
    """stop_stream(cancel_requests=True) mid-answer: the model sees the request cancelled, ends its
    generation (it logs how many tokens it made, far fewer than the 300 asked for) and answers the next."""
    long = {"max_tokens": 300, "temperature": 100.0}  # sampled wildly: some seed runs to max_tokens
    stream = Stream(server["grpc"])
    try:
        seed = next(
            seed
            for seed in range(1, 9)
            if len(stream.ask(QUESTION, IMAGE.read_bytes(), random_seed=seed, **long)[0]) > 250
        )
    finally:
        stream.close()
    client = grpcclient.InferenceServerClient(server["grpc"])
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(MODEL, _inputs(QUESTION, IMAGE.read_bytes(), random_seed=seed, **long))
    result, error = responses.get(timeout=120)
    assert error is None and result.as_numpy("text_output").size == 1  # the first piece
    client.stop_stream(cancel_requests=True)
    client.close()

    (triton_log,) = re.findall(r"\(log: (.+tritonserver\.log)\)", server["log"].read_text())
    deadline, made = time.monotonic() + 60, []
    while not made and time.monotonic() < deadline:
        made = re.findall(r"request cancelled by its client after (\d+) tokens", Path(triton_log).read_text())
        time.sleep(0.2)
    assert made and int(made[-1]) < 250, made
    again = Stream(server["grpc"])
    try:
        assert again.ask(QUESTION, IMAGE.read_bytes()) == (reference[1], None)
    finally:
        again.close()


def test_a_bad_request_is_an_error_response_and_the_server_carries_on(server, reference):
    text, pieces = reference
    stream = Stream(server["grpc"])
    try:
        got, error = stream.ask(QUESTION, b"this is not an image file")
        assert got == [] and error is not None and "bad request: image: not an image file" in error
        got, error = stream.ask("", IMAGE.read_bytes())
        assert got == [] and "prompt" in error and "is empty" in error
        got, error = stream.ask(QUESTION, IMAGE.read_bytes(), max_tokens=100_000)
        assert got == [] and "exceed the context" in error
        again, error = stream.ask(QUESTION, IMAGE.read_bytes())  # the same stream, the same server
        assert error is None and again == pieces
    finally:
        stream.close()
    client = grpcclient.InferenceServerClient(server["grpc"])
    assert client.is_server_live() and client.is_model_ready(MODEL)
    client.close()


def test_http_generate_stream_and_generate(server, reference):
    text, pieces = reference
    body = {"text_input": QUESTION, "image": list(IMAGE.read_bytes()), "max_tokens": 64}
    events = _post(f"{server['http']}/v2/models/{MODEL}/generate_stream", {**body, "stream": True})
    lines = [json.loads(line[len("data: ") :]) for line in events.splitlines() if line.startswith("data: ")]
    assert [event["text_output"] for event in lines] == pieces
    whole = json.loads(_post(f"{server['http']}/v2/models/{MODEL}/generate", body))
    assert whole["text_output"] == text


def test_the_served_config_is_the_repository_s(server):
    client = grpcclient.InferenceServerClient(server["grpc"])
    try:
        config = client.get_model_config(MODEL).config
    finally:
        client.close()
    assert config.model_transaction_policy.decoupled and config.backend == "python"
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    names = {i.name: (model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.optional) for i in config.input}
    assert names == {n: (t, d, o) for n, t, d, o in triton_repository.ENTRY_INPUTS}
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type)) for o in config.output] == [
        ("text_output", "TYPE_STRING")
    ]


def _post(url: str, body: dict) -> str:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode()


# --- The repository itself (no server).


def test_the_repository_is_self_contained(shapes_int4, tmp_path):
    out = tmp_path / "repo"
    argv = ["triton", str(shapes_int4), "--out", str(out), "--json", "--max-tokens", "32", "--max-batch", "3"]
    argv += ["--prefix-cache-mib", "64"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["models"] == [MODEL] and summary["server_command"] == f"tritonserver --model-repository {out}"
    config = text_format.Parse((out / MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == MODEL and config.max_batch_size == 1
    assert {k: v.string_value for k, v in config.parameters.items()} == {
        "backend": "ort",
        "max_tokens": "32",
        "threads": "0",
        "int4_activations": "int8",
        "max_batch": "3",  # the entry model's Session decodes up to 3 requests together
        "prefill_chunk": "128",
        "prefix_cache_mib": "64.0",  # the entry model's Session keeps 64 MiB of finished answers' KV cache
    }
    version = out / MODEL / "1"
    assert (version / "model.py").read_bytes() == triton_repository.MODEL_PY.read_bytes()
    manifest = json.loads((shapes_int4 / "manifest.json").read_text())
    named = {"manifest.json", *(g["file"] for g in manifest["graphs"].values()), *manifest["files"].values()}
    copied = {
        str(p.relative_to(version / "bundle" / "artifacts")) for p in (version / "bundle" / "artifacts").rglob("*")
    }
    assert copied == named  # what the manifest names, nothing else (no reference/ graphs)
    for name in named:  # hard links on one filesystem: no second copy of the weights
        assert (version / "bundle" / "artifacts" / name).stat().st_ino == (shapes_int4 / name).stat().st_ino
    assert not any(str(shapes_int4) in p.read_text() for p in out.rglob("*.pbtxt"))  # names nothing outside
    assert json.loads((out / MARKER).read_text())["kind"] == triton_repository.KIND
    again = CliRunner().invoke(cli, ["triton", str(shapes_int4), "--out", str(out)])  # ours: replaced
    assert again.exit_code == 0, again.output


def test_the_server_command_is_quoted_for_the_shell(shapes_int4, tmp_path):
    """Pasted into bash, the printed command and SERVE.txt's run tritonserver on the repository,
    whatever its name holds; nothing else runs."""
    out = tmp_path / "r;touch PWNED $(touch PWNED2)"
    result = CliRunner().invoke(cli, ["triton", str(shapes_int4), "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = result.stdout.splitlines()[-1].strip()
    noted = next(line.strip() for line in (out / "SERVE.txt").read_text().splitlines() if "tritonserver" in line)
    for command, repository in [(printed, str(out)), (noted, out.name)]:
        fake = 'tritonserver() { printf "%s\\n" "$@"; }; '  # stands in for the server: prints its arguments
        ran = subprocess.run(["bash", "-c", fake + command], cwd=tmp_path, capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.splitlines() == ["--model-repository", repository]
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()


def test_external_weights_are_copied_and_the_repository_answers(shapes_int4, tmp_path, monkeypatch):
    """A full-size bundle keeps its weights in <graph>.onnx.data, which onnx refuses to read from a file
    of several hard links: the repository copies those (linking them failed every 1.7B request)."""
    import onnx
    from conftest import save_graph_by_hand, shapes_reference_answer

    from mvlm_compile import Session, onnx_io

    monkeypatch.setattr(onnx_io, "INLINE_WEIGHTS_LIMIT", 0)  # every graph gets <graph>.onnx.data
    artifacts = tmp_path / "artifacts"
    shutil.copytree(shapes_int4, artifacts, ignore=shutil.ignore_patterns("reference", ".mvlm-compile.lock"))
    manifest = json.loads((artifacts / "manifest.json").read_text())
    for name, graph in manifest["graphs"].items():
        save_graph_by_hand(onnx.load(artifacts / graph["file"]), artifacts, name)
    data = sorted(p.name for p in artifacts.glob("*.onnx.data"))
    assert data == sorted(f"{g['file']}.data" for g in manifest["graphs"].values())

    out = tmp_path / "repo"
    result = CliRunner().invoke(cli, ["triton", str(artifacts), "--out", str(out)])
    assert result.exit_code == 0, result.output
    copied = out / MODEL / "1" / "bundle" / "artifacts"
    for name in data:
        assert (copied / name).stat().st_nlink == 1 and (copied / name).read_bytes() == (artifacts / name).read_bytes()
    with Session(copied, int4_activations="fp32") as session:  # what the entry model opens
        assert session.generate(IMAGE, QUESTION, max_tokens=64).text == shapes_reference_answer()[0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--instances", "0"], "--instances 0: expected 1 or more"),
        (["--model-name", "../x"], "--model-name '../x': expected letters"),
        (["--max-tokens", "0"], "--max-tokens 0: expected 1 or more"),
        (["--backend", "trt", "--serve"], "--serve: the local tritonserver is CPU-only"),
    ],
)
def test_bad_options_are_one_line_usage_errors(shapes_int4, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["triton", str(shapes_int4), "--out", str(tmp_path / "repo"), *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "repo").exists()


def test_a_directory_that_is_not_ours_is_refused(shapes_int4, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["triton", str(shapes_int4), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not an mvlm-compile triton-repository directory" in result.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_the_models_python_must_have_numpy_1(tmp_path):
    """This tritonserver's Python backend reads tensors through numpy 1's ABI: a numpy 2 env is refused up front."""
    from mvlm_compile.triton.server import check_model_python

    with pytest.raises(MvlmError, match=r"numpy 2\.\d+\.\d+; this tritonserver's Python backend needs numpy < 2"):
        check_model_python(Path(sys.executable))  # the suite's own venv has numpy 2
    with pytest.raises(MvlmError, match="cannot run it"):
        check_model_python(tmp_path / "no-python")


def test_the_session_takes_its_image_embeddings_from_the_embedder(shapes_int4, reference):
    """The hook the trt entry model passes its BLS call through: the embedder runs, the backend's vision never."""
    from mvlm_compile import Session

    text, _ = reference
    with Session(shapes_int4, int4_activations="fp32") as encoder:
        calls = []

        def embedder(pixel_values: np.ndarray) -> np.ndarray:
            calls.append(pixel_values.shape)
            return encoder._chat.pipeline.image_embeds(pixel_values)  # what Triton's tensorrt models compute

        with Session(shapes_int4, int4_activations="fp32", image_embedder=embedder) as session:
            graphs = []
            run = session.backend.run
            session.backend.run = lambda graph, feed: graphs.append(graph) or run(graph, feed)  # type: ignore[method-assign]
            assert session.generate(IMAGE, QUESTION, max_tokens=64).text == text
    assert calls == [(1, 3, 336, 336)] and "vision" not in graphs and "projector" not in graphs
