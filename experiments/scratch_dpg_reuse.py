"""Measure DPG's draw reuse on the real prior: KL(p‖π) ± se by the exact-sample yardstick against
samples drawn, for updates_per_batch in {1, 2, 4} with the replay pool off and on.

Target: bundled:code-small (32 new tokens) times 1["return" in the text], prior rate ≈ 9%.
Each run checkpoints every ``--every`` drawn samples and each checkpoint's policy is measured;
results go to ``--out`` (JSON) after every run, and a rerun skips the runs already there.

    nice -n 10 python experiments/scratch_dpg_reuse.py --seed 0 --out outputs/dpg_reuse_0.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pyro
import torch
from safetensors.torch import load_file

import bayesalign as ba
from bayesalign.evaluation import evaluate_policy
from bayesalign.inference import DPG
from bayesalign.inference.reference import exact_reference
from bayesalign.models import CausalLM
from bayesalign.reference import EXACT, Reference
from bayesalign.sequences import Sequences

CONFIGS = [(1, False), (2, False), (1, True), (4, False), (2, True), (4, True)]


def has_return_target(prior: CausalLM) -> ba.Target:
    @ba.target
    def has_return():
        y = pyro.sample("y", prior)
        ba.constraint("return", torch.tensor(["return" in s for s in y.text]))

    return has_return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--replay-size", type=int, default=512)
    parser.add_argument("--reference-samples", type=int, default=600)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference-cache", required=True,
                        help="the pool's tensors; built once, shared by every seed's process")
    parser.add_argument("--configs", default="all", help="e.g. 1:0,2:0 (updates:replay)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    prior = CausalLM.from_pretrained("bundled:code-small", max_new_tokens=32)
    target = has_return_target(prior)
    started = time.perf_counter()
    reference = cached_reference(target, args.reference_samples, Path(args.reference_cache))
    results["reference"] = {"log_z": reference.log_z, "log_z_se": reference.log_z_se,
                            "kl_target_prior": -reference.log_z, "method": reference.method,
                            "seconds": time.perf_counter() - started}
    out.write_text(json.dumps(results, indent=1))
    configs = CONFIGS if args.configs == "all" else [
        (int(a), bool(int(b))) for a, b in (c.split(":") for c in args.configs.split(","))]
    for updates, replay in configs:
        name = f"updates{updates}_replay{int(replay)}_seed{args.seed}"
        run = results["runs"].setdefault(name, {"updates_per_batch": updates, "replay": replay,
                                                "seed": args.seed, "points": []})
        fresh_per_cycle = args.batch_size // 2 if replay else args.batch_size
        if len(run["points"]) > args.samples // args.every:
            continue
        run["points"] = []
        folder = Path(tempfile.mkdtemp(prefix=f"dpg_reuse_{name}_"))
        torch.manual_seed(1000 + args.seed)
        d = evaluate_policy(target, prior, reference, eval_samples=args.eval_samples)
        run["points"].append(_point(0, 0, d, {}))
        every_steps = args.every // fresh_per_cycle * updates
        steps = args.samples // fresh_per_cycle * updates
        t0 = time.perf_counter()
        engine = DPG(steps=steps, batch_size=args.batch_size, updates_per_batch=updates,
                     replay_size=args.replay_size if replay else None, seed=args.seed,
                     progress=False, eval_samples=64, checkpoint_dir=str(folder),
                     checkpoint_every=every_steps, keep_checkpoints=1000)
        post = engine.fit(target)
        run["fit_seconds"] = time.perf_counter() - t0
        policy = prior.trainable_copy()
        for checkpoint in sorted(folder.glob("checkpoint-*")):
            done = int(checkpoint.name.split("-")[1])
            weights = load_file(str(checkpoint / "policy.safetensors"), device="cpu")
            result = policy.module.load_state_dict(weights, strict=False)
            if result.unexpected_keys or any(k in dict(policy.module.named_parameters())
                                             for k in result.missing_keys):
                raise RuntimeError(f"{checkpoint}: weights do not match the policy: {result}")
            torch.manual_seed(2000 + args.seed)
            d = evaluate_policy(target, policy, reference, eval_samples=args.eval_samples)
            rows = post.history[max(0, done - every_steps):done]
            clipped = [r["clipped_fraction"] for r in rows if "clipped_fraction" in r]
            stats = {"clipped_fraction": sum(clipped) / len(clipped) if clipped else None,
                     "train_kl_policy_prior": rows[-1]["kl_policy_prior"]}
            run["points"].append(_point(done // updates * fresh_per_cycle, done, d, stats))
            print(name, run["points"][-1], flush=True)
        run["samples_drawn_engine"] = post.extras["samples_drawn"]
        out.write_text(json.dumps(results, indent=1))
        shutil.rmtree(folder, ignore_errors=True)


def cached_reference(target: ba.Target, num_samples: int, cache: Path) -> Reference:
    """The exact reference pool, built once (by Rejection) and reloaded by every process."""
    lock = cache.with_suffix(".building")
    try:
        lock.touch(exist_ok=False)
        reference = exact_reference(target, bound=1.0, num_samples=num_samples, chunk_size=256,
                                    seed=5)
        torch.save({"tokens": reference.samples.tokens, "mask": reference.samples.mask,
                    "log_score": reference.log_score, "log_z": reference.log_z,
                    "log_z_se": reference.log_z_se, "method": reference.method,
                    "num_proposed": reference.num_proposed}, cache)
        return reference
    except FileExistsError:
        while not cache.exists():
            time.sleep(10)
        time.sleep(5)
    saved = torch.load(cache)
    return Reference(samples=Sequences(saved["tokens"], saved["mask"]),
                     log_score=saved["log_score"], log_z=saved["log_z"],
                     log_z_se=saved["log_z_se"], kind=EXACT, target=target,
                     method=saved["method"], num_proposed=saved["num_proposed"])


def _point(samples: int, steps: int, d, stats: dict) -> dict:
    return {"samples_drawn": samples, "steps": steps,
            "kl_target_policy": d.reference_kl_target_policy,
            "kl_target_policy_se": d.reference_kl_target_policy_se,
            "on_policy_kl_target_policy": d.kl_target_policy,
            "return_rate": d.moments["return"][0], "kl_policy_prior": d.kl_policy_prior,
            **stats}


if __name__ == "__main__":
    main()
