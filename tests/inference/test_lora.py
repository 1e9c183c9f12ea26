"""LoRA policies (models/lora.py): π trains adapters on the prior's own model, a stays exact.

Every fit here adapts one tiny GPT-2 prior, so its base model ends up carrying several adapters
at once (one per fit): each test also checks that they do not see each other.
"""

import copy
import math
import warnings

import pyro
import pytest
import torch
from safetensors.torch import load_file

import bayesalign as ba
from bayesalign.errors import ConfigError
from bayesalign.inference import DPG, KLRL, LoraOptions
from bayesalign.models import CausalLM, TabularLM
from bayesalign.models.lora import LoraCausalLM, lora_policy
from bayesalign.models.tiny import tiny_causal_lm
from bayesalign.posterior import Posterior
from bayesalign.training.strategy import trainable_parameters

SETTINGS = {"batch_size": 16, "learning_rate": 1e-2, "eval_samples": 64, "progress": False,
            "seed": 5, "lora": LoraOptions(rank=4),
            "divergence_action": "off"}


@pytest.fixture(scope="module")
def world():
    """A tiny prior, an untouched copy of its weights, a target rewarding one token, fixed draws."""
    prior = tiny_causal_lm(seed=1, initializer_range=0.3, max_new_tokens=10)
    untouched = copy.deepcopy(prior.model)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        y = prior.sample_batch(32)
    chosen = int(torch.bincount(y.tokens[y.mask], minlength=prior.vocab_size).argsort()[-5])

    @ba.target
    def more_of_one_token():
        y = pyro.sample("y", prior)
        ba.reward("share", ((y.tokens == chosen) & y.mask).sum(-1).double() / 10, kl_coef=0.1)

    log_a = prior.log_prob(y)
    return prior, untouched, more_of_one_token, y, log_a


def untouched_log_prob(world) -> torch.Tensor:
    prior, untouched, _, y, _ = world
    return prior._replace(model=untouched).log_prob(y)


@pytest.mark.parametrize("engine", [DPG, lambda **kw: KLRL(algorithm="rloo", **kw),
                                    lambda **kw: KLRL(algorithm="ppo", ppo_epochs=2, **kw)],
                         ids=["dpg", "rloo", "ppo"])
def test_training_moves_pi_but_not_a_on_one_copy_of_the_base(world, engine):
    prior, untouched, target, y, log_a = world
    base_storages = {p.data_ptr() for p in prior.model.parameters()}
    post = engine(steps=4, **SETTINGS).fit(target)
    policy = post.policy
    assert isinstance(policy, LoraCausalLM)
    adapter = {p.data_ptr() for p in policy.module.parameters()}
    # One base in memory: every non-adapter weight of π is one of the prior's tensors.
    assert {p.data_ptr() for p in policy.model.parameters()} - adapter == base_storages
    # a is unchanged, bit for bit, and is still the un-adapted model's.
    assert torch.equal(prior.log_prob(y), log_a)
    assert torch.allclose(log_a, untouched_log_prob(world), rtol=0, atol=1e-9)
    # π moved away from a (B starts at 0, so only training can have moved it).
    assert float((policy.log_prob(y) - log_a).abs().max()) > 0.05
    assert post.sample(4).text and torch.isfinite(post.log_prob(post.sample(4))).all()


def test_only_adapter_weights_are_trained(world):
    prior, _, target, y, log_a = world
    policy = lora_policy(prior, LoraOptions(rank=2))
    assert torch.allclose(policy.log_prob(y), log_a, rtol=0, atol=1e-9)  # π = a at step 0
    params = trainable_parameters(policy.module, "test")
    assert len(params) == 4  # lora_A and lora_B of c_attn in each of the 2 layers
    assert sum(p.numel() for p in params) == 2 * (2 * 64 + 2 * 192)
    policy.token_log_probs(y).sum().backward()
    adapter = {id(p) for p in params}
    # B starts at 0, so A's gradient is 0 at step 0 and B's is not.
    grads = {name: p.grad for name, p in policy.module.weights.items()}
    assert all(g is not None and (g.abs().sum() > 0) == ("lora_B" in n) for n, g in grads.items())
    base = [p for n, p in policy.model.named_parameters() if "lora_" not in n]
    assert len(base) == len(list(world[1].parameters()))
    assert all(p.grad is None and not p.requires_grad for p in base)
    others = [p for n, p in policy.model.named_parameters() if "lora_" in n and id(p) not in adapter]
    assert all(not p.requires_grad for p in others)  # the earlier fits' adapters are frozen


