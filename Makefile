# Two set-up commands on a fresh machine: `make demo` and `make test`.
# Installs into .venv with constraints/ci.txt (torch 2.13.0 = the CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build). Users installing the package are not pinned.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mvlm-compile-installed
DEMO_DIR ?= build/demo

.PHONY: demo test plugin golden clean

$(STAMP): pyproject.toml constraints/ci.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints/ci.txt -e '.[host,dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/mvlm-compile synth --preset tiny --seed 0 --out $(DEMO_DIR)/checkpoint
	$(BIN)/mvlm-compile golden --checkpoint $(DEMO_DIR)/checkpoint --out $(DEMO_DIR)/golden

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Regenerate the committed golden tensors of the tiny model (after a deliberate model change).
golden: $(STAMP)
	$(BIN)/mvlm-compile synth --preset tiny --seed 0 --out build/golden-tiny-checkpoint
	$(BIN)/mvlm-compile golden --checkpoint build/golden-tiny-checkpoint --out golden/tiny

plugin:
	cmake -S plugins/peg -B plugins/peg/build && cmake --build plugins/peg/build -j

clean:
	rm -rf build plugins/peg/build
