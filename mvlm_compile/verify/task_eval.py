"""Task evaluation: the shapes model's answers on the held-out eval split, through a backend.

Torch-free: the images are redrawn in code (numpy + PIL) from the seeds recorded in the golden
task file (task.json, written by `golden` for a task model), and checked against the recorded
pixel hashes. Each question goes through the runtime's own path (Chat's prompt, Pipeline's
image embeddings, splice and decoder steps), greedy until EOS. Measured per item and summed:

- exact match: the answer text equals the expected answer;
- identical to the reference: the greedy tokens equal the FP32 PyTorch reference's, EOS included;
- token agreement: matching leading tokens over the reference's tokens (all items together).

The gate (`task` keys of a precision's tolerances) compares these with the reference on the
same items: FP32 graphs must answer exactly as PyTorch does; lower precisions may lose at most
`task_exact_match_drop` of exact match and must give identical answers on at least
`task_identical` of the items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mvlm_compile.errors import ArtifactError
from mvlm_compile.fileio import read_json_object
from mvlm_compile.model.preprocess import preprocess_image
from mvlm_compile.table import render_table
from mvlm_compile.verify.metrics import greedy_agreement

TASK_FILE = "task.json"
PRECISION_ORDER = ("fp32", "fp16", "int4")  # an artifacts directory is judged by its lowest precision
_ITEM_KEYS = ("index", "seed", "kind", "question", "answer", "image_sha256", "reference_tokens", "reference_text")


def has_task(golden_dir: Path) -> bool:
    return (Path(golden_dir) / TASK_FILE).exists()


def load_task_golden(golden_dir: Path) -> dict:
    """task.json, checked enough that a damaged file is a one-line error."""
    path = Path(golden_dir) / TASK_FILE
    data = read_json_object(path, "golden task answers", required=("task", "items", "max_new_tokens", "eos_token_id"))
    items = data["items"]
    if not isinstance(items, list) or not items:
        raise ArtifactError(f"{path}: corrupt, 'items' must be a non-empty list")
    for item in items:
        missing = [k for k in _ITEM_KEYS if not isinstance(item, dict) or k not in item]
        if missing:
            raise ArtifactError(f"{path}: corrupt, an item lacks {', '.join(missing)}")
        tokens = item["reference_tokens"]
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ArtifactError(f"{path}: corrupt, item {item['index']}: 'reference_tokens' must be token ids")
    from mvlm_compile.tinytask.dataset import TASK_NAME, TASK_VERSION

    if data["task"] != {"name": TASK_NAME, "version": TASK_VERSION}:
        raise ArtifactError(f"{path}: task {data['task']}, this version evaluates {TASK_NAME!r} version {TASK_VERSION}")
    return data


@dataclass
class ItemResult:
    index: int
    kind: str
    question: str
    expected: str
    answer: str
    tokens: list[int]
    reference_tokens: list[int]
    reference_text: str
    held_out_combination: bool
    held_out_phrasing: bool

    @property
    def exact(self) -> bool:
        return self.answer == self.expected

    @property
    def reference_exact(self) -> bool:
        return self.reference_text == self.expected

    @property
    def identical(self) -> bool:
        return self.tokens == self.reference_tokens

    def to_json(self) -> dict:
        return {
            **self.__dict__,
            "exact": self.exact,
            "identical_to_reference": self.identical,
            "prefix": greedy_agreement(self.tokens, self.reference_tokens)["prefix"],
        }


@dataclass
class TaskEval:
    artifacts: str
    precision: str
    results: list[ItemResult]
    tolerance: dict = field(default_factory=dict)

    def _rate(self, rows: list[ItemResult], what: Callable[[ItemResult], bool]) -> float | None:
        return round(sum(map(what, rows)) / len(rows), 4) if rows else None

    def summary(self) -> dict:
        rows = self.results
        prefixes = sum(greedy_agreement(r.tokens, r.reference_tokens)["prefix"] for r in rows)
        reference_tokens = sum(len(r.reference_tokens) for r in rows)
        return {
            "items": len(rows),
            "exact_match": self._rate(rows, lambda r: r.exact),
            "reference_exact_match": self._rate(rows, lambda r: r.reference_exact),
            "identical_to_reference": self._rate(rows, lambda r: r.identical),
            "token_agreement": round(prefixes / max(1, reference_tokens), 4),
            "by_kind": {
                kind: self._rate([r for r in rows if r.kind == kind], lambda r: r.exact)
                for kind in dict.fromkeys(r.kind for r in rows)
            },
            "held_out_combination": self._rate([r for r in rows if r.held_out_combination], lambda r: r.exact),
            "held_out_phrasing": self._rate([r for r in rows if r.held_out_phrasing], lambda r: r.exact),
            "seen": self._rate(
                [r for r in rows if not (r.held_out_combination or r.held_out_phrasing)], lambda r: r.exact
            ),
        }

    def gate(self) -> dict:
        """The pass/fail of this evaluation against its precision's task tolerance."""
        s = self.summary()
        drop = round(s["reference_exact_match"] - s["exact_match"], 4)
        need_identical = float(self.tolerance.get("task_identical", 1.0))
        max_drop = float(self.tolerance.get("task_exact_match_drop", 0.0))
        return {
            "identical_to_reference": s["identical_to_reference"],
            "required_identical": need_identical,
            "exact_match_drop": drop,
            "allowed_drop": max_drop,
            "passed": s["identical_to_reference"] >= need_identical and drop <= max_drop,
        }

    @property
    def passed(self) -> bool:
        return self.gate()["passed"]

    def to_json(self) -> dict:
        return {
            "artifacts": self.artifacts,
            "precision": self.precision,
            "summary": self.summary(),
            "gate": self.gate(),
            "items": [r.to_json() for r in self.results],
        }


