"""lmforge: raw text to a trained transformer language model, and the model to text.

    import lmforge
    lmforge.prepare(["pydocs"], "data/pydocs")
    lmforge.train("data/pydocs", "runs/pydocs", preset="tiny")
    print(lmforge.LM.load("runs/pydocs").generate("The "))
    lmforge.finetune("runs/pydocs", "tasks.jsonl", "runs/tuned")
    lmforge.evaluate("runs/tuned", task="tasks.jsonl")

Each name mirrors a CLI subcommand. They are imported on first use, so `import lmforge` stays cheap.
"""

from importlib import import_module

from lmforge.errors import LMForgeError

__version__ = "0.1.0"

_LAZY = {
    "LM": "lmforge.api",
    "prepare": "lmforge.api",
    "train": "lmforge.api",
    "finetune": "lmforge.train.trainer",
    "evaluate": "lmforge.eval.report",
    "export_hf": "lmforge.interop.hf",
    "import_hf": "lmforge.interop.hf",
}
__all__ = ["LMForgeError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
