"""What makes a decode step fast on CPUs: prepacked oneDNN matmuls, and a Llama step run lean.

Both apply to models on CPUs only (GPUs keep the model's own matmuls and forward: unmeasured there).

``prepare(model)`` runs every ``nn.Linear`` through oneDNN with its weight prepacked once
(``torch.ops.mkldnn._linear_pointwise``, as inductor's freezing does), still in the model's dtype:
fp32 stays fp32 (results differ from MKL's sgemm in the last bits only). At the small row counts
of decoding (32 rows x 576 x 1536) it runs at twice MKL's speed on an AVX-512 machine (SmolLM2's
210 layer matmuls: 58 -> 29 ms). In a Llama-family decoder it packs each layer's query, key and
value projections as one matmul, and the MLP's gate and up projections as another (fewer, larger
matmuls: the weights are read in one pass); the separate projections then run through MKL, which
is what prefill's thousands of rows want anyway. The cost: the packed copy beside the weights.

``LlamaStep`` is a Llama decoder's decode step (one new token per row) as one plain loop over the
model's own modules: the same operations in the same order as its ``forward``, without the
per-layer keyword plumbing, mask building and output records that cost ~4 ms of a 110 ms step;
attention is transformers' own SDPA function. With a prepared model it uses the fused
projections. Unprepared, its logits equal the model's ``forward`` exactly (tested).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

PACK_ROWS = 32  # the row count oneDNN lays packed weights out for (any count works)
MKL_ROWS = 256
"""From this many rows a layer runs through MKL's sgemm (``F.linear`` on the kept weight): the
packed weight's lead (2.5x at 8 rows, 1.2x at 32-64 of SmolLM2's 576 x 1536) is gone by 256 rows,
and at a prefill's 3,000 MKL is 7% faster."""


PACKED_DTYPES = (torch.float32, torch.bfloat16)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


class _PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` through oneDNN with its weight prepacked (``weight`` and ``bias`` kept, for
    code that reads them). ``packed`` None: the weight is packed into a fused matmul instead, and
    this layer runs through MKL."""

    def __init__(self, linear: torch.nn.Linear, pack: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = _pack(linear.weight) if pack else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.numel() >= MKL_ROWS * self.in_features:  # prefill's many rows: MKL is as fast
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class _Fused(torch.nn.Module):
    """Several linear layers on the same input as one prepacked matmul; returns their outputs."""

    def __init__(self, linears: Sequence[torch.nn.Linear]) -> None:
        super().__init__()
        self.sizes = [lin.out_features for lin in linears]
        weight = torch.cat([lin.weight.detach() for lin in linears])
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])  # type: ignore[union-attr]
        self.packed = _pack(weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return out.split(self.sizes, dim=-1)


def prepare(model: Any) -> int:
    """Prepack the model's linear layers for oneDNN where that runs faster (CPU, fp32 or bf16),
    fusing a Llama layer's projections; return how many layers were packed (0 elsewhere, or where
    this torch build cannot)."""
    if getattr(model, "device", torch.device("cpu")).type != "cpu" or not torch.backends.mkldnn.is_available():
        return 0
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return 0
    fused = 0
    for layer in model.model.layers if LlamaStep.fits(model) else []:
        attn, mlp = layer.self_attn, layer.mlp
        groups = ((attn, "rayinfer_qkv", ("q_proj", "k_proj", "v_proj")),
                  (mlp, "rayinfer_gate_up", ("gate_proj", "up_proj")))
        linears = [[getattr(owner, name) for name in names] for owner, _, names in groups]
        plain = [type(lin) is torch.nn.Linear and lin.weight.dtype in PACKED_DTYPES for group in linears for lin in group]
        if not all(plain):
            break  # an unmerged adapter's layers, or a dtype oneDNN does not pack: this layer and the rest stay apart
        try:
            packs = [_Fused(group) for group in linears]
        except RuntimeError:  # a layout oneDNN does not take: the layers stay separate
            break
        for (owner, attr, names), pack, group in zip(groups, packs, linears):
            setattr(owner, attr, pack)
            for name, lin in zip(names, group):
                setattr(owner, name, _PackedLinear(lin, pack=False))
            fused += len(names)
    packed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype in PACKED_DTYPES:
                try:
                    setattr(module, name, _PackedLinear(child))
                except RuntimeError:  # a layout oneDNN does not take: this layer stays as it is
                    continue
                packed += 1
    return packed + fused


class LlamaStep:
    """One decode step of a Llama-family decoder (``LlamaForCausalLM``, SDPA attention)."""

    def __init__(self, model: Any) -> None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.rotate, self.attend = apply_rotary_pos_emb, sdpa_attention_forward
        base = model.model
        self.embed, self.layers, self.norm = base.embed_tokens, list(base.layers), base.norm
        self.rotary = base.rotary_emb
        self.head = model.lm_head
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @staticmethod
    def fits(model: Any) -> bool:
        from transformers.models.llama import modeling_llama as llama

        base = getattr(model, "model", None)
        on_cpu = getattr(model, "device", torch.device("cpu")).type == "cpu"
        return (on_cpu and type(model) is llama.LlamaForCausalLM and base is not None
                and getattr(model.config, "_attn_implementation", None) == "sdpa"
                and all(type(layer) is llama.LlamaDecoderLayer and type(layer.mlp) is llama.LlamaMLP
                        and type(layer.self_attn) is llama.LlamaAttention for layer in base.layers))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Sequence[Any]
                 ) -> torch.Tensor:
        """Logits [rows, vocab] of one new token per row: ``tokens`` and ``positions`` [rows, 1],
        ``mask`` [rows, 1, 1, columns] (True: attend), ``cache`` one layer cache per layer, whose
        ``update(keys, values)`` stores the new token's and returns every column to attend over."""
        rows = tokens.shape[0]
        hidden = self.embed(tokens)
        cos, sin = self.rotary(hidden, position_ids=positions)
        for layer, kv in zip(self.layers, cache):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
            qkv = getattr(attn, "rayinfer_qkv", None)
            q, k, v = qkv(x) if qkv is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
            q = q.view(rows, 1, self.heads, self.dim).transpose(1, 2)
            k = k.view(rows, 1, self.kv_heads, self.dim).transpose(1, 2)
            v = v.view(rows, 1, self.kv_heads, self.dim).transpose(1, 2)
            q, k = self.rotate(q, k, cos, sin)
            keys, values = kv.update(k, v)
            out, _ = self.attend(attn, q, keys, values, mask, dropout=0.0, scaling=attn.scaling)
            hidden = hidden + attn.o_proj(out.reshape(rows, 1, -1))
            x = layer.post_attention_layernorm(hidden)
            gate_up = getattr(mlp, "rayinfer_gate_up", None)
            gate, up = gate_up(x) if gate_up is not None else (mlp.gate_proj(x), mlp.up_proj(x))
            hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.head(self.norm(hidden))[:, -1]
