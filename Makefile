# anim_lab: every target creates/updates .venv itself, so a fresh clone needs nothing else.
#   make demo      the toy animator on a held-out toy identity, offline (writes out/demo/)
#   make test      style (ruff), unit tests, chapter pairing and strict nbval over chapters/*.ipynb
#   make lab       JupyterLab on chapters/ (adds the [lab] extra once), as root or not:
#                  make lab LAB_OPTS="--port 8890 --no-browser"
#   make notebook  re-execute one chapter into its .ipynb:  make notebook CH=ch00_map
#   make figures   re-execute every chapter, writing figures/ (ANIM_LAB_SAVE_FIGURES=1), and the demo's strip
#   make labs      the course labs: every chapter's student version into labs/ (nbgrader; chapters/LABS.md);
#                  make labs CORE=1 keeps only the cells tagged `core` (a 45-minute lab); LABS=ch07 picks chapters
#   make grade     autograde one submission with nbgrader: make grade LAB=ch07 SUBMISSION=path/to/ch07.ipynb
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# mediapipe 0.10.21 is the last release with the face-mesh models and mp.solutions. Its own pins would force
# numpy<2 and pull jax/jaxlib, which face mesh never imports, so it goes in with --no-deps; the [faces] extra
# carries what face mesh really imports.
MEDIAPIPE := mediapipe==0.10.21
STAMP     := $(VENV)/.installed
LAB_STAMP := $(VENV)/.installed-lab
CHAPTERS  := $(sort $(wildcard chapters/ch[0-9][0-9]_*.py))
# Options passed to `jupyter lab` (port, --no-browser, --ip=0.0.0.0 in a container, ...).
LAB_OPTS ?=
# make test runs in pytest-xdist workers, one torch thread each (tests/conftest.py, chapters/conftest.py), a whole
# file per worker (--dist loadfile: a notebook's cells run in order in one kernel). On the 2-core machine (beside
# another single-thread job) 2 workers took 382 s where one process took 687 s; more cores: TEST_WORKERS=4.
TEST_WORKERS ?= 2
# Jupyter refuses to start as root (how it runs in Docker) unless told --allow-root; only then is it added.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: demo test lint unit chapters notebook figures lab labs grade clean-venv
test: $(STAMP) lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not gpu" tests chapters --nbval --nbval-current-env --nbval-sanitize-with chapters/sanitize.cfg -p no:cacheprovider --durations=25

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

# Re-execute one chapter and write its .ipynb (and its figures) from the .py (CPU only). This REPLACES the
# .ipynb: an edit made in Lab and not yet in the .py is lost; bring it over first with
# `.venv/bin/jupytext --sync chapters/$(CH).ipynb` (the newer file of the pair wins).
# (no --update: with it, jupytext keeps the OLD outputs when it writes the executed notebook)
notebook: $(STAMP)
	@test -n "$(CH)" || { echo "usage: make notebook CH=ch00_map"; exit 2; }
	cd chapters && ANIM_LAB_SAVE_FIGURES=1 ../$(VENV)/bin/jupytext --to ipynb --set-kernel python3 --execute $(CH).py

# Re-execute every chapter, in order, writing its .ipynb and its figures/chNN_*.png (the only target, with
# `notebook`, that writes figures; tests and Lab only display them).
figures: $(STAMP)
	cd chapters && for py in $(notdir $(CHAPTERS)); do \
		ANIM_LAB_SAVE_FIGURES=1 ../$(VENV)/bin/jupytext --to ipynb --set-kernel python3 --execute $$py || exit 1; \
	done
	$(VENV)/bin/anim-lab demo --out-dir out/demo && cp out/demo/strip.png figures/demo_strip.png

# Student versions (nbgrader's generate_assignment) into labs/, which git ignores. A copy the student edited is
# never overwritten: the new version goes beside it as chNN_topic.new.ipynb.
LABS_OUT ?= labs
labs: $(STAMP)
	$(PY) scripts/labs.py release --out $(LABS_OUT) $(if $(CORE),--core,) $(LABS)

# Autograde one submission (nbgrader's autograde in a temporary course with its own SQLite gradebook).
grade: $(STAMP)
	@test -n "$(LAB)" -a -n "$(SUBMISSION)" || { echo "usage: make grade LAB=ch07 SUBMISSION=path/to/ch07.ipynb"; exit 2; }
	$(PY) scripts/labs.py grade $(LAB) "$(SUBMISSION)"

lab: $(LAB_STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=chapters $(ALLOW_ROOT) $(LAB_OPTS)

$(LAB_STAMP): $(STAMP)
	$(PIP) install -q -c constraints.txt -e ".[faces,test,labs,lab]"
	touch $(LAB_STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[faces,test,labs]"
	$(PIP) install -q --no-deps $(MEDIAPIPE)
	$(PY) -c "import mediapipe as mp; mp.solutions.face_mesh"
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
