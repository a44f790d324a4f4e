"""A real-weight mixture of experts from a dense Llama-style model (MoEfication, Zhang et al., ACL Findings 2022).

No pretrained MoE ships offline, so the MoE code paths are measured on one built from SmolLM2: each block's MLP
neurons are split into ``num_experts`` equal groups, each group becoming one expert of a Mixtral-layout model
(attention, norms, embeddings copied). ``neuron_groups`` clusters neurons whose contributions rise and fall together
(balanced k-means on the cosine similarity of |h_j| * ||W_down[:, j]|| over calibration tokens); without it the groups
are contiguous. An expert's down projection is scaled by ``top_k`` and the router's logits are
scaled by ``temperature``: with a small temperature the softmax over the chosen experts is nearly uniform (each weight
~1/top_k), so the block adds the chosen groups' contributions as the dense MLP would.

- ``router=None`` and ``top_k = num_experts``: a zero router gives every expert weight exactly 1/E, so the MoE
  reproduces the dense model (up to floating-point summation order).
- a fitted router (``fit_routers``): per block, a ridge regression from the MLP's input to the norm of each group's
  contribution on calibration tokens; top-k then picks the groups expected to contribute most.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def mixtral_config(dense_config, num_experts: int, top_k: int):
    """The Mixtral config with the dense model's attention, norms and vocabulary and E experts of I / E neurons."""
    from transformers import MixtralConfig

    c = dense_config
    if c.intermediate_size % num_experts:
        raise ValueError(f"intermediate_size {c.intermediate_size} is not divisible by num_experts={num_experts}")
    return MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size // num_experts,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=getattr(c, "rope_parameters", None),
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=getattr(c, "pad_token_id", None),
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        router_jitter_noise=0.0,
    )


@torch.no_grad()
def moefy(
    dense: nn.Module,
    num_experts: int,
    top_k: int,
    routers: list[torch.Tensor] | None = None,
    temperature: float = 1.0,
    groups: list[torch.Tensor] | None = None,
) -> nn.Module:
    """A MixtralForCausalLM holding ``dense``'s weights with each MLP split into ``num_experts`` experts.

    Args:
        dense: a Llama-layout causal LM (q/k/v/o, gate/up/down, RMSNorm).
        num_experts: experts per block (the MLP width must divide by it).
        top_k: experts per token.
        routers: one (E, H) router weight per block (``fit_routers``); None: zero routers (uniform weights, exact
            only with ``top_k == num_experts``).
        temperature: multiplies the router weights (small: nearly uniform weights among the chosen experts).
        groups: per block, a permutation of the MLP neurons; expert e takes its e-th slice (``neuron_groups``).
    """
    from transformers import MixtralForCausalLM

    config = mixtral_config(dense.config, num_experts, top_k)
    with torch.device("meta"):
        moe = MixtralForCausalLM(config)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    width = config.intermediate_size
    for i, layer in enumerate(dense.model.layers):
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        if groups is not None:
            gate, up, down = gate[groups[i]], up[groups[i]], down[:, groups[i]]
        gate_up = [
            torch.cat([gate[e * width : (e + 1) * width], up[e * width : (e + 1) * width]]) for e in range(num_experts)
        ]
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "experts.gate_up_proj"] = torch.stack(gate_up)
        state[prefix + "experts.down_proj"] = torch.stack(
            [down[:, e * width : (e + 1) * width] * top_k for e in range(num_experts)]
        )
        router = routers[i] if routers is not None else torch.zeros(num_experts, config.hidden_size)
        state[prefix + "gate.weight"] = (router * temperature).to(gate.dtype)
    moe.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings:
        moe.tie_weights()
    missing = [n for n, p in moe.named_parameters() if p.device.type == "meta"]
    if missing:
        raise RuntimeError(f"moefy left parameters unset: {missing[:3]}")
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config=config)  # its tables are computed, not loaded
    for name, buffer in list(moe.named_buffers()):
        if buffer.device.type == "meta":
            raise RuntimeError(f"moefy left buffer {name} on meta")
    return moe.eval()


