"""Code that a served model's test process runs first: distill (installed editable in this
venv, its finder dropped), this repository's packages, torch and transformers become
unimportable, as where the registered model is served without them. Run it with `python -I`
(no PYTHONPATH, no cwd on sys.path); `NOTHING_BLOCKED_LOADED` at the end checks none was."""

BLOCK_IMPORTS = """
import sys

BLOCKED = {"torch", "transformers", "distill", "tasks", "flows", "tests"}


class Unimportable:  # as if not installed: import X -> ModuleNotFoundError
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path[:] = [Unimportable] + [
    f for f in sys.meta_path if "editable" not in type(f).__module__
]
for module in sorted(BLOCKED):
    try:
        __import__(module)
        sys.exit(module + " is importable here")
    except ImportError:
        pass
"""

NOTHING_BLOCKED_LOADED = """
assert not BLOCKED & set(sys.modules), BLOCKED & set(sys.modules)
"""
