"""Training configurations: YAML files read into dataclasses.

Unknown keys are errors (a typo must not silently fall back to a default). A file may start from
another: ``base: other.yaml`` (relative to the file) and then only the keys it changes, merged
into the base's nested sections.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ctflow.data.hu import HU_WINDOW, check_window
from ctflow.errors import CTFlowError, one_of, warn


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0: no clipping (the norm is still logged)
    ema_decay: float = 0.999

    def __post_init__(self):
        checks = {
            "lr": self.lr >= 0,
            "weight_decay": self.weight_decay >= 0,
            "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "warmup_steps": self.warmup_steps >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "grad_clip": self.grad_clip >= 0,
            "ema_decay": 0 <= self.ema_decay < 1,
        }
        rules = {
            "betas": "two numbers in [0, 1)",
            "min_lr_ratio": "between 0 and 1",
            "ema_decay": "in [0, 1)",
        }
        for key, ok in checks.items():
            if not ok:
                rule = rules.get(key, "0 or more")
                raise CTFlowError(f"config key optim.{key} must be {rule}, got {getattr(self, key)!r}")
        if self.lr == 0:  # allowed (a run that only measures, or freezes what it loads), never by accident
            warn("config key optim.lr is 0: training runs its steps but the weights do not change")


MIXED_PRECISION = ("no", "bf16", "fp16")


COUNT_KEYS = ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints")


def check_counts(config, names=COUNT_KEYS):
    """Refuse a count below 1 among ``names`` of a training config (0 steps or batch rows, logging or
    checkpointing every 0 steps)."""
    for name in names:
        if getattr(config, name) < 1:
            raise CTFlowError(f"config key {name} must be 1 or more, got {getattr(config, name)}")


@dataclass
class LateConfig:
    """The last steps of a flow run, from ``from_step`` on: the sampling keys given here replace the
    run's own (the rest, the learning-rate schedule included, go on unchanged), so a run can end on a
    FindingBoost stage without a second command. ``from_step: 0`` (the default): no late stage."""

    from_step: int = 0
    finding_boost: float | None = None
    finding_controls: float | None = None
    finding_weight: float | None = None

    def changes(self) -> dict[str, float]:
        """The keys this stage sets (its ``from_step`` aside)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "from_step" and v is not None}

    def __post_init__(self):
        for name in (f.name for f in dataclasses.fields(self) if f.name != "from_step"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise CTFlowError(f"config key late.{name} must be a number, got {value!r}")
            setattr(self, name, None if value is None else float(value))


@dataclass
class FlowTrainConfig:
    """Flow-transformer training (``ctflow train``)."""

    transformer: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 2000
    batch_size: int = 16  # per process: N processes train on N x batch_size chunks a step
    seed: int = 0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    # StartBoost: probability that a training sample is the first chunk of its volume; 0 turns it
    # off (a volume drawn uniformly, then one of its chunks, the first included: a short scan's chunks
    # come up more often than a long one's)
    start_boost: float = 0.5
    # FindingBoost: probability that a sample is a chunk where a localized finding begins (or the one
    # after), drawn from the volumes whose latent-cache rows carry finding_slices (phantom data sets).
    # It replaces later-chunk draws, so first chunks stay start_boost of all samples
    finding_boost: float = 0.0
    # FindingBoost controls: the share of those samples that are instead the chunk at the same depth of
    # a volume without the findings that begin there (and, with finding_weight, weighted over the same
    # region), so the boost shows where a finding is absent as often as where it begins
    finding_controls: float = 0.0
    # FindingWeight: each latent pixel's loss counts 1 + finding_weight x the share of it a finding covers
    # (the cache's finding masks: `ctflow encode --finding-masks`, phantom data sets), so the few pixels
    # that show a finding are not outweighed by the anatomy around them
    finding_weight: float = 0.0
    # the share enters the weight raised to this power: below 1, a latent pixel a finding only touches
    # (a nodule of 1-2 voxels covers a sixteenth of one) weighs more, one it fills the same
    finding_share_power: float = 1.0
    cfg_dropout: float = 0.1  # probability of the null report (classifier-free guidance)
    meta_dropout: float = 0.1  # probability of the report without its slice-count meta line
    # probability that a row reads one of its report's shortened versions (a random subset of the
    # Findings sentences; ``ctflow encode --report-variants N`` stores them), so short typed reports
    # read like the long ones the model was trained on
    short_reports: float = 0.0
    # probability that a row's finding flags (``transformer.num_findings`` models) are unknown, so the
    # model still generates from the report text alone; the null report (cfg_dropout) drops them too
    finding_dropout: float = 0.0
    context_noise: float = 0.05  # std of the noise added to the previous chunk during training
    # when above context_noise, each row's std is drawn uniformly from [context_noise, context_noise_max]:
    # heavily noised contexts leave the report as the only source of what the chunk holds
    context_noise_max: float = 0.0
    time_distribution: str = "logit_normal"  # "logit_normal" | "uniform"
    time_mean: float = 0.0  # mean of the logit-normal's normal: above 0 trains noisier times more often
    # "velocity": MSE of the velocity (SD3); "sample": MSE of the clean chunk it implies (rows weighted
    # by t^2), which gives the noisiest times, where a chunk's coarse content is decided, more weight
    loss_space: str = "velocity"
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    late: LateConfig = field(default_factory=LateConfig)

    def at_step(self, step: int) -> FlowTrainConfig:
        """The config that samples step ``step`` (0-based): this one, or past ``late.from_step`` this one
        with the late keys in place."""
        if not self.late.from_step or step < self.late.from_step:
            return self
        return dataclasses.replace(self, late=LateConfig(), **self.late.changes())

    def stages(self) -> list[FlowTrainConfig]:
        """The configs a run samples with: this one, and its late stage if it has one."""
        return [self] + ([self.at_step(self.late.from_step)] if self.late.from_step else [])

    def __post_init__(self):
        check_counts(self)
        if self.mixed_precision not in MIXED_PRECISION:
            raise CTFlowError(
                f"config key mixed_precision must be {one_of(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.late.from_step:
            if not 0 < self.late.from_step < self.steps:
                raise CTFlowError(
                    f"config key late.from_step must be between 1 and steps - 1 ({self.steps - 1}), got"
                    f" {self.late.from_step}; set it below steps, or 0 for no late stage"
                )
            try:  # the late stage's keys are checked as the run's own are
                self.at_step(self.late.from_step)
            except CTFlowError as e:
                raise CTFlowError(f"late stage (from step {self.late.from_step}): {e}") from None
        probabilities = (
            "start_boost",
            "finding_boost",
            "finding_controls",
            "short_reports",
            "finding_dropout",
        )
        for name in (*probabilities, "meta_dropout", "cfg_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CTFlowError(f"config key {name} must be between 0 and 1, got {getattr(self, name)}")
        if self.context_noise < 0 or (self.context_noise_max and self.context_noise_max < self.context_noise):
            raise CTFlowError(
                f"config keys context_noise ({self.context_noise}) and context_noise_max"
                f" ({self.context_noise_max}) must be 0 or more, the maximum (if set) not below the noise"
            )
        if not (math.isfinite(self.finding_weight) and self.finding_weight >= 0):
            raise CTFlowError(f"config key finding_weight must be 0 or more, got {self.finding_weight}")
        if not 0 < self.finding_share_power <= 1:
            raise CTFlowError(
                f"config key finding_share_power must be above 0 and at most 1, got {self.finding_share_power}"
            )
        from ctflow.flow import LOSS_SPACES, TIME_DISTRIBUTIONS

        if self.loss_space not in LOSS_SPACES:
            raise CTFlowError(f"config key loss_space must be {one_of(LOSS_SPACES)}, got {self.loss_space!r}")
        if self.time_distribution not in TIME_DISTRIBUTIONS:
            raise CTFlowError(
                f"config key time_distribution must be {one_of(TIME_DISTRIBUTIONS)},"
                f" got {self.time_distribution!r}"
            )
        if self.finding_controls > 0 and self.finding_boost <= 0:
            raise CTFlowError(
                "config key finding_controls replaces some finding_boost samples, which is 0;"
                " set finding_boost above 0 or finding_controls: 0"
            )
        if self.start_boost + self.finding_boost > 1.0:
            raise CTFlowError(
                f"start_boost + finding_boost must be at most 1 (got {self.start_boost} + {self.finding_boost});"
                " lower one of them"
            )


@dataclass
class VAETrainConfig:
    """Slice-autoencoder training (``ctflow train-vae``)."""

    preset: str = "tiny"
    vae: dict[str, Any] = field(default_factory=dict)  # overrides of the preset
    # start from these weights instead of a random preset: a diffusers VAE folder, or FLUX's original
    # ae.safetensors (read with ``preset``'s layout); the A-VAE fine-tune of the paper starts from FLUX's
    init: str | None = None
    image_size: int = 64
    hu_window: tuple[float, ...] = HU_WINDOW  # HU knots -> [-1, 1] (ctflow.data.hu.normalize_hu)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50, ema_decay=0.0))
    steps: int = 1500
    batch_size: int = 16
    seed: int = 0
    kl_weight: float = 1e-6
    disc_start: int = 1000  # step at which the adversarial term switches on
    disc_weight: float = 0.5
    disc_lr: float = 2e-4
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # the slices train-vae holds in memory (float16, image_size^2 each): every slice of every volume by
    # default, which suits phantoms; for CT-RATE cap the volumes and take a few evenly spaced slices each
    max_volumes: int | None = None
    slices_per_volume: int | None = None

    def __post_init__(self):
        capped = [key for key in ("max_volumes", "slices_per_volume") if getattr(self, key) is not None]
        check_counts(self, (*COUNT_KEYS, "image_size", *capped))
        self.hu_window = check_window(self.hu_window)
        size = self.vae.get("sample_size", self.image_size)
        if size != self.image_size:
            raise CTFlowError(
                f"config key vae.sample_size is {size} but image_size is {self.image_size}; the VAE is"
                " trained and encodes at image_size: leave vae.sample_size out"
            )
        if self.optim.ema_decay:
            raise CTFlowError(
                f"config key optim.ema_decay is {self.optim.ema_decay}, but the VAE trainer keeps no EMA"
                " weights; set it to 0"
            )


def _field_default(cls, name: str):
    """The default value of dataclass ``cls``'s field ``name`` (None if it has none)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls, data: Any, where: str, default=None):
    """``cls`` from ``data``; a nested section keeps its parent's defaults for the keys it leaves out
    (a VAE config's ``optim: {lr: ...}`` keeps the VAE's warm-up and ema_decay 0, not OptimConfig's)."""
    if not dataclasses.is_dataclass(cls):
        return data
    if data is None:
        return cls() if default is None else default
    if not isinstance(data, dict):
        raise CTFlowError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CTFlowError(
            f"unknown config key {where}{unknown[0]!r}; allowed keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        origin, name = typing.get_origin(hint), f"{where}{key}"
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{name}.", _field_default(cls, key))
        elif origin is tuple:
            if not isinstance(value, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value
            ):
                raise CTFlowError(f"config key {name} must be a list of numbers, got {value!r}")
            kwargs[key] = tuple(value)
        elif origin is dict:
            if not isinstance(value, dict):
                raise CTFlowError(f"config key {name} must be a mapping of settings, got {value!r}")
            kwargs[key] = value
        elif isinstance(hint, types.UnionType):  # X | None
            allowed = tuple(t for t in typing.get_args(hint) if t is not type(None))
            if value is not None and not isinstance(value, allowed):
                raise CTFlowError(f"config key {name} must be {allowed[0].__name__} or null, got {value!r}")
            kwargs[key] = value
        else:
            base = hint if isinstance(hint, type) else None
            if base in (int, float) and isinstance(value, int | float) and not isinstance(value, bool):
                value = base(value) if base is float or float(value).is_integer() else value
            if base is not None and (
                not isinstance(value, base) or (base is not bool and isinstance(value, bool))
            ):
                raise CTFlowError(f"config key {name} must be {base.__name__}, got {value!r}")
            kwargs[key] = value
    return cls(**kwargs) if default is None else dataclasses.replace(default, **kwargs)


def config_from_dict(data: dict, cls):
    """A config dataclass from a plain mapping (as read from YAML); unknown keys are errors."""
    return _build(cls, data, "")


def merged(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s keys replacing its own; nested mappings are merged key by key."""
    out = dict(base)
    for k, v in over.items():
        below = base.get(k)
        out[k] = merged(below if isinstance(below, dict) else {}, v) if isinstance(v, dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {line})"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e-4 as a string: only 1.0e-4 is a float there. Read exponents without a
# dot as floats too, as YAML 1.2 and JSON do (the implicit float resolver, first characters included).
_UniqueKeyLoader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    # the file's mapping, with its ``base:`` file (if any) merged underneath
    if not path.is_file():
        raise CTFlowError(f"config file {path} not found")
    if path.resolve() in chain:
        raise CTFlowError(
            f"config file {path} is its own base (through {chain[-1].name}); break the base: chain"
        )
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        where = f" (line {e.problem_mark.line + 1})" if getattr(e, "problem_mark", None) else ""
        raise CTFlowError(f"{path} is not valid YAML{where}: {str(e).splitlines()[0]}") from None
    if data is None:
        raise CTFlowError(
            f"config file {path} is empty; write the settings it should set, one key: value a line"
        )
    if not isinstance(data, dict):
        raise CTFlowError(
            f"config file {path} must hold key: value settings, got {type(data).__name__} {data!r}"
        )
    if "base" in data:
        base = data.pop("base")
        if not isinstance(base, str):
            raise CTFlowError(f"config key base in {path} must be a file name, got {base!r}")
        data = merged(_read_yaml(path.parent / base, (*chain, path.resolve())), data)
    return data


def load_config(path: str | Path, cls):
    """Read a YAML file (and its ``base:`` chain) into the dataclass ``cls``."""
    return _build(cls, _read_yaml(Path(path)), "")


def changed_settings(before: dict, now: dict, where: str = "") -> str:
    """The settings that differ between two config dicts, ``key old -> new`` (nested keys dotted)."""
    changes = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if inner := changed_settings(a, b, f"{where}{key}."):
                changes.append(inner)
        elif (list(a) if isinstance(a, tuple | list) else a) != (
            list(b) if isinstance(b, tuple | list) else b
        ):
            changes.append(f"{where}{key} {a} -> {b}")
    return ", ".join(changes)


def warn_changed_settings(checkpoint: dict, config, step: int) -> None:
    """Warn when a run resumes from ``checkpoint`` (its saved info) with settings other than its own."""
    if changed := changed_settings(checkpoint.get("config") or {}, dataclasses.asdict(config)):
        warn(f"resuming from step {step} with settings other than the checkpoint's: {changed}")