def lowest_precision(manifest) -> str:
    dtypes = {g["dtype"] for g in manifest.graphs.values()}
    return max(dtypes, key=lambda d: PRECISION_ORDER.index(d) if d in PRECISION_ORDER else len(PRECISION_ORDER))


def evaluate_task(
    backend,
    golden_dir: Path,
    tolerances: dict | None = None,
    items: int | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> TaskEval:
    """Answer the first `items` (default all) questions of the golden task file through `backend`."""
    from mvlm_compile.runtime.pipeline import Chat, Pipeline
    from mvlm_compile.tinytask.scenes import draw_scene, image_digest, sample_scene
    from mvlm_compile.verify.components import TOLERANCES

    golden = load_task_golden(golden_dir)
    chat = Chat(Pipeline(backend))
    pipeline = chat.pipeline
    if chat.eos != golden["eos_token_id"]:
        raise ArtifactError(
            f"{golden_dir / TASK_FILE}: EOS id {golden['eos_token_id']} differs from the artifacts' {chat.eos}"
        )
    chosen = golden["items"][: items or None]
    results = []
    for number, item in enumerate(chosen):
        if number % 25 == 0:
            progress(f"task item {number}/{len(chosen)}")
        image = draw_scene(sample_scene(tuple(item["seed"])))
        if image_digest(image) != item["image_sha256"]:
            raise ArtifactError(
                f"{golden_dir / TASK_FILE}: item {item['index']}: the scene drawn from its seed differs from the "
                "recorded one (task.json was made by another version of the scene code; rerun golden)"
            )
        embeds = pipeline.splice(chat.prompt_ids(item["question"]), pipeline.image_embeds(preprocess_image(image)))
        tokens = pipeline.greedy(embeds, int(golden["max_new_tokens"]), eos=chat.eos)
        answer = chat.tokenizer.decode([t for t in tokens if t != chat.eos])
        results.append(
            ItemResult(
                int(item["index"]),
                item["kind"],
                item["question"],
                item["answer"],
                answer,
                tokens,
                list(item["reference_tokens"]),
                item["reference_text"],
                bool(item.get("held_out_combination")),
                bool(item.get("held_out_phrasing")),
            )
        )
    precision = lowest_precision(backend.manifest)
    tolerance = {**TOLERANCES, **(tolerances or {})}.get(precision, {})
    return TaskEval(str(backend.artifacts), precision, results, tolerance)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def task_table(evals: list[tuple[str, TaskEval]]) -> str:
    """One row per evaluation: exact match (all, held-out subsets), agreement with the FP32 reference, gate."""
    rows = []
    for name, e in evals:
        s, g = e.summary(), e.gate()
        rows.append(
            (
                name,
                e.precision,
                str(s["items"]),
                _pct(s["exact_match"]),
                _pct(s["held_out_combination"]),
                _pct(s["held_out_phrasing"]),
                _pct(s["reference_exact_match"]),
                _pct(s["identical_to_reference"]),
                _pct(s["token_agreement"]),
                f"{'ok' if g['passed'] else 'FAIL'} (>= {_pct(g['required_identical'])} identical, "
                f"drop {100 * g['exact_match_drop']:+.1f} <= {100 * g['allowed_drop']:.1f} pts)",
            )
        )
    header = (
        "artifacts",
        "precision",
        "items",
        "exact match",
        "held-out combos",
        "held-out wording",
        "FP32 ref exact",
        "identical to ref",
        "token agreement",
        "gate",
    )
    return render_table(header, rows)
