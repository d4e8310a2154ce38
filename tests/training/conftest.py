import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "images" / "training"))

from jobworld import training_image

__all__ = ["training_image"]
