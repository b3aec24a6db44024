"""Toy renderer speed: ms per frame by size and supersampling, and per dataset item
(target: ≤ 5 ms at 128 px).

    .venv/bin/python benchmarks/bench_toy_render.py [--frames 200]

Every configuration renders the same poses and expressions (one 8-second talking-head motion) in one run, so
the numbers are comparable side by side; the best of 3 repeats is reported.
"""

import argparse
import time

from anim_lab import toy
from anim_lab.landmarks import draw_pose_image


def best_ms(fn, n: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / n * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    args = parser.parse_args()
    n = args.frames
    ident = toy.identity_from_seed(0)
    poses, exprs = toy.sample_motion(n, 25, seed=0)
    print(f"{'size':>5} {'supersample':>11} {'ms/frame':>9}")
    for size in (64, 128, 256):
        for ss in (1, 2):
            ms = best_ms(
                lambda i, size=size, ss=ss: toy.render(ident, poses[i], exprs[i], size=size, supersample=ss),
                n,
            )
            print(f"{size:>5} {ss:>11} {ms:>9.2f}")
    _, lmk = toy.render(ident, size=128)
    print(f"pose image 128 px: {best_ms(lambda i: draw_pose_image(lmk, 128), n):.2f} ms")
    ds = toy.ToyPortraitDataset(size=128, num_frames=16, length=20)
    print(
        f"dataset item (128 px, 16 frames + reference, pose images): {best_ms(lambda i: ds[i], 20, 1):.1f} ms"
    )
    ms = best_ms(lambda i: toy.render(ident, poses[i], exprs[i], size=128), n)
    print(
        f"default render at 128 px: {ms:.2f} ms/frame -> {'meets' if ms <= 5 else 'MISSES'} the 5 ms target"
    )


if __name__ == "__main__":
    main()
