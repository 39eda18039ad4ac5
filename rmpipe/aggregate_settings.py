"""The `aggregate:` section of params.yaml and the label / bucket vocabulary every aggregate module shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rmpipe import params as P
from rmpipe.errors import ConfigError
from rmpipe.schema import PAIR_COLUMNS, STRENGTHS

LABELS = ("first", "second", "tie")
FIRST, SECOND, TIE = 0, 1, 2
MALFORMED, IDENTICAL = -1, -2  # votes that cannot be oriented

METHODS = ("majority", "dawid_skene")
TIE_POLICIES = ("drop", "soft")
OUTPUT_COLUMNS = [c for c in PAIR_COLUMNS if c != "split"] + ["prejudged", "group_id"]  # the split stage adds `split`

# Where each input vote ends up; report["votes"] counts them and they sum to n_votes_in.
VOTE_BUCKETS = (
    "used",
    "malformed",  # unknown choice, missing pair_id / annotator_id / response
    "identical_responses",
    "duplicate_vote",  # same annotator, same pair again (first by batch_id, line is kept)
    "inconsistent_pair_id",  # the pair_id names different response pairs in different votes
    "excluded_annotator",  # aggregate.exclude_flagged / aggregate.exclude_annotators
    "in_pairs_below_min_votes",
    "in_dropped_tie_pairs",
)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AggregateSettings:
    method: str = "majority"
    min_votes: int = 2
    tie_policy: str = "drop"
    strength_margin: dict[str, float] = field(
        default_factory=lambda: {"slight": 0.0, "moderate": 0.33, "strong": 0.67, "very_strong": 1.0}
    )
    agreement_floor: float = 0.6
    share_ceiling: float = 0.3
    exclude_flagged: bool = False
    max_dropped_share: float = 0.5
    exclude_annotators: tuple[str, ...] = ()  # named out, e.g. by `rmpipe retract --annotator`
    ds_n_iter: int = 20
    ds_tol: float = 1e-4

    @classmethod
    def from_params(cls, cfg: dict[str, Any]) -> AggregateSettings:
        """Read and check the `aggregate:` section of params.yaml (ConfigError naming the key)."""
        where = "aggregate"
        margins = P.get(cfg, "strength_margin", dict, where)
        missing = [s for s in STRENGTHS if s not in margins]
        if missing:
            raise ConfigError(f"params.yaml: '{where}.strength_margin' has no value for {missing}")
        ds = P.get(cfg, "dawid_skene", dict, where)
        settings = cls(
            method=P.get(cfg, "method", str, where, choices=METHODS),
            min_votes=P.get(cfg, "min_votes", int, where),
            tie_policy=P.get(cfg, "tie_policy", str, where, choices=TIE_POLICIES),
            strength_margin={s: float(P.get(margins, s, float, f"{where}.strength_margin")) for s in margins},
            agreement_floor=P.fraction(cfg, "agreement_floor", where),
            share_ceiling=P.fraction(cfg, "share_ceiling", where),
            exclude_flagged=P.get(cfg, "exclude_flagged", bool, where),
            max_dropped_share=P.fraction({"max_dropped_share": 0.5, **cfg}, "max_dropped_share", where),
            exclude_annotators=tuple(str(a) for a in cfg.get("exclude_annotators") or ()),
            ds_n_iter=P.get(ds, "n_iter", int, f"{where}.dawid_skene"),
            ds_tol=float(P.get(ds, "tol", float, f"{where}.dawid_skene")),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """The checks that also apply to settings built in code rather than read from params."""
        if self.method not in METHODS:
            raise ConfigError(f"aggregate.method must be one of {list(METHODS)}, got {self.method!r}")
        if self.tie_policy not in TIE_POLICIES:
            raise ConfigError(f"aggregate.tie_policy must be one of {list(TIE_POLICIES)}, got {self.tie_policy!r}")
        if self.min_votes < 1:
            raise ConfigError(f"aggregate.min_votes must be at least 1, got {self.min_votes}")
        if isinstance(self.exclude_annotators, str):
            raise ConfigError("aggregate.exclude_annotators must be a list of annotator ids, not one string")
        if self.ds_n_iter < 1:
            raise ConfigError(f"aggregate.dawid_skene.n_iter must be at least 1, got {self.ds_n_iter}")
