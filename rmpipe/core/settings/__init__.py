"""Every section of params.yaml as one frozen, validated settings object: the one place params are read.

A stage parses the sections it uses once, at its entry (`TrainSettings.parse(params)`), and passes
the objects down; nothing below a stage reads params.yaml or a raw section dict. The classes are
pydantic models (strict types: `true` is no number, `"0.1"` no float; unknown keys refused, so a typo
is caught instead of silently falling back to a default). Any mistake becomes one `ConfigError`
line naming the key and what to write instead; no pydantic traceback reaches the user.

The sections live in two modules, the data stages' (`settings.data`) and the model's (`settings.model`), over
one base (`settings.base`); every class is importable from here.
"""

from rmpipe.core.settings.base import (
    FRACTION_TOLERANCE,
    PACKING_MODES,
    SPLITS,
    STRENGTHS,
    Settings,
)
from rmpipe.core.settings.data import (
    AggregateSettings,
    CollectSettings,
    DataSettings,
    DawidSkeneSettings,
    SampleDataSettings,
    SplitSettings,
    ValidateSettings,
    check_fractions,
)
from rmpipe.core.settings.model import (
    EvalSettings,
    ExportSettings,
    LoraSettings,
    ModelSettings,
    SamplingSettings,
    TinySettings,
    TrainSettings,
)

__all__ = [
    "FRACTION_TOLERANCE", "PACKING_MODES", "SPLITS", "STRENGTHS", "AggregateSettings", "CollectSettings",
    "DataSettings", "DawidSkeneSettings", "EvalSettings", "ExportSettings", "LoraSettings", "ModelSettings",
    "SampleDataSettings", "SamplingSettings", "Settings", "SplitSettings", "TinySettings", "TrainSettings",
    "ValidateSettings", "check_fractions",
]
