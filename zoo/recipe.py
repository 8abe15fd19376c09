"""Training recipes: the schema, the loader, overrides.

Recipes are data: one YAML file per (dataset, architecture) row of the reports in
``zoo/recipes/``, each citing its report. Protocols apply to any dataset × architecture
(``dataset: any``): ``medmnist-v2.yaml`` is the MedMNIST v2 benchmark protocol, used for any
dataset × architecture that has no recipe of its own; ``medzoo-28.yaml`` / ``medzoo-224.yaml`` are
medzoo's own (``zoo train DATASET ARCH --recipe medzoo-28``). A protocol may hold settings per
architecture (``model_by_arch``) and per dataset family (``families``: augmentation and test-time
augmentation suited to each imaging modality); :meth:`Recipe.for_dataset` resolves them.
"""

from __future__ import annotations

import copy
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zoo.errors import RecipeError, UserError, describe_validation_error, did_you_mean

ANY = "any"
ENSEMBLE = "ensemble"  # the registry's seed-ensemble architecture (built by `--seeds N`, never from a recipe)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerCfg(_Strict):
    name: Literal["adamw", "adam", "adagrad", "sgd", "nadam", "rmsprop"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0)


class SchedulerCfg(_Strict):
    """``cosine`` steps per batch: linear warm-up over ``warmup_epochs``, then cosine to ``min_lr``."""

    name: Literal["none", "step", "plateau", "multistep", "onecycle", "cosine"] = "none"
    step_size: int = Field(10, ge=1)  # step: epochs between decays
    gamma: float = Field(0.5, gt=0)  # step / multistep / plateau factor
    milestones: list[float] = [0.5, 0.75]  # multistep: fractions of the epochs
    patience: int = Field(5, ge=0)  # plateau
    max_lr: float | None = None  # onecycle; defaults to the optimiser's lr
    warmup_epochs: float = Field(0.0, ge=0)  # cosine: linear warm-up from lr * warmup_start_factor
    warmup_start_factor: float = Field(0.01, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)  # cosine: the learning rate it ends at

    @model_validator(mode="after")
    def _check(self) -> SchedulerCfg:
        if self.warmup_epochs > 0 and self.name != "cosine":
            raise ValueError(f"warmup_epochs is implemented for the cosine scheduler, not {self.name!r}")
        return self


class EarlyStoppingCfg(_Strict):
    patience: int | None = Field(None, ge=1)  # None: run every epoch, still keep the best
    # "last": no choice among epochs, the last one is kept (the usual rule for an EMA / cosine recipe)
    metric: Literal["acc", "auc", "macro_f1", "loss", "last"] = "acc"


class AugmentCfg(_Strict):
    """Batched augmentations; each ``*_p`` is the probability per image (report 001 uses 0.1).

    Order: flips, 90° rotations, rotation, affine (translation and scale), colour jitter.
    """

    hflip_p: float = Field(0.0, ge=0, le=1)
    vflip_p: float = Field(0.0, ge=0, le=1)
    rot90_p: float = Field(0.0, ge=0, le=1)  # a quarter turn, k ∈ {1, 2, 3} at random (lossless)
    rotation_deg: float = Field(0.0, ge=0, le=180)
    rotation_p: float = Field(0.0, ge=0, le=1)
    affine_p: float = Field(0.0, ge=0, le=1)
    translate: float = Field(0.0, ge=0, le=0.5)  # shift up to this fraction of the side, per axis
    scale: float = Field(0.0, ge=0, lt=1)  # zoom by a factor in [1 - scale, 1 + scale]
    fill: Literal["zeros", "border", "reflection"] = "zeros"  # what rotation / affine bring in
    jitter_p: float = Field(0.0, ge=0, le=1)
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0)
    saturation: float = Field(0.2, ge=0)
    # MedMNIST-C's training augmentation (medmnistc's AugMedMNISTC, Di Salvo et al. 2024), before the
    # rest: every image gets one of the dataset's acquisition corruptions (or the identity) at a random
    # intensity within its five severities (zoo.trust.robustness; the generic set for other datasets)
    medmnistc: bool = False

    @property
    def enabled(self) -> bool:
        return self.medmnistc or any(
            p > 0 for p in (self.hflip_p, self.vflip_p, self.rot90_p, self.rotation_p, self.affine_p, self.jitter_p)
        )


