# Two set-up commands on a fresh machine: `make demo` and `make test`.
# Installs into .venv with constraints/ci.txt (torch 2.13.0 = the CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build). Users installing the package are not pinned.
# The [rtx] extra is TensorRT for RTX: the suite builds real engines with it, no GPU needed.
# The [triton] extra and nvidia-pytriton's CPU tritonserver (installed without its dependencies: its
# metadata pins numpy<2; only its binaries are used) serve a model repository in the suite; the models
# run in $(TRITON_PYTHON), a second venv with numpy<2 (constraints/triton-python.txt), which that
# server's Python backend needs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mvlm-compile-installed
TRITON_PYTHON := $(VENV)/triton-python
DEMO_DIR ?= build/demo
DEMO_TARGET ?= orin-agx-64gb
BENCH_DIR ?= build/bench
TINY_BUNDLE := tests/data/tiny-bundle
# The embedded model that answers (trained by `make tiny-model`, committed) and its golden set.
TINY_MODEL ?= models/tiny-shapes
GOLDEN_SHAPES ?= golden/tiny-shapes
# Material for MkDocs prints a banner about its successor on every build; the build's own warnings stay.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

.PHONY: demo test docs lint-fix bench task-bench tiny-model plugin golden tiny-bundle clean

$(STAMP): pyproject.toml constraints/ci.txt constraints/triton-python.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints/ci.txt -e '.[host,dev,rtx,serve,triton,docs]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints/ci.txt nvidia-pytriton
	test -x $(TRITON_PYTHON)/bin/python || $(PYTHON) -m venv $(TRITON_PYTHON)
	grep -v -e '^numpy==' -e '^ml_dtypes==' constraints/ci.txt > $(TRITON_PYTHON)/constraints.txt
	$(TRITON_PYTHON)/bin/python -m pip install --quiet --disable-pip-version-check -c $(TRITON_PYTHON)/constraints.txt \
	  -c constraints/triton-python.txt -e . onnxruntime-extensions
	touch $@

# The main job on the embedded model that answers (models/tiny-shapes): build for an Orin (here
# the engines are deferred to the target: exit status 3 is expected without TensorRT), verify the
# bundle's graphs in ONNX Runtime (components, golden tokens, and the answers to 50 held-out
# questions), then ask about the committed example image (a yellow star at the top, a red circle
# on the left, a blue square on the right).
demo: $(STAMP)
	status=0; $(BIN)/mvlm-compile build $(TINY_MODEL) --target $(DEMO_TARGET) --out $(DEMO_DIR)/bundle || status=$$?; \
	  test $$status -eq 0 -o $$status -eq 3
	$(BIN)/mvlm-compile verify $(DEMO_DIR)/bundle --golden $(DEMO_DIR)/bundle/golden --report $(DEMO_DIR)/verify.json
	for q in "Describe the image in one sentence." "How many shapes are there?" "What shape is on the left?" \
	  "Where is the red shape?"; do \
	  printf '%s -> ' "$$q"; $(BIN)/mvlm-compile run $(DEMO_DIR)/bundle --image $(GOLDEN_SHAPES)/image.png --prompt "$$q" || exit 1; \
	done

# Train the embedded model from scratch on the CPU (deterministic; about 30 minutes on 2 cores)
# and regenerate its golden set. The result is committed: nobody needs to run this.
tiny-model: $(STAMP)
	$(BIN)/python -m mvlm_compile.tinytask.train --out $(TINY_MODEL)
	$(BIN)/mvlm-compile golden --checkpoint $(TINY_MODEL) --out $(GOLDEN_SHAPES)

# The embedded model's answers on the whole held-out split at every precision (FP32 ONNX, FP16,
# INT4 RTN/AWQ at several group sizes): the numbers behind recipes/tiny-shapes.yaml's tolerances.
task-bench: $(STAMP)
	$(BIN)/python benchmarks/task_bench.py --workdir $(BENCH_DIR)/task

# The linter and the documentation are part of the suite: format and lint (ruff, settings in
# pyproject.toml), then pytest, then the docs site in strict mode (a broken link, a page missing from
# the nav or a reference to code that does not exist fails).
test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
	$(MKDOCS) build --strict -d build/docs-site

# The documentation site (mkdocs.yml, docs/) into build/docs-site; `$(BIN)/mkdocs serve` previews it.
docs: $(STAMP)
	$(MKDOCS) build --strict -d build/docs-site

