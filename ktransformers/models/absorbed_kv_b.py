"""MLA's kv_b_proj split per head and absorbed: W_UK [H, nope, kv_lora] maps query heads into latent
space, W_UV [H, v, kv_lora] maps the attention's latent output to values (see mla.py).

Both forms answer `absorb_query(q_nope [T, H, nope]) -> [H, T, kv_lora]` and
`expand_values(latent [H, T, kv_lora]) -> [T, H, v]`; AbsorbedKVB also expands cache rows into
per-head keys and values (`expand_keys_values`) for long GPU prefill chunks (mla.py):

- AbsorbedKVB: float tensors and torch.bmm (GPU placements, and the CPU without native kernels);
- NativeAbsorbedKVB: the CPU rules' cpu_quant form, per-head products on the native kernel pool
  (kernels.head_linear) straight from the GGUF blocks, so no float copy of them exists. Files with
  attn_k_b + attn_v_b give both matrices in place; an older file's fused attn_kv_b gives W_UV in
  place, and W_UK (stored transposed there) as a float copy in the rule's dtype.
"""

import torch
from torch import nn

from ktransformers import kernels
from ktransformers.gguf import row_nbytes


class AbsorbedKVB(nn.Module):
    """W_UK [H, nope, kv_lora] and W_UV [H, v, kv_lora] as float tensors in the kv_b_proj rule's dtype."""

    def __init__(self, w_uk: torch.Tensor, w_uv: torch.Tensor, device, dtype):
        super().__init__()
        w_uk, w_uv = w_uk.to(device=device, dtype=dtype), w_uv.to(device=device, dtype=dtype)
        if w_uk.device.type == "cpu":
            # The CPU multiplies weight @ vector per head, which streams at memory bandwidth only when
            # the reduced dimension is contiguous: W_UK's storage becomes [H, kv_lora, nope].
            w_uk, w_uv = w_uk.transpose(1, 2).contiguous().transpose(1, 2), w_uv.contiguous()
        self.register_buffer("w_uk", w_uk)
        self.register_buffer("w_uv", w_uv)

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        w_uk = self.w_uk
        if w_uk.device.type == "cpu":  # weight on the left: a bandwidth-bound product at decode
            return torch.bmm(w_uk.transpose(1, 2), q_nope.to(w_uk.dtype).permute(1, 2, 0)).transpose(1, 2)
        return torch.bmm(q_nope.to(w_uk.dtype).transpose(0, 1), w_uk)

    def expand_values(self, latent: torch.Tensor) -> torch.Tensor:
        w_uv = self.w_uv
        if w_uv.device.type == "cpu":
            return torch.bmm(w_uv, latent.to(w_uv.dtype).transpose(1, 2)).permute(2, 0, 1)
        return torch.bmm(latent.to(w_uv.dtype), w_uv.transpose(1, 2)).transpose(0, 1)

    def expand_keys_values(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [S, kv_lora] -> (keys' nope part [S, H, nope], values [S, H, v]): one matmul each."""
        heads, _, width = self.w_uk.shape
        latent = latent.to(self.w_uk.dtype)
        keys = latent @ self.w_uk.reshape(-1, width).T
        values = latent @ self.w_uv.reshape(-1, width).T
        return keys.view(latent.shape[0], heads, -1), values.view(latent.shape[0], heads, -1)

    def extra_repr(self):
        return f"w_uk={tuple(self.w_uk.shape)}, w_uv={tuple(self.w_uv.shape)}, dtype={self.w_uk.dtype}"


class HeadWeights:
    """H matrices of `rows` x `cols` in one buffer of rows (raw GGUF blocks or a float tensor's bytes),
    head h starting at byte h * head_stride; calling it on x [H, T, cols] gives [H, T, rows]."""

    def __init__(self, raw: torch.Tensor, ggml_type, heads: int, rows: int, cols: int, head_stride: int | None = None):
        self.raw, self.ggml_type, self.heads, self.rows, self.cols = raw, ggml_type, heads, rows, cols
        self.head_stride = heads and (head_stride or rows * row_nbytes(ggml_type, cols))
        # checks type, sizes and bounds once, here; each product then goes straight to the extension
        kernels.head_linear(torch.zeros(heads, 1, cols), raw, ggml_type, heads, rows, cols, self.head_stride)
        self._raw_np, self._kernels, self._row_bytes = raw.numpy(), kernels.require(), row_nbytes(ggml_type, cols)

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "HeadWeights":
        w = w.contiguous()
        return cls(w.view(torch.uint8).reshape(-1), kernels.FLOAT_WEIGHT_TYPES[w.dtype], *w.shape)

    @property
    def native_args(self) -> tuple:
        """(raw, ggml type, rows, cols, row_bytes, head_stride): the form native calls take a stack in."""
        return self._raw_np, int(self.ggml_type), self.rows, self.cols, self._row_bytes, self.head_stride

    @property
    def nbytes(self) -> int:
        """Weight bytes one product streams."""
        return self.heads * self.rows * row_nbytes(self.ggml_type, self.cols)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [H, T, cols] (any float dtype) -> float32 [H, T, rows]; with `out` (contiguous float32
        [H, T, width >= rows]) the products fill its first `rows` columns and `out` is returned."""
        if x.dim() != 3 or x.shape[0] != self.heads or x.shape[2] != self.cols:
            raise ValueError(f"per-head weights [{self.heads}, {self.rows}, {self.cols}] got input {tuple(x.shape)}")
        x = x.to(torch.float32).contiguous()
        if out is None:
            out = torch.empty(self.heads, x.shape[1], self.rows, dtype=torch.float32)
        elif out.shape[:2] != x.shape[:2] or out.shape[2] < self.rows or not out.is_contiguous() \
                or out.dtype != torch.float32:
            raise ValueError(f"per-head weights [{self.heads}, {self.rows}, {self.cols}] cannot write into "
                             f"{tuple(out.shape)} {out.dtype}")
        self._kernels.head_linear(x.numpy(), x.shape[1], self._raw_np, int(self.ggml_type), self.heads, self.rows,
                                  self.cols, self._row_bytes, self.head_stride, out.numpy(), out.shape[2])
        return out


class NativeAbsorbedKVB(nn.Module):
    """W_UK stored [H, kv_lora, nope] (rows reduce over nope) and W_UV [H, v, kv_lora] as HeadWeights."""

    def __init__(self, w_uk: HeadWeights, w_uv: HeadWeights):
        super().__init__()
        self.w_uk, self.w_uv = w_uk, w_uv

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        return self.w_uk(q_nope.transpose(0, 1))

    def expand_values(self, latent: torch.Tensor) -> torch.Tensor:
        return self.w_uv(latent).transpose(0, 1)

    def decode_step(self, q: torch.Tensor, kv: torch.Tensor, norm, rope_pairs: torch.Tensor, interleaved: bool,
                    cache: torch.Tensor, position: int, scale: float) -> torch.Tensor:
        """One decode token of MLA in one native call (kernels' mla_decode): q [1, H * (nope + rope)] (q_b_proj's
        output), kv [1, kv_lora + rope] (kv_a_proj_with_mqa's), `norm` the kv_a_layernorm, rope_pairs float32
        [max_context, rope / 2, 2], cache one slot's float32 rows [max_context, kv_lora + rope] -> o_proj's
        input [1, H * v]. Writes the cache row at `position`; attends to rows 0..position. The same kernels
        in the same order as the separate calls, so the same bits."""
        uk, uv = self.w_uk, self.w_uv
        out = torch.empty(1, uv.heads * uv.rows)
        uk._kernels.mla_decode(q.numpy(), kv.numpy(), uk.heads, uk.cols, rope_pairs.shape[1] * 2, uk.rows,
                               norm.weight.numpy(), float(norm.eps), rope_pairs.numpy(), bool(interleaved),
                               uk.native_args, uv.native_args, uv.rows, cache.numpy(), int(position), float(scale),
                               out.numpy())
        return out

    def extra_repr(self):
        return ", ".join(f"{name}=[{w.heads}, {w.rows}, {w.cols}] {w.ggml_type.name}"
                         for name, w in (("w_uk", self.w_uk), ("w_uv", self.w_uv)))