TTA_VIEWS = ("hflip", "vflip")


class FamilyCfg(_Strict):
    """Settings for one family of datasets (an imaging modality) in a protocol recipe."""

    datasets: list[str]  # MedMNIST flags or aliases
    note: str = ""  # why these settings suit the modality
    augment: AugmentCfg = AugmentCfg()
    tta: list[Literal["hflip", "vflip"]] | None = None  # None: the recipe's own
    balance: bool | None = None  # class-balanced sampling (train.balance); None: the recipe's own

    @model_validator(mode="after")
    def _check(self) -> FamilyCfg:
        from zoo.names import resolve_name

        for d in self.datasets:
            resolve_name(d)  # an unknown name raises, naming the known ones
        return self


class AveragingCfg(_Strict):
    """Weight averaging (``torch.optim.swa_utils.AveragedModel``); the averaged weights are what is
    validated, selected and saved.

    ``ema``: exponential moving average of weights and buffers (BatchNorm statistics included),
    updated after every optimiser step; its decay is ``decay`` or, by default, the one whose
    half-life is ``half_life_epochs`` epochs of steps (so it suits any dataset size).
    ``swa``: equal average of the weights at the end of each epoch from ``swa_start`` (a fraction of
    the epochs) on, optionally at a constant ``swa_lr`` (``SWALR``); BatchNorm statistics are
    recomputed on the training images (``update_bn``) before each validation.
    """

    method: Literal["none", "ema", "swa"] = "none"
    decay: float | None = Field(None, gt=0, lt=1)
    half_life_epochs: float = Field(1.0, gt=0)
    swa_start: float = Field(0.75, ge=0, lt=1)
    swa_lr: float | None = Field(None, gt=0)

    def ema_decay(self, steps_per_epoch: int) -> float:
        if self.decay is not None:
            return self.decay
        return 0.5 ** (1.0 / (self.half_life_epochs * max(1, steps_per_epoch)))


class LossCfg(_Strict):
    name: Literal["cross_entropy", "bce", "hinge"] = "cross_entropy"
    l1: float = Field(0.0, ge=0)  # penalty on weights, added to the loss (report 002)
    l2: float = Field(0.0, ge=0)  # explicit L2 penalty (separate from optimiser weight decay)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class DataCfg(_Strict):
    size: Literal[28, 64, 128, 224] = 28  # MedMNIST file resolution / folder decode size
    input_size: int | None = Field(None, ge=16, le=512)  # network input; default = size
    channels: Literal[1, 3] | None = None  # default: the dataset's own
    normalize: Literal["dataset", "imagenet", "none"] = "dataset"
    val_fraction: float | None = Field(None, gt=0, lt=1)  # carve val from train (reports' splits)
    split_seed: int = 22


