"""The distillation recipe a teacher's family gets: `finetune.epochs`, `finetune.lr` and
`compress.prune.recovery_epochs` left out (null) are filled in from the teacher once it is
loaded, before any stage.

    family                                   epochs  lr    recovery  measured by
    Hugging Face transformer (BERT, ViT...)  10      1e-3  6         benchmarks/transformers.py
    anything else (MLP, CNN, ResNet, a       80      3e-3  3         benchmarks/quality.py
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

A transformer's pruning round recovers for 6 epochs (at half the KD's lr), twice the MLP/CNN
recipe's 3: its KD is 10 epochs where theirs is 80, and a widened student's round cuts about
half of it. On the BERT's 162 KB target at seeds 0-2 and its 82,317-param target at seed 0,
6 kept one widened round 3 rolled back (seed 2: met at 141.8 KB, +0.60 test points, where 3
said "not met" at 217.8 KB) and left every kept pruned student 0.50-0.75 points better, none
worse, for 8-60 s more (docs/benchmarks.md, "Distilled wide, pruned to the size").

    teacher = ...                                   # any nn.Module
    cfg = with_recipe(cfg, recipe_for(teacher))     # finetune.epochs, .lr, prune's recovery: set
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from distill.tasks.compress import transformer
from distill.tasks.platform.config import FinetuneConfig, PipelineConfig, PruneConfig


@dataclass(frozen=True)
class Recipe:
    family: str
    epochs: int
    lr: float
    # a size or parameter target's first student: distilled at this many times the parameters
    # the plan sized, then pruned to the limit (`target.widen` left out takes it; plan.py)
    widen: float = 1.0
    recovery_epochs: int = 3  # KD after each pruning round (`compress.prune.recovery_epochs`)


MLP_CNN = Recipe("MLP/CNN", 80, 3e-3)
TRANSFORMER = Recipe("Hugging Face transformer", 10, 1e-3, widen=2.0, recovery_epochs=6)


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


def resolved_prune(prune: PruneConfig, recipe: Recipe) -> PruneConfig:
    """`prune` with its left-out `recovery_epochs` taken from `recipe` (a set one kept)."""
    if prune.recovery_epochs is not None:
        return prune
    return prune.model_copy(update={"recovery_epochs": recipe.recovery_epochs})


def with_recipe(cfg: PipelineConfig, recipe: Recipe) -> PipelineConfig:
    """`cfg` with `resolved(cfg.finetune, recipe)` and `resolved_prune(cfg.compress.prune,
    recipe)`; `cfg` itself where nothing was left out."""
    finetune = resolved(cfg.finetune, recipe)
    prune = resolved_prune(cfg.compress.prune, recipe)
    if finetune is cfg.finetune and prune is cfg.compress.prune:
        return cfg
    compress = cfg.compress.model_copy(update={"prune": prune})
    return cfg.model_copy(update={"finetune": finetune, "compress": compress})


def _epochs(n: int, what: str = "epoch") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def line(cfg: PipelineConfig, recipe: Recipe) -> str | None:
    """One line saying what a left-out key took from a teacher family's recipe when that is not
    the MLP/CNN one (the documented default needs no line); None else. A key the user set is
    named as set, so the line never credits the recipe with it."""
    ft, prune = cfg.finetune, cfg.compress.prune
    given = {
        "finetune.epochs": ft.epochs,
        "finetune.lr": ft.lr,
        "compress.prune.recovery_epochs": prune.recovery_epochs,
    }
    if recipe == MLP_CNN or all(v is not None for v in given.values()):
        return None
    done, recovery = resolved(ft, recipe), resolved_prune(prune, recipe).recovery_epochs
    assert done.epochs is not None and recovery is not None  # resolved
    parts = {
        "finetune.epochs": _epochs(done.epochs),
        "finetune.lr": f"lr {done.lr:g}",
        "compress.prune.recovery_epochs": f"{_epochs(recovery, 'recovery epoch')} a pruning round",
    }
    taken = [key for key in parts if given[key] is None]
    kept = [key for key in parts if key not in taken]
    ft_taken = [parts[key] for key in taken if key.startswith("finetune.")]
    said = [" at ".join(ft_taken)] if ft_taken else []
    said += [parts[key] for key in taken if not key.startswith("finetune.")]
    text = f"finetune: {', '.join(said)} from the {recipe.family} recipe"
    if kept:
        text += f", {' and '.join(parts[key] for key in kept)} as set"
    return f"{text} (set {' / '.join(taken)} to choose)"
