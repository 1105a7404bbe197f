"""Robustness of every artifact: adversarial inputs and common corruptions, replayed on each runtime.

An int8 ONNX Runtime or OpenVINO model has no gradients, so adversarial inputs are crafted once,
white-box, on the float torch model (FGSM and L-inf PGD, attacks.py) and *replayed* on every
artifact made from it: for those artifacts a transfer attack, which the results say
(`ArtifactRobustness.transfer`). Corruptions (ImageNet-C-style: gaussian noise, gaussian blur,
brightness, contrast, JPEG, at fixed severities: corruptions.py) depend on no model.

Everything happens in pixel space per the one preprocessing spec (pixels.py): eps in grey levels
after resize and before normalisation; corruptions on the 8-bit image at the model's input
resolution, as ImageNet-C corrupts the 224-px crop; adversarial pixels snapped back to whole grey
levels, so each replayed input is an image a deployed predict.py could be given.

Library: plain arguments in (torch modules, runtime Runners, sample chunks), dataclasses out
(evaluate.py); torch is imported only when an attack runs. The validate stage orchestrates it
(edgemml/stages/_validate_robustness.py).
"""

from edgemml.robustness.corruptions import (CORRUPTIONS, DEFAULT_TABLE, SEVERITY_TABLES, corrupt,
                                            resolve_table)
from edgemml.robustness.evaluate import (CHUNK, ArtifactRobustness, Member, Run, SetResult,
                                         Settings, gap, measure, set_specs)
from edgemml.robustness.pixels import PixelSpace, eps_label

__all__ = ["CHUNK", "CORRUPTIONS", "DEFAULT_TABLE", "SEVERITY_TABLES", "ArtifactRobustness",
           "Member", "PixelSpace", "Run", "SetResult", "Settings", "corrupt", "eps_label", "gap",
           "measure", "resolve_table", "set_specs"]
