"""Layer kinds, described once, so that no method switches on module types itself.

A kind tells how wide a layer's input and output are, how to read its weight as an
``out × in`` matrix (and write one back in the layer's own layout), and where its
output's channels are. A *quantized* layer (a weight stored in integers: bitsandbytes'
packed ``Linear4bit``/``Linear8bitLt``, torchao's int8 tensors) is recognised by its
weight alone (:func:`is_quantized`), never by its class: its widths come from
``in_features``/``out_features``, and new tensors take its compute dtype
(:func:`compute_dtype`), never its storage dtype. Activation-space methods on arbitrary modules (a ``LlamaMLP``, a
whole decoder layer) get their width from :func:`hidden_width`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .errors import SpecError, UnsupportedModuleError

LINEAR = "linear"
CONV1D_GPT2 = "conv1d_gpt2"
EMBEDDING = "embedding"
CONV = "conv"
NORM = "norm"


def is_conv1d_gpt2(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` without importing transformers."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D``: a dense map of the last dimension."""
    return isinstance(module, nn.Linear) or is_conv1d_gpt2(module)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: named ``*Norm*`` with a 1-D ``weight`` (and maybe a ``bias``).

    Covers LayerNorm, RMSNorm, BatchNorm, GroupNorm and the models' own (LlamaRMSNorm,
    T5LayerNorm, ...) without naming any of them.
    """
    weight = getattr(module, "weight", None)
    return (
        "Norm" in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.dim() == 1
    )


def is_quantized(tensor: torch.Tensor) -> bool:
    """True for a tensor whose values are stored in integers: a packed weight (uint8 for
    bitsandbytes' 4-bit, int8 for its 8-bit) or a tensor subclass holding one inside
    (torchao's ``Int8Tensor`` reports a float dtype and keeps int8 ``qdata``).

    Example:
        >>> is_quantized(torch.zeros(4, 1, dtype=torch.uint8)), is_quantized(torch.zeros(2))
        (True, False)
    """
    if not tensor.is_floating_point():
        return True
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return False
    names, _ = flatten()
    inner = (getattr(tensor, name, None) for name in names)
    return any(isinstance(t, torch.Tensor) and is_quantized(t) for t in inner)


def quantized_weight(module: nn.Module) -> str | None:
    """How the module's quantized weight is stored (for error messages), or None when its
    weight is floating (or it has none).

    Example:
        >>> quantized_weight(torch.nn.Linear(2, 2)) is None
        True
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not is_quantized(weight):
        return None
    return f"a quantized weight ({type(weight).__name__}, stored as {weight.dtype})"


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The floating dtype a layer computes in, for the tensors a delta adds to it.

    For a quantized layer: its declared ``compute_dtype`` (bitsandbytes' 4-bit layers set
    it from ``bnb_4bit_compute_dtype``), else its first floating tensor (a bias; torchao's
    weights report the dtype they dequantise to). For other layers, their first floating
    tensor (the weight). None when none tells (the caller's default dtype applies, as
    PEFT keeps adapters on a quantized layer in float32).

    Example:
        >>> compute_dtype(torch.nn.Linear(2, 2).half())
        torch.float16
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and is_quantized(weight):
        declared = getattr(module, "compute_dtype", None)
        if isinstance(declared, torch.dtype) and declared.is_floating_point:
            return declared
    first = next(
        (t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None
    )
    return None if first is None else first.dtype


def kind_of(module: nn.Module) -> str | None:
    """The kind of a layer, or None for a module no kind describes."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if is_conv1d_gpt2(module):
        return CONV1D_GPT2
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if is_norm(module):
        return NORM
    return None


def widths(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a layer's weight read as a matrix (a conv's ``in`` counts its kernel).

    An embedding's "input" is its vocabulary; a norm maps its width to itself.
    """
    kind = kind_of(module)
    if kind is None:
        return None
    weight = module.weight
    if kind == LINEAR:
        if is_quantized(weight):  # packed storage: its shape is not the layer's
            return module.in_features, module.out_features
        return weight.shape[1], weight.shape[0]
    if kind in (CONV1D_GPT2, EMBEDDING):
        return weight.shape[0], weight.shape[1]
    if kind == CONV:
        return weight[0].numel(), weight.shape[0]
    return weight.shape[0], weight.shape[0]


def output_width(module: nn.Module) -> int | None:
    """The size of the last dimension of the module's output, where its kind tells it."""
    kind = kind_of(module)
    if kind in (LINEAR, CONV1D_GPT2, EMBEDDING, NORM):
        return widths(module)[1]
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:  # no affine weight
        return module.normalized_shape[-1]
    return None


def channel_dim(module: nn.Module) -> int:
    """Which dimension of the module's output holds its channels.

    -1 (the last) for Linear, GPT-2 Conv1D, Embedding and LayerNorm/RMSNorm-like norms;
    channels-first layers count from the end where they accept unbatched input (a
    ``Conv2d``: -3, for ``(N, C, H, W)`` and ``(C, H, W)`` alike; an ``InstanceNorm2d``
    likewise), and batch/group norms, which always have a batch dimension, say 1.

    Example:
        >>> import torch
        >>> channel_dim(torch.nn.Conv2d(3, 4, 3)), channel_dim(torch.nn.BatchNorm1d(4))
        (-3, 1)
    """
    if kind_of(module) == CONV:
        return 1 - module.weight.dim()
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return -module._get_no_batch_dim()
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return 1
    return -1


def along_channels(vector: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """``vector`` (one value per channel) shaped to broadcast over dimension ``dim`` of an
    ``ndim``-dimensional tensor (``dim`` as :func:`channel_dim` gives it).

    Example:
        >>> along_channels(torch.ones(4), 1, 4).shape
        torch.Size([4, 1, 1])
    """
    trailing = -dim - 1 if dim < 0 else ndim - dim - 1
    return vector if trailing == 0 else vector.view(-1, *([1] * trailing))


def to_weight_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """An ``out × in`` matrix in the layout of the module's own weight."""
    kind = kind_of(module)
    if kind in (CONV1D_GPT2, EMBEDDING):
        return matrix.t()
    if kind == CONV:
        return matrix.reshape(module.weight.shape)
    return matrix


def hidden_width(
    path: str, module: nn.Module, root: nn.Module, hidden_size: int | None = None
) -> int:
    """The width of a module's hidden state, for methods that act on its activations.

    In order: ``hidden_size`` given by the spec, the width the layer kind tells, the
    output width of the module's last Linear/Conv1D, the root's ``config.hidden_size``.

    Example:
        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        >>> hidden_width("mlp", mlp, mlp)
        4
    """
    if hidden_size is not None:
        return hidden_size
    width = output_width(module)
    if width is not None:
        return width
    last = None
    for sub in module.modules():
        if is_linear_like(sub):
            last = sub
    if last is not None:
        return output_width(last)
    config_width = getattr(getattr(root, "config", None), "hidden_size", None)
    if isinstance(config_width, int) and not isinstance(config_width, bool):
        return config_width
    raise SpecError(
        f"cannot tell the hidden width of {path or '<root>'!r} ({type(module).__name__}): it "
        "has no Linear layer and the model has no config.hidden_size; pass hidden_size=..."
    )


def input_width(
    path: str, module: nn.Module, root: nn.Module, hidden_size: int | None = None
) -> int:
    """The width of the last dimension of a module's first input, for methods that read it.

    In order: the width the layer kind tells (``in_features``, a norm's width),
    ``hidden_size`` given by the spec, the input width of the module's first
    Linear/Conv1D (a BERT ``output`` block reads the FFN's intermediate activations,
    not ``config.hidden_size``), the root's ``config.hidden_size``.

    Example:
        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.LayerNorm(4))
        >>> input_width("mlp", mlp, mlp)
        16
    """
    kind = kind_of(module)
    if kind in (LINEAR, CONV1D_GPT2, NORM):
        return widths(module)[0]
    if kind is not None:
        raise UnsupportedModuleError(
            f"the input of {path or '<root>'!r} ({type(module).__name__}) is not a "
            "(..., width) tensor (token ids, or channels first); target another module"
        )
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:  # no affine weight
        return module.normalized_shape[-1]
    if hidden_size is not None:
        return hidden_size
    first = next((sub for sub in module.modules() if is_linear_like(sub)), None)
    if first is not None:
        return widths(first)[0]
    config_width = getattr(getattr(root, "config", None), "hidden_size", None)
    if isinstance(config_width, int) and not isinstance(config_width, bool):
        return config_width
    raise SpecError(
        f"cannot tell the input width of {path or '<root>'!r} ({type(module).__name__}): it "
        "has no Linear layer and the model has no config.hidden_size; pass hidden_size=..."
    )