class TrainCfg(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(128, ge=1)  # 128 beats 512 on a CPU (cache) and costs a GPU little
    max_batches: int | None = Field(None, ge=1)  # at most this many batches per epoch (smoke runs: --quick)
    seed: int = 0
    # > 1: one run per seed (seed, seed + 1, …) and one ensemble bundle averaging their logits
    seeds: int = Field(1, ge=1, le=32)
    balance: bool = False  # WeightedRandomSampler-style: weight 1/count (report 001)
    grad_clip: float | None = Field(None, gt=0)
    # "auto": bf16 autocast on a GPU with bf16, fp32 on the CPU; "bf16": autocast wherever the device
    # computes bf16 natively (GPU, or a CPU with AMX / AVX512-BF16; opt-in on the CPU because
    # oneDNN's bf16 kernels have crashed there: SIGFPE on a 393216-wide Linear, torch 2.14.1);
    # "fp32": never.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    early_stopping: EarlyStoppingCfg = EarlyStoppingCfg()
    # experiment tracking (zoo.train.tracking): None takes $MEDZOO_TRACK (zoo.settings), else none. Not
    # part of what a run is: the run directory's hash and a study's identity leave it out
    track: Literal["none", "mlflow", "tensorboard"] | None = None


class ReportedCfg(_Strict):
    metric: str = ""  # e.g. "test_acc", "val_acc", "test_auc"
    value: float | None = None  # as a fraction (0.7447), None when the report gives curves only
    note: str = ""


# A categorical choice: what Optuna holds, or a list of ints (layer widths), which zoo.tune hands to
# Optuna as its JSON text.
Choice = bool | int | float | str | None | list[int]


class TuneParam(_Strict):
    """One dimension of a search space: a float or int range (``log`` for a log scale, ``step`` for
    a grid of it) or categorical ``choices``."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = Field(None, gt=0)
    log: bool = False
    choices: list[Choice] | None = None

    @model_validator(mode="after")
    def _check(self) -> TuneParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs choices")
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("a categorical parameter takes choices only (no low, high, step, log)")
            return self
        if self.choices is not None:
            raise ValueError(f"an {self.type} parameter takes low and high, not choices")
        if self.low is None or self.high is None or self.low > self.high:
            raise ValueError("low and high are required, low <= high")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log scale needs low > 0 and no step")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high, self.step or 1)):
            raise ValueError("an int parameter needs whole low, high and step")
        return self

    def grid(self) -> list[Choice]:
        """The values a grid search visits: the choices, or low..high by step."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise ValueError("a grid needs choices or a step on every parameter")
        assert self.low is not None and self.high is not None
        n = int(round((self.high - self.low) / self.step)) + 1
        values = [self.low + k * self.step for k in range(n)]
        return [int(v) for v in values] if self.type == "int" else [round(v, 12) for v in values]

    def bounds(self) -> list[Choice]:
        """Values that must make a valid recipe: the ends of a range, or every choice."""
        if self.choices is not None:
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


class PrunerCfg(_Strict):
    """Stopping unpromising trials early, on the validation metric of each epoch (Optuna's pruners)."""

    name: Literal["median", "percentile", "threshold", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0)  # median / percentile: finished trials before any pruning
    n_warmup_steps: int = Field(2, ge=0)  # median / percentile / threshold: epochs before a trial can be pruned
    percentile: float = Field(25.0, ge=0, le=100)  # percentile: prune below this percentile of other trials
    lower: float | None = None  # threshold: prune a trial whose metric falls below lower ...
    upper: float | None = None  # ... or rises above upper (NaN always prunes)
    min_resource: int = Field(1, ge=1)  # hyperband: epochs of the smallest bracket
    reduction_factor: int = Field(3, ge=2)  # hyperband

    @model_validator(mode="after")
    def _check(self) -> PrunerCfg:
        if self.name == "threshold" and self.lower is None and self.upper is None:
            raise ValueError("a threshold pruner needs lower or upper")
        return self


class TuneCfg(_Strict):
    """``zoo tune``'s search space: recipe fields (dotted paths such as ``optimizer.lr``) and their
    ranges, the validation metric to optimise, the sampler and the pruner."""

    metric: Literal["acc", "auc", "macro_f1", "loss"] | None = None  # default: train.early_stopping.metric
    direction: Literal["maximize", "minimize"] | None = None  # default: minimize loss, maximize the rest
    sampler: Literal["tpe", "random", "grid"] = "tpe"  # grid: every combination (choices / stepped ranges)
    pruner: PrunerCfg = PrunerCfg()
    params: dict[str, TuneParam] = Field(min_length=1)


class Recipe(_Strict):
    name: str
    dataset: str  # alias or flag; "any" for protocols
    arch: str  # registry name; "any" for protocols
    report: str  # "000".."004" or "medmnist-v2"
    citation: str
    model: dict[str, Any] = {}
    model_by_arch: dict[str, dict[str, Any]] = {}  # protocols: per-architecture model kwargs
    pretrained: bool | str = False
    data: DataCfg = DataCfg()
    train: TrainCfg = TrainCfg()
    optimizer: OptimizerCfg = OptimizerCfg()
    scheduler: SchedulerCfg = SchedulerCfg()
    loss: LossCfg = LossCfg()
    augment: AugmentCfg = AugmentCfg()
    averaging: AveragingCfg = AveragingCfg()
    # Test-time augmentation: the saved model averages its logits over these flips (and their
    # combination); it is part of the bundle and of every export (zoo.preprocess.adapter.FlipTTA).
    tta: list[Literal["hflip", "vflip"]] = []
    families: dict[str, FamilyCfg] = {}  # protocols: augmentation / TTA per imaging modality
    reported: ReportedCfg = ReportedCfg()
    tune: TuneCfg | None = None  # `zoo tune`'s search space

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        from zoo.models import list_models

        if self.arch == ENSEMBLE:
            raise ValueError("the ensemble architecture is not trained from a recipe: `zoo train DATASET ARCH "
                             "--seeds N` trains N seeds of ARCH and bundles them as one ensemble")
        if self.arch != ANY and self.arch not in list_models():
            raise ValueError(f"unknown architecture {self.arch!r}{did_you_mean(self.arch, list_models())}")
        seen: dict[str, str] = {}
        for name, fam in self.families.items():
            for d in fam.datasets:
                if d in seen:
                    raise ValueError(f"dataset {d!r} is in two families: {seen[d]} and {name}")
                seen[d] = name
        if self.tune is not None:
            _check_space(self)
        return self

    @property
    def tune_metric(self) -> str:
        """The validation metric ``zoo tune`` optimises (``acc``, ``auc``, ``macro_f1``, ``loss``)."""
        return (self.tune and self.tune.metric) or self.train.early_stopping.metric

    @property
    def tune_direction(self) -> str:
        return (self.tune and self.tune.direction) or ("minimize" if self.tune_metric == "loss" else "maximize")

    @property
    def input_size(self) -> int:
        return self.data.input_size or self.data.size

    def model_kwargs(self) -> dict[str, Any]:
        return {**self.model_by_arch.get(self.arch, {}), **self.model}

    def family_of(self, dataset: str) -> str | None:
        """The name of the family (of ``families``) listing ``dataset``, if any."""
        from zoo.names import resolve_name

        try:
            flag = resolve_name(dataset)
        except UserError:
            return None
        for name, fam in self.families.items():
            if flag in {resolve_name(d) for d in fam.datasets}:
                return name
        return None

    def for_dataset(self, dataset: str) -> Recipe:
        """The recipe as it trains ``dataset``: its family's augmentation, TTA and class balancing in
        place of the defaults (``families`` itself is kept, so the saved recipe shows both)."""
        name = self.family_of(dataset)
        if name is None:
            return self
        fam = self.families[name]
        tta = self.tta if fam.tta is None else fam.tta
        train = self.train if fam.balance is None else self.train.model_copy(update={"balance": fam.balance})
        # the family's augmentation, with MedMNIST-C's kept when the recipe asks for it (`--set augment.medmnistc=true`)
        augment = fam.augment.model_copy(update={"medmnistc": fam.augment.medmnistc or self.augment.medmnistc})
        return self.model_copy(update={"augment": augment, "tta": list(tta), "train": train})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def run_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without ``train.track``: what a run computes. Run directories and studies
        hash this, so that tracking a run (or not) never makes it another run."""
        return self.model_dump(mode="json", exclude={"train": {"track"}})


def _check_space(recipe: Recipe) -> None:
    """Every tuned path names a recipe field (``model.*`` may add a keyword) and every end of its
    range (every choice) makes a valid recipe; the direction suits the metric."""
    assert recipe.tune is not None
    metric, direction = recipe.tune_metric, recipe.tune_direction
    if (metric == "loss") != (direction == "minimize"):
        raise ValueError(f"tune: {direction} the validation {metric}? (loss is minimised, the rest maximised)")
    raw = recipe.model_dump(mode="python", exclude={"tune"})
    for path, param in recipe.tune.params.items():
        keys = path.split(".")
        node: Any = raw
        for depth, k in enumerate(keys):
            free = keys[0] == "model" and depth == len(keys) - 1  # a model keyword may be new
            if not isinstance(node, dict) or (k not in node and not free):
                raise ValueError(f"tune.params: {path!r} is not a recipe field")
            node = node.get(k)
        for value in param.bounds():
            try:
                Recipe.model_validate(_set_paths(raw, {path: value}))
            except ValidationError as e:
                problem = describe_validation_error(e, Recipe).splitlines()[0]
                raise ValueError(f"tune.params.{path}: {value!r} does not make a valid recipe ({problem})") from None
        if recipe.tune.sampler == "grid":
            param.grid()  # raises when the parameter has no grid


def recipe_dir() -> Path:
    return Path(str(resources.files("zoo") / "recipes"))


def recipe_files() -> list[Path]:
    return sorted(recipe_dir().glob("*.yaml"))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: sections merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else v
    return out


def _raw(path: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe file's mapping, with ``extends: NAME`` (a built-in recipe it starts from) resolved."""
    with open(path) as f:
        raw = yaml.load(f, Loader=_Loader)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} is not a recipe (a YAML mapping)")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if base in seen:
        raise RecipeError(f"{path}: recipes extend each other in a loop ({' -> '.join((*seen, base))})")
    base_file = recipe_dir() / f"{base}.yaml"
    if not base_file.is_file():
        names = [p.stem for p in recipe_files()]
        raise RecipeError(f"{path} extends {base!r}, which is not a built-in recipe{did_you_mean(str(base), names)}")
    return _merge(_raw(base_file, (*seen, str(base))), raw)


