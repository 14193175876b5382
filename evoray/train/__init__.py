"""Fine-tuning (LoRA on Ray Train), evaluation on a multiple-choice test set, and export."""

from evoray.train.api import TrainResult, train
from evoray.train.evaluate import evaluate, evaluate_model
from evoray.train.export import export

__all__ = ["TrainResult", "train", "evaluate", "evaluate_model", "export"]
