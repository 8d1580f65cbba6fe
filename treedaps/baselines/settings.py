"""The baselines' settings, apart from their samplers so that ``treedaps.config`` can check them
without importing the loop: ``algorithm`` (``ALGORITHMS``) and the ``resample:`` block
(``ResampleConfig``: ReSample's settings, defaults from its official code, docs/resample.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ALGORITHMS = ("latent_daps", "resample")
COUPLINGS = ("independent", "faithful")   # treedaps/baselines/hard_consistency.py runs both


@dataclass(frozen=True)
class ResampleConfig:
    """ReSample's settings (defaults: the official code). ``interval`` 0 = no hard consistency,
    ``dps_scale`` 0 = no DPS term, ``time_travel`` = UNet evaluations of the time travel (>= 1)."""

    num_steps: int = 500
    eta: float = 0.0
    dps_scale: float = 0.5
    interval: int = 10
    time_travel: int = 5
    gamma: float = 40.0
    pixel_lr: float = 1e-2
    pixel_max_iters: int = 2000
    latent_lr: float = 5e-3
    latent_max_iters: int = 500
    plateau_window: int = 200
    eps: float = 1e-3
    weight_decay: float = 0.01
    final_optimization: bool = True
    coupling: str = "independent"
    z0hat: str = "code"

    def __post_init__(self):
        problems = []
        if int(self.num_steps) < 1 or 1000 % int(self.num_steps):
            problems.append(f"num_steps must divide 1000 (CompVis's uniform DDIM grid), got {self.num_steps}")
        for key in ("pixel_lr", "latent_lr", "gamma"):
            if not getattr(self, key) > 0:
                problems.append(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("eta", "dps_scale", "interval", "plateau_window", "eps", "weight_decay"):
            if getattr(self, key) < 0:
                problems.append(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("time_travel", "pixel_max_iters", "latent_max_iters"):
            if int(getattr(self, key)) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.coupling not in COUPLINGS:
            problems.append(f"coupling must be one of {', '.join(COUPLINGS)}, got {self.coupling!r}")
        if self.z0hat not in ("code", "tweedie"):
            problems.append(f"z0hat must be 'code' or 'tweedie', got {self.z0hat!r}")
        if problems:
            raise ValueError("resample: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, mapping) -> "ResampleConfig":
        values = {k: v for k, v in dict(mapping or {}).items() if v is not None}
        types = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise ValueError(f"unknown resample key(s) {', '.join(unknown)} (known: {', '.join(types)})")
        for key, value in values.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if types[key] in ("int", "float") and not number:
                raise ValueError(f"resample.{key} must be a number, got {value!r}")
            if types[key] == "bool" and not isinstance(value, bool):
                raise ValueError(f"resample.{key} must be true or false, got {value!r}")
            if types[key] == "int" and value != int(value):
                raise ValueError(f"resample.{key} must be an integer, got {value!r}")
        return cls(**values)

    def as_dict(self) -> dict:
        return asdict(self)
