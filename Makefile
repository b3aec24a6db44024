# anim_lab: every target creates/updates .venv itself, so a fresh clone needs nothing else.
#   make demo   the toy animator on a held-out toy identity, offline: out/demo/{demo.mp4,demo.gif,strip.png}
#   make test   unit tests + chapter pairing + strict nbval over chapters/*.ipynb
#   make lab    JupyterLab on chapters/ (installs the [lab] extra)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# mediapipe 0.10.21 is the last release with the face-mesh models and mp.solutions. Its own pins would force
# numpy<2 and pull jax/jaxlib, which face mesh never imports, so it goes in with --no-deps; the [faces] extra
# carries what face mesh really imports.
MEDIAPIPE := mediapipe==0.10.21
STAMP  := $(VENV)/.installed

.PHONY: demo test lint unit chapters notebook lab clean-venv
test: $(STAMP) lint
	$(PY) -m pytest -m "not slow and not gpu" tests chapters --nbval --nbval-current-env --nbval-sanitize-with chapters/sanitize.cfg -p no:cacheprovider

# the main job on the embedded toy animator (anim_lab/assets/toy_animator): nothing is downloaded
demo: $(STAMP)
	$(VENV)/bin/anim-lab demo --out-dir out/demo

# style fails fast: ruff's lint rules and its formatter (config in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" tests -p no:cacheprovider

chapters: $(STAMP)
	$(PY) -m pytest chapters --nbval --nbval-current-env --nbval-sanitize-with chapters/sanitize.cfg -p no:cacheprovider

# Re-execute one chapter and write its .ipynb from the .py (CPU only):  make notebook CH=ch00_map
# (no --update: with it, jupytext keeps the OLD outputs when it writes the executed notebook)
notebook: $(STAMP)
	cd chapters && ANIM_LAB_SAVE_FIGURES=1 ../$(VENV)/bin/jupytext --to ipynb --set-kernel python3 --execute $(CH).py

lab: $(STAMP)
	$(PIP) install -q -c constraints.txt -e ".[lab]"
	$(VENV)/bin/jupyter lab --notebook-dir=chapters

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[faces,test]"
	$(PIP) install -q --no-deps $(MEDIAPIPE)
	$(PY) -c "import mediapipe as mp; mp.solutions.face_mesh"
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
