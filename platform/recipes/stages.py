"""What a recipe is made of: ordered stages, as data.

A method's whole job is more than one training: ViLD trains a detector on base boxes for
its RPN proposals before it distills, LP-OVOD retrieves pseudo-labels and trains a probe
after its base training, CLIFF chains three phases. A method module declares that as a
list of :class:`Stage` (``Method.recipe(cfg)``); one runner
(:func:`ovdlab.platform.recipes.runner.run_recipe`) executes every recipe.

A stage names the experiment config it runs (the job's own by default) and its
overrides; ``reads`` binds config keys to the outputs of earlier stages (a training's
final checkpoint, a post stage's file), e.g. ``{"proposals.checkpoint":
"proposal-detector"}`` or ``{"train.init_from": "base"}``. Kinds:

- ``train``: one training phase through Ray Train (:func:`~ovdlab.platform.train.trainer.train`),
  evaluated at its end; its output is the final checkpoint. Phases start from an
  earlier phase with ``train.init_from`` and freeze parts with ``train.freeze``.
- ``post``: a plain function ``"module:function"`` called as ``function(cfg, out_dir)``
  with the stage's config (its ``reads`` bound) and a fresh folder; it returns the
  file or folder it wrote (LP-OVOD's pseudo-labels), which later stages read.
- ``teacher``: the configured teacher made ready (``shapes-tiny`` pretrained once, a
  hub model loaded; with ``teacher.ln_tuned``, LN-tuned once, EZSD's stage 1, its crop
  accuracy before and after tuning the stage's metrics); output: a JSON file naming it,
  its weights digest and checkpoint. A training makes its teacher anyway; the stage
  tracks and times it on its own.
- ``extract``: the training split's region store filled by the Ray Data pipeline
  (:func:`~ovdlab.platform.pipelines.extract.run_extraction`); output: the store folder.
- ``eval``: the checkpoint of the latest ``train`` stage before it, evaluated under
  the stage's own config (``eval.*`` overrides, e.g. ``eval.seed`` for a sampling
  method); its metrics become the job's when it is the last stage with metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

StageKind = Literal["teacher", "extract", "train", "post", "eval"]
STAGE_KINDS: tuple[str, ...] = ("teacher", "extract", "train", "post", "eval")


@dataclass(frozen=True)
class Stage:
    """One step of a recipe (see the module doc)."""

    name: str
    kind: StageKind
    experiment: str | None = None
    overrides: tuple[str, ...] = ()
    reads: Mapping[str, str] = field(default_factory=dict)
    function: str | None = None
    ignores: tuple[str, ...] = ()
    """Dotted config keys the stage does not read (LP-OVOD's base training ignores the
    retrieval's ``method.retrieval_k``): left out of its content key, so a sweep over
    them shares the stage."""

    def describe(self) -> dict[str, object]:
        """The stage as plain data (part of its content key and of the MLflow params)."""
        return {
            "kind": self.kind,
            "experiment": self.experiment,
            "overrides": list(self.overrides),
            "reads": dict(sorted(self.reads.items())),
            "function": self.function,
            **({"ignores": list(self.ignores)} if self.ignores else {}),
        }


def check_recipe(stages: Sequence[Stage]) -> None:
    """Fail before any work on a recipe that cannot run: names, kinds, reads, functions."""
    if not stages:
        raise ValueError("a recipe needs at least one stage")
    seen: list[str] = []
    for stage in stages:
        if stage.kind not in STAGE_KINDS:
            raise ValueError(f"stage {stage.name!r}: unknown kind {stage.kind!r}; kinds: {', '.join(STAGE_KINDS)}")
        if stage.name in seen:
            raise ValueError(f"stage name {stage.name!r} appears twice in the recipe")
        for key, source in stage.reads.items():
            if source not in seen:
                raise ValueError(
                    f"stage {stage.name!r} reads {key} from {source!r}, which is not an earlier stage "
                    f"(earlier: {', '.join(seen) or 'none'})"
                )
        if stage.kind == "post" and not (stage.function and ":" in stage.function):
            raise ValueError(f"post stage {stage.name!r} needs function='module:function', got {stage.function!r}")
        if stage.kind != "post" and stage.function is not None:
            raise ValueError(f"stage {stage.name!r}: only post stages call a function")
        if stage.kind == "eval" and not any(s.kind == "train" for s in stages[: len(seen)]):
            raise ValueError(f"eval stage {stage.name!r} needs an earlier train stage, whose checkpoint it evaluates")
        seen.append(stage.name)
    if not any(stage.kind == "train" for stage in stages):
        raise ValueError("a recipe needs a train stage: its last one gives the job's metrics")
