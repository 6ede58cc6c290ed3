"""Run calibration passes: forward the calibration images through the copy while observers watch.

Sites are calibrated in groups (patch embedding, each block, the classifier), in forward order.
With ``sequential`` the groups before are already quantized while a group is observed, so each
range is fitted to the activations the quantized model will really produce; a forward stops as
soon as the group's last module has run, so this costs about half a forward per group and pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_cd.quant.algorithms.observers import Observer, ReplayBudget
from hf_cd.quant.algorithms.params import QuantParams
from hf_cd.quant.algorithms.quantizers import is_float_bits
from hf_cd.quant.prepare import ActivationSite, QuantizationState

REPLAY_BYTES = 1 << 30
"""Activation copies one calibration group may hold so that its second pass needs no forward
(a block of ViT-B at 224 px and 32 images holds about 250 MB)."""


class _GroupDone(Exception):
    """Raised by a forward hook to stop a calibration forward once the group's sites have run."""


@dataclass
class CalibrationGroup:
    sites: list[ActivationSite]
    end: nn.Module | None
    """Stop the forward after this module (``None``: run it whole)."""


def model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def forward_images(model: nn.Module, images: torch.Tensor):
    """Run ``model`` on a CPU batch of images, moved to its device and floating dtype."""
    device, dtype = model_device_and_dtype(model)
    pixel_values = images.to(device=device, dtype=dtype if images.is_floating_point() else None)
    return model(pixel_values=pixel_values)


def load_presets(state: QuantizationState, sites: list[ActivationSite]) -> list[ActivationSite]:
    """Load ``state.preset`` parameters into those of ``sites`` that have them; return the others."""
    remaining = []
    for site in sites:
        params = state.preset.get(site.name)
        if params is not None and not is_float_bits(site.bits):
            site.quantizer.load(params)
        else:
            remaining.append(site)
    return remaining


def calibration_groups(
    state: QuantizationState, sites: Sequence[ActivationSite], sequential: bool
) -> list[CalibrationGroup]:
    if not sequential:
        return [CalibrationGroup(list(sites), None)]
    groups = []
    for index, end in enumerate(state.group_ends):
        members = [site for site in sites if site.group == index]
        if members:
            groups.append(CalibrationGroup(members, end))
    return groups


@torch.no_grad()
def calibrate(
    model: nn.Module,
    images: torch.Tensor,
    observers: dict[str, Observer],
    state: QuantizationState,
    *,
    batch_size: int,
    sequential: bool,
    activate: bool = True,
    progress: bool = True,
    description: str = "calibration",
    replay_bytes: int | None = None,
) -> dict[str, QuantParams]:
    """Observe the sites named in ``observers`` on ``images`` and return their parameters.

    Observers that need a second pass (the range searches) run it on copies of the first pass's
    activations when a group's copies fit in ``replay_bytes`` (`REPLAY_BYTES` if None), instead of forwarding the images
    again; the result is the same, the forwards are half.

    With ``activate`` each site starts quantizing with its parameters as soon as its group is done
    (so later groups see it quantized); otherwise the sites go back to float and only the
    parameters are returned (RepQ-ViT's per-channel statistics before reparameterization).
    """
    sites = [site for site in state.activations if site.name in observers]
    groups = calibration_groups(state, sites, sequential)
    batches = [images[start : start + batch_size] for start in range(0, images.shape[0], batch_size)]
    total = sum(max(observers[s.name].num_passes for s in group.sites) for group in groups) * len(batches)
    results: dict[str, QuantParams] = {}
    was_training = model.training
    model.eval()
    with tqdm(total=total, desc=description, unit="batch", disable=not progress, leave=False) as bar:
        for group in groups:
            for site in group.sites:
                site.quantizer.observe_with(observers[site.name])
            handle = group.end.register_forward_hook(_stop) if group.end is not None else None
            budget = ReplayBudget(REPLAY_BYTES if replay_bytes is None else replay_bytes)
            for site in group.sites:
                observers[site.name].record_for_replay(budget)
            try:
                for pass_index in range(max(observers[s.name].num_passes for s in group.sites)):
                    active = [s for s in group.sites if observers[s.name].needs_pass(pass_index)]
                    if not active:  # every later pass ran on recorded activations
                        bar.update(len(batches))
                        continue
                    for site in active:
                        observers[site.name].begin_pass(pass_index, images.shape[0])
                    for batch in batches:
                        _run_until_stop(model, batch)
                        bar.update(1)
                    for site in active:
                        observers[site.name].end_pass()
            finally:
                if handle is not None:
                    handle.remove()
            for site in group.sites:
                params = observers[site.name].params()
                results[site.name] = params
                if activate:
                    site.quantizer.load(params)
                else:
                    site.quantizer.reset()
    model.train(was_training)
    return results


def _stop(module: nn.Module, args, output) -> None:
    raise _GroupDone


def _run_until_stop(model: nn.Module, batch: torch.Tensor) -> None:
    with contextlib.suppress(_GroupDone):
        forward_images(model, batch)
