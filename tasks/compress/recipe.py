"""The distillation recipe a teacher's family gets: `finetune.epochs` and `finetune.lr` left out
(null) are filled in from the teacher once it is loaded, before any stage.

    family                                   epochs  lr    measured by
    Hugging Face transformer (BERT, ViT...)  10      1e-3  benchmarks/transformers.py
    anything else (MLP, CNN, ResNet, a       80      3e-3  benchmarks/quality.py
      plain-torch transformer)

On the benchmark's BERT at 2x fewer parameters the MLP/CNN recipe left the student at 94.65 % (3
seeds; 90.80 on one), the transformer recipe at 98.10 % in a third of the time; on its ViT the
two tie (the MLP/CNN recipe 94.63 and 94.72 % at 2x and 4x, this one 94.44 and 94.44) in half
the time. On a plain-torch `nn.TransformerEncoder` classifier (benchmarks/architectures.py's,
digits as tokens) it is the other way round: 10 epochs at 1e-3 lost 1.6 points to the MLP/CNN
recipe (3 seeds, 2x and 4x; docs/benchmarks.md, "The KD recipe on transformers"), so attention
alone does not choose it. A key the user sets is kept; what was filled in is what the stages run
with and what the run records.

A Hugging Face transformer's size or parameter target is distilled wide and pruned (`widen`: the
first student at 2x the parameters the plan sized, then cut to the limit in guarded rounds; a
round the guard rolls back is rebuilt at the planned size). On the targets grid's BERT at 162 KB,
3 seeds, the served test drop was -0.40 / +0.75 / -0.05 points that way against +0.75 / +1.55 /
+0.35 distilled at the planned size (docs/benchmarks.md, "Distilled wide, pruned to the size"),
for about twice the wall time; where halving in one round breaks the guard (the grid's 30x and
82,317-param targets), the loop rebuilds at the planned size: the same student, a wider KD later.
The MLP/CNN recipe keeps 1: on the grid's ResNet1d at 2,781 params its widened builds' pruning
rounds broke the guard at 3 seeds of 3 (docs/benchmarks.md, the same section).

    teacher = ...                                   # any nn.Module
    cfg = with_recipe(cfg, recipe_for(teacher))     # cfg.finetune.epochs, .lr: set
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from distill.tasks.compress import transformer
from distill.tasks.platform.config import FinetuneConfig, PipelineConfig


@dataclass(frozen=True)
class Recipe:
    family: str
    epochs: int
    lr: float
    # a size or parameter target's first student: distilled at this many times the parameters
    # the plan sized, then pruned to the limit (`target.widen` left out takes it; plan.py)
    widen: float = 1.0


MLP_CNN = Recipe("MLP/CNN", 80, 3e-3)
TRANSFORMER = Recipe("Hugging Face transformer", 10, 1e-3, widen=2.0)


def recipe_for(teacher: nn.Module) -> Recipe:
    """The transformer recipe for a Hugging Face model with attention blocks (BERT, ViT, GPT-2:
    what `hf:DIR` loads), the MLP/CNN recipe for anything else, a plain-torch transformer
    included (measured: see the module's docstring)."""
    if transformer.hf_owner(teacher) is None:
        return MLP_CNN
    return TRANSFORMER if transformer.find(teacher).blocks else MLP_CNN


def resolved(finetune: FinetuneConfig, recipe: Recipe) -> FinetuneConfig:
    """`finetune` with its left-out `epochs` and `lr` taken from `recipe` (set ones kept)."""
    filled = {
        key: value
        for key, value in (("epochs", recipe.epochs), ("lr", recipe.lr))
        if getattr(finetune, key) is None
    }
    return finetune.model_copy(update=filled) if filled else finetune


def with_recipe(cfg: PipelineConfig, recipe: Recipe) -> PipelineConfig:
    """`cfg` with `resolved(cfg.finetune, recipe)`; `cfg` itself where nothing was left out."""
    finetune = resolved(cfg.finetune, recipe)
    return cfg if finetune is cfg.finetune else cfg.model_copy(update={"finetune": finetune})


def line(cfg: PipelineConfig, recipe: Recipe) -> str | None:
    """One line saying what a left-out key took from a teacher family's recipe when that is not
    the MLP/CNN one (the documented default needs no line); None else. A key the user set is
    named as set, so the line never credits the recipe with it."""
    ft = cfg.finetune
    if recipe == MLP_CNN or (ft.epochs is not None and ft.lr is not None):
        return None
    done = resolved(ft, recipe)
    parts = {
        "epochs": f"{done.epochs} epoch{'' if done.epochs == 1 else 's'}",
        "lr": f"lr {done.lr:g}",
    }
    taken = [key for key in parts if getattr(ft, key) is None]
    kept = [key for key in parts if key not in taken]
    said = f"finetune: {' at '.join(parts[key] for key in taken)} from the {recipe.family} recipe"
    if kept:
        said += f", {parts[kept[0]]} as set"
    keys = " / ".join(f"finetune.{key}" for key in taken)
    return f"{said} (set {keys} to choose)"
