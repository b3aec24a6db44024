"""nbval settings for the chapters: stderr is not compared (warnings differ between machines); images are not
compared either (nbval skips image/png unless --nbdime). Addresses and kernel paths: sanitize.cfg."""


def pytest_collection_modifyitems(items):
    for item in items:
        parent = item.parent
        if hasattr(parent, "skip_compare") and "stderr" not in parent.skip_compare:
            parent.skip_compare = tuple(parent.skip_compare) + ("stderr",)
