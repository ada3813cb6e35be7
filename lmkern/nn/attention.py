"""Drop-in ``torch.nn.MultiheadAttention`` whose attention runs on ``lmkern.scaled_dot_product_attention``.

``MultiheadAttention`` subclasses the torch module and overrides only ``forward``: constructor,
defaults, parameter names, initialization, ``state_dict`` and ``isinstance`` are torch's own, so
``load_state_dict`` works both ways.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as TF
from torch import Tensor

from lmkern import functional as F


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's reading of a bool mask (True = masked) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with the attention computed by ``lmkern.scaled_dot_product_attention``.

    Same constructor, parameters, ``state_dict``, forward signature and outputs as the torch module,
    with torch's mask conventions (opposite to sdpa's for bool masks): a bool ``attn_mask`` or
    ``key_padding_mask`` is True where attention is **not** allowed; float masks are added to the
    scores; ``is_causal`` is a hint that needs ``attn_mask`` (as in torch).

    **Pass ``need_weights=False`` for lmkern's path.** ``need_weights`` defaults to True (torch's
    default) and then the per-head attention matrix must be materialized, so the call falls back to
    torch's own implementation (``torch.nn.MultiheadAttention.forward``, unchanged behaviour and
    outputs). With ``need_weights=False`` the projections run in PyTorch and the attention itself in
    lmkern (``backend``: the class attribute, None for LMKERN_BACKEND or auto; set it per instance).

    Differences from torch with ``need_weights=False``: a query row that may attend no key at all
    (every key masked) gives **zeros** before the output projection (so the output row is
    ``out_proj.bias``), never NaN, and its gradients are zero; torch gives NaN there on some paths.
    Dropout (training, ``dropout > 0``) draws from torch's global RNG but not in torch's order, so
    the dropped entries differ from torch's. Nested-tensor inputs (torch's inference fast path) are
    not supported.
    """

    backend: Optional[str] = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if need_weights:
            # The attention matrix is an output: torch's implementation computes it anyway.
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError(
                "lmkern.nn.MultiheadAttention: nested tensors are not supported (they only run on torch's fast path)"
            )
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        # Work in (N, L, E) whatever the layout.
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None:
            attn_mask = None  # torch trusts the hint here and runs sdpa's own causal mask
        else:
            is_causal = False

        N, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        extra = 0  # key columns appended below (bias_k, zero attention); masks allow them
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            extra += 1
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must both be set or both be None")
        q = q.view(N, L, H, D).transpose(1, 2)
        k = k.view(N, S + extra, H, D).transpose(1, 2)
        v = v.view(N, S + extra, H, D).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, D)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, D)], dim=2)
            extra += 1

        mask = self._merged_mask(attn_mask, key_padding_mask, query.dtype, N, L, S, extra)
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, backend=self.backend
        )
        out = out.transpose(1, 2).reshape(N, L, E)
        out = TF.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """torch's shape rules; returns whether the input is batched."""
        name = "lmkern.nn.MultiheadAttention"
        if query.dim() not in (2, 3):
            raise AssertionError(f"{name}: query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise AssertionError(
                f"{name}: query, key and value must all be {query.dim()}-D, got {key.dim()}-D key and {value.dim()}-D value"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise AssertionError(
                f"{name}: key_padding_mask should be {query.dim() - 1}-D for {query.dim()}-D query, got {key_padding_mask.dim()}-D"
            )
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        elif key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not match value's {value.shape[:-1]}")
        for m, what in ((key_padding_mask, "key_padding_mask"), (attn_mask, "attn_mask")):
            if m is not None and m.dtype != torch.bool and not m.dtype.is_floating_point:
                raise AssertionError(f"only bool and floating types of {what} are supported")
        return batched

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The input projections on (N, *, E) tensors."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (TF.linear(query, self.q_proj_weight, bq), TF.linear(key, self.k_proj_weight, bk),
                    TF.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if query is key and key is value:  # self-attention: one matmul
            q, k, v = TF.linear(query, w, b).chunk(3, dim=-1)
            return q, k, v
        wq, wk, wv = w.chunk(3)
        if key is value:
            k, v = TF.linear(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1)
            return TF.linear(query, wq, bq), k, v
        return TF.linear(query, wq, bq), TF.linear(key, wk, bk), TF.linear(value, wv, bv)

    def _merged_mask(self, attn_mask, key_padding_mask, dtype, N, L, S, extra) -> Optional[Tensor]:
        """attn_mask and key_padding_mask (torch's conventions) as one sdpa mask broadcasting to
        (N, H, L, S + extra): bool (True = attend) when both are bool, else additive float."""
        H = self.num_heads
        am = kpm = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
                am = attn_mask.view(1, 1, L, S)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (N * H, L, S):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(N * H, L, S)}.")
                am = attn_mask.view(N, H, L, S)
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, S):
                raise AssertionError(f"expected key_padding_mask of shape {(N, S)}, got {tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask.view(N, 1, 1, S)
        masks = [m for m in (am, kpm) if m is not None]
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            allowed = ~masks[0] if len(masks) == 1 else ~(masks[0] | masks[1])
            return TF.pad(allowed, (0, extra), value=True) if extra else allowed
        additive = _as_additive(masks[0], dtype) if len(masks) == 1 else _as_additive(masks[0], dtype) + _as_additive(masks[1], dtype)
        return TF.pad(additive, (0, extra), value=0.0) if extra else additive
