"""Prompting as conditioning (`Prompted`) and context distillation (SPEC §13), on a tiny LM."""

import pyro
import pytest
import torch

import bayesalign as ba
from bayesalign.errors import ConfigError
from bayesalign.inference import DPG, ContextDistillation, exact_reference
from bayesalign.models import Prompted
from bayesalign.models.prompted import next_token_log_probs
from bayesalign.models.tiny import tiny_causal_lm
from bayesalign.reference import distances
from bayesalign.sequences import Sequences

PROMPT = "import os\nimport sys\n"
TEXTS = ["def f(x):\n    return x\n", "class A:\n    pass\n", "for i in range(3):\n    print(i)\n",
         "x = [1, 2, 3]\n", "if x:\n    y = 1\n", "while True:\n    break\n"]


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm(seed=3, initializer_range=0.3, max_new_tokens=8)


def prompted_target(lm):
    prompted = Prompted(lm, PROMPT)

    @ba.target
    def with_prompt(context=None):
        pyro.sample("y", prompted.given(context))

    return with_prompt


def test_prompted_samples_keep_their_context_and_score_under_the_prompt(lm):
    prompted = Prompted(lm, PROMPT).given("def f(x):\n")
    torch.manual_seed(0)
    y = prompted.sample_batch(16)
    assert list(y.context) == ["def f(x):\n"] * 16  # the unprompted policy scores them as is
    direct = lm.given(PROMPT + "def f(x):\n")
    prompted_y = Sequences(y.tokens, y.mask, context=[PROMPT + "def f(x):\n"] * 16)
    torch.testing.assert_close(prompted.log_prob(y), direct.log_prob(prompted_y))
    torch.testing.assert_close(prompted.log_prob(y), y.log_q.double(), rtol=0, atol=1e-4)
    # The prompt changes the law: the same draws score differently without it.
    assert (prompted.log_prob(y) - lm.given("def f(x):\n").log_prob(y)).abs().max() > 1e-3


@pytest.mark.parametrize("prefix", [None, PROMPT], ids=["no-prefix", "prompt"])
def test_teacher_forced_distributions_agree_with_sequence_scores(lm, prefix):
    encode = lambda text: list(lm.tokenizer(text)["input_ids"])  # noqa: E731
    texts = [encode(t) for t in TEXTS[:3]]
    log_probs, mask = next_token_log_probs(lm, [prefix] * 3, texts)
    assert log_probs.shape[:2] == mask.shape == (3, max(map(len, texts)) - 1)
    torch.testing.assert_close(log_probs.exp().sum(-1)[mask], torch.ones(int(mask.sum())),
                               rtol=0, atol=1e-5)
    # Row by row, the realised tokens' log-probabilities are what CausalLM scores for the
    # text's tail given its first token (and the prefix) as context.
    for row, ids in enumerate(texts):
        context = (prefix or "") + lm.tokenizer.decode(ids[:1])
        assert encode(context) == (encode(prefix) if prefix else []) + ids[:1]  # precondition
        tail = torch.tensor([ids[1:]])
        expected = lm.given(context).log_prob(Sequences(tail, context=[context]))
        realised = log_probs[row, :len(ids) - 1].gather(-1, tail[0, :, None]).sum().double()
        torch.testing.assert_close(realised, expected[0], rtol=0, atol=1e-4)


def one_token_kl(target, policy, context):
    """KL(prompted ‖ π) of the next token after ``context``, by the exact-sample yardstick."""
    reference = exact_reference(target, bound=1, num_samples=512, context=context, seed=0)
    assert reference.log_z == pytest.approx(0.0, abs=1e-9)  # no factor sites: Z = 1 exactly
    return distances(reference, policy.given(context).log_prob(reference.samples))