def load_recipe_file(path: str | Path) -> Recipe:
    """A recipe file, validated (``extends: NAME`` starts from the built-in recipe NAME)."""
    raw = _raw(path)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{path} is not a valid recipe:\n{describe_validation_error(e, Recipe, '  ')}") from None


def all_recipes() -> list[Recipe]:
    return [load_recipe_file(p) for p in recipe_files()]


PROTOCOL = "medmnist-v2"  # the fallback protocol of `zoo train DATASET ARCH`


def protocols() -> list[str]:
    """Names of the recipes that apply to any dataset × architecture (``medmnist-v2``, ``medzoo-28`` …)."""
    return [r.name for r in all_recipes() if r.dataset == ANY]


def for_pair(protocol: Recipe, dataset: str, arch: str) -> Recipe:
    """A protocol recipe applied to one dataset × architecture (named ``<protocol>:<arch>``)."""
    from zoo.models import list_models

    if arch == ENSEMBLE:
        raise RecipeError(f"{ENSEMBLE} is not trained from a recipe: `zoo train {dataset} ARCH --seeds N` trains N "
                          "seeds of ARCH and bundles them as one ensemble")
    if arch not in list_models():
        raise RecipeError(f"no architecture named {arch!r}{did_you_mean(arch, list_models())}; "
                          f"architectures: {', '.join(list_models())}")
    return protocol.model_copy(update={"dataset": dataset, "arch": arch, "name": f"{protocol.name}:{arch}"})


