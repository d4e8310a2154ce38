"""SmartNoise SQL over pandas: the bench's grouped COUNT + AVG, run by bench/dp.py inside its own virtualenv.

Run: .cache/bench/venv-smartnoise/bin/python bench/dp_peers/smartnoise.py --parquet P --rows N
Row-level privacy (`row_privacy`), age bounded 18..90, site keys public (`censor_dims` off, so no key
thresholding, as in the engine). The timed region is everything from the Parquet file to the answer: reading
the two columns into pandas, the reader (which copies the frame into an in-memory SQLite) and the query.
"""

from __future__ import annotations

import argparse

from measure import Answer, measure, unavailable

QUERY = "SELECT site, COUNT(*) AS n, AVG(age) AS mean_age FROM bench.bench GROUP BY site"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parquet", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-6)
    args = parser.parse_args()
    try:
        import pandas as pd
        import snsql
    except ImportError as error:
        unavailable(f"{type(error).__name__}: {error}")
        return
    metadata = {"bench": {"bench": {"bench": {
        "row_privacy": True,
        "censor_dims": False,
        "rows": args.rows,
        "site": {"type": "string"},
        "age": {"type": "int", "lower": 18, "upper": 90},
    }}}}
    privacy = snsql.Privacy(epsilon=args.epsilon, delta=args.delta)

    def run() -> Answer:
        frame = pd.read_parquet(args.parquet, columns=["site", "age"])
        reader = snsql.from_connection(frame, engine="pandas", privacy=privacy, metadata=metadata)
        _header, *rows = reader.execute(QUERY)
        return [(site, float(n), float(mean)) for site, n, mean in rows]

    measure(run, repeats=args.repeats, packages=["smartnoise-sql", "opendp", "pandas"])


if __name__ == "__main__":
    main()
