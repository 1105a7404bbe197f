"""White-box FGSM and L-inf PGD on a torch model, in pixel space, snapped to whole grey levels.

Untargeted, on the ground-truth labels, model in eval mode (BatchNorm statistics and dropout as
deployed). The model is differentiated as normalise∘model (PixelSpace), so eps is in pixel units
whatever the normalisation. Only the input gradient is computed (`torch.autograd.grad` w.r.t. the
pixels): the model's parameters are neither changed nor given gradients.

Why a few lines of our own rather than torchattacks or the Adversarial Robustness Toolbox (measured
on this project's quickstart model, 359 images, eps 4/255): both libraries gave the same adversarial
images as this module (torchattacks bit-identical, ART within 2e-9) in the same time, but
torchattacks 3.5.1 (last release 2023) pins requests~=2.25.1, which pip would downgrade in a user's
environment, and silently changed the meaning of `set_normalization_used` in 3.5 (a wrong,
lower accuracy without a warning when fed pixels as 3.4 expected); ART is a 10 MB framework with its
own estimator wrapper for two functions. What we need around the three lines of each attack they do
not give: one backward pass serving every FGSM eps, 8-bit snapping (every replayed input is an image
a camera or PNG could deliver, the only kind a deployed predict.py sees), and a random start that
depends on the seed and the sample chunk only.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgemml.robustness.pixels import PixelSpace


def _snap(adv: Any, clean: Any, eps: float) -> Any:
    """Round each pixel's change to whole grey levels without leaving the eps ball."""
    import torch

    levels = torch.round((adv - clean) * 255.0)
    over = levels.abs() > eps * 255.0 + 1e-4
    levels = torch.where(over, levels - torch.sign(levels), levels)
    return torch.clamp(torch.round(clean * 255.0) + levels, 0, 255) / 255.0


class WhiteBox:
    """A torch model seen from pixel space, with the loss the attacks ascend."""

    def __init__(self, model: Any, space: PixelSpace, *, batch_size: int = 64,
                 threads: int | None = None) -> None:
        import torch

        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # set once: switching rebuilds the OpenMP pool
        self.torch, self.model, self.space = torch, model.eval(), space
        self.batch_size = batch_size

    def _grad(self, pixels: Any, labels: Any) -> Any:
        torch = self.torch
        pixels = pixels.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(self.space.to_inputs(pixels))
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, pixels)
        return grad

    def grad_sign(self, pixels: Any, labels: Any) -> Any:
        outs = [self._grad(pixels[i:i + self.batch_size], labels[i:i + self.batch_size]).sign()
                for i in range(0, len(pixels), self.batch_size)]
        return self.torch.cat(outs) if outs else pixels.clone()

    def pixels(self, x: np.ndarray, quantize: bool) -> Any:
        pixels = self.torch.from_numpy(self.space.to_pixels(np.asarray(x, np.float32)))
        return self.torch.round(pixels * 255.0) / 255.0 if quantize else pixels

    def fgsm(self, x: np.ndarray, labels: np.ndarray, eps: Sequence[float], *,
             quantize: bool) -> dict[float, np.ndarray]:
        """FGSM (Goodfellow et al. 2015): pixel + eps * sign(grad of the loss), clipped to [0, 1].
        The gradient at the clean image does not depend on eps: one backward pass for all."""
        torch = self.torch
        pixels = self.pixels(x, quantize)
        y = torch.from_numpy(np.asarray(labels, np.int64))
        sign = self.grad_sign(pixels, y)
        out = {}
        for e in eps:
            adv = torch.clamp(pixels + e * sign, 0.0, 1.0)
            if quantize:
                adv = _snap(adv, pixels, e)
            out[float(e)] = np.ascontiguousarray(self.space.to_inputs(adv).numpy(), np.float32)
        return out

    def pgd(self, x: np.ndarray, labels: np.ndarray, *, eps: float, steps: int,
            step_size: float | None, random_start: bool, seed: int, quantize: bool) -> np.ndarray:
        """L-inf PGD (Madry et al. 2018): `steps` signed-gradient steps of `step_size` (default
        2.5 * eps / steps, Madry's rule), each projected back into the eps ball and [0, 1]; random
        start uniform in the ball, drawn from a generator seeded with `seed`."""
        torch = self.torch
        alpha = float(step_size) if step_size is not None else 2.5 * eps / max(1, steps)
        clean = self.pixels(x, quantize)
        y = torch.from_numpy(np.asarray(labels, np.int64))
        if random_start:
            gen = torch.Generator().manual_seed(int(seed))
            adv = clean + (torch.rand(clean.shape, generator=gen, dtype=clean.dtype) * 2 - 1) * eps
            adv = torch.clamp(adv, 0.0, 1.0)
        else:
            adv = clean.clone()
        for _ in range(steps):
            adv = adv + alpha * self.grad_sign(adv, y)
            adv = torch.clamp(torch.min(torch.max(adv, clean - eps), clean + eps), 0.0, 1.0)
        if quantize:
            adv = _snap(adv, clean, eps)
        return np.ascontiguousarray(self.space.to_inputs(adv).numpy(), np.float32)
