"""What trivial predictors score on the ratings benchmarks under the common
definitions of a normalised RMSE (A-MAML Tables 1-2 do not define theirs).

    python scripts/ratings_nrmse_baselines.py [DATA_ROOT]   # default ../shared/data

For the 100 fixed meta-test users of ctmeta's MovieLens-100K and Jester-1
families (support = `shots` ratings, query = all the user's other ratings
among the 100 most-rated items, exactly what `ctmeta train` evaluates on),
each predictor's query error is normalised per user in several ways and
averaged over the users:

- `||e||/||y||`: ctmeta's `nrmse` (raw ratings); also on ratings rescaled to [0, 1];
- `RMSE/range`: the rating scale's range (MovieLens 4, Jester 20);
- `(RMSE/range)^2`: the MSE of ratings rescaled to [0, 1];
- `RMSE/std(y)`: the user's query ratings' standard deviation;
- `RMSE/std(all)`: the standard deviation of all the benchmark's ratings.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from ctmeta.tasks.ratings import Jester, MovieLens, load_jester, load_movielens


def _predictors(fam, table, support_items, support_y, query_items):
    # The meta-training users' ratings of the kept items, for the global and per-item means.
    keep = np.isin(table.items, fam.item_ids) & np.isin(table.users, fam.train_user_ids)
    all_items = np.searchsorted(fam.item_ids, table.items[keep], sorter=np.argsort(fam.item_ids))
    all_items = np.argsort(fam.item_ids)[all_items]  # the one-hot column (popularity rank) of each rating
    all_r = table.ratings[keep]
    global_mean = all_r.mean()
    item_mean = np.full(fam.top_items, global_mean)
    s = np.bincount(all_items, all_r, fam.top_items)
    n = np.bincount(all_items, minlength=fam.top_items)
    item_mean[n > 0] = s[n > 0] / n[n > 0]
    user_mean = support_y.mean(axis=1, keepdims=True)
    # Item mean shifted by the user's mean offset on their support items.
    offset = (support_y - item_mean[support_items]).mean(axis=1, keepdims=True)
    return {
        "user's support mean": np.broadcast_to(user_mean, query_items.shape),
        "global mean (training users)": np.full(query_items.shape, global_mean),
        "item mean (training users)": item_mean[np.maximum(query_items, 0)],
        "item mean + user offset": item_mean[np.maximum(query_items, 0)] + offset,
    }, all_r


def table(fam, ratings_table, low, high):
    test = fam.test_batch()
    sx, sy = np.asarray(test.support_x), np.asarray(test.support_y)[..., 0]
    qx, qy = np.asarray(test.query_x), np.asarray(test.query_y)[..., 0]
    mask = np.asarray(test.query_mask)
    support_items = sx.argmax(-1)
    query_items = np.where(mask, qx.argmax(-1), -1)
    preds, all_r = _predictors(fam, ratings_table, support_items, sy, query_items)
    span, std_all = high - low, all_r.std()
    rows = []
    for name, pred in preds.items():
        e = np.where(mask, pred - qy, 0.0)
        n = mask.sum(1)
        rmse = np.sqrt((e**2).sum(1) / n)
        norm_y = np.sqrt(np.where(mask, qy**2, 0).sum(1))
        y01 = np.where(mask, (qy - low) / span, 0.0)
        std_y = np.array([qy[i, mask[i]].std() for i in range(len(qy))])
        rows.append([name, rmse.mean(), (np.sqrt((e**2).sum(1)) / norm_y).mean(),
                     (np.sqrt((e**2).sum(1)) / span / np.sqrt((y01**2).sum(1))).mean(),
                     (rmse / span).mean(), ((rmse / span) ** 2).mean(),
                     np.mean(rmse[std_y > 0] / std_y[std_y > 0]), (rmse / std_all).mean()])
    return rows


HEADER = ["predictor", "RMSE", "||e||/||y||", "||e||/||y|| [0,1]", "RMSE/range", "(RMSE/range)^2",
          "RMSE/std(y)", "RMSE/std(all)"]


def main(root: pathlib.Path) -> None:
    for title, make, load, low, high in (
        ("MovieLens-100K", lambda s, q: MovieLens(root / "movielens", "100k", shots=s, queries=q),
         lambda: load_movielens(root / "movielens", "100k"), 1, 5),
        ("Jester-1 (first 4,000 users)", lambda s, q: Jester(root / "jester", shots=s, queries=q),
         lambda: load_jester(root / "jester"), -10, 10),
    ):
        ratings_table = load()
        for shots, queries in ((10, 15), (20, 30)):
            fam = make(shots, queries)
            print(f"\n### {title}, {shots}shot-{queries}val: {fam.user_ids.size} users kept, "
                  f"{fam.sampled_user_ids.size} meta-training users sampled, 100 test users\n")
            print("| " + " | ".join(HEADER) + " |")
            print("|" + "---|" * len(HEADER))
            for r in table(fam, ratings_table, low, high):
                print("| " + r[0] + " | " + " | ".join(f"{x:.3f}" for x in r[1:]) + " |")


if __name__ == "__main__":
    default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else default)
