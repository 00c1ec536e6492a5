"""NEZHA for transformers 5, registered with the Auto classes (``model_type: nezha``).

NEZHA (Wei et al. 2019, "NEZHA: Neural Contextualized Representation for Chinese Language
Understanding") is BERT without absolute position embeddings: each self-attention layer adds
*functional relative position encodings* to its keys and values. For query position i and key
position j, the relative distance ``j - i`` is clipped to ``[-K, K]`` (K =
``max_relative_position``) and shifted to an index ``r = clip(j - i) + K`` in ``[0, 2K]``;
``a[i, j]`` is the fixed sinusoid of ``r`` over the head dimension d
(``sin(r / 10000^(2k/d))`` at even k, ``cos`` at odd). Then

    score[i, j] = (q_i . k_j + q_i . a[i, j]) / sqrt(d)
    out_i       = sum_j p[i, j] (v_j + a[i, j])

and the rest (embeddings LayerNorm, feed-forward, pooler, MLM and NSP heads) is BERT's.
The module and parameter names follow the checkpoints NEZHA users have (``nezha.encoder.
layer.N.attention.self.query``, ``cls.predictions.*``, ``cls.seq_relationship``), so their
folders load as they are. transformers 4.x shipped NEZHA until 4.57; tests/test_nezha.py
checks this implementation against that one's outputs (tests/data/make_nezha_reference.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    NextSentencePredictorOutput,
    SequenceClassifierOutput,
)
from transformers.utils import ModelOutput


class NezhaConfig(PretrainedConfig):
    model_type = "nezha"

    def __init__(
        self,
        vocab_size: int = 21128,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        max_relative_position: int = 64,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        classifier_dropout: float | None = 0.1,
        pad_token_id: int = 0,
        bos_token_id: int = 2,
        eos_token_id: int = 3,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.max_relative_position = max_relative_position
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.classifier_dropout = classifier_dropout


def relative_position_table(max_relative_position: int, depth: int) -> torch.Tensor:
    """The sinusoid of every clipped relative-distance index 0..2K: shape (2K + 1, depth)."""
    index = torch.arange(2 * max_relative_position + 1, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, depth, 2, dtype=torch.float32) * (-math.log(10000.0) / depth))
    table = torch.zeros(2 * max_relative_position + 1, depth)
    table[:, 0::2] = torch.sin(index * freq)
    table[:, 1::2] = torch.cos(index * freq)[:, : depth // 2]
    return table


def relative_positions(table: torch.Tensor, length: int, max_relative_position: int) -> torch.Tensor:
    """a[i, j] for a sequence of ``length``: shape (length, length, depth)."""
    pos = torch.arange(length, device=table.device)
    distance = (pos[None, :] - pos[:, None]).clamp(-max_relative_position, max_relative_position)
    return table[distance + max_relative_position]


class NezhaEmbeddings(nn.Module):
    """Word + segment embeddings; no absolute positions (attention carries them)."""

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class NezhaSelfAttention(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}"
            )
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (b, h, n, d)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self._split(self.query(hidden)), self._split(self.key(hidden)), self._split(self.value(hidden))
        rel = rel.to(q.dtype)
        scores = q @ k.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", q, rel)
        scores = scores / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        probs = self.dropout(scores.softmax(dim=-1))
        out = probs @ v + torch.einsum("bhij,ijd->bhid", probs, rel)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim), probs


class NezhaSelfOutput(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class NezhaAttention(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.self = NezhaSelfAttention(config)
        self.output = NezhaSelfOutput(config)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, probs = self.self(hidden, mask, rel)
        return self.output(context, hidden), probs


class NezhaIntermediate(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class NezhaOutput(NezhaSelfOutput):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class NezhaLayer(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.attention = NezhaAttention(config)
        self.intermediate = NezhaIntermediate(config)
        self.output = NezhaOutput(config)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, probs = self.attention(hidden, mask, rel)
        return self.output(self.intermediate(attended), attended), probs


class NezhaEncoder(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(NezhaLayer(config) for _ in range(config.num_hidden_layers))


class NezhaPooler(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class NezhaPredictionHeadTransform(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class NezhaLMPredictionHead(nn.Module):
    """Decoder weight tied to the word embeddings; its bias is ``cls.predictions.bias``."""

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.transform = NezhaPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class NezhaOnlyMLMHead(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.predictions = NezhaLMPredictionHead(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden)


class NezhaOnlyNSPHead(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class NezhaPreTrainingHeads(nn.Module):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.predictions = NezhaLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class NezhaPreTrainedModel(PreTrainedModel):
    config_class = NezhaConfig
    base_model_prefix = "nezha"
    _no_split_modules = ["NezhaLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, NezhaLMPredictionHead):
            module.bias.zero_()


class NezhaModel(NezhaPreTrainedModel):
    def __init__(self, config: NezhaConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = NezhaEmbeddings(config)
        self.encoder = NezhaEncoder(config)
        self.pooler = NezhaPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        hidden = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None:  # (b, n) 1/0 -> additive (b, 1, 1, n)
            mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        # computed per call, not a buffer: it is tiny ((2K + 1) x d), and transformers 5 builds
        # models on the meta device, where a buffer made in __init__ would hold no values
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        table = relative_position_table(self.config.max_relative_position, head_dim).to(hidden.device)
        rel = relative_positions(table, input_ids.shape[1], self.config.max_relative_position)
        all_hidden, all_probs = [hidden], []
        for layer in self.encoder.layer:
            hidden, probs = layer(hidden, mask, rel)
            all_hidden.append(hidden)
            all_probs.append(probs)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden,
            pooler_output=self.pooler(hidden) if self.pooler is not None else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_probs) if output_attentions else None,
        )


class _TiedMLMHead(NezhaPreTrainedModel):
    """Models with ``cls.predictions``: its decoder shares the word embeddings' weights."""

    _tied_weights_keys = {"cls.predictions.decoder.weight": "nezha.embeddings.word_embeddings.weight"}

    def get_output_embeddings(self) -> nn.Module:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.cls.predictions.decoder = value


