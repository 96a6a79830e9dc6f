"""Builds each leaf module of the DeepSeek model from GGUF tensors and the placement rule of its name.

Quantized tensors are handed to backends as the reader's QuantTensor views (no copy): a native
backend keeps the blocks in place, the torch backend dequantizes once. Every tensor's shape is
checked against the config, so a GGUF that does not belong to the config fails with both named.
"""

import re

import torch

from ktransformers import kernels
from ktransformers.gguf import row_nbytes
from ktransformers.operators.moe_gate import MoEGate
from ktransformers.operators.registry import build_experts, build_linear

from . import gguf_names
from .config import DeepseekConfig
from .layers import QuantEmbedding, RMSNorm
from .absorbed_kv_b import AbsorbedKVB, HeadWeights, NativeAbsorbedKVB


def expected_shapes(cfg: DeepseekConfig) -> dict[str, tuple]:
    """Leaf name (layer prefix removed) -> the torch-order weight shape the config implies."""
    h, heads, q_head = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
    shared = cfg.moe_intermediate_size * cfg.n_shared_experts
    return {
        "model.embed_tokens": (cfg.vocab_size, h),
        "lm_head": (cfg.vocab_size, h),
        "model.norm": (h,),
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "self_attn.q_proj": (heads * q_head, h),
        "self_attn.q_a_proj": (cfg.q_lora_rank, h),
        "self_attn.q_a_layernorm": (cfg.q_lora_rank,),
        "self_attn.q_b_proj": (heads * q_head, cfg.q_lora_rank),
        "self_attn.kv_a_proj_with_mqa": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
        "self_attn.kv_a_layernorm": (cfg.kv_lora_rank,),
        "self_attn.kv_b_proj": (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "self_attn.k_b": (heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim),
        "self_attn.v_b": (heads, cfg.v_head_dim, cfg.kv_lora_rank),
        "self_attn.o_proj": (h, heads * cfg.v_head_dim),
        "mlp.gate_proj": (cfg.intermediate_size, h),
        "mlp.up_proj": (cfg.intermediate_size, h),
        "mlp.down_proj": (h, cfg.intermediate_size),
        "mlp.gate": (cfg.n_routed_experts, h),
        "mlp.gate.bias": (cfg.n_routed_experts,),
        "mlp.experts.gate": (cfg.n_routed_experts, cfg.moe_intermediate_size, h),
        "mlp.experts.up": (cfg.n_routed_experts, cfg.moe_intermediate_size, h),
        "mlp.experts.down": (cfg.n_routed_experts, h, cfg.moe_intermediate_size),
        "mlp.shared_experts.gate_proj": (shared, h),
        "mlp.shared_experts.up_proj": (shared, h),
        "mlp.shared_experts.down_proj": (h, shared),
    }


class ModuleFactory:
    """`linear/norm/embedding/gate/experts/kv_b(module_name)` -> placed module (stamped with `.placement`)."""

    def __init__(self, gguf_model, cfg: DeepseekConfig, rules, dequantize):
        self.gguf, self.cfg, self.rules, self._dequantize = gguf_model, cfg, rules, dequantize
        self.shapes = expected_shapes(cfg)
        self.source = ", ".join(str(f) for f in gguf_model.files)

    # -- tensors ---------------------------------------------------------------------------------
    def tensor(self, gguf_name: str, module_name: str, shape_key: str):
        t = self.gguf.get(gguf_name)
        if t is None:
            raise ValueError(f"{self.source}: tensor {gguf_name!r} (weights of {module_name}) is missing")
        want = self.shapes[shape_key]
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{self.source}: tensor {gguf_name!r} has shape {tuple(t.shape)} but the config "
                             f"implies {tuple(want)} for {module_name} (config and GGUF do not match)")
        return t

    def dense(self, gguf_name: str, module_name: str, shape_key: str) -> torch.Tensor:
        return self.tensor(gguf_name, module_name, shape_key).dequantize(torch.float32)

    @staticmethod
    def _leaf(module_name: str) -> str:
        return re.sub(r"^model\.layers\.\d+\.", "", module_name)

    def placement(self, module_name: str):
        return self.rules.placement(module_name)

    @staticmethod
    def _stamp(module, placement):
        module.placement = placement
        return module

    # -- modules ---------------------------------------------------------------------------------
    def linear(self, module_name: str):
        p = self.placement(module_name)
        if module_name == "lm_head" and self.cfg.tie_word_embeddings:
            weight = self.tensor(gguf_names.weight_name("model.embed_tokens"), module_name, "lm_head")
        else:
            weight = self.tensor(gguf_names.weight_name(module_name), module_name, self._leaf(module_name))
        bias = self.gguf.get(gguf_names.bias_name(module_name))
        bias = None if bias is None else bias.dequantize(torch.float32)
        module = build_linear(p.backend, weight, bias, p.device, p.dtype, **p.kwargs)
        return self._stamp(module, p)

    def norm(self, module_name: str):
        p = self.placement(module_name)
        weight = self.dense(gguf_names.weight_name(module_name), module_name, self._leaf(module_name))
        return self._stamp(RMSNorm(weight, self.cfg.rms_norm_eps, p.device, p.dtype), p)

    def embedding(self, module_name: str):
        p = self.placement(module_name)
        table = self.tensor(gguf_names.weight_name(module_name), module_name, module_name)
        return self._stamp(QuantEmbedding(table, self._dequantize, p.device, p.dtype), p)

    def gate(self, module_name: str):
        """The router. Its scores must be exact float32 whatever the rule's dtype (a rounding would flip
        near-tied expert choices): the native kernels when the rule says cpu_quant (the GGUF stores the
        router in F32, which they read in place with float32 dots), else the torch reference."""
        p = self.placement(module_name)
        weight = self.tensor(gguf_names.weight_name(module_name), module_name, "mlp.gate")
        backend = "cpu_quant" if p.backend == "cpu_quant" else "torch"
        scorer = self._stamp(build_linear(backend, weight, None, p.device, torch.float32), p)
        bias = None
        if self.cfg.topk_method == "noaux_tc":
            bias = self.dense(gguf_names.gate_bias_name(module_name), module_name, "mlp.gate.bias")
        return self._stamp(MoEGate(scorer, bias, self.cfg, p.device), p)

    def experts(self, module_name: str):
        p = self.placement(module_name)
        stacks = [self.tensor(name, module_name, f"mlp.experts.{part}")
                  for name, part in zip(gguf_names.experts_names(module_name), ("gate", "up", "down"))]
        return self._stamp(build_experts(p.backend, *stacks, p.device, p.dtype, **p.kwargs), p)

    def kv_b(self, module_name: str):
        """Per-head W_UK [H, nope, kv_lora] and W_UV [H, v, kv_lora] from attn_kv_b or attn_k_b + attn_v_b:
        read in place by the native kernels under a CPU cpu_quant rule (absorbed_kv_b.py), else float tensors."""
        p = self.placement(module_name)
        cfg = self.cfg
        fused = gguf_names.weight_name(module_name)
        k_b_name, v_b_name = gguf_names.kv_b_split_names(module_name)
        if fused not in self.gguf and k_b_name not in self.gguf:
            raise ValueError(f"{self.source}: neither {fused!r} nor {k_b_name!r} + {v_b_name!r} "
                             f"(weights of {module_name}) is present")
        native = p.backend == "cpu_quant" and p.device.type == "cpu" and kernels.available()
        if fused in self.gguf:
            kv_b_raw = self.tensor(fused, module_name, "self_attn.kv_b_proj")
            kv_b = kv_b_raw.dequantize(torch.float32)
            kv_b = kv_b.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
            w_uk, w_uv = kv_b.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            if native and kv_b_raw.ggml_type in kernels.supported_types():
                # per head: nope rows of W_UK, then v rows of W_UV, each row kv_lora long
                row_bytes = row_nbytes(kv_b_raw.ggml_type, cfg.kv_lora_rank)
                uv = HeadWeights(torch.from_numpy(kv_b_raw.data[cfg.qk_nope_head_dim * row_bytes:]), kv_b_raw.ggml_type,
                                 cfg.num_attention_heads, cfg.v_head_dim, cfg.kv_lora_rank,
                                 head_stride=(cfg.qk_nope_head_dim + cfg.v_head_dim) * row_bytes)
                uk = HeadWeights.from_float(w_uk.transpose(1, 2).to(p.dtype))  # W_UK's rows reduce over kv_lora here
                return self._stamp(NativeAbsorbedKVB(uk, uv), p)
        else:
            k_b = self.tensor(k_b_name, module_name, "self_attn.k_b")  # [H, kv_lora, nope]
            v_b = self.tensor(v_b_name, module_name, "self_attn.v_b")  # [H, v, kv_lora]
            if native and {k_b.ggml_type, v_b.ggml_type} <= set(kernels.supported_types()):
                uk, uv = (HeadWeights(torch.from_numpy(t.data), t.ggml_type, *t.shape) for t in (k_b, v_b))
                return self._stamp(NativeAbsorbedKVB(uk, uv), p)
            w_uk, w_uv = k_b.dequantize(torch.float32).transpose(1, 2), v_b.dequantize(torch.float32)
        return self._stamp(AbsorbedKVB(w_uk, w_uv, p.device, p.dtype), p)
