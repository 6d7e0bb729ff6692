"""Input checks shared by every op. Each raises before any kernel launch, naming the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    min_dim: int = 0,
    op: str,
) -> None:
    """``t`` is a tensor of one of ``dtypes`` with at least ``min_dim`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimensions, got shape "
                         f"{tuple(t.shape)}")


def check_optional_tensor(name: str, t: object, **kwargs) -> None:
    if t is not None:
        check_tensor(name, t, **kwargs)


def check_same(op: str, attr: str, **tensors: torch.Tensor | None) -> None:
    """All given (non-None) tensors agree on ``attr`` ("device" or "dtype")."""
    given = {k: getattr(v, attr) for k, v in tensors.items() if v is not None}
    if len(set(given.values())) > 1:
        listing = ", ".join(f"{k}={v}" for k, v in given.items())
        raise (RuntimeError if attr == "device" else TypeError)(
            f"{op}: expected all tensors on one {attr}, got {listing}"
        )


def check_shape(op: str, name: str, t: torch.Tensor | None, expected: Sequence[int]) -> None:
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_broadcastable(op: str, name: str, t: torch.Tensor, target: Sequence[int]) -> None:
    """``t`` broadcasts to ``target`` (PyTorch's rules, right-aligned)."""
    ok = t.dim() <= len(target) and all(
        s == 1 or s == d for s, d in zip(reversed(t.shape), reversed(tuple(target)))
    )
    if not ok:
        raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} is not broadcastable to "
                         f"{tuple(target)}")


# Exceptions built only when a check fails: the checks on the hot path are plain comparisons.


def tensor_error(op: str, name: str, t: object) -> TypeError:
    return TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def dtype_error(op: str, name: str, dtype: torch.dtype, dtypes: Sequence[torch.dtype]) -> TypeError:
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    return TypeError(f"{op}: {name} must have dtype in ({names}), got {dtype}")


def shape_error(op: str, name: str, t: torch.Tensor, expected: Sequence[int]) -> ValueError:
    return ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
