"""Env throughput: steps/s of random masked actions when every measurement comes from the store.

Two passes over the same episodes (same env seed, same action seed): the first warms the store
(it measures each distinct plan once), the second is timed and must spend no measurement. So
the number is the env's own cost (observations, masks, legality, store look-ups), which is what
bounds RL training once the store knows the plans.

    FUSION_RL_CACHE=/tmp/frl_cache .venv/bin/python scripts/bench_env.py --spec tiny --episodes 40
    .venv/bin/python scripts/bench_env.py --models mixer_tiny --episodes 10   # a 56-op graph
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from fusion_rl.env import FusionEnv


def play(env: FusionEnv, episodes: int, seed: int) -> tuple[int, int]:
    """Random masked episodes; returns (steps, measurements spent)."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    steps = spent = 0
    for episode in range(episodes):
        if episode:
            env.reset()
        terminated = False
        while not terminated:
            action = int(rng.choice(np.flatnonzero(env.action_masks())))
            _, _, terminated, _, info = env.step(action)
            steps += 1
        spent += info["measurements"]
    return steps, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="tiny", help="env spec name or YAML path (default: tiny)")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reward", default=None, help="override the spec's reward (e2e, kernel)")
    parser.add_argument("--models", nargs="+", default=None, help="override the spec's models")
    parser.add_argument("--repeat", type=int, default=5, help="timed passes over the episodes")
    parser.add_argument("--store", default=None, help="store path (default: a fresh temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or str(Path(tmp) / "bench.sqlite")
        overrides = {"store": store, **({"reward": args.reward} if args.reward else {}),
                     **({"models": args.models} if args.models else {})}
        env = FusionEnv(args.spec, **overrides)
        t0 = time.perf_counter()
        steps, spent = play(env, args.episodes, args.seed)
        warm_s = time.perf_counter() - t0
        print(f"warm-up: {args.episodes} episodes, {steps} steps, {spent} measurements, {warm_s:.1f} s")
        t0 = time.perf_counter()
        steps = spent = 0
        for _ in range(args.repeat):
            s, m = play(env, args.episodes, args.seed)
            steps, spent = steps + s, spent + m
        elapsed = time.perf_counter() - t0
        env.close()
    if spent:
        raise SystemExit(f"the timed pass spent {spent} measurements; the store should serve all")
    print(f"timed:   {args.repeat} x {args.episodes} episodes, {steps} steps, 0 measurements, {elapsed:.2f} s")
    print(f"throughput: {steps / elapsed:.0f} steps/s, {args.repeat * args.episodes / elapsed:.1f} episodes/s "
          f"(spec {args.spec}, reward {env.config.reward})")


if __name__ == "__main__":
    main()
