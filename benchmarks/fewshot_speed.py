"""Batched few-shot logistic regression vs a per-episode scikit-learn loop, on the SAME saved episodes.

Features: tf_efficientnet_lite0 (shared ImageNet weights) on shared Caltech-101, train and test
splits pooled (30 images per class), extracted once with vtbench.extract into a persistent cache
($VT_CACHE or the user cache dir; reused on later runs). For each protocol (md, fixed 5w5s, 5w1s):

1. `run_fewshot` samples the episodes (seed 0) and saves them to a JSON episodes file (its ncc
   accuracy is printed for reference);
2. the file is replayed onto the pool (`episodes_from_ids`), and on those identical episodes
   - vtbench: `episode_accuracies(..., "lr")`, all episodes solved together (each reduced exactly to
     its s-dim kernel basis, then batched L-BFGS);
   - scikit-learn: one `LogisticRegression(C=C, max_iter=1000)` fit + predict per episode,
   both on the same L2-normalised features with the same C (l2 = 1/(C*n_support)).

Prints solve times (after one warm-up call each), the time ratio and the difference in mean
accuracy. Target on a 2-core CPU: >= 20x faster, mean accuracy within 0.5 points.

    python benchmarks/fewshot_speed.py [--episodes 600] [--tokens prelogits] [--C 1] [--device cpu] [--threads N] [--sklearn-threads 1]

Each method runs at its own best thread count by default: torch with its default threads, the
scikit-learn loop with one BLAS thread (with 2 contending threads on 2 cores its small per-episode
fits slow down about 10x, which would flatter vtbench).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = "tf_efficientnet_lite0"


def sklearn_accuracies(features: np.ndarray, episodes, C: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    out = []
    for ep in episodes:
        clf = LogisticRegression(C=C, max_iter=1000).fit(features[ep.support], ep.support_labels)
        out.append(np.mean(clf.predict(features[ep.query]) == ep.query_labels))
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--tokens", default="prelogits")
    parser.add_argument("--C", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for vtbench (default: torch's default)")
    parser.add_argument("--sklearn-threads", type=int, default=1,
                        help="BLAS threads for the scikit-learn loop (default 1: its per-episode fits run "
                             "about 10x slower with 2 contending threads on a 2-core machine)")
    parser.add_argument("--cache-dir", default=None, help="default: $VT_CACHE, else the user cache dir")
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors")
    args = parser.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    from vtbench.extract import extract
    from vtbench.fewshot import episode_accuracies, episodes_from_ids, read_episodes, run_fewshot
    from vtbench.fewshot.run import open_pool
    from vtbench.paths import cache_dir
    from vtbench.tokens import parse_spec

    dataset = f"imagefolder:{(args.data / 'caltech101').resolve()}"
    out = cache_dir(args.cache_dir)
    t0 = time.perf_counter()
    extract(MODEL, dataset, ["train", "test"], weights=str(args.weights), cache_dir=out, progress=False)
    print(f"caches ready in {out} ({time.perf_counter() - t0:.1f}s; reused when present)")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"threads: torch {threads}, sklearn BLAS {args.sklearn_threads}; device: {args.device}, "
          f"tokens: {args.tokens}, C={args.C}")

    spec = parse_spec(args.tokens)
    for sampler, shots in (("md", None), ("fixed", (5,)), ("fixed", (1,))):  # md draws its own shots
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "episodes.json"
            # ncc is quick: this call only draws and saves the episodes (and reports ncc for reference).
            (record,) = run_fewshot(MODEL, dataset, args.tokens, sampler, shots=shots, episodes=args.episodes,
                                    classifier="ncc", cache_dir=out, device=args.device, save=False,
                                    save_episodes=file)
            doc, _ = read_episodes(file)
        pool = open_pool(MODEL, dataset, None, out)
        (episode_set,) = episodes_from_ids(doc, pool.image_ids, pool.labels, pool.class_names)
        episodes = episode_set.episodes
        features = pool.features(spec)
        pool.close()
        normed = features / np.linalg.norm(features, axis=1, keepdims=True)

        episode_accuracies(features, episodes[:4], "lr", C=args.C, device=args.device)  # warm-up
        t0 = time.perf_counter()
        ours = episode_accuracies(features, episodes, "lr", C=args.C, device=args.device)
        t_ours = time.perf_counter() - t0

        with warnings.catch_warnings(), threadpool_limits(args.sklearn_threads):
            warnings.simplefilter("ignore")  # sklearn warns when an episode has more classes than half its samples
            sklearn_accuracies(normed, episodes[:4], args.C)  # warm-up
            t0 = time.perf_counter()
            ref = sklearn_accuracies(normed, episodes, args.C)
            t_ref = time.perf_counter() - t0

        sizes = np.array([len(e.support) for e in episodes])
        print(f"\n{record['protocol']}: {len(episodes)} episodes, support {sizes.min()}..{sizes.max()} "
              f"(mean {sizes.mean():.0f}), dim {features.shape[1]}, pool {len(pool.image_ids)} images")
        print(f"  (ncc, for reference: {record['metrics']['accuracy']:.2f} +- {record['metrics']['ci95']:.2f}%)")
        print(f"  vtbench batched lr:  {t_ours:7.2f}s  {100 * ours.accuracy.mean():.2f}%  "
              f"(converged {ours.converged.mean():.1%}, mean {ours.iterations.mean():.1f} L-BFGS iterations)")
        print(f"  sklearn per episode: {t_ref:7.2f}s  {100 * ref.mean():.2f}%")
        print(f"  speed-up: {t_ref / t_ours:.1f}x   mean accuracy difference: "
              f"{100 * (ours.accuracy.mean() - ref.mean()):+.3f} points   "
              f"episodes that differ: {int(np.sum(np.abs(ours.accuracy - ref) > 1e-6))}")


if __name__ == "__main__":
    main()