def test_resume_is_bit_identical_and_checkpoints_hold_the_adapter_only(world, tmp_path):
    _, _, target, y, _ = world
    settings = {**SETTINGS, "off_policy": True, "proposal_update_interval": 2,
                "proposal_update_samples": 16}
    reference = DPG(steps=6, **settings).fit(target)
    DPG(steps=3, checkpoint_dir=str(tmp_path), checkpoint_every=3, **settings).fit(target)
    saved = load_file(str(tmp_path / "checkpoint-00000003" / "policy.safetensors"))
    assert saved and all("lora_" in key for key in saved)
    assert sum(t.numel() for t in saved.values()) == sum(
        p.numel() for p in reference.policy.module.parameters())
    resumed = DPG(steps=6, checkpoint_dir=str(tmp_path), checkpoint_every=3,
                  **settings).fit(target)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in reference.history]
    for a, b in zip(reference.policy.module.parameters(), resumed.policy.module.parameters()):
        assert torch.equal(a, b)
    # The earlier posterior's adapter survives later fits on the same base.
    assert torch.equal(reference.policy.log_prob(y), resumed.policy.log_prob(y))


def test_posterior_and_peft_saves_restore_the_policy(world, tmp_path):
    prior, untouched, target, y, _ = world
    post = DPG(steps=2, **SETTINGS).fit(target)
    expected = post.policy.log_prob(y)
    post.save(tmp_path / "posterior")
    fresh = lora_policy(prior, LoraOptions(rank=4))
    loaded = Posterior.load(tmp_path / "posterior", policy=fresh)
    assert torch.equal(loaded.policy.log_prob(y), expected)

    from peft import PeftModel

    folder = post.policy.save_pretrained(tmp_path / "adapter")
    assert (folder / "adapter_config.json").exists()
    with warnings.catch_warnings():  # peft reads a deprecated transformers alias
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(untouched), str(folder)).eval()
    reloaded = prior._replace(model=peft_model)
    assert torch.allclose(reloaded.log_prob(y), expected, rtol=0, atol=1e-9)


def test_moving_the_adapter_moves_the_base_it_lives_in(world):
    prior = tiny_causal_lm(seed=2, max_new_tokens=4)
    policy = lora_policy(prior, LoraOptions(rank=2))
    policy.module.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in prior.model.parameters())
    peft_params = {id(p) for p in policy.model.parameters()}
    assert all(id(p) in peft_params for p in policy.module.parameters())
    y = policy.sample_batch(3)
    assert torch.allclose(policy.log_prob(y), prior.log_prob(y), rtol=0, atol=1e-9)


class Wrapped(torch.nn.Module):
    """A model that is not a transformers `PreTrainedModel` (the CausalLM still runs it)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, **kw):
        return self.inner(**kw)


def test_lora_on_a_policy_it_cannot_adapt_names_the_option_and_the_type(world):
    prior, untouched, _, _, _ = world
    tabular = TabularLM(torch.full((3,), 1 / 3), torch.full((3, 3), 1 / 3), 2, eos_token_id=2)
    with pytest.raises(ConfigError, match=r"lora=.*TabularLM"):
        lora_policy(tabular, LoraOptions())
    wrapped = prior._replace(model=Wrapped(untouched))
    assert isinstance(wrapped, CausalLM)
    with pytest.raises(ConfigError, match=r"lora=.*Wrapped"):
        lora_policy(wrapped, LoraOptions())
    policy = lora_policy(tiny_causal_lm(seed=3, max_new_tokens=4), LoraOptions())
    with pytest.raises(ConfigError, match="already is a LoRA policy"):
        lora_policy(policy, LoraOptions())


def test_lora_on_tabular_target_fails_at_fit_naming_the_option():
    prior = TabularLM(torch.full((3,), 1 / 3), torch.full((3, 3), 1 / 3), 2, eos_token_id=2)

    @ba.target
    def target():
        pyro.sample("y", prior)

    with pytest.raises(ConfigError, match=r"lora=.*TabularLM"):
        DPG(steps=1, progress=False, lora={"rank": 2}).fit(target)


def test_unknown_lora_options_name_the_nearest_modules_and_fields(world):
    prior = world[0]
    with pytest.raises(ConfigError, match=r"\['c_atn'\].*c_attn.*available") as error:
        lora_policy(prior, LoraOptions(target_modules=["c_attn", "c_atn"]))
    assert "c_fc" in str(error.value)  # the full list of adaptable names follows
    with pytest.raises(ConfigError, match=r"unknown options \['dropout'\].*rank"):
        DPG(steps=1, lora={"rank": 2, "dropout": 0.1})
    with pytest.raises(ConfigError, match="lora rank"):
        LoraOptions(rank=0)
    with pytest.raises(ConfigError, match="lora must be"):
        DPG(steps=1, lora=8)


def test_named_target_modules_are_adapted(world):
    prior = tiny_causal_lm(seed=4, max_new_tokens=4)
    policy = lora_policy(prior, LoraOptions(rank=2, target_modules=("c_fc", "c_proj")))
    names = list(policy.module.state_dict())
    assert names and all(("c_fc" in n or "c_proj" in n) for n in names)
    assert not math.isnan(float(policy.log_prob(policy.sample_batch(2)).sum()))
