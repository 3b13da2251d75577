"""Reading a checkpoint file someone else wrote: safetensors, torch files, OpenAI's TorchScript archives."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """An open_clip checkpoint file's state dict: .safetensors, or a torch file (.bin / .pt: a state
    dict, open_clip_train's {"state_dict": ...} with DDP's "module." prefix, or OpenAI's TorchScript
    archive)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--pretrained {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if not _is_torchscript(path):
                raise ValueError(
                    f"--pretrained {path} is not a readable checkpoint ({type(e).__name__})"
                ) from None
            with warnings.catch_warnings():  # OpenAI's original .pt files are TorchScript archives
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"--pretrained {path} holds no state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): t for k, t in state.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI archives' extras
        state.pop(key, None)
    return state


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") for name in z.namelist())