def test_token_level_distillation_matches_the_prompted_law_where_it_trained(lm):
    """With one-token continuations, KL(prompted ‖ π) after a prefix of a training text is the
    KL of one teacher-forced position: the objective drives it toward 0."""
    one_token = lm._replace(max_new_tokens=1)
    target = prompted_target(one_token)
    ids = list(lm.tokenizer(TEXTS[0])["input_ids"])
    context = lm.tokenizer.decode(ids[:3])
    assert list(lm.tokenizer(context)["input_ids"]) == ids[:3]  # a trained position
    before = one_token_kl(target, one_token, context)
    posterior = ContextDistillation(steps=40, batch_size=6, learning_rate=3e-3, eval_samples=8,
                                    progress=False, seed=0).fit(target, contexts=TEXTS)
    after = one_token_kl(target, posterior.policy, context)
    assert before.kl_target_policy > 0.1, before  # the prompt shifts the law measurably
    assert after.kl_target_policy < 0.25 * before.kl_target_policy, (before, after)
    assert before.kl_target_policy - after.kl_target_policy > 3 * (
        before.kl_target_policy_se + after.kl_target_policy_se)
    assert posterior.policy.module is not lm.module  # the prior is untouched


def test_sequence_level_distillation_by_dpg_moves_toward_the_prompted_prior():
    lm = tiny_causal_lm(seed=3, initializer_range=0.1, max_new_tokens=6)  # a shift DPG can cross
    target = prompted_target(lm)
    context = TEXTS[0]
    reference = exact_reference(target, bound=1, num_samples=256, context=context, seed=0)
    # Measured on this world: lr 3e-3 moves π away (−1.5 nats), 1e-3 by 0.12 ± 0.12 in 30
    # steps, 3e-4 by 0.54 ± 0.08 in 60.
    posterior = DPG(steps=60, batch_size=32, learning_rate=3e-4, eval_samples=8, progress=False,
                    seed=0).fit(target, context)
    # KL before − KL after = E_p[log π_after − log π_before], paired on the same exact draws.
    gain = (posterior.policy.given(context).log_prob(reference.samples)
            - lm.given(context).log_prob(reference.samples))
    se = float(gain.std() / len(gain) ** 0.5)
    assert float(gain.mean()) > 3 * se, (float(gain.mean()), se)


def test_distillation_loss_falls_and_is_logged(lm):
    posterior = ContextDistillation(steps=12, batch_size=6, learning_rate=3e-3, eval_samples=8,
                                    progress=False).fit(prompted_target(lm), contexts=TEXTS)
    losses = [row["kl_teacher_student_per_token"] for row in posterior.history]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses
    assert posterior.engine == "ContextDistillation"


def test_bad_input_is_named(lm, toy_a):
    with pytest.raises(ConfigError, match="non-empty string"):
        Prompted(lm, "")
    with pytest.raises(ConfigError, match="needs a CausalLM, got TabularLM"):
        Prompted(toy_a.prior(), "x")

    @ba.target
    def unprompted(context=None):
        pyro.sample("y", lm.given(context))

    engine = ContextDistillation(steps=1, batch_size=2, eval_samples=2, progress=False)
    with pytest.raises(ConfigError, match="prior is Prompted"):
        engine.fit(unprompted, contexts=TEXTS)

    prompted = Prompted(lm, PROMPT)

    @ba.target
    def with_factor(context=None):
        y = pyro.sample("y", prompted.given(context))
        ba.reward("length", y.mask.sum(-1).double(), kl_coef=1.0)

    with pytest.raises(ConfigError, match="factor sites"):
        engine.fit(with_factor, contexts=TEXTS)
    with pytest.raises(ConfigError, match="context 1 is ''"):
        engine.fit(prompted_target(lm), contexts=["def f():\n", ""])
    with pytest.raises(ConfigError, match="fewer than 2 tokens"):
        engine.fit(prompted_target(lm), contexts=["d"])
    no_boundary = Prompted(lm, "impor")

    @ba.target
    def mid_word(context=None):
        pyro.sample("y", no_boundary.given(context))

    with pytest.raises(ConfigError, match="tokenise differently joined than apart"):
        engine.fit(mid_word, contexts=["t os\n"])
    with pytest.raises(ConfigError, match="max_text_tokens"):
        ContextDistillation(max_text_tokens=0)
