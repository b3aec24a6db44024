"""nbval settings for the chapters: stderr is not compared (warnings differ between machines); images are not
compared either (nbval skips image/png unless --nbdime). Addresses and kernel paths: sanitize.cfg."""

import os

# Under pytest-xdist (make test runs 2 workers) each worker's kernels get one torch thread, as the unit tests
# do (tests/conftest.py): two workers with a thread each fill 2 cores; two with a thread per core would fight.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    for item in items:
        parent = item.parent
        if hasattr(parent, "skip_compare") and "stderr" not in parent.skip_compare:
            parent.skip_compare = tuple(parent.skip_compare) + ("stderr",)
