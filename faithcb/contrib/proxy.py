"""Proxy-tuned decoding (Liu et al. 2024, "Tuning Language Models by Proxy").

A large *base* model is steered at decoding time by the difference between a small model
after fine-tuning (*tuned*) and the same small model before it (*untuned*)::

    logits = base(x) + alpha * (tuned(x) - untuned(x))

All three models must share one tokenizer (the same vocabulary). `ProxyTunedModel` is a
`transformers.PreTrainedModel` + `GenerationMixin`, so the probe engine, `run_probe_round`
and `generate` accept it like any causal LM. It keeps no KV cache: every decoding step feeds
the full sequence to all three models (slow for long chains, exact, and simple). It takes
2-D attention masks only, so the engine's packed-scoring self-check fails on purpose and the
engine scores variants with separate passes.

Example::

    proxy = ProxyTunedModel(base, tuned_small, untuned_small)
    result = faithcb.run_probe_round(proxy, tokenizer, panel, FaithConfig())
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["ProxyTunedConfig", "ProxyTunedModel"]


class ProxyTunedConfig(PretrainedConfig):
    """Configuration of :class:`ProxyTunedModel`.

    Attributes:
        vocab_size: The shared vocabulary size.
        alpha: Weight of the tuning offset `tuned - untuned`.
        max_position_embeddings: The shortest context of the three models.
        use_cache: Accepted for compatibility; the model never caches.
    """

    model_type = "faithcb_proxy_tuned"

    vocab_size: int = 0
    alpha: float = 1.0
    max_position_embeddings: int | None = None
    use_cache: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False


def _vocab_size(model: PreTrainedModel) -> int:
    embeddings = model.get_output_embeddings()
    if embeddings is not None and hasattr(embeddings, "out_features"):
        return int(embeddings.out_features)
    return int(model.config.vocab_size)


class ProxyTunedModel(PreTrainedModel, GenerationMixin):
    """Causal LM whose logits are `base + alpha * (tuned - untuned)`.

    Args:
        base: The model to steer (usually the larger one).
        tuned: The small model after fine-tuning.
        untuned: The same small model before fine-tuning.
        alpha: Weight of the offset (1.0 in Liu et al. 2024).

    Raises:
        ValueError: If the vocabularies differ.
    """

    config_class = ProxyTunedConfig
    base_model_prefix = "proxy"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False

    def __init__(
        self,
        base: PreTrainedModel,
        tuned: PreTrainedModel,
        untuned: PreTrainedModel,
        alpha: float = 1.0,
    ) -> None:
        sizes = {name: _vocab_size(m) for name, m in (("base", base), ("tuned", tuned), ("untuned", untuned))}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Proxy tuning needs one shared vocabulary; the output sizes differ: {sizes}.")
        limits = [getattr(m.config, "max_position_embeddings", None) for m in (base, tuned, untuned)]
        limits = [n for n in limits if n]
        config = ProxyTunedConfig(
            vocab_size=sizes["base"],
            alpha=float(alpha),
            max_position_embeddings=min(limits) if limits else None,
            bos_token_id=base.config.bos_token_id,
            eos_token_id=base.config.eos_token_id,
            pad_token_id=base.config.pad_token_id,
        )
        super().__init__(config)
        self.base = base
        self.tuned = tuned
        self.untuned = untuned
        self.generation_config = copy.deepcopy(base.generation_config)
        self.generation_config.use_cache = False
        self.train(base.training)

    def _init_weights(self, module: nn.Module) -> None:
        """No-op: the wrapped models are already trained."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """Tells `generate` not to build a KV cache (this model has none)."""
        return False

    def get_input_embeddings(self) -> nn.Module:
        """The base model's input embeddings."""
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        """None: the output is a combination of three heads, not one."""
        return None

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed the FULL sequence, its mask and padding-aware positions at every step.

        Args:
            input_ids: All tokens so far, `(batch, seq)`.
            next_sequence_length: Ignored (no cache, no slicing).
            cache: Ignored.
            attention_mask: Mask of `input_ids` (left padding allowed).
            inputs_embeds: Unsupported.
            is_first_iteration: Ignored.
            **kwargs: `logits_to_keep` is forwarded; the rest is dropped.

        Returns:
            Keyword arguments of :meth:`forward`.

        Raises:
            ValueError: If `inputs_embeds` is given.
        """
        if inputs_embeds is not None:
            raise ValueError("ProxyTunedModel works on token ids only, not inputs_embeds.")
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if attention_mask is not None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            inputs["position_ids"] = position_ids
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Combined logits `base + alpha * (tuned - untuned)` (float32).

        Args:
            input_ids: Token ids, `(batch, seq)`.
            attention_mask: 2-D mask, 1 for real tokens (left or right padding).
            position_ids: Positions, passed to all three models.
            labels: Optional LM labels (`-100` ignored); gives `loss`.
            use_cache: Ignored (no cache is kept or returned).
            logits_to_keep: As in transformers causal LMs (last K positions, 0 = all, or indices).
            **kwargs: A cache argument is accepted and ignored; anything else is not passed on.

        Returns:
            Output with `logits` and, given labels, `loss`.

        Raises:
            ValueError: Without `input_ids`, or with a non 2-D attention mask.
        """
        if input_ids is None:
            raise ValueError("ProxyTunedModel needs input_ids.")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("ProxyTunedModel takes 2-D attention masks only (no packed 4-D masks).")
        common: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
            "logits_to_keep": logits_to_keep,
        }
        if position_ids is not None:
            common["position_ids"] = position_ids
        base = self.base(**common).logits.float()
        tuned = self.tuned(**common).logits.float()
        untuned = self.untuned(**common).logits.float()
        logits = base + self.config.alpha * (tuned - untuned)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("A loss needs logits at every position (logits_to_keep=0).")
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
