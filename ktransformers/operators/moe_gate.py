"""MoE router of DeepSeek V2 (softmax; greedy or group-limited greedy) and V3/R1 (sigmoid + bias; noaux_tc)."""

import torch
from torch import nn

from ktransformers import kernels


class MoEGate(nn.Module):
    """Scores experts in float32 and returns (topk_ids int64 [T, k], topk_weights float32 [T, k]).

    `scorer` is a linear backend over the router weight (n_experts, hidden), built in float32: "torch"
    keeps a dense copy; on the CPU "cpu_quant" reads the GGUF's F32 rows in place with the native
    pool, which a decode step has just used (torch's matmul there had to wake its own threads and
    fight the pool's spinning ones: 0.31 ms vs 0.09 ms per layer on a 16-core VM).
    The weights are not multiplied by routed_scaling_factor; the MoE block scales the experts' sum.
    """

    def __init__(self, scorer: nn.Module, bias: torch.Tensor | None, cfg, device):
        super().__init__()
        self.scorer = scorer
        self.device = torch.device(device)
        self.register_buffer("e_score_correction_bias",
                             None if bias is None else bias.to(device=device, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.scoring_func, self.topk_method, self.norm_topk_prob = cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob
        if self.topk_method == "noaux_tc" and bias is None:
            raise ValueError("noaux_tc routing needs the e_score_correction_bias tensor (exp_probs_b)")

    def _group_mask(self, choice: torch.Tensor, group_score) -> torch.Tensor:
        """Boolean [T, E]: experts inside the topk_group best groups."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        best_groups = group_score(grouped).topk(self.topk_group, dim=-1).indices
        keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=choice.device)
        keep.scatter_(1, best_groups, True)
        return keep[:, :, None].expand_as(grouped).reshape_as(choice)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.scorer(x.to(self.device, torch.float32))
        if logits.device.type == "cpu" and kernels.available():  # one native call instead of ~15 small torch ops
            return kernels.moe_route(logits, self.e_score_correction_bias, self.topk_method,
                                     self.scoring_func == "sigmoid", self.n_group, self.topk_group, self.top_k,
                                     self.norm_topk_prob)
        return self.route_torch(logits)

    def route_torch(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The choice in torch ops (any device): the reference the native router is tested against."""
        if self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)

        if self.topk_method == "noaux_tc":
            # the bias only steers the choice; the weights come from the unbiased scores
            choice = scores + self.e_score_correction_bias
            keep = self._group_mask(choice, lambda g: g.topk(2, dim=-1).values.sum(-1))
            ids = choice.masked_fill(~keep, float("-inf")).topk(self.top_k, dim=-1).indices
        elif self.topk_method == "group_limited_greedy":
            keep = self._group_mask(scores, lambda g: g.max(dim=-1).values)
            ids = scores.masked_fill(~keep, 0.0).topk(self.top_k, dim=-1).indices
        else:  # greedy
            ids = scores.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights
