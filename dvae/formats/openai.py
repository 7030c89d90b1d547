"""The official DALL·E dVAE weights (`encoder.pkl`, `decoder.pkl` of the `dall_e` package) as a
`DVAE`, without the `dall_e` package and without running code from the files.

The released files are pickled whole modules. `torch.load` would import `dall_e` and could call any
global a file names; here a restricted unpickler maps the few classes those files contain to inert
stand-ins, keeps only their tensors, and refuses every other global. Plain state dicts with the
official key names (`blocks.input.w`, ...) load too. Architecture hyper-parameters are read off the
tensor shapes, so smaller official-format models load as well.
"""

from __future__ import annotations

import pickle
import re
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dvae.model import DVAE

# Classes an official pickle contains: replaced by stand-ins that only hold their attributes.
_MODULE_CLASSES = {
    ("dall_e.encoder", "Encoder"), ("dall_e.encoder", "EncoderBlock"),
    ("dall_e.decoder", "Decoder"), ("dall_e.decoder", "DecoderBlock"),
    ("dall_e.utils", "Conv2d"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.upsampling", "Upsample"),
    ("torch.nn.modules.linear", "Identity"),
}
# Harmless callables the pickles need: containers, devices and torch's tensor rebuilders.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol 2 writes Python 2 names
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
}