class NezhaForMaskedLM(_TiedMLMHead):

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.nezha = NezhaModel(config, add_pooling_layer=False)
        self.cls = NezhaOnlyMLMHead(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> MaskedLMOutput:
        out = self.nezha(input_ids, attention_mask, token_type_ids, **kwargs)
        logits = self.cls(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class NezhaForNextSentencePrediction(NezhaPreTrainedModel):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.nezha = NezhaModel(config)
        self.cls = NezhaOnlyNSPHead(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> NextSentencePredictorOutput:
        out = self.nezha(input_ids, attention_mask, token_type_ids, **kwargs)
        logits = self.cls.seq_relationship(out.pooler_output)
        loss = nn.functional.cross_entropy(logits, labels.view(-1)) if labels is not None else None
        return NextSentencePredictorOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                           attentions=out.attentions)


@dataclass
class NezhaForPreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class NezhaForPreTraining(_TiedMLMHead):

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.nezha = NezhaModel(config)
        self.cls = NezhaPreTrainingHeads(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs: Any) -> NezhaForPreTrainingOutput:
        out = self.nezha(input_ids, attention_mask, token_type_ids, **kwargs)
        return NezhaForPreTrainingOutput(
            prediction_logits=self.cls.predictions(out.last_hidden_state),
            seq_relationship_logits=self.cls.seq_relationship(out.pooler_output),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


class NezhaForSequenceClassification(NezhaPreTrainedModel):
    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.nezha = NezhaModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        out = self.nezha(input_ids, attention_mask, token_type_ids, **kwargs)
        logits = self.classifier(self.dropout(out.pooler_output))
        return SequenceClassifierOutput(logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


_registered = False


def register() -> None:
    """Make ``model_type: nezha`` folders load through the Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForNextSentencePrediction,
        AutoModelForPreTraining,
        AutoModelForSequenceClassification,
    )

    AutoConfig.register("nezha", NezhaConfig, exist_ok=True)
    for auto, cls in (
        (AutoModel, NezhaModel),
        (AutoModelForMaskedLM, NezhaForMaskedLM),
        (AutoModelForNextSentencePrediction, NezhaForNextSentencePrediction),
        (AutoModelForPreTraining, NezhaForPreTraining),
        (AutoModelForSequenceClassification, NezhaForSequenceClassification),
    ):
        auto.register(NezhaConfig, cls, exist_ok=True)
    _registered = True