def find_recipe(dataset: str, arch: str, recipe: str | None = None) -> Recipe:
    """The recipe for ``zoo train DATASET ARCH [--recipe NAME]``.

    ``ARCH`` is an architecture (its default recipe for that dataset: the one named
    ``<dataset>-<arch>``, else the only one) or a recipe variant name (``mlp-l1l2`` for
    ``organa-mlp-l1l2``). Without a recipe of its own, the MedMNIST v2 protocol applies.
    ``recipe`` names a built-in recipe instead: a protocol for any dataset × architecture
    (``medmnist-v2``, ``medzoo-28``, ``medzoo-224``: ``zoo recipes``), or one of the dataset's own.
    """
    from zoo.names import resolve_name

    flag = resolve_name(dataset)
    recipes = all_recipes()
    if recipe is not None:
        return _named(recipes, recipe, dataset, flag, arch)
    mine = [r for r in recipes if r.dataset != ANY and resolve_name(r.dataset) == flag]
    by_name = {r.name.split("-", 1)[1]: r for r in mine if "-" in r.name}
    if arch in by_name:
        return by_name[arch]
    same_arch = [r for r in mine if r.arch == arch]
    if same_arch:
        return min(same_arch, key=lambda r: len(r.name))
    protocol = next((r for r in recipes if r.name == PROTOCOL), None)
    if protocol is None:
        raise RecipeError(f"no recipe for {dataset} × {arch}")
    from zoo.models import list_models

    if arch not in list_models():
        names = [*list_models(), *by_name]
        hint = did_you_mean(arch, names) or f"; architectures: {', '.join(list_models())}"
        raise RecipeError(f"no recipe or architecture named {arch!r} for {flag}{hint}")
    return for_pair(protocol, dataset, arch)


