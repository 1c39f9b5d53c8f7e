# `make setup` builds .venv with the CPU constraints (torch==2.13.0); `make test` runs the fast suite.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow bench quickstart

$(STAMP): pyproject.toml constraints-cpu.txt
	@# Debian's chromium and its driver for the browser tests of HTML reports and the arena page (apt-get, as root;
	@# a browser that downloads itself at install time cannot run here)
	@{ command -v chromium && command -v chromedriver; } >/dev/null || [ "$$(id -u)" != 0 ] || \
		apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || true
	@command -v chromium >/dev/null || echo "chromium is not installed: the browser tests will fail (apt-get install chromium)"
	@command -v chromedriver >/dev/null || echo "chromedriver is not installed: the arena's browser test will fail (apt-get install chromium-driver)"
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

quickstart: $(STAMP)
	$(VENV)/bin/fmkit quickstart

bench: $(STAMP)
	$(VENV)/bin/python bench/pretrain_throughput.py
	$(VENV)/bin/python bench/generate_throughput.py
	$(VENV)/bin/python bench/curate_throughput.py
	$(VENV)/bin/python bench/eval_throughput.py
	$(VENV)/bin/python bench/lora_throughput.py
	$(VENV)/bin/python bench/rag_latency.py
	$(VENV)/bin/python bench/platform_job.py
	$(VENV)/bin/python bench/serve_throughput.py
	$(VENV)/bin/python bench/monitor_power.py
	test -f fmkit-workspace/shards/stdlib-train/index.json || $(VENV)/bin/fmkit quickstart
	$(VENV)/bin/python bench/scale_prediction.py --emergence
