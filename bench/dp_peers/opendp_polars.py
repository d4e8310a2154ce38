"""OpenDP 0.16 Polars context: the bench's grouped COUNT + AVG, run by bench/dp.py inside its own virtualenv.

Run: .cache/bench/venv-opendp-polars/bin/python bench/dp_peers/opendp_polars.py --parquet P --rows N
Row-level privacy (each row one unit), site keys public, age clipped to 18..90, all of epsilon on one release.
The timed region is everything from the Parquet file to the collected answer: the context (its domain is
inferred from the file's schema), the plan, the release and the collect.
"""

from __future__ import annotations

import argparse

from measure import Answer, measure, unavailable


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parquet", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=1.0)
    args = parser.parse_args()
    try:
        import opendp.prelude as dp
        import polars as pl
    except ImportError as error:
        unavailable(f"{type(error).__name__}: {error}")
        return
    # The Polars context is built on combinators OpenDP still files under "contrib".
    dp.enable_features("contrib")

    def run() -> Answer:
        context = dp.Context.compositor(
            data=pl.scan_parquet(args.parquet),
            privacy_unit=dp.unit_of(contributions=1),
            privacy_loss=dp.loss_of(epsilon=args.epsilon),
            split_evenly_over=1,
            # The site keys are public (as in the engine's card); the total row count bounds any one group.
            margins=[dp.polars.Margin(by=["site"], invariant="keys", max_length=args.rows)],
        )
        query = context.query().group_by("site").agg([
            dp.len(signed=True).alias("n"),
            pl.col("age").fill_null(0).dp.mean((18, 90)).alias("mean_age"),
        ])
        frame = query.release().collect()
        return [(site, float(n), float(mean)) for site, n, mean in frame.select("site", "n", "mean_age").iter_rows()]

    measure(run, repeats=args.repeats, packages=["opendp", "polars"])


if __name__ == "__main__":
    main()