def _named(recipes: list[Recipe], name: str, dataset: str, flag: str, arch: str) -> Recipe:
    """The built-in recipe called ``name``, for ``dataset`` × ``arch``."""
    from zoo.names import resolve_name

    found = next((r for r in recipes if r.name == name), None)
    if found is None:
        raise RecipeError(f"no built-in recipe named {name!r}{did_you_mean(name, [r.name for r in recipes])}; "
                          f"protocols for any dataset: {', '.join(r.name for r in recipes if r.dataset == ANY)} "
                          "(`zoo recipes` lists them all)")
    if found.dataset == ANY:
        return for_pair(found, dataset, arch)
    if resolve_name(found.dataset) != flag:
        raise RecipeError(f"recipe {name} is for {resolve_name(found.dataset)}, not {flag}")
    if arch not in (found.arch, name.split("-", 1)[-1]):
        raise RecipeError(f"recipe {name} trains {found.arch}, not {arch}")
    return found


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise RecipeError(f"cannot set {dotted}: {k} is not a section")
    d[keys[-1]] = value


def _set_paths(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw recipe ``raw`` with ``values`` set at their dotted paths."""
    out = copy.deepcopy(raw)
    for path, value in values.items():
        _set_path(out, path, value)
    return out


# Shortcuts → recipe fields: `zoo train`'s flags (``--batch-size`` for ``batch_size``, made from this
# table by zoo.cli.commands) and keys :func:`apply_overrides` accepts beside dotted paths.
SHORTCUTS = {
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
    "lr": "optimizer.lr",
    "optimizer": "optimizer.name",
    "size": "data.size",
    "input_size": "data.input_size",
    "patience": "train.early_stopping.patience",
    "pretrained": "pretrained",
    "precision": "train.precision",
    "seeds": "train.seeds",
    "track": "train.track",
}


def shortcut_type(name: str) -> type:
    """The type a shortcut's value has in the recipe (``int``, ``float``, else ``str`` to be read as
    YAML), from the recipe's own field, so that a flag and its field cannot disagree."""
    field: Any = Recipe
    for part in SHORTCUTS[name].split("."):
        field = field.model_fields[part].annotation
    # int | None, Literal[28, 64, …]: the type of the values that are not None
    kinds = {type(a) for a in typing.get_args(field)} if typing.get_origin(field) is typing.Literal else (
        {a for a in typing.get_args(field) if a is not type(None)} or {field})
    return kinds.pop() if len(kinds) == 1 and kinds <= {int, float} else str


def apply_overrides(recipe: Recipe, overrides: dict[str, Any], parse_text: bool = True) -> Recipe:
    """Return a validated copy with ``{"train.epochs": 3, "lr": 1e-3, ...}`` applied: keys are dotted
    paths or :data:`SHORTCUTS`. With ``parse_text`` string values are read as YAML scalars (text from
    the command line: ``--set model.hidden=[64,32]``); ``parse_text=False`` sets every value as given
    (typed values, what a tuning trial samples)."""
    values = {SHORTCUTS.get(key, key): yaml.safe_load(value) if parse_text and isinstance(value, str) else value
              for key, value in overrides.items()}
    try:
        return Recipe.model_validate(_set_paths(recipe.model_dump(mode="python"), values))
    except ValidationError as e:
        raise RecipeError(f"invalid recipe setting:\n{describe_validation_error(e, Recipe, '  ')}") from None
