"""load_model: GGUF file(s) (+ optional Hugging Face config/tokenizer dir) -> a placed, ready DeepSeek model."""

import logging
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig

from ktransformers import kernels
from ktransformers.gguf import dequantize, open_gguf
from ktransformers.optimize.optimize import Rules, default_rules_path
from ktransformers.util.cuda_graph import StaticDecoder, step_devices

from .config import DeepseekConfig, config_from_gguf, load_hf_config
from .deepseek_v3 import DeepseekV3ForCausalLM
from .hybrid_moe import enable_overlap, streamed_prefill_chunk, streams_prefill_experts
from .module_factory import ModuleFactory
from .tokenizer_from_gguf import tokenizer_from_gguf

log = logging.getLogger(__name__)

# Fields that decide tensor shapes or the layer structure: config.json and GGUF must agree on them.
STRUCTURAL_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "kv_lora_rank",
                     "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                     "n_shared_experts", "first_k_dense_replace", "moe_intermediate_size", "intermediate_size")


@dataclass
class LoadedModel:
    model: DeepseekV3ForCausalLM
    tokenizer: object  # a transformers fast tokenizer
    config: DeepseekConfig
    generation_config: GenerationConfig


def _check_config_matches(cfg: DeepseekConfig, gguf_cfg: DeepseekConfig, config_source: str, gguf_source: str):
    diffs = [f"{name}: config says {getattr(cfg, name)!r}, GGUF says {getattr(gguf_cfg, name)!r}"
             for name in STRUCTURAL_FIELDS if getattr(cfg, name) != getattr(gguf_cfg, name)]
    if diffs:
        raise ValueError(f"{config_source} does not match {gguf_source}: " + "; ".join(diffs))


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported; use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def load_model(gguf_path, model_path=None, optimize_config_path=None, device=None, max_context: int = 4096,
               cpu_infer: int | None = None, cuda_graphs: bool = True, max_batch: int | None = 1) -> LoadedModel:
    """Load a DeepSeek V2/V3/R1 GGUF.

    model_path: directory with the Hugging Face config.json, tokenizer files and generation_config.json;
        when None, config, tokenizer and chat template are rebuilt from the GGUF metadata.
    optimize_config_path: placement rules YAML; default DeepSeek-V3-Chat.yaml with a GPU, else -cpu.yaml.
    device: the cuda device that rules saying "cuda" mean (default cuda when available, else cpu).
    cpu_infer: CPU threads for the CPU-side work (torch's and the native kernels' thread pools); default
        KT_CPU_INFER, else the physical cores. With a GPU in the placement, one of them is the thread
        that drives the GPU, so the native pool gets one fewer (`_leave_a_core_for_the_gpu_thread`).
    cuda_graphs: replay one-token decode steps as CUDA graphs (util/cuda_graph.StaticDecoder).
        When the rules place anything on cuda, the MoE blocks overlap CPU routed experts with the GPU
        shared experts; when a step's modules (all but routed experts and embedding) sit on one cuda
        device, one-token forwards go through StaticDecoder (whole-layer graphs if cuda_graphs, else eager
        static steps). Other placements decode with the model's own eager forward.
    max_batch: sequences the KV cache holds at once (cache slots), i.e. the most a batched decode
        step (`model.decode`) runs together. Each slot costs max_context cache rows per layer; None
        picks as many as fit in a tenth of the attention device's memory, at most 8 (`auto_max_batch`).
    """
    gguf_model = open_gguf(gguf_path)
    gguf_source = ", ".join(str(f) for f in gguf_model.files)
    gguf_cfg = config_from_gguf(gguf_model.metadata, gguf_model.tensors.keys(), gguf_source)
    if model_path is not None:
        cfg = load_hf_config(model_path)
        _check_config_matches(cfg, gguf_cfg, str(Path(model_path) / "config.json"), gguf_source)
    else:
        cfg = gguf_cfg
    if max_context > cfg.max_position_embeddings:
        log.warning("max_context %d exceeds the model's max_position_embeddings %d", max_context,
                    cfg.max_position_embeddings)

    device = _resolve_device(device)
    rules_path = optimize_config_path or default_rules_path(device.type == "cuda")
    rules = Rules.from_file(rules_path, cuda_device=str(device) if device.type == "cuda" else "cuda")
    if cpu_infer:
        _set_cpu_threads(int(cpu_infer))

    factory = ModuleFactory(gguf_model, cfg, rules, dequantize)
    attention = factory.placement("model.layers.0.self_attn")
    if max_batch is None:
        max_batch = auto_max_batch(cfg, max_context, attention.device, attention.dtype)
    log.info("KV cache: %d slot(s) x %d tokens, %.2f GB on %s", max_batch, max_context,
             max_batch * slot_bytes(cfg, max_context, attention.dtype) / 1e9, attention.device)
    with tqdm(total=cfg.num_hidden_layers, desc="loading layers", unit="layer") as progress:
        model = DeepseekV3ForCausalLM(cfg, factory, max_context, progress=progress, n_slots=max_batch)
    model.eval()
    # Weights are used in place from the map: fault their pages in now, not inside the first tokens' kernels.
    if not gguf_model.populate():
        log.info("could not prefault %s (Linux 5.14+ does): the first use of each weight page will fault", gguf_source)
    _set_up_gpu_decode(model, cuda_graphs, int(cpu_infer) if cpu_infer else None)

    if model_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        generation_config = _generation_config_from_dir(model_path, cfg)
    else:
        tokenizer = tokenizer_from_gguf(gguf_model.metadata, gguf_source)
        generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    return LoadedModel(model, tokenizer, cfg, generation_config)


