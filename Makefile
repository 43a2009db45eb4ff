# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   - install, make sample archives, ingest them, show the tables, open a SQL shell
#   make test   - install, lint, run the whole test suite (what .ci/run calls), then the fast
#                 suite again on a second interpreter (Python 3.13 where one is found)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FLINK_VENV := .venv-flink
# The second interpreter CI tests on: python3.13 on PATH, else pyenv's (our machines' place)
SECOND_PYTHON ?= $(firstword $(shell command -v python3.13 >/dev/null 2>&1 && \
	python3.13 -c 'import sys; print(sys.executable)' 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13))
SECOND_VENV := .venv-second
OHIF_VERSION := 3.13.2
OHIF_DIR := dicomnet/viewer
OHIF_STAMP := $(OHIF_DIR)/.ohif-$(OHIF_VERSION)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[all,test,export]"
	touch $@

.PHONY: install demo test test-second lint typecheck debian-tools bench-tools
install: $(VENV)/.installed $(VENV)/.labextension $(FLINK_VENV)/.installed debian-tools $(OHIF_STAMP)

# The streaming job's own interpreter: apache-flink pins pyarrow<17 (through apache-beam),
# which pyspark 4.3 refuses, so Flink never shares .venv (streaming/flink-requirements.txt)
$(FLINK_VENV)/.installed: streaming/flink-requirements.txt pyproject.toml
	test -x $(FLINK_VENV)/bin/python || $(PYTHON) -m venv $(FLINK_VENV) || python3 -m venv $(FLINK_VENV)
	$(FLINK_VENV)/bin/pip install --quiet --upgrade pip setuptools wheel
	$(FLINK_VENV)/bin/pip install --quiet -r streaming/flink-requirements.txt
	$(FLINK_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

# JupyterLab front end: built with npm; an editable install skips data files, so link it here
$(VENV)/.labextension: $(VENV)/.installed package.json package-lock.json tsconfig.json \
		$(wildcard extension/src/*.ts extension/style/* extension/schema/*)
	test node_modules/.package-lock.json -nt package-lock.json || npm install --no-audit --no-fund  # npm ci rejects rspack's optional platform bindings
	npm run build:prod
	mkdir -p $(VENV)/share/jupyter/labextensions/@dicomlake $(VENV)/etc/jupyter/jupyter_server_config.d
	ln -sfn $(CURDIR)/extension/labextension $(VENV)/share/jupyter/labextensions/@dicomlake/jupyterlab
	cp extension/jupyter-config/jupyter_server_config.d/dicomlake.json \
		$(VENV)/etc/jupyter/jupyter_server_config.d/dicomlake.json
	touch $@

# The OHIF viewer `dicomlake serve` serves at /viewer/ (dicomnet/viewer.py): the pinned
# @ohif/app build from npm, its dist/ unpacked into the package (the wheel carries it)
# without source maps (38 MB) and without ort/ (108 MB of onnxruntime-web for OHIF's AI
# segmentation tools, which we do not offer)
$(OHIF_STAMP):
	rm -rf $(OHIF_DIR) build/ohif && mkdir -p $(OHIF_DIR) build/ohif
	cd build/ohif && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	tar -xzf build/ohif/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF_DIR) --strip-components=2 \
		--exclude='*.map' --exclude='package/dist/ort' package/dist
	rm -rf build/ohif
	touch $@

# Debian's Chromium for the browser tests (test tools' own browser downloads fail here) and
# dcmtk, the DIMSE clients (storescu, findscu, echoscu) the DICOM service is tested with
debian-tools:
	@test -x /usr/bin/chromium -a -x /usr/bin/storescu || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium dcmtk; }

# Orthanc with its DICOMweb plugin: the peer `bench dicomweb` (and its test) compare against,
# run as a private instance on a loopback port. Only the test target installs it, and where
# systemd runs, the service the package enables (ports 8042/4242 on every interface) is
# stopped and disabled again: a user's `make demo` never gets a second DICOM server.
bench-tools:
	@test -x /usr/sbin/Orthanc -a -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq orthanc orthanc-dicomweb && \
		{ ! [ -d /run/systemd/system ] || $$SUDO systemctl disable --now orthanc; }; }

demo: install
	$(BIN)/dicomlake demo

lint: install typecheck
	$(BIN)/ruff check .
	npm run lint

# mypy cannot follow the editable install's finder (dicomlake.catalog -> catalog/ and so on,
# pyproject's package-dir), so it checks a tree of symlinks laid out as the installed package
typecheck: install
	rm -rf build/typecheck && mkdir -p build/typecheck/dicomlake
	ln -s $(CURDIR)/dicomlake/* build/typecheck/dicomlake/
	for p in catalog udfs sql streaming extension bench dicomnet; do \
		ln -s $(CURDIR)/$$p build/typecheck/dicomlake/$$p; done
	$(BIN)/mypy build/typecheck/dicomlake

test: lint bench-tools
	$(BIN)/pytest -m "slow or not slow" --durations=25  # everything; plain `pytest`: fast tests only
	$(MAKE) test-second

# The fast suite on the second interpreter, with the extras a 3.13 user installs: not
# `export` (torch lies on our machines for 3.11 only), not `tensorflow` (1.9 GB of disk a CI
# machine may not have; the main suite tests it), and the Flink venv stays on 3.11
$(SECOND_VENV)/.installed: pyproject.toml
	test -n "$(SECOND_PYTHON)" || { echo "no python3.13 found: set SECOND_PYTHON=/path/to/python"; exit 1; }
	test -x $(SECOND_VENV)/bin/python || $(SECOND_PYTHON) -m venv $(SECOND_VENV)
	$(SECOND_VENV)/bin/pip install --quiet --upgrade pip
	DICOMLAKE_SKIP_LABEXTENSION=1 $(SECOND_VENV)/bin/pip install --quiet \
		-e ".[similarity,jupyter,streaming,test]"
	touch $@

test-second: $(SECOND_VENV)/.installed
	$(SECOND_VENV)/bin/python --version
	DICOMLAKE_TESTS_WITHOUT=tensorflow $(SECOND_VENV)/bin/pytest