class _StandIn:
    """Takes the place of an official module class: keeps the pickled attributes, runs nothing."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _MODULE_CLASSES:
            return type(name, (_StandIn,), {"__module__": f"dvae.formats.openai.standin.{module}"})
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name.endswith("Storage"):  # legacy typed storages
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: an official DALL·E dVAE pickle contains only the "
            "dall_e module classes and tensors, so this file is not one (or has been tampered with)."
        )


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# What torch.load calls: the legacy (pre-zip) format reads its header records with `load` and the zip
# format only uses `Unpickler`, so both must be the restricted one or a plain pickle runs before any check.
restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=_restricted_load,
                                          __name__="dvae.formats.openai.restricted_pickle")


def _collect_tensors(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """Walk a stand-in module tree: its `_parameters` under official names (`blocks.input.w`)."""
    out: dict[str, Tensor] = {}
    for name, tensor in (getattr(obj, "_parameters", None) or {}).items():
        if tensor is not None:
            out[prefix + name] = tensor.detach().clone().float()
    for name, child in (getattr(obj, "_modules", None) or {}).items():
        if child is not None:
            out.update(_collect_tensors(child, f"{prefix}{name}."))
    return out


def read_official(path: str | Path, role: str | None = None) -> dict[str, Tensor]:
    """Official-format tensors from a pickled official module or a state dict with official keys.
    `role` (encoder or decoder) names the file the error messages ask for."""
    path = Path(path)
    wanted = f"{role}.pkl" if role else "encoder.pkl or decoder.pkl"
    if path.is_dir():
        inside = f" ({path / wanted} is there)" if role and (path / wanted).is_file() else ""
        raise ValueError(f"{path} is a directory; pass the file {wanted} itself{inside}.")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the path of {wanted}.")
    with open(path, "rb") as handle:
        head = handle.read(2)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # a zip (torch.save) or a binary pickle
        raise ValueError(f"{path} is not a pickle or PyTorch file (torch.save or pickle.dump output); pass {wanted}.")
    try:
        with warnings.catch_warnings():  # the legacy format checks module source code, which stand-ins lack
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
            # weights_only=False only because torch refuses a custom pickle_module with it; every global and the
            # legacy header go through the restricted unpickler above (tests/test_security.py plants payloads)
            obj = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: {error}") from None
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable PyTorch file ({type(error).__name__}: {error}).") from None
    if isinstance(obj, dict):
        tensors = {k: v.detach().float() for k, v in obj.items() if isinstance(v, Tensor)}
    else:
        tensors = _collect_tensors(obj)
    if "blocks.input.w" not in tensors:
        raise ValueError(f"{path} has no 'blocks.input.w' tensor: it is not an official dVAE encoder or decoder.")
    return tensors


def _architecture(tensors: dict[str, Tensor]) -> dict[str, int]:
    """groups, blocks per group and the widths, read off the official tensors' shapes."""
    groups = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.group_(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    if not groups or not blocks:
        raise ValueError("the tensors have no blocks.group_N.block_M entries: not an official dVAE.")
    return {"groups": len(groups), "blocks_per_group": len(blocks)}


def _kind(tensors: dict[str, Tensor]) -> str:
    """encoder or decoder, by the input convolution: 7x7 over the pixels, or 1x1 over the K codes."""
    weight = tensors["blocks.input.w"]
    return "encoder" if weight.ndim == 4 and weight.shape[-1] > 1 else "decoder"


def _to_ours(tensors: dict[str, Tensor], part: str) -> dict[str, Tensor]:
    """`blocks.x.w` -> `{part}.blocks.x.weight`, `.b` -> `.bias`."""
    renamed = {}
    for key, value in tensors.items():
        stem, leaf = key.rsplit(".", 1)
        renamed[f"{part}.{stem}.{ {'w': 'weight', 'b': 'bias'}[leaf] }"] = value
    return renamed


def to_official(model: DVAE) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(encoder, decoder) state dicts with the official key names, for `dall_e.Encoder/Decoder`."""
    state = model.state_dict()
    parts: dict[str, dict[str, Tensor]] = {"encoder": {}, "decoder": {}}
    for key, value in state.items():
        part, rest = key.split(".", 1)
        if part in parts:
            stem, leaf = rest.rsplit(".", 1)
            parts[part][f"{stem}.{ {'weight': 'w', 'bias': 'b'}[leaf] }"] = value.detach().clone()
    return parts["encoder"], parts["decoder"]


def load_openai(encoder_path: str | Path, decoder_path: str | Path, log_scale_floor: float | None = None) -> DVAE:
    """A `DVAE` with the official encoder's and decoder's weights (learned scale: the official
    decoder outputs mu and ln b). The official decoder has no floor on ln b; ours is applied unless
    `log_scale_floor` says otherwise (pass -inf-like values, e.g. -1e4, for exact parity)."""
    enc = read_official(encoder_path, "encoder")
    dec = read_official(decoder_path, "decoder")
    kinds = (_kind(enc), _kind(dec))
    if kinds == ("decoder", "encoder"):
        raise ValueError(f"{encoder_path} looks like a decoder and {decoder_path} like an encoder: the two files "
                         f"look swapped; pass them the other way round.")
    if kinds != ("encoder", "decoder"):
        raise ValueError(f"{encoder_path} and {decoder_path} both look like {kinds[0]}s (by their input "
                         f"convolution); pass one encoder.pkl and one decoder.pkl.")
    arch = _architecture(enc)
    if _architecture(dec) != arch:
        raise ValueError(f"the encoder ({arch}) and decoder ({_architecture(dec)}) have different architectures.")
    n_hid, channels = enc["blocks.input.w"].shape[:2]
    K = enc["blocks.output.conv.w"].shape[0]
    n_init, dec_K = dec["blocks.input.w"].shape[:2]
    out_channels = dec["blocks.output.conv.w"].shape[0]
    if dec_K != K:
        raise ValueError(f"the encoder has K={K} codes but the decoder reads K={dec_K}: they are not a pair.")
    if out_channels != 2 * channels:
        raise ValueError(f"the decoder outputs {out_channels} maps; expected 2 x {channels} (mu and ln b).")
    kwargs = {} if log_scale_floor is None else {"log_scale_floor": log_scale_floor}
    model = DVAE(channels=channels, n_hid=n_hid, blocks_per_group=arch["blocks_per_group"],
                 groups=arch["groups"], K=K, n_init=n_init, learned_scale=True, **kwargs)
    state = {**_to_ours(enc, "encoder"), **_to_ours(dec, "decoder")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the official tensors do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    return model.eval()