def slot_bytes(cfg: DeepseekConfig, max_context: int, dtype: torch.dtype) -> int:
    """Bytes of one sequence's compressed KV cache (every layer, max_context rows)."""
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return cfg.num_hidden_layers * max_context * width * torch.empty(0, dtype=dtype).element_size()


def auto_max_batch(cfg: DeepseekConfig, max_context: int, device: torch.device, dtype: torch.dtype,
                   share: float = 0.1, most: int = 8) -> int:
    """Cache slots that fit in `share` of the device's memory (the GPU's, or host RAM), 1..`most`."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = psutil.virtual_memory().total
    return max(1, min(most, int(share * total // slot_bytes(cfg, max_context, dtype))))


def _set_up_gpu_decode(model, cuda_graphs: bool, cpu_threads: int | None = None):
    if not any(m.placement.device.type == "cuda" for m in model.modules() if hasattr(m, "placement")):
        return  # CPU only: the model's forward, torch and the native pool take turns on the cores
    _leave_a_core_for_the_gpu_thread(cpu_threads)
    enable_overlap(model)
    if streams_prefill_experts(model) and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(model.model.layers[0].self_attn.device)
        model.prefill_chunk = streamed_prefill_chunk(free, model.prefill_chunk)
        log.info("prefill chunks of %d tokens (routed experts of long chunks stream to the GPU; %.1f GB free)",
                 model.prefill_chunk, free / 1e9)
    devices = step_devices(model)
    if len(devices) == 1 and next(iter(devices)).type == "cuda":
        model.step_decoder = StaticDecoder(model, use_cuda_graph=cuda_graphs)
    else:
        log.warning("decoding with the model's eager forward (no CUDA graphs): the placement spreads a decode step "
                    "over %s", ", ".join(f"{name} on {device}" for device, name in devices.items()))


def _leave_a_core_for_the_gpu_thread(cpu_threads: int | None):
    """A hybrid step's Python thread queues GPU work while the routed experts run on the native pool:
    with a pool thread on every core, one worker shares its core, and the whole expert call waits for
    that worker. H200 host, 16 Sapphire Rapids cores, Q4_K_M 1 dense + 2 MoE layers: a decode step
    took 7.1 ms with 16 pool threads, 6.7 ms with 15 (llama.cpp's -t 16 counts its main thread too)."""
    if kernels.available():
        threads = cpu_threads or kernels.default_threads()
        kernels.set_num_threads(max(1, threads - 1))


def _set_cpu_threads(n: int):
    if n <= 0:
        raise ValueError(f"cpu_infer must be a positive thread count, got {n}")
    torch.set_num_threads(n)
    if kernels.available():
        kernels.set_num_threads(n)


def _generation_config_from_dir(model_path, cfg: DeepseekConfig) -> GenerationConfig:
    if (Path(model_path) / "generation_config.json").exists():
        return GenerationConfig.from_pretrained(model_path)
    return GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
