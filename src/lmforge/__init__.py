"""lmforge: raw text to a trained transformer language model, and the model to text.

import lmforge
lmforge.prepare(["pydocs"], "data/pydocs")
lmforge.train("data/pydocs", "runs/pydocs", preset="tiny")
print(lmforge.LM.load("runs/pydocs").generate("The ")[0])
"""

from lmforge.api import LM, prepare, train
from lmforge.errors import LMForgeError

__version__ = "0.1.0"
__all__ = ["LM", "LMForgeError", "prepare", "train"]
