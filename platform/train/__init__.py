"""Training: the shared per-worker loop, the TorchTrainer job, checkpoints, evaluation."""

from ovdlab.platform.train.checkpoint import ModelCheckpoint, load_model_checkpoint, save_checkpoint
from ovdlab.platform.train.evaluate import EvalOutput, evaluate_checkpoint, evaluate_model
from ovdlab.platform.train.loop import LocalSession, LoopArgs, LoopSummary, run_in_process, run_loop, train_loop_per_worker
from ovdlab.platform.train.schedule import build_optimizer, build_scheduler, lr_multiplier
from ovdlab.platform.train.trainer import TrainResult, build_trainer, prepare_training, train, train_in_process

__all__ = [
    "EvalOutput",
    "LocalSession",
    "LoopArgs",
    "LoopSummary",
    "ModelCheckpoint",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "evaluate_checkpoint",
    "evaluate_model",
    "load_model_checkpoint",
    "lr_multiplier",
    "prepare_training",
    "run_in_process",
    "run_loop",
    "save_checkpoint",
    "train",
    "train_in_process",
    "train_loop_per_worker",
]