# Apply ruff's formatting and safe fixes.
lint-fix: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Full-size synthetic 1.7B: the main job (build + verify) end to end, export time/memory, quantization accuracy/time/memory, and
# ONNX Runtime (INT4) vs PyTorch eager speed, the lm_head precision study, the INT4 kernel per block size, and (with the [bench] extra
# installed) ours against llama.cpp Q4_0 and `serve` under load (Locust, 1-8 users, tiny-shapes); the shapes model served by
# Triton (perf_analyzer). Long (tens of minutes) and ~20 GB of disk.
bench: $(STAMP)
	$(BIN)/python benchmarks/build_bench.py --preset mobilevlm-v2-1.7b --target orin-agx-64gb --workdir $(BENCH_DIR)
	$(BIN)/python benchmarks/export_bench.py --preset mobilevlm-v2-1.7b --dtype fp32 --workdir $(BENCH_DIR)
	$(BIN)/python benchmarks/quantize_bench.py --preset mobilevlm-v2-1.7b --workdir $(BENCH_DIR)
	$(BIN)/mvlm-compile bench $(BENCH_DIR)/mobilevlm-v2-1.7b-int4-awq --checkpoint $(BENCH_DIR)/mobilevlm-v2-1.7b-checkpoint \
	  --report $(BENCH_DIR)/runtime_bench-1.7b.json
	$(BIN)/python benchmarks/lm_head_study.py --checkpoint $(BENCH_DIR)/mobilevlm-v2-1.7b-checkpoint \
	  --report $(BENCH_DIR)/lm_head_study-1.7b.json
	status=0; $(BIN)/python benchmarks/llama_cpp_bench.py --checkpoint $(BENCH_DIR)/mobilevlm-v2-1.7b-checkpoint \
	  --artifacts $(BENCH_DIR)/mobilevlm-v2-1.7b-int4-rtn --workdir $(BENCH_DIR) || status=$$?; \
	  test $$status -eq 0 -o $$status -eq 3  # 3: skipped, the [bench] extra (llama.cpp) is not installed
	$(BIN)/python benchmarks/int4_kernel_bench.py --report $(BENCH_DIR)/int4_kernel_bench-1.7b.json
	$(BIN)/python benchmarks/peg_kernel_bench.py || echo "peg_kernel_bench: needs a CUDA GPU"
	$(BIN)/python benchmarks/task_bench.py --workdir $(BENCH_DIR)/task
	$(BIN)/python benchmarks/triton_bench.py --workdir $(BENCH_DIR)/triton --report $(BENCH_DIR)/triton_bench-tiny-shapes.json
	$(BIN)/python benchmarks/batching_bench.py $(BENCH_DIR)/mobilevlm-v2-1.7b-bundle --report $(BENCH_DIR)/batching_bench-1.7b.json
	status=0; $(BIN)/python benchmarks/serve_bench.py --workdir $(BENCH_DIR) --report $(BENCH_DIR)/serve_bench-tiny-shapes.json \
	  || status=$$?; test $$status -eq 0 -o $$status -eq 3  # 3: skipped, the [bench] extra (Locust) is not installed

# Regenerate the committed golden sets (after a deliberate change to a model or to the reference):
# the random tiny model's (the exporter's own tests) and the shapes model's.
golden: $(STAMP)
	$(BIN)/mvlm-compile synth --preset tiny --seed 0 --out build/golden-tiny-checkpoint
	$(BIN)/mvlm-compile golden --checkpoint build/golden-tiny-checkpoint --out golden/tiny
	$(BIN)/mvlm-compile golden --checkpoint $(TINY_MODEL) --out $(GOLDEN_SHAPES)

# Regenerate the committed tiny bundle (its artifacts; its golden tensors are golden/tiny) after a
# deliberate change to export, optimize or quantize: tests/test_build_pipeline.py says when. Made
# in a scratch directory with relative paths, so that its manifest names no machine's directories.
tiny-bundle: $(STAMP)
	rm -rf build/tiny-bundle && mkdir -p build/tiny-bundle
	cd build/tiny-bundle && $(abspath $(BIN))/mvlm-compile synth --preset tiny --seed 0 --out checkpoint
	cd build/tiny-bundle && { status=0; $(abspath $(BIN))/mvlm-compile build checkpoint --target orin-nx-16gb \
	  --out bundle || status=$$?; test $$status -eq 0 -o $$status -eq 3; }
	rm -rf $(TINY_BUNDLE) && mkdir -p $(TINY_BUNDLE)
	cp -r build/tiny-bundle/bundle/artifacts build/tiny-bundle/bundle/recipe.yaml $(TINY_BUNDLE)/
	sed -i 's#$(abspath build/tiny-bundle)/##' $(TINY_BUNDLE)/artifacts/manifest.json  # quantize records its source

plugin:
	cmake -S plugins/peg -B plugins/peg/build && cmake --build plugins/peg/build -j

clean:
	rm -rf build plugins/peg/build
