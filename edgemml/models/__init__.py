"""Model architectures, pickle-free saving/loading, and checkpoint reading."""

from edgemml.models.checkpoints import (
    NESTING_KEYS,
    WRAPPER_PREFIXES,
    Checkpoint,
    LoadReport,
    load_checkpoint,
    load_into,
    read_checkpoint,
    strip_wrapper_prefixes,
)
from edgemml.models.registry import (
    adapt_stem_weight,
    build_model,
    canonical_arch,
    find_classifier,
    find_stem_conv,
    known_architectures,
    replace_stem,
    set_submodule,
)
from edgemml.models.serialize import (
    MODEL_SPEC,
    MODEL_WEIGHTS,
    ModelSpec,
    diff_layer_shapes,
    load_model,
    read_spec,
    save_model,
)

__all__ = [
    "MODEL_SPEC",
    "MODEL_WEIGHTS",
    "NESTING_KEYS",
    "WRAPPER_PREFIXES",
    "Checkpoint",
    "LoadReport",
    "ModelSpec",
    "adapt_stem_weight",
    "build_model",
    "canonical_arch",
    "diff_layer_shapes",
    "find_classifier",
    "find_stem_conv",
    "known_architectures",
    "load_checkpoint",
    "load_into",
    "load_model",
    "read_checkpoint",
    "read_spec",
    "replace_stem",
    "save_model",
    "set_submodule",
    "strip_wrapper_prefixes",
]