@torch.no_grad()
def fit_routers(
    dense: nn.Module,
    windows: torch.Tensor,
    num_experts: int,
    groups: list[torch.Tensor] | None = None,
    ridge: float = 1e-2,
) -> list[torch.Tensor]:
    """Per block, the (E, H) linear map from the MLP's input to the norm of each neuron group's contribution,
    fitted by ridge regression on the calibration ``windows`` (one dense forward each), scaled so its logits have
    unit root mean square on them (``moefy``'s ``temperature`` then sets how far from uniform the weights are)."""
    layers = dense.model.layers
    hidden = dense.config.hidden_size
    width = dense.config.intermediate_size // num_experts
    xtx = [torch.zeros(hidden, hidden, dtype=torch.float64) for _ in layers]
    xty = [torch.zeros(hidden, num_experts, dtype=torch.float64) for _ in layers]
    tokens = [0]

    def make_hook(i: int, mlp: nn.Module):
        def hook(module, args):
            x = args[0].reshape(-1, hidden).float()
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            down = mlp.down_proj.weight.float()
            if groups is not None:
                h, down = h[:, groups[i]], down[:, groups[i]]
            target = torch.stack(
                [
                    (h[:, e * width : (e + 1) * width] @ down[:, e * width : (e + 1) * width].t()).norm(dim=-1)
                    for e in range(num_experts)
                ],
                dim=-1,
            )
            xtx[i] += (x.t() @ x).double()
            xty[i] += (x.t() @ target).double()
            if i == 0:
                tokens[0] += x.shape[0]

        return hook

    _run_mlp_hooks(dense, windows, make_hook, "moefy: fitting routers")
    routers = []
    for a, b in zip(xtx, xty):
        damp = ridge * a.diagonal().mean() * torch.eye(hidden, dtype=torch.float64)
        w = torch.linalg.solve(a + damp, b).t()
        rms = ((w @ a) * w).sum(-1).mean().div(tokens[0]).sqrt()  # root mean square of the logits on calibration
        routers.append((w / rms.clamp(min=1e-12)).float())
    return routers


def _run_mlp_hooks(dense: nn.Module, windows: torch.Tensor, make_hook, desc: str) -> None:
    layers = dense.model.layers
    handles = [layer.mlp.register_forward_pre_hook(make_hook(i, layer.mlp)) for i, layer in enumerate(layers)]
    try:
        for row in tqdm(windows, desc=desc, leave=False):
            dense(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def neuron_groups(dense: nn.Module, windows: torch.Tensor, num_experts: int, seed: int = 0) -> list[torch.Tensor]:
    """Per block, a permutation of the MLP neurons that puts co-activated neurons in the same expert."""
    size = dense.config.intermediate_size
    gram = [torch.zeros(size, size, dtype=torch.float64) for _ in dense.model.layers]

    def make_hook(i: int, mlp: nn.Module):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            h = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs() * mlp.down_proj.weight.float().norm(dim=0)
            gram[i] += (h.t() @ h).double()

        return hook

    _run_mlp_hooks(dense, windows, make_hook, "moefy: neuron co-activation")
    generator = torch.Generator().manual_seed(seed)
    return [balanced_kmeans(g, num_experts, generator) for g in gram]


def balanced_kmeans(gram: torch.Tensor, k: int, generator: torch.Generator, iters: int = 15) -> torch.Tensor:
    """Split the n items of a Gram matrix into k clusters of n / k by cosine similarity; return the items ordered
    cluster by cluster (a permutation)."""
    d = gram.diagonal().sqrt().clamp(min=1e-12)
    cos = (gram / d[:, None] / d[None, :]).float()
    n = cos.shape[0]
    size = n // k
    assign = torch.randperm(n, generator=generator) % k
    for _ in range(iters):
        centroids = torch.stack([cos[assign == c].mean(0) for c in range(k)])
        score = cos @ centroids.t()
        order = torch.argsort(score.max(1).values - score.min(1).values, descending=True)  # decided items first
        capacity = [size] * k
        new = torch.empty(n, dtype=torch.long)
        for j in order.tolist():
            for c in torch.argsort(score[j], descending=True).tolist():
                if capacity[c]:
                    new[j] = c
                    capacity[c] -= 1
                    break
        if torch.equal(new, assign):
            break
        assign = new
    return torch.cat([(assign == c).nonzero().squeeze(1) for c in range(k)])
