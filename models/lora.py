"""LoRA policies (Hu et al. 2021) through peft: π trains low-rank adapters injected into the
prior's own model, and log a is that model's forward with the adapters disabled, so memory holds
one copy of the base weights.

Injection mutates the base model in place (its linear layers become peft LoRA layers). Every
`CausalLM` holding that base model runs it with them disabled (`base_forward`, what peft's
``disable_adapter()`` does),
so the prior, a proposal or any other view of it still computes a exactly; only the
`LoraCausalLM` that owns an adapter runs with it. B starts at zero (peft's default), so π = a
at step 0. Several fits on one prior each get their own adapter on the same base.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from pathlib import Path

from torch import nn

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError

from .causal_lm import CausalLM
from .lora_options import ADAPTED_LAYERS, PEFT_OWNER, LoraOptions


class AdapterWeights(nn.Module):
    """One adapter's weights, as the module the training loop sees: its optimizer, gradient
    averaging and checkpoints then hold these only, keyed without the adapter's name (a resumed
    fit may get another name), while ``.to()`` moves the whole model they live in."""

    def __init__(self, peft_model: nn.Module, adapter: str) -> None:
        super().__init__()
        marker = f".{adapter}."
        self.weights = nn.ParameterDict({
            name.replace(marker, ".").replace(".", "/"): param
            for name, param in peft_model.named_parameters() if marker in name
        })
        self.__dict__["peft_model"] = peft_model  # not a submodule: state_dict is the adapter's

    def _apply(self, fn, recurse: bool = True):
        # The adapter's parameters are the peft model's own objects, moved in place with it.
        self.peft_model._apply(fn)
        return self


class LoraCausalLM(CausalLM):
    """A `CausalLM` whose model is a peft model running one adapter (``adapter``) on a base
    model shared with the prior; ``module`` is that adapter's weights only."""

    adapter: str
    adapter_weights: AdapterWeights

    @classmethod
    def over(cls, base: CausalLM, **changes) -> LoraCausalLM:
        """``base``'s settings (prompt, adaptors, tokenizer...) with ``changes``."""
        new = cls.__new__(cls)
        new.__dict__.update(base.__dict__, **changes)
        return new

    @property
    def module(self) -> AdapterWeights:
        return self.adapter_weights

    def _forward(self, *args, **kwargs):
        if self.model.active_adapter != self.adapter:  # another fit's adapter on the same base
            self.model.set_adapter(self.adapter)
        return super()._forward(*args, **kwargs)

    def trainable_copy(self) -> LoraCausalLM:
        """An independent copy (base weights included: a second copy in memory), trainable."""
        model, weights = copy.deepcopy((self.model, self.adapter_weights))
        weights.requires_grad_(True)
        return self._replace(model=model, adapter_weights=weights)

    def save_pretrained(self, path: str | Path) -> Path:
        """The adapter in peft's format (``PeftModel.from_pretrained`` reads it); returns the
        folder written (peft puts an adapter other than the first in ``path/<adapter>``)."""
        self.model.save_pretrained(str(path), selected_adapters=[self.adapter])
        return Path(path) if self.adapter == "default" else Path(path) / self.adapter


def lora_policy(base: SequenceDistribution, options: LoraOptions) -> LoraCausalLM:
    """A policy training a new LoRA adapter on ``base``'s model, initialised at ``base``."""
    from transformers import PreTrainedModel

    if isinstance(base, LoraCausalLM):
        raise ConfigError("lora= was given with a policy that already is a LoRA policy; pass "
                          "lora=None to keep training its adapter")
    if not isinstance(base, CausalLM):
        raise ConfigError(f"lora= needs a CausalLM policy over a transformers model; the policy "
                          f"is a {type(base).__name__}: leave lora=None to train it directly")
    if not isinstance(base.model, PreTrainedModel):
        raise ConfigError(f"lora= needs a CausalLM over a transformers PreTrainedModel; this "
                          f"CausalLM wraps a {type(base.model).__name__}")
    config = _peft_config(base.model, options)
    owner = base.model.__dict__.get(PEFT_OWNER)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated alias; not ours to rename (pytest makes it an error).
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        if owner is None:
            from peft import get_peft_model

            adapter = "default"
            owner = get_peft_model(base.model, config, adapter_name=adapter)
            base.model.__dict__[PEFT_OWNER] = owner
        else:
            adapter = f"policy{len(owner.peft_config)}"
            owner.add_adapter(adapter, config)
    owner.set_adapter(adapter)
    from peft.tuners.tuners_utils import BaseTunerLayer

    base.model.__dict__[ADAPTED_LAYERS] = [m for m in base.model.modules()
                                           if isinstance(m, BaseTunerLayer)]
    return LoraCausalLM.over(base, model=owner, adapter=adapter,
                             adapter_weights=AdapterWeights(owner, adapter))


def _adaptable(model: nn.Module) -> dict[str, type]:
    """Leaf names of the modules peft's LoRA can adapt, with their types; a layer an earlier
    LoRA policy adapted counts as the module it wraps (its own parts are not offered)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D)
    found, adapted = {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in adapted):
            continue
        if isinstance(module, BaseTunerLayer):
            adapted.append(name + ".")
            module = module.get_base_layer()
        if isinstance(module, kinds):
            found[name.rsplit(".", 1)[-1]] = type(module)
    return found


def _peft_config(model: nn.Module, options: LoraOptions):
    """peft's LoraConfig for ``options``, checking the module names against ``model``."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D

    available = _adaptable(model)
    model_type = getattr(model.config, "model_type", None)
    targets = options.target_modules or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
        model_type)
    if targets is None:
        raise ConfigError(f"lora target_modules: peft has no default for model type "
                          f"{model_type!r}; name them, from {sorted(available)}")
    unknown = [name for name in targets if name not in available]
    if unknown:
        nearest = {name: difflib.get_close_matches(name, list(available), n=3, cutoff=0.3)
                   for name in unknown}
        raise ConfigError(f"lora target_modules: no module of this {type(model).__name__} that "
                          f"LoRA can adapt is named {unknown}; nearest: {nearest}; available: "
                          f"{sorted(available)}")
    # GPT-2's Conv1D stores W transposed; peft needs to be told (it warns and fixes it otherwise).
    fan_in_fan_out = any(issubclass(available[name], Conv1D) for name in targets)
    return LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=0.0,
                      target_modules=list(targets), fan_in_fan_out=fan_in_fan_out,
                      task_type="CAUSAL_LM")

